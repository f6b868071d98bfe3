#!/usr/bin/env python3
"""`make bench-memory`: the memory store against FAISS, and acknowledged writes across kill -9.

1. Data: 100k 384-d unit vectors in 1000 topics (seeded numpy; real embeddings cluster by topic,
   uniform noise would not), 1000 queries from the same topics, exact top-10 by numpy.
2. Prism: memory/tests/bench_memory.rs builds prism-memory's own HNSW (memory/src/hnsw.rs, M=16,
   ef_construction=200, ef_search=max(128, 4k)) on every core, with f32 and with bf16 vectors, and
   answers each query one at a time; then the durable store: 64 concurrent writers (each
   acknowledged after its fsync'd commit), 8 searchers under 64 writers, 8 searchers during a
   prune of half the records.
3. Peer: FAISS IndexHNSWFlat (PyPI faiss-cpu) with the same M / efConstruction / efSearch on the
   same vectors, built on every core, one query at a time on one thread. Steps 2-3 again on
   --large (1M) vectors, index only, f32 only.
4. Crash rounds: a real prism-node + prism-router with --memory-path under 8 closed-loop clients,
   router killed with SIGKILL mid-load, restarted on the same file; every answer that said
   `recorded: true` must be readable again. lost_acked_writes counts those that are not.

Last line: `memory: recall_at_10=... search_p99_ms=... faiss_search_p99_ms=... ratio_vs_faiss=...
build_s=... faiss_build_s=... recall_at_10_1m=... lost_acked_writes=... correction_gain=...`.
5. Corrections: `prism up` serves the trained shared space's text head (`prism train
   shared-space`, cached) with memory on and inputs logged verbatim; 100 queries in German, which
   the English-trained head never saw, are corrected with the right digit through
   POST /v1/memory/corrections; the router's export (GET /v1/memory/corrections) goes to `prism
   train from-corrections`. correction_gain = top-1 on the corrections it held out, after minus
   before.
6. Rollout: cli/tests/rollout.rs (`prism up`, a canary of a random-head revision judged by user
   corrections): bad_revision_rolled_back=1 when it is rolled back with nobody acting (and a good
   revision is then promoted); rollback_verdict_s = seconds of user traffic before the verdict.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "common"))
from prism_up import DEFAULT_PRISM, ROOT, PrismUp, call, fail, headline, log  # noqa: E402

INTRO = """
`make bench-memory` (bench/memory/run.py + memory/tests/bench_memory.rs): 100k 384-d unit
vectors in 1000 topics (seeded), 1000 queries, exact top-10 by numpy. Prism's index (its own
flat-array HNSW, memory/src/hnsw.rs, M=16, ef_construction=200, ef_search=max(128, 4k); f32 and
bf16 vectors) vs FAISS IndexHNSWFlat with the same parameters on the same data, both built on
every core, searched one query at a time; then the same against FAISS on 1M vectors (f32 only).
Store: 8 searchers while 64 writers commit, then while half the records are pruned. Durable writes: 64 concurrent
writers into the SQLite store (WAL, synchronous=FULL, group commit). Crash rounds: real node +
router under 8 clients, router SIGKILLed mid-load and restarted; lost_acked_writes counts answers
that said `recorded: true` but are missing afterwards (must be 0).
"""


def make_data(dirpath, n, dim, nq, topics, seed):
    import numpy as np
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((topics, dim)).astype(np.float32)
    def sample(count):
        t = rng.integers(0, topics, count)
        x = centers[t] + 0.7 * rng.standard_normal((count, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    base, queries = sample(n), sample(nq)
    truth = np.empty((nq, 10), dtype=np.uint32)
    for s in range(0, nq, 100):
        sims = queries[s:s + 100] @ base.T
        truth[s:s + 100] = np.argsort(-sims, axis=1)[:, :10]
    base.astype("<f4").tofile(os.path.join(dirpath, "base.f32"))
    queries.astype("<f4").tofile(os.path.join(dirpath, "queries.f32"))
    truth.astype("<u4").tofile(os.path.join(dirpath, "truth.u32"))
    with open(os.path.join(dirpath, "meta.json"), "w") as f:
        json.dump({"n": n, "dim": dim, "queries": nq}, f)
    return base, queries, truth


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return float("nan")


def faiss_run(base, queries, truth):
    """FAISS IndexHNSWFlat, same M / efConstruction / efSearch, built on every core (as Prism's
    index is), searched one query at a time on one thread."""
    try:
        import faiss
    except ImportError:
        log("faiss-cpu not importable; peer skipped (pip install faiss-cpu)")
        return None
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    index = faiss.IndexHNSWFlat(base.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 200
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    index.add(base)
    build_s = time.perf_counter() - t0
    rss_per_vector = (rss_bytes() - rss0) / base.shape[0]
    faiss.omp_set_num_threads(1)
    index.hnsw.efSearch = 128  # Prism's MIN_EF_SEARCH (memory/src/index.rs); k=10 -> max(128, 40)
    lat, found = [], 0
    for i in range(queries.shape[0]):
        t = time.perf_counter()
        _, ids = index.search(queries[i:i + 1], 10)
        lat.append((time.perf_counter() - t) * 1000)
        found += len(set(ids[0].tolist()) & set(truth[i].tolist()))
    lat.sort()
    del index
    return {"recall_at_10": found / (queries.shape[0] * 10), "search_p99_ms": lat[int(round((len(lat) - 1) * 0.99))],
            "search_p50_ms": lat[len(lat) // 2], "build_s": build_s, "rss_bytes_per_vector": rss_per_vector}


def prism_run(tmp, index_only, bf16=True):
    cmd = ["cargo", "test", "--release", "-q", "-p", "prism-memory", "--test", "bench_memory", "--",
           "--ignored", "--nocapture"]
    log(" ".join(cmd) + (" (index only)" if index_only else ""))
    env = dict(os.environ, BENCH_MEMORY_DATA=tmp, BENCH_MEMORY_INDEX_ONLY="1" if index_only else "0",
               BENCH_MEMORY_BF16="1" if bf16 else "0")
    out = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("{")), None)
    if out.returncode != 0 or line is None:
        fail(f"memory benchmark failed (exit {out.returncode})")
    prism = json.loads(line)
    log(f"prism: {prism}")
    return prism


def index_round(n, nq, index_only, bf16=True):
    """Prism's index (f32, and bf16 unless told not to; the store too unless index_only) and FAISS
    on the same n x 384 vectors."""
    with tempfile.TemporaryDirectory(prefix="prism-bench-memory-") as tmp:
        log(f"generating {n} x 384 vectors, {nq} queries, exact top-10 (numpy)")
        base, queries, truth = make_data(tmp, n, 384, nq, 1000, 7)
        prism = prism_run(tmp, index_only, bf16)
        peer = faiss_run(base, queries, truth)
        log(f"faiss: {peer}")
    return prism, peer


def http(method, url, body=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
        try:
            return r.status, json.loads(raw or b"null")
        except ValueError:
            return r.status, raw.decode(errors="replace")


def start(cmd, log_path):
    f = open(log_path, "w")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=dict(os.environ, RUST_LOG="warn"))
    deadline = time.time() + 120
    while time.time() < deadline:
        line = p.stdout.readline()
        if line.startswith("listening on "):
            return p, line.split("listening on ", 1)[1].strip()
        if not line and p.poll() is not None:
            break
    fail(f"{cmd[0]} did not start; see {log_path}")


def wait_ready(url):
    for _ in range(600):
        try:
            if http("GET", url + "/ready", timeout=2)[0] == 200:
                return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    fail(f"{url} never became ready")


def crash_rounds(rounds, tmp):
    release = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
    model = os.path.join(ROOT, ".cache", "models", "all-minilm-l6-v2")
    node, node_url = start([os.path.join(release, "prism-node"), "--listen", "127.0.0.1:0", "--node-name", "minilm",
                            "--architecture", "bert", "--revision", "r1", "--model-uri", model],
                           os.path.join(tmp, "node.log"))
    try:
        wait_ready(node_url)
        table = os.path.join(tmp, "table.json")
        with open(table, "w") as f:
            json.dump({"pipeline": "bench", "generation": 1, "modalities": {"text": [
                {"endpoint": node_url, "node": "minilm", "revision": "r1", "weight": 1.0, "accuracy": 0.9, "ready": True}]}}, f)
        db = os.path.join(tmp, "memory.db")
        router_cmd = [os.path.join(release, "prism-router"), "--listen", "127.0.0.1:0", "--routing-table", table,
                      "--memory-path", db]
        lost, acked_total = 0, 0
        for r in range(rounds):
            router, url = start(router_cmd, os.path.join(tmp, f"router-{r}.log"))
            wait_ready(url)
            acked, stop = [], threading.Event()
            lock = threading.Lock()

            def client(w):
                i = 0
                while not stop.is_set() and i < 10_000:
                    i += 1
                    try:
                        s, v = http("POST", url + "/v1/infer", {"inputs": {"text": f"round {r} client {w} request {i}"}}, 5)
                    except (urllib.error.URLError, OSError, ValueError):
                        return
                    if s == 200 and v.get("recorded") is True:
                        with lock:
                            acked.append(v["id"])
            threads = [threading.Thread(target=client, args=(w,)) for w in range(8)]
            for t in threads:
                t.start()
            time.sleep(1.5)
            router.send_signal(signal.SIGKILL)
            router.wait()
            stop.set()
            for t in threads:
                t.join(10)
            router, url = start(router_cmd, os.path.join(tmp, f"router-{r}-after.log"))
            wait_ready(url)
            missing = 0
            for rid in acked:
                try:
                    http("GET", f"{url}/v1/memory/records/{rid}")
                except urllib.error.HTTPError:
                    missing += 1
            router.send_signal(signal.SIGKILL)
            router.wait()
            log(f"crash round {r + 1}: {len(acked)} acknowledged, {missing} lost")
            lost += missing
            acked_total += len(acked)
        return lost, acked_total
    finally:
        node.send_signal(signal.SIGKILL)
        node.wait()


GERMAN = ["null", "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun"]
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PHRASES = ["{w}", "die Zahl {w}", "die Ziffer {w}", "eine handgeschriebene {w}", "Nummer {w}", "ein Bild der Zahl {w}",
           "eine {w} von Hand geschrieben", "das ist eine {w}", "zeig mir eine {w}", "ich suche die {w}"]


def correction_round(prism, tmp):
    """The memory loop end to end; returns the `train: ...` summary as a dict."""
    log("corrections: prism train shared-space (cached after the first run)")
    r = subprocess.run([prism, "train", "shared-space"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"prism train shared-space failed: {r.stderr[-2000:]}")
    space = os.path.join(ROOT, ".cache", "models", "digits-space")
    manifest = f"""apiVersion: prism.dev/v1alpha1
