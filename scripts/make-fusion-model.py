#!/usr/bin/env python3
"""Writes seeded fusion checkpoints for prism-node's `perceiver-fusion` and `mot-fusion` backends
(layout documented in node-image/src/backend/fusion.rs): config.json + model.safetensors, plus
reference.json with embeddings from the float64 numpy forward passes below, for inputs with every
modality and with modalities missing.

The weights are SEEDED RANDOM (not trained): a test fixture for the exact layout and math the node
runs (node-image/tests/fusion.rs). Trained fusion nodes come from `prism train fusion` (`make
train-fusion`: .cache/models/digits-fusion/{perceiver,mot}), which writes the same layout.
Modalities and dims: text 384 (all-MiniLM-L6-v2), vision 64 (vit-digits), audio 512 (whisper-base).

Usage: make-fusion-model.py <models-dir>   (writes <models-dir>/perceiver-fusion and /mot-fusion)
"""
import json
import os
import sys
from math import erf

import numpy as np
from safetensors.numpy import save_file

MODALITIES = {"audio": 512, "text": 384, "vision": 64}
H, HEADS, LAYERS, FFN, LATENTS, EPS = 128, 4, 2, 256, 8, 1e-5
_erf = np.vectorize(erf)


def gelu(x):
    return 0.5 * x * (1 + _erf(x / np.sqrt(2)))


def ln(x, W, p):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + EPS) * W[p + ".weight"] + W[p + ".bias"]


def lin(x, W, p):
    return x @ W[p + ".weight"].T + W[p + ".bias"]


def attend(q, k, v):
    hd = H // HEADS
    split = lambda t: t.reshape(len(t), HEADS, hd).transpose(1, 0, 2)
    s = split(q) @ split(k).transpose(0, 2, 1) / np.sqrt(hd)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return (s @ split(v)).transpose(1, 0, 2).reshape(len(q), H)


def mha(x, ctx, W, p):
    return lin(attend(lin(x, W, p + ".q"), lin(ctx, W, p + ".k"), lin(ctx, W, p + ".v")), W, p + ".o")


def tokens(emb, W):
    return np.stack([lin(np.asarray(emb[m], dtype=np.float64), W, f"proj.{m}") + W[f"type.{m}"] for m in sorted(emb)])


def l2(v):
    return v / np.linalg.norm(v)


def perceiver(emb, W):
    x = tokens(emb, W)
    lat = W["latents"]
    lat = lat + mha(ln(lat, W, "cross.ln_q"), ln(x, W, "cross.ln_kv"), W, "cross.attn")
    lat = lat + lin(gelu(lin(ln(lat, W, "cross.ln2"), W, "cross.mlp.fc1")), W, "cross.mlp.fc2")
    for i in range(LAYERS):
        p = f"layers.{i}."
        y = ln(lat, W, p + "ln1")
        lat = lat + mha(y, y, W, p + "attn")
        lat = lat + lin(gelu(lin(ln(lat, W, p + "ln2"), W, p + "mlp.fc1")), W, p + "mlp.fc2")
    return l2(ln(lat, W, "final_ln").mean(0))


def mot(emb, W):
    mods = sorted(emb)
    x = tokens(emb, W)
    for i in range(LAYERS):
        P = [f"layers.{i}.{m}." for m in mods]
        h = [ln(x[j], W, P[j] + "ln1") for j in range(len(mods))]
        q = np.stack([lin(h[j], W, P[j] + "attn.q") for j in range(len(mods))])
        k = np.stack([lin(h[j], W, P[j] + "attn.k") for j in range(len(mods))])
        v = np.stack([lin(h[j], W, P[j] + "attn.v") for j in range(len(mods))])
        a = attend(q, k, v)
        x = np.stack([x[j] + lin(a[j], W, P[j] + "attn.o") for j in range(len(mods))])
        x = np.stack([x[j] + lin(gelu(lin(ln(x[j], W, P[j] + "ln2"), W, P[j] + "mlp.fc1")), W, P[j] + "mlp.fc2")
                      for j in range(len(mods))])
    return l2(np.stack([ln(x[j], W, f"final_ln.{m}") for j, m in enumerate(mods)]).mean(0))


