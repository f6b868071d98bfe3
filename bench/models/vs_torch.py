#!/usr/bin/env python3
"""`make bench-models-torch` (and the first step of `make bench-models`): each non-text modality's
prism-node against PyTorch running the same weights, in the same run, on the same inputs.

- vision: vit-digits (HF `ViTModel`, transformers) on its 50 held-out digit PNGs, batch 32; the
  embedding is `pooler_output`, L2-normalised.
- audio: whisper-base's encoder (transformers `WhisperEncoder` with the node's own safetensors) on
  the spoken-digit clips of .cache/data/digits-pairs, batch 4. HF pads every clip to whisper's 30 s
  window (its encoder refuses anything else), and so does the node by default
  (`--audio-window full`): `audio_ratio` compares the same work. `audio_clip_ratio` is the node
  with `--audio-window clip` (only the clip's frames: what spec.model.audioWindow: clip buys)
  against the same PyTorch figure, with its cosine to the full-window vectors.
- fusion: the mot-fusion checkpoint (scripts/make-fusion-model.py's layout), its forward written
  here in PyTorch from that script's numpy reference, on 3 modality embeddings per item, batch 32.

The ratios (`vision_ratio`, ...) compare like with like: the node's encoder in-process on inputs
prepared beforehand (node-image/examples/forward.rs) against PyTorch's forward on prepared tensors.
`*_http_ratio` is the node served end to end over HTTP (JSON, base64 files, decoding and
preprocessing included) against the same PyTorch forward: for models this small the request
itself costs more than the model. Both use 2 threads. Every answer the node serves is checked
against PyTorch's (cosine), so the ratios compare the same function. Last line:
`models-torch: vision_ratio=... audio_ratio=... audio_clip_ratio=... fusion_ratio=... ...`;
the figures are also written to .cache/bench/models-torch.json for bench/models/run.py's line.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time
import wave

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "common"))
from prism_up import MODELS_DIR, ROOT, TARGET, b64, call, fail, headline, log  # noqa: E402

THREADS = 2
DATA = os.path.join(ROOT, ".cache", "data", "digits-pairs")
OUT_JSON = os.path.join(ROOT, ".cache", "bench", "models-torch.json")


def start_node(binary, model, arch, extra=()):
    env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS), RUST_LOG="warn")
    proc = subprocess.Popen([binary, "--listen", "127.0.0.1:0", "--model-uri", model, "--architecture", arch,
                             "--node-name", arch, "--threads", str(THREADS), "--max-batch", "32",
                             "--max-wait-ms", "1", *extra], stdout=subprocess.PIPE, text=True, env=env)
    m = re.match(r"listening on (http://[\d.]+:\d+)", proc.stdout.readline())
    if not m:
        proc.kill()
        fail(f"prism-node {arch} did not start")
    url = m.group(1)
    deadline = time.time() + 120
    while call(url + "/ready", timeout=5)[0] != 200:
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            fail(f"prism-node {arch} not ready in 120 s")
        time.sleep(0.1)
    return proc, url


def served_rate(binary, model_dir, arch, items, batch, rounds, extra=()):
    """A node of `arch` serving `model_dir`: items/s of `rounds` sequential /embed calls of `batch`
    items (after it answered every item once), and the vectors of those items."""
    proc, url = start_node(binary, model_dir, arch, extra)
    try:
        return prism_rate(url, items, batch, rounds)
    finally:
        proc.kill()


def prism_rate(url, items, batch, rounds):
    def embed(chunk):
        status, body, _ = call(url + "/embed", {"inputs": chunk}, timeout=300)
        if status != 200:
            fail(f"{url}/embed answered {status}: {str(body)[:300]}")
        return body["embeddings"]

    vectors = [v for i in range(0, len(items), batch) for v in embed(items[i:i + batch])]
    # Request bodies encoded before the clock starts, as PyTorch gets its tensors prepared:
    # Python's json.dumps of 32 fusion items (30k floats) alone took 3x the node's answer.
    bodies = [json.dumps({"inputs": [items[(r * batch + i) % len(items)] for i in range(batch)]}).encode()
              for r in range(rounds)]
    t = time.perf_counter()
    for body in bodies:
        status, answer, _ = call(url + "/embed", body, timeout=300)
        if status != 200:
            fail(f"{url}/embed answered {status}: {str(answer)[:300]}")
    return batch * rounds / (time.perf_counter() - t), vectors


def forward_rate(example, arch, model_dir, items, batch, rounds, window="full"):
    """items/s of the node's encoder in-process on prepared inputs (node-image/examples/forward.rs),
    the same clock PyTorch gets."""
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(items, f)
        f.flush()
        r = subprocess.run([example, arch, model_dir, f.name, str(batch), str(rounds), window], capture_output=True,
                           text=True, env=dict(os.environ, RAYON_NUM_THREADS=str(THREADS), RUST_LOG="warn"))
    if r.returncode != 0:
        fail(f"forward {arch} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)["forward_ips"]


def torch_rate(torch, forward, inputs, batch, rounds):
    """items/s of `forward` over batches cut from the prepared `inputs` (a tensor or a dict of
    tensors, first dimension = items), and its vectors for every item."""
    n = len(inputs) if not isinstance(inputs, dict) else len(next(iter(inputs.values())))
    take = lambda idx: {k: v[idx] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[idx]
    with torch.inference_mode():
        vectors = torch.cat([forward(take(slice(i, i + batch))) for i in range(0, n, batch)])
        t = time.perf_counter()
        for r in range(rounds):
            idx = torch.tensor([(r * batch + i) % n for i in range(batch)])
            forward(take(idx))
        rate = batch * rounds / (time.perf_counter() - t)
    return rate, torch.nn.functional.normalize(vectors, dim=-1)


def cos_min(torch, prism_vectors, torch_vectors):
    p = torch.nn.functional.normalize(torch.tensor(prism_vectors, dtype=torch.float32), dim=-1)
    return float((p * torch_vectors).sum(-1).min())


def read_wav(path):
    w = wave.open(path)
    if w.getframerate() != 16000 or w.getsampwidth() != 2 or w.getnchannels() != 1:
        fail(f"{path}: want 16 kHz 16-bit mono")
    import numpy as np
    return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def vision(torch, binary, example):
    import numpy as np
    from PIL import Image
    from transformers import ViTModel
    model_dir = os.path.join(MODELS_DIR, "vit-digits")
    samples = os.path.join(model_dir, "samples")
    files = sorted(os.path.join(samples, f) for f in os.listdir(samples) if f.endswith(".png"))
    model = ViTModel.from_pretrained(model_dir).eval()
    # ViTImageProcessor of preprocessor_config.json: 32x32 bilinear, /255, (x - 0.5) / 0.5.
    px = np.stack([np.asarray(Image.open(f).convert("RGB").resize((32, 32), Image.BILINEAR), dtype=np.float32)
                   for f in files]) / 255.0
    px = torch.tensor((px - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()
    torch_ips, tv = torch_rate(torch, lambda x: model(pixel_values=x).pooler_output, px, 32, 16)
    items = [{"image_base64": b64(f)} for f in files]
    prism_ips, pv = served_rate(binary, model_dir, "vit", items, 32, 16)
    return {"prism_ips": prism_ips, "forward_ips": forward_rate(example, "vit", model_dir, items, 32, 16),
            "torch_ips": torch_ips, "cos_min": cos_min(torch, pv, tv), "items": len(files)}


def audio(torch, binary, example):
    import numpy as np
    from safetensors.torch import load_file
    from transformers import WhisperConfig, WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    model_dir = os.path.join(MODELS_DIR, "whisper-base-encoder")
    manifest = json.load(open(os.path.join(DATA, "manifest.json")))
    files = [os.path.join(DATA, a["file"]) for a in manifest["audio"] if a["split"] == "test"][:8]
    waves = [read_wav(f) for f in files]
    encoder = WhisperEncoder(WhisperConfig.from_pretrained(model_dir)).eval()
    prefix = "model.encoder."
    state = {k[len(prefix):]: v for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items()
             if k.startswith(prefix)}
    encoder.load_state_dict(state, strict=True)
    features = WhisperFeatureExtractor.from_pretrained(model_dir)(
        waves, sampling_rate=16000, return_tensors="pt").input_features
    # The node's vector: the mean over the encoder frames that cover real audio (2 mel frames each).
    real = torch.tensor([min(1500, max(1, -(-(-(-len(w) // 160)) // 2))) for w in waves])

    def forward(batch):
        states = encoder(batch["x"]).last_hidden_state
        mask = (torch.arange(states.shape[1])[None, :] < batch["real"][:, None]).unsqueeze(-1)
        return (states * mask).sum(1) / batch["real"][:, None]

    torch_ips, tv = torch_rate(torch, forward, {"x": features, "real": real}, 4, 4)
    items = [{"audio_base64": b64(f)} for f in files]
    out = {"torch_ips": torch_ips, "items": len(files)}
    for window in ("full", "clip"):
        ips, pv = served_rate(binary, model_dir, "whisper-encoder", items, 4, 4, ["--audio-window", window])
        out[f"prism_{window}_ips"] = ips
        out[f"forward_{window}_ips"] = forward_rate(example, "whisper-encoder", model_dir, items, 4, 4, window)
        out[f"{window}_cos_min"] = cos_min(torch, pv, tv)
    return out


def fusion(torch, binary, example):
    from safetensors.torch import load_file
    model_dir = os.path.join(MODELS_DIR, "mot-fusion")
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    W = load_file(os.path.join(model_dir, "model.safetensors"))
    F = torch.nn.functional
    mods = sorted(cfg["modalities"])
    h, heads, eps = cfg["hidden_size"], cfg["num_heads"], cfg["layer_norm_eps"]
    lin = lambda x, p: F.linear(x, W[p + ".weight"], W[p + ".bias"])
    ln = lambda x, p: F.layer_norm(x, (h,), W[p + ".weight"], W[p + ".bias"], eps)

    def forward(emb):
        # Mixture-of-Transformers (make-fusion-model.py `mot`): one token per modality, each with
        # its own projection, norms, attention projections and MLP; attention over all tokens.
        x = torch.stack([lin(emb[m], f"proj.{m}") + W[f"type.{m}"] for m in mods], dim=1)
        b, t = x.shape[:2]
        split = lambda z: z.view(b, t, heads, h // heads).transpose(1, 2)
        for i in range(cfg["num_layers"]):
            p = [f"layers.{i}.{m}." for m in mods]
            y = [ln(x[:, j], p[j] + "ln1") for j in range(t)]
            q, k, v = (torch.stack([lin(y[j], p[j] + "attn." + w) for j in range(t)], 1) for w in "qkv")
            a = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, t, h)
            x = torch.stack([x[:, j] + lin(a[:, j], p[j] + "attn.o") for j in range(t)], 1)
            x = torch.stack([x[:, j] + lin(F.gelu(lin(ln(x[:, j], p[j] + "ln2"), p[j] + "mlp.fc1")), p[j] + "mlp.fc2")
                             for j in range(t)], 1)
        return torch.stack([ln(x[:, j], f"final_ln.{m}") for j, m in enumerate(mods)], 1).mean(1)

    g = torch.Generator().manual_seed(5)
    n = 256
    emb = {m: F.normalize(torch.randn(n, d, generator=g), dim=-1) for m, d in sorted(cfg["modalities"].items())}
    torch_ips, tv = torch_rate(torch, forward, emb, 32, 32)
    items = [{"embeddings": {m: emb[m][i].tolist() for m in mods}} for i in range(n)]
    prism_ips, pv = served_rate(binary, model_dir, "mot-fusion", items, 32, 32)
    return {"prism_ips": prism_ips, "forward_ips": forward_rate(example, "mot-fusion", model_dir, items, 32, 32),
            "torch_ips": torch_ips, "cos_min": cos_min(torch, pv, tv), "items": n}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(TARGET, "release", "prism-node"))
    ap.add_argument("--forward", default=os.path.join(TARGET, "release", "examples", "forward"))
    ap.add_argument("--no-append", action="store_true", help="do not record the run in bench/RESULTS.md")
    args = ap.parse_args()
    try:
        import torch
        import transformers
    except ImportError as e:
        fail(f"{e}: run with bench/.venv/bin/python after `make bench-models-torch` installs it")
    for m in ("vit-digits", "whisper-base-encoder", "mot-fusion"):
        if not os.path.isdir(os.path.join(MODELS_DIR, m)):
            fail(f"{MODELS_DIR}/{m} is missing: run `make models`")
    if not os.path.exists(os.path.join(DATA, "manifest.json")):
        fail(f"{DATA}/manifest.json is missing: run `make models`")
    torch.set_num_threads(THREADS)
    load_before = os.getloadavg()[0]
    log(f"PyTorch {torch.__version__}, transformers {transformers.__version__}, {THREADS} threads")
    v = vision(torch, args.bin, args.forward)
    log(f"vision: prism forward {v['forward_ips']:.0f}/s, over HTTP {v['prism_ips']:.0f}/s; torch {v['torch_ips']:.0f}/s; "
        f"cos_min {v['cos_min']:.5f}")
    a = audio(torch, args.bin, args.forward)
    log(f"audio: prism forward full {a['forward_full_ips']:.2f}/s clip {a['forward_clip_ips']:.2f}/s, over HTTP full "
        f"{a['prism_full_ips']:.2f}/s clip {a['prism_clip_ips']:.2f}/s; torch {a['torch_ips']:.2f}/s; "
        f"cos_min full {a['full_cos_min']:.5f} clip {a['clip_cos_min']:.4f}")
    f = fusion(torch, args.bin, args.forward)
    log(f"fusion: prism forward {f['forward_ips']:.0f}/s, over HTTP {f['prism_ips']:.0f}/s; torch {f['torch_ips']:.0f}/s; "
        f"cos_min {f['cos_min']:.5f}")
    result = {"vision_ratio": v["forward_ips"] / v["torch_ips"], "audio_ratio": a["forward_full_ips"] / a["torch_ips"],
              "audio_clip_ratio": a["forward_clip_ips"] / a["torch_ips"], "fusion_ratio": f["forward_ips"] / f["torch_ips"],
              "vision_http_ratio": v["prism_ips"] / v["torch_ips"], "audio_http_ratio": a["prism_full_ips"] / a["torch_ips"],
              "fusion_http_ratio": f["prism_ips"] / f["torch_ips"]}
    line = (f"models-torch: vision_ratio={result['vision_ratio']:.2f} audio_ratio={result['audio_ratio']:.2f} "
            f"audio_clip_ratio={result['audio_clip_ratio']:.2f} fusion_ratio={result['fusion_ratio']:.2f} "
            f"vision_http_ratio={result['vision_http_ratio']:.2f} audio_http_ratio={result['audio_http_ratio']:.2f} "
            f"fusion_http_ratio={result['fusion_http_ratio']:.2f} "
            f"vision_cos_min={v['cos_min']:.5f} audio_cos_min={a['full_cos_min']:.5f} "
            f"audio_clip_cos_min={a['clip_cos_min']:.4f} fusion_cos_min={f['cos_min']:.5f} "
            f"torch_vision_ips={v['torch_ips']:.0f} torch_audio_ips={a['torch_ips']:.2f} torch_fusion_ips={f['torch_ips']:.0f}")
    os.makedirs(os.path.dirname(OUT_JSON), exist_ok=True)
    with open(OUT_JSON, "w") as out:
        json.dump(dict(result, at=time.time(), line=line), out)
    headline(args, "models-torch", "models: each modality's node against PyTorch on the same weights", __doc__.split("\n\n", 1)[1],
             line, f"{THREADS} threads, PyTorch {torch.__version__}", load_before)


if __name__ == "__main__":
    main()
