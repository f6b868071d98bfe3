#!/usr/bin/env python3
"""Benchmark: failover of a replicated modality under load (`make bench-failover`).

What is measured (see bench/failover/README.md):
  `prism up` runs one text ModalityNode with 2 replicas (all-MiniLM-L6-v2 on CPU) behind the
  router. 4 closed-loop clients send POST /v1/infer for --warm-s seconds, then one replica is
  killed with SIGKILL (its pid from state.json) and the load goes on for --after-s seconds.
  A poller reads GET /v1/routing-table every --poll-ms ms and notes when the killed replica's
  endpoint is no longer listed as ready, or the table generation changes (the rewrite).

  rewrite_ms        kill -> first routing table (as the router serves it) without the killed replica
                    (the answer's arrival: an upper bound; the lower bound is printed too)
  failed_requests   non-2xx answers or client-side errors, over the whole run
  degraded_requests 200 answers with a non-null `degraded`
  requests          all requests sent

Peers (defaults, for context): Envoy outlier detection ejects a host after consecutive_5xx=5
consecutive 5xx answers (inline, on the 5th), with a 10 s `interval` between ejection analysis
sweeps (success-rate ejection, un-ejection); Kubernetes evicts the pods of a failed node after
tolerationSeconds=300 for node.kubernetes.io/not-ready and /unreachable (~300 s).

Last line: `failover: rewrite_ms=<ms> failed_requests=<n> degraded_requests=<n> requests=<n>`,
also appended with the date and machine under `## failover` in bench/RESULTS.md.

Usage: python3 bench/failover/run.py [--bin target/release/prism] [--warm-s 10] [--after-s 10]
                                     [--clients 4] [--poll-ms 5] [--no-append]
"""
import argparse
import json
import os
import sys
import threading

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from prism_up import (headline, DEFAULT_PRISM, KeepAlive, Load, PrismUp, check_prereqs, fail,  # noqa: E402
                      kill9, log, now, pct, sigterm_exits)

MANIFEST = """\
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
  replicas: {min: 2, max: 2}
  device: cpu
---
apiVersion: prism.dev/v1alpha1
kind: MultimodalPipeline
metadata:
  name: failover
spec:
  nodes:
  - {name: text, required: true}
"""

ENVOY_CONSECUTIVE_5XX = 5
ENVOY_INTERVAL_S = 10.0
K8S_EVICTION_S = 300.0

TITLE = "failover: kill -9 one of two text replicas under load (prism up)"
INTRO = f"""\
`make bench-failover` (bench/failover/run.py): `prism up` with one text node (all-MiniLM-L6-v2, CPU,
2 replicas); 4 closed-loop clients on POST /v1/infer, 10 s warm, then SIGKILL one replica and 10 s
more. A poller reads GET /v1/routing-table every 5 ms: `rewrite_ms` is kill -> first table without
the killed replica ready (or a new generation). Failed = non-2xx or client error; degraded = 200
with a non-null `degraded`. Counts cover the whole run.

Peers (defaults): Envoy outlier detection ejects a host on its {ENVOY_CONSECUTIVE_5XX}th consecutive 5xx
(consecutive_5xx={ENVOY_CONSECUTIVE_5XX}, inline) and sweeps success-rate ejection every interval=10 s;
Kubernetes evicts a failed node's pods after tolerationSeconds=300 (not-ready/unreachable), ~300 s.
The ratio after each line compares rewrite time with Envoy's 10 s sweep interval; the fairer Envoy
comparison is its {ENVOY_CONSECUTIVE_5XX} failed requests per dead host before ejection (without retries)."""


def endpoint_key(url):
    return (url or "").rstrip("/")


