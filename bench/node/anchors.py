#!/usr/bin/env python3
"""One anchor runtime of `make bench-node`, run in a child process (its own peak RSS) inside the
venv that has the runtime (bench/.venv, or bench/.venv-ipex for IPEX).

  python anchors.py ANCHOR --model DIR --threads 2 --work DIR < sentences.json

ANCHOR is one of: torch-fp32, torch-bf16-autocast, ort-fp32-fused, ort-int8-dynamic,
openvino-fp32, openvino-bf16, ipex-bf16. Every anchor gets the same token ids (the model's own
tokenizer.json, truncation 256, padding to the longest in each batch), runs the same 512 sentences
length-sorted in batches of 32, then 200 of them one at a time, and mean-pools + L2-normalises as
sentence-transformers does. torch-fp32 writes the reference (work/reference.json: vectors the
others and prism-node are compared with, and each sentence's token count for the FLOP count). Prints one JSON line:
  {"sps", "p50", "p99", "rss_mb", "cos_min", "setup_s", "version"}
"""
import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))
from prism_up import pct  # noqa: E402

ANCHORS = ("torch-fp32", "torch-bf16-autocast", "ort-fp32-fused", "ort-int8-dynamic",
           "openvino-fp32", "openvino-bf16", "ipex-bf16")
MAX_LEN = 256


def log(msg):
    print(f"[anchor] {msg}", file=sys.stderr, flush=True)


def tokenizer(model_dir):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    tok.enable_truncation(MAX_LEN)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def encode(tok, texts):
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    return ids, mask


def pool(hidden, mask):
    """Mean over real tokens, then L2 norm (sentence-transformers' all-MiniLM-L6-v2 head)."""
    m = mask[..., None].astype(np.float32)
    v = (hidden.astype(np.float32) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


# --- runtimes: each returns (version, run(ids, mask) -> last hidden state as numpy) ---

def torch_model(model_dir, threads):
    import torch
    from transformers import AutoModel
    torch.set_num_threads(threads)
    model = AutoModel.from_pretrained(model_dir, attn_implementation="sdpa").eval()
    return torch, model


def torch_runner(model_dir, threads, autocast):
    torch, model = torch_model(model_dir, threads)

    def run(ids, mask):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                        token_type_ids=torch.zeros_like(torch.from_numpy(ids)))
        return out.last_hidden_state.float().numpy()
    return f"torch {torch.__version__}", run


def positional(model):
    """BERT with (input_ids, attention_mask, token_type_ids) as its only inputs and the last hidden
    state as its output, for exporters and tracers (transformers 5 reorders forward's arguments)."""
    import torch

    class Bert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state
    return Bert().eval()


def export_onnx(model_dir, threads, work):
    """BERT exported with eager attention (the fuser matches its pattern), then fused by
    onnxruntime's transformer optimizer: Attention, SkipLayerNormalization, BiasGelu,
    EmbedLayerNormalization, as a careful ONNX Runtime user deploys it."""
    fused = work / "model-fused.onnx"
    if fused.exists():
        return fused
    import torch
    from transformers import AutoModel
    torch.set_num_threads(threads)
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    raw = work / "model.onnx"
    ids = torch.ones(2, 16, dtype=torch.long)
    dyn = {0: "batch", 1: "seq"}
    torch.onnx.export(positional(model), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(raw),
                      input_names=["input_ids", "attention_mask", "token_type_ids"],
                      output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                      dynamic_axes={"input_ids": dyn, "attention_mask": dyn, "token_type_ids": dyn,
                                    "last_hidden_state": dyn})
    from onnxruntime.transformers.optimizer import optimize_model
    cfg = model.config
    opt = optimize_model(str(raw), model_type="bert", num_heads=cfg.num_attention_heads,
                         hidden_size=cfg.hidden_size)
    opt.save_model_to_file(str(fused))
    log(f"fused ONNX graph: {opt.get_fused_operator_statistics()}")
    return fused


