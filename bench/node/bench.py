#!/usr/bin/env python3
"""Benchmark: prism-node (all-MiniLM-L6-v2, CPU) vs sentence-transformers/PyTorch on the same
machine, same model folder, same sentences, same thread count, in the same run.

Prints per-system results and a headline last line:
  node: ratio=<prism/torch sentences/s at batch 32> prism_sps=... torch_sps=... p99_ms_b1=...
        torch_p99_ms_b1=... rss_mb=...
and appends that line (with date and machine) to bench/RESULTS.md.

Usage: python3 bench/node/bench.py [--bin target/release/prism-node] [--threads 2] [--torch-python PY]
"""
import argparse
import http.client
import json
import os
import platform
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / ".cache/models/all-minilm-l6-v2"

WORDS = (
    "the a model request batch node router cluster kubernetes pod replica latency throughput embedding "
    "vector sentence image audio fusion queue deadline error retry scale operator metrics prometheus "
    "quick brown fox jumps over lazy dog river mountain city music paper science history market bank "
    "price rose fell today yesterday because although while after before during people children "
    "computer network storage memory cache disk server client protocol message answer question"
).split()


def sentences(n=512, seed=7):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(9, 40)
        s = " ".join(rng.choice(WORDS) for _ in range(k))
        out.append(s[0].upper() + s[1:] + ".")
    return out


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def bench_prism(binary, sents, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), RUST_LOG="warn")
    proc = subprocess.Popen(
        [binary, "--listen", "127.0.0.1:0", "--model-uri", str(MODEL), "--architecture", "bert",
         "--node-name", "bench", "--max-batch", "32", "--max-wait-ms", "1", "--max-queue", "1024"],
        stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.match(r"listening on http://([\d.]+):(\d+)", line)
        if not m:
            raise SystemExit(f"prism-node did not start: {line!r}")
        host, port = m.group(1), int(m.group(2))
        conn = http.client.HTTPConnection(host, port)
        deadline = time.time() + 120
        while True:
            conn.request("GET", "/ready")
            r = conn.getresponse(); r.read()
            if r.status == 200:
                break
            if time.time() > deadline:
                raise SystemExit("prism-node not ready in 120 s")
            time.sleep(0.1)

        def embed(batch):
            conn.request("POST", "/embed", body=json.dumps({"inputs": batch}),
                         headers={"content-type": "application/json"})
            r = conn.getresponse(); body = r.read()
            if r.status != 200:
                raise SystemExit(f"prism-node answered {r.status}: {body[:200]!r}")

        embed(sents[:32])  # warm
        # Batch 32, length-sorted (same policy as the torch side), one client.
        ordered = sorted(sents, key=len)
        t = time.perf_counter()
        for i in range(0, len(ordered), 32):
            embed(ordered[i:i + 32])
        sps = len(sents) / (time.perf_counter() - t)
        # Batch 1 latency, sequential.
        lat = []
        for s in sents[:200]:
            t = time.perf_counter(); embed([s]); lat.append((time.perf_counter() - t) * 1e3)
        rss = 0
        for l in open(f"/proc/{proc.pid}/status"):
            if l.startswith("VmHWM:"):
                rss = int(l.split()[1]) / 1024
        return {"sps": sps, "p50": pct(lat, 50), "p99": pct(lat, 99), "rss_mb": rss}
    finally:
        proc.terminate(); proc.wait(10)


def bench_torch(python, sents, threads):
    # Runs in a child process so its peak RSS is its own.
    code = r"""
import json, sys, time, resource
import torch
torch.set_num_threads(%d)
from sentence_transformers import SentenceTransformer
sents = json.load(sys.stdin)
m = SentenceTransformer(%r, device="cpu")
m.max_seq_length = 256
m.encode(sents[:32], batch_size=32, normalize_embeddings=True)
t = time.perf_counter()
m.encode(sents, batch_size=32, normalize_embeddings=True)  # sorts by length internally
sps = len(sents) / (time.perf_counter() - t)
lat = []
for s in sents[:200]:
    t = time.perf_counter(); m.encode([s], batch_size=1, normalize_embeddings=True); lat.append((time.perf_counter() - t) * 1e3)
lat.sort()
p = lambda q: lat[min(len(lat) - 1, int(round(q / 100 * (len(lat) - 1))))]
print(json.dumps({"sps": sps, "p50": p(50), "p99": p(99), "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""" % (threads, str(MODEL))
    out = subprocess.run([python, "-c", code], input=json.dumps(sents), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"torch side failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target/release/prism-node"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternate prism/torch this many times and keep each side's best round, so a "
                         "burst of load from other processes does not decide the ratio")
    # PyTorch lives in its own venv (bench/.venv, made by `make bench-node`) so its ~3 GB never
    # touches the test environment.
    venv_py = ROOT / "bench/.venv/bin/python"
    ap.add_argument("--torch-python", default=str(venv_py if venv_py.exists() else sys.executable))
    a = ap.parse_args()
    if not (MODEL / "model.safetensors").exists():
        raise SystemExit(f"{MODEL} missing: run `make models`")
    sents = sentences()
    load_before = os.getloadavg()[0]
    best = lambda rs: {"sps": max(r["sps"] for r in rs), "p50": min(r["p50"] for r in rs),
                       "p99": min(r["p99"] for r in rs), "rss_mb": max(r["rss_mb"] for r in rs)}
    prs, trs = [], []
    for i in range(a.rounds):
        prs.append(bench_prism(a.bin, sents, a.threads))
        r = prs[-1]
        print(f"round {i} prism: batch32 {r['sps']:.1f} sentences/s, batch1 p50 {r['p50']:.2f} ms p99 {r['p99']:.2f} ms, peak RSS {r['rss_mb']:.0f} MB", flush=True)
        trs.append(bench_torch(a.torch_python, sents, a.threads))
        r = trs[-1]
        print(f"round {i} torch: batch32 {r['sps']:.1f} sentences/s, batch1 p50 {r['p50']:.2f} ms p99 {r['p99']:.2f} ms, peak RSS {r['rss_mb']:.0f} MB", flush=True)
    p, t = best(prs), best(trs)
    load_after = os.getloadavg()[0]
    line = (f"node: ratio={p['sps'] / t['sps']:.2f} prism_sps={p['sps']:.0f} torch_sps={t['sps']:.0f} "
            f"p99_ms_b1={p['p99']:.1f} torch_p99_ms_b1={t['p99']:.1f} rss_mb={p['rss_mb']:.0f}")
    # Load average shows whether other processes shared the CPUs during the run.
    machine = (f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, threads={a.threads}, "
               f"loadavg {load_before:.1f}->{load_after:.1f}")
    # Under the `## node` section (other sections may follow it), same helper as the other benches.
    sys.path.insert(0, str(ROOT / "bench/common"))
    from prism_up import append_result
    append_result("node", "node", "", line, machine)
    print(line)


if __name__ == "__main__":
    main()
