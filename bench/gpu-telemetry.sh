#!/usr/bin/env bash
# GPU telemetry check for a machine with an NVIDIA GPU: starts prism-node with --device cuda on
# all-MiniLM-L6-v2, sends a little load, and checks that /metrics carries the three NVML gauges
# with plausible values (total > 0, 0 < used <= total, 0 <= utilization <= 1, a GPU-/MIG- uuid
# that nvidia-smi also reports). Without a GPU it says so and exits 0 (CI machines are CPU-only;
# the CPU side is node-image/tests/gpu_telemetry.rs).
#
# Usage: bash bench/gpu-telemetry.sh [--bin PATH]        (default: builds --features cuda)
#        bash bench/gpu-telemetry.sh --check-file METRICS (only the /metrics checks, on a saved dump)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MODEL="$ROOT/.cache/models/all-minilm-l6-v2"
BIN=""

# The checks on one /metrics text; prints what it found, returns non-zero on the first problem.
check_metrics() {
    awk '
        function fail(msg) { print "gpu-telemetry: FAIL: " msg; bad = 1 }
        /^prism_node_gpu_[a-z_]+\{/ {
            name = $1; sub(/\{.*/, "", name)
            labels = $1; sub(/^[^{]*/, "", labels)
            v = $2 + 0; n[name]++
            if (labels !~ /device="[0-9]+"/) fail(name " has no numeric device label: " $0)
            if (labels !~ /uuid="(GPU|MIG)-[^"]+"/) fail(name " has no GPU-/MIG- uuid label: " $0)
            if (labels !~ /node="[^"]+"/) fail(name " has no node label: " $0)
            match(labels, /uuid="[^"]+"/); uuid = substr(labels, RSTART + 6, RLENGTH - 7)
            key = uuid
            if (name == "prism_node_gpu_utilization_ratio") { util[key] = v; if (v < 0 || v > 1) fail("utilization " v " outside [0, 1]") }
            if (name == "prism_node_gpu_memory_total_bytes") { total[key] = v; if (v <= 0) fail("memory total " v " is not > 0") }
            if (name == "prism_node_gpu_memory_used_bytes") { used[key] = v }
            uuids[key] = 1
        }
        END {
            split("prism_node_gpu_utilization_ratio prism_node_gpu_memory_used_bytes prism_node_gpu_memory_total_bytes", want, " ")
            for (i in want) if (!(want[i] in n)) fail(want[i] " is missing")
            for (u in uuids) {
                if (!(u in used) || used[u] <= 0 || used[u] > total[u]) fail("memory used " used[u] " not in (0, total " total[u] "] for " u)
                printf "gpu-telemetry: %s utilization=%.2f memory_used=%.0f MiB memory_total=%.0f MiB\n", u, util[u], used[u] / 1048576, total[u] / 1048576
                print u > "/dev/stderr"
            }
            exit bad
        }' "$1"
}

case "${1:-}" in
    --check-file) check_metrics "$2" 2>/dev/null; exit ;;
    --bin) BIN="$2" ;;
    "") ;;
    *) echo "usage: $0 [--bin PATH] | --check-file METRICS" >&2; exit 2 ;;
esac

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    echo "gpu-telemetry: no NVIDIA GPU on this machine (nvidia-smi missing or lists no GPU); nothing to check, skipping"
    exit 0
fi
nvidia-smi -L

if [[ -z "$BIN" ]]; then
    echo "gpu-telemetry: building prism-node --features cuda (needs the CUDA toolkit)"
    (cd "$ROOT" && cargo build --release -p prism-node --bin prism-node --features cuda)
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/prism-node"
fi
[[ -f "$MODEL/model.safetensors" ]] || (cd "$ROOT" && make models)

WORK="$(mktemp -d)"
NODE_PID=""
cleanup() {
    if [[ -n "$NODE_PID" ]]; then kill "$NODE_PID" 2>/dev/null || true; wait "$NODE_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

RUST_LOG=info "$BIN" --listen 127.0.0.1:0 --node-name gpu-check --architecture bert --device cuda \
    --model-uri "file://$MODEL" >"$WORK/stdout" 2>"$WORK/stderr" &
NODE_PID=$!

URL=""
for _ in $(seq 1 600); do
    URL="$(sed -n 's/^listening on //p' "$WORK/stdout" | head -1)"
    [[ -n "$URL" ]] && curl -fsS -o /dev/null "$URL/ready" 2>/dev/null && break
    if ! kill -0 "$NODE_PID" 2>/dev/null; then
        echo "gpu-telemetry: FAIL: prism-node exited before it was ready; its log:"; tail -20 "$WORK/stderr"; exit 1
    fi
    sleep 0.5
done
curl -fsS -o /dev/null "$URL/ready" || { echo "gpu-telemetry: FAIL: not ready within 300 s"; tail -20 "$WORK/stderr"; exit 1; }
grep -q '"device":"cuda' <(curl -fsS "$URL/info") || { echo "gpu-telemetry: FAIL: /info does not report a cuda device"; curl -sS "$URL/info"; exit 1; }

# Some load while the sampler (every 5 s) takes at least one reading with the model resident.
BODY='{"inputs": ["'"$(printf 'gpu telemetry check sentence %.0s' $(seq 1 20))"'"]}'
END=$((SECONDS + 7))
while (( SECONDS < END )); do
    for _ in 1 2 3 4 5 6 7 8; do curl -fsS -o /dev/null -H 'content-type: application/json' -d "$BODY" "$URL/embed" & done
    wait
done
curl -fsS "$URL/metrics" >"$WORK/metrics"
grep -i "GPU telemetry" "$WORK/stderr" || true

if ! check_metrics "$WORK/metrics" 2>"$WORK/uuids"; then
    grep prism_node_gpu_ "$WORK/metrics" || echo "(no prism_node_gpu_ lines in /metrics)"
    exit 1
fi
while read -r uuid; do
    # nvidia-smi --query-gpu lists whole GPUs only; a MIG slice's uuid is not among them.
    [[ "$uuid" == MIG-* ]] && continue
    nvidia-smi --query-gpu=uuid --format=csv,noheader | grep -qx "$uuid" \
        || { echo "gpu-telemetry: FAIL: uuid $uuid is not one nvidia-smi lists"; exit 1; }
done <"$WORK/uuids"
echo "gpu-telemetry: OK (three prism_node_gpu_* gauges present and plausible)"
