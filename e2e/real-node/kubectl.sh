#!/usr/bin/env bash
# kubectl against the real-node cluster (e2e/real-node/up.sh); its apiserver listens only inside
# the network namespace, so this enters it (root needed).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
exec nsenter --net="/run/netns/$PRISM_REAL_NETNS" "$(kubectl_bin)" --kubeconfig "$PRISM_KUBECONFIG" "$@"
