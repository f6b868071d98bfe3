#!/usr/bin/env python3
"""Benchmark: prism-node (all-MiniLM-L6-v2, CPU) against sentence-transformers and the runtimes a
careful user would pick instead (PyTorch bf16 autocast, ONNX Runtime with the BERT graph fused in
fp32 and int8, OpenVINO fp32 and bf16, IPEX bf16 where it installs), on the same machine, model
folder, 512 sentences and thread count, in the same run. Each anchor runs in bench/node/anchors.py
inside its venv (scripts/install-bench-node-deps.sh) and reports its cosine against fp32 PyTorch.

The first line names the CPU and its ISA flags. The last line:
  node: ratio=<prism/sentence-transformers sentences/s at batch 32> prism_sps=... torch_sps=...
        p99_ms_b1=... torch_p99_ms_b1=... rss_mb=... ratio_vs_best=<prism/fastest anchor with
        cos_min >= 0.999> best_anchor=NAME best_sps=... best_p99_ms_b1=... best_rss_mb=...
        prism_gflops=... prism_cos_min=...
is appended, with the machine and every anchor's figures, to bench/RESULTS.md.

Usage: python3 bench/node/bench.py [--bin target/release/prism-node] [--threads 2] [--rounds 2]
                                   [--anchors torch-fp32,ort-fp32-fused,...] [--no-append]
"""
import argparse
import http.client
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / ".cache/models/all-minilm-l6-v2"
sys.path.insert(0, str(ROOT / "bench/common"))
from prism_up import append_result, machine, pct  # noqa: E402

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
            return body

        embed(sents[:32])  # warm
        # Batch 32, length-sorted (same policy as the torch side), one client.
        ordered = sorted(sents, key=len)
        t = time.perf_counter()
        bodies = [embed(ordered[i:i + 32]) for i in range(0, len(ordered), 32)]
        sps = len(sents) / (time.perf_counter() - t)
        by_text = {}
        for i, body in zip(range(0, len(ordered), 32), bodies):
            for text, v in zip(ordered[i:i + 32], json.loads(body)["embeddings"]):
                by_text[text] = v
        # Batch 1 latency, sequential.
        lat = []
        for s in sents[:200]:
            t = time.perf_counter(); embed([s]); lat.append((time.perf_counter() - t) * 1e3)
        rss = 0
        for l in open(f"/proc/{proc.pid}/status"):
            if l.startswith("VmHWM:"):
                rss = int(l.split()[1]) / 1024
        return {"sps": sps, "p50": pct(lat, 50), "p99": pct(lat, 99), "rss_mb": rss,
                "vectors": [by_text[s] for s in sents]}
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


# Anchor name -> the venv (relative to the repository) whose python runs it. IPEX's last release
# imports only with torch 2.8, so it has a venv of its own (scripts/install-bench-node-deps.sh).
ANCHOR_VENVS = {
    "torch-fp32": "bench/.venv", "torch-bf16-autocast": "bench/.venv",
    "ort-fp32-fused": "bench/.venv", "ort-int8-dynamic": "bench/.venv",
    "openvino-fp32": "bench/.venv", "openvino-bf16": "bench/.venv",
    "ipex-bf16": "bench/.venv-ipex",
}
# An anchor counts for ratio_vs_best only when its vectors stay this close to fp32's.
MIN_COSINE = 0.999


