#!/usr/bin/env bash
# Stop the e2e control plane started by cluster-up.sh (by pid file, newest component first)
# and remove its state (PRISM_CLUSTER_DIR: data, certs, kubeconfigs, logs).
# PRISM_KEEP_LOGS=1 keeps logs/ for a post-mortem.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

D="$PRISM_CLUSTER_DIR"
[ -d "$D" ] || { log "no cluster state in $D"; exit 0; }

for c in "${COMPONENTS_STOP_ORDER[@]}"; do
  if pid="$(pid_of "$c")"; then log "stopping $c (pid $pid)"; fi
  stop_component "$c"
done

if [ "${PRISM_KEEP_LOGS:-0}" = 1 ]; then
  find "$D" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
  log "removed cluster state; kept $D/logs"
else
  rm -rf "$D"
  log "removed $D"
fi
