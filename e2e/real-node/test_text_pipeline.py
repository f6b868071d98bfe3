#!/usr/bin/env python3
"""`make e2e-real`: Prism on REAL pods (kubelet + containerd + runc) of e2e/real-node/up.sh.

Host side (this process, root):
  1. reference embeddings from `prism up` on loopback (the prism.dev documents of
     examples/real-cluster/text-pipeline.yaml, same model folder), then `prism up` is stopped;
  2. e2e/real-node/up.sh (one real node inside netns prism-e2e-real), then `ctr -n k8s.io images
     import` of target/images/prism-{node,router,operator}.tar (ghcr.io/prism-dev/*:0.1.0, the
     operator's defaults; no registry is reachable);
  3. re-runs itself with `nsenter --net=/run/netns/prism-e2e-real` (`--inside`): every request
     below goes to addresses of that namespace only;
  4. e2e/real-node/down.sh (unless --keep).

Inside the netns:
  - CRDs (crds/); prism-operator as a Deployment from its image, installed from the chart
    (`helm template charts/prism`, namespace prism-system, watching prism-e2e), or with
    --operator process as a process in the netns (admin kubeconfig, --image-pull-policy Never);
    namespace prism-e2e (Pod Security enforce=restricted: a privileged pod is refused, and the node
    containers' processes run as uid 65532) with a hostPath PV holding a hard-linked copy of
    .cache/models/all-minilm-l6-v2 + PVC `models`, Secret `text-router-tokens`, then
    examples/real-cluster/text-pipeline.yaml (2 text replicas, model pvc://models/all-minilm-l6-v2);
  - node pods Ready through their kubelet-run readiness probes, the pipeline Ready, the router's
    table listing both pod IPs;
  - POST /v1/embeddings through the text-router ClusterIP Service (bearer token; 401 without):
    cosine >= 0.999 against `prism up` for every text;
  - Pod Security enforce=restricted on the namespace; a real Prometheus scraping the PodMonitor's
    pods (file_sd from the API: Debian's prometheus has no kubernetes_sd);
    the operator installed with `helm upgrade --install` and prometheus.url;
  - spec.tls between router and node (text-tls-pipeline.yaml), builtin autoscaling 1 -> 2 on the
    scraped in-flight gauge (text-autoscaled-pipeline.yaml), after the failover checks below;
  - failover: --clients closed-loop clients on /v1/embeddings through the Service for a bounded
    time; SIGKILL of one node container's process (host PID from `ctr -n k8s.io tasks ls`);
    no request may fail; times from the kill until the router's table (GET /v1/routing-table,
    polled every 5 ms) and the `text` Service's EndpointSlice (API watch) stop listing the pod
    ready; then the restarted container must be Ready again in both.

Last line: `cluster-failover: rewrite_ms=... endpointslice_ms=... failed_requests=... requests=...
... restart_requests=... autoscale_decided_s=... autoscale_ready_s=...`
(bench/cluster_failover/run.py runs this with --append-results). Logs: .cache/e2e-real/.
Exit status 0 only when every check passed.
"""
import argparse
import http.client
import json
import math
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

RN = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(RN))
sys.path.insert(0, os.path.join(ROOT, "bench", "common"))
import prism_up as pu  # noqa: E402  (PrismUp, KeepAlive, pct, machine, append_result)

TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
REL = os.path.join(TARGET, "release")
IMAGES_DIR = os.path.join(TARGET, "images")
IMAGES = ["prism-node", "prism-router", "prism-operator"]
D = os.environ.get("PRISM_REAL_DIR", os.path.join(ROOT, ".cache", "real-node"))
NETNS = os.environ.get("PRISM_REAL_NETNS", "prism-e2e-real")
BIN = os.path.join(ROOT, "e2e", "bin")
KUBECONFIG = os.path.join(D, "kubeconfig")
LOGS = os.path.join(ROOT, ".cache", "e2e-real")
EXAMPLE = os.path.join(ROOT, "examples", "real-cluster", "text-pipeline.yaml")
VISION_EXAMPLE = os.path.join(ROOT, "examples", "real-cluster", "text-vision-pipeline.yaml")
TLS_EXAMPLE = os.path.join(ROOT, "examples", "real-cluster", "text-tls-pipeline.yaml")
AUTO_EXAMPLE = os.path.join(ROOT, "examples", "real-cluster", "text-autoscaled-pipeline.yaml")
CANARY_EXAMPLE = os.path.join(ROOT, "examples", "real-cluster", "text-canary-pipeline.yaml")
# The in-cluster OCI registry (go-containerregistry's, image of up.sh). Pods name it as a user
# would, by its Service's DNS name (CoreDNS of up.sh), and the operator is told at install that
# it serves plain HTTP. The harness, outside any pod, pushes to its fixed ClusterIP.
NS = "prism-e2e"
REGISTRY_IP = "10.96.0.50:5000"
REGISTRY = f"registry.{NS}.svc:5000"
REGISTRY_IMAGE = "prism.local/e2e/registry:1"
BUSYBOX_IMAGE = "prism.local/e2e/busybox:1"
MODEL = "all-minilm-l6-v2"
OCI_MODEL = f"oci://{REGISTRY}/models/{MODEL}:v1"
VISION_MODEL = "vit-digits"
VISION_PIPELINE = "text-vision"
OP_NS = "prism-system"
PIPELINE = NODE = "text"
TEXTS = [
    "A dog runs through the snow in the park.",
    "The puppy is playing fetch on the beach.",
    "A cat sleeps on a warm windowsill.",
    "Stock markets fell sharply on Tuesday.",
    "Quantum computers use qubits instead of bits.",
    "hi",
]
# wall-clock start, shared with the --inside run so both print one time line
ANSI = re.compile(r"\x1b\[[0-9;]*m")
T0 = float(os.environ.setdefault("PRISM_E2E_REAL_T0", repr(time.time())))
now = time.monotonic


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


