#!/usr/bin/env bash
# Helm chart + GitOps tier, against the running e2e control plane (scripts/test-e2e.sh calls it):
#   lint and template every ci/ values file; values.schema.json refuses bad values; the rendered
#   objects pass the real API server's validation (server-side dry run); install, then run the
#   operator with the chart's ServiceAccount token (its RBAC, nothing more) and reconcile the
#   GitOps example to Ready; re-applying it changes nothing; upgrade; `prism crds apply`;
#   uninstall leaves no orphans (CRDs stay, by design).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
KUBECONFIG="${KUBECONFIG:-$(make -s --no-print-directory cluster-kubeconfig)}"
export KUBECONFIG
H="$ROOT/e2e/bin/helm"
K="$ROOT/e2e/bin/kubectl"
CHART=charts/prism
NS=prism-system
TMP="$(mktemp -d)"
OPERATOR_PID=""
cleanup() {
  [ -n "$OPERATOR_PID" ] && kill "$OPERATOR_PID" 2>/dev/null || true
  "$H" uninstall prism -n "$NS" >/dev/null 2>&1 || true
  "$K" delete namespace prism-apps prism-batch "$NS" --wait=false >/dev/null 2>&1 || true
  "$K" delete crd servicemonitors.monitoring.coreos.com podmonitors.monitoring.coreos.com prometheusrules.monitoring.coreos.com >/dev/null 2>&1 || true
  rm -rf "$TMP"
}
trap cleanup EXIT
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] chart: $*"; }
fail() { echo "chart: FAIL: $*" >&2; [ -f "$TMP/operator.log" ] && tail -30 "$TMP/operator.log" >&2; exit 1; }

# A previous run's namespaces may still be terminating (cleanup does not wait): wait them out.
"$K" wait --for=delete namespace/"$NS" namespace/prism-apps namespace/prism-batch --timeout=120s >/dev/null 2>&1 || true

KUBE_VERSION="$("$K" version -o json | python3 -c 'import json,sys; v=json.load(sys.stdin)["serverVersion"]; print(v["gitVersion"])')"

