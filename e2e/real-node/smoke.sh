#!/usr/bin/env bash
# Smoke test for the real-node cluster (starts it with up.sh if needed):
#   1. Pod `web` (prism.local/e2e/busybox:1, imagePullPolicy Never; busybox httpd) gets Running/Ready
#      through an HTTP readiness probe run by the kubelet
#   2. `kubectl logs web` shows its first line
#   3. its pod IP answers HTTP from inside the netns (curl)
#   4. a ClusterIP Service in front of it answers from inside the netns (kube-proxy)
#   5. a second pod reaches `web` through the Service and the apiserver through the
#      `kubernetes` Service (10.96.0.1:443), and `kubectl exec` works
# Prints timings. Leaves the cluster up (down.sh stops it); deletes its namespace unless
# PRISM_KEEP_NS=1.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
"$RN/up.sh" >/dev/null
NS=smoke
T0=$(date +%s)
fail() { log "SMOKE FAILED: $*"; rk -n "$NS" get pods -o wide >&2 || true; rk -n "$NS" describe pods >&2 || true; exit 1; }
nsx() { nsenter --net="/run/netns/$PRISM_REAL_NETNS" "$@"; }

rk delete namespace "$NS" --ignore-not-found --wait=true >/dev/null
rk create namespace "$NS" >/dev/null
rk -n "$NS" wait --for=create serviceaccount/default --timeout=60s >/dev/null
rk -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: web
    image: $BUSYBOX_IMAGE
    imagePullPolicy: Never
    command: [sh, -c, 'echo "hello from a real pod on \$(hostname)"; exec httpd -f -v -p 8080 -h /var/www']
    ports: [{containerPort: 8080}]
    readinessProbe:
      httpGet: {path: /index.html, port: 8080}
      periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
EOF
rk -n "$NS" wait --for=condition=Ready pod/web --timeout=120s >/dev/null || fail "pod web not Ready"
log "pod web Ready in $(( $(date +%s) - T0 ))s"

logs="$(rk -n "$NS" logs web)"; echo "$logs" | grep -q "hello from a real pod on web" || fail "kubectl logs: $logs"
log "kubectl logs: $(echo "$logs" | head -1)"

ip="$(rk -n "$NS" get pod web -o jsonpath='{.status.podIP}')"
body="$(nsx curl -sf --max-time 5 "http://$ip:8080/index.html")" || fail "curl pod IP $ip"
[ "$body" = "prism real-node e2e" ] || fail "unexpected body from $ip: $body"
log "curl http://$ip:8080/ (pod IP, inside the netns): $body"

svc="$(rk -n "$NS" get service web -o jsonpath='{.spec.clusterIP}')"
ok=""; for _ in $(seq 40); do
  if body="$(nsx curl -sf --max-time 2 "http://$svc/index.html")"; then ok=1; break; fi; sleep 0.5
done
[ -n "$ok" ] || fail "curl service $svc:80"
log "curl http://$svc/ (ClusterIP via kube-proxy $PROXY_MODE): $body"

rk -n "$NS" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: $BUSYBOX_IMAGE
    imagePullPolicy: Never
    command: [sh, -c, 'sleep 3600']
EOF
rk -n "$NS" wait --for=condition=Ready pod/client --timeout=60s >/dev/null || fail "pod client not Ready"
# no cluster DNS: the Service address comes from the env the kubelet injects
out="$(rk -n "$NS" exec client -- sh -c 'wget -qO- "http://$WEB_SERVICE_HOST/index.html"' 2>&1)" || fail "pod -> service: $out"
log "kubectl exec client -- wget http://\$WEB_SERVICE_HOST (pod -> Service -> pod): $out"
# busybox has no TLS client that works here (its wget https segfaults); plain HTTP to the TLS port
# gets the apiserver's own "HTTP request to an HTTPS server" answer, which proves the path.
out="$(rk -n "$NS" exec client -- sh -c 'printf "GET / HTTP/1.0\r\n\r\n" | nc -w 3 "$KUBERNETES_SERVICE_HOST" "$KUBERNETES_SERVICE_PORT"' 2>&1)" || true
echo "$out" | grep -q "HTTP request to an HTTPS server" || fail "pod -> kubernetes Service $SERVICE_API_IP:443: $out"
log "pod -> kubernetes Service $SERVICE_API_IP:443 -> apiserver: $(echo "$out" | head -1 | tr -d '\r')"

[ "${PRISM_KEEP_NS:-0}" = 1 ] || rk delete namespace "$NS" --wait=false >/dev/null
log "real-node smoke OK in $(( $(date +%s) - T0 ))s"
