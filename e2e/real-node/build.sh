#!/usr/bin/env bash
# Build what a REAL worker node needs, on top of e2e/build.sh's control plane, into e2e/bin/:
#   kubelet, kube-proxy   v1.36.3 from the e2e/go/k8s harness module (same build cache)
#   containerd, containerd-shim-runc-v2, ctr   v2.4.2 from the e2e/go/containerd harness module
#   coredns       v1.15.0 with the cluster-DNS plugins only, from the e2e/go/coredns harness module
#   registry      go-containerregistry's OCI registry, from the e2e/go/registry harness module
# and installs the Debian packages the node uses: runc, containernetworking-plugins (bridge,
# host-local, loopback, portmap in /usr/lib/cni), iptables, conntrack, busybox-static (test images).
#
# Go, caches, the Kubernetes version and stamps come from e2e/go-build.sh, shared with
# e2e/build.sh (which runs first). Env: PRISM_BUILD_JOBS (-p, default 2),
# PRISM_E2E_FORCE_BUILD=1, PRISM_E2E_SKIP_CP_BUILD=1 (do not run e2e/build.sh).
set -euo pipefail

E2E="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="$(cd "$E2E/.." && pwd)"
BIN="$E2E/bin"
mkdir -p "$BIN"
t0=$(date +%s)

# Control plane first: it also resolves or fetches Go >= 1.26.
[ "${PRISM_E2E_SKIP_CP_BUILD:-0}" = 1 ] || "$E2E/build.sh"

source "$E2E/go-build.sh"

# --- Debian packages -------------------------------------------------------------------------
pkgs=()
command -v runc >/dev/null || pkgs+=(runc)
[ -x /usr/lib/cni/bridge ] || pkgs+=(containernetworking-plugins)
command -v iptables-restore >/dev/null || pkgs+=(iptables)
command -v conntrack >/dev/null || pkgs+=(conntrack)
[ -x /bin/busybox ] || pkgs+=(busybox-static)
if [ ${#pkgs[@]} -gt 0 ]; then
  echo "real-node/build.sh: apt-get install ${pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null; }
fi

# --- kubelet, kube-proxy (k8s harness module; packages shared with the control plane) ---------
if stamp_ok k8s k8s-node kubelet kube-proxy; then
  echo "real-node/build.sh: kubelet kube-proxy up to date"
else
  echo "real-node/build.sh: building kubelet kube-proxy $K8S_VERSION"
  (cd "$E2E/go/k8s" && "$GO" build -p "$JOBS" -trimpath -ldflags "$K8S_LDFLAGS" -o "$BIN/" \
      k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)
  stamp_write k8s k8s-node
fi

# --- containerd v2 ---------------------------------------------------------------------------
if stamp_ok containerd containerd containerd containerd-shim-runc-v2 ctr; then
  echo "real-node/build.sh: containerd up to date"
else
  CV="$(cd "$E2E/go/containerd" && "$GO" list -m -f '{{.Version}}' github.com/containerd/containerd/v2)"
  echo "real-node/build.sh: building containerd containerd-shim-runc-v2 ctr $CV"
  P=github.com/containerd/containerd/v2
  CLD="-s -w -X $P/version.Version=$CV -X $P/version.Revision=$CV -X $P/version.Package=github.com/containerd/containerd/v2"
  # Static, no cgo: btrfs (cgo) drops out; devmapper/zfs snapshotters are not needed (overlayfs).
  (cd "$E2E/go/containerd" && "$GO" build -p "$JOBS" -trimpath -tags "urfave_cli_no_docs no_btrfs no_devmapper no_zfs osusergo netgo" \
      -ldflags "$CLD" -o "$BIN/" $P/cmd/containerd $P/cmd/ctr)
  (cd "$E2E/go/containerd" && "$GO" build -p "$JOBS" -trimpath -tags "urfave_cli_no_docs no_grpc osusergo netgo" \
      -ldflags "$CLD" -o "$BIN/" $P/cmd/containerd-shim-runc-v2)
  stamp_write containerd
fi

# --- harness modules with a main.go of ours -----------------------------------------------------
# build_main NAME MODULE: e2e/go/NAME's main package -> $BIN/NAME, reporting MODULE's version.
# The stamp's name carries main.go's hash: the module's stamp covers go.mod and go.sum only.
build_main() {
  local name=$1 module=$2 stamp
  stamp="$name-$(sha256sum "$E2E/go/$name/main.go" | cut -c1-12)"
  if stamp_ok "$name" "$stamp" "$name"; then
    echo "real-node/build.sh: $name up to date"
    return
  fi
  echo "real-node/build.sh: building $name $(cd "$E2E/go/$name" && "$GO" list -m -f '{{.Version}}' "$module")"
  (cd "$E2E/go/$name" && CGO_ENABLED=0 "$GO" build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$BIN/$name" .)
  stamp_write "$name" "$stamp"
}
# The OCI registry oci:// models are pulled from inside the cluster.
build_main registry github.com/google/go-containerregistry
# CoreDNS: cluster DNS for Services, headless Services and pod hostnames.
build_main coredns github.com/coredns/coredns

echo "real-node/build.sh: done in $(( $(date +%s) - t0 ))s -> $BIN"
