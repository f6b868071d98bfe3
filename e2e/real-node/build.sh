#!/usr/bin/env bash
# Build what a REAL worker node needs, on top of e2e/build.sh's control plane, into e2e/bin/:
#   kubelet, kube-proxy   v1.36.3 from the e2e/go/k8s harness module (same build cache)
#   containerd, containerd-shim-runc-v2, ctr   v2.4.2 from the e2e/go/containerd harness module
# and installs the Debian packages the node uses: runc, containernetworking-plugins (bridge,
# host-local, loopback, portmap in /usr/lib/cni), iptables, conntrack, busybox-static (test images).
#
# Same caches/Go/stamps as e2e/build.sh (which runs first). Env: PRISM_BUILD_JOBS (-p, default 2),
# PRISM_E2E_FORCE_BUILD=1, PRISM_E2E_SKIP_CP_BUILD=1 (do not run e2e/build.sh).
set -euo pipefail

E2E="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROOT="$(cd "$E2E/.." && pwd)"
BIN="$E2E/bin"
mkdir -p "$BIN"
t0=$(date +%s)

# Control plane first: it also resolves or fetches Go >= 1.26.
[ "${PRISM_E2E_SKIP_CP_BUILD:-0}" = 1 ] || "$E2E/build.sh"

go_ok() { [ -n "$1" ] && [ -x "$1" ] && [ "$("$1" env GOVERSION 2>/dev/null | sed -n 's/^go1\.\([0-9]*\).*/\1/p')" -ge 26 ] 2>/dev/null; }
GO_CANDIDATES=("${GO:-}" "$(command -v go || true)" /usr/local/go/bin/go "$ROOT/.cache/go/toolchain/go/bin/go")
GO=""
for g in "${GO_CANDIDATES[@]}"; do if go_ok "$g"; then GO="$g"; break; fi; done
[ -n "$GO" ] || { echo "real-node/build.sh: no Go >= 1.26 (run e2e/build.sh)" >&2; exit 1; }

export GOTOOLCHAIN=local CGO_ENABLED=0
export GOCACHE="${GOCACHE:-$ROOT/.cache/go/build}"
export GOMODCACHE="${GOMODCACHE:-$ROOT/.cache/go/mod}"
export GOPATH="${GOPATH_E2E:-$ROOT/.cache/go/path}"
export GOFLAGS="-mod=readonly"
JOBS="${PRISM_BUILD_JOBS:-2}"

K8S_VERSION=v1.36.3
gover="$("$GO" env GOVERSION)"
self_hash="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"
stamp_of() { { (cd "$E2E/go/$1" && cat go.mod go.sum); echo "$gover $self_hash $JOBS"; } | sha256sum | cut -c1-32; }
stamp_ok() {
  local m="$1" s="$2"; shift 2
  [ "${PRISM_E2E_FORCE_BUILD:-0}" = 1 ] && return 1
  [ -f "$BIN/.stamp-$s" ] && [ "$(cat "$BIN/.stamp-$s")" = "$(stamp_of "$m")" ] || return 1
  local b; for b in "$@"; do [ -x "$BIN/$b" ] || return 1; done
}

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
  V=k8s.io/component-base/version
  LD="-s -w -X $V.gitVersion=$K8S_VERSION -X $V.gitMajor=1 -X $V.gitMinor=36 -X $V.gitTreeState=clean -X $V.buildDate=1970-01-01T00:00:00Z"
  (cd "$E2E/go/k8s" && "$GO" build -p "$JOBS" -trimpath -ldflags "$LD" -o "$BIN/" \
      k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)
  stamp_of k8s > "$BIN/.stamp-k8s-node"
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
  stamp_of containerd > "$BIN/.stamp-containerd"
fi

echo "real-node/build.sh: done in $(( $(date +%s) - t0 ))s -> $BIN"
