#!/usr/bin/env bash
# Stop the e2e control plane started by cluster-up.sh (by pid file, newest component first)
# and remove its state (PRISM_CLUSTER_DIR: data, certs, kubeconfigs, logs).
# PRISM_KEEP_LOGS=1 keeps logs/ for a post-mortem.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

D="$PRISM_CLUSTER_DIR"
cluster_lock
[ -d "$D" ] || { log "no cluster state in $D"; exit 0; }

stop() { if pid="$(pid_of "$1")"; then log "stopping $1 (pid $pid)"; fi; stop_component "$1"; }
# Clients of the apiserver in parallel, then the apiserver, then etcd.
for c in kwok kube-scheduler kube-controller-manager; do stop "$c" & done
wait
stop kube-apiserver
stop etcd

if [ "${PRISM_KEEP_LOGS:-0}" = 1 ]; then
  find "$D" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
  log "removed cluster state; kept $D/logs"
else
  rm -rf "$D"
  log "removed $D"
fi
