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
if [ "$extra" = "test" ]; then
  "$py" -m pip install -q -e ".[test]"
else
  "$py" -m pip install -q -e .
fi
