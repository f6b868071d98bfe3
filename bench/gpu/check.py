#!/usr/bin/env python3
"""The GPU check of the bundle that `make gpu-bundle` writes (target/gpu-bundle/).

Runs on a machine with an NVIDIA GPU, PyTorch (CUDA build) and the CUDA libraries that PyTorch's
wheels bring; needs no Rust, no network and nothing from the repository:

  python3 check.py [--out DIR]

1. Unpacks prism-node (built with --features cuda) and starts it on the GPU with the f16 MiniLM
   weights of the bundle, putting the CUDA libraries of this Python's nvidia wheels on its
   LD_LIBRARY_PATH.
2. Correctness: the node's vectors for the 512 sentences against a PyTorch fp32 BERT on the same
   GPU, fed the same token ids (cosine >= 0.999 for every sentence), and against
   sentence-transformers when it is installed.
3. Speed: the node over HTTP (4 client processes, requests of 32 and of 128 sentences) against
   PyTorch in-process, fp32 and fp16, length-sorted batches of 32 and 128 (the best PyTorch figure
   is the one to beat); batch-1 p99 of both.
4. The NVML gauges on the node's /metrics.

Last line: gpu: prism_sps=... torch_fp16_sps=... ratio=... p99_ms_b1=... cos_min=... nvml_series=...
ratio is the node's best throughput over the best PyTorch figure. Exits non-zero when a check fails
(cosine, NVML series, the node not starting), never because of a speed figure.

`--device cpu` runs the same steps with the node and PyTorch on the CPU (slowly): that is how the
script itself is tested on machines without a GPU.
"""
import argparse
import glob
import http.client
import json
import lzma
import math
import multiprocessing as mp
import os
import re
import shutil
import site
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = HERE / "model"


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def log(msg):
    print(f"gpu-check: {msg}", flush=True)


# --- PyTorch reference ------------------------------------------------------------------------
# BERT forward + mean pooling, written from the BERT paper / HF modeling_bert semantics with
# torch's fused attention (what transformers' "sdpa" path runs). Fed the token ids the bundle
# ships, so it needs neither tokenizers nor transformers on this machine.

def read_safetensors(torch, path):
    """The safetensors format read with torch alone (8-byte header size, JSON header, raw data),
    for GPU machines without the safetensors package."""
    try:
        from safetensors.torch import load_file
        return load_file(str(path))
    except ImportError:
        pass
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        a, b = meta["data_offsets"]
        buf = bytearray(raw[8 + n + a:8 + n + b])
        out[name] = torch.frombuffer(buf, dtype=dtypes[meta["dtype"]]).reshape(meta["shape"]).clone()
    return out


def load_bert(torch, device, dtype):
    cfg = json.loads((MODEL / "config.json").read_text())
    w = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
         for k, v in read_safetensors(torch, MODEL / "model.safetensors").items()}
    return cfg, w


