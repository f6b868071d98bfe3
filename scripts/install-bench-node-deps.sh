#!/usr/bin/env bash
# Python side of `make bench-node`: the runtimes a careful user would pick instead of Prism, each in
# a venv of the benchmark's own (never the test environment's):
#   bench/.venv       torch (CPU build), transformers, sentence-transformers, onnxruntime (+ onnx,
#                     onnxscript for the export), openvino
#   bench/.venv-ipex  torch 2.8 + intel-extension-for-pytorch 2.8 (IPEX's last release imports only
#                     with torch 2.8.x). Optional: when it does not install, the bench says so and
#                     measures the others.
# Idempotent: about two seconds once done.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/pip-torch.sh
source "$ROOT/scripts/pip-torch.sh"

# make_venv DIR CHECK_IMPORTS TORCH_SPEC PACKAGES...
make_venv() {
  local venv=$1 check=$2 torch_spec=$3; shift 3
  local py="$venv/bin/python"
  if [ -x "$py" ] && "$py" -c "import $check" 2>/dev/null; then
    echo "bench-node deps: ready in $venv"
    return 0
  fi
  [ -x "$py" ] || { echo "bench-node deps: creating venv $venv"; python3 -m venv "$venv" || return 1; }
  "$py" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! "$py" -c 'import torch' 2>/dev/null; then
    pip_install_torch "$py" "$torch_spec" "bench-node deps" || return 1
  fi
  echo "bench-node deps: pip install $* into $venv"
  "$py" -m pip install -q "$@" || return 1
  "$py" -c "import $check" || return 1
  echo "bench-node deps: ready in $venv"
}

make_venv "$ROOT/bench/.venv" "torch, sentence_transformers, onnxruntime, onnx, openvino" torch \
  sentence-transformers onnxruntime onnx onnxscript openvino || {
  echo "bench-node deps: could not install the main anchors into bench/.venv" >&2
  exit 1
}
# transformers 4.x: IPEX 2.8's optimisations patch modules that transformers 5 renamed.
make_venv "$ROOT/bench/.venv-ipex" "torch, intel_extension_for_pytorch, transformers" "torch==2.8.*" \
  "intel-extension-for-pytorch==2.8.*" "transformers<4.56" psutil ||
  echo "bench-node deps: IPEX did not install (optional anchor; bench-node measures the others)" >&2
exit 0
