#!/usr/bin/env bash
# Creates .cache/venv-train with what train/prism_train.py needs: torch (CPU build when its index is
# reachable), transformers, peft, safetensors, numpy. Idempotent: a no-op (about a second) once done.
#   bash scripts/install-train-deps.sh        # then: .cache/venv-train/bin/python train/test_distributed.py
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${PRISM_TRAIN_VENV:-$ROOT/.cache/venv-train}"
PY="$VENV/bin/python"
# One interpreter start (importing torch + transformers takes seconds): checks and names the versions.
CHECK='import torch, torch.distributed, transformers, peft, safetensors, numpy
print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")'

if [ -x "$PY" ] && versions=$("$PY" -c "$CHECK" 2>/dev/null); then
  echo "train deps: ready in $VENV ($versions)"
  exit 0
fi

if [ ! -x "$PY" ]; then
  echo "train deps: creating venv $VENV"
  python3 -m venv "$VENV"
fi
"$PY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true

# The CPU-only wheel is ~200 MB; the PyPI default for Linux pulls the CUDA runtime (~3 GB) too.
# Use the CPU index when it answers, plain PyPI otherwise.
CPU_INDEX="https://download.pytorch.org/whl/cpu"
if ! "$PY" -c 'import torch' 2>/dev/null; then
  if "$PY" -c "import urllib.request,sys; urllib.request.urlopen('$CPU_INDEX/torch/', timeout=10)" 2>/dev/null; then
    echo "train deps: pip install torch (CPU build, $CPU_INDEX)"
    "$PY" -m pip install -q torch --index-url "$CPU_INDEX"
  else
    echo "train deps: $CPU_INDEX unreachable; pip install torch from PyPI (the CUDA build: large download)"
    "$PY" -m pip install -q torch
  fi
fi
echo "train deps: pip install transformers peft safetensors numpy"
"$PY" -m pip install -q transformers peft safetensors numpy
versions=$("$PY" -c "$CHECK")
echo "train deps: ready in $VENV ($versions)"
