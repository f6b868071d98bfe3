#!/usr/bin/env python3
"""`make bench-router`: runs the router benchmark (router/tests/bench_router.rs: real nodes and
router on loopback, Ray Serve as the peer over the same nodes) and records its headline in
bench/RESULTS.md.

Last line: `router: overhead_p50_ms=... overhead_p99_ms=... fanout_vs_slowest=...
ray_fanout_vs_slowest=... rps=...` (plus clients, fanout_p50_ms, ray_fanout_p50_ms).
"""
import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from prism_up import ROOT, fail, headline, log  # noqa: E402

INTRO = """
`make bench-router` (router/tests/bench_router.rs + bench/router/ray_fanout.py): three real
all-MiniLM-L6-v2 prism-node processes on loopback registered as modalities `text`, `caption`,
`audio`. Overhead: `--clients` closed-loop clients x `--requests` each, `POST /embed` on the node
directly vs `POST /v1/infer` (text only) through prism-router; overhead = router - direct at p50
and p99. Fan-out: one sequential client, p50 of the 3-modality request over the slowest
single-modality p50 (1.0 = perfectly parallel, 3.0 = sequential). The peer, Ray Serve (PyPI
`ray[serve]`), runs an ingress deployment doing the same concurrent calls (aiohttp,
asyncio.gather) and the same fusion over the same three nodes in the same run, measured the same
way through its HTTP proxy. Targets: overhead < 0.5 ms p50 / < 2 ms p99; fan-out within 10 % of
the slowest modality.
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ray-python", default=os.path.join(ROOT, "bench", ".venv", "bin", "python"),
                    help="a Python with ray[serve] (empty: skip the peer; ray_* print nan)")
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--requests", type=int, default=10, help="requests per client in the overhead runs")
    ap.add_argument("--no-append", action="store_true", help="do not record the line in bench/RESULTS.md")
    args = ap.parse_args()
    env = dict(os.environ, BENCH_CLIENTS=str(args.clients), BENCH_REQUESTS=str(args.requests))
    if args.ray_python:
        env["BENCH_RAY_PYTHON"] = os.path.abspath(args.ray_python)
    load_before = os.getloadavg()[0]
    cmd = ["cargo", "test", "--release", "-q", "-p", "prism-router", "--test", "bench_router", "--",
           "--ignored", "--nocapture", "--test-threads=1"]
    log(" ".join(cmd))
    out = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    sys.stdout.write("".join(l + "\n" for l in out.stdout.splitlines() if not l.startswith("router:")))
    line = next((l for l in out.stdout.splitlines() if l.startswith("router: ")), None)
    if out.returncode != 0 or line is None:
        fail(f"the router benchmark failed (exit {out.returncode})")
    headline(args, "router", "router: overhead vs the node, 3-modality fan-out, Ray Serve as the peer",
             INTRO, line, f"{args.clients} clients", load_before)


if __name__ == "__main__":
    main()