say "helm lint (strict) with every ci/ values file"
for f in "$CHART"/ci/*.yaml; do
  "$H" lint --strict "$CHART" -f "$f" >"$TMP/lint.txt" 2>&1 || { cat "$TMP/lint.txt"; fail "helm lint -f $f"; }
done

say "values.schema.json refuses bad values with a message naming the value"
expect_refused() {  # expect_refused WANT_IN_MESSAGE helm-args...
  local want="$1"; shift
  if "$H" template prism "$CHART" --kube-version "$KUBE_VERSION" "$@" >"$TMP/bad.txt" 2>&1; then
    fail "helm template $* was accepted"
  fi
  grep -q -- "$want" "$TMP/bad.txt" || { cat "$TMP/bad.txt"; fail "helm template $*: message lacks '$want'"; }
}
expect_refused "/replicaCount" --set replicaCount=0
expect_refused "additional properties 'bogus'" --set bogus=1
expect_refused "/image/pullPolicy" --set image.pullPolicy=Sometimes
expect_refused "/networkPolicy/namespaces/0" --set 'networkPolicy.namespaces[0]=Bad_NS'
expect_refused "/prometheus/url" --set prometheus.url=prometheus:9090
expect_refused "needs leaderElection.enabled=true" --set replicaCount=2 --set leaderElection.enabled=false
expect_refused "prometheus-operator CRDs" --set serviceMonitor.enabled=true
expect_refused "PodMonitor" --set podMonitor.enabled=true
expect_refused "/podImagePullPolicy" --set podImagePullPolicy=Sometimes

say "rendered objects pass the API server's own validation (server-side dry run)"
# prometheus-operator is not part of this control plane: stand-in CRDs with open schemas let the
# dry run check kinds and metadata; their spec is checked by the promtool-free assertions below.
for kind in ServiceMonitor:servicemonitors PodMonitor:podmonitors PrometheusRule:prometheusrules; do
  "$K" apply -f - >/dev/null <<EOF
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: ${kind#*:}.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {kind: ${kind%%:*}, plural: ${kind#*:}}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
EOF
done
"$K" wait --for=condition=Established --timeout=60s crd/servicemonitors.monitoring.coreos.com crd/podmonitors.monitoring.coreos.com crd/prometheusrules.monitoring.coreos.com >/dev/null
for ns in "$NS" prism-apps prism-batch; do "$K" create namespace "$ns" --dry-run=client -o yaml | "$K" apply -f - >/dev/null; done
"$K" label namespace "$NS" pod-security.kubernetes.io/enforce=restricted --overwrite >/dev/null
for f in "$CHART"/ci/*.yaml; do
  "$H" template prism "$CHART" -n "$NS" -f "$f" --kube-version "$KUBE_VERSION" \
    --api-versions monitoring.coreos.com/v1/ServiceMonitor --api-versions monitoring.coreos.com/v1/PodMonitor --api-versions monitoring.coreos.com/v1/PrometheusRule \
    >"$TMP/rendered.yaml"
  "$K" apply --dry-run=server -f "$TMP/rendered.yaml" >"$TMP/dry.txt" 2>&1 || { cat "$TMP/dry.txt"; fail "server dry run of $f"; }
done
# The alert rules and the dashboard reference only metric names Prism exports.
"$H" template prism "$CHART" -f "$CHART/ci/full-values.yaml" --kube-version "$KUBE_VERSION" \
  --api-versions monitoring.coreos.com/v1/ServiceMonitor --api-versions monitoring.coreos.com/v1/PodMonitor --api-versions monitoring.coreos.com/v1/PrometheusRule >"$TMP/full.yaml"
# The PodMonitor selects the labels the operator puts on node and router pods (operator/src/node.rs
# object_labels, pipeline.rs labels_for) and scrapes their `http` port.
"$H" template prism "$CHART" -f "$CHART/ci/full-values.yaml" --kube-version "$KUBE_VERSION" \
  --api-versions monitoring.coreos.com/v1/ServiceMonitor --api-versions monitoring.coreos.com/v1/PodMonitor \
  --api-versions monitoring.coreos.com/v1/PrometheusRule --show-only templates/podmonitor.yaml >"$TMP/podmonitor.yaml"
for want in 'app.kubernetes.io/managed-by: prism' 'values: \[modality-node, router\]' '- port: http' 'path: /metrics'; do
  grep -q -- "$want" "$TMP/podmonitor.yaml" || { cat "$TMP/podmonitor.yaml"; fail "PodMonitor lacks '$want'"; }
done
for alert in PrismPipelineDegraded PrismNodeAtMaxReplicas PrismReconcileErrors; do
  grep -q "alert: $alert" "$TMP/full.yaml" || fail "alert $alert missing"
done
python3 - "$TMP/full.yaml" "$ROOT" <<'PY'
import re, sys, pathlib
text = pathlib.Path(sys.argv[1]).read_text()
root = pathlib.Path(sys.argv[2])
exported = set()
for src in list(root.glob("*/src/**/*.rs")):
    exported |= set(re.findall(r'"(prism_[a-z_]+)"', src.read_text()))
used = set(re.findall(r'\b(prism_[a-z_]+?)(?:_bucket|_count|_sum)?\b[{(\[ )]', text))
missing = sorted(m for m in used if m not in exported)
if missing:
    sys.exit(f"chart references metrics no Prism binary exports: {missing}")
print(f"chart: {len(used)} metric names used by alerts/dashboard, all exported")
PY

say "helm install (restricted namespace; the Deployment's pods must be admitted and ready)"
"$H" install prism "$CHART" -n "$NS" --set image.tag=e2e --set image.pullPolicy=Never \
  --wait --timeout 120s >"$TMP/install.txt" 2>&1 || { cat "$TMP/install.txt"; fail "helm install"; }
"$K" -n "$NS" rollout status deploy/prism --timeout=60s >/dev/null

say "the ServiceAccount can do what the operator needs and nothing more"
SA=system:serviceaccount:$NS:prism
[ "$("$K" auth can-i patch deployments.apps -n default --as "$SA")" = yes ] || fail "cannot patch deployments"
[ "$("$K" auth can-i patch modalitynodes.prism.dev --subresource=status -n default --as "$SA")" = yes ] || fail "cannot write node status"
[ "$("$K" auth can-i create rolebindings.rbac.authorization.k8s.io -n default --as "$SA")" = yes ] || fail "cannot give routers their Role"
[ "$("$K" auth can-i create persistentvolumeclaims -n default --as "$SA")" = yes ] || fail "cannot create the memory store claim"
[ "$("$K" auth can-i delete deployments.apps -n default --as "$SA")" = yes ] || fail "cannot delete a finished canary Deployment"
[ "$("$K" auth can-i create jobs.batch -n default --as "$SA")" = yes ] || fail "cannot create adaptation Jobs"
[ "$("$K" auth can-i patch modalitynodes.prism.dev -n default --as "$SA")" = yes ] || fail "cannot write an adaptation result into spec.model"
for denied in "get secrets" "delete modalitynodes.prism.dev" "create pods/exec" "delete nodes" "create customresourcedefinitions.apiextensions.k8s.io" "escalate roles.rbac.authorization.k8s.io" "bind clusterroles.rbac.authorization.k8s.io"; do
  # shellcheck disable=SC2086
  [ "$("$K" auth can-i $denied -A --as "$SA" 2>/dev/null || true)" = no ] || fail "ServiceAccount may $denied"
