# Sourced by the install scripts that need PyTorch in a venv of their own.
# pip_install_torch PY SPEC LABEL: installs SPEC (`torch`, `torch==2.8.*`) with PY's pip. The
# CPU-only wheel is ~200 MB; PyPI's default Linux wheel pulls the CUDA runtime (~3 GB) too, so the
# CPU index is used when it answers, plain PyPI otherwise. LABEL prefixes the progress lines.
# --no-cache-dir: pip's cache would keep a second copy of those gigabytes on the same disk as the
# build (a CI run once failed with ENOSPC here).
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

pip_install_torch() {
  local py=$1 spec=$2 label=$3
  if "$py" -c "import urllib.request; urllib.request.urlopen('$TORCH_CPU_INDEX/torch/', timeout=10)" 2>/dev/null; then
    echo "$label: pip install $spec (CPU build, $TORCH_CPU_INDEX)"
    "$py" -m pip install -q --no-cache-dir "$spec" --index-url "$TORCH_CPU_INDEX"
  else
    echo "$label: $TORCH_CPU_INDEX unreachable; pip install $spec from PyPI (the CUDA build: large download)"
    "$py" -m pip install -q --no-cache-dir "$spec"
  fi
}