class TablePoller(threading.Thread):
    """GET /v1/routing-table every `period` s on one keep-alive connection; after `arm(...)`, the
    first answer to a poll sent after the kill that no longer lists the victim as ready (or has a
    new generation) sets `rewrite_at`. Also notes when `want` text replicas are ready again."""

    def __init__(self, url, period, want):
        super().__init__(daemon=True)
        self.conn = KeepAlive(url, timeout=2)
        self.period, self.want = period, want
        self.stop_ev = threading.Event()
        self.kill_at = None
        self.victim = None
        self.gen_before = None
        self.rewrite_at = self.rewrite_why = self.rewrite_rtt = None
        self.still_ready_sent = None  # send time of the last poll after the kill that still listed the victim
        self.restored_at = None
        self.polls = self.poll_errors = 0
        self.last = None

    def arm(self, kill_at, victim, gen_before):
        self.victim, self.gen_before = victim, gen_before
        self.kill_at = kill_at

    def run(self):
        while not self.stop_ev.is_set():
            t0 = now()
            try:
                status, raw = self.conn.request("GET", "/v1/routing-table")
                t1 = now()
                table = json.loads(raw) if status == 200 else None
            except Exception:  # noqa: BLE001 - a failed poll is counted and retried
                table, t1 = None, now()
            self.polls += 1
            if table is None:
                self.poll_errors += 1
            else:
                self.last = table
                self._observe(t0, t1, table)
            self.stop_ev.wait(max(0.0, self.period - (now() - t0)))
        self.conn.close()

    def _observe(self, t0, t1, table):
        kill_at = self.kill_at
        if kill_at is None or t0 < kill_at:
            return
        text = table.get("modalities", {}).get("text", [])
        ready = {endpoint_key(e.get("endpoint")) for e in text if e.get("ready")}
        if self.rewrite_at is None:
            why = None
            if self.victim not in ready:
                why = "killed endpoint not ready"
            elif table.get("generation") != self.gen_before:
                why = f"generation {self.gen_before} -> {table.get('generation')}"
            if why:
                self.rewrite_at, self.rewrite_why, self.rewrite_rtt = t1, why, t1 - t0
            else:
                self.still_ready_sent = t0
        elif self.restored_at is None and len(ready) >= self.want:
            self.restored_at = t1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=DEFAULT_PRISM, help="the prism binary (prism-node, prism-router next to it)")
    ap.add_argument("--warm-s", type=float, default=10.0, help="load before the kill")
    ap.add_argument("--after-s", type=float, default=10.0, help="load after the kill")
    ap.add_argument("--clients", type=int, default=4, help="closed-loop client threads")
    ap.add_argument("--poll-ms", type=float, default=5.0, help="routing table poll period")
    ap.add_argument("--no-append", action="store_true", help="do not append to bench/RESULTS.md (debug runs)")
    a = ap.parse_args()
    sigterm_exits()
    check_prereqs(a.bin)
    load_before = os.getloadavg()[0]

    with PrismUp(a.bin, MANIFEST, "failover") as up:
        st = up.state()
        text = next((n for n in st["nodes"] if n["name"] == "text"), None)
        if text is None or len(text["replicas"]) != 2 or not all(r["ready"] for r in text["replicas"]):
            fail(f"expected 2 ready text replicas in state.json, got {json.dumps(text)[:400]}")
        log(f"router {up.url}; text replicas: " + ", ".join(f"{r['url']} (pid {r['pid']})" for r in text["replicas"]))

        poller = TablePoller(up.url, a.poll_ms / 1000.0, want=2)
        poller.start()
        load = Load(up.url, a.clients, tag="failover").start()
        t_start = now()
        try:
            log(f"warm: {a.clients} closed-loop clients for {a.warm_s:.0f} s")
            poller.stop_ev.wait(a.warm_s)
            table = poller.last or {}
            # Re-read: a replica restarted during the warm phase has a new pid and endpoint.
            victim = next(n for n in up.state()["nodes"] if n["name"] == "text")["replicas"][0]
            vkey = endpoint_key(victim["url"])
            listed = {endpoint_key(e.get("endpoint")) for e in table.get("modalities", {}).get("text", [])}
            if vkey not in listed:
                log(f"warning: {vkey} is not in the routing table ({sorted(listed)}); only a generation change can show the rewrite")
            gen_before = table.get("generation", st.get("routing_table_generation"))
            warm = load.count(t_start)
            log(f"warm done: {warm['requests']} requests ({warm['requests'] / a.warm_s:.1f}/s), "
                f"failed {warm['failed']}, degraded {warm['degraded']}, table generation {gen_before}")

            t_kill = now()
            poller.arm(t_kill, vkey, gen_before)
            kill9(victim["pid"], "prism-node")
            log(f"kill -9 text replica 0 (pid {victim['pid']}, {vkey}); load continues for {a.after_s:.0f} s")
            poller.stop_ev.wait(a.after_s)
        finally:
            load.stop()
            poller.stop_ev.set()
            poller.join(5)
        t_end = now()

        after = load.count(t_kill)
        total = load.count()
        lat_warm, lat_after = load.latencies_ms(t_start, t_kill), load.latencies_ms(t_kill)
        log(f"after kill: {after['requests']} requests, failed {after['failed']}, degraded {after['degraded']}")
        log(f"latency ms (client, answered requests): warm p50 {pct(lat_warm, 50):.1f} p99 {pct(lat_warm, 99):.1f}; "
            f"after kill p50 {pct(lat_after, 50):.1f} p99 {pct(lat_after, 99):.1f} max {max(lat_after, default=float('nan')):.1f}")
        for t0, outcome, detail in load.errors():
            log(f"  {outcome} at kill{t0 - t_kill:+.3f}s: {detail[:200]}")
        log(f"routing table polls: {poller.polls} ({poller.poll_errors} failed) over {t_end - t_start:.1f} s")
        if poller.restored_at is not None:
            log(f"2 ready text replicas in the table again {poller.restored_at - t_kill:.2f} s after the kill (prism up restarted it)")
        for t, m in up.lines_since(t_kill, r"(routing table gen .*|node text replica .*)"):
            log(f"  prism up at kill+{t - t_kill:.3f}s: {m.group(1)}")
        up.ok = poller.rewrite_at is not None  # keep the logs (temp folder) of a run that failed

    if poller.rewrite_at is None:
        line = (f"failover: rewrite_ms=none failed_requests={total['failed']} degraded_requests={total['degraded']} "
                f"requests={total['requests']}")
        print(line, flush=True)
        fail(f"the routing table still listed {vkey} as ready {a.after_s:.0f} s after the kill")

    # Upper bound: the answer that first showed the rewrite arrived then. Lower bound: the last poll
    # that still listed the victim was sent then (the rewrite came after the router handled it).
    rewrite_s = poller.rewrite_at - t_kill
    lower_s = (poller.still_ready_sent or t_kill) - t_kill
    log(f"rewrite: {poller.rewrite_why}, seen {rewrite_s * 1000:.1f} ms after the kill (bounds {lower_s * 1000:.1f}.."
        f"{rewrite_s * 1000:.1f} ms; poll round trip {poller.rewrite_rtt * 1000:.1f} ms, poll period {a.poll_ms:.0f} ms)")
    log(f"peers: Envoy outlier detection ejects after consecutive_5xx={ENVOY_CONSECUTIVE_5XX} consecutive 5xx "
        f"(default; ejection analysis sweep interval {ENVOY_INTERVAL_S:.0f} s); Kubernetes node-failure eviction "
        f"~{K8S_EVICTION_S:.0f} s (tolerationSeconds=300 for not-ready/unreachable)")
    ratio = rewrite_s / ENVOY_INTERVAL_S
    log(f"ratio: rewrite {rewrite_s:.3f} s / Envoy 10 s ejection sweep interval = {ratio:.4f} "
        f"({ENVOY_INTERVAL_S / rewrite_s:.0f}x sooner); / Kubernetes 300 s eviction = {rewrite_s / K8S_EVICTION_S:.5f}; "
        f"failed requests {total['failed']} vs Envoy's {ENVOY_CONSECUTIVE_5XX} consecutive 5xx before ejection (no retries)")
    line = (f"failover: rewrite_ms={rewrite_s * 1000:.0f} failed_requests={total['failed']} "
            f"degraded_requests={total['degraded']} requests={total['requests']}")
    headline(a, "failover", TITLE, INTRO, line, f"clients={a.clients}, warm {a.warm_s:.0f} s + {a.after_s:.0f} s", load_before, suffix=f" rewrite/Envoy 10 s interval = {ratio:.4f}")


if __name__ == "__main__":
    main()