class Failed(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Failed(msg)


def run(cmd, timeout=120, check_rc=True, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check_rc and r.returncode != 0:
        raise Failed(f"{' '.join(cmd)} -> rc {r.returncode}\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r.stdout


def cos(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return dot / (na * nb) if na and nb else 0.0


def example_docs():
    with open(EXAMPLE) as f:
        return [d for d in re.split(r"(?m)^---\s*$", f.read()) if re.search(r"(?m)^kind:", d)]


# ------------------------------------------------------------------------------------- host side
def reference_embeddings(path):
    """The same ModalityNode/MultimodalPipeline under `prism up` on loopback (it maps
    pvc://models/<path> to .cache/models/<path>); writes {"texts", "embeddings"} to path."""
    manifest = "---\n".join(d for d in example_docs() if "prism.dev/" in d)
    log("reference: prism up (loopback, outside the netns) with the example's prism.dev documents")
    with pu.PrismUp(os.path.join(REL, "prism"), manifest, "e2e-real-ref", echo=False) as up:
        st, body, _ = pu.call(up.url + "/v1/embeddings", {"input": TEXTS}, timeout=60)
        check(st == 200, f"prism up /v1/embeddings: HTTP {st}: {str(body)[:300]}")
        vecs = [d["embedding"] for d in body["data"]]
        up.ok = True
    check(len(vecs) == len(TEXTS), f"prism up returned {len(vecs)} embeddings for {len(TEXTS)} texts")
    with open(path, "w") as f:
        json.dump({"texts": TEXTS, "embeddings": vecs}, f)
    log(f"reference: {len(vecs)} embeddings of dim {len(vecs[0])}")


def anchor_pid():
    with open(os.path.join(D, "pids", "anchor.pid")) as f:
        return f.read().strip()


def host_main(args):
    if os.geteuid() != 0:
        sys.exit("e2e-real: needs root (network namespace, containerd, kubelet)")
    for b in ["prism", "prism-node", "prism-router", "prism-operator"]:
        if not os.access(os.path.join(REL, b), os.X_OK):
            sys.exit(f"e2e-real: {REL}/{b} missing: cargo build --release --workspace --bins")
    for i in IMAGES:
        if not os.path.exists(os.path.join(IMAGES_DIR, f"{i}.tar")):
            sys.exit(f"e2e-real: {IMAGES_DIR}/{i}.tar missing: python3 scripts/build-images.py (make images)")
    if not os.path.isdir(os.path.join(ROOT, ".cache", "models", MODEL)):
        sys.exit(f"e2e-real: .cache/models/{MODEL} missing: make models")
    os.makedirs(LOGS, exist_ok=True)
    ref = os.path.join(LOGS, "reference.json")
    rc = 1
    try:
        reference_embeddings(ref)
        t = now()
        log("e2e/real-node/up.sh")
        r = subprocess.run([os.path.join(RN, "up.sh")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with open(os.path.join(LOGS, "up.log"), "w") as f:
            f.write(r.stdout)
        if r.returncode != 0:
            print(r.stdout[-4000:])
            raise Failed(f"up.sh failed (rc {r.returncode}); log {LOGS}/up.log")
        log(f"cluster up in {now() - t:.1f}s")
        t = now()
        for i in IMAGES:
            run(["nsenter", "--target", anchor_pid(), "--mount", "--net", "--", os.path.join(BIN, "ctr"),
                 "--address", os.path.join(D, "containerd", "containerd.sock"), "-n", "k8s.io",
                 "images", "import", os.path.join(IMAGES_DIR, f"{i}.tar")], timeout=300)
        log(f"imported {', '.join(IMAGES)} into containerd (k8s.io) in {now() - t:.1f}s")
        inner = ["nsenter", f"--net=/run/netns/{NETNS}", sys.executable, os.path.abspath(__file__), "--inside",
                 "--reference", ref] + args.passthrough
        rc = subprocess.run(inner).returncode
    except Failed as e:
        print(f"E2E-REAL FAILED: {e}", file=sys.stderr, flush=True)
        rc = 1
    finally:
        if args.keep:
            log(f"--keep: cluster left up; stop it with e2e/real-node/down.sh (kubectl: e2e/real-node/kubectl.sh)")
        else:
            t = now()
            env = dict(os.environ, PRISM_KEEP_LOGS="0")
            r = subprocess.run([os.path.join(RN, "down.sh")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
            with open(os.path.join(LOGS, "down.log"), "w") as f:
                f.write(r.stdout)
            log(f"e2e/real-node/down.sh: rc {r.returncode} in {now() - t:.1f}s")
    log(f"e2e-real: {'OK' if rc == 0 else 'FAILED'} in {time.time() - T0:.1f}s (logs: {os.path.relpath(LOGS, ROOT)}/)")
    return rc


# ---------------------------------------------------------------------------------- inside netns
def kubectl(*a, timeout=60, check_rc=True, stdin=None):
    return run([os.path.join(BIN, "kubectl"), "--kubeconfig", KUBECONFIG, *a], timeout=timeout,
               check_rc=check_rc, input=stdin)


def kjson(*a):
    return json.loads(kubectl(*a, "-o", "json"))


def wait(what, timeout, fn, interval=0.5):
    deadline = now() + timeout
    last = None
    while now() < deadline:
        try:
            v = fn()
            if v:
                return v
        except Failed as e:  # noqa: PERF203
            last = e
        time.sleep(interval)
    raise Failed(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last})" if last else ""))


def pod_ready(p):
    return any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", []))


def node_pods():
    return kjson("-n", NS, "get", "pods", "-l", f"prism.dev/node={NODE},app.kubernetes.io/name=prism-node")["items"]


def live_pods(node):
    """The pods of ModalityNode `node` that are not being deleted."""
    return [p for p in kjson("-n", NS, "get", "pods", "-l", f"prism.dev/node={node}")["items"]
            if p["metadata"].get("deletionTimestamp") is None]


def wait_only_pod_ready(node, what, timeout=300):
    """Waits until `node` has exactly one live pod and it is Ready; returns it."""
    def ready():
        ps = live_pods(node)
        return ps[0] if len(ps) == 1 and pod_ready(ps[0]) else None
    return wait(what, timeout, ready, interval=1)


def wait_pipeline_ready(name, timeout=180):
    def ready():
        conds = kjson("-n", NS, "get", "mmp", name).get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)
    wait(f"pipeline {name} Ready", timeout, ready)


class Api:
    """The router's API through its ClusterIP Service, with the bearer token."""

    def __init__(self, svc_ip, token):
        self.base = f"http://{svc_ip}:8080"
        self.token = token

    @classmethod
    def of_pipeline(cls, pipeline, token):
        """The router of `pipeline`, through its ClusterIP Service."""
        return cls(kjson("-n", NS, "get", "svc", f"{pipeline}-router")["spec"]["clusterIP"], token)

    def client(self, timeout=30):
        return AuthKeepAlive(self.base, timeout, self.token)


class AuthKeepAlive(pu.KeepAlive):
    """A KeepAlive that sends the router's bearer token (auth=False: without it)."""

    def __init__(self, base, timeout, token):
        super().__init__(base, timeout, headers={"authorization": f"Bearer {token}"})

    def request(self, method, path, body=None, auth=True):
        return super().request(method, path, body, extra_headers=auth)


def table_ready_endpoints(raw):
    t = json.loads(raw)
    return t.get("generation"), {e["endpoint"] for reps in t.get("modalities", {}).values() for e in reps
                                 if e.get("ready")}


class Operator:
    """prism-operator, either as a Deployment from its image (default: the chart, rendered with
    `helm template`, in namespace prism-system: in-cluster config through the `kubernetes`
    Service, the chart's RBAC, a Lease) or as a process in the netns (--operator process: the
    admin kubeconfig, --image-pull-policy Never). Both watch only the test namespace."""

    def __init__(self, mode, prometheus_url):
        self.mode = mode
        self.prometheus_url = prometheus_url
        self.proc = None

    def start(self):
        if self.mode == "process":
            self.log = open(os.path.join(LOGS, "operator.log"), "a")
            cmd = [os.path.join(REL, "prism-operator"), "--leader-elect=false", "--metrics-addr", "127.0.0.1:18080",
                   "--image-pull-policy", "Never", "--namespace", NS, "--prometheus-url", self.prometheus_url,
                   "--insecure-registry", REGISTRY]
            log(f"$ KUBECONFIG={os.path.relpath(KUBECONFIG, ROOT)} {os.path.relpath(cmd[0], ROOT)} {' '.join(cmd[1:])}")
            self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, KUBECONFIG=KUBECONFIG, NO_COLOR="1"))
            return
        # The chart's operator image is ghcr.io/prism-dev/prism-operator:<appVersion>, imported above;
        # Never keeps the kubelet from trying a registry, for the operator and the pods it makes.
        sets = ["image.pullPolicy=Never", "podImagePullPolicy=Never", f"watchNamespace={NS}", "logFormat=text",
                f"prometheus.url={self.prometheus_url}", f"insecureRegistries={{{REGISTRY}}}"]
        run([os.path.join(BIN, "helm"), "upgrade", "--install", "prism", os.path.join(ROOT, "charts", "prism"),
             "--kubeconfig", KUBECONFIG, "--namespace", OP_NS, "--create-namespace",
             *sum((["--set", x] for x in sets), [])], timeout=180)
        log(f"operator: helm upgrade --install prism charts/prism -n {OP_NS} --set {','.join(sets)}")
        kubectl("-n", OP_NS, "rollout", "status", "deploy/prism", "--timeout=120s", timeout=130)
        pod = kjson("-n", OP_NS, "get", "pods", "-l", "app.kubernetes.io/name=prism-operator")["items"]
        log(f"operator Deployment ready: pod {pod[0]['metadata']['name'] if pod else '?'} "
            f"({pod[0]['spec']['containers'][0]['image'] if pod else '?'})")

    def restart(self):
        """What a user does to an operator: `kubectl rollout restart` (the new pod takes the
        Lease when the old one lets it go), or a new process."""
        if self.mode == "process":
            self.stop()
            self.start()
            return
        kubectl("-n", OP_NS, "rollout", "restart", "deploy/prism")
        kubectl("-n", OP_NS, "rollout", "status", "deploy/prism", "--timeout=120s", timeout=130)

    def stop(self):
        if self.mode == "process":
            if self.proc and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            return
        out = kubectl("-n", OP_NS, "logs", "deploy/prism", "--tail=-1", check_rc=False, timeout=30)
        with open(os.path.join(LOGS, "operator.log"), "w") as f:
            f.write(ANSI.sub("", out))


class SliceWatch:
    """`kubectl get --raw .../endpointslices?watch=true` for the node's Service: every event with
    its arrival time, as {pod IP: ready} of the Service's slices."""

    def __init__(self):
        q = urllib.parse.urlencode({"watch": "true", "labelSelector": f"kubernetes.io/service-name={NODE}"})
        self.proc = subprocess.Popen([os.path.join(BIN, "kubectl"), "--kubeconfig", KUBECONFIG, "get", "--raw",
                                      f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices?{q}"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.slices = {}
        self.events = []  # (time, {ip: ready})
        self.lock = threading.Lock()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            t = now()
            obj = ev.get("object", {})
            name = obj.get("metadata", {}).get("name")
            if ev.get("type") == "DELETED":
                self.slices.pop(name, None)
            else:
                self.slices[name] = {a: bool(e.get("conditions", {}).get("ready"))
                                     for e in obj.get("endpoints") or [] for a in e.get("addresses", [])}
            merged = {}
            for s in self.slices.values():
                merged.update(s)
            with self.lock:
                self.events.append((t, merged))

    def first(self, since, pred):
        with self.lock:
            return next((t for t, m in self.events if t >= since and pred(m)), None)

    def latest(self):
        with self.lock:
            return self.events[-1][1] if self.events else {}

    def stop(self):
        self.proc.kill()
        self.proc.wait()


def embeddings_request(i, n):
    return "/v1/embeddings", {"input": [f"cluster failover request {n} from client {i}: a dog runs in the snow"]}


def embeddings_ok(body):
    """What the load keeps of an answer; falsy: the answer is wrong."""
    return len(body["data"][0]["embedding"]) > 0


class Load:
    """Closed-loop clients (POST /v1/embeddings unless told otherwise); bounded by time (stop())
    and by max_requests per client. Records (start, end, ok, detail) and, for each good answer,
    (start, what `ok` kept of it)."""

    def __init__(self, api, clients, max_requests, request=embeddings_request, ok=embeddings_ok):
        self.api, self.clients, self.max_requests = api, clients, max_requests
        self.request, self.ok = request, ok
        self.records = []
        self.answers = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def start(self):
        for t in self._threads:
            t.start()
        return self

    def _run(self, i):
        c = self.api.client(timeout=30)
        for n in range(self.max_requests):
            if self._stop.is_set():
                break
            path, body = self.request(i, n)
            t0 = now()
            try:
                st, raw = c.request("POST", path, json.dumps(body))
                kept = self.ok(json.loads(raw)) if st == 200 else None
                if kept:
                    rec = (True, "")
                    self.answers.append((t0, kept))
                else:
                    rec = (False, f"HTTP {st}: {raw[:200]!r}")
            except Exception as e:  # noqa: BLE001 - any client-side error is a failed request
                rec = (False, f"{type(e).__name__}: {e}")
            self.records.append((t0, now(), *rec))
        c.close()

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(40)

    def failed(self):
        return [r for r in self.records if not r[2]]


def ctr_task_pid(container_id):
    out = run([os.path.join(BIN, "ctr"), "--address", os.path.join(D, "containerd", "containerd.sock"), "-n",
               "k8s.io", "tasks", "ls"])
    for line in out.splitlines()[1:]:
        f = line.split()
        if len(f) >= 3 and f[0] == container_id and f[2] == "RUNNING":
            return int(f[1])
    raise Failed(f"container {container_id} not RUNNING in `ctr -n k8s.io tasks ls`:\n{out}")


RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted", "pod-security.kubernetes.io/enforce-version": "latest"}


def refuses_privileged_pods():
    """Control for the restricted namespace: a root, privileged pod is refused at admission, so the
    pods that do run were admitted under `restricted`."""
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "psa-control", "namespace": NS},
           "spec": {"containers": [{"name": "c", "image": "ghcr.io/prism-dev/prism-node:0.1.0",
                                    "securityContext": {"privileged": True, "runAsUser": 0}}]}}
    r = subprocess.run([os.path.join(BIN, "kubectl"), "--kubeconfig", KUBECONFIG, "apply", "-f", "-"],
                       input=json.dumps(bad), capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    check(r.returncode != 0 and "violates PodSecurity" in out and "restricted" in out,
          f"a privileged root pod was not refused by restricted Pod Security admission: {out[-500:]}")


def runs_as_uid(pod, want=65532):
    """The pod's container process, as the kernel sees it (host /proc), runs as `want`: the kubelet
    applied runAsNonRoot / runAsUser with the real runtime, not just the API's admission."""
    cid = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    pid = ctr_task_pid(cid)
    with open(f"/proc/{pid}/status") as f:
        uids = next(l.split()[1:] for l in f if l.startswith("Uid:"))
    check(all(u == str(want) for u in uids), f"pod {pod['metadata']['name']}: process {pid} uids {uids}, want {want}")
    return pid


def router_ejection_ms(endpoint, wall_kill):
    """ms from the kill to the router's first `replica ejected` log line for endpoint (its
    passive outlier ejection on failed calls, before any table rewrite), from the pod's log."""
    out = kubectl("-n", NS, "logs", "-l", f"prism.dev/pipeline={PIPELINE}", "--tail=-1", check_rc=False)
    import datetime
    for line in ANSI.sub("", out).splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z .*replica ejected.*endpoint=(\S+)", line)
        if m and m.group(2).strip('"') == endpoint:
            ts = datetime.datetime.strptime(m.group(1)[:26], "%Y-%m-%dT%H:%M:%S.%f")
            t = ts.replace(tzinfo=datetime.timezone.utc).timestamp()
            if t >= wall_kill - 0.001:
                return (t - wall_kill) * 1e3
    return None


def router_pods(pipeline):
    return [p for p in kjson("-n", NS, "get", "pods", "-l", f"prism.dev/pipeline={pipeline}")["items"]
            if p["metadata"].get("deletionTimestamp") is None]


def node_pod_state():
    return {p["metadata"]["uid"]: p["status"]["containerStatuses"][0]["restartCount"] for p in node_pods()
            if p["metadata"].get("deletionTimestamp") is None}


def restarts_under_load(api, op, args):
    """Issue 21: restart the operator, then the router, under load. Requests must keep being
    answered: none may fail while the operator restarts (the data plane does not go through
    it) and its successor must leave the serving pods alone; the router's rolling restart
    (the successor Ready first, the old pod answering through its --shutdown-delay-s) is
    reported with its failed requests."""
    pods0 = node_pod_state()
    routers0 = {p["metadata"]["name"] for p in router_pods(PIPELINE)}
    load = Load(api, args.clients, args.max_requests).start()
    try:
        time.sleep(2)
        t_op = now()
        op.restart()
        log(f"operator restarted ({args.operator}) in {now() - t_op:.1f}s under load")
        time.sleep(3)  # the new operator's first reconcile passes run under load too
        t_rt = now()
        kubectl("-n", NS, "rollout", "restart", f"deploy/{PIPELINE}-router")
        kubectl("-n", NS, "rollout", "status", f"deploy/{PIPELINE}-router", "--timeout=180s", timeout=190)
        wait("the old router pods gone", 60,
             lambda: not routers0 & {p["metadata"]["name"] for p in kjson(
                 "-n", NS, "get", "pods", "-l", f"prism.dev/pipeline={PIPELINE}")["items"]}, interval=0.2)
        t_done = now()
        log(f"router: kubectl rollout restart deploy/{PIPELINE}-router done in {t_done - t_rt:.1f}s "
            f"(old pods {sorted(routers0)} gone)")
        time.sleep(3)
    finally:
        load.stop()
    recs = list(load.records)
    during_op = [r for r in recs if t_op <= r[0] < t_rt]
    during_rt = [r for r in recs if t_rt <= r[0] < t_done]
    after = [r for r in recs if r[0] >= t_done]
    op_failed = [r for r in during_op if not r[2]]
    rt_failed = [r for r in during_rt if not r[2]]
    log(f"operator restart: {len(during_op)} requests, {len(op_failed)} failed; router restart: "
        f"{len(during_rt)} requests, {len(rt_failed)} failed; after it: {len(after)} requests, "
        f"{sum(1 for r in after if not r[2])} failed")
    for t0, _, _, detail in (op_failed + rt_failed)[:5]:
        log(f"  failed at {t0 - t_rt:+.3f}s from the router restart: {detail}")
    check(not op_failed, f"{len(op_failed)} of {len(during_op)} requests failed while the operator restarted")
    check(node_pod_state() == pods0, f"the restarted operator touched the node pods: {pods0} -> {node_pod_state()}")
    check(any(r[2] for r in during_rt), "no request was answered during the router's rolling restart")
    check(after and all(r[2] for r in after), "requests failed after the router's rolling restart")
    return {"operator_restart_failed": len(op_failed), "router_restart_failed": len(rt_failed),
            "restart_requests": len(during_op) + len(during_rt)}


def optional_modality_degrades(token, args):
    """Issue 21: kill -9 the only pod's container of an optional modality under load: every
    request is still answered, for text, marked `degraded: {missing: [vision]}`, and whole
    answers return once the kubelet restarted the container."""
    kubectl("-n", NS, "create", "secret", "generic", f"{VISION_PIPELINE}-router-tokens", f"--from-literal=tokens={token}")
    t_apply = now()
    kubectl("-n", NS, "apply", "-f", VISION_EXAMPLE)
    log(f"applied {os.path.relpath(VISION_EXAMPLE, ROOT)} (ModalityNode vision pvc://models/{VISION_MODEL}, "
        f"pipeline {VISION_PIPELINE}: text required, vision optional)")

    pod = wait_only_pod_ready("vision", "vision pod Ready")
    wait_pipeline_ready(VISION_PIPELINE)
    api = Api.of_pipeline(VISION_PIPELINE, token)
    vep = f"http://{pod['status']['podIP']}:8080"

    def vision_listed():
        try:
            st, raw = api.client(5).request("GET", "/v1/routing-table")
        except OSError as e:
            raise Failed(f"GET /v1/routing-table: {e}")
        return st == 200 and vep in table_ready_endpoints(raw)[1]
    wait(f"{VISION_PIPELINE} router lists {vep} ready", 120, vision_listed)
    log(f"vision pod Ready, {VISION_PIPELINE} router Ready {now() - t_apply:.1f}s after apply")

    img = sorted(f for f in os.listdir(os.path.join(ROOT, ".cache", "models", VISION_MODEL, "samples"))
                 if f.endswith(".png"))[0]
    with open(os.path.join(ROOT, ".cache", "models", VISION_MODEL, "samples", img), "rb") as f:
        image = {"image_base64": __import__("base64").b64encode(f.read()).decode()}

    def request(i, n):
        return "/v1/infer", {"inputs": {"text": f"handwritten digit {n} from client {i}", "vision": image}}

    def answer(body):
        """(modalities answered, modalities missing); falsy when text, the required one, is absent."""
        mods = sorted(body.get("modalities", {}))
        return "text" in mods and (mods, sorted((body.get("degraded") or {}).get("missing", [])))
    path, body = request(0, 0)
    st, raw = api.client(60).request("POST", path, json.dumps(body))
    check(st == 200, f"/v1/infer text+vision: HTTP {st}: {raw[:300]!r}")
    whole = answer(json.loads(raw))
    check(whole == (["text", "vision"], []), f"/v1/infer text+vision before the kill: {whole} ({raw[:300]!r})")

    restarts0 = pod["status"]["containerStatuses"][0]["restartCount"]
    cid = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    load = Load(api, 2, args.max_requests, request=request, ok=answer).start()
    try:
        time.sleep(3)
        pid = ctr_task_pid(cid)
        t_kill = now()
        os.kill(pid, signal.SIGKILL)
        log(f"kill -9 {pid} (prism-node of the only vision pod {pod['metadata']['name']}) under load")

        def back():
            p = kjson("-n", NS, "get", "pod", pod["metadata"]["name"])
            return p["status"]["containerStatuses"][0]["restartCount"] > restarts0 and pod_ready(p)
        wait("vision container restarted and Ready", args.rejoin_timeout_s, back, interval=0.5)
        t_pod = now()
        wait("a whole answer after the restart", 60,
             lambda: any(t >= t_pod and a[1] == [] for t, a in list(load.answers)), interval=0.2)
        t_whole = next(t for t, a in list(load.answers) if t >= t_pod and a[1] == [])
        time.sleep(2)
    finally:
        load.stop()
    recs, answers = list(load.records), list(load.answers)
    failed = load.failed()
    degraded = [(t, a) for t, a in answers if a[1]]
    log(f"optional vision down: {len(recs)} requests, {len(failed)} failed, {len(degraded)} answered "
        f"degraded{' (missing ' + str(degraded[0][1][1]) + f', the first sent {(degraded[0][0] - t_kill) * 1e3:+.0f} ms from the kill)' if degraded else ''}; "
        f"pod Ready again {t_pod - t_kill:.1f}s, whole answers again {t_whole - t_kill:.1f}s after the kill")
    for t0, _, _, detail in failed[:5]:
        log(f"  failed at {t0 - t_kill:+.3f}s: {detail}")
    check(not failed, f"{len(failed)} of {len(recs)} requests failed while the optional modality was down")
    check(degraded, "no answer said degraded while the only vision pod was down")
    check(all(a == (["text"], ["vision"]) for _, a in degraded),
          f"degraded answers must serve text and name vision missing: {sorted({str(a) for _, a in degraded})}")
    late = [a for t, a in answers if t >= t_whole + 0.5]
    check(late and all(a == (["text", "vision"], []) for a in late),
          f"answers after the restart must be whole: {sorted({str(a) for a in late})}")
    return {"optional_down_degraded": len(degraded), "optional_down_requests": len(recs),
            "whole_again_s": t_whole - t_kill}


class Prometheus:
    """A real Prometheus inside the netns, listening on the node's address (which the operator's
    pod reaches), scraping the pods the chart's PodMonitor selects: managed-by=prism, component
    modality-node or router, container port `http`, HTTPS for spec.tls pods, with namespace and
    pod labels. Debian's prometheus is built without kubernetes_sd, so a thread here lists those
    pods from the API server every second and hands them to Prometheus through file_sd (what
    the prometheus-operator does from a PodMonitor)."""

    def __init__(self):
        node = kjson("get", "nodes")["items"][0]
        ip = next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")
        self.url = f"http://{ip}:9090"
        self.proc = None
        self._stop = threading.Event()

    def targets(self):
        """Target groups of the PodMonitor's selector, from the API server."""
        pods = kjson("-n", NS, "get", "pods", "-l", "app.kubernetes.io/managed-by=prism")["items"]
        groups = []
        for p in pods:
            meta, st = p["metadata"], p.get("status", {})
            if meta.get("labels", {}).get("app.kubernetes.io/component") not in ("modality-node", "router"):
                continue
            ports = [pt["containerPort"] for c in p["spec"]["containers"] for pt in c.get("ports", [])
                     if pt.get("name") == "http"]
            if not ports or not st.get("podIP") or st.get("phase") != "Running":
                continue
            scheme = "https" if meta.get("annotations", {}).get("prism.dev/scheme") == "https" else "http"
            groups.append({"targets": [f"{st['podIP']}:{ports[0]}"],
                           "labels": {"namespace": meta["namespace"], "pod": meta["name"], "__scheme__": scheme}})
        return groups

    def _discover(self, path):
        while not self._stop.wait(1.0):
            try:
                groups = self.targets()
            except Failed:
                continue  # an API hiccup: keep the last targets
            with open(path + ".tmp", "w") as f:
                json.dump(groups, f)
            os.replace(path + ".tmp", path)

    def start(self):
        data = os.path.join(D, "prometheus")
        shutil.rmtree(data, ignore_errors=True)
        os.makedirs(data)
        targets = os.path.join(data, "targets.json")
        with open(targets, "w") as f:
            json.dump(self.targets(), f)
        job = {"job_name": "prism-pods", "scrape_interval": "1s", "scrape_timeout": "1s",
               "tls_config": {"insecure_skip_verify": True},
               "file_sd_configs": [{"files": [targets], "refresh_interval": "1s"}]}
        cfg = os.path.join(data, "prometheus.yml")
        with open(cfg, "w") as f:
            json.dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": [job]}, f)
        self.log = open(os.path.join(LOGS, "prometheus.log"), "w")
        self.proc = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={data}",
                                      "--web.listen-address=0.0.0.0:9090"], stdout=self.log, stderr=subprocess.STDOUT)
        threading.Thread(target=self._discover, args=(targets,), daemon=True).start()

        def ready():
            if self.proc.poll() is not None:
                raise Failed(f"prometheus exited {self.proc.returncode}: see {LOGS}/prometheus.log")
            try:
                return urllib.request.urlopen(self.url + "/-/ready", timeout=2).status == 200
            except OSError:
                return False
        wait("Prometheus ready", 60, ready)
        log(f"Prometheus {self.url} (pid {self.proc.pid}): scrapes the PodMonitor's pods of {NS} every 1 s")

    def query(self, promql):
        q = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=5) as r:
            return json.load(r)["data"]["result"]

    def stop(self):
        self._stop.set()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


def autoscales_on_real_metrics(token, prom, args):
    """Issue 21: the builtin autoscaler scales a real Deployment on real metrics. A text node
    (1..2 replicas, targetInflight 1) gets 4 closed-loop clients through its router; Prometheus
    scrapes the pods; the operator must raise the Deployment to 2 and the second pod must turn
    Ready, with no request failing."""
    kubectl("-n", NS, "create", "secret", "generic", "text-auto-router-tokens", f"--from-literal=tokens={token}")
    kubectl("-n", NS, "apply", "-f", AUTO_EXAMPLE)
    log(f"applied {os.path.relpath(AUTO_EXAMPLE, ROOT)} (ModalityNode text-auto 1..2, builtin, targetInflight 1)")

    wait_only_pod_ready("text-auto", "text-auto pod Ready")
    wait_pipeline_ready("text-auto")
    wait("Prometheus has text-auto's series", 60,
         lambda: prom.query(f'prism_node_inflight{{node="text-auto",namespace="{NS}"}}'), interval=1)
    api = Api.of_pipeline("text-auto", token)
    load = Load(api, 4, args.max_requests).start()
    t0 = now()
    try:
        def deployment_replicas():
            return kjson("-n", NS, "get", "deploy", "text-auto")["spec"].get("replicas", 0) >= 2
        wait("the autoscaler raises Deployment text-auto to 2", 120, deployment_replicas, interval=0.5)
        t_decided = now()
        wait("2 text-auto pods Ready", 300, lambda: sum(map(pod_ready, live_pods("text-auto"))) == 2, interval=1)
        t_ready = now()
        time.sleep(2)
    finally:
        load.stop()
    mn = kjson("-n", NS, "get", "mn", "text-auto")
    conds = {c["type"]: c for c in mn.get("status", {}).get("conditions", [])}
    inflight = prom.query(f'avg(avg_over_time(prism_node_inflight{{node="text-auto",namespace="{NS}"}}[10s]))')
    failed = load.failed()
    log(f"autoscale on real metrics: Deployment text-auto 1 -> 2 {t_decided - t0:.1f}s after the load started, "
        f"second pod Ready {t_ready - t0:.1f}s; {len(load.records)} requests, {len(failed)} failed; "
        f"Prometheus avg inflight {inflight[0]['value'][1] if inflight else 'n/a'}; "
        f"MetricsUnavailable={conds.get('MetricsUnavailable', {}).get('status', 'absent')}")
    check(not failed, f"{len(failed)} of {len(load.records)} requests failed while text-auto scaled out: {failed[:3]}")
    check(conds.get("MetricsUnavailable", {}).get("status") != "True",
          f"text-auto reports MetricsUnavailable: {conds.get('MetricsUnavailable')}")
    kubectl("-n", NS, "delete", "-f", AUTO_EXAMPLE, "--wait=false")
    return {"autoscale_decided_s": t_decided - t0, "autoscale_ready_s": t_ready - t0}


def canary_rollouts_on_real_pods(token, prom, args):
    """spec.rollout on real pods: a new revision goes out as a canary Deployment beside stable,
    the router sends it its weight, Prometheus scrapes the router's per-revision figures, and the
    operator promotes it; then a revision whose model does not exist never turns Ready, serves
    nothing, and is rolled back at its progress deadline while stable keeps answering. Under
    load, no request may fail in either."""
    node = "text-canary"
    kubectl("-n", NS, "create", "secret", "generic", f"{node}-router-tokens", f"--from-literal=tokens={token}")
    kubectl("-n", NS, "apply", "-f", CANARY_EXAMPLE)
    log(f"applied {os.path.relpath(CANARY_EXAMPLE, ROOT)} (ModalityNode {node}, rollout 50% for 5 s, "
        f"minCalls 20, progressDeadline 30 s)")
    wait_only_pod_ready(node, f"{node} pod Ready")
    wait_pipeline_ready(node)

    def status():
        return kjson("-n", NS, "get", "mn", node).get("status", {})

    def recorded(revision, outcome):
        return any(r["revision"] == revision and r["outcome"] == outcome for r in status().get("history", []))

    wait(f"{node} revision 1 recorded", 60, lambda: recorded("1", "Deployed"))
    load = Load(Api.of_pipeline(node, token), 2, args.max_requests).start()
    try:
        time.sleep(2)
        t0 = now()
        kubectl("-n", NS, "patch", "mn", node, "--type=merge", "-p", '{"spec":{"model":{"revision":"2"}}}')
        wait("canary of revision 2 started", 60,
             lambda: (status().get("canary") or {}).get("revision") == "2", interval=0.5)
        wait(f"Deployment {node}-canary Ready", 120, lambda: any(
            pod_ready(p) for p in kjson("-n", NS, "get", "pods", "-l", f"prism.dev/node={node},prism.dev/track=canary")["items"]),
            interval=1)
        t_canary = now()
        wait("revision 2 promoted", 180, lambda: recorded("2", "Promoted"), interval=1)
        t_promoted = now()
        st = status()
        check(st.get("currentRevision") == "2" and not st.get("canary"), f"after the promotion: {st}")
        served = prom.query(f'sum(prism_router_upstream_duration_seconds_count{{node="{node}",namespace="{NS}",revision="2"}})')
        served_2 = float(served[0]["value"][1]) if served else 0.0

        kubectl("-n", NS, "patch", "mn", node, "--type=merge", "-p",
                '{"spec":{"model":{"uri":"pvc://models/no-such-model","revision":"3"}}}')
        wait("canary of revision 3 started", 60,
             lambda: (status().get("canary") or {}).get("revision") == "3", interval=0.5)
        t_bad = now()
        wait("revision 3 rolled back", 180, lambda: recorded("3", "RolledBack"), interval=1)
        t_rolled = now()
        wait(f"Deployment {node}-canary deleted", 60, lambda: not kubectl(
            "-n", NS, "get", "deploy", f"{node}-canary", "--ignore-not-found", "-o", "name").strip(), interval=1)
        time.sleep(2)
    finally:
        load.stop()
    st = status()
    reason = next((r["reason"] for r in reversed(st.get("history", [])) if r["revision"] == "3"), "")
    failed = load.failed()
    events = kubectl("-n", NS, "get", "events", "--field-selector", f"involvedObject.name={node},involvedObject.kind=ModalityNode",
                     "-o", "jsonpath={.items[*].reason}").split()
    log(f"canary on real pods: revision 2 canary Ready {t_canary - t0:.1f}s after the patch, promoted "
        f"{t_promoted - t0:.1f}s after it ({served_2:.0f} calls served by revision 2, from Prometheus); revision 3 "
        f"(missing model) rolled back {t_rolled - t_bad:.1f}s after its canary started: {reason!r}; "
        f"{len(load.records)} requests, {len(failed)} failed; events {sorted(set(events))}")
    check(served_2 > 0, "Prometheus shows no call served by revision 2")
    check(st.get("currentRevision") == "2", f"stable after the rollback is {st.get('currentRevision')}, want 2")
    check(not failed, f"{len(failed)} of {len(load.records)} requests failed during the rollouts: {failed[:3]}")
    for want in ("CanaryStarted", "Promoted", "RolledBack"):
        check(want in events, f"no {want} Event on mn/{node}: {events}")
    kubectl("-n", NS, "delete", "-f", CANARY_EXAMPLE, "--wait=false")
    return {"canary_promoted_s": t_promoted - t0, "canary_rolled_back_s": t_rolled - t_bad}


def start_registry():
    """go-containerregistry's registry as a Deployment + Service (ClusterIP REGISTRY) in the
    restricted namespace: where a user keeps models as OCI artifacts."""
    ip, port = REGISTRY_IP.split(":")
    sc = {"runAsNonRoot": True, "runAsUser": 65532, "allowPrivilegeEscalation": False,
          "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    objs = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "registry", "namespace": NS},
         "spec": {"clusterIP": ip, "selector": {"app": "registry"}, "ports": [{"port": int(port), "targetPort": 5000}]}},
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "registry", "namespace": NS},
         "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "registry"}},
                  "template": {"metadata": {"labels": {"app": "registry"}},
                               "spec": {"containers": [{"name": "registry", "image": REGISTRY_IMAGE,
                                                        "imagePullPolicy": "Never", "securityContext": sc,
                                                        "ports": [{"containerPort": 5000}],
                                                        "readinessProbe": {"httpGet": {"path": "/v2/", "port": 5000}}}]}}}},
    ]
    kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))