def linear(W, rng, p, n_in, n_out):
    W[p + ".weight"] = rng.normal(0, 1 / np.sqrt(n_in), (n_out, n_in))
    W[p + ".bias"] = rng.normal(0, 0.02, n_out)


def norm(W, rng, p):
    W[p + ".weight"] = 1 + rng.normal(0, 0.05, H)
    W[p + ".bias"] = rng.normal(0, 0.02, H)


def block(W, rng, p):
    norm(W, rng, p + "ln1"); norm(W, rng, p + "ln2")
    for n in "qkvo":
        linear(W, rng, p + "attn." + n, H, H)
    linear(W, rng, p + "mlp.fc1", H, FFN)
    linear(W, rng, p + "mlp.fc2", FFN, H)


def common(W, rng):
    for m, d in MODALITIES.items():
        linear(W, rng, f"proj.{m}", d, H)
        W[f"type.{m}"] = rng.normal(0, 0.5, H)


def make_perceiver(rng):
    W = {}
    common(W, rng)
    W["latents"] = rng.normal(0, 1.0, (LATENTS, H))
    norm(W, rng, "cross.ln_q"); norm(W, rng, "cross.ln_kv"); norm(W, rng, "cross.ln2")
    for n in "qkvo":
        linear(W, rng, "cross.attn." + n, H, H)
    linear(W, rng, "cross.mlp.fc1", H, FFN)
    linear(W, rng, "cross.mlp.fc2", FFN, H)
    for i in range(LAYERS):
        block(W, rng, f"layers.{i}.")
    norm(W, rng, "final_ln")
    return W


def make_mot(rng):
    W = {}
    common(W, rng)
    for i in range(LAYERS):
        for m in MODALITIES:
            block(W, rng, f"layers.{i}.{m}.")
    for m in MODALITIES:
        norm(W, rng, f"final_ln.{m}")
    return W


def main():
    root = sys.argv[1]
    rng = np.random.default_rng(8)
    inputs_rng = np.random.default_rng(88)
    full = {m: l2(inputs_rng.normal(size=d)).tolist() for m, d in MODALITIES.items()}
    cases = [full, {"text": full["text"], "vision": full["vision"]}, {"audio": full["audio"]}, {"vision": full["vision"]},
             {m: l2(inputs_rng.normal(size=d)).tolist() for m, d in MODALITIES.items()}]
    for arch, make, fwd in [("perceiver-fusion", make_perceiver, perceiver), ("mot-fusion", make_mot, mot)]:
        W = make(rng)
        W32 = {k: v.astype(np.float32) for k, v in W.items()}
        W64 = {k: v.astype(np.float64) for k, v in W32.items()}  # reference uses exactly the stored weights
        out = os.path.join(root, arch)
        os.makedirs(out, exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in W32.items()}, os.path.join(out, "model.safetensors"),
                  metadata={"format": "pt"})
        cfg = {"architecture": arch, "hidden_size": H, "num_heads": HEADS, "num_layers": LAYERS,
               "intermediate_size": FFN, "layer_norm_eps": EPS, "hidden_act": "gelu", "modalities": MODALITIES,
               "prism_note": "seeded random weights (scripts/make-fusion-model.py), not trained"}
        if arch == "perceiver-fusion":
            cfg["num_latents"] = LATENTS
        json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
        ref = [{"embeddings": c, "output": fwd(c, W64).tolist()} for c in cases]
        json.dump({"items": ref}, open(os.path.join(out, "reference.json"), "w"))
        print(f"make-fusion-model: {arch} ({sum(v.size for v in W32.values())} params) -> {out}")


if __name__ == "__main__":
    main()
