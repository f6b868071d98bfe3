#!/usr/bin/env python3
"""Real distributed fine-tuning test: torchrun with 2 gloo workers on loopback trains a LoRA adapter on a
generated corrections set, then the real prism-node serves the output folder and must reproduce
PyTorch's embeddings (cosine >= 0.999), and differ from the base model's (the adapter is not ignored).

    .cache/venv-train/bin/python train/test_distributed.py [--node-bin PATH] [--model DIR]

Defaults: $PRISM_NODE_BIN, else $CARGO_TARGET_DIR/release/prism-node, else target/release/prism-node;
$PRISM_TRAIN_MODEL, else .cache/models/all-minilm-l6-v2 (both relative to the repo root).
Exits non-zero on failure; the last line is a summary.
"""

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
WORKERS = 2


def default_node_bin():
    if os.environ.get("PRISM_NODE_BIN"):
        return os.environ["PRISM_NODE_BIN"]
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    return os.path.join(target, "release", "prism-node")


def fail(msg):
    print(f"FAIL: {msg}", flush=True)
    sys.exit(1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_corrections(path, n=64, seed=7):
    """n positive pairs whose link the base model cannot know (a code word -> a city, a fixed random
    bijection of 32 each; every code asked twice, question and answer wording chosen independently), plus items the trainer must skip:
    no answer, an answer without text, a non-text input."""
    rng = random.Random(seed)
    codes = ["amber", "basalt", "cobalt", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
             "kestrel", "lantern", "marble", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "thistle",
             "umber", "velvet", "walnut", "yarrow", "zephyr", "acorn", "birch", "cedar", "dune", "falcon",
             "glacier", "hazel"]
    places = ["Lisbon", "Osaka", "Nairobi", "Quito", "Tromso", "Hobart", "Tallinn", "Recife", "Dakar", "Hanoi",
              "Bergen", "Cusco", "Perth", "Riga", "Tunis", "Leeds", "Porto", "Kyoto", "Lima", "Oslo", "Accra",
              "Turin", "Malmo", "Split", "Cork", "Ghent", "Basel", "Graz", "Lyon", "Bonn", "Pune", "Sapporo"]
    rng.shuffle(places)
    asks = ["where is shipment {c}?", "track the {c} parcel please"]
    says = ["it is waiting at the {p} depot", "the {p} warehouse has it"]
    items = []
    for i in range(n):
        # code i % 32, question wording and answer wording independent of each other: only the
        # code -> city link tells which answer is the right one.
        k = i % len(codes)
        v, w = (i // len(codes)) % 2, (i // len(codes) + k) % 2
        items.append({
            "requestId": f"req-{i}",
            "rating": 0.0,
            "pipeline": "search",
            "inputs": {"text": asks[v].format(c=codes[k])},
            "answer": {"text": says[w].format(p=places[k])},
        })
    items.append({"requestId": "s1", "rating": 1.0, "inputs": {"text": "fine as it was"}})
    items.append({"requestId": "s2", "rating": 0.0, "inputs": {"text": "wrong"}, "answer": {"label": "x"}})
    items.append({"requestId": "s3", "rating": 0.0, "inputs": {"image": "aGk="}, "answer": {"text": "a cat"}})
    with open(path, "w") as f:
        json.dump({"corrections": items}, f)
    return n, {"no answer.text": 2, "no inputs.text": 1}


def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def start_node(bin_path, folder, timeout=120, extra=()):
    proc = subprocess.Popen(
        [bin_path, "--listen", "127.0.0.1:0", "--node-name", "text", "--modality", "text",
         "--architecture", "bert", "--model-uri", folder, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    found, err_lines = {}, []

    def read_out():
        for line in proc.stdout:
            m = re.search(r"listening on (http://\S+)", line)
            if m and "url" not in found:
                found["url"] = m.group(1)

    def read_err():
        for line in proc.stderr:
            err_lines.append(line)
            del err_lines[:-40]

    threading.Thread(target=read_out, daemon=True).start()
    threading.Thread(target=read_err, daemon=True).start()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            fail(f"prism-node exited {proc.returncode}: {''.join(err_lines)[-2000:]}")
        url = found.get("url")
        if url:
            try:
                if urllib.request.urlopen(url + "/ready", timeout=5).status == 200:
                    return proc, url
            except Exception:
                pass
        time.sleep(0.2)
    stop(proc)
    fail(f"prism-node not ready within {timeout}s: {''.join(err_lines)[-2000:]}")


def stop(proc):
    if proc and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def embed(url, texts):
    req = urllib.request.Request(url + "/embed", data=json.dumps({"inputs": texts}).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)["embeddings"]


def serve_export(path, token):
    """A loopback stand-in for the router's `GET /v1/memory/corrections` (bearer auth), the way the
    cluster's Job reads it. Returns (server, url, hits): the trainer must fetch it exactly once
    (rank 0) and broadcast it to the other ranks."""
    import http.server

    body = open(path, "rb").read()
    hits = []

    class Export(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/v1/memory/corrections":
                self.send_error(404)
                return
            if self.headers.get("Authorization") != f"Bearer {token}":
                self.send_error(401)
                return
            hits.append(self.path)
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Export)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1/memory/corrections", hits


SLIDING_WINDOW = 6


def check_sliding_window(args, ref):
    """The job's --sliding-window and prism-node's --attention-window are the same attention: the
    base model under prism_train's banded attention (PyTorch) and under prism-node's banded
    kernel agree (cosine >= 0.999), and both differ from full attention (the window is not ignored).
    Returns (min cosine node vs PyTorch, min cosine windowed vs full)."""
    sys.path.insert(0, os.path.join(ROOT, "train"))
    import torch
    import prism_train

    tok, base = prism_train.load_base(args.model, SLIDING_WINDOW)
    base.eval()
    with torch.no_grad():
        want = prism_train.embed(base, tok, ref["sentences"], "cpu", 512).tolist()
    node, url = start_node(args.node_bin, args.model, extra=("--attention-window", str(SLIDING_WINDOW)))
    try:
        got = embed(url, ref["sentences"])
    finally:
        stop(node)
    to_torch = [cos(g, w) for g, w in zip(got, want)]
    to_full = [cos(g, b) for g, b in zip(got, ref["base_embeddings"])]
    print(f"  window {SLIDING_WINDOW}: cos(prism-node, PyTorch banded) min {min(to_torch):.6f}, "
          f"cos(windowed, full) min {min(to_full):.4f}")
    if min(to_full) >= 0.9999:
        fail(f"--attention-window {SLIDING_WINDOW} changed nothing: prism-node served full attention ({to_full})")
    if min(to_torch) < 0.999:
        fail(f"prism-node's banded attention does not reproduce prism_train's: cosines {to_torch}")
    return min(to_torch), min(to_full)


def json_lines(text):
    """The JSON objects in torchrun's merged stdout. Each rank writes a line in one write(2), but
    torchrun or a library may still print around them, so a line can hold more than one object."""
    dec, out = json.JSONDecoder(), []
    for line in text.splitlines():
        i = line.find("{")
        while i != -1:
            try:
                obj, end = dec.raw_decode(line, i)
            except json.JSONDecodeError:
                i = line.find("{", i + 1)
                continue
            if isinstance(obj, dict):
                out.append(obj)
            i = line.find("{", end)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--node-bin", default=default_node_bin())
    ap.add_argument("--model", default=os.environ.get("PRISM_TRAIN_MODEL", os.path.join(ROOT, ".cache/models/all-minilm-l6-v2")))
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--timeout", type=int, default=400, help="seconds for the torchrun job")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    for p, what in ((args.node_bin, "prism-node binary (cargo build --release -p prism-node, or --node-bin)"),
                    (os.path.join(args.model, "model.safetensors"), "model (make models, or --model)")):
        if not os.path.exists(p):
            fail(f"{p} missing: {what}")

    work = tempfile.mkdtemp(prefix="prism-train-")
    node = export = None
    try:
        data = os.path.join(work, "corrections.json")
        n_pairs, want_skipped = make_corrections(data)
        token_file = os.path.join(work, "tokens")
        with open(token_file, "w") as f:
            f.write("# router tokens, one per line\ns3cret-token\n")
        export, export_url, export_hits = serve_export(data, "s3cret-token")
        out, ckpt = os.path.join(work, "out"), os.path.join(work, "ckpt")
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "1", "--nproc_per_node", str(WORKERS),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            os.path.join(ROOT, "train", "prism_train.py"),
            "--model", args.model, "--corrections", export_url, "--corrections-token-file", token_file,
            "--output", out, "--checkpoint-dir", ckpt,
            "--epochs", str(args.epochs), "--batch-size", "8", "--lr", "5e-3", "--temperature", "0.05",
            "--lora-r", "8", "--lora-alpha", "16", "--seed", "0",
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
        t0 = time.time()
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired as e:
            fail(f"torchrun did not finish in {args.timeout}s: {(e.stdout or '')[-2000:]}")
        train_s = time.time() - t0
        if r.returncode != 0:
            fail(f"torchrun exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        lines = json_lines(r.stdout)
        for l in lines:
            if l.get("event") in ("data", "epoch", "rank_done", "done"):
                print("  " + json.dumps(l))
        done = {l["rank"] for l in lines if l.get("event") == "rank_done" and l.get("world_size") == WORKERS}
        if done != set(range(WORKERS)):
            fail(f"ranks that finished: {sorted(done)}, want {list(range(WORKERS))}")

        if len(export_hits) != 1:
            fail(f"the corrections export was fetched {len(export_hits)} times, want once (rank 0, then broadcast)")

        m = json.load(open(os.path.join(out, "train_metrics.json")))
        if m["world_size"] != WORKERS or len(m["per_rank"]) != WORKERS or any(p["steps"] == 0 for p in m["per_rank"]):
            fail(f"not every worker trained: {m['per_rank']}")
        if sum(p["examples"] for p in m["per_rank"]) != n_pairs * args.epochs:
            fail(f"the shards do not cover the data once per epoch: {m['per_rank']}")
        if m["examples_used"] != n_pairs or m["examples_skipped"] != want_skipped:
            fail(f"examples used {m['examples_used']} skipped {m['examples_skipped']}, want {n_pairs} {want_skipped}")
        first, last = m["first_loss"], m["last_loss"]
        if not (last < 0.5 * first):
            fail(f"loss did not fall clearly: epoch losses {m['epoch_losses']}")
        if not os.path.isfile(os.path.join(ckpt, "last.pt")):
            fail("no checkpoint written")

        ref = json.load(open(os.path.join(out, "reference.json")))
        node, url = start_node(args.node_bin, out)
        got = embed(url, ref["sentences"])
        stop(node)
        node = None
        to_ref = [cos(g, e) for g, e in zip(got, ref["embeddings"])]
        to_base = [cos(g, e) for g, e in zip(got, ref["base_embeddings"])]
        for s, c, b in zip(ref["sentences"], to_ref, to_base):
            print(f"  cos(prism-node, torch+adapter)={c:.6f} cos(prism-node, base)={b:.6f}  {s!r}")
        if len(got) != len(ref["sentences"]):
            fail(f"prism-node returned {len(got)} embeddings for {len(ref['sentences'])} sentences")
        if min(to_ref) < 0.999 and min(to_base) >= 0.9999:
            fail("prism-node served the base model: it ignored the adapter in the folder "
                 f"(cosine to PyTorch+adapter {min(to_ref):.4f}, to the base model {min(to_base):.6f})")
        if min(to_ref) < 0.999:
            fail(f"prism-node does not reproduce PyTorch with the adapter: cosines {to_ref}")
        if min(to_base) >= 0.9999:
            fail(f"the adapter changed nothing in prism-node's output (cosine to base {to_base})")
        band_cos, band_vs_full = check_sliding_window(args, ref)
        print(f"distributed_train: workers={WORKERS} first_loss={first:.4f} last_loss={last:.4f} "
              f"cosine_min={min(to_ref):.6f} examples={m['examples_used']} base_cosine_min={min(to_base):.4f} "
              f"skipped={sum(want_skipped.values())} train_s={train_s:.1f} "
              f"sliding_window_cosine_min={band_cos:.6f} sliding_vs_full_cosine_min={band_vs_full:.4f}", flush=True)
    finally:
        stop(node)
        if export:
            export.shutdown()
        if args.keep:
            print(f"  work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