def cluster_dns_resolves_services_and_pod_hostnames():
    """Issue 21 item 2: CoreDNS (up.sh) answers pods for a Service's name and for a pod behind a
    headless Service by its hostname, the name a training Job's workers find worker 0 by (the
    operator's rendezvous Service: headless, publishNotReadyAddresses, pods `<job>-<i>` in
    subdomain `<job>`). The probe pod is its own target, in the restricted namespace."""
    sc = {"runAsNonRoot": True, "runAsUser": 65532, "allowPrivilegeEscalation": False,
          "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
    fqdn = f"w-0.rdzv.{NS}.svc.cluster.local"
    registry_fqdn = f"registry.{NS}.svc.cluster.local"
    script = (f"for i in $(seq 60); do nslookup {fqdn} >/dev/null 2>&1 && break; sleep 1; done; "
              f"echo '== {registry_fqdn}'; nslookup {registry_fqdn}; echo '== {fqdn}'; nslookup {fqdn}")
    objs = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "rdzv", "namespace": NS},
         "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": {"app": "rdzv"},
                  "ports": [{"name": "rendezvous", "port": 29500}]}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "dns-probe", "namespace": NS, "labels": {"app": "rdzv"}},
         "spec": {"hostname": "w-0", "subdomain": "rdzv", "restartPolicy": "Never",
                  "containers": [{"name": "probe", "image": BUSYBOX_IMAGE, "imagePullPolicy": "Never",
                                  "securityContext": sc, "command": ["/bin/sh", "-c", script]}]}},
    ]
    t0 = now()
    kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}))
    pod = wait("dns-probe finished", 120, lambda: (lambda p: p if p.get("status", {}).get("phase") in
               ("Succeeded", "Failed") else None)(kjson("-n", NS, "get", "pod", "dns-probe")), interval=1)
    out = kubectl("-n", NS, "logs", "dns-probe", check_rc=False)
    answers = {}
    for block in out.split("== ")[1:]:
        name, _, rest = block.partition("\n")
        # busybox prints the server's own address first ("Address: 10.250.0.1:53"), then answers.
        answers[name.strip()] = re.findall(r"Address(?: \d+)?:\s*([0-9.]+)\s*$", rest, re.M)
    registry_ip = REGISTRY_IP.split(":")[0]
    pod_ip = pod["status"].get("podIP")
    check(registry_ip in answers.get(registry_fqdn, []),
          f"{registry_fqdn} did not resolve to the Service's ClusterIP {registry_ip}: {out[-800:]}")
    check(pod_ip and pod_ip in answers.get(fqdn, []), f"{fqdn} did not resolve to the pod's IP {pod_ip}: {out[-800:]}")
    kubectl("-n", NS, "delete", "pod/dns-probe", "service/rdzv", "--wait=false")
    log(f"cluster DNS: {registry_fqdn} -> {registry_ip}, {fqdn} -> {pod_ip} (headless rendezvous) "
        f"in {now() - t0:.1f}s from a pod")
    return {"dns_s": now() - t0}


