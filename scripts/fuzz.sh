#!/usr/bin/env bash
# Short libFuzzer runs of every fuzz target (fuzz/): router request parsing, manifest parsing and
# validation, image and WAV decoding. Seeds: fuzz/corpus/<target>, plus examples/ and the invalid
# manifests for `manifest`. New inputs go to a scratch folder, so the tree stays clean; a crash
# leaves its reproducer in fuzz/artifacts/<target>/ and fails the run.
#   scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 20; FUZZ_TARGETS="a b" to choose)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT/fuzz"
SECS="${1:-20}"
TARGETS="${FUZZ_TARGETS:-router_request manifest media_decode}"
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: needs the nightly toolchain (rustup toolchain install nightly); cargo-fuzz builds with it" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz from crates.io"
  cargo install cargo-fuzz --locked --quiet
fi
# One target dir for every run (and the main workspace's cargo cache stays untouched).
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$ROOT/target/fuzz}"
cargo +nightly fuzz build --release --sanitizer none >/dev/null
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
for t in $TARGETS; do
  seeds=("corpus/$t")
  [ "$t" = manifest ] && seeds=("$ROOT/examples" "$ROOT/tests/fixtures/invalid-manifests")
  mkdir -p "$SCRATCH/$t" "artifacts/$t"
  echo "fuzz: $t for ${SECS}s"
  # The run's own exit status decides (a crash, an OOM, a timeout, a build or usage error all
  # fail the script); the log is only filtered for the summary lines afterwards.
  log="$SCRATCH/$t.log"
  rc=0
  cargo +nightly fuzz run --release --sanitizer none "$t" "$SCRATCH/$t" "${seeds[@]}" -- \
    -max_total_time="$SECS" -rss_limit_mb=2048 -timeout=10 -max_len=65536 -print_final_stats=1 \
    -artifact_prefix="$ROOT/fuzz/artifacts/$t/" >"$log" 2>&1 || rc=$?
  grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|INFO: Done|==[0-9]+== ERROR|SUMMARY)" "$log" || true
  if [ "$rc" -ne 0 ]; then
    echo "fuzz: $t: cargo fuzz exited with status $rc; last lines of its output:" >&2
    tail -n 40 "$log" >&2
    if compgen -G "artifacts/$t/*" >/dev/null; then
      echo "fuzz: reproduce with: cd fuzz && cargo +nightly fuzz run $t artifacts/$t/<file>" >&2
    fi
    exit 1
  fi
  if compgen -G "artifacts/$t/*" >/dev/null; then
    echo "fuzz: $t found a crash; reproduce with: cd fuzz && cargo +nightly fuzz run $t artifacts/$t/<file>" >&2
    exit 1
  fi
done
echo "fuzz: no crash in $(echo $TARGETS | wc -w) targets x ${SECS}s"
