#!/usr/bin/env python3
"""Builds `vit-digits`: a small ViT in the exact HF `ViTModel` layout (config.json,
preprocessor_config.json, model.safetensors with `embeddings.*`, `encoder.layer.N.*`, `layernorm.*`,
`pooler.dense.*`), fitted to scikit-learn's 8x8 handwritten digits upscaled to 32x32 RGB.

Why: no registry package ships vision weights, and the vision node needs a model whose embeddings
mean something. This one is *constructed and fitted in closed form*, not gradient-trained:
  * patch embedding (8x8 patches) = whitened PCA of the training patches (content dims 0-3: a
    patch of a 4x-upscaled digit holds 2x2 source pixels, so rank 4);
  * position embeddings carry a one-hot of the patch index (dims 4-19) and mark the class token;
  * block 0's attention (16 heads of 4 dims) is set so that head h attends to patch h (query bias x
    key on the position code) and copies its 4 content dims into the class token: the class token
    becomes the whole image as 16 x 4 patch features;
  * blocks 1-3 and all MLPs are seeded random N(0, 0.02) (near-identity residual), so the file
    exercises every weight of the layout;
  * the pooler (dense + tanh) is fitted by linear discriminant analysis on the train split.
Everything is seeded: the same files come out every run.

Also writes samples/: 50 held-out test digits as 32x32 PNGs, and reference.json: their embeddings
from the float64 numpy forward pass below (independent of the Rust code), plus held-out retrieval
metrics in model_card.md.

Usage: make-vision-model.py <out-dir>
"""
import json
import os
import struct
import sys
import zlib
from math import erf

import numpy as np
from safetensors.numpy import save_file
from sklearn.datasets import load_digits

D, LAYERS, HEADS, FFN, PATCH, SIZE = 64, 4, 16, 128, 8, 32
CONTENT = 4  # an 8x8 patch of a 4x-upscaled 8x8 digit holds 2x2 source pixels: rank 4
EPS = 1e-12
rng = np.random.default_rng(20261125)


def to_rgb32(img8):
    """8x8 (0..16) -> 32x32x3 uint8 by 4x nearest upscaling (what the PNG samples hold)."""
    g = np.kron(img8, np.ones((4, 4))) * (255.0 / 16.0)
    g = np.clip(np.round(g), 0, 255).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def normalise(rgb):
    """HF ViTImageProcessor with rescale 1/255, mean 0.5, std 0.5 -> CHW float64."""
    x = rgb.astype(np.float64) / 255.0
    return ((x - 0.5) / 0.5).transpose(2, 0, 1)


def patches(chw):
    """CHW -> [16, 3*8*8] in conv weight order (c, kh, kw), row-major patch order."""
    c, h, w = chw.shape
    g = h // PATCH
    p = chw.reshape(c, g, PATCH, g, PATCH).transpose(1, 3, 0, 2, 4)
    return p.reshape(g * g, c * PATCH * PATCH)


def ln(x, w, b):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + EPS) * w + b


_erf = np.vectorize(erf)


def gelu(v):
    return 0.5 * v * (1 + _erf(v / np.sqrt(2)))


def forward(W, chw, pooled=True):
    """Float64 HF ViTModel forward for one image; returns the pooler output (or pre-pooler CLS)."""
    g = lambda n: W[n].astype(np.float64)
    pw = g("embeddings.patch_embeddings.projection.weight").reshape(D, -1)
    x = patches(chw) @ pw.T + g("embeddings.patch_embeddings.projection.bias")
    x = np.concatenate([g("embeddings.cls_token")[0], x], 0) + g("embeddings.position_embeddings")[0]
    hd = D // HEADS
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        y = ln(x, g(p + "layernorm_before.weight"), g(p + "layernorm_before.bias"))
        q, k, v = (y @ g(p + f"attention.attention.{n}.weight").T + g(p + f"attention.attention.{n}.bias")
                   for n in ("query", "key", "value"))
        split = lambda t: t.reshape(len(t), HEADS, hd).transpose(1, 0, 2)
        s = split(q) @ split(k).transpose(0, 2, 1) / np.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ split(v)).transpose(1, 0, 2).reshape(len(x), D)
        x = x + a @ g(p + "attention.output.dense.weight").T + g(p + "attention.output.dense.bias")
        y = ln(x, g(p + "layernorm_after.weight"), g(p + "layernorm_after.bias"))
        y = gelu(y @ g(p + "intermediate.dense.weight").T + g(p + "intermediate.dense.bias"))
        x = x + y @ g(p + "output.dense.weight").T + g(p + "output.dense.bias")
    cls = ln(x, g("layernorm.weight"), g("layernorm.bias"))[0]
    if not pooled:
        return cls
    return np.tanh(cls @ g("pooler.dense.weight").T + g("pooler.dense.bias"))


