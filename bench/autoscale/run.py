#!/usr/bin/env python3
"""Benchmark: builtin autoscaling of `prism up` on a load step (`make bench-autoscale`).

What is measured (see bench/autoscale/README.md):
  `prism up` (with its default `--prometheus auto`: a local Prometheus, scraping every 1 s) runs one
  text ModalityNode (all-MiniLM-L6-v2, CPU) with replicas {min: 1, max: 3} and the builtin
  autoscaler (targetInflight 2, intervalSeconds 1, stable window 10 s, panic window 3 s, panic
  threshold 2, scale-down stabilization 5 s, maxStep 2). A thread reads state.json every 50 ms.

  idle --idle-s (5 s), then a load step to --clients (8) closed-loop clients on POST /v1/infer:
  scaleout_intervals   ceil(load step -> replica count grows in state.json / intervalSeconds)
  ready_s              load step -> every replica ready (and the autoscaler wants no more)
  steady_scale_changes changes of the replica count or `last_scale` during --steady-s (60 s) of
                       the same load (flapping: 0 is the goal)
  metrics_outage_changes  after the load stops, Prometheus is killed with SIGKILL (prometheus_pid):
                       changes of the replica count or `last_scale` in the next --outage-s (8 s);
                       prism up restarts Prometheus after 10 s, so this is a window without
                       metrics, where the autoscaler should hold (metrics_unavailable) and not act.

Peers (defaults, for context): KEDA pollingInterval 30 s; Knative KPA 6 s panic window (10% of the
60 s stable window), 2 s tick; Kubernetes HPA 15 s sync period and 300 s scale-down stabilization.

Last line: `autoscale: scaleout_intervals=<n> ready_s=<x> steady_scale_changes=<n> metrics_outage_changes=<n>`,
also appended with the date and machine under `## autoscale` in bench/RESULTS.md.

Usage: python3 bench/autoscale/run.py [--bin target/release/prism] [--idle-s 5] [--clients 8]
                                      [--steady-s 60] [--outage-s 8] [--no-append]
"""
import argparse
import json
import math
import os
import shutil
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from prism_up import (headline, DEFAULT_PRISM, Load, PrismUp, check_prereqs, fail, kill9, log,  # noqa: E402
                      now, pct, sigterm_exits)

INTERVAL_S = 1
MANIFEST = f"""\
apiVersion: prism.dev/v1alpha1
kind: ModalityNode
metadata:
  name: text
spec:
  modality: text
  model:
    uri: pvc://models/all-minilm-l6-v2
    architecture: bert
    revision: "1"
  replicas: {{min: 1, max: 3}}
  autoscaling: {{targetInflight: 2, intervalSeconds: {INTERVAL_S}, stableWindowSeconds: 10, panicWindowSeconds: 3, panicThreshold: 2, scaleDownStabilizationSeconds: 5, maxStep: 2}}
  device: cpu
---
apiVersion: prism.dev/v1alpha1
kind: MultimodalPipeline
metadata:
  name: scaled
spec:
  nodes:
  - {{name: text, required: true}}
"""

KEDA_POLLING_S = 30.0
KNATIVE_PANIC_WINDOW_S, KNATIVE_TICK_S = 6.0, 2.0
HPA_SYNC_S, HPA_SCALE_DOWN_STABILIZATION_S = 15.0, 300.0

TITLE = "autoscale: load step on one text node, 1 -> 3 replicas (prism up, builtin autoscaler)"
INTRO = f"""\
`make bench-autoscale` (bench/autoscale/run.py): `prism up` with a local Prometheus (1 s scrape) and one
text node (all-MiniLM-L6-v2, CPU), replicas 1..3, targetInflight 2, intervalSeconds 1, stable/panic
window 10 s/3 s, panic threshold 2, scale-down stabilization 5 s, maxStep 2. Idle 5 s, then a step to
8 closed-loop clients: `scaleout_intervals` = ceil(step -> replica count grows in state.json / 1 s),
`ready_s` = step -> all replicas ready; `steady_scale_changes` = replica count or last_scale changes
over 60 s of the same load; then the load stops, Prometheus is SIGKILLed and `metrics_outage_changes`
counts changes in the next 8 s (prism up restarts Prometheus after 10 s; the autoscaler should hold).

Peers (defaults): KEDA pollingInterval {KEDA_POLLING_S:.0f} s; Knative KPA {KNATIVE_PANIC_WINDOW_S:.0f} s panic window, {KNATIVE_TICK_S:.0f} s tick;
Kubernetes HPA {HPA_SYNC_S:.0f} s sync period, {HPA_SCALE_DOWN_STABILIZATION_S:.0f} s scale-down stabilization. The ratio after each line is
Prism's load step -> scale decision time over KEDA's 30 s polling interval (KEDA's worst case to notice
the load; its mean is ~15 s, before any HPA sync)."""


