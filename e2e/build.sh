#!/usr/bin/env bash
# Build the e2e control-plane binaries from the Go module proxy into e2e/bin/:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok, helm
# plus e2e/bin/kwok.yaml (kwok's stage config, taken from the pinned kwok module).
#
# Versions are pinned by the harness modules in e2e/go/{k8s,etcd,kwok,helm} (go.mod + go.sum).
# GOCACHE/GOMODCACHE live under <repo>/.cache/go, so rebuilds reuse compiled packages.
# A stamp per module (hash of go.mod, go.sum, go version, this script) skips the build
# entirely when the binaries are already up to date.
#
# Env: GO (go >= 1.26; default: go on PATH, /usr/local/go/bin/go, else fetched), PRISM_BUILD_JOBS (-p, default 2),
#      PRISM_E2E_FORCE_BUILD=1 (ignore stamps).
set -euo pipefail

E2E="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$E2E/.." && pwd)"
BIN="$E2E/bin"
mkdir -p "$BIN"

# Go >= 1.26: $GO, else go on PATH, else /usr/local/go/bin/go, else the official toolchain
# module fetched from the Go module proxy into .cache/go/toolchain (checksum pinned below).
GO_TOOLCHAIN=go1.26.8
GO_TOOLCHAIN_SHA256_linux_amd64=30c2b1bf7dcc88d3eb0a1364e47ddd9128edb3110a30e8a0ef61cd5856b31de7
go_ok() { [ -n "$1" ] && [ -x "$1" ] && [ "$("$1" env GOVERSION 2>/dev/null | sed -n 's/^go1\.\([0-9]*\).*/\1/p')" -ge 26 ] 2>/dev/null; }
fetch_go() {
  local dir="$ROOT/.cache/go/toolchain" arch sum url proxy
  arch="$(uname -m)"; [ "$arch" = x86_64 ] || { echo "build.sh: no Go >= 1.26 and no pinned toolchain for $arch; set GO=" >&2; exit 1; }
  sum="$GO_TOOLCHAIN_SHA256_linux_amd64"
  proxy="${GOPROXY:-https://proxy.golang.org}"; proxy="${proxy%%,*}"
  [ "$proxy" = direct ] || [ "$proxy" = off ] && proxy=https://proxy.golang.org
  url="$proxy/golang.org/toolchain/@v/v0.0.1-$GO_TOOLCHAIN.linux-amd64.zip"
  echo "build.sh: fetching $GO_TOOLCHAIN from $url" >&2
  rm -rf "$dir" && mkdir -p "$dir"
  curl -sSfL -o "$dir/go.zip" "$url"
  echo "$sum  $dir/go.zip" | sha256sum -c --quiet - >&2
  if command -v unzip >/dev/null; then unzip -q "$dir/go.zip" -d "$dir/x"
  else python3 -c 'import sys,zipfile,os
z=zipfile.ZipFile(sys.argv[1])
for i in z.infolist():
    p=z.extract(i,sys.argv[2]); m=(i.external_attr>>16)&0o777
    if m: os.chmod(p,m)' "$dir/go.zip" "$dir/x"; fi
  mv "$dir"/x/golang.org/toolchain@*/ "$dir/go" && rm -rf "$dir/x" "$dir/go.zip"
}
GO_CANDIDATES=("${GO:-}" "$(command -v go || true)" /usr/local/go/bin/go "$ROOT/.cache/go/toolchain/go/bin/go")
GO=""
for g in "${GO_CANDIDATES[@]}"; do if go_ok "$g"; then GO="$g"; break; fi; done
if [ -z "$GO" ]; then fetch_go; GO="$ROOT/.cache/go/toolchain/go/bin/go"; go_ok "$GO" || { echo "build.sh: fetched Go does not run" >&2; exit 1; }; fi

export GOTOOLCHAIN=local CGO_ENABLED=0
export GOCACHE="${GOCACHE:-$ROOT/.cache/go/build}"
export GOMODCACHE="${GOMODCACHE:-$ROOT/.cache/go/mod}"
export GOPATH="${GOPATH_E2E:-$ROOT/.cache/go/path}"
# go.sum is committed: fail instead of silently editing it.
export GOFLAGS="-mod=readonly"
JOBS="${PRISM_BUILD_JOBS:-2}"

K8S_VERSION=v1.36.3
KWOK_VERSION=v0.8.0

gover="$("$GO" env GOVERSION)"
self_hash="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"