def ort_runner(model_dir, threads, work, int8):
    import onnxruntime as ort
    path = export_onnx(model_dir, threads, work)
    if int8:
        q = work / "model-int8.onnx"
        if not q.exists():
            import onnx
            from onnxruntime.quantization import QuantType, quantize_dynamic
            # The fused graph's contrib ops defeat shape inference; tell the quantiser their type.
            quantize_dynamic(str(path), str(q), weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        path = q
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}

    def run(ids, mask):
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return sess.run(None, {k: v for k, v in feed.items() if k in names})[0]
    return f"onnxruntime {ort.__version__}", run


def openvino_runner(model_dir, threads, work, precision):
    import openvino as ov
    path = export_onnx(model_dir, threads, work)
    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    names = {p.get_any_name() for p in compiled.inputs}

    def run(ids, mask):
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        request.infer({k: v for k, v in feed.items() if k in names})
        return request.get_output_tensor(0).data.copy()
    return f"openvino {ov.__version__}", run


def ipex_runner(model_dir, threads):
    """IPEX's recipe for BERT inference: ipex.optimize in bf16, then TorchScript trace + freeze
    under autocast."""
    import intel_extension_for_pytorch as ipex
    import torch
    from transformers import AutoModel
    torch.set_num_threads(threads)
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    model = positional(ipex.optimize(model, dtype=torch.bfloat16))
    ids = torch.ones(32, 32, dtype=torch.long)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        traced = torch.jit.trace(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                                 strict=False, check_trace=False)
        traced = torch.jit.freeze(traced)
        for _ in range(2):  # TorchScript's profiling runs
            traced(ids, torch.ones_like(ids), torch.zeros_like(ids))

    def run(ids_np, mask_np):
        ids_t = torch.from_numpy(ids_np)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = traced(ids_t, torch.from_numpy(mask_np), torch.zeros_like(ids_t))
        return out.float().numpy()
    return f"torch {torch.__version__} + ipex {ipex.__version__}", run


def runner(name, model_dir, threads, work):
    if name == "torch-fp32":
        return torch_runner(model_dir, threads, autocast=False)
    if name == "torch-bf16-autocast":
        return torch_runner(model_dir, threads, autocast=True)
    if name in ("ort-fp32-fused", "ort-int8-dynamic"):
        return ort_runner(model_dir, threads, work, int8=name == "ort-int8-dynamic")
    if name in ("openvino-fp32", "openvino-bf16"):
        return openvino_runner(model_dir, threads, work, {"fp32": "f32", "bf16": "bf16"}[name.split("-")[1]])
    if name == "ipex-bf16":
        return ipex_runner(model_dir, threads)
    raise SystemExit(f"unknown anchor {name!r}; known: {', '.join(ANCHORS)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("anchor", choices=ANCHORS)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", required=True, help="folder for the exported graphs and reference.json")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    sents = json.load(sys.stdin)
    tok = tokenizer(a.model)

    t0 = time.perf_counter()
    version, run = runner(a.anchor, a.model, a.threads, work)
    setup_s = time.perf_counter() - t0

    def embed(texts):
        ids, mask = encode(tok, texts)
        return pool(run(ids, mask), mask)

    order = sorted(range(len(sents)), key=lambda i: len(sents[i]))
    embed([sents[i] for i in order[-32:]])  # warm up on the longest batch
    t = time.perf_counter()
    parts = []
    for i in range(0, len(order), 32):
        parts.append(embed([sents[j] for j in order[i:i + 32]]))
    sps = len(sents) / (time.perf_counter() - t)
    vecs = np.zeros((len(sents), parts[0].shape[1]), dtype=np.float32)
    vecs[order] = np.concatenate(parts)

    lat = []
    for s in sents[:200]:
        t = time.perf_counter()
        embed([s])
        lat.append((time.perf_counter() - t) * 1e3)

    ref_path = work / "reference.json"
    if a.anchor == "torch-fp32":
        tokens = [int(m.sum()) for m in (encode(tok, [s])[1] for s in sents)]
        ref_path.write_text(json.dumps({"vectors": vecs.tolist(), "tokens": tokens}))
        cos_min = 1.0
    else:
        ref = np.array(json.loads(ref_path.read_text())["vectors"], dtype=np.float32)
        cos_min = float((ref * vecs).sum(1).min())
    print(json.dumps({
        "sps": sps, "p50": pct(lat, 50), "p99": pct(lat, 99), "cos_min": cos_min,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "setup_s": setup_s, "version": version}))


if __name__ == "__main__":
    main()
