# Sourced by e2e/build.sh (control plane) and e2e/real-node/build.sh (kubelet, kube-proxy,
# containerd): one Go toolchain, one set of caches, one Kubernetes version (kubelet and the API
# server must stay within the skew policy), one stamp scheme. Expects E2E, ROOT and BIN.
BUILD_NAME="$(basename "$(dirname "$0")")/$(basename "$0")"

# Go >= 1.26: $GO, else go on PATH, else /usr/local/go/bin/go, else the official toolchain
# module fetched from the Go module proxy into .cache/go/toolchain (checksum pinned below).
GO_TOOLCHAIN=go1.26.8
GO_TOOLCHAIN_SHA256_linux_amd64=30c2b1bf7dcc88d3eb0a1364e47ddd9128edb3110a30e8a0ef61cd5856b31de7
go_ok() { [ -n "$1" ] && [ -x "$1" ] && [ "$("$1" env GOVERSION 2>/dev/null | sed -n 's/^go1\.\([0-9]*\).*/\1/p')" -ge 26 ] 2>/dev/null; }
fetch_go() {
  local dir="$ROOT/.cache/go/toolchain" arch sum url proxy
  arch="$(uname -m)"; [ "$arch" = x86_64 ] || { echo "$BUILD_NAME: no Go >= 1.26 and no pinned toolchain for $arch; set GO=" >&2; exit 1; }
  sum="$GO_TOOLCHAIN_SHA256_linux_amd64"
  proxy="${GOPROXY:-https://proxy.golang.org}"; proxy="${proxy%%,*}"
  [ "$proxy" = direct ] || [ "$proxy" = off ] && proxy=https://proxy.golang.org
  url="$proxy/golang.org/toolchain/@v/v0.0.1-$GO_TOOLCHAIN.linux-amd64.zip"
  echo "$BUILD_NAME: fetching $GO_TOOLCHAIN from $url" >&2
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
if [ -z "$GO" ]; then fetch_go; GO="$ROOT/.cache/go/toolchain/go/bin/go"; go_ok "$GO" || { echo "$BUILD_NAME: fetched Go does not run" >&2; exit 1; }; fi

export GOTOOLCHAIN=local CGO_ENABLED=0
export GOCACHE="${GOCACHE:-$ROOT/.cache/go/build}"
export GOMODCACHE="${GOMODCACHE:-$ROOT/.cache/go/mod}"
export GOPATH="${GOPATH_E2E:-$ROOT/.cache/go/path}"
# go.sum is committed: fail instead of silently editing it.
export GOFLAGS="-mod=readonly"
JOBS="${PRISM_BUILD_JOBS:-2}"

K8S_VERSION=v1.36.3
# Version strings a real release carries (kubectl version, the node's kubeletVersion).
K8S_LDFLAGS="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=36 -X k8s.io/component-base/version.gitTreeState=clean -X k8s.io/component-base/version.buildDate=1970-01-01T00:00:00Z"

gover="$("$GO" env GOVERSION)"
# The building script and this file: editing either rebuilds what they build.
self_hash="$(cat "$0" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"

# stamp_ok MODULE STAMP BIN... : true when stamp STAMP matches module MODULE's inputs and every
# binary exists. stamp_write MODULE [STAMP] records it (STAMP defaults to MODULE).
stamp_of() {
  { (cd "$E2E/go/$1" && cat go.mod go.sum); echo "$gover $self_hash $JOBS"
    [ "$1" = kwok ] && cat "$E2E"/kwok/stages/*.yaml 2>/dev/null; true; } | sha256sum | cut -c1-32
}
stamp_ok() {
  local m="$1" s="$2"; shift 2
  [ "${PRISM_E2E_FORCE_BUILD:-0}" = 1 ] && return 1
  [ -f "$BIN/.stamp-$s" ] && [ "$(cat "$BIN/.stamp-$s")" = "$(stamp_of "$m")" ] || return 1
  local b; for b in "$@"; do [ -x "$BIN/$b" ] || return 1; done
}
stamp_write() { stamp_of "$1" > "$BIN/.stamp-${2:-$1}"; }