def push_model(folder, repo, tag):
    """Pushes a model folder's files to the in-cluster registry as one OCI artifact, a layer
    per file named by its org.opencontainers.image.title annotation (the layout of `oras push`).
    Returns the manifest digest."""
    import hashlib
    base = f"http://{REGISTRY_IP}"

    def blob(data):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        req = urllib.request.Request(f"{base}/v2/{repo}/blobs/uploads/", method="POST", data=b"")
        with urllib.request.urlopen(req, timeout=30) as r:
            loc = urllib.parse.urljoin(base, r.headers["Location"])
        sep = "&" if "?" in loc else "?"
        req = urllib.request.Request(f"{loc}{sep}digest={digest}", method="PUT", data=data,
                                     headers={"content-type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=120) as r:
            check(r.status == 201, f"blob upload {digest}: HTTP {r.status}")
        return {"digest": digest, "size": len(data)}

    layers = []
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        with open(os.path.join(folder, name), "rb") as f:
            layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", **blob(f.read()),
                           "annotations": {"org.opencontainers.image.title": name}})
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "artifactType": "application/vnd.prism.model.v1",
                           "config": {"mediaType": "application/vnd.oci.empty.v1+json", **blob(b"{}")},
                           "layers": layers}).encode()
    req = urllib.request.Request(f"{base}/v2/{repo}/manifests/{tag}", method="PUT", data=manifest,
                                 headers={"content-type": "application/vnd.oci.image.manifest.v1+json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        check(r.status == 201, f"manifest {repo}:{tag}: HTTP {r.status}")
        return r.headers.get("Docker-Content-Digest")


def oci_model_from_the_cluster_registry(token, ref):
    """Issue 21 item 3: oci:// models come from an OCI registry running in the cluster, pulled
    by the fetch init container (plain HTTP, because the operator was installed with the
    registry in insecureRegistries), and serve what prism up serves."""
    wait("registry pod Ready", 120, lambda: any(pod_ready(p) for p in
         kjson("-n", NS, "get", "pods", "-l", "app=registry")["items"]), interval=1)
    t0 = now()
    digest = push_model(os.path.join(ROOT, ".cache", "models", MODEL), f"models/{MODEL}", "v1")
    log(f"pushed {MODEL} to the in-cluster registry as {OCI_MODEL} ({digest}) in {now() - t0:.1f}s")
    kubectl("-n", NS, "create", "secret", "generic", "text-oci-router-tokens", f"--from-literal=tokens={token}")
    node = {"apiVersion": "prism.dev/v1alpha1", "kind": "ModalityNode", "metadata": {"name": "text-oci", "namespace": NS},
            "spec": {"modality": "text", "model": {"uri": OCI_MODEL, "architecture": "bert", "revision": "1"},
                     "replicas": {"min": 1, "max": 1}, "autoscaling": {"mode": "external"}, "device": "cpu",
                     "resources": {"cpu": "100m", "memory": "512Mi"}}}
    pipe = {"apiVersion": "prism.dev/v1alpha1", "kind": "MultimodalPipeline", "metadata": {"name": "text-oci", "namespace": NS},
            "spec": {"nodes": [{"name": "text-oci", "required": True}], "fusion": {"strategy": "weighted"}}}
    t_apply = now()
    kubectl("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": [node, pipe]}))

    pod = wait_only_pod_ready("text-oci", "text-oci pod Ready (model pulled by its fetch init container)")
    init = pod["status"].get("initContainerStatuses", [{}])[0]
    check(init.get("state", {}).get("terminated", {}).get("exitCode") == 0, f"fetch-model init container: {init}")
    fetch_log = kubectl("-n", NS, "logs", pod["metadata"]["name"], "-c", init["name"], check_rc=False)

    wait_pipeline_ready("text-oci")
    api = Api.of_pipeline("text-oci", token)
    st, raw = api.client(60).request("POST", "/v1/embeddings", json.dumps({"input": ref["texts"]}))
    check(st == 200, f"/v1/embeddings from the oci:// model: HTTP {st}: {raw[:300]!r}")
    got = [d["embedding"] for d in json.loads(raw)["data"]]
    cos_min = min(cos(a, b) for a, b in zip(got, ref["embeddings"]))
    check(len(got) == len(ref["texts"]) and cos_min >= 0.999, f"oci:// model embeddings vs prism up: cosine {cos_min}")
    log(f"oci:// model: fetch init container pulled {MODEL} from {REGISTRY} "
        f"({fetch_log.strip().splitlines()[-1][:120] if fetch_log.strip() else 'no log'}); pod Ready "
        f"{now() - t_apply:.1f}s after apply; embeddings cosine >= {cos_min:.6f} vs prism up")
    kubectl("-n", NS, "delete", "mn,mmp", "text-oci", "--wait=false")
    return {"oci_cos_min": cos_min}


