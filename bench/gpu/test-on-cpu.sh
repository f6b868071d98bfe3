#!/usr/bin/env bash
# Runs the GPU bundle's check.py on the CPU (`--device cpu --quick`, the CPU prism-node, PyTorch
# from .cache/venv-train): the script that otherwise runs only on lent GPU machines is exercised
# by every `make test`, including its cosine check against the PyTorch BERT. Figures from this run
# mean nothing; the check fails only on a wrong vector or a broken script.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
PY="${PRISM_TORCH_PYTHON:-$ROOT/.cache/venv-train/bin/python}"
[[ -x "$PY" ]] || bash scripts/install-train-deps.sh
D="$(mktemp -d)"
trap 'rm -rf "$D"' EXIT
python3 bench/gpu/assets.py --model .cache/models/all-minilm-l6-v2 --out "$D"
cp bench/gpu/check.py "$D/"
"$PY" "$D/check.py" --device cpu --quick --bin "${CARGO_TARGET_DIR:-$ROOT/target}/release/prism-node"
