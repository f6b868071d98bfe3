#!/usr/bin/env bash
# The full test suite (`make test`, run by .ci/run on a fresh clone).
# Order: install what tests need -> build once (release) -> unit/integration tests -> distributed
# fine-tuning (train/) -> control plane tests.
# Each section prints a banner with its elapsed time, so a slow or failing tier is easy to spot.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
T0=$(date +%s)
section() { echo; echo "=== [$(( $(date +%s) - T0 ))s] $* ==="; }

# A cold run needs about 25 GB (cargo target, Go modules, the CUDA PyTorch wheel when PyTorch's CPU
# index is unreachable). Say so up front rather than fail an hour in with ENOSPC.
FREE_GB=$(df -Pk "$ROOT" | awk 'NR==2 {print int($4 / 1048576)}')
section "disk: ${FREE_GB} GB free under $ROOT"
if [ "$FREE_GB" -lt 25 ]; then
  echo "warning: under 25 GB free; a cold run (no target/, .cache/go, .cache/venv-train) may fail with ENOSPC"
fi

section "install test dependencies"
bash scripts/install-deps.sh

section "models"
make -s models

section "format (cargo fmt --check)"
cargo fmt --all --check

section "build (release, once)"
cargo build --release --workspace --bins

section "images (OCI archives from the release binaries; operator/tests/images.rs starts them)"
python3 scripts/build-images.py

section "lint (cargo clippy -D warnings)"
cargo clippy --release --workspace --all-targets -- -D warnings

section "unit and integration tests (cargo, release)"
cargo test --release --workspace --no-fail-fast

section "distributed fine-tuning (torchrun, 2 gloo workers, adapter parity with prism-node)"
bash scripts/install-train-deps.sh && .cache/venv-train/bin/python train/test_distributed.py

section "GPU bundle check script, run on the CPU (bench/gpu/check.py --device cpu)"
bash bench/gpu/test-on-cpu.sh

section "demo (prism up with real models, requests, failover; same script as make demo)"
python3 scripts/demo.py

section "real clients (openai, tritonclient, kserve against prism-router + prism-node)"
bash scripts/install-client-deps.sh && .cache/venv-clients/bin/python -m pytest -q tests/clients

section "chaos (make chaos without its two control-plane scenarios; docs/reliability.md)"
python3 tests/chaos/run.py --bin "${CARGO_TARGET_DIR:-target}/release/prism" --skip-control-plane

section "control plane tests (real kube-apiserver)"
bash scripts/test-e2e.sh

section "real pods (kubelet + containerd in a network namespace; the images of make images)"
make -s e2e-real

section "fuzz (20 s per target; a crash fails the run)"
bash scripts/fuzz.sh 20

section "done in $(( $(date +%s) - T0 ))s"