def bench_anchor(name, sents, threads, work):
    python = ROOT / ANCHOR_VENVS[name] / "bin/python"
    if not python.exists():
        return {"skipped": f"{python.relative_to(ROOT)} missing (scripts/install-bench-node-deps.sh)"}
    out = subprocess.run(
        [str(python), str(ROOT / "bench/node/anchors.py"), name, "--model", str(MODEL),
         "--threads", str(threads), "--work", str(work)],
        input=json.dumps(sents), capture_output=True, text=True,
        env=dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false"))
    if out.returncode != 0:
        return {"skipped": "failed: " + " | ".join(out.stderr.strip().splitlines()[-3:])}
    return json.loads(out.stdout.strip().splitlines()[-1])


def flops_per_sentence(tokens):
    """all-MiniLM-L6-v2's matmul FLOPs for one sentence of `tokens` tokens (6 layers, width 384,
    FFN 1536): 21,233,664 per token for the projections and FFN, 9,216 per token pair for QK^T and
    AV."""
    return 21_233_664 * tokens + 9_216 * tokens * tokens


def cosine_min(vecs, ref):
    worst = 1.0
    for v, r in zip(vecs, ref):
        worst = min(worst, sum(a * b for a, b in zip(v, r)))
    return worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=str(ROOT / "target/release/prism-node"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2,
                    help="alternate prism and the others this many times and keep each side's best "
                         "round, so a burst of load from other processes does not decide the ratio")
    ap.add_argument("--anchors", default=",".join(ANCHOR_VENVS),
                    help="comma-separated anchors to measure besides sentence-transformers "
                         "(empty: none); torch-fp32 always runs first, it writes the reference")
    ap.add_argument("--no-append", action="store_true", help="do not record in bench/RESULTS.md")
    # PyTorch lives in its own venv (bench/.venv, made by `make bench-node`) so its ~3 GB never
    # touches the test environment.
    venv_py = ROOT / "bench/.venv/bin/python"
    ap.add_argument("--torch-python", default=str(venv_py if venv_py.exists() else sys.executable))
    a = ap.parse_args()
    if not (MODEL / "model.safetensors").exists():
        raise SystemExit(f"{MODEL} missing: run `make models`")
    print(f"cpu: {machine(f'threads={a.threads}')}", flush=True)
    anchors = [x for x in a.anchors.split(",") if x]
    unknown = [x for x in anchors if x not in ANCHOR_VENVS]
    if unknown:
        raise SystemExit(f"unknown anchors {unknown}; known: {', '.join(ANCHOR_VENVS)}")
    if anchors and "torch-fp32" not in anchors:
        anchors.insert(0, "torch-fp32")
    anchors.sort(key=lambda x: x != "torch-fp32")
    sents = sentences()
    work = ROOT / ".cache/bench-node"
    work.mkdir(parents=True, exist_ok=True)
    (work / "reference.json").unlink(missing_ok=True)
    load_before = os.getloadavg()[0]
    best = lambda rs: {"sps": max(r["sps"] for r in rs), "p50": min(r["p50"] for r in rs),
                       "p99": min(r["p99"] for r in rs), "rss_mb": max(r["rss_mb"] for r in rs)}
    show = lambda who, r: print(
        f"  {who:<26} batch32 {r['sps']:7.1f} sentences/s, batch1 p50 {r['p50']:6.2f} ms p99 "
        f"{r['p99']:6.2f} ms, peak RSS {r['rss_mb']:5.0f} MB"
        + (f", cos_min {r['cos_min']:.5f}" if "cos_min" in r else "")
        + (f"  ({r['version']})" if "version" in r else ""), flush=True)
    prs, trs, ars = [], [], {x: [] for x in anchors}
    skipped = {}
    for i in range(a.rounds):
        print(f"round {i}", flush=True)
        prs.append(bench_prism(a.bin, sents, a.threads))
        show("prism-node (HTTP)", prs[-1])
        trs.append(bench_torch(a.torch_python, sents, a.threads))
        show("sentence-transformers fp32", trs[-1])
        for name in anchors:
            if name in skipped:
                continue
            r = bench_anchor(name, sents, a.threads, work)
            if "skipped" in r:
                skipped[name] = r["skipped"]
                print(f"  {name:<26} skipped: {r['skipped']}", flush=True)
                continue
            ars[name].append(r)
            show(name, r)
    p, t = best(prs), best(trs)
    ref_path = work / "reference.json"
    results = {}
    for name, rs in ars.items():
        if rs:
            results[name] = dict(best(rs), cos_min=min(r["cos_min"] for r in rs), version=rs[0]["version"])
    line = (f"node: ratio={p['sps'] / t['sps']:.2f} prism_sps={p['sps']:.0f} torch_sps={t['sps']:.0f} "
            f"p99_ms_b1={p['p99']:.1f} torch_p99_ms_b1={t['p99']:.1f} rss_mb={p['rss_mb']:.0f}")
    if ref_path.exists():
        ref = json.loads(ref_path.read_text())
        p_cos = cosine_min(prs[0]["vectors"], ref["vectors"])
        flops = sum(flops_per_sentence(n) for n in ref["tokens"]) / len(ref["tokens"])
        print(f"prism-node cos_min vs torch fp32: {p_cos:.5f}; mean tokens "
              f"{sum(ref['tokens']) / len(ref['tokens']):.1f}, {flops / 1e6:.0f} MFLOP per sentence")
        eligible = {k: r for k, r in results.items() if r["cos_min"] >= MIN_COSINE}
        for k, r in results.items():
            if k not in eligible:
                print(f"  {k}: cos_min {r['cos_min']:.4f} < {MIN_COSINE}: not counted as an anchor")
        if eligible:
            name, b = max(eligible.items(), key=lambda kv: kv[1]["sps"])
            line += (f" ratio_vs_best={p['sps'] / b['sps']:.2f} best_anchor={name} best_sps={b['sps']:.0f} "
                     f"best_p99_ms_b1={b['p99']:.1f} best_rss_mb={b['rss_mb']:.0f}")
        line += f" prism_gflops={p['sps'] * flops / 1e9:.0f} prism_cos_min={p_cos:.5f}"
    load_after = os.getloadavg()[0]
    note = f"threads={a.threads}, loadavg {load_before:.1f}->{load_after:.1f}"
    table = "".join(
        f"\n  - {k}: {r['sps']:.0f} sentences/s, b1 p99 {r['p99']:.1f} ms, RSS {r['rss_mb']:.0f} MB, "
        f"cos_min {r['cos_min']:.5f} ({r['version']})" for k, r in results.items())
    table += "".join(f"\n  - {k}: skipped ({why})" for k, why in skipped.items())
    if not a.no_append:
        append_result("node", "node", "", line, machine(note), suffix=table)
    print(line)


if __name__ == "__main__":
    main()
