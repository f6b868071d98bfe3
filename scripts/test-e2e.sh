#!/usr/bin/env bash
# Control-plane tier: starts the real local control plane, runs the tests that need it, stops it.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
make -s cluster-up
trap 'make -s cluster-down' EXIT
make -s e2e-smoke
export KUBECONFIG="$(make -s --no-print-directory cluster-kubeconfig)"
# Operator tests against the real API server (ignored in the plain cargo run).
cargo test --release -p prism-operator -- --ignored --test-threads=1
# Helm chart, RBAC under the chart's ServiceAccount, GitOps example (needs the prism and
# prism-operator binaries; a no-op build when `make test` already built them).
cargo build --release -q -p prism -p prism-operator --bins
bash scripts/test-chart.sh
