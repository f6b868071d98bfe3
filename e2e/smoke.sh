#!/usr/bin/env bash
# Smoke test of the e2e control plane (needs only bash + kubectl; run after cluster-up.sh).
# Proves the cluster is real: PodSecurity admission, scheduling of nvidia.com/gpu requests onto
# tainted GPU nodes only, pods Running+Ready with pod IPs (kwok), EndpointSlices with ready
# endpoints (endpointslice controller), Deployment Available, and ownerReference garbage
# collection (Deployment -> ReplicaSet -> Pods). Asserts on API objects only: pod IPs are
# simulated and nothing listens on them.
#
# KUBECONFIG defaults to the harness kubeconfig; set PRISM_SMOKE_KUBECONFIG to point elsewhere
# (e.g. a kind cluster whose nodes carry the same GPU labels/taints).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KCFG="${PRISM_SMOKE_KUBECONFIG:-$PRISM_KUBECONFIG}"
KUBECTL="$(kubectl_bin)" || { echo "smoke: no kubectl (run make e2e-bins)" >&2; exit 1; }
k() { "$KUBECTL" --kubeconfig "$KCFG" "$@"; }
NS="prism-smoke-$(date +%s)-$$"
T0=$(date +%s)
step() { log "smoke: $*"; }
die() { log "smoke: FAIL: $*"; k -n "$NS" get deploy,rs,pods,endpointslices -o wide >&2 2>/dev/null || true; exit 1; }

poll() { # timeout_s description command...
  local timeout="$1" what="$2"; shift 2
  local deadline=$(( $(date +%s) + timeout ))
  until "$@"; do
    [ "$(date +%s)" -lt "$deadline" ] || die "timed out after ${timeout}s: $what"
    sleep 0.5
  done
}

[ -f "$KCFG" ] || die "no kubeconfig at $KCFG (run make cluster-up)"
k get --raw /readyz >/dev/null || die "API server at $KCFG is not ready"

cleanup() {
  k delete namespace "$NS" --ignore-not-found --wait=false >/dev/null 2>&1 || true
}
trap cleanup EXIT

restricted_pod_spec() { # indent-free fragments reused by the manifests below
  cat <<'EOF'
      securityContext:
        runAsNonRoot: true
        runAsUser: 65532
        seccompProfile: {type: RuntimeDefault}
      containers:
      - name: main
        image: registry.k8s.io/pause:3.10
        securityContext:
          allowPrivilegeEscalation: false
          capabilities: {drop: [ALL]}
EOF
}

step "namespace $NS (PodSecurity enforce=restricted)"
k create namespace "$NS" >/dev/null
k label namespace "$NS" pod-security.kubernetes.io/enforce=restricted >/dev/null

step "PodSecurity admission rejects a privileged pod"
if out="$(k -n "$NS" run privileged --image=registry.k8s.io/pause:3.10 \
      --overrides='{"spec":{"containers":[{"name":"privileged","image":"registry.k8s.io/pause:3.10","securityContext":{"privileged":true}}]}}' 2>&1)"; then
  die "privileged pod was admitted: $out"
fi
grep -q 'violates PodSecurity' <<<"$out" || die "unexpected rejection: $out"

step "GPU Deployment (2 replicas, nvidia.com/gpu: 1, GPU toleration) + Service"
k -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: gpu-smoke, labels: {app: gpu-smoke}}
spec:
  replicas: 2
  selector: {matchLabels: {app: gpu-smoke}}
  template:
    metadata: {labels: {app: gpu-smoke}}
    spec:
      tolerations:
      - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}
$(restricted_pod_spec)
        resources:
          limits: {nvidia.com/gpu: 1, cpu: 100m, memory: 64Mi}
        ports: [{containerPort: 8080, name: http}]
---
apiVersion: v1
kind: Service
metadata: {name: gpu-smoke}
spec:
  selector: {app: gpu-smoke}
  ports: [{port: 80, targetPort: http, name: http}]
EOF

k -n "$NS" wait deployment/gpu-smoke --for=condition=Available --timeout=90s >/dev/null \
  || die "deployment gpu-smoke not Available"
k -n "$NS" wait pod -l app=gpu-smoke --for=condition=Ready --timeout=60s >/dev/null \
  || die "gpu-smoke pods not Ready"

