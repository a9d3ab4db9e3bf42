#!/usr/bin/env bash
# Creates .venv, or brings an existing one to the locks, and installs imgserve into it:
#   scripts/setup.sh        (make demo)  torch, then requirements/base.txt
#   scripts/setup.sh test   (make test, CI)  torch, then requirements/test.txt (+ the test tools), Chromium
#   scripts/setup.sh lock   (make lock)  regenerates requirements/*.txt from pyproject.toml;
#                           UPGRADE=1 moves every pin to the newest release the ranges admit
# torch is pinned here by version, not by hash: its wheel differs per machine (the CPU build where
# no NVIDIA GPU is seen, so no CUDA packages are pulled; PyPI's CUDA build where one is). Every other
# package comes from a lock with hashes (pip --require-hashes --no-deps: exactly the files CI
# installed, nothing resolved at install time); where a GPU is seen requirements/gpu.txt adds the
# `gpu` extra (torchao, float8 compute). The project itself goes in last, editable, without deps.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
TORCH_VERSION=2.13.0

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

LOCK_NOTE="# A lock with hashes for CPython 3.11 on Linux x86_64: every package but torch, which
# scripts/setup.sh pins by version (its wheel differs per machine) and installs first. setup.sh
# installs it with \`pip install --no-deps --require-hashes -r\`: base.txt for make demo, test.txt
# for make test and CI, gpu.txt added where a GPU is seen. To change it: edit pyproject.toml,
# then \`make lock\` (\`UPGRADE=1 make lock\` moves every pin to the newest allowed release).
#"

lock() {
  # pip-tools in a venv of its own (never in .venv), pinned so every regeneration writes one format.
  local tools="${LOCK_VENV:-${TMPDIR:-/tmp}/imgserve-pip-tools}"
  if [ ! -x "$tools/bin/pip-compile" ]; then
    python3 -m venv "$tools"
    "$tools/bin/pip" install -q pip-tools==7.6.2
  fi
  local constraint
  constraint="$(mktemp)"
  echo "torch==$TORCH_VERSION" >"$constraint"  # torch's own dependencies as that version needs them
  local compile=("$tools/bin/pip-compile" -q --generate-hashes --strip-extras --unsafe-package torch
                 --no-emit-index-url --no-emit-find-links)
  export CUSTOM_COMPILE_COMMAND="make lock"
  # The build backend (setuptools) is locked too, so `pip install --no-build-isolation -e .` fetches nothing.
  "${compile[@]}" ${UPGRADE:+--upgrade} --build-deps-for editable -c "$constraint" --extra test \
    -o requirements/test.txt pyproject.toml
  # base = test less the test tools, with the same pins and hashes (test.txt seeds pip-compile's pins).
  cp requirements/test.txt requirements/base.txt
  "${compile[@]}" --build-deps-for editable -c "$constraint" -o requirements/base.txt pyproject.toml
  # gpu.txt: the `gpu` extra alone (installed on top of base or test), within test.txt's pins.
  python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]
                                              ["optional-dependencies"]["gpu"]))' |
    "${compile[@]}" ${UPGRADE:+--upgrade} -c requirements/test.txt -o requirements/gpu.txt -
  rm -f "$constraint"
  local lock
  for lock in requirements/base.txt requirements/test.txt requirements/gpu.txt; do
    # Where the resolver saw PyPI's CUDA torch, its CUDA packages (nvidia-*, cuda-*, triton) came along:
    # they belong to the torch wheel of each machine, not to the lock.
    awk '/^#/ {skip = 0} /^[A-Za-z0-9]/ {skip = ($0 ~ /^(nvidia-|cuda-|triton==)/)} !skip' "$lock" |
      LOCK_NOTE="$LOCK_NOTE" awk '{print} /^#    make lock$/ && !done {getline; print; print ENVIRON["LOCK_NOTE"]; done = 1}' \
      >"$lock.tmp"
    mv "$lock.tmp" "$lock"
  done
  echo "wrote requirements/{base,test,gpu}.txt (torch $TORCH_VERSION is pinned in scripts/setup.sh)"
}

case "$mode" in
  lock) lock; exit 0 ;;
  "") locked=requirements/base.txt ;;
  test) locked=requirements/test.txt ;;
  *) echo "usage: scripts/setup.sh [test|lock]" >&2; exit 2 ;;
esac

python3 -m venv .venv
py=.venv/bin/python
"$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
  echo "setup.sh: the locks are resolved for Python 3.11, .venv has $("$py" -V); pip check below has the last word" >&2
pip=("$py" -m pip install -q)
# The installed torch is kept when it is the pinned version (and a CUDA build where a GPU is seen).
torch_now="$("$py" -c 'from importlib.metadata import version; print(version("torch"))' 2>/dev/null || true)"
if has_gpu; then
  if [ "${torch_now%%+*}" != "$TORCH_VERSION" ] || [ "${torch_now#*+}" = cpu ]; then
    "${pip[@]}" "torch===$TORCH_VERSION"  # `===`: PyPI's CUDA build, never a local `+cpu` wheel
  fi
  gpu=1
else
  if [ "${torch_now%%+*}" != "$TORCH_VERSION" ]; then
    # torch's pure-Python dependencies (sympy, networkx, ...) come from the lock with hashes. The
    # CPU wheel: from pip's local wheel directories (find-links) where it lies there, else PyTorch's index.
    torch_cpu=(--no-deps "torch==$TORCH_VERSION+cpu")
    "${pip[@]}" --no-index "${torch_cpu[@]}" 2>/dev/null ||
      "${pip[@]}" --extra-index-url https://download.pytorch.org/whl/cpu "${torch_cpu[@]}"
  fi
  gpu=""
fi
"${pip[@]}" --no-deps --require-hashes -r "$locked"
[ -z "$gpu" ] || "${pip[@]}" --no-deps --require-hashes -r requirements/gpu.txt
"${pip[@]}" --no-deps --no-build-isolation -e .
"$py" -m pip check >/dev/null || { "$py" -m pip check >&2; echo "setup.sh: .venv is inconsistent (see above)" >&2; exit 1; }

if [ "$mode" = "test" ]; then
  # tests/web drives the page in Debian's Chromium through Playwright (never `playwright install`);
  # without it those tests skip and say why, so a failed install here warns instead of stopping.
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    apt=($sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300)
    log="$(mktemp)"
    for attempt in 1 2 3; do  # a mirror hiccup should not cost the browser tests
      if { "${apt[@]}" update -qq &&
           "${apt[@]}" install -y -qq --no-install-recommends chromium fonts-dejavu-core; } >"$log" 2>&1; then
        break
      fi
      sleep $((attempt * 5))
    done
    if [ ! -x /usr/bin/chromium ]; then
      tail -n 20 "$log" >&2
      echo "setup.sh: could not install chromium; the browser tests (tests/web) will be skipped" >&2
    fi
    rm -f "$log"
  fi
fi