def bert_embed(torch, cfg, w, ids_batch, device, dtype):
    F = torch.nn.functional
    n = len(ids_batch)
    L = max(len(x) for x in ids_batch)
    ids = torch.zeros((n, L), dtype=torch.long)
    mask = torch.zeros((n, L), dtype=torch.bool)
    for i, x in enumerate(ids_batch):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = True
    ids, mask = ids.to(device), mask.to(device)
    H, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
    d = H // heads
    e = "embeddings."
    pos = torch.arange(L, device=device)
    x = w[e + "word_embeddings.weight"][ids] + w[e + "position_embeddings.weight"][pos][None] \
        + w[e + "token_type_embeddings.weight"][0][None, None]
    x = F.layer_norm(x, (H,), w[e + "LayerNorm.weight"], w[e + "LayerNorm.bias"], eps)
    attn_mask = mask[:, None, None, :]
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        lin = lambda t, name: F.linear(t, w[p + name + ".weight"], w[p + name + ".bias"])
        split = lambda t: t.view(n, L, heads, d).transpose(1, 2)
        q = split(lin(x, "attention.self.query"))
        k = split(lin(x, "attention.self.key"))
        v = split(lin(x, "attention.self.value"))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        a = a.transpose(1, 2).reshape(n, L, H)
        x = F.layer_norm(x + lin(a, "attention.output.dense"), (H,),
                         w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
        h = F.gelu(lin(x, "intermediate.dense"))
        x = F.layer_norm(x + lin(h, "output.dense"), (H,),
                         w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
    m = mask[..., None].to(x.dtype)
    pooled = (x * m).sum(1) / m.sum(1).clamp(min=1)
    return F.normalize(pooled.float(), dim=-1)


def torch_bench(torch, device, ids, batch, dtype, cfg_w):
    """Sentences/s of the in-process PyTorch BERT over all sentences, length-sorted batches."""
    cfg, w = cfg_w
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.inference_mode():
        for _ in range(2):  # warm-up: kernels, allocator
            bert_embed(torch, cfg, w, [ids[i] for i in order[-batch:]], device, dtype)
        sync()
        best = 0.0
        for _ in range(3):
            t = time.perf_counter()
            for s in range(0, len(order), batch):
                bert_embed(torch, cfg, w, [ids[i] for i in order[s:s + batch]], device, dtype).cpu()
            sync()
            best = max(best, len(ids) / (time.perf_counter() - t))
    return best


def torch_b1(torch, device, ids, dtype, cfg_w, n=200):
    cfg, w = cfg_w
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    lat = []
    with torch.inference_mode():
        for x in ids[:10]:
            bert_embed(torch, cfg, w, [x], device, dtype).cpu()
        for x in ids[:n]:
            t = time.perf_counter()
            bert_embed(torch, cfg, w, [x], device, dtype).cpu()
            sync()
            lat.append((time.perf_counter() - t) * 1e3)
    return lat


def sentence_transformers_figures(device, sents):
    """sentence-transformers on the bundle's model folder, when it is installed: its vectors and
    its fp32/fp16 sentences/s at batch 32 and 128. None when it is not installed or cannot load."""
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except Exception as e:  # noqa: BLE001 - optional anchor
        log(f"sentence-transformers not available ({type(e).__name__}); the PyTorch BERT is the anchor")
        return None
    try:
        m = SentenceTransformer(str(MODEL), device=device)
        m.max_seq_length = 256
        vecs = m.encode(sents, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        sps = {}
        for dtype_name in ("fp32", "fp16"):
            if dtype_name == "fp16":
                if device != "cuda":
                    break
                m = m.half()
            for b in (32, 128):
                m.encode(sents[:b], batch_size=b)
                best = 0.0
                for _ in range(3):
                    t = time.perf_counter()
                    m.encode(sents, batch_size=b)  # sorts by length internally
                    if device == "cuda":
                        torch.cuda.synchronize()
                    best = max(best, len(sents) / (time.perf_counter() - t))
                sps[f"st_{dtype_name}_b{b}"] = best
        return vecs, sps
    except Exception as e:  # noqa: BLE001 - optional anchor
        log(f"sentence-transformers could not run on the bundle's model ({e}); skipped")
        return None


# --- the node ---------------------------------------------------------------------------------

def cuda_library_dirs():
    """Every lib folder of this Python's nvidia-* wheels (cuBLAS, cudart, curand, ...)."""
    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "lib")))
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "cu*", "lib")))
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def start_node(binary, device, workdir, extra_ld):
    env = dict(os.environ, RUST_LOG="info")
    env["LD_LIBRARY_PATH"] = ":".join(cuda_library_dirs() + extra_ld + [env.get("LD_LIBRARY_PATH", "")]).strip(":")
    err = open(workdir / "node.log", "w")
    proc = subprocess.Popen(
        [str(binary), "--listen", "127.0.0.1:0", "--node-name", "gpu-check", "--architecture", "bert",
         "--device", device, "--model-uri", f"file://{MODEL}", "--max-batch", "128", "--max-wait-ms", "0",
         "--max-queue", "4096", "--max-inputs", "256"],
        stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    line = proc.stdout.readline()
    m = re.match(r"listening on http://([\d.]+):(\d+)", line)
    if not m:
        proc.wait(5)
        raise SystemExit(f"gpu-check: FAIL: prism-node did not start ({line!r}); its log:\n"
                         + (workdir / "node.log").read_text()[-3000:])
    host, port = m.group(1), int(m.group(2))
    deadline = time.time() + 600  # the first start on a GPU JIT-compiles candle's PTX
    while True:
        if proc.poll() is not None:
            raise SystemExit("gpu-check: FAIL: prism-node exited while loading; its log:\n"
                             + (workdir / "node.log").read_text()[-3000:])
        try:
            c = http.client.HTTPConnection(host, port, timeout=5)
            c.request("GET", "/ready")
            r = c.getresponse(); r.read()
            if r.status == 200:
                break
        except OSError:
            pass
        if time.time() > deadline:
            raise SystemExit("gpu-check: FAIL: prism-node not ready in 600 s")
        time.sleep(0.2)
    return proc, host, port


def embed(conn, batch):
    conn.request("POST", "/embed", body=json.dumps({"inputs": batch}), headers={"content-type": "application/json"})
    r = conn.getresponse(); body = r.read()
    if r.status != 200:
        raise RuntimeError(f"prism-node answered {r.status}: {body[:300]!r}")
    return json.loads(body)["embeddings"]


def _client(args):
    host, port, batches, rounds = args
    conn = http.client.HTTPConnection(host, port, timeout=60)
    n = 0
    for _ in range(rounds):
        for b in batches:
            conn.request("POST", "/embed", body=json.dumps({"inputs": b}), headers={"content-type": "application/json"})
            r = conn.getresponse(); r.read()
            if r.status != 200:
                raise RuntimeError(f"prism-node answered {r.status}")
            n += len(b)
    return n


def node_throughput(host, port, sents, req_size, clients, rounds):
    """Sentences/s with `clients` processes each sending every sentence `rounds` times in requests
    of req_size (length-sorted, as the PyTorch side batches)."""
    ordered = sorted(sents, key=len)
    batches = [ordered[i:i + req_size] for i in range(0, len(ordered), req_size)]
    # spawn: the parent holds a CUDA context and torch's threads, which a fork must not copy.
    with mp.get_context("spawn").Pool(clients) as pool:
        pool.map(_client, [(host, port, batches, 1)] * clients)  # warm-up
        t = time.perf_counter()
        n = sum(pool.map(_client, [(host, port, batches, rounds)] * clients))
        return n / (time.perf_counter() - t)


def nvml_series(host, port):
    c = http.client.HTTPConnection(host, port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    names, bad = set(), []
    for line in text.splitlines():
        m = re.match(r"^(prism_node_gpu_[a-z_]+)\{([^}]*)\} (\S+)", line)
        if not m:
            continue
        name, labels, v = m.group(1), m.group(2), float(m.group(3))
        if not re.search(r'uuid="(GPU|MIG)-', labels):
            bad.append(f"{name} has no GPU-/MIG- uuid: {line}")
        if name.endswith("utilization_ratio") and not 0 <= v <= 1:
            bad.append(f"utilization {v} outside [0, 1]")
        if name.endswith("memory_total_bytes") and v <= 0:
            bad.append(f"memory total {v} <= 0")
        names.add(name)
    return len(names), bad, [l for l in text.splitlines() if l.startswith("prism_node_gpu_")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--bin", type=Path, help="a prism-node binary (default: the bundle's prism-node.xz)")
    ap.add_argument("--ld-path", action="append", default=[], help="extra LD_LIBRARY_PATH folder for the node")
    ap.add_argument("--out", type=Path, help="write result.json and node.log here")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the sentences per client in the throughput runs")
    ap.add_argument("--quick", action="store_true", help="fewer sentences and rounds (script tests)")
    a = ap.parse_args()

    import torch
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-check: FAIL: torch.cuda.is_available() is False (no GPU, or a CPU-only PyTorch)")
    data = json.loads((HERE / "sentences.json").read_text())
    sents, ids = data["sentences"], data["token_ids"]
    if a.quick:
        sents, ids, a.rounds = sents[:64], ids[:64], 1
    gpu_name = torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu"
    log(f"{gpu_name}, torch {torch.__version__}, {len(sents)} sentences")

    work = Path(tempfile.mkdtemp(prefix="prism-gpu-check-"))
    binary = a.bin
    if binary is None:
        binary = work / "prism-node"
        with lzma.open(HERE / "prism-node.xz") as src, open(binary, "wb") as dst:
            shutil.copyfileobj(src, dst)
        binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    proc = None
    result = {"device": gpu_name, "torch": torch.__version__}
    failures = []
    try:
        t = time.time()
        proc, host, port = start_node(binary, a.device, work, a.ld_path)
        result["node_ready_s"] = round(time.time() - t, 1)
        conn = http.client.HTTPConnection(host, port, timeout=60)
        conn.request("GET", "/info")
        info = json.loads(conn.getresponse().read())
        log(f"node ready in {result['node_ready_s']} s: {info}")
        if a.device == "cuda" and not str(info.get("device", "")).startswith("cuda"):
            failures.append(f"node reports device {info.get('device')!r}, not cuda")

        # Correctness.
        node_vecs = []
        for i in range(0, len(sents), 32):
            node_vecs += embed(conn, sents[i:i + 32])
        nv = torch.tensor(node_vecs, dtype=torch.float64)
        nv = nv / nv.norm(dim=1, keepdim=True)
        fp32 = load_bert(torch, a.device, torch.float32)
        with torch.inference_mode():
            ref = torch.cat([bert_embed(torch, *fp32, ids[i:i + 32], a.device, torch.float32).cpu()
                             for i in range(0, len(ids), 32)]).double()
        cos = (nv * ref).sum(1)
        result["cos_min"] = float(cos.min())
        log(f"cosine vs PyTorch fp32 BERT (same token ids): min {cos.min():.6f} mean {cos.mean():.6f}")
        if not cos.min() >= 0.999:
            failures.append(f"cosine vs PyTorch fp32 {cos.min():.6f} < 0.999 (sentence {int(cos.argmin())})")

        st = sentence_transformers_figures(a.device, sents)
        if st is not None:
            sv = torch.tensor(st[0], dtype=torch.float64)
            scos = (nv * (sv / sv.norm(dim=1, keepdim=True))).sum(1)
            result["cos_min_sentence_transformers"] = float(scos.min())
            log(f"cosine vs sentence-transformers: min {scos.min():.6f}")
            if not scos.min() >= 0.999:
                failures.append(f"cosine vs sentence-transformers {scos.min():.6f} < 0.999")
            result.update({k: round(v, 1) for k, v in st[1].items()})

        # Speed: the node.
        for req in (32, 128):
            for clients in (1, 4):
                sps = node_throughput(host, port, sents, req, clients, a.rounds)
                result[f"prism_req{req}_c{clients}"] = round(sps, 1)
                log(f"prism-node over HTTP, requests of {req}, {clients} client(s): {sps:.0f} sentences/s")
        lat = []
        for s in sents[:10]:
            embed(conn, [s])
        for s in sents[:200]:
            t = time.perf_counter(); embed(conn, [s]); lat.append((time.perf_counter() - t) * 1e3)
        result["prism_p50_ms_b1"], result["prism_p99_ms_b1"] = round(pct(lat, 50), 2), round(pct(lat, 99), 2)
        log(f"prism-node batch 1 over HTTP: p50 {pct(lat, 50):.2f} ms p99 {pct(lat, 99):.2f} ms")

        # Speed: PyTorch in-process.
        dtypes = [("fp32", torch.float32)] + ([("fp16", torch.float16)] if a.device == "cuda" else [])
        for name, dt in dtypes:
            cw = fp32 if dt == torch.float32 else load_bert(torch, a.device, dt)
            for b in (32, 128):
                sps = torch_bench(torch, a.device, ids, b, dt, cw)
                result[f"torch_{name}_b{b}"] = round(sps, 1)
                log(f"PyTorch {name} in-process, sorted batch {b}: {sps:.0f} sentences/s")
        tl = torch_b1(torch, a.device, ids, torch.float32, fp32)
        result["torch_p50_ms_b1"], result["torch_p99_ms_b1"] = round(pct(tl, 50), 2), round(pct(tl, 99), 2)
        log(f"PyTorch fp32 batch 1 in-process: p50 {pct(tl, 50):.2f} ms p99 {pct(tl, 99):.2f} ms")

        n, bad, lines = nvml_series(host, port)
        result["nvml_series"] = n
        for l in lines:
            log(f"  {l}")
        if a.device == "cuda":
            failures += bad
            if n < 3:
                failures.append(f"{n} prism_node_gpu_* series on /metrics, expected 3")
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if a.out:
            a.out.mkdir(parents=True, exist_ok=True)
            shutil.copy(work / "node.log", a.out / "node.log") if (work / "node.log").exists() else None
            (a.out / "result.json").write_text(json.dumps(result, indent=1))
        shutil.rmtree(work, ignore_errors=True)

    prism = max(v for k, v in result.items() if k.startswith("prism_req"))
    torch_keys = [k for k in result if k.startswith(("torch_fp", "st_fp"))]
    best_key = max(torch_keys, key=lambda k: result[k])
    fp16 = max([v for k, v in result.items() if k.startswith(("torch_fp16", "st_fp16"))], default=0.0)
    line = (f"gpu: prism_sps={prism:.0f} torch_fp16_sps={fp16:.0f} ratio={prism / result[best_key]:.2f} "
            f"best_torch={best_key}:{result[best_key]:.0f} p99_ms_b1={result['prism_p99_ms_b1']:.2f} "
            f"torch_p99_ms_b1={result['torch_p99_ms_b1']:.2f} cos_min={result['cos_min']:.6f} "
            f"nvml_series={result['nvml_series']}")
    st_best = max([v for k, v in result.items() if k.startswith("st_fp")], default=0.0)
    if st_best:
        line += f" sentence_transformers_sps={st_best:.0f} ratio_vs_st={prism / st_best:.2f}"
    for f in failures:
        log(f"FAIL: {f}")
    print(line, flush=True)
    if a.out:
        (a.out / "line.txt").write_text(line + "\n")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