kind: ModalityNode
metadata: {{name: text}}
spec:
  modality: text
  model: {{uri: 'file://{space}/text', architecture: bert, revision: '1'}}
  device: cpu
---
apiVersion: prism.dev/v1alpha1
kind: MultimodalPipeline
metadata: {{name: digits}}
spec:
  nodes:
  - {{name: text, required: true}}
  memory: {{enabled: true, inputs: full}}
"""
    with PrismUp(prism, manifest, "corrections", extra_args=["--prometheus", "off"], echo=False) as up:
        for label, word in enumerate(GERMAN):
            for p in PHRASES:
                status, v, _ = call(up.url + "/v1/infer", {"inputs": {"text": p.format(w=word)}})
                if status != 200 or v.get("recorded") is not True:
                    fail(f"/v1/infer: {status} {v}")
                status, v, _ = call(up.url + "/v1/memory/corrections",
                                    {"requestId": v["id"], "correct": False, "answer": {"label": NAMES[label]}})
                if status != 201:
                    fail(f"/v1/memory/corrections: {status} {v}")
        status, export, _ = call(up.url + "/v1/memory/corrections")
        if status != 200:
            fail(f"GET /v1/memory/corrections: {status}")
        up.ok = True
    path = os.path.join(tmp, "corrections.json")
    with open(path, "w") as f:
        json.dump(export, f)
    r = subprocess.run([prism, "train", "from-corrections", "--corrections", path, "--out", os.path.join(tmp, "rev2")],
                       cwd=ROOT, capture_output=True, text=True)
    line = next((l for l in r.stdout.splitlines() if l.startswith("train: ")), None)
    if r.returncode != 0 or line is None:
        fail(f"prism train from-corrections failed: {r.stderr[-2000:]}")
    log("  " + line)
    return {k: v for k, v in (kv.split("=", 1) for kv in line.split()[1:])}


def rollout_round():
    """cli/tests/rollout.rs under `prism up`: a random-head revision of the text model goes out as a
    canary, the user's corrections mark its answers wrong, it must be rolled back with nobody
    acting; then a good revision must be promoted. Returns (rolled_back 0/1, seconds to the
    verdict, promoted 0/1)."""
    cmd = ["cargo", "test", "--release", "-q", "-p", "prism", "--test", "rollout", "--", "--nocapture"]
    log(" ".join(cmd))
    out = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    verdict = next((l for l in out.stdout.splitlines() if l.startswith("rollback of revision 2:")), "")
    promoted = any(l.startswith("promotion of revision 3:") for l in out.stdout.splitlines())
    for l in out.stdout.splitlines():
        if "rollout text:" in l or l.startswith(("rollback of", "promotion of")):
            log("  " + l)
    if out.returncode != 0:
        log(out.stdout[-3000:])
        return 0, float("nan"), 0
    secs = float(verdict.rsplit(" in ", 1)[1].rstrip("s")) if " in " in verdict else float("nan")
    return 1, secs, int(promoted)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--large", type=int, default=1_000_000,
                    help="vectors of the second, index-only round against FAISS (0: skip)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--crash-rounds", type=int, default=3)
    ap.add_argument("--index-only", action="store_true",
                    help="only the index against FAISS (no store, crash, correction or rollout rounds)")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--prism", default=DEFAULT_PRISM)
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    nan = float("nan")
    prism, peer = index_round(args.vectors, args.queries, args.index_only)
    peer = peer or {}
    big, big_peer = index_round(args.large, args.queries, True, bf16=False) if args.large else ({}, {})
    big_peer = big_peer or {}
    line = (f"memory: recall_at_10={prism['recall_at_10']:.4f} search_p99_ms={prism['search_p99_ms']:.3f} "
            f"faiss_recall_at_10={peer.get('recall_at_10', nan):.4f} faiss_search_p99_ms={peer.get('search_p99_ms', nan):.3f} "
            f"ratio_vs_faiss={peer.get('search_p99_ms', nan) / prism['search_p99_ms']:.2f} "
            f"build_s={prism['build_s']:.1f} faiss_build_s={peer.get('build_s', nan):.1f} "
            f"build_ratio_vs_faiss={peer.get('build_s', nan) / prism['build_s']:.2f} "
            f"rss_bytes_per_vector={prism['rss_bytes_per_vector']:.0f} "
            f"bf16_recall_at_10={prism.get('bf16_recall_at_10', nan):.4f} "
            f"bf16_search_p99_ms={prism.get('bf16_search_p99_ms', nan):.3f} "
            f"bf16_rss_bytes_per_vector={prism.get('bf16_rss_bytes_per_vector', nan):.0f} "
            f"faiss_rss_bytes_per_vector={peer.get('rss_bytes_per_vector', nan):.0f} "
            f"recall_at_10_1m={big.get('recall_at_10', nan):.4f} search_p99_ms_1m={big.get('search_p99_ms', nan):.3f} "
            f"faiss_recall_at_10_1m={big_peer.get('recall_at_10', nan):.4f} "
            f"faiss_search_p99_ms_1m={big_peer.get('search_p99_ms', nan):.3f} "
            f"build_s_1m={big.get('build_s', nan):.1f} faiss_build_s_1m={big_peer.get('build_s', nan):.1f}")
    if not args.index_only:
        with tempfile.TemporaryDirectory(prefix="prism-bench-memory-") as tmp:
            lost, acked = crash_rounds(args.crash_rounds, tmp)
            corr = correction_round(args.prism, tmp)
        rolled_back, rollback_s, promoted = rollout_round()
        line += (f" write_rps={prism['write_rps']:.0f} "
                 f"search_under_writes_p99_ms={prism['search_under_writes_p99_ms']:.3f} "
                 f"lost_acked_writes_under_search={prism['lost_acked_writes_under_search']} "
                 f"search_during_prune_p99_ms={prism['search_during_prune_p99_ms']:.3f} pruned={prism['pruned']} "
                 f"lost_acked_writes={lost} acked_in_crash_rounds={acked} "
                 f"correction_gain={float(corr['correction_gain']):.3f} bad_revision_rolled_back={rolled_back} "
                 f"corrections_top1={corr['before_top1']}->{corr['after_top1']} "
                 f"english_top1={corr['data_before_top1']}->{corr['data_after_top1']} "
                 f"rollback_verdict_s={rollback_s:.1f} good_revision_promoted={promoted}")
    headline(args, "memory", "memory: ANN search vs FAISS, durable writes, kill -9 rounds", INTRO, line,
             f"{args.vectors} vectors" + (", index only" if args.index_only else ""), load_before)


if __name__ == "__main__":
    main()