def build_weights(train_chw):
    r = lambda *s: rng.normal(0, 0.02, s)
    W = {}
    # Patch embedding: whitened PCA of training patches, top 32 components in dims 0-31.
    P = np.concatenate([patches(c) for c in train_chw], 0)
    mu = P.mean(0)
    evals, evecs = np.linalg.eigh(np.cov((P - mu).T))
    order = np.argsort(evals)[::-1][:CONTENT]
    comp = evecs[:, order].T / np.sqrt(evals[order] + 1e-6)[:, None]
    pw = np.zeros((D, P.shape[1]))
    pw[:CONTENT] = comp
    W["embeddings.patch_embeddings.projection.weight"] = pw.reshape(D, 3, PATCH, PATCH)
    W["embeddings.patch_embeddings.projection.bias"] = np.concatenate([-comp @ mu, np.zeros(D - CONTENT)])
    W["embeddings.cls_token"] = np.zeros((1, 1, D))
    pos = r(1, 17, D) * 0.1
    g = SIZE // PATCH
    for idx in range(g * g):
        pos[0, 1 + idx, CONTENT + idx] += 3.0  # patch one-hot
    pos[0, 0, CONTENT + g * g] += 3.0  # marks the class token
    W["embeddings.position_embeddings"] = pos
    hd = D // HEADS
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for n in ("layernorm_before", "layernorm_after"):
            W[p + n + ".weight"] = np.ones(D)
            W[p + n + ".bias"] = np.zeros(D)
        for n in ("query", "key", "value"):
            W[p + f"attention.attention.{n}.weight"] = r(D, D)
            W[p + f"attention.attention.{n}.bias"] = np.zeros(D)
        W[p + "attention.output.dense.weight"] = r(D, D)
        W[p + "attention.output.dense.bias"] = np.zeros(D)
        W[p + "intermediate.dense.weight"] = r(FFN, D)
        W[p + "intermediate.dense.bias"] = np.zeros(FFN)
        W[p + "output.dense.weight"] = r(D, FFN)
        W[p + "output.dense.bias"] = np.zeros(D)
    # Block 0: head h copies patch h's content into every token (the class token included).
    p = "encoder.layer.0."
    q_w = np.zeros((D, D)); q_b = np.zeros(D); k_w = np.zeros((D, D)); v_w = np.zeros((D, D))
    for h in range(HEADS):
        q_b[h * hd] = 4.0                     # constant query on the head's first dim
        k_w[h * hd, CONTENT + h] = 4.0        # key: the patch code (~6 after LayerNorm for patch h)
        for j in range(hd):
            v_w[h * hd + j, j] = 1.0          # value: the content dims
    W[p + "attention.attention.query.weight"] = q_w
    W[p + "attention.attention.query.bias"] = q_b
    W[p + "attention.attention.key.weight"] = k_w
    W[p + "attention.attention.value.weight"] = v_w
    W[p + "attention.output.dense.weight"] = np.eye(D) * 2.0
    W[p + "output.dense.weight"] = np.zeros((D, FFN))
    W["layernorm.weight"] = np.ones(D)
    W["layernorm.bias"] = np.zeros(D)
    W["pooler.dense.weight"] = np.zeros((D, D))
    W["pooler.dense.bias"] = np.zeros(D)
    return W


