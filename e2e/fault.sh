#!/usr/bin/env bash
# Fault controls for tests against the e2e control plane (kwok stages + process control).
#
#   fault.sh pod-not-ready NS POD    Running pod -> Ready=False (leaves EndpointSlice ready set)
#   fault.sh pod-ready NS POD        undo pod-not-ready
#   fault.sh pod-fail NS POD         pod -> phase Failed, exit code 1 (kwok chaos stage)
#   fault.sh pod-oom-killed NS POD   as the kubelet after an OOM kill: Running, CrashLoopBackOff,
#                                    last state OOMKilled 137 (undo: pod-ready)
#   fault.sh pod-delete NS POD       delete the pod (its ReplicaSet replaces it)
#   fault.sh node-not-ready NODE     node Ready=False (kwok chaos stage)
#   fault.sh node-ready NODE         undo node-not-ready (kwok re-initialises the node)
#   fault.sh apiserver-stop | apiserver-start | apiserver-restart
#   fault.sh kwok-stop | kwok-start  (all node leases expire -> node-lifecycle marks NotReady)
#   fault.sh COMPONENT-stop|start    for etcd, kube-controller-manager, kube-scheduler too
#
# Changes are asynchronous (about 1-2 s); wait on the API object you care about.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() { sed -n '2,16p' "${BASH_SOURCE[0]}" >&2; exit 2; }
[ $# -ge 1 ] || usage
op="$1"; shift

wait_ready() {
  local i
  for i in $(seq 1 240); do
    [ "$(api_curl /readyz 2>/dev/null)" = ok ] && return 0
    pid_of kube-apiserver >/dev/null || { log_tail kube-apiserver; exit 1; }
    sleep 0.5
  done
  log "kube-apiserver not ready after 120s"; log_tail kube-apiserver; exit 1
}

case "$op" in
  pod-not-ready)  kc -n "$1" label pod "$2" prism.dev/fault=not-ready --overwrite ;;
  pod-ready)      kc -n "$1" label pod "$2" prism.dev/fault- ;;
  pod-fail)       kc -n "$1" label pod "$2" pod-container-running-failed.stage.kwok.x-k8s.io=true --overwrite ;;
  pod-oom-killed) kc -n "$1" label pod "$2" prism.dev/fault=oom-killed --overwrite ;;
  pod-delete)     kc -n "$1" delete pod "$2" --wait=false ;;
  node-not-ready) kc label node "$1" node-not-ready.stage.kwok.x-k8s.io=true --overwrite ;;
  node-ready)     kc label node "$1" node-not-ready.stage.kwok.x-k8s.io- ;;
  # With clients connected, kube-apiserver stops listening at once but lingers on open
  # connections; 3 s of grace, then SIGKILL (etcd holds all state).
  apiserver-stop) stop_component kube-apiserver 3 ;;
  apiserver-start)
    pid_of kube-apiserver >/dev/null || start_component kube-apiserver
    wait_ready ;;
  apiserver-restart) stop_component kube-apiserver 3; start_component kube-apiserver; wait_ready ;;
  *-stop|*-start)
    comp="${op%-*}"
    [[ " ${COMPONENTS_START_ORDER[*]} " == *" $comp "* ]] || usage
    [ -f "$PRISM_CLUSTER_DIR/run/$comp.sh" ] || { echo "fault.sh: cluster not up" >&2; exit 1; }
    if [ "${op##*-}" = stop ]; then stop_component "$comp"
    else pid_of "$comp" >/dev/null || start_component "$comp"; fi ;;
  *) usage ;;
esac
