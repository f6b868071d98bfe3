#!/usr/bin/env python3
"""`make chaos`: faults injected into real processes under load, each scenario bounded in time,
with traffic only to loopback.

A `prism up` pipeline (one text node, all-MiniLM-L6-v2, 2 replicas; memory on; routing timeout
1 s) serves 4 closed-loop clients while each scenario breaks something for real:

  node-kill        SIGKILL one replica
  node-partition   SIGSTOP one replica for 4 s (a partition without root: it accepts nothing)
  node-partition-netns (root) a replica in its own network namespace, its veth down for 4 s
  slow-node        one replica alternately stopped and running (0.15 s each) for 4 s
  router-kill      SIGKILL the router; prism up restarts it on the same port
  disk-full        the router's file-size limit (RLIMIT_FSIZE) set to the memory file's size for
                   3 s, then lifted
  prometheus-down  (separate prism up with an autoscaled node) SIGKILL Prometheus for 6 s
  operator-kill, apiserver-restart: against the real control plane (tests/chaos/control_plane.py)

Each prints requests, failed, degraded, lost acknowledged writes, and recovery time. `lost` is
checked for every answer that said `recorded: true`: after the scenario it must be readable at
/v1/memory/records/{id}. Last line:
  chaos: scenarios=N requests=... failed=... degraded=... lost=0 max_recovery_ms=...
Exit status 1 when an acknowledged write was lost or a scenario broke its promise (see PROMISES).
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "bench", "common"))
sys.path.insert(0, HERE)
from prism_up import DEFAULT_PRISM, KeepAlive, PrismUp, check_prereqs, fail, log, now, process_name  # noqa: E402
from common import Clients, get, signal_checked, wait_until  # noqa: E402
import control_plane  # noqa: E402
import netns  # noqa: E402

def manifest(node_extra, pipeline, pipeline_extra=""):
    """One text node (all-MiniLM-L6-v2 on CPU) and a pipeline over it."""
    return f"""\
apiVersion: prism.dev/v1alpha1
kind: ModalityNode
metadata:
  name: text
