# Shared settings for the e2e control-plane scripts. Source it; do not execute it.
# Everything is derived from the repo root; every port and path can be overridden by env.

E2E="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$E2E/.." && pwd)"
BIN="$E2E/bin"

# State of the running cluster: pki/, etcd-data/, logs/, pids/, run/ (one start script per
# component), kubeconfig (admin, system:masters).
PRISM_CLUSTER_DIR="${PRISM_CLUSTER_DIR:-$ROOT/.cache/cluster}"
PRISM_KUBECONFIG="$PRISM_CLUSTER_DIR/kubeconfig"

# Loopback ports (all overridable; a second cluster needs its own dir and ports).
PRISM_ETCD_PORT="${PRISM_ETCD_PORT:-23790}"
PRISM_ETCD_PEER_PORT="${PRISM_ETCD_PEER_PORT:-23800}"
PRISM_APISERVER_PORT="${PRISM_APISERVER_PORT:-6443}"
PRISM_KCM_PORT="${PRISM_KCM_PORT:-10257}"
PRISM_SCHEDULER_PORT="${PRISM_SCHEDULER_PORT:-10259}"
PRISM_KWOK_PORT="${PRISM_KWOK_PORT:-10247}"

# Simulated nodes.
PRISM_GPU_NODES="${PRISM_GPU_NODES:-3}"
PRISM_GPUS_PER_NODE="${PRISM_GPUS_PER_NODE:-8}"
PRISM_CPU_NODES="${PRISM_CPU_NODES:-1}"

# Address ranges. None of these is routed or listened on: they only appear in API objects.
# The apiserver binds 127.0.0.1 but advertises a non-loopback address, because the
# "kubernetes" Endpoints/EndpointSlice reject loopback IPs.
PRISM_APISERVER_ADVERTISE="${PRISM_APISERVER_ADVERTISE:-10.240.0.2}"
PRISM_SERVICE_CIDR="${PRISM_SERVICE_CIDR:-10.96.0.0/16}"
PRISM_POD_CIDR="${PRISM_POD_CIDR:-10.244.0.0/16}"   # node i gets 10.244.i.0/24 (see cluster-up.sh)

COMPONENTS_START_ORDER=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)
COMPONENTS_STOP_ORDER=(kwok kube-scheduler kube-controller-manager kube-apiserver etcd)

kubectl_bin() {
  if [ -x "$BIN/kubectl" ]; then echo "$BIN/kubectl"; else command -v kubectl; fi
}
kc() { "$(kubectl_bin)" --kubeconfig "$PRISM_KUBECONFIG" "$@"; }

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

pid_of() { # prints the pid of a running component started by us, else nothing
  local f="$PRISM_CLUSTER_DIR/pids/$1.pid" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f")"
  # Guard against pid reuse: the process must be our binary, started for this cluster dir
  # (run/<name>.sh execs the binary, and every command line names the cluster dir).
  local cmd
  cmd="$( { tr '\0' ' ' < "/proc/$pid/cmdline"; } 2>/dev/null)" || return 1
  if [[ "$cmd" == *"$BIN/$1 "* && "$cmd" == *"$PRISM_CLUSTER_DIR"* ]]; then
    echo "$pid"
  else
    return 1
  fi
}

log_tail() { # component [lines]
  local f="$PRISM_CLUSTER_DIR/logs/$1.log"
  echo "----- last ${2:-40} lines of $f -----" >&2
  [ -f "$f" ] && tail -n "${2:-40}" "$f" >&2
  echo "-----" >&2
}

start_component() { # name: runs $PRISM_CLUSTER_DIR/run/<name>.sh detached, logging to logs/<name>.log
  local name="$1"
  mkdir -p "$PRISM_CLUSTER_DIR/logs" "$PRISM_CLUSTER_DIR/pids"
  setsid nohup bash "$PRISM_CLUSTER_DIR/run/$name.sh" \
    </dev/null >>"$PRISM_CLUSTER_DIR/logs/$name.log" 2>&1 9>&- &
  echo $! > "$PRISM_CLUSTER_DIR/pids/$name.pid"
}

stop_component() { # name [grace_s=15]: SIGTERM, wait up to grace_s, then SIGKILL (process group)
  local name="$1" grace="${2:-15}" pid i
  pid="$(pid_of "$name")" || { rm -f "$PRISM_CLUSTER_DIR/pids/$name.pid"; return 0; }
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 $((grace * 10))); do
    kill -0 "$pid" 2>/dev/null || kill -0 -- "-$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null || kill -0 -- "-$pid" 2>/dev/null; then
    log "$name (pid $pid) still running ${grace}s after SIGTERM; sending SIGKILL"
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$PRISM_CLUSTER_DIR/pids/$name.pid"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# curl against the apiserver with the admin client cert.
api_curl() {
  curl -sS --max-time 5 --cacert "$PRISM_CLUSTER_DIR/pki/ca.crt" \
    --cert "$PRISM_CLUSTER_DIR/pki/admin.crt" --key "$PRISM_CLUSTER_DIR/pki/admin.key" \
    "https://127.0.0.1:$PRISM_APISERVER_PORT$1"
}

# Serialise cluster-up/cluster-down (e.g. several test binaries calling cluster-up at once).
cluster_lock() {
  command -v flock >/dev/null || return 0
  [ "${PRISM_CLUSTER_LOCKED:-}" = "$PRISM_CLUSTER_DIR" ] && return 0   # nested call
  mkdir -p "$(dirname "$PRISM_CLUSTER_DIR")"
  exec 9>"$PRISM_CLUSTER_DIR.lock"
  flock -w 300 9 || { echo "could not lock $PRISM_CLUSTER_DIR.lock within 300s" >&2; exit 1; }
  export PRISM_CLUSTER_LOCKED="$PRISM_CLUSTER_DIR"
}

# Runs the command until it succeeds; calls the sourcing script's `fail COMPONENT MESSAGE` when
# the component's process exits first or the timeout passes (cluster-up.sh, real-node/up.sh).
wait_for() { # component timeout_s description command...
  local comp="$1" timeout="$2" what="$3"; shift 3
  local deadline=$(( $(date +%s) + timeout ))
  local raw
  until "$@" >/dev/null 2>&1; do
    if ! pid_of "$comp" >/dev/null; then
      # pid_of matches the binary's command line, which a just-started run script shows only
      # once it has exec'd; under load that can take a moment. Gone means the pid is gone.
      raw="$(cat "$PRISM_CLUSTER_DIR/pids/$comp.pid" 2>/dev/null)"
      { [ -n "$raw" ] && kill -0 "$raw" 2>/dev/null; } || fail "$comp" "$comp exited while waiting for $what"
    fi
    [ "$(date +%s)" -lt "$deadline" ] || fail "$comp" "timed out after ${timeout}s waiting for $what"
    sleep 0.5
  done
}
