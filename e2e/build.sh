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

source "$E2E/go-build.sh"
KWOK_VERSION=v0.8.0

t0=$(date +%s)

# --- k8s: apiserver, controller-manager, scheduler, kubectl --------------------------------
if stamp_ok k8s k8s kube-apiserver kube-controller-manager kube-scheduler kubectl; then
  echo "build.sh: k8s binaries up to date"
else
  echo "build.sh: building kube-apiserver kube-controller-manager kube-scheduler kubectl $K8S_VERSION (cold: tens of minutes on 2 cores)"
  (cd "$E2E/go/k8s" && "$GO" build -p "$JOBS" -trimpath -ldflags "$K8S_LDFLAGS" -o "$BIN/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
  stamp_write k8s
fi

# --- etcd ----------------------------------------------------------------------------------
if stamp_ok etcd etcd etcd; then
  echo "build.sh: etcd up to date"
else
  echo "build.sh: building etcd"
  (cd "$E2E/go/etcd" && "$GO" build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$BIN/etcd" .)
  stamp_write etcd
fi

# --- kwok + stage config -------------------------------------------------------------------
if stamp_ok kwok kwok kwok && [ -f "$BIN/kwok.yaml" ]; then
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
if stamp_ok helm helm helm; then
  echo "build.sh: helm up to date"
else
  echo "build.sh: building helm $(cd "$E2E/go/helm" && "$GO" list -m -f '{{.Version}}' helm.sh/helm/v3)"
  (cd "$E2E/go/helm" && "$GO" build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$BIN/helm" helm.sh/helm/v3/cmd/helm)
  stamp_write helm
fi

echo "build.sh: done in $(( $(date +%s) - t0 ))s -> $BIN"
