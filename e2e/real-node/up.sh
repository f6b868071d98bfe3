#!/usr/bin/env bash
# Start a one-node cluster with a REAL worker node, entirely inside network namespace
# $PRISM_REAL_NETNS (default prism-e2e-real):
#   etcd -> kube-apiserver -> kube-controller-manager, kube-scheduler
#   -> containerd (v2, runc, CNI bridge + host-local) -> kubelet (registers node prism-real-node)
#   -> kube-proxy (nftables mode by default), CoreDNS (cluster DNS on the node address)
# then imports the local images prism.local/e2e/pause:1 (the sandbox image) and
# prism.local/e2e/busybox:1 (busybox-static; see mkimage.py). No registry is contacted.
#
# Needs root. Binaries from e2e/real-node/build.sh (run first unless PRISM_E2E_SKIP_BUILD=1).
# State, logs and pids in .cache/real-node/ (PRISM_REAL_DIR). Last stdout line: the kubeconfig.
# The kubeconfig only works from inside the netns: use e2e/real-node/kubectl.sh, or
#   nsenter --net=/run/netns/prism-e2e-real kubectl --kubeconfig .cache/real-node/kubeconfig ...
# Stop with e2e/real-node/down.sh (removes the netns, cgroups, mounts and state).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

T0=$(date +%s)
[ "$(id -u)" = 0 ] || { echo "real-node/up.sh: needs root (netns, cgroups, containerd)" >&2; exit 1; }
cluster_lock

fail() { # component message
  log "FAILED: $2"
  [ -n "$1" ] && log_tail "$1" 60
  log "state kept in $D; run e2e/real-node/down.sh to clean up"
  exit 1
}

