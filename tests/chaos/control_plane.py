"""Control-plane scenarios of `make chaos`, against the real control plane of `make cluster-up`
(etcd, kube-apiserver, controller-manager, scheduler; kwok nodes; e2e/README.md).

  operator-kill      a stream of spec changes (new model revisions on 3 ModalityNodes) while the
                     operator is SIGKILLed for 2 s and restarted: every change must reach its
                     Deployment (none lost), with no duplicate objects.
  apiserver-restart  kube-apiserver stopped for 4 s under load: a real router (watching its
                     routing table ConfigMap through the API) in front of a real prism-node keeps
                     answering; after the restart the router's watch and the operator resume.

Pods in the cluster are simulated (kwok): their IPs are fake and never contacted. The data-plane
traffic goes to a prism-node on loopback that the table written by this script points at.
"""
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request

from common import Clients, get, signal_checked, wait_until
from prism_up import MODELS_DIR, ROOT, TARGET, fail, log, now

E2E = os.path.join(ROOT, "e2e")
KUBECTL = os.path.join(E2E, "bin", "kubectl")
NODES = ["cp-a", "cp-b", "cp-c"]

PROMISES = {
    "operator-kill": "every spec change reaches its Deployment after the restart; no duplicates",
    "apiserver-restart": "no failed request while the API is down; watches resume after it",
}


def kubeconfig():
    return subprocess.run(["bash", "-c", f"source {E2E}/lib.sh && echo $PRISM_KUBECONFIG"], check=True,
                          capture_output=True, text=True).stdout.strip()


