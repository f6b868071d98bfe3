"""`node-partition-netns` of `make chaos` (root only): a real network partition.

One prism-node runs inside a network namespace of its own, reachable over a veth pair at an
address this script creates (10.231.N.2); a second runs on loopback. A prism-router in front of
both (per-try timeout from `routing.timeoutMs`, one retry) serves 4 closed-loop clients while the
namespace's end of the veth goes down for 4 s: packets to the node vanish and open connections
hang, as with a cable pulled or a partitioned host (not the fast "connection refused" of a dead
process). Promise: no failed request. Without root (or without `ip netns`), the scenario is
skipped and the SIGSTOP stand-in (`node-partition`) remains.

Traffic goes only to loopback and to the namespace this script created.
"""
import json
import os
import subprocess
import tempfile
import time
import urllib.request

from common import Clients, get, wait_until
from prism_up import MODELS_DIR, TARGET, fail, log, now

PROMISE = "no failed request when a replica's network drops every packet for 4 s (veth down)"


def available():
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"`ip netns` unavailable: {r.stderr.strip()}"


def sh(*args):
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"{' '.join(args)}: {r.stderr.strip()}")


def start(args, log_path, needle="listening on http://", timeout=120):
    proc = subprocess.Popen(args, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    t0 = now()
    while now() - t0 < timeout:
        for line in open(log_path).read().splitlines():
            if needle in line:
                return proc, line.split("listening on ")[1].strip()
        if proc.poll() is not None:
            fail(f"{args[0]} exited: {open(log_path).read()[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    fail(f"{args[0]} did not start (log {log_path})")


def served(node_url):
    """Requests a node has answered, from its /metrics."""
    with urllib.request.urlopen(node_url + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith("prism_node_request_duration_seconds_count"))


def run():
    why = available()
    if why:
        log(f"--- node-partition-netns: skipped ({why})")
        return None
    log(f"--- node-partition-netns: {PROMISE}")
    tmp = tempfile.mkdtemp(prefix="chaos-netns-")
    tag = os.getpid() % 200 + 20
    ns, host_if, ns_if = f"prism-chaos-{tag}", f"pc{tag}h", f"pc{tag}n"
    host_ip, ns_ip = f"10.231.{tag}.1", f"10.231.{tag}.2"
    procs = []
    node = os.path.join(TARGET, "release", "prism-node")
    model = ["--model-uri", os.path.join(MODELS_DIR, "all-minilm-l6-v2"), "--architecture", "bert", "--device", "cpu"]
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        sh("ip", "link", "set", ns_if, "netns", ns)
        sh("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        p, inside = start(["ip", "netns", "exec", ns, node, "--listen", f"{ns_ip}:0", "--node-name", "text", *model],
                          os.path.join(tmp, "node-ns.log"))
        procs.append(p)
        p, outside = start([node, "--listen", "127.0.0.1:0", "--node-name", "text", *model],
                           os.path.join(tmp, "node-lo.log"))
        procs.append(p)
        for u in (inside, outside):
            if wait_until(lambda: get(u + "/ready", 1) == 200, 120) is None:
                fail(f"{u} not ready")
        table = {"pipeline": "netns", "generation": 1, "modalities": {"text": [
            {"endpoint": u, "node": "text", "revision": "1", "weight": 1.0, "accuracy": 1.0, "ready": True}
            for u in (inside, outside)]}}
        spec = {"nodes": [{"name": "text", "required": True}],
                "routing": {"timeoutMs": 1000, "consecutiveErrors": 2, "baseEjectionMs": 1000, "retries": 1}}
        for name, doc in (("table.json", table), ("pipeline.json", spec)):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(doc, f)
        p, url = start([os.path.join(TARGET, "release", "prism-router"), "--listen", "127.0.0.1:0",
                        "--routing-table", os.path.join(tmp, "table.json"),
                        "--pipeline", os.path.join(tmp, "pipeline.json")], os.path.join(tmp, "router.log"))
        procs.append(p)
        if wait_until(lambda: get(url + "/ready", 1) == 200, 30) is None:
            fail("router not ready")
        load = Clients(url, 4, "netns").start()
        time.sleep(1)
        served_before = served(inside)
        if not served_before:
            fail("the namespaced replica served nothing before the partition: the fault would not bite")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "down")
        log(f"partitioned {inside} (veth down) after it served {served_before:.0f} requests")
        time.sleep(4)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        healed = now()
        rec = wait_until(lambda: get(inside + "/ready", 1) == 200, 30)
        recovery_ms = None if rec is None else (now() - healed) * 1000
        time.sleep(2)
        load.stop()
        c = load.counts()
        log(f"node-partition-netns: requests={c['requests']} failed={c['failed']} degraded={c['degraded']} lost=0 "
            f"recovery_ms={recovery_ms if recovery_ms is None else round(recovery_ms)} (link up -> node reachable)")
        return {"scenario": "node-partition-netns", **c, "acked": 0, "lost": 0, "recovery_ms": recovery_ms}
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
