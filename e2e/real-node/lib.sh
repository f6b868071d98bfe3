# Shared settings for e2e/real-node/{up,down,smoke,kubectl}.sh. Source it; do not execute it.
#
# A one-node Kubernetes cluster with a REAL worker node (kubelet + containerd + runc + CNI bridge +
# kube-proxy), all running inside one network namespace ($PRISM_REAL_NETNS) so that pod, service and
# node addresses exist only there. The control plane (etcd, kube-apiserver, kcm, scheduler) runs in
# the same namespace; its loopback is its own, so the default ports do not clash with the kwok
# cluster of e2e/cluster-up.sh on the host's loopback.
#
# Every process runs under `nsenter --mount --net` into an anchor process (`unshare --mount` in the
# netns): one mount namespace (a slave of the host's; /sys is the host's, cgroups included) shared
# by kubelet, containerd, the shims and the containers, so the kubelet's volume mounts are visible
# to runc, and none of the node's mounts (overlay rootfs, tmpfs volumes) appear on the host. They
# vanish when the last process in it exits.

RN="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# lib.sh of the kwok harness: log, pid_of, start_component, stop_component, log_tail.
PRISM_CLUSTER_DIR="${PRISM_REAL_DIR:-$(cd "$RN/../.." && pwd)/.cache/real-node}"
source "$RN/../lib.sh"
D="$PRISM_CLUSTER_DIR"
PKI="$D/pki"
PRISM_KUBECONFIG="$D/kubeconfig"

PRISM_REAL_NETNS="${PRISM_REAL_NETNS:-prism-e2e-real}"
NODE_NAME="${PRISM_REAL_NODE_NAME:-prism-real-node}"
# Addresses inside the netns only. The node address sits on one end of a veth pair whose other
# end is also in the netns (the kernel here has no dummy link type); the default route points at
# it, so nothing addressed elsewhere can leave the namespace.
NODE_IP="${PRISM_REAL_NODE_IP:-10.250.0.1}"
NODE_PREFIX=24
SERVICE_CIDR="${PRISM_REAL_SERVICE_CIDR:-10.96.0.0/16}"
SERVICE_API_IP="10.96.0.1"
CLUSTER_CIDR="${PRISM_REAL_CLUSTER_CIDR:-10.244.0.0/16}"
POD_CIDR="${PRISM_REAL_POD_CIDR:-10.244.0.0/24}"     # what kcm allocates to the first (only) node
CGROUP_ROOT="/${PRISM_REAL_NETNS}"                    # kubelet cgroupRoot (cgroupfs, v1 or v2)
PROXY_MODE="${PRISM_REAL_PROXY_MODE:-nftables}"       # kube-proxy --proxy-mode (nftables|iptables)
CNI_BIN_DIR="${PRISM_REAL_CNI_BIN_DIR:-/usr/lib/cni}"  # Debian containernetworking-plugins
RUNC="${PRISM_REAL_RUNC:-$(command -v runc || echo /usr/sbin/runc)}"

NODE_PRIVATE_DIRS=(/run/containerd /var/lib/cni /var/log/pods /var/log/containers /var/lib/kubelet)

ETCD_PORT=2379 ETCD_PEER_PORT=2380 API_PORT=6443 KCM_PORT=10257 SCHED_PORT=10259
COREDNS_HEALTH_PORT=18080 COREDNS_READY_PORT=18181   # CoreDNS answers DNS on $NODE_IP:53

PAUSE_IMAGE="prism.local/e2e/pause:1"
BUSYBOX_IMAGE="prism.local/e2e/busybox:1"
REGISTRY_IMAGE="prism.local/e2e/registry:1"   # go-containerregistry's in-memory registry, port 5000

REAL_COMPONENTS_START=(etcd kube-apiserver kube-controller-manager kube-scheduler coredns containerd kubelet kube-proxy)
REAL_COMPONENTS_STOP=(kube-proxy kubelet containerd coredns kube-scheduler kube-controller-manager kube-apiserver etcd)

anchor_pid() { # pid of the process holding the node's mount namespace (and in the netns)
  local f="$D/pids/anchor.pid" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f")"
  [ -e "/proc/$pid/ns/net" ] || return 1
  # must still be our anchor: `sleep` in our netns
  [ "$(readlink "/proc/$pid/ns/net")" = "$(nsenter --net="/run/netns/$PRISM_REAL_NETNS" readlink /proc/self/ns/net 2>/dev/null)" ] || return 1
  echo "$pid"
}
# nx CMD...: run CMD inside the node's mount + network namespace.
nx() { nsenter --target "$(anchor_pid)" --mount --net -- "$@"; }
# kubectl against the real-node cluster (the apiserver listens only inside the netns).
rk() { nsenter --net="/run/netns/$PRISM_REAL_NETNS" "$(kubectl_bin)" --kubeconfig "$PRISM_KUBECONFIG" "$@"; }
