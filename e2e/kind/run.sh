#!/usr/bin/env bash
# Run the e2e smoke suite on a real cluster instead of the local simulated one.
#   e2e/kind/run.sh                 create a kind cluster from kind-config.yaml, run, delete it
#   PRISM_KIND_KEEP=1 e2e/kind/run.sh   keep the kind cluster afterwards
#   KUBECONFIG=/path e2e/kind/run.sh --existing   use any cluster: its GPU nodes must carry the
#       label nvidia.com/gpu.present=true and the taint nvidia.com/gpu=present:NoSchedule and
#       advertise nvidia.com/gpu (as the NVIDIA GPU operator does), plus one untainted CPU node.
# Needs: kind + docker or podman (for creation), kubectl (or e2e/bin/kubectl). Not run in CI
# here: these machines have no container runtime.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$HERE/../lib.sh"
KUBECTL="$(kubectl_bin)" || { echo "kind/run.sh: need kubectl" >&2; exit 1; }
NAME="${PRISM_KIND_NAME:-prism-e2e}"
GPUS="${PRISM_GPUS_PER_NODE:-8}"

if [ "${1:-}" = --existing ]; then
  : "${KUBECONFIG:?set KUBECONFIG to the target cluster}"
  KCFG="$KUBECONFIG"
else
  command -v kind >/dev/null || { echo "kind/run.sh: kind not installed (https://kind.sigs.k8s.io)" >&2; exit 1; }
  KCFG="$PRISM_CLUSTER_DIR/kind-$NAME.kubeconfig"
  mkdir -p "$PRISM_CLUSTER_DIR"
  if ! kind get clusters 2>/dev/null | grep -qx "$NAME"; then
    kind create cluster --name "$NAME" --config "$HERE/kind-config.yaml" --kubeconfig "$KCFG" --wait 180s
  else
    kind get kubeconfig --name "$NAME" > "$KCFG"
  fi
  [ "${PRISM_KIND_KEEP:-0}" = 1 ] || trap 'kind delete cluster --name "$NAME"' EXIT
  # Advertise the simulated GPUs: extended resources on node status survive kubelet updates.
  for n in $("$KUBECTL" --kubeconfig "$KCFG" get nodes -l nvidia.com/gpu.present=true -o name); do
    "$KUBECTL" --kubeconfig "$KCFG" patch "$n" --subresource=status --type=json \
      -p "[{\"op\":\"add\",\"path\":\"/status/capacity/nvidia.com~1gpu\",\"value\":\"$GPUS\"}]" >/dev/null
  done
  # allocatable is derived from capacity by the kubelet on its next status sync
  for i in $(seq 1 60); do
    c="$("$KUBECTL" --kubeconfig "$KCFG" get nodes -l nvidia.com/gpu.present=true \
          -o jsonpath='{range .items[*]}{.status.allocatable.nvidia\.com/gpu}{"\n"}{end}' | grep -c "^$GPUS$" || true)"
    [ "$c" -ge 1 ] && [ "$c" = "$("$KUBECTL" --kubeconfig "$KCFG" get nodes -l nvidia.com/gpu.present=true -o name | wc -l)" ] && break
    sleep 2
  done
fi

PRISM_SMOKE_KUBECONFIG="$KCFG" "$HERE/../smoke.sh"