class Cluster:
    def __init__(self):
        self.kubeconfig = kubeconfig()
        if not os.path.exists(self.kubeconfig):
            fail(f"no control plane ({self.kubeconfig} missing): run `make cluster-up`")
        self.ns = f"chaos-{int(time.time())}"
        self.env = dict(os.environ, KUBECONFIG=self.kubeconfig)

    def kc(self, *args, stdin=None, check=True, ns=True):
        cmd = [KUBECTL, *(["-n", self.ns] if ns else []), *args]
        r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=self.env, timeout=60)
        if check and r.returncode != 0:
            fail(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
        return r

    def json(self, *args):
        r = self.kc(*args, "-o", "json", check=False)
        return json.loads(r.stdout) if r.returncode == 0 else None

    def fault(self, op):
        subprocess.run([os.path.join(E2E, "fault.sh"), op], check=True, env=self.env, timeout=180)

    def setup(self):
        self.kc("apply", "--server-side", "--force-conflicts", "-f", os.path.join(ROOT, "crds"), ns=False)
        self.kc("wait", "--for=condition=Established", "--timeout=60s", "crd/modalitynodes.prism.dev",
                "crd/multimodalpipelines.prism.dev", ns=False)
        self.kc("create", "namespace", self.ns, ns=False)

    def teardown(self):
        self.kc("delete", "namespace", self.ns, "--wait=false", check=False, ns=False)


class Operator:
    """prism-operator as a local process, restarted when it exits the way its Deployment's pod
    would be (an operator that loses its lease exits on purpose and relies on that restart)."""

    def __init__(self, cluster, identity, lease_s=3):
        self.cluster, self.identity, self.lease_s = cluster, identity, lease_s
        self.log_path = os.path.join(tempfile.gettempdir(), f"{cluster.ns}-{identity}.log")
        open(self.log_path, "w").close()
        self.restarts = -1
        self.stopping = False
        self.proc = None
        self._spawn()
        self.supervisor = threading.Thread(target=self._supervise, daemon=True)
        self.supervisor.start()

    def _spawn(self):
        self.restarts += 1
        self.proc = subprocess.Popen(
            [os.path.join(TARGET, "release", "prism-operator"), "--namespace", self.cluster.ns, "--lease-namespace",
             self.cluster.ns, "--identity", self.identity, "--lease-duration-s", str(self.lease_s), "--metrics-addr",
             "127.0.0.1:0", "--node-image", "prism-node:chaos", "--router-image", "prism-router:chaos"],
            stdout=open(self.log_path, "a"), stderr=subprocess.STDOUT, env=self.cluster.env)

    def _supervise(self):
        while not self.stopping:
            if self.proc.poll() is not None and not self.stopping:
                time.sleep(1)  # kubelet's first restart back-off is longer; 1 s keeps the run short
                if not self.stopping:
                    self._spawn()
            time.sleep(0.1)

    def leading(self):
        return "controllers running" in open(self.log_path).read()

    def kill9(self):
        """SIGKILL with no restart (the scenario starts the replacement itself)."""
        self.stopping = True
        signal_checked(self.proc.pid, signal.SIGKILL, "prism-operator")
        self.proc.wait()

    def stop(self):
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def node_yaml(name, revision):
    return (f"apiVersion: prism.dev/v1alpha1\nkind: ModalityNode\nmetadata: {{name: {name}}}\nspec:\n"
            f"  modality: text\n  model: {{uri: 'file:///models/{name}', architecture: bert, revision: '{revision}'}}\n"
            f"  device: cpu\n")


def deployed_revision(cluster, name):
    d = cluster.json("get", "deployment", name)
    if not d:
        return None
    return d["spec"]["template"]["metadata"].get("labels", {}).get("prism.dev/revision")


def operator_kill(cluster):
    log(f"--- operator-kill: {PROMISES['operator-kill']}")
    manifests = "".join(f"---\n{node_yaml(n, 'r0')}" for n in NODES)
    pipeline = ("apiVersion: prism.dev/v1alpha1\nkind: MultimodalPipeline\nmetadata: {name: cp}\nspec:\n  nodes:\n"
                + "".join(f"  - {{name: {n}}}\n" for n in NODES))
    op = Operator(cluster, "first")
    if wait_until(op.leading, 60) is None:
        fail(f"operator did not start leading (log: {op.log_path})")
    cluster.kc("apply", "-f", "-", stdin=manifests + "---\n" + pipeline)
    if wait_until(lambda: all(deployed_revision(cluster, n) == "r0" for n in NODES), 60) is None:
        fail("the first Deployments were not written")
    # The stream of changes: one new revision per node per round, through the kill and restart.
    sent, failed, last = 0, 0, {}
    t_end, killed_at, restarted_at = now() + 6, None, None
    second = None
    while now() < t_end:
        for n in NODES:
            rev = f"r{sent + 1}"
            r = cluster.kc("patch", "modalitynode", n, "--type", "merge", "-p",
                           json.dumps({"spec": {"model": {"revision": rev}}}), check=False)
            sent += 1
            if r.returncode == 0:
                last[n] = rev
            else:
                failed += 1
        if killed_at is None and now() > t_end - 5:
            op.kill9()
            killed_at = now()
            log("operator killed (SIGKILL)")
        if killed_at and restarted_at is None and now() > killed_at + 2:
            second = Operator(cluster, "second")
            restarted_at = now()
            log("operator restarted")
    if second is None:
        fail("the loop ended before the operator was restarted")
    rec = wait_until(lambda: all(deployed_revision(cluster, n) == last[n] for n in NODES), 60)
    lost = [n for n in NODES if deployed_revision(cluster, n) != last.get(n)]
    deploys = cluster.json("get", "deployments") or {"items": []}
    names = sorted(d["metadata"]["name"] for d in deploys["items"])
    if names != sorted(NODES + ["cp-router"]):
        fail(f"operator-kill: Deployments after the restart {names}: duplicates or missing objects")
    recovery_ms = None if rec is None else (now() - restarted_at) * 1000
    second.stop()
    log(f"operator-kill: requests={sent} (spec changes) failed={failed} degraded=0 lost={len(lost)} "
        f"recovery_ms={recovery_ms if recovery_ms is None else round(recovery_ms)} (restart -> last change deployed)")
    return {"scenario": "operator-kill", "requests": sent, "failed": failed, "degraded": 0, "unrecorded": 0,
            "acked": sent - failed, "lost": len(lost), "recovery_ms": recovery_ms}


def start_process(args, log_path, needle, env=None, timeout=120):
    out = open(log_path, "w")
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    t0 = now()
    while now() - t0 < timeout:
        text = open(log_path).read()
        for line in text.splitlines():
            if needle in line:
                return proc, line
        if proc.poll() is not None:
            fail(f"{args[0]} exited: {text[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    fail(f"{args[0]} did not print {needle!r} within {timeout} s (log {log_path})")


def apiserver_restart(cluster):
    log(f"--- apiserver-restart: {PROMISES['apiserver-restart']}")
    tmp = tempfile.mkdtemp(prefix="chaos-api-")
    node, line = start_process(
        [os.path.join(TARGET, "release", "prism-node"), "--listen", "127.0.0.1:0", "--node-name", "text",
         "--model-uri", os.path.join(MODELS_DIR, "all-minilm-l6-v2"), "--architecture", "bert", "--device", "cpu"],
        os.path.join(tmp, "node.log"), "listening on http://")
    node_url = line.split("listening on ")[1].strip()
    if wait_until(lambda: get(node_url + "/ready", 1) == 200, 120) is None:
        fail("prism-node not ready")

    def table(gen, weight):
        t = {"pipeline": "cp-data", "generation": gen, "modalities": {"text": [
            {"endpoint": node_url, "node": "text", "revision": "1", "weight": weight, "accuracy": 1.0, "ready": True}]}}
        return json.dumps(t)

    def write_table(gen, weight):
        cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cp-data-routing-table"},
              "data": {"routing-table.json": table(gen, weight)}}
        cluster.kc("apply", "-f", "-", stdin=json.dumps(cm))

    write_table(1, 1.0)
    router, line = start_process(
        [os.path.join(TARGET, "release", "prism-router"), "--listen", "127.0.0.1:0", "--routing-configmap",
         f"{cluster.ns}/cp-data-routing-table", "--probe-interval-ms", "0"],
        os.path.join(tmp, "router.log"), "listening on http://", env=dict(cluster.env, RUST_LOG="info"))
    url = line.split("listening on ")[1].strip()
    op = Operator(cluster, "third")
    try:
        def generation():
            try:
                with urllib.request.urlopen(url + "/v1/routing-table", timeout=2) as r:
                    return json.loads(r.read()).get("generation")
            except Exception:  # noqa: BLE001 - not answering yet
                return None
        if wait_until(lambda: generation() == 1, 30) is None:
            fail(f"router did not load the table from the ConfigMap (log {tmp}/router.log)")
        if wait_until(op.leading, 60) is None:
            fail("operator did not lead")
        load = Clients(url, 4, "apiserver-restart").start()
        time.sleep(1)
        cluster.fault("apiserver-stop")
        log("kube-apiserver stopped")
        time.sleep(4)
        cluster.fault("apiserver-start")
        up_at = now()
        log("kube-apiserver started")
        # After the restart: a table change reaches the router through its resumed watch, and the
        # operator reconciles a spec change.
        write_table(2, 0.5)
        rev = f"after-{int(time.time())}"
        cluster.kc("patch", "modalitynode", NODES[0], "--type", "merge", "-p",
                   json.dumps({"spec": {"model": {"revision": rev}}}))
        ok = wait_until(lambda: generation() == 2 and deployed_revision(cluster, NODES[0]) == rev, 90)
        recovery_ms = None if ok is None else (now() - up_at) * 1000
        time.sleep(1)
        load.stop()
        c = load.counts()
        log(f"apiserver-restart: requests={c['requests']} failed={c['failed']} degraded={c['degraded']} lost=0 "
            f"recovery_ms={recovery_ms if recovery_ms is None else round(recovery_ms)} (API back -> router table and "
            f"Deployment updated; operator restarts: {op.restarts})")
        return {"scenario": "apiserver-restart", **c, "acked": 0, "lost": 0, "recovery_ms": recovery_ms}
    finally:
        op.stop()
        for p in (router, node):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def run_all():
    """Both scenarios in one fresh namespace; returns their result dicts."""
    for b in ("prism-operator", "prism-router", "prism-node"):
        if not os.access(os.path.join(TARGET, "release", b), os.X_OK):
            fail(f"{b} is not built: cargo build --release --workspace --bins")
    cluster = Cluster()
    cluster.setup()
    try:
        return [operator_kill(cluster), apiserver_restart(cluster)]
    finally:
        cluster.teardown()
