#!/usr/bin/env bash
# A local multi-node Ray cluster on this machine, on loopback only, with fake GPUs:
#   cluster/local.sh up            head (no GPUs) + 2 worker nodes, each 2 fake GPUs and {"rtx4090": 2}
#   cluster/local.sh status        `ray status` of that cluster
#   cluster/local.sh stop-worker N kill worker N's raylet (a node failure: its replicas die with it)
#   cluster/local.sh down          stop every process of this cluster (and nothing else)
# Settings (environment): IMGSERVE_CLUSTER_PORT (GCS port, default 6390), IMGSERVE_CLUSTER_IP
# (127.0.0.2: a loopback address; Ray turns 127.0.0.1 itself into the host's public address),
# IMGSERVE_WORKERS (2),
# IMGSERVE_WORKER_GPUS (2), IMGSERVE_WORKER_CPUS (1), IMGSERVE_HEAD_CPUS (1),
# IMGSERVE_DASHBOARD (1: start the dashboard, which `serve deploy` and Ray's state API need; 0 saves
# ~0.3 GB), IMGSERVE_DASHBOARD_PORT (8265), IMGSERVE_WORKER_ENV (space-separated NAME=VALUE pairs set
# on the worker nodes only: every process Ray starts there inherits them, the head's do not).
# Ray's token authentication is on (RAY_AUTH_MODE=token), as on a real cluster: the token is
# RAY_AUTH_TOKEN or the file RAY_AUTH_TOKEN_PATH when given, else a random one made at `up` in
# /tmp/imgserve-ray-PORT/auth_token (mode 600), which `status` and `stop-worker` read too.
# Then: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=/tmp/imgserve-ray-6390/auth_token \
#   serve deploy -a http://127.0.0.2:8265 configs/rtx4090-cluster.yaml (the head's dashboard; or serve.run from Python).
set -euo pipefail
cd "$(dirname "$0")/.."
ray=${RAY:-.venv/bin/ray}
port=${IMGSERVE_CLUSTER_PORT:-6390}
ip=${IMGSERVE_CLUSTER_IP:-127.0.0.2}
workers=${IMGSERVE_WORKERS:-2}
gpus=${IMGSERVE_WORKER_GPUS:-2}
worker_cpus=${IMGSERVE_WORKER_CPUS:-1}
head_cpus=${IMGSERVE_HEAD_CPUS:-1}
dashboard=${IMGSERVE_DASHBOARD:-1}
dashboard_port=${IMGSERVE_DASHBOARD_PORT:-8265}
read -r -a worker_env <<<"${IMGSERVE_WORKER_ENV:-}"
unset IMGSERVE_WORKER_ENV  # no Ray process, the head's included, sees the list itself
address=$ip:$port
temp=/tmp/imgserve-ray-$port
token_file=$temp/auth_token
export RAY_AUTH_MODE=token
# A token given by the caller wins (Ray reads RAY_AUTH_TOKEN before RAY_AUTH_TOKEN_PATH); else this
# cluster's own file, never ~/.ray/auth_token, which other Ray clusters of this user may share.
if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ -z "${RAY_AUTH_TOKEN_PATH:-}" ]; then
  export RAY_AUTH_TOKEN_PATH=$token_file
fi
for pair in ${worker_env[@]+"${worker_env[@]}"}; do
  case "$pair" in
    [A-Za-z_]*=*) ;;
    *) echo "IMGSERVE_WORKER_ENV: expected NAME=VALUE pairs, got '$pair'" >&2; exit 2 ;;
  esac
done
# Each node gets its own port block so a single worker's processes can be told apart (stop-worker).
node_port() { echo $((port + 10 + $1)); }

# Every process of this cluster names its temp dir or GCS address on its command line; nothing else
# does. (Ray's own workers rename themselves, but they exit with their raylet.)
cluster_pids() { pgrep -f -- "($temp/|$temp |$address)" || true; }
# A process and all its descendants (raylets start agents and workers that rename themselves).
with_children() {
  local pid
  for pid in "$@"; do
    echo "$pid"
    with_children $(pgrep -P "$pid" || true)
  done
}

up() {
  if cluster_pids | grep -q .; then
    echo "a cluster on $address is already running (cluster/local.sh down first)" >&2
    exit 1
  fi
  local dash=false
  [ "$dashboard" = 1 ] && dash=true
  if [ "${RAY_AUTH_TOKEN_PATH:-}" = "$token_file" ] && [ -z "${RAY_AUTH_TOKEN:-}" ]; then
    # a fresh random token for each cluster (256 bits, as `ray get-auth-token --generate` makes)
    mkdir -p "$temp"
    (umask 077; od -An -vtx1 -N32 /dev/urandom | tr -d ' \n' >"$token_file")
  fi
  # The head carries no GPUs and a marker resource: GPU replicas can never land there, and
  # deployments that must outlive a worker (the job runner) can ask for it.
  "$ray" start --head --node-ip-address="$ip" --port="$port" --temp-dir="$temp" \
    --num-cpus="$head_cpus" --num-gpus=0 --resources='{"imgserve_head": 1}' \
    --node-manager-port="$(node_port 0)" --include-dashboard="$dash" --dashboard-host="$ip" --dashboard-port="$dashboard_port" \
    --disable-usage-stats >/dev/null
  for i in $(seq 1 "$workers"); do
    env ${worker_env[@]+"${worker_env[@]}"} "$ray" start --address="$address" --node-ip-address="$ip" \
      --num-cpus="$worker_cpus" --num-gpus="$gpus" --resources="{\"rtx4090\": $gpus}" \
      --node-manager-port="$(node_port "$i")" --disable-usage-stats >/dev/null
  done
  echo "cluster up: head + $workers workers ($gpus fake GPUs and rtx4090 each) at $address"
  if [ -z "${RAY_AUTH_TOKEN:-}" ]; then
    echo "its token: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
  fi
}

stop_worker() {
  local n=${1:?usage: cluster/local.sh stop-worker N}
  local pids
  pids=$(with_children $(pgrep -f -- "node_manager_port=$(node_port "$n")" || true))
  if [ -z "$pids" ]; then
    echo "no worker $n running" >&2
    exit 1
  fi
  # SIGKILL the raylet and everything it started: the node vanishes the way a crashed machine does.
  kill -9 $pids 2>/dev/null || true
  echo "worker $n stopped"
}

down() {
  local pids
  pids=$(with_children $(cluster_pids))
  if [ -n "$pids" ]; then
    kill $pids 2>/dev/null || true
    for _ in $(seq 1 20); do
      cluster_pids | grep -q . || break
      sleep 0.5
    done
    pids=$(with_children $(cluster_pids))
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
  fi
  echo "cluster on $address down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) "$ray" status --address="$address" ;;
  stop-worker) stop_worker "${2:-}" ;;
  *) echo "usage: cluster/local.sh up|down|status|stop-worker N" >&2; exit 2 ;;
esac
