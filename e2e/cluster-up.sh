#!/usr/bin/env bash
# Start a real Kubernetes control plane on loopback with simulated GPU nodes:
#   etcd -> kube-apiserver (Node,RBAC; PodSecurity admission) -> kube-controller-manager,
#   kube-scheduler -> kwok (fakes kubelets: node heartbeats, pod Running/Ready + pod IPs)
# then registers PRISM_GPU_NODES GPU nodes and PRISM_CPU_NODES CPU-only nodes.
#
# Idempotent: if the cluster in PRISM_CLUSTER_DIR is already up and healthy it is reused.
# Prints the admin kubeconfig path on stdout as its last line; everything else goes to stderr.
# See e2e/lib.sh for the env overrides (ports, node counts, dirs) and e2e/README.md.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

T0=$(date +%s)
cluster_lock
D="$PRISM_CLUSTER_DIR"
PKI="$D/pki"

ensure_tools() {
  local missing=()
  for t in openssl curl; do command -v "$t" >/dev/null || missing+=("$t"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
  else
    echo "cluster-up: missing tools: ${missing[*]}" >&2; exit 1
  fi
}

healthy() {
  local c
  for c in "${COMPONENTS_START_ORDER[@]}"; do pid_of "$c" >/dev/null || return 1; done
  [ -f "$PRISM_KUBECONFIG" ] && [ "$(api_curl /readyz 2>/dev/null)" = ok ]
}

fail() { # component message: print the log tail, stop what was started, keep logs/
  log "FAILED: $2"
  log_tail "$1" 60
  PRISM_KEEP_LOGS=1 "$E2E/cluster-down.sh" >/dev/null 2>&1 || true
  log "stopped the partial cluster; logs kept in $D/logs"
  exit 1
}


ensure_tools

if healthy; then
  log "cluster already up ($D); reusing it"
  echo "$PRISM_KUBECONFIG"
  exit 0
fi

# Anything half-started from an earlier run is torn down first.
if [ -d "$D" ]; then
  log "cleaning stale cluster state in $D"
  "$E2E/cluster-down.sh" >/dev/null
fi

# Binaries (fast no-op when up to date; skip with PRISM_E2E_SKIP_BUILD=1).
if [ "${PRISM_E2E_SKIP_BUILD:-0}" != 1 ]; then "$E2E/build.sh" >&2; fi
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok; do
  [ -x "$BIN/$b" ] || { echo "cluster-up: $BIN/$b missing (run make e2e-bins)" >&2; exit 1; }
done

for p in "$PRISM_ETCD_PORT" "$PRISM_ETCD_PEER_PORT" "$PRISM_APISERVER_PORT" "$PRISM_KCM_PORT" \
         "$PRISM_SCHEDULER_PORT" "$PRISM_KWOK_PORT"; do
  if port_in_use "$p"; then
    echo "cluster-up: port 127.0.0.1:$p is already in use (override with PRISM_*_PORT, see e2e/lib.sh)" >&2
    exit 1
  fi
done

mkdir -p "$PKI" "$D/logs" "$D/pids" "$D/run" "$D/etcd-data"
chmod 700 "$D"

# --- PKI -------------------------------------------------------------------------------------
log "generating certificates"
(
  cd "$PKI"
  o() { openssl "$@" 2>/dev/null; }
  o req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=prism-e2e-ca -keyout ca.key -out ca.crt
  # serving cert for the apiserver
  printf 'subjectAltName=IP:127.0.0.1,IP:%s,IP:%s,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n' \
    "$(echo "$PRISM_SERVICE_CIDR" | awk -F'[./]' '{print $1"."$2"."$3"."$4+1}')" "$PRISM_APISERVER_ADVERTISE" > apiserver.ext
  o req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout apiserver.key -out apiserver.csr
  o x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile apiserver.ext -out apiserver.crt
  # client certs: name subject
  printf 'extendedKeyUsage=clientAuth\n' > client.ext
  client() {
    o req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr"
    o x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile client.ext -out "$1.crt"
  }
  client admin "/O=system:masters/CN=prism-admin"
  client kube-controller-manager "/CN=system:kube-controller-manager"
  client kube-scheduler "/CN=system:kube-scheduler"
  # kwok plays every kubelet (node status, leases, pod status and deletion). The Node authorizer
  # only admits one node identity per cert, so kwok gets cluster-admin like kwokctl does.
  client kwok "/O=system:masters/CN=kwok-controller"
  # apiserver -> aggregated APIs (front proxy)
  client front-proxy-client "/CN=front-proxy-client"
  o genrsa -out sa.key 2048
  o rsa -in sa.key -pubout -out sa.pub
  rm -f ./*.csr
  chmod 600 ./*.key
)

kubeconfig() { # user -> file
  local b64; b64() { base64 -w0 < "$1"; }
  cat > "$D/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: prism-e2e
  cluster:
    server: https://127.0.0.1:$PRISM_APISERVER_PORT
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: $1
  user:
    client-certificate-data: $(b64 "$PKI/$1.crt")
    client-key-data: $(b64 "$PKI/$1.key")
contexts:
- name: prism-e2e
  context: {cluster: prism-e2e, user: $1, namespace: default}
current-context: prism-e2e
EOF
  chmod 600 "$D/$1.kubeconfig"
}
for u in admin kube-controller-manager kube-scheduler kwok; do kubeconfig "$u"; done

# --- start scripts (kept so a test can stop/restart one component; see e2e/fault.sh) ----------
write_run() { # name args...
  local name="$1"; shift
  { echo '#!/usr/bin/env bash'; printf 'exec %q' "$BIN/$name"; printf ' \\\n  %q' "$@"; echo; } > "$D/run/$name.sh"
}

write_run etcd \
  --name=prism-e2e --data-dir="$D/etcd-data" --unsafe-no-fsync --log-level=warn \
  --listen-client-urls="http://127.0.0.1:$PRISM_ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$PRISM_ETCD_PORT" \
  --listen-peer-urls="http://127.0.0.1:$PRISM_ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$PRISM_ETCD_PEER_PORT" \
  --initial-cluster="prism-e2e=http://127.0.0.1:$PRISM_ETCD_PEER_PORT" --listen-metrics-urls="" \
  --quota-backend-bytes=4294967296

write_run kube-apiserver \
  --etcd-servers="http://127.0.0.1:$PRISM_ETCD_PORT" \
  --bind-address=127.0.0.1 --advertise-address="$PRISM_APISERVER_ADVERTISE" --secure-port="$PRISM_APISERVER_PORT" \
  --cert-dir="$D/apiserver-certs" \
  --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
  --client-ca-file="$PKI/ca.crt" \
  --requestheader-client-ca-file="$PKI/ca.crt" --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --proxy-client-cert-file="$PKI/front-proxy-client.crt" --proxy-client-key-file="$PKI/front-proxy-client.key" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
  --service-cluster-ip-range="$PRISM_SERVICE_CIDR" \
  --authorization-mode=Node,RBAC \
  --allow-privileged=true \
  --profiling=false \
  --v="${PRISM_APISERVER_V:-1}"

write_run kube-controller-manager \
  --kubeconfig="$D/kube-controller-manager.kubeconfig" \
  --authentication-kubeconfig="$D/kube-controller-manager.kubeconfig" \
  --authorization-kubeconfig="$D/kube-controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$PRISM_KCM_PORT" --leader-elect=false \
  --use-service-account-credentials=true \
  --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
  --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
  --controllers='*' \
  --node-monitor-grace-period="${PRISM_NODE_MONITOR_GRACE:-40s}" \
  --profiling=false \
  --v=1

write_run kube-scheduler \
  --kubeconfig="$D/kube-scheduler.kubeconfig" \
  --authentication-kubeconfig="$D/kube-scheduler.kubeconfig" \
  --authorization-kubeconfig="$D/kube-scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$PRISM_SCHEDULER_PORT" --leader-elect=false \
  --profiling=false \
  --v=1

write_run kwok \
  --config="$BIN/kwok.yaml" \
  --kubeconfig="$D/kwok.kubeconfig" \
  --manage-all-nodes=false \
  --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
  --cidr="$PRISM_POD_CIDR" --node-ip=10.240.0.1 \
  --node-lease-duration-seconds=40 \
  --server-address="127.0.0.1:$PRISM_KWOK_PORT"

# --- start -------------------------------------------------------------------------------------
log "starting etcd on 127.0.0.1:$PRISM_ETCD_PORT"
start_component etcd
wait_for etcd 30 "etcd /health" bash -c "curl -sf --max-time 2 http://127.0.0.1:$PRISM_ETCD_PORT/health | grep -q '\"health\":\"true\"'"

log "starting kube-apiserver on https://127.0.0.1:$PRISM_APISERVER_PORT"
start_component kube-apiserver
wait_for kube-apiserver 120 "kube-apiserver /readyz" bash -c "[ \"\$(source '$E2E/lib.sh'; api_curl /readyz)\" = ok ]"
cp "$D/admin.kubeconfig" "$PRISM_KUBECONFIG"
chmod 600 "$PRISM_KUBECONFIG"

log "starting kube-controller-manager, kube-scheduler, kwok"
start_component kube-controller-manager
start_component kube-scheduler
start_component kwok
wait_for kube-controller-manager 60 "kube-controller-manager /healthz" curl -skf --max-time 2 "https://127.0.0.1:$PRISM_KCM_PORT/healthz"
wait_for kube-scheduler 60 "kube-scheduler /healthz" curl -skf --max-time 2 "https://127.0.0.1:$PRISM_SCHEDULER_PORT/healthz"
wait_for kwok 60 "kwok /healthz" curl -sf --max-time 2 "http://127.0.0.1:$PRISM_KWOK_PORT/healthz"

# --- simulated nodes ---------------------------------------------------------------------------
# Node i: InternalIP 10.240.0.(10+i), pod CIDR 10.244.i.0/24 (kwok assigns pod IPs from it).
# Nothing listens on these addresses; never send traffic to them.
node_yaml() { # name index gpus
  local name="$1" i="$2" gpus="$3" base="${PRISM_POD_CIDR%%.0.0/16}"
  cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: $name
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    kubernetes.io/hostname: $name
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
    prism.dev/e2e-node: "true"
$( if [ "$gpus" -gt 0 ]; then cat <<G
    nvidia.com/gpu.present: "true"
    nvidia.com/gpu.count: "$gpus"
    nvidia.com/gpu.product: Simulated-GPU
G
fi )
spec:
  podCIDR: $base.$i.0/24
  podCIDRs: [$base.$i.0/24]
$( if [ "$gpus" -gt 0 ]; then cat <<G
  taints:
  - {key: nvidia.com/gpu, value: present, effect: NoSchedule}
G
fi )
status:
  addresses:
  - {type: InternalIP, address: 10.240.0.$((10 + i))}
  - {type: Hostname, address: $name}
  capacity: {cpu: "32", memory: 256Gi, pods: "110", ephemeral-storage: 1Ti$( [ "$gpus" -gt 0 ] && printf ', nvidia.com/gpu: "%s"' "$gpus" )}
  allocatable: {cpu: "32", memory: 256Gi, pods: "110", ephemeral-storage: 1Ti$( [ "$gpus" -gt 0 ] && printf ', nvidia.com/gpu: "%s"' "$gpus" )}
EOF
}

log "registering $PRISM_GPU_NODES GPU node(s) ($PRISM_GPUS_PER_NODE x nvidia.com/gpu) and $PRISM_CPU_NODES CPU node(s)"
{
  idx=1
  for n in $(seq 0 $((PRISM_GPU_NODES - 1))); do node_yaml "gpu-node-$n" "$idx" "$PRISM_GPUS_PER_NODE"; idx=$((idx + 1)); done
  for n in $(seq 0 $((PRISM_CPU_NODES - 1))); do node_yaml "cpu-node-$n" "$idx" 0; idx=$((idx + 1)); done
} > "$D/nodes.yaml"
# status is a subresource: create the nodes with their status (create keeps it for Nodes),
# node-initialize in kwok keeps capacity/addresses that are already set.
kc create -f "$D/nodes.yaml" >&2

total=$((PRISM_GPU_NODES + PRISM_CPU_NODES))
wait_for kwok 60 "$total nodes Ready" bash -c \
  "[ \"\$('$(kubectl_bin)' --kubeconfig '$PRISM_KUBECONFIG' get nodes -l prism.dev/e2e-node=true -o jsonpath='{range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}' | grep -c True)\" = $total ]"

# Pods need the default ServiceAccount (ServiceAccount admission), made by kcm.
wait_for kube-controller-manager 60 "default ServiceAccount" "$(kubectl_bin)" --kubeconfig "$PRISM_KUBECONFIG" get serviceaccount default -n default

log "cluster up in $(( $(date +%s) - T0 ))s; KUBECONFIG=$PRISM_KUBECONFIG"
echo "$PRISM_KUBECONFIG"
