#!/usr/bin/env bash
# Creates .cache/venv-train with what train/prism_train.py needs: torch (CPU build when its index is
# reachable), transformers, peft, safetensors, numpy. Idempotent: a no-op (about a second) once done.
#   bash scripts/install-train-deps.sh        # then: .cache/venv-train/bin/python train/test_distributed.py
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/pip-torch.sh
source "$ROOT/scripts/pip-torch.sh"
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

if ! "$PY" -c 'import torch' 2>/dev/null; then
  pip_install_torch "$PY" torch "train deps"
fi
echo "train deps: pip install transformers peft safetensors numpy"
"$PY" -m pip install -q transformers peft safetensors numpy
versions=$("$PY" -c "$CHECK")
echo "train deps: ready in $VENV ($versions)"
