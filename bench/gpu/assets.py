#!/usr/bin/env python3
"""Writes the data half of the GPU bundle (scripts/gpu-bundle.sh): MiniLM in f16 safetensors, its
config and tokenizer, the 512 sentences of `make bench-node`, and their token ids.

The token ids let check.py run its PyTorch reference with nothing but torch on the GPU machine
(no tokenizers or sentence-transformers needed there); when sentence-transformers is there too,
check.py also compares against it.

Usage: python3 bench/gpu/assets.py --model .cache/models/all-minilm-l6-v2 --out target/gpu-bundle
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench/node"))
from bench import sentences  # noqa: E402  (the same 512 sentences as `make bench-node`)

# The node truncates BERT inputs at 256 tokens by default; the reference must see the same ids.
MAX_TOKENS = 256


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    a = ap.parse_args()
    model_out = a.out / "model"
    model_out.mkdir(parents=True, exist_ok=True)

    # f16 halves the weights (86 -> 43 MiB); the node loads them as f32, so only the rounding of
    # the stored weights differs (cosine >= 0.99999 against f32 on CPU).
    tensors = load_file(str(a.model / "model.safetensors"))
    f16 = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in tensors.items()}
    save_file(f16, str(model_out / "model.safetensors"))
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(a.model / name, model_out / name)

    sents = sentences()
    tok = Tokenizer.from_file(str(a.model / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(MAX_TOKENS)
    ids = [e.ids for e in tok.encode_batch(sents)]
    (a.out / "sentences.json").write_text(json.dumps({"sentences": sents, "token_ids": ids}))
    print(f"assets: {len(sents)} sentences, {sum(map(len, ids))} tokens, weights f16 -> {model_out}")


if __name__ == "__main__":
    main()