step "GPU pods run on GPU nodes with pod IPs"
n=0
while read -r pod node phase ip; do
  [ "$phase" = Running ] || die "$pod phase=$phase"
  [ -n "$ip" ] && [ "$ip" != "<none>" ] || die "$pod has no pod IP"
  [ "$(k get node "$node" -o jsonpath='{.metadata.labels.nvidia\.com/gpu\.present}')" = true ] \
    || die "$pod landed on non-GPU node $node"
  step "  $pod -> $node ($ip)"
  n=$((n + 1))
done < <(k -n "$NS" get pods -l app=gpu-smoke -o jsonpath='{range .items[*]}{.metadata.name} {.spec.nodeName} {.status.phase} {.status.podIP}{"\n"}{end}')
[ "$n" = 2 ] || die "expected 2 gpu-smoke pods, saw $n"

step "EndpointSlice for Service gpu-smoke has 2 ready endpoints"
ready_eps() {
  [ "$(k -n "$NS" get endpointslices -l kubernetes.io/service-name=gpu-smoke \
        -o jsonpath='{range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]}{"\n"}{end}' | grep -c .)" = 2 ]
}
poll 60 "EndpointSlice with 2 ready endpoints" ready_eps

step "CPU-only pod (no GPU request, no toleration) lands on the CPU node"
k -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: apps/v1
kind: Deployment
metadata: {name: cpu-smoke}
spec:
  replicas: 1
  selector: {matchLabels: {app: cpu-smoke}}
  template:
    metadata: {labels: {app: cpu-smoke}}
    spec:
$(restricted_pod_spec)
        resources:
          limits: {cpu: 100m, memory: 64Mi}
EOF
k -n "$NS" wait deployment/cpu-smoke --for=condition=Available --timeout=90s >/dev/null \
  || die "deployment cpu-smoke not Available"
cpu_node="$(k -n "$NS" get pods -l app=cpu-smoke -o jsonpath='{.items[0].spec.nodeName}')"
[ -n "$cpu_node" ] || die "cpu-smoke pod not scheduled"
[ -z "$(k get node "$cpu_node" -o jsonpath='{.metadata.labels.nvidia\.com/gpu\.present}')" ] \
  || die "cpu-smoke pod landed on GPU node $cpu_node"
step "  cpu-smoke -> $cpu_node"

step "GPU pod without the toleration stays Pending (Unschedulable)"
k -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: gpu-no-toleration}
spec:
$(restricted_pod_spec | sed 's/^    //')
    resources:
      limits: {nvidia.com/gpu: 1}
EOF
unschedulable() {
  [ "$(k -n "$NS" get pod gpu-no-toleration -o jsonpath='{.status.conditions[?(@.type=="PodScheduled")].reason}')" = Unschedulable ]
}
poll 30 "gpu-no-toleration marked Unschedulable" unschedulable
[ -z "$(k -n "$NS" get pod gpu-no-toleration -o jsonpath='{.spec.nodeName}')" ] || die "gpu-no-toleration was bound"

step "garbage collection: delete Deployment -> ReplicaSet and Pods go away"
rs="$(k -n "$NS" get rs -l app=gpu-smoke -o jsonpath='{.items[*].metadata.name}')"
[ -n "$rs" ] || die "no ReplicaSet for gpu-smoke"
owner="$(k -n "$NS" get rs $rs -o jsonpath='{.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}')"
[ "$owner" = Deployment/gpu-smoke ] || die "ReplicaSet owner is '$owner'"
k -n "$NS" delete deployment gpu-smoke --wait=false >/dev/null
gone() { [ -z "$(k -n "$NS" get rs,pods -l app=gpu-smoke -o name 2>/dev/null)" ]; }
poll 60 "ReplicaSet $rs and pods garbage-collected" gone
slices_empty() {
  [ -z "$(k -n "$NS" get endpointslices -l kubernetes.io/service-name=gpu-smoke \
        -o jsonpath='{range .items[*].endpoints[*]}{.addresses[0]}{"\n"}{end}')" ]
}
poll 30 "EndpointSlice emptied after pods are gone" slices_empty

step "cleanup: delete namespace $NS"
trap - EXIT
k delete namespace "$NS" --timeout=90s >/dev/null || die "namespace $NS was not deleted"

log "smoke: PASS in $(( $(date +%s) - T0 ))s"