healthy() {
  local c
  anchor_pid >/dev/null || return 1
  for c in "${REAL_COMPONENTS_START[@]}"; do pid_of "$c" >/dev/null || return 1; done
  [ "$(rk get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}
if healthy; then
  log "real-node cluster already up ($D); reusing it"
  echo "$PRISM_KUBECONFIG"; exit 0
fi
if [ -d "$D" ] || ip netns list | grep -qw "$PRISM_REAL_NETNS"; then
  log "cleaning stale real-node state"
  "$RN/down.sh" >&2
fi

if [ "${PRISM_E2E_SKIP_BUILD:-0}" != 1 ]; then "$RN/build.sh" >&2; fi
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy containerd containerd-shim-runc-v2 ctr coredns; do
  [ -x "$BIN/$b" ] || { echo "real-node/up.sh: $BIN/$b missing (run e2e/real-node/build.sh)" >&2; exit 1; }
done
for f in "$RUNC" "$CNI_BIN_DIR/bridge" "$CNI_BIN_DIR/host-local" "$CNI_BIN_DIR/loopback" /bin/busybox; do
  [ -x "$f" ] || { echo "real-node/up.sh: $f missing (run e2e/real-node/build.sh)" >&2; exit 1; }
done
[ "$PROXY_MODE" != nftables ] || command -v nft >/dev/null || PROXY_MODE=iptables

mkdir -p "$PKI" "$D/logs" "$D/pids" "$D/run" "$D/etcd-data" "$D/images" "$D/cni/net.d" "$D/cni/ipam" \
         "$D/containerd/root" "$D/containerd/state" "$D/kubelet"
chmod 700 "$D"

# --- network namespace + the anchor holding the node's mount namespace -----------------------
log "creating netns $PRISM_REAL_NETNS (node address $NODE_IP)"
ip netns add "$PRISM_REAL_NETNS"
N() { ip -n "$PRISM_REAL_NETNS" "$@"; }
N link set lo up
N link add prism-node type veth peer name prism-sink
N addr add "$NODE_IP/$NODE_PREFIX" dev prism-node
N link set prism-node up
N link set prism-sink up
N route add default dev prism-node
ip netns exec "$PRISM_REAL_NETNS" sysctl -qw net.ipv4.ip_forward=1
# The anchor: a fresh mount namespace (slave of the host's) in the netns; every component joins
# it with nsenter (see lib.sh). Not `ip netns exec`: that remounts /sys for the netns, which drops
# the cgroup v1 mounts under /sys/fs/cgroup (runc: "no cgroup mount found in mountinfo").
setsid nohup nsenter --net="/run/netns/$PRISM_REAL_NETNS" unshare --mount --propagation slave \
  sleep infinity </dev/null >/dev/null 2>&1 9>&- &
echo $! > "$D/pids/anchor.pid"
for _ in $(seq 50); do anchor_pid >/dev/null && break; sleep 0.1; done
anchor_pid >/dev/null || fail "" "anchor process did not start in netns $PRISM_REAL_NETNS"

# Host paths the node software writes to whatever its config says (shim sockets in
# /run/containerd/s, libcni's result cache in /var/lib/cni, the kubelet's /var/log/pods and
# /var/log/containers, /var/lib/kubelet/device-plugins): a tmpfs over each, in the node's mount
# namespace only, keeps them off the host. down.sh removes the mount points it had to create.
: > "$D/created-host-dirs"
for p in "${NODE_PRIVATE_DIRS[@]}"; do
  [ -e "$p" ] || { mkdir -p "$p"; echo "$p" >> "$D/created-host-dirs"; }
  nx mount -t tmpfs -o mode=0755 prism-e2e-real "$p"
done

# cgroup root for the kubelet (cgroupfs driver): one directory per v1 controller hierarchy.
for c in /sys/fs/cgroup/*/; do
  [ -f "$c/cgroup.procs" ] || continue
  mkdir -p "$c$CGROUP_ROOT"
  # cpuset children start empty on v1
  if [ -f "$c/cpuset.cpus" ]; then
    cat "$c/cpuset.cpus" > "$c$CGROUP_ROOT/cpuset.cpus"; cat "$c/cpuset.mems" > "$c$CGROUP_ROOT/cpuset.mems"
  fi
done

# --- PKI -------------------------------------------------------------------------------------
log "generating certificates"
(
  cd "$PKI"
  o() { openssl "$@" 2>/dev/null; }
  o req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=prism-e2e-real-ca -keyout ca.key -out ca.crt
  serving() { # name subject SANs
    printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$3" > "$1.ext"
    o req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr"
    o x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile "$1.ext" -out "$1.crt"
  }
  serving apiserver /CN=kube-apiserver "IP:127.0.0.1,IP:$SERVICE_API_IP,IP:$NODE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  serving kubelet-serving "/O=system:nodes/CN=system:node:$NODE_NAME" "IP:$NODE_IP,IP:127.0.0.1,DNS:$NODE_NAME"
  printf 'extendedKeyUsage=clientAuth\n' > client.ext
  client() {
    o req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr"
    o x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile client.ext -out "$1.crt"
  }
  client admin "/O=system:masters/CN=prism-admin"
  client kube-controller-manager "/CN=system:kube-controller-manager"
  client kube-scheduler "/CN=system:kube-scheduler"
  client kubelet "/O=system:nodes/CN=system:node:$NODE_NAME"
  client kube-proxy "/CN=system:kube-proxy"
  client apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  client front-proxy-client "/CN=front-proxy-client"
  o genrsa -out sa.key 2048
  o rsa -in sa.key -pubout -out sa.pub
  rm -f ./*.csr
  chmod 600 ./*.key
)
kubeconfig() { # user
  local b64; b64() { base64 -w0 < "$1"; }
  cat > "$D/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: prism-e2e-real
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: $1
  user:
    client-certificate-data: $(b64 "$PKI/$1.crt")
    client-key-data: $(b64 "$PKI/$1.key")
contexts:
- name: prism-e2e-real
  context: {cluster: prism-e2e-real, user: $1, namespace: default}
current-context: prism-e2e-real
EOF
  chmod 600 "$D/$1.kubeconfig"
}
for u in admin kube-controller-manager kube-scheduler kubelet kube-proxy; do kubeconfig "$u"; done
cp "$D/admin.kubeconfig" "$PRISM_KUBECONFIG"

# --- configs ---------------------------------------------------------------------------------
cat > "$D/containerd.toml" <<EOF
version = 4
root = "$D/containerd/root"
state = "$D/containerd/state"
imports = []
[debug]
  level = "info"
[plugins.'io.containerd.server.v1.grpc']
  address = "$D/containerd/containerd.sock"
[plugins.'io.containerd.server.v1.ttrpc']
  address = "$D/containerd/containerd.sock.ttrpc"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$PAUSE_IMAGE"
[plugins.'io.containerd.cri.v1.runtime']
  enable_selinux = false
  # pod netns pins under the state dir (default /var/run/netns, shared with the host's /run)
  netns_mounts_under_state_dir = true
  tolerate_missing_hugetlb_controller = true
  # This machine's processes lack CAP_SYS_RESOURCE (bounding set), so no process may lower its
  # oom_score_adj below 0; the sandbox's -998 made runc fail ("nsexec: failed to update
  # /proc/self/oom_score_adj: Permission denied" -> "can't get final child's PID from pipe: EOF").
  # Clamp to containerd's own value, as in rootless mode.
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "$RUNC"
        Root = "$D/containerd/runc"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["$CNI_BIN_DIR"]
    conf_dir = "$D/cni/net.d"
    max_conf_num = 1
[plugins.'io.containerd.grpc.v1.cri']
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
EOF

# Bridge cni0 (gateway ${POD_CIDR%.*}.1) with host-local IPAM; no masquerade: nothing leaves the netns.
cat > "$D/cni/net.d/10-prism-bridge.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "prism-e2e-real",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$D/cni/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF

printf 'nameserver 127.0.0.1\noptions ndots:1\n' > "$D/resolv.conf"
cat > "$D/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# cgroup v1 host: since v1.35 the kubelet refuses cgroup v1 unless this is false.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: $CGROUP_ROOT
failSwapOn: false
containerRuntimeEndpoint: unix://$D/containerd/containerd.sock
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
# CoreDNS runs beside the kubelet and answers on the node address, which pods reach through the
# bridge's gateway (no kube-dns Service: nothing would select a process outside a pod).
clusterDNS: [$NODE_IP]
resolvConf: $D/resolv.conf
serializeImagePulls: false
# a shared 2-core VM: do not evict for disk/memory pressure during tests
evictionHard: {memory.available: 50Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
nodeStatusUpdateFrequency: 5s
syncFrequency: 10s
fileCheckFrequency: 10s
maxPods: 110
EOF

cat > "$D/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $D/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
mode: $PROXY_MODE
clusterCIDR: $CLUSTER_CIDR
bindAddress: 0.0.0.0
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
# leave the conntrack sysctls alone (nf_conntrack_max is not per-netns)
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF

# Cluster DNS: Services (<svc>.<ns>.svc.cluster.local), headless Services and the pods behind
# them (<hostname>.<subdomain>.<ns>.svc..., which a training Job's rendezvous resolves), and
# reverse lookups. Nothing is forwarded: no name outside the cluster resolves in the netns. It
# reads the API with the harness's admin kubeconfig.
cat > "$D/Corefile" <<EOF
cluster.local:53 in-addr.arpa:53 {
    bind $NODE_IP
    errors
    health 127.0.0.1:$COREDNS_HEALTH_PORT
    ready 127.0.0.1:$COREDNS_READY_PORT
    kubernetes cluster.local in-addr.arpa {
        kubeconfig $PRISM_KUBECONFIG
        pods verified
    }
    cache 5
}
EOF

# --- run scripts: every process enters the node's mount+net namespaces (nsenter execs, so the
# pid file holds the binary's own pid and lib.sh's pid_of/stop_component work unchanged) -------
ANCHOR="$(anchor_pid)"
write_run() { # name args...
  local name="$1"; shift
  { echo '#!/usr/bin/env bash'
    printf 'export PATH=%q\n' "$BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    printf 'exec nsenter --target %q --mount --net -- %q' "$ANCHOR" "$BIN/$name"; printf ' \\\n  %q' "$@"; echo; } > "$D/run/$name.sh"
}

write_run etcd \
  --name=prism-e2e-real --data-dir="$D/etcd-data" --unsafe-no-fsync --log-level=warn \
  --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster="prism-e2e-real=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls=""

# The apiserver binds all addresses of the netns (loopback and $NODE_IP): pods reach it through
# the kubernetes Service ($SERVICE_API_IP -> $NODE_IP:$API_PORT via kube-proxy).
write_run kube-apiserver \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=0.0.0.0 --advertise-address="$NODE_IP" --secure-port="$API_PORT" \
  --cert-dir="$D/apiserver-certs" \
  --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
  --client-ca-file="$PKI/ca.crt" \
  --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
  --kubelet-certificate-authority="$PKI/ca.crt" --kubelet-preferred-address-types=InternalIP,Hostname \
  --requestheader-client-ca-file="$PKI/ca.crt" --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --proxy-client-cert-file="$PKI/front-proxy-client.crt" --proxy-client-key-file="$PKI/front-proxy-client.key" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
  --service-cluster-ip-range="$SERVICE_CIDR" \
  --authorization-mode=Node,RBAC \
  --enable-admission-plugins=NodeRestriction \
  --allow-privileged=true \
  --profiling=false \
  --v=1

write_run kube-controller-manager \
  --kubeconfig="$D/kube-controller-manager.kubeconfig" \
  --authentication-kubeconfig="$D/kube-controller-manager.kubeconfig" \
  --authorization-kubeconfig="$D/kube-controller-manager.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$KCM_PORT" --leader-elect=false \
  --use-service-account-credentials=true \
  --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
  --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
  --allocate-node-cidrs=true --cluster-cidr="$CLUSTER_CIDR" --node-cidr-mask-size=24 \
  --service-cluster-ip-range="$SERVICE_CIDR" \
  --controllers='*' \
  --profiling=false \
  --v=1

write_run kube-scheduler \
  --kubeconfig="$D/kube-scheduler.kubeconfig" \
  --authentication-kubeconfig="$D/kube-scheduler.kubeconfig" \
  --authorization-kubeconfig="$D/kube-scheduler.kubeconfig" \
  --bind-address=127.0.0.1 --secure-port="$SCHED_PORT" --leader-elect=false \
  --profiling=false \
  --v=1

write_run containerd --config="$D/containerd.toml"

write_run kubelet \
  --config="$D/kubelet.yaml" \
  --kubeconfig="$D/kubelet.kubeconfig" \
  --root-dir="$D/kubelet" \
  --hostname-override="$NODE_NAME" \
  --node-ip="$NODE_IP" \
  --v=1

write_run kube-proxy --config="$D/kube-proxy.yaml" --v=1

write_run coredns -conf "$D/Corefile"

# --- start -------------------------------------------------------------------------------------
api_ok() { [ "$(rk get --raw /readyz 2>/dev/null)" = ok ]; }

log "starting etcd, kube-apiserver (inside netns $PRISM_REAL_NETNS, https://127.0.0.1:$API_PORT there)"
start_component etcd
wait_for etcd 30 "etcd /health" nx curl -sf --max-time 2 "http://127.0.0.1:$ETCD_PORT/health"
start_component kube-apiserver
wait_for kube-apiserver 120 "kube-apiserver /readyz" api_ok

log "starting kube-controller-manager, kube-scheduler, containerd"
start_component kube-controller-manager
start_component kube-scheduler
start_component containerd
start_component coredns
wait_for containerd 60 "containerd socket" nx "$BIN/ctr" --address "$D/containerd/containerd.sock" version

# --- images: built locally (no registry reachable), imported into the CRI namespace ----------
log "building and importing $PAUSE_IMAGE and $BUSYBOX_IMAGE"
# pause: PID 1 that exits on TERM/INT (busybox sh; a shell as PID 1 only gets trapped signals).
python3 "$RN/mkimage.py" --name "$PAUSE_IMAGE" --out "$D/images/pause.tar" \
  --entrypoint '["/bin/sh","-c","trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait $!; done"]' --cmd '[]' >&2
python3 "$RN/mkimage.py" --name "$BUSYBOX_IMAGE" --out "$D/images/busybox.tar" >&2
python3 "$RN/mkimage.py" --name "$REGISTRY_IMAGE" --out "$D/images/registry.tar" --file "$BIN/registry:/bin/registry" \
  --entrypoint '["/bin/registry","-port","5000"]' --cmd '[]' >&2
for i in pause busybox registry; do
  nx "$BIN/ctr" --address "$D/containerd/containerd.sock" -n k8s.io images import "$D/images/$i.tar" >&2 \
    || fail containerd "ctr images import $i.tar failed"
done

# The kubelet sets six global kernel tunables (vm.overcommit_memory=1, vm.panic_on_oom=0,
# kernel.panic=10, kernel.panic_on_oops=1, kernel.keys.root_max{keys,bytes}); there is no
# "leave them" option (protectKernelDefaults: true makes it fail instead). down.sh restores these.
for k in vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops kernel/keys/root_maxkeys kernel/keys/root_maxbytes; do
  echo "$k $(cat "/proc/sys/$k")"
done > "$D/host-sysctls"

log "starting kubelet (node $NODE_NAME, $NODE_IP), kube-proxy ($PROXY_MODE)"
start_component kubelet
wait_for kubelet 60 "kubelet /healthz" nx curl -sf --max-time 2 http://127.0.0.1:10248/healthz
start_component kube-proxy
wait_for kubelet 120 "node $NODE_NAME Ready" bash -c \
  "[ \"\$(nsenter --net=/run/netns/$PRISM_REAL_NETNS '$(kubectl_bin)' --kubeconfig '$PRISM_KUBECONFIG' get node '$NODE_NAME' -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}')\" = True ]"
log "node $NODE_NAME Ready after $(( $(date +%s) - T0 ))s"
wait_for kube-proxy 60 "kube-proxy /healthz" nx curl -sf --max-time 2 http://127.0.0.1:10256/healthz
wait_for kube-controller-manager 60 "default ServiceAccount" rk get serviceaccount default -n default
wait_for coredns 60 "CoreDNS /ready" nx curl -sf --max-time 2 "http://127.0.0.1:$COREDNS_READY_PORT/ready"

log "real-node cluster up in $(( $(date +%s) - T0 ))s; kubectl: e2e/real-node/kubectl.sh"
echo "$PRISM_KUBECONFIG"