class StateWatcher(threading.Thread):
    """Reads state.json every `period` s; keeps (time, replicas, ready, last_scale, desired, reason,
    metrics_unavailable, prometheus_pid) of node 0."""

    def __init__(self, up, period=0.05):
        super().__init__(daemon=True)
        self.up, self.period = up, period
        self.samples = []
        self.stop_ev = threading.Event()

    def run(self):
        while not self.stop_ev.is_set():
            t = now()
            try:
                st = self.up.state()
            except (OSError, ValueError):
                st = None
            if st and st.get("nodes"):
                n = st["nodes"][0]
                a = n.get("autoscaler") or {}
                reps = n.get("replicas", [])
                self.samples.append({
                    "t": t, "replicas": len(reps), "ready": sum(1 for r in reps if r.get("ready")),
                    "last_scale": json.dumps(a.get("last_scale"), sort_keys=True), "desired": a.get("desired"),
                    "reason": a.get("reason"), "metrics_unavailable": a.get("metrics_unavailable"),
                    "scaling_limited": a.get("scaling_limited"), "prometheus_pid": st.get("prometheus_pid"),
                })
            self.stop_ev.wait(self.period)

    def first(self, t_from, pred, timeout):
        """The first sample at or after t_from satisfying pred, waiting up to `timeout` s for it."""
        deadline = now() + timeout
        seen = 0
        while True:
            samples = self.samples
            for s in samples[seen:]:
                if s["t"] >= t_from and pred(s):
                    return s
            seen = len(samples)
            if now() > deadline:
                return None
            self.stop_ev.wait(self.period)

    def changes(self, t_from, t_to):
        """Changes of (replica count, last_scale) between consecutive samples in [t_from, t_to),
        starting from the last sample before t_from."""
        key = lambda s: (s["replicas"], s["last_scale"])
        prev, out = None, []
        for s in list(self.samples):
            if s["t"] >= t_to:
                break
            if s["t"] < t_from:
                prev = s
                continue
            if prev is not None and key(s) != key(prev):
                out.append((s["t"], prev, s))
            prev = s
        return out