# stamp_ok MODULE BIN... : true when the stamp matches and every binary exists.
stamp_of() {
  { (cd "$E2E/go/$1" && cat go.mod go.sum); echo "$gover $self_hash $JOBS"
    [ "$1" = kwok ] && cat "$E2E"/kwok/stages/*.yaml 2>/dev/null; true; } | sha256sum | cut -c1-32
}
stamp_ok() {
  local m="$1"; shift
  [ "${PRISM_E2E_FORCE_BUILD:-0}" = 1 ] && return 1
  [ -f "$BIN/.stamp-$m" ] && [ "$(cat "$BIN/.stamp-$m")" = "$(stamp_of "$m")" ] || return 1
  local b; for b in "$@"; do [ -x "$BIN/$b" ] || return 1; done
}
stamp_write() { stamp_of "$1" > "$BIN/.stamp-$1"; }

t0=$(date +%s)

# --- k8s: apiserver, controller-manager, scheduler, kubectl --------------------------------
if stamp_ok k8s kube-apiserver kube-controller-manager kube-scheduler kubectl; then
  echo "build.sh: k8s binaries up to date"
else
  echo "build.sh: building kube-apiserver kube-controller-manager kube-scheduler kubectl $K8S_VERSION (cold: tens of minutes on 2 cores)"
  V=k8s.io/component-base/version
  LD="-s -w -X $V.gitVersion=$K8S_VERSION -X $V.gitMajor=1 -X $V.gitMinor=36 -X $V.gitTreeState=clean -X $V.buildDate=1970-01-01T00:00:00Z"
  (cd "$E2E/go/k8s" && "$GO" build -p "$JOBS" -trimpath -ldflags "$LD" -o "$BIN/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
  stamp_write k8s
fi

# --- etcd ----------------------------------------------------------------------------------
if stamp_ok etcd etcd; then
  echo "build.sh: etcd up to date"
else
  echo "build.sh: building etcd"
  (cd "$E2E/go/etcd" && "$GO" build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$BIN/etcd" .)
  stamp_write etcd
fi

# --- kwok + stage config -------------------------------------------------------------------
if stamp_ok kwok kwok && [ -f "$BIN/kwok.yaml" ]; then
  echo "build.sh: kwok up to date"
else
  echo "build.sh: building kwok $KWOK_VERSION"
  (cd "$E2E/go/kwok" && "$GO" build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$BIN/kwok" sigs.k8s.io/kwok/cmd/kwok)
  # Stage config = kwokctl's defaults (fast node/pod lifecycle + lease heartbeat) plus the chaos
  # stages (pod failure, node NotReady, driven by labels) and Prism's own stages from e2e/kwok/.
  S="$(cd "$E2E/go/kwok" && "$GO" list -m -f '{{.Dir}}' sigs.k8s.io/kwok)/kustomize/stage"
  {
    # Options spelled out: kwok v0.8.0 does not apply its defaults to a --config file, and
    # zero parallelism fails ("node leases parallelism must be greater than 0").
    cat <<'KWOK'
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  enableProfilingHandler: false
  enableContentionProfiling: false
  enablePodsOnNodeSyncListPager: true
  enablePodsOnNodeSyncStreamWatch: false
  nodeLeaseParallelism: 4
  podPlayStageParallelism: 4
  nodePlayStageParallelism: 4
  podsOnNodeSyncParallelism: 1
  nodeLeaseDurationSeconds: 40
KWOK
    for f in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
             pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete \
             node/chaos/node-not-ready pod/chaos/pod-container-running-failed; do
      printf -- '---\n'; cat "$S/$f.yaml"
    done
    for f in "$E2E"/kwok/stages/*.yaml; do
      [ -e "$f" ] || continue
      printf -- '---\n'; cat "$f"
    done
  } > "$BIN/kwok.yaml.tmp"
  mv "$BIN/kwok.yaml.tmp" "$BIN/kwok.yaml"
  stamp_write kwok
fi

# --- helm (chart tests) -------------------------------------------------------------------
if stamp_ok helm helm; then
  echo "build.sh: helm up to date"
else
  echo "build.sh: building helm $(cd "$E2E/go/helm" && "$GO" list -m -f '{{.Version}}' helm.sh/helm/v3)"
  (cd "$E2E/go/helm" && "$GO" build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$BIN/helm" helm.sh/helm/v3/cmd/helm)
  stamp_write helm
fi

echo "build.sh: done in $(( $(date +%s) - t0 ))s -> $BIN"