spec:
  modality: text
  model: {{uri: pvc://models/all-minilm-l6-v2, architecture: bert, revision: "1"}}
  device: cpu
{node_extra}---
apiVersion: prism.dev/v1alpha1
kind: MultimodalPipeline
metadata:
  name: {pipeline}
spec:
  nodes:
  - {{name: text, required: true}}
{pipeline_extra}"""


MANIFEST = manifest(
    "  replicas: {min: 2, max: 2}\n",
    "chaos",
    "  routing: {timeoutMs: 1000, consecutiveErrors: 2, baseEjectionMs: 1000, retries: 1}\n"
    "  memory: {enabled: true, inputs: hash}\n",
)
AUTOSCALED = manifest(
    "  replicas: {min: 1, max: 3}\n"
    "  autoscaling: {targetInflight: 2, intervalSeconds: 1, stableWindowSeconds: 10, panicWindowSeconds: 3}\n",
    "chaos-scaled",
)

# What each scenario promises (checked; a broken promise fails the run).
PROMISES = {
    "node-kill": "no failed request (the router retries on the other replica)",
    "node-partition": "no failed request (1 s timeout, retry elsewhere, ejection)",
    "slow-node": "no failed request",
    "router-kill": "no acknowledged write lost; requests during the restart fail fast (connection refused)",
    "disk-full": "no failed request (answers say recorded: false) and no acknowledged write lost",
    "prometheus-down": "replicas held, no failed request",
}
PROMISES.update(control_plane.PROMISES)
PROMISES["node-partition-netns"] = netns.PROMISE


def lost_writes(url, ids):
    """Acknowledged ids not readable from the memory log (after waiting for the router)."""
    deadline = time.time() + 30
    while get(url + "/ready") != 200:
        if time.time() > deadline:
            fail("router not ready to check acknowledged writes")
        time.sleep(0.1)
    return [i for i in ids if get(f"{url}/v1/memory/records/{i}") != 200]


def replicas(up, node="text"):
    return next(n for n in up.state()["nodes"] if n["name"] == node)["replicas"]


def router_pid(up):
    """The prism-router process prism up started for this state dir."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or process_name(int(pid)) != "prism-router":
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if up.state_dir.encode() in f.read():
                    return int(pid)
        except OSError:
            pass
    fail("no prism-router process for this prism up")


def scenario(name, up, url, fault, settle_s=2.0):
    """Load for 1 s, inject `fault` (returns recovery ms or None), load 1 s more, then count."""
    log(f"--- {name}: {PROMISES[name]}")
    load = Clients(url, 4, name).start()
    time.sleep(1.0)
    recovery_ms = fault()
    time.sleep(settle_s)
    load.stop()
    c = load.counts()
    lost = lost_writes(url, load.acked())
    res = {"scenario": name, **c, "acked": len(load.acked()), "lost": len(lost), "recovery_ms": recovery_ms}
    log(f"{name}: requests={c['requests']} failed={c['failed']} degraded={c['degraded']} "
        f"acked={res['acked']} unrecorded={c['unrecorded']} lost={len(lost)} recovery_ms={recovery_ms if recovery_ms is None else round(recovery_ms)}")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=DEFAULT_PRISM, help="the prism CLI (target/release/prism)")
    ap.add_argument("--skip-prometheus", action="store_true", help="skip prometheus-down (needs `prometheus`)")
    ap.add_argument("--skip-control-plane", action="store_true",
                    help="skip operator-kill and apiserver-restart (they need `make cluster-up`)")
    args = ap.parse_args()
    check_prereqs(args.bin)
    results = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A fixed port (not 0): prism up restarts a killed router where the clients are.
    up = PrismUp(args.bin, MANIFEST, "chaos", extra_args=["--prometheus", "off"], echo=False, port=port)
    with up:
        url = up.url

        def node_kill():
            pid = replicas(up)[0]["pid"]
            signal_checked(pid, signal.SIGKILL, "prism-node")
            return wait_until(lambda: (lambda r: len(r) == 2 and all(x.get("ready") for x in r)
                                       and pid not in [x["pid"] for x in r])(replicas(up)), 60)
        results.append(scenario("node-kill", up, url, node_kill))

        def partition():
            pid = replicas(up)[0]["pid"]
            signal_checked(pid, signal.SIGSTOP, "prism-node")
            time.sleep(4)
            os.kill(pid, signal.SIGCONT)
            # Recovered: the replica answers its own /ready again.
            node_url = replicas(up)[0]["url"]
            return wait_until(lambda: get(node_url + "/ready", 1) == 200, 30)
        results.append(scenario("node-partition", up, url, partition))

        def slow():
            pid = replicas(up)[0]["pid"]
            t_end = now() + 4
            while now() < t_end:
                signal_checked(pid, signal.SIGSTOP, "prism-node")
                time.sleep(0.15)
                os.kill(pid, signal.SIGCONT)
                time.sleep(0.15)
            return 0.0
        results.append(scenario("slow-node", up, url, slow))

        def router_kill():
            pid = router_pid(up)
            signal_checked(pid, signal.SIGKILL, "prism-router")
            return wait_until(lambda: get(url + "/ready", 1) == 200, 30)
        res = scenario("router-kill", up, url, router_kill)
        results.append(res)

        def disk_full():
            pid = router_pid(up)
            # 4 KiB: no file may grow past its first page, so every WAL append fails (the WAL is
            # where SQLite writes first). Soft limit only: lifting it needs no privilege.
            subprocess.run(["prlimit", f"--pid={pid}", "--fsize=4096:unlimited"], check=True)
            time.sleep(3)
            subprocess.run(["prlimit", f"--pid={pid}", "--fsize=unlimited:unlimited"], check=True)
            # Recovered: answers are recorded again.
            def recorded_again():
                c = KeepAlive(url, 5)
                try:
                    status, raw = c.request("POST", "/v1/infer", json.dumps({"inputs": {"text": "after the disk filled up"}}))
                    return status == 200 and json.loads(raw).get("recorded") is True
                finally:
                    c.close()
            return wait_until(recorded_again, 30)
        results.append(scenario("disk-full", up, url, disk_full))
        up.ok = True

    if not args.skip_prometheus:
        up = PrismUp(args.bin, AUTOSCALED, "chaos-prom", extra_args=["--prometheus", "auto"], echo=False)
        with up:
            def prom_down():
                pid = up.state()["prometheus_pid"]
                before = len(replicas(up))
                signal_checked(pid, signal.SIGKILL, "prometheus")
                time.sleep(6)
                after = len(replicas(up))
                if after != before:
                    fail(f"prometheus-down: replicas changed {before} -> {after} without metrics")
                return wait_until(lambda: (up.state().get("prometheus_pid") or pid) != pid, 30)
            results.append(scenario("prometheus-down", up, up.url, prom_down))
            up.ok = True

    partitioned = netns.run()
    if partitioned:
        results.append(partitioned)

    if not args.skip_control_plane:
        results += control_plane.run_all()

    broken = []
    for r in results:
        if r["lost"]:
            broken.append(f"{r['scenario']}: {r['lost']} acknowledged writes lost")
        if r["scenario"] in ("node-kill", "node-partition", "node-partition-netns", "slow-node", "disk-full",
                             "prometheus-down", "operator-kill", "apiserver-restart") and r["failed"]:
            broken.append(f"{r['scenario']}: {r['failed']} failed requests ({PROMISES[r['scenario']]})")
        if r["scenario"] == "disk-full" and not r["unrecorded"]:
            broken.append("disk-full: no answer said recorded: false, so the fault did not bite")
        if r["recovery_ms"] is None:
            broken.append(f"{r['scenario']}: did not recover")
    tot = {k: sum(r[k] for r in results) for k in ("requests", "failed", "degraded", "lost")}
    max_rec = max((r["recovery_ms"] or 0) for r in results)
    for b in broken:
        print(f"BROKEN PROMISE: {b}", file=sys.stderr)
    print(f"chaos: scenarios={len(results)} requests={tot['requests']} failed={tot['failed']} "
          f"degraded={tot['degraded']} lost={tot['lost']} max_recovery_ms={max_rec:.0f}", flush=True)
    sys.exit(1 if broken else 0)


if __name__ == "__main__":
    main()