def describe(c, t0):
    t, a, b = c
    return f"+{t - t0:.2f}s replicas {a['replicas']} -> {b['replicas']} (last_scale {b['last_scale']})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=DEFAULT_PRISM, help="the prism binary (prism-node, prism-router next to it)")
    ap.add_argument("--idle-s", type=float, default=5.0, help="idle time before the load step")
    ap.add_argument("--clients", type=int, default=8, help="closed-loop clients of the load step")
    ap.add_argument("--ramp-timeout-s", type=float, default=120.0, help="give up when not scaled out and ready by then")
    ap.add_argument("--steady-s", type=float, default=60.0, help="steady load after the scale-out")
    ap.add_argument("--outage-s", type=float, default=8.0, help="observation after Prometheus is killed")
    ap.add_argument("--restart-wait-s", type=float, default=10.0,
                    help="after the outage window, wait this long for prism up to restart Prometheus (reported only)")
    ap.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md (debug runs)")
    a = ap.parse_args()
    sigterm_exits()
    check_prereqs(a.bin)
    prom_bin = os.environ.get("PRISM_PROMETHEUS_BIN", "prometheus")
    if not shutil.which(prom_bin):
        fail(f"{prom_bin} not found: install it (scripts/install-deps.sh or apt install prometheus)")
    load_before = os.getloadavg()[0]
    result = None

    with PrismUp(a.bin, MANIFEST, "autoscale") as up:
        st = up.state()
        node = st["nodes"][0]
        if not node.get("autoscaler"):
            off = [l for _, l in up.lines if "autoscal" in l]
            fail(f"state.json has no autoscaler for {node['name']}: {off or 'no autoscaling line from prism up'}")
        if not st.get("prometheus_pid"):
            fail("state.json has no prometheus_pid: prism up did not start a local Prometheus")
        n0 = len(node["replicas"])
        log(f"router {up.url}; {node['name']}: {n0} replica(s), autoscaler {json.dumps(node['autoscaler'])}; "
            f"prometheus pid {st['prometheus_pid']}")

        watch = StateWatcher(up)
        watch.start()
        load = None
        try:
            t_idle = now()
            log(f"idle {a.idle_s:.0f} s")
            watch.stop_ev.wait(a.idle_s)
            idle_changes = watch.changes(t_idle, now())
            log(f"idle: {len(idle_changes)} replica changes")

            t_step = now()
            load = Load(up.url, a.clients, tag="autoscale").start()
            log(f"load step: {a.clients} closed-loop clients")
            grew = watch.first(t_step, lambda s: s["replicas"] > n0, a.ramp_timeout_s)
            printed = up.lines_since(t_step, r"autoscale \S+: (\d+) -> (\d+) replicas \((.*)\)")
            if grew is None:
                print(f"autoscale: scaleout_intervals=none ready_s=none steady_scale_changes=none metrics_outage_changes=none",
                      flush=True)
                fail(f"no scale-out within {a.ramp_timeout_s:.0f} s of the load step; last state "
                     f"{json.dumps(watch.samples[-1] if watch.samples else None)}")
            decision_at = min([grew["t"]] + [t for t, m in printed if int(m.group(2)) > int(m.group(1))])
            decision_s = decision_at - t_step
            intervals = max(1, math.ceil(decision_s / INTERVAL_S - 1e-9))
            log(f"scale-out decided {decision_s:.2f} s after the load step ({grew['replicas']} replicas; "
                f"reason {grew['reason']!r})")

            done = watch.first(t_step, lambda s: s["replicas"] > n0 and s["ready"] == s["replicas"]
                               and (s["desired"] is None or s["desired"] == s["replicas"]), a.ramp_timeout_s)
            if done is None:
                print(f"autoscale: scaleout_intervals={intervals} ready_s=none steady_scale_changes=none "
                      f"metrics_outage_changes=none", flush=True)
                fail(f"replicas not all ready within {a.ramp_timeout_s:.0f} s; last state {json.dumps(watch.samples[-1])}")
            ready_s = done["t"] - t_step
            log(f"{done['replicas']} replicas ready {ready_s:.2f} s after the load step")

            t_steady = now()
            log(f"steady: {a.clients} clients for {a.steady_s:.0f} s")
            watch.stop_ev.wait(a.steady_s)
            t_steady_end = now()
            steady = watch.changes(t_steady, t_steady_end)
            for c in steady:
                log(f"  steady change {describe(c, t_steady)}")
            cnt = load.count(t_steady, t_steady_end)
            lat = load.latencies_ms(t_steady, t_steady_end)
            log(f"steady: {len(steady)} changes, {cnt['requests'] / a.steady_s:.1f} requests/s, failed {cnt['failed']}, "
                f"degraded {cnt['degraded']}, p50 {pct(lat, 50):.1f} ms p99 {pct(lat, 99):.1f} ms, "
                f"replicas at end {watch.samples[-1]['replicas']}")

            prom_pid = watch.samples[-1]["prometheus_pid"]
            if not prom_pid:
                fail("state.json lost prometheus_pid during the run")
            load.stop_nowait()
            t_out = now()
            kill9(prom_pid, "prometheus")
            log(f"load stopped; kill -9 prometheus (pid {prom_pid}); observing {a.outage_s:.0f} s")
            load.stop()
            watch.stop_ev.wait(max(0.0, a.outage_s - (now() - t_out)))
            t_out_end = now()
            outage = watch.changes(t_out, t_out_end)
            for c in outage:
                log(f"  outage change {describe(c, t_out)}")
            unavailable = watch.first(t_out, lambda s: s["metrics_unavailable"], 0)
            if unavailable is not None and unavailable["t"] < t_out_end:
                log(f"metrics_unavailable {unavailable['t'] - t_out:.2f} s after the kill: {unavailable['metrics_unavailable']}")
            else:
                log("metrics_unavailable was not reported during the outage window")
            log(f"outage: {len(outage)} changes; {watch.samples[-1]['replicas']} replicas held")
            back = watch.first(t_out, lambda s: s["prometheus_pid"] and s["prometheus_pid"] != prom_pid,
                               max(0.0, a.restart_wait_s))
            if back is not None:
                log(f"prism up restarted Prometheus (pid {back['prometheus_pid']}) {back['t'] - t_out:.1f} s after the kill")
            else:
                log(f"no new Prometheus pid within {a.outage_s + a.restart_wait_s:.0f} s of the kill")
            for t, m in up.lines_since(t_out, r"(autoscale .*|prometheus.*)"):
                log(f"  prism up at kill+{t - t_out:.2f}s: {m.group(1)}")
            result = (intervals, decision_s, ready_s, len(steady), len(outage))
            up.ok = True
        finally:
            if load is not None:
                load.stop()
            watch.stop_ev.set()
            watch.join(2)

    intervals, decision_s, ready_s, steady_n, outage_n = result
    log(f"peers: KEDA pollingInterval {KEDA_POLLING_S:.0f} s (default); Knative KPA panic window "
        f"{KNATIVE_PANIC_WINDOW_S:.0f} s, tick {KNATIVE_TICK_S:.0f} s; HPA sync period {HPA_SYNC_S:.0f} s, "
        f"scale-down stabilization {HPA_SCALE_DOWN_STABILIZATION_S:.0f} s")
    ratio = decision_s / KEDA_POLLING_S
    log(f"ratio: scale-out decision {decision_s:.2f} s / KEDA 30 s pollingInterval = {ratio:.3f}; "
        f"/ HPA 15 s sync period = {decision_s / HPA_SYNC_S:.3f}; ready in {ready_s:.1f} s "
        f"(model load of the new replicas included)")
    line = (f"autoscale: scaleout_intervals={intervals} ready_s={ready_s:.1f} steady_scale_changes={steady_n} "
            f"metrics_outage_changes={outage_n}")
    headline(a, "autoscale", TITLE, INTRO, line, f"clients={a.clients}, steady {a.steady_s:.0f} s", load_before, suffix=f" decision {decision_s:.2f} s / KEDA 30 s polling = {ratio:.3f}")


if __name__ == "__main__":
    main()