def fit_pooler(W, feats, labels):
    """LDA: directions maximising between-class over within-class scatter, scaled to unit std."""
    mu = feats.mean(0)
    Sw = np.zeros((D, D)); Sb = np.zeros((D, D))
    for c in range(10):
        f = feats[labels == c]
        m = f.mean(0)
        Sw += (f - m).T @ (f - m)
        Sb += len(f) * np.outer(m - mu, m - mu)
    Sw += 1e-3 * np.trace(Sw) / D * np.eye(D)
    evals, evecs = np.linalg.eig(np.linalg.solve(Sw, Sb))
    order = np.argsort(-evals.real)[:9]
    V = evecs[:, order].real.T  # [9, D]
    proj = (feats - mu) @ V.T
    V = V / proj.std(0)[:, None]
    w = np.zeros((D, D)); w[:9] = V
    b = np.zeros(D); b[:9] = -V @ mu
    W["pooler.dense.weight"] = w
    W["pooler.dense.bias"] = b


def png_bytes(rgb):
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def metrics(E, y):
    E = E / np.linalg.norm(E, axis=1, keepdims=True)
    S = E @ E.T
    np.fill_diagonal(S, -np.inf)
    nn1 = float((y[S.argmax(1)] == y).mean())
    np.fill_diagonal(S, np.nan)
    same = np.nanmean(np.where(y[:, None] == y[None, :], S, np.nan))
    diff = np.nanmean(np.where(y[:, None] != y[None, :], S, np.nan))
    return nn1, float(same), float(diff)


def main():
    out = sys.argv[1]
    d = load_digits()
    perm = rng.permutation(len(d.target))
    test_idx, train_idx = perm[:500], perm[500:]
    imgs = [to_rgb32(im) for im in d.images]
    chw = [normalise(im) for im in imgs]
    W = build_weights([chw[i] for i in train_idx])
    feats = np.stack([forward(W, chw[i], pooled=False) for i in train_idx])
    fit_pooler(W, feats, d.target[train_idx])
    test_E = np.stack([forward(W, chw[i]) for i in test_idx])
    nn1, same, diff = metrics(test_E, d.target[test_idx])
    print(f"make-vision-model: held-out 1-NN top-1 {nn1:.3f} (chance 0.1), mean cosine same digit {same:.3f}, different {diff:.3f}")

    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    save_file({k: np.ascontiguousarray(v.astype(np.float32)) for k, v in W.items()},
              os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    # Reference embeddings from the float32 weights as stored (what the node loads), in float64.
    W32 = {k: v.astype(np.float32) for k, v in W.items()}
    config = {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": D, "num_hidden_layers": LAYERS,
              "num_attention_heads": HEADS, "intermediate_size": FFN, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
              "layer_norm_eps": EPS, "image_size": SIZE, "patch_size": PATCH, "num_channels": 3,
              "qkv_bias": True, "encoder_stride": PATCH}
    json.dump(config, open(os.path.join(out, "config.json"), "w"), indent=2)
    pre = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": SIZE, "width": SIZE},
           "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    json.dump(pre, open(os.path.join(out, "preprocessor_config.json"), "w"), indent=2)
    items = []
    per_class = {c: 0 for c in range(10)}
    for i in test_idx:
        c = int(d.target[i])
        if per_class[c] >= 5:
            continue
        per_class[c] += 1
        name = f"digit{c}_{per_class[c]}.png"
        open(os.path.join(out, "samples", name), "wb").write(png_bytes(imgs[i]))
        e = forward(W32, chw[i])
        items.append({"png": name, "label": c, "embedding": (e / np.linalg.norm(e)).tolist()})
    json.dump({"items": items}, open(os.path.join(out, "reference.json"), "w"))
    card = f"""# vit-digits (generated by scripts/make-vision-model.py)

HF ViTModel layout, {LAYERS} layers, hidden {D}, {HEADS} heads, patch {PATCH}, 32x32 RGB input, 64-d
pooler output. NOT a gradient-trained ViT: patch embedding = whitened PCA of patches, block 0 set
by hand to pool image quadrants into the class token, other blocks seeded random (near identity),
pooler fitted by LDA on scikit-learn digits (train split of {len(train_idx)} images).

Held-out split ({len(test_idx)} images): 1-NN top-1 (cosine) {nn1:.3f} (chance 0.1);
mean cosine same digit {same:.3f}, different digits {diff:.3f}.
"""
    open(os.path.join(out, "model_card.md"), "w").write(card)
    print(f"make-vision-model: wrote {out}")


if __name__ == "__main__":
    main()