def make_node_pki(dirpath, cidr):
    """A CA and a node certificate naming every address of the node's pod CIDR (what a user does
    with openssl or cert-manager, as examples/real-cluster/text-tls-pipeline.yaml shows)."""
    import ipaddress
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    sans = ",".join(f"IP:{h}" for h in ipaddress.ip_network(cidr).hosts())
    with open(os.path.join(dirpath, "ext"), "w") as f:
        f.write(f"subjectAltName={sans}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    for cmd in (["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=prism e2e CA"],
                ["req", *ec, "-keyout", "tls.key", "-out", "tls.csr", "-subj", "/CN=text-tls"],
                ["x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", "tls.crt", "-days", "1", "-extfile", "ext"]):
        run(["openssl", *cmd], cwd=dirpath)


def tls_between_router_and_nodes(token, ref):
    """Issue 21: spec.tls on real pods. The node serves HTTPS only (its readiness probe too), the
    router's table holds its https:// endpoint and verifies the certificate against the Secret's
    CA, embeddings through the router equal prism up's, and plain HTTP to the pod gets no answer."""
    cidr = kjson("get", "nodes")["items"][0]["spec"]["podCIDR"]
    with tempfile.TemporaryDirectory(prefix="prism-e2e-tls-") as pki:
        make_node_pki(pki, cidr)
        kubectl("-n", NS, "create", "secret", "generic", "text-tls",
                *(f"--from-file={os.path.join(pki, n)}" for n in ("tls.crt", "tls.key", "ca.crt")))
    kubectl("-n", NS, "create", "secret", "generic", "text-tls-router-tokens", f"--from-literal=tokens={token}")
    t_apply = now()
    kubectl("-n", NS, "apply", "-f", TLS_EXAMPLE)
    log(f"applied {os.path.relpath(TLS_EXAMPLE, ROOT)} (ModalityNode text-tls, spec.tls: certificate for every "
        f"address of {cidr}; pipeline text-tls)")

    pod = wait_only_pod_ready("text-tls", "text-tls pod Ready (HTTPS readiness probe)")
    probe = pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    check(probe.get("scheme") == "HTTPS", f"text-tls readinessProbe {probe}")

    wait_pipeline_ready("text-tls")
    api = Api.of_pipeline("text-tls", token)
    ip = pod["status"]["podIP"]

    def https_listed():
        st, raw = api.client(5).request("GET", "/v1/routing-table")
        return st == 200 and f"https://{ip}:8080" in table_ready_endpoints(raw)[1]
    wait(f"text-tls router lists https://{ip}:8080 ready", 120, https_listed)
    st, raw = api.client(60).request("POST", "/v1/embeddings", json.dumps({"input": ref["texts"]}))
    check(st == 200, f"/v1/embeddings over TLS: HTTP {st}: {raw[:300]!r}")
    got = [d["embedding"] for d in json.loads(raw)["data"]]
    cos_min = min(cos(a, b) for a, b in zip(got, ref["embeddings"]))
    check(len(got) == len(ref["texts"]) and cos_min >= 0.999, f"TLS embeddings vs prism up: cosine {cos_min}")
    try:
        st, _ = pu.KeepAlive(f"http://{ip}:8080", 5).request("GET", "/ready")
        why = f"HTTP {st}"
    except (OSError, http.client.HTTPException) as e:
        st, why = None, type(e).__name__
    check(st != 200, "plain HTTP to the TLS node answered /ready 200: the node must serve HTTPS only")
    log(f"spec.tls: router -> https://{ip}:8080 verified against the Secret's CA; {len(got)} embeddings "
        f"cosine >= {cos_min:.6f} vs prism up; plain HTTP refused ({why}); {now() - t_apply:.1f}s from apply")
    kubectl("-n", NS, "delete", "-f", TLS_EXAMPLE, "--wait=false")
    return {"tls_cos_min": cos_min}


