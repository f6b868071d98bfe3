#!/usr/bin/env bash
# `make gpu-bundle`: builds prism-node with `--features cuda` on a machine without a GPU and writes
# target/gpu-bundle/, a self-contained folder (<= 60 MiB) to copy onto a GPU machine that has
# PyTorch and the CUDA libraries but no Rust and no network. There, `python3 check.py` starts the
# node on the GPU, checks its vectors against PyTorch on the same GPU, measures both, and prints
# one line `gpu: prism_sps=... torch_fp16_sps=... ratio=... p99_ms_b1=... cos_min=... nvml_series=...`.
#
# Where the toolchain comes from (facts and versions in docs/operations.md, "GPU nodes"):
# - nvcc, the CUDA headers and libraries: PyPI's NVIDIA wheels, in .cache/venv-cuda. Pinned to CUDA
#   13.0: candle's kernels ship as PTX that the target's driver JIT-compiles, and a newer nvcc writes
#   a PTX ISA that older drivers reject.
# - libcuda.so.1, needed at link time only (no wheel ships a stub): unpacked, not installed, from
#   Debian's non-free `libcuda1` with a private apt source list, so the machine's apt config is
#   untouched. The target's driver provides the real one at run time.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
T0=$(date +%s)
step() { echo "gpu-bundle: [$(( $(date +%s) - T0 ))s] $*"; }

VENV="$ROOT/.cache/venv-cuda"
OUT="${CARGO_TARGET_DIR:-$ROOT/target}/gpu-bundle"
# Its own target dir: the cuda feature changes candle, and sharing target/ would overwrite the CPU
# binary that tests and `prism up` use.
CUDA_TARGET="${PRISM_CUDA_TARGET_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/cuda}"
COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
MODEL="$ROOT/.cache/models/all-minilm-l6-v2"

# --- toolchain -------------------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then python3 -m venv "$VENV"; fi
if ! "$VENV/bin/python" -c 'import nvidia' 2>/dev/null || [[ ! -x "$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13/bin 2>/dev/null)/nvcc" ]]; then
    step "installing nvcc and the CUDA 13.0 libraries from PyPI into $VENV (~1 GB)"
    "$VENV/bin/pip" install -q \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.88 nvidia-cuda-cccl==13.0.85 \
        nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-nvrtc==13.0.88 \
        nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
fi
C="$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13)"
# The wheels ship only versioned sonames; the linker looks for the plain names, cudarc for lib64.
for lib in "$C"/lib/lib{cublas,cublasLt,curand,nvrtc,cudart}.so.*; do
    [[ -e "$lib" ]] || continue
    base="${lib##*/}"; plain="$C/lib/${base%%.so.*}.so"
    [[ -e "$plain" ]] || ln -s "$base" "$plain"
done
[[ -e "$C/lib64" ]] || ln -s lib "$C/lib64"

if [[ ! -e "$C/lib/libcuda.so" ]]; then
    step "fetching libcuda.so.1 (link time only) from Debian non-free"
    APT="$ROOT/.cache/apt-nonfree"
    mkdir -p "$APT/lists/partial" "$APT/archives/partial" "$APT/deb"
    . /etc/os-release
    echo "deb http://deb.debian.org/debian ${VERSION_CODENAME} non-free non-free-firmware" >"$APT/sources.list"
    aptopts=(-o "Dir::Etc::SourceList=$APT/sources.list" -o "Dir::Etc::SourceParts=-" -o "Dir::State::Lists=$APT/lists"
             -o "Dir::Cache::Archives=$APT/archives" -o "APT::Get::List-Cleanup=0" -o "APT::Sandbox::User=root")
    apt-get "${aptopts[@]}" update -qq
    (cd "$APT/deb" && apt-get "${aptopts[@]}" download -qq libcuda1)
    rm -rf "$APT/x" && dpkg-deb -x "$APT"/deb/libcuda1_*.deb "$APT/x"
    real="$(find "$APT/x" -name 'libcuda.so.*.*' -type f | head -1)"
    [[ -n "$real" ]] || { echo "gpu-bundle: libcuda.so.* not found in the libcuda1 package" >&2; exit 1; }
    cp "$real" "$C/lib/libcuda.so.1"
    ln -sf libcuda.so.1 "$C/lib/libcuda.so"
fi

# --- build -----------------------------------------------------------------------------------
step "building prism-node --features cuda for compute capability $COMPUTE_CAP into $CUDA_TARGET (first time: ~30 min on 2 cores)"
PATH="$C/bin:$PATH" CUDA_HOME="$C" CUDA_PATH="$C" CUDARC_CUDA_VERSION=13000 CUDA_COMPUTE_CAP="$COMPUTE_CAP" \
    CUDAFORGE_THREADS="$(nproc)" LIBRARY_PATH="$C/lib${LIBRARY_PATH:+:$LIBRARY_PATH}" \
    CARGO_TARGET_DIR="$CUDA_TARGET" \
    cargo build --release -p prism-node --bin prism-node --features cuda
BIN="$CUDA_TARGET/release/prism-node"

# --- bundle ----------------------------------------------------------------------------------
[[ -f "$MODEL/model.safetensors" ]] || make -s models
python3 -c 'import safetensors, numpy, tokenizers' 2>/dev/null || bash scripts/install-deps.sh
step "writing $OUT"
rm -rf "$OUT" && mkdir -p "$OUT/model"
strip -o "$OUT/prism-node" "$BIN"
xz -T0 -6 -f "$OUT/prism-node"           # 63 MB -> ~10 MB; check.py unpacks it with Python's lzma
python3 bench/gpu/assets.py --model "$MODEL" --out "$OUT"
cp bench/gpu/check.py "$OUT/check.py"
cp bench/gpu/README.md "$OUT/README.md"
size_mib=$(( $(du -sb "$OUT" | cut -f1) / 1048576 ))
step "$OUT is ${size_mib} MiB (limit 60): $(cd "$OUT" && ls | tr '\n' ' ')"
(( size_mib <= 60 )) || { echo "gpu-bundle: bundle is ${size_mib} MiB, over the 60 MiB limit" >&2; exit 1; }
echo "gpu-bundle: copy $OUT to a GPU machine and run: python3 check.py"
