#!/usr/bin/env python3
"""Independent float64 numpy reference for prism-node's whisper-encoder backend.

Reads .cache/models/whisper-base-encoder (made by `make models`) and the speech WAVs, computes the
whisper log-mel front end (numpy rfft, reflect-padded centred STFT, Slaney mel filters written out
here) and the encoder forward pass in float64, and writes node-image/tests/fixtures/whisper_reference.json:
per clip the first 20 mel frames and the mean-pooled, L2-normalised embedding.
Nothing here is shared with the Rust code: agreement means both are right or both wrong the same way.
"""
import json
import os
import sys
import wave

import numpy as np
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, ".cache/models/whisper-base-encoder")
SAMPLES = os.path.join(ROOT, ".cache/models/speech-samples")
OUT = os.path.join(ROOT, "node-image/tests/fixtures/whisper_reference.json")
SR, N_FFT, HOP, N_SAMPLES = 16000, 400, 160, 480000


def slaney_mel(n_mels):
    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        lin = f / (200.0 / 3)
        return np.where(f >= 1000, 15 + np.log(np.maximum(f, 1e-9) / 1000) / (np.log(6.4) / 27), lin)

    def mel_to_hz(m):
        return np.where(m >= 15, 1000 * np.exp((np.log(6.4) / 27) * (m - 15)), (200.0 / 3) * m)

    freqs = np.fft.rfftfreq(N_FFT, 1 / SR)
    mel_pts = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SR / 2), n_mels + 2))
    fdiff = np.diff(mel_pts)
    ramps = mel_pts[:, None] - freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    w = np.maximum(0, np.minimum(lower, upper))
    return w * (2.0 / (mel_pts[2:] - mel_pts[:-2]))[:, None]


def log_mel(x, n_mels):
    x = np.pad(x.astype(np.float64), (0, N_SAMPLES - len(x)))
    x = np.pad(x, N_FFT // 2, mode="reflect")
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)
    n = 1 + (len(x) - N_FFT) // HOP
    frames = np.stack([x[i * HOP:i * HOP + N_FFT] * win for i in range(n)])[:-1]
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # [3000, 201]
    mel = np.log10(np.maximum(slaney_mel(n_mels) @ power.T, 1e-10))
    mel = np.maximum(mel, mel.max() - 8.0)
    return (mel + 4.0) / 4.0  # [n_mels, 3000]


def gelu(x):
    from math import erf
    return 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))


def ln(x, w, b, eps=1e-5):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * w + b


def conv1d(x, w, b, stride):
    # x [c_in, T], w [c_out, c_in, 3], padding 1
    xp = np.pad(x, ((0, 0), (1, 1)))
    t_out = (xp.shape[1] - 3) // stride + 1
    cols = np.stack([xp[:, k:k + stride * (t_out - 1) + 1:stride] for k in range(3)], axis=-1)  # [c_in, T, 3]
    return np.einsum("oik,itk->ot", w, cols) + b[:, None]


def encoder(mel, W, cfg):
    g = lambda n: W[n].astype(np.float64)
    p = "model.encoder."
    x = gelu(conv1d(mel, g(p + "conv1.weight"), g(p + "conv1.bias"), 1))
    x = gelu(conv1d(x, g(p + "conv2.weight"), g(p + "conv2.bias"), 2)).T  # [1500, d]
    x = x + g(p + "embed_positions.weight")[: x.shape[0]]
    h = cfg["encoder_attention_heads"]
    d = cfg["d_model"]
    for i in range(cfg["encoder_layers"]):
        q = f"{p}layers.{i}."
        y = ln(x, g(q + "self_attn_layer_norm.weight"), g(q + "self_attn_layer_norm.bias"))
        Q = y @ g(q + "self_attn.q_proj.weight").T + g(q + "self_attn.q_proj.bias")
        K = y @ g(q + "self_attn.k_proj.weight").T
        V = y @ g(q + "self_attn.v_proj.weight").T + g(q + "self_attn.v_proj.bias")
        split = lambda t: t.reshape(len(t), h, d // h).transpose(1, 0, 2)
        s = split(Q) @ split(K).transpose(0, 2, 1) / np.sqrt(d // h)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        a = (s @ split(V)).transpose(1, 0, 2).reshape(len(x), d)
        x = x + a @ g(q + "self_attn.out_proj.weight").T + g(q + "self_attn.out_proj.bias")
        y = ln(x, g(q + "final_layer_norm.weight"), g(q + "final_layer_norm.bias"))
        y = gelu(y @ g(q + "fc1.weight").T + g(q + "fc1.bias")) @ g(q + "fc2.weight").T + g(q + "fc2.bias")
        x = x + y
    return ln(x, g(p + "layer_norm.weight"), g(p + "layer_norm.bias"))


def main():
    if not os.path.isdir(MODEL):
        sys.exit("reference-whisper: run `make models` first")
    cfg = json.load(open(os.path.join(MODEL, "config.json")))
    W = load_file(os.path.join(MODEL, "model.safetensors"))
    items = []
    for name in ["clone-test.wav", "beckett.wav"]:
        w = wave.open(os.path.join(SAMPLES, name))
        assert w.getframerate() == SR and w.getsampwidth() == 2 and w.getnchannels() == 1
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float64) / 32768.0
        mel = log_mel(x, cfg["num_mel_bins"])
        states = encoder(mel, W, cfg)
        real = min(1500, max(1, -(-(-(-len(x) // HOP)) // 2)))
        e = states[:real].mean(0)
        e /= np.linalg.norm(e)
        items.append({"wav": name, "real_frames": int(real), "mel_first_frames": mel[:, :20].tolist(),
                      "embedding": e.tolist()})
        print(f"reference-whisper: {name}: {len(x)} samples, {real} real frames")
    json.dump({"items": items}, open(OUT, "w"))
    print(f"reference-whisper: wrote {OUT}")


if __name__ == "__main__":
    main()
