#!/usr/bin/env bash
# Creates .venv and installs imgserve into it. `scripts/setup.sh test` adds the test tools.
# Without an NVIDIA GPU, torch's CPU wheel (2.13.0) goes in first so no CUDA packages are pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
python3 -m venv .venv
py=.venv/bin/python
if ! "$py" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$py" -m pip install -q torch
  else
    "$py" -m pip install -q torch==2.13.0
  fi
fi
gpu=""
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  gpu=",gpu"  # torchao: float8 compute on cards that have it (real.placement.compute: fp8)
fi
if [ "$extra" = "test" ]; then
  "$py" -m pip install -q -e ".[test$gpu]"
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
elif [ -n "$gpu" ]; then
  "$py" -m pip install -q -e ".[gpu]"
else
  "$py" -m pip install -q -e .
fi