done

say "operator runs with the chart's ServiceAccount token and reconciles the GitOps example"
TOKEN="$("$K" -n "$NS" create token prism --duration=1h)"
"$K" config view --raw --minify -o json | python3 -c '
import json, sys
cfg = json.load(sys.stdin)
cfg["users"] = [{"name": "prism-sa", "user": {"token": sys.argv[1]}}]
cfg["contexts"][0]["context"]["user"] = "prism-sa"
print(json.dumps(cfg))' "$TOKEN" >"$TMP/sa-kubeconfig"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
KUBECONFIG="$TMP/sa-kubeconfig" "$CARGO_TARGET_DIR/release/prism-operator" --lease-namespace "$NS" \
  --identity chart-test --lease-duration-s 5 --metrics-addr "127.0.0.1:$PORT" \
  --node-image prism-node:e2e --router-image prism-router:e2e >"$TMP/operator.log" 2>&1 &
OPERATOR_PID=$!
"$K" apply -k examples/gitops >/dev/null
"$K" -n prism-apps wait --for=condition=Ready mmp/search --timeout=90s >/dev/null || fail "GitOps pipeline not Ready"
"$K" -n prism-apps wait --for=condition=Ready mn/text --timeout=30s >/dev/null || fail "GitOps node not Ready"
# An RBAC denial names the user ("... is forbidden: User \"system:serviceaccount:...\" cannot ...");
# other 403s (writes into namespaces still terminating from earlier tests) are not RBAC's.
if grep -q 'forbidden: User \\"system:serviceaccount:' "$TMP/operator.log" || grep -q 'forbidden: User "system:serviceaccount:' "$TMP/operator.log"; then
  fail "the operator hit an RBAC denial under the chart's role"
fi
say "re-applying the same manifests changes nothing (kubectl diff exits 0)"
"$K" apply -k examples/gitops >/dev/null
"$K" diff -k examples/gitops >"$TMP/diff.txt" 2>&1 || { cat "$TMP/diff.txt"; fail "drift after a second apply"; }
kill "$OPERATOR_PID"; wait "$OPERATOR_PID" 2>/dev/null || true; OPERATOR_PID=""

say "helm upgrade to the HA values (2 replicas, namespaced watch)"
"$H" upgrade prism "$CHART" -n "$NS" -f "$CHART/ci/ha-values.yaml" --set image.tag=e2e --set image.pullPolicy=Never \
  --wait --timeout 120s >"$TMP/upgrade.txt" 2>&1 || { cat "$TMP/upgrade.txt"; fail "helm upgrade"; }
[ "$("$K" -n "$NS" get deploy prism -o jsonpath='{.status.readyReplicas}')" = 2 ] || fail "2 ready replicas after upgrade"
args="$("$K" -n "$NS" get deploy prism -o jsonpath='{.spec.template.spec.containers[0].args}')"
grep -q -- "--namespace=prism-apps" <<<"$args" || fail "upgrade did not pass watchNamespace: $args"

say "prism crds apply (the CRD upgrade path Helm lacks)"
# Output captured first: `grep -q` closing the pipe early would fail the command under pipefail.
out="$("$CARGO_TARGET_DIR/release/prism" crds apply)" || fail "prism crds apply exited non-zero"
grep -q "modalitynodes.prism.dev applied and established" <<<"$out" || fail "prism crds apply: $out"

say "helm uninstall leaves no orphans; CRDs and user resources stay"
"$H" uninstall prism -n "$NS" --wait --timeout 60s >/dev/null
left="$("$K" get deploy,svc,sa,cm,role,rolebinding,clusterrole,clusterrolebinding,networkpolicy -A \
  -l app.kubernetes.io/instance=prism -o name 2>/dev/null || true)"
[ -z "$left" ] || fail "left behind after uninstall: $left"
"$K" get crd modalitynodes.prism.dev multimodalpipelines.prism.dev >/dev/null || fail "CRDs must survive uninstall"
"$K" -n prism-apps get mmp search >/dev/null || fail "user resources must survive uninstall"
say "PASS"