# Each broken ModalityNode, and the Ready reason (plus text in its message) the operator must
# report for it, from what the real kubelet and runtime say about its pod.
BAD_NODES = [
    # Pods use imagePullPolicy Never here: a missing image is ErrImageNeverPull, and no pull is
    # ever attempted (no registry exists inside the test's network namespace).
    ("bad-image", {"image": "prism.local/e2e/no-such-image:1"}, "ErrImageNeverPull", "no-such-image"),
    ("bad-model", {"model": {"uri": "pvc://models/no-such-model", "architecture": "bert", "revision": "1"}},
     "CrashLoopBackOff", "no-such-model does not exist"),
    ("too-small", {"resources": {"cpu": "100m", "memory": "24Mi"}}, "OOMKilled", "spec.resources.memory"),
    # More CPU than the one-node cluster has left: the scheduler's reason.
    ("too-big", {"resources": {"cpu": "64", "memory": "512Mi"}}, "Unschedulable", "Insufficient cpu"),
]


def bad_inputs_name_their_cause():
    """Issue 21 item 6: an image that does not exist, a model URI that does not resolve, a
    container that is OOM-killed, a pod no node can take: the ModalityNode's Ready condition
    names the cause."""
    t0 = now()
    for name, patch, _, _ in BAD_NODES:
        spec = {"modality": "text", "model": {"uri": f"pvc://models/{MODEL}", "architecture": "bert", "revision": "1"},
                "replicas": {"min": 1, "max": 1, "desired": 1}, "autoscaling": {"mode": "external"}, "device": "cpu",
                # Small requests: the two text replicas, the router and the operator already hold
                # most of this 2-core node.
                "resources": {"cpu": "100m", "memory": "512Mi"}}
        spec.update(patch)
        kubectl("-n", NS, "apply", "-f", "-", stdin=json.dumps(
            {"apiVersion": "prism.dev/v1alpha1", "kind": "ModalityNode", "metadata": {"name": name}, "spec": spec}))
    log(f"applied broken nodes {', '.join(n for n, *_ in BAD_NODES)}")
    for name, _, reason, text in BAD_NODES:
        def named():
            conds = kjson("-n", NS, "get", "mn", name).get("status", {}).get("conditions", [])
            ready = next((c for c in conds if c["type"] == "Ready"), None)
            return ready if ready and ready["status"] == "False" and ready.get("reason") == reason else None
        ready = wait(f"mn/{name} Ready=False {reason}", 180, named, interval=1)
        check(text in ready.get("message", ""), f"mn/{name} {reason} message lacks {text!r}: {ready.get('message')}")
        log(f"mn/{name}: Ready=False {reason} after {now() - t0:.1f}s: {ready['message'][:200]}")
    for name, *_ in BAD_NODES:
        kubectl("-n", NS, "delete", "mn", name, "--wait=false")


def inside_main(args):
    with open(args.reference) as f:
        ref = json.load(f)
    prom = Prometheus()
    op = Operator(args.operator, prom.url)
    watch = load = None
    poll_stop = threading.Event()
    try:
        # --- cluster objects ---------------------------------------------------------------
        kubectl("apply", "--server-side", "-f", os.path.join(ROOT, "crds"))
        kubectl("wait", "--for=condition=Established", "crd/modalitynodes.prism.dev",
                "crd/multimodalpipelines.prism.dev", "--timeout=60s")
        kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=true", timeout=180)
        kubectl("delete", "pv", "prism-models", "--ignore-not-found", "--wait=true")
        kubectl("create", "namespace", NS)
        kubectl("label", "namespace", NS, *(f"{k}={v}" for k, v in RESTRICTED.items()))
        wait("default ServiceAccount", 60, lambda: kubectl("-n", NS, "get", "sa", "default", check_rc=False).strip())
        refuses_privileged_pods()
        start_registry()
        dns = cluster_dns_resolves_services_and_pod_hostnames()
        prom.start()
        log(f"namespace {NS}: Pod Security enforce=restricted (a privileged root pod is refused)")
        op.start()

        models = os.path.join(D, "models")
        for m in (MODEL, VISION_MODEL):
            if not os.path.isdir(os.path.join(models, m)):
                os.makedirs(models, exist_ok=True)
                src = os.path.join(ROOT, ".cache", "models", m)
                try:  # hard links: no 88 MB copy; the node only reads
                    shutil.copytree(src, os.path.join(models, m), copy_function=os.link)
                except OSError:
                    shutil.copytree(src, os.path.join(models, m))
        token = secrets.token_hex(32)
        kubectl("-n", NS, "create", "secret", "generic", f"{PIPELINE}-router-tokens", f"--from-literal=tokens={token}")
        with open(EXAMPLE) as f:
            manifest = f.read().replace("/srv/prism/models", models)
        t_apply = now()
        kubectl("-n", NS, "apply", "-f", "-", stdin=manifest)
        log(f"applied {os.path.relpath(EXAMPLE, ROOT)} (PV hostPath {os.path.relpath(models, ROOT)}, PVC models, "
            f"ModalityNode {NODE} x2 pvc://models/{MODEL}, pipeline {PIPELINE}) + Secret {PIPELINE}-router-tokens")

        # --- readiness ---------------------------------------------------------------------
        pvc = wait("PVC models Bound", 60, lambda: kjson("-n", NS, "get", "pvc", "models")["status"].get("phase") == "Bound")

        def two_ready():
            ps = [p for p in node_pods() if p["metadata"].get("deletionTimestamp") is None]
            return ps if len(ps) == 2 and all(pod_ready(p) for p in ps) else None
        pods = wait("2 text pods Ready", 300, two_ready, interval=1)
        log(f"2 text pods Ready {now() - t_apply:.1f}s after apply (PVC {'Bound' if pvc else '?'})")
        for p in pods:
            c = p["spec"]["containers"][0]
            rp = c.get("readinessProbe", {})
            check(rp.get("httpGet", {}).get("path") == "/ready", f"pod {p['metadata']['name']}: readinessProbe {rp}")
            vols = {v["name"]: v for v in p["spec"].get("volumes", [])}
            check(vols.get("model", {}).get("persistentVolumeClaim", {}).get("claimName") == "models",
                  f"pod {p['metadata']['name']}: model volume {vols.get('model')}")
            check(c.get("imagePullPolicy") in ("Never", "IfNotPresent"), f"imagePullPolicy {c.get('imagePullPolicy')}")
        log(f"pods use readinessProbe httpGet /ready (kubelet-run), model volume = PVC models, image {pods[0]['spec']['containers'][0]['image']}")
        pids = [runs_as_uid(p) for p in pods]
        log(f"node containers run as uid 65532 (the pods' runAsUser) under restricted Pod Security (host pids {pids})")

        wait_pipeline_ready(PIPELINE, 120)
        svc_ip = kjson("-n", NS, "get", "svc", f"{PIPELINE}-router")["spec"]["clusterIP"]
        api = Api(svc_ip, token)
        ips = {f"http://{p['status']['podIP']}:8080" for p in pods}

        def table_has_both():
            try:
                st, raw = api.client(5).request("GET", "/v1/routing-table")
            except OSError as e:
                raise Failed(f"GET /v1/routing-table: {e}")
            return st == 200 and ips <= table_ready_endpoints(raw)[1]
        wait(f"router table listing {sorted(ips)} ready", 120, table_has_both)
        log(f"pipeline Ready; router Service {svc_ip}:8080 lists both pods ready ({now() - t_apply:.1f}s after apply)")

        # --- correctness -------------------------------------------------------------------
        # one connection each: the router may close a connection after a 401
        st, raw = api.client(60).request("POST", "/v1/embeddings", json.dumps({"input": ref["texts"]}), auth=False)
        check(st == 401, f"/v1/embeddings without a token: HTTP {st} (want 401)")
        st, raw = api.client(60).request("POST", "/v1/embeddings", json.dumps({"input": ref["texts"]}))
        check(st == 200, f"/v1/embeddings: HTTP {st}: {raw[:300]!r}")
        got = [d["embedding"] for d in json.loads(raw)["data"]]
        check(len(got) == len(ref["texts"]), f"{len(got)} embeddings for {len(ref['texts'])} texts")
        coss = [cos(a, b) for a, b in zip(got, ref["embeddings"])]
        check(all(len(a) == len(b) for a, b in zip(got, ref["embeddings"])), "embedding dims differ from prism up")
        check(min(coss) >= 0.999, f"cosine vs prism up: {coss}")
        log(f"/v1/embeddings via Service (401 without token): {len(got)} vectors dim {len(got[0])}, "
            f"cosine vs prism up min {min(coss):.6f}")

        # --- failover ----------------------------------------------------------------------
        victim = pods[0]
        vname, vip = victim["metadata"]["name"], victim["status"]["podIP"]
        vep = f"http://{vip}:8080"
        restarts0 = victim["status"]["containerStatuses"][0]["restartCount"]
        cid = victim["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
        watch = SliceWatch()
        wait("EndpointSlice watch: both pods ready", 30, lambda: all(watch.latest().get(p["status"]["podIP"]) for p in pods),
             interval=0.1)
        table_log = []  # (time, generation, victim listed ready)

        def poll_table():
            pc = api.client(5)
            while not poll_stop.is_set():
                try:
                    st, raw = pc.request("GET", "/v1/routing-table")
                    if st == 200:
                        g, ready = table_ready_endpoints(raw)
                        table_log.append((now(), g, vep in ready))
                except Exception:  # noqa: BLE001 - the poller only observes
                    pass
                time.sleep(0.005)
        poller = threading.Thread(target=poll_table, daemon=True)
        poller.start()
        load = Load(api, args.clients, args.max_requests).start()
        log(f"load: {args.clients} clients on POST /v1/embeddings via {svc_ip}:8080, warm {args.warm_s}s")
        time.sleep(args.warm_s)
        pid = ctr_task_pid(cid)
        comm = open(f"/proc/{pid}/comm").read().strip()
        check(comm == "prism-node", f"host pid {pid} of container {cid[:12]} is {comm!r}")
        t_kill, wall_kill = now(), time.time()
        os.kill(pid, signal.SIGKILL)
        log(f"kill -9 {pid} (prism-node in pod {vname}, {vip}; container {cid[:12]} from ctr tasks ls)")

        def gone_from_table():
            return next((t for t, _, listed in list(table_log) if t >= t_kill and not listed), None)

        def gone_from_slice():
            return watch.first(t_kill, lambda m: not m.get(vip, False))
        t_rw = wait("router table drops the killed pod", 60, gone_from_table, interval=0.05)
        t_es = wait("EndpointSlice drops the killed pod", 60, gone_from_slice, interval=0.05)
        rewrite_ms, es_ms = (t_rw - t_kill) * 1e3, (t_es - t_kill) * 1e3
        log(f"router table without {vip}: {rewrite_ms:.0f} ms; EndpointSlice {vip} not ready: {es_ms:.0f} ms")

        def rejoined():
            p = kjson("-n", NS, "get", "pod", vname)
            cs = p["status"]["containerStatuses"][0]
            return cs["restartCount"] > restarts0 and pod_ready(p)
        wait(f"pod {vname} Ready again (container restarted)", args.rejoin_timeout_s, rejoined, interval=0.5)
        t_pod = now()
        t_back = wait("router table lists it ready again", 60,
                      lambda: next((t for t, _, listed in list(table_log) if t >= t_rw and listed), None), interval=0.05)
        t_es_back = wait("EndpointSlice lists it ready again", 60,
                         lambda: watch.first(t_es, lambda m: m.get(vip, False)), interval=0.05)
        log(f"rejoined: pod Ready {t_pod - t_kill:.1f}s, EndpointSlice ready {t_es_back - t_kill:.1f}s, "
            f"router table ready {t_back - t_kill:.1f}s after the kill")
        rest = args.after_s - (now() - t_kill)
        if rest > 0:
            time.sleep(rest)
        load.stop()
        poll_stop.set()
        poller.join(10)
        recs = list(load.records)
        failed = load.failed()
        after = [r for r in recs if t_kill <= r[0] < t_back]
        log(f"load: {len(recs)} requests, {len(failed)} failed; {len(after)} during kill -> rejoin "
            f"({sum(1 for r in after if not r[2])} failed); p99 {pu.pct([(r[1] - r[0]) * 1e3 for r in recs if r[2]], 99):.1f} ms")
        for t0, _, _, detail in failed[:5]:
            log(f"  failed at {t0 - t_kill:+.3f}s: {detail}")
        gens = sorted({g for _, g, _ in table_log})
        mets = ""
        try:
            st, raw = api.client(5).request("GET", "/metrics", auth=False)
            mets = " ".join(f"{m.group(1)}={m.group(2)}" for m in re.finditer(
                r"(?m)^(prism_router_(?:ejections_total|retries_total))\S*\s+(\S+)", raw.decode()))
        except OSError:
            pass
        log(f"router table generations seen: {gens[:1]}..{gens[-1:]}; router metrics: {mets or 'n/a'}")
        eject_ms = router_ejection_ms(vep, wall_kill)
        log(f"router's passive ejection of {vep} (its log): "
            + (f"{eject_ms:.0f} ms after the kill" if eject_ms is not None else "none logged"))
        line = (f"cluster-failover: rewrite_ms={rewrite_ms:.0f} endpointslice_ms={es_ms:.0f} "
                f"failed_requests={len(failed)} requests={len(recs)} "
                f"eject_ms={'na' if eject_ms is None else f'{eject_ms:.0f}'} rejoin_s={t_es_back - t_kill:.1f}")
        result = {"line": line, "rejoin_pod_s": t_pod - t_kill, "rejoin_table_s": t_back - t_kill,
                  "rejoin_slice_s": t_es_back - t_kill, "cos_min": min(coss), "clients": args.clients,
                  "warm_s": args.warm_s, "operator": args.operator, "after_s": args.after_s, "proxy_mode": os.environ.get("PRISM_REAL_PROXY_MODE", "nftables")}
        with open(os.path.join(LOGS, "result.json"), "w") as f:
            json.dump(result, f)
        check(not failed, f"{len(failed)} of {len(recs)} requests failed")
        check(len(recs) > 0, "no requests sent")
        restarts = restarts_under_load(api, op, args)
        optional = optional_modality_degrades(token, args)
        result.update(restarts, **dns, **optional, **oci_model_from_the_cluster_registry(token, ref),
                      **tls_between_router_and_nodes(token, ref),
                      **autoscales_on_real_metrics(token, prom, args),
                      **canary_rollouts_on_real_pods(token, prom, args))
        line += (f" operator_restart_failed={restarts['operator_restart_failed']}"
                 f" router_restart_failed={restarts['router_restart_failed']}"
                 f" restart_requests={restarts['restart_requests']}"
                 f" autoscale_decided_s={result['autoscale_decided_s']:.1f}"
                 f" autoscale_ready_s={result['autoscale_ready_s']:.1f}"
                 f" canary_promoted_s={result['canary_promoted_s']:.1f}"
                 f" canary_rolled_back_s={result['canary_rolled_back_s']:.1f}")
        result["line"] = line
        with open(os.path.join(LOGS, "result.json"), "w") as f:
            json.dump(result, f)
        if not args.skip_bad_inputs:
            bad_inputs_name_their_cause()
        print(line, flush=True)
        return 0
    except Failed as e:
        print(f"E2E-REAL FAILED: {e}", file=sys.stderr, flush=True)
        for cmd in (["-n", NS, "get", "pods,svc,endpointslices,pvc,mn,mmp", "-o", "wide"],
                    ["-n", NS, "describe", "pods"], ["-n", NS, "get", "events", "--sort-by=.lastTimestamp"]):
            print(kubectl(*cmd, check_rc=False, timeout=30)[-6000:], file=sys.stderr)
        print(f"operator log: {LOGS}/operator.log", file=sys.stderr)
        # Again after the dumps: CI shows only the tail of a failed run.
        print(f"E2E-REAL FAILED: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        poll_stop.set()
        if load:
            load._stop.set()  # bounded anyway (max requests); stop at once on a failed check
        if watch:
            watch.stop()
        for what, sel in (("router", "prism.dev/pipeline"), ("node", "prism.dev/node")):
            out = kubectl("-n", NS, "logs", "-l", sel, "--all-containers", "--prefix", "--tail=-1", check_rc=False)
            with open(os.path.join(LOGS, f"{what}-pods.log"), "w") as f:
                f.write(ANSI.sub("", out))
        op.stop()
        prom.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    ap.add_argument("--operator", choices=["deployment", "process"], default="deployment",
                    help="prism-operator as a Deployment from its image via the chart (default) or as a process")
    ap.add_argument("--keep", action="store_true", help="leave the cluster up (down.sh stops it)")
    ap.add_argument("--clients", type=int, default=4, help="load clients during the kill (default 4)")
    ap.add_argument("--warm-s", type=float, default=5, help="load before the kill (default 5)")
    ap.add_argument("--after-s", type=float, default=10,
                    help="load after the kill, at least until the pod rejoined (default 10)")
    ap.add_argument("--rejoin-timeout-s", type=float, default=120)
    ap.add_argument("--max-requests", type=int, default=20000, help="per client (default 20000)")
    ap.add_argument("--skip-bad-inputs", action="store_true",
                    help="skip the broken-node phase (conditions naming ErrImageNeverPull, CrashLoopBackOff, OOMKilled)")
    args = ap.parse_args()
    os.makedirs(LOGS, exist_ok=True)
    if args.inside:
        return inside_main(args)
    args.passthrough = [f"--operator={args.operator}", f"--clients={args.clients}", f"--warm-s={args.warm_s}", f"--after-s={args.after_s}",
                        f"--rejoin-timeout-s={args.rejoin_timeout_s}", f"--max-requests={args.max_requests}"]
    if args.skip_bad_inputs:
        args.passthrough.append("--skip-bad-inputs")
    return host_main(args)


if __name__ == "__main__":
    sys.exit(main())
