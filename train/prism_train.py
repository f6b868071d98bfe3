#!/usr/bin/env python3
"""Distributed LoRA fine-tuning of a Prism text encoder (BERT, e.g. all-MiniLM-L6-v2) on corrections.

Meant to run under torchrun, one process per worker (an Indexed Job pod each in a cluster):

    torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29511 train/prism_train.py \
        --model .cache/models/all-minilm-l6-v2 --corrections corrections.json --output out/

It also runs as a plain `python train/prism_train.py ...` (one process, world size 1).

Data: the router's export (`GET /v1/memory/corrections`: `{"corrections": [...]}` or a bare array),
from a file or straight from the router's URL (`--corrections http://ROUTER:8080/v1/memory/corrections`,
`--corrections-token-file` for a router with auth): rank 0 downloads it once and broadcasts it, so
every worker trains on the same snapshot while new corrections keep arriving.
An item with `inputs.text` (the query) and `answer.text` (the right answer) is a positive pair;
everything else is skipped and counted by reason. Loss: in-batch contrastive (InfoNCE, symmetric)
over mean-pooled, L2-normalised embeddings: exactly what prism-node serves.

Output (`--output`): the base files (symlinked, or copied with --copy-base), `adapter_config.json` +
`adapter_model.safetensors` in PEFT layout (`base_model.model.<layer>.lora_A.weight` [r, in],
`...lora_B.weight` [out, r]; prism-node merges W + (alpha/r) B A at load), `train_metrics.json`,
and `reference.json`: embeddings of fixed sentences computed here with the adapter (eval mode),
for the parity check against prism-node (train/test_distributed.py).

DDP over gloo on CPU, nccl when CUDA is available. Progress is printed as JSON lines on rank 0;
every rank prints one `{"event": "rank_done", ...}` line at the end.
"""

import argparse
import datetime
import json
import os
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

# Sentences whose embeddings go to reference.json (the parity check of prism-node vs PyTorch).
REFERENCE_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password?",
    "Prism routes multimodal requests to GPU nodes.",
    "A cat sat on the mat and looked out of the window.",
    "What is the refund policy for damaged parcels?",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF model folder (config.json, tokenizer.json, model.safetensors)")
    p.add_argument("--corrections", required=True, help="the router's corrections export: a JSON file or its http(s) URL")
    p.add_argument("--corrections-token-file", help="bearer token for --corrections URL (first non-comment line)")
    p.add_argument("--output", required=True, help="output model folder (base files + adapter)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=16, help="pairs per rank per step (in-batch negatives)")
    p.add_argument("--temperature", type=float, default=0.05, help="InfoNCE temperature")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--target-modules", default="query,value", help="comma-separated module names to adapt")
    p.add_argument("--max-length", type=int, default=128, help="token limit per text while training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-dir", help="save every epoch; resume from the last checkpoint found here")
    p.add_argument(
        "--sliding-window",
        type=int,
        default=0,
        help="sliding-window attention while training: each token attends to N tokens (itself and N/2 on "
        "each side), computed band by band; serve the adapter with the same spec.model.attention window",
    )
    p.add_argument("--fsdp", action="store_true", help="wrap with torch FSDP instead of DDP (CUDA; CPU may be unsupported)")
    p.add_argument("--copy-base", action="store_true", help="copy the base files into --output instead of symlinking")
    return p.parse_args(argv)


# ---------------------------------------------------------------- data


def fetch_export(url, token_file=None, attempts=6):
    """The router's corrections export from its URL, retried with backoff (the router may still be
    starting when the Job does)."""
    import urllib.error
    import urllib.request

    headers = {"Accept": "application/json"}
    if token_file:
        with open(token_file) as f:
            tokens = [l.strip() for l in f if l.strip() and not l.strip().startswith("#")]
        if not tokens:
            raise SystemExit(f"{token_file}: no token in it")
        headers["Authorization"] = f"Bearer {tokens[0]}"
    delay = 1.0
    for i in range(attempts):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            # 4xx other than 429 will not get better by retrying (auth, memory disabled).
            if e.code < 500 and e.code != 429:
                raise SystemExit(f"{url}: HTTP {e.code}: {e.read()[:500].decode(errors='replace')}")
            err = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
            err = str(e)
        if i + 1 < attempts:
            print(f"corrections: {url}: {err}; retrying in {delay:.0f}s", file=sys.stderr, flush=True)
            time.sleep(delay)
            delay *= 2
    raise SystemExit(f"{url}: {err} after {attempts} attempts")


def read_export(args, rank, world):
    """The export document, the same on every rank."""
    src = args.corrections
    if not src.startswith(("http://", "https://")):
        with open(src) as f:
            return json.load(f)
    doc = [fetch_export(src, args.corrections_token_file) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(doc, src=0)
    return doc[0]


def load_pairs(path, doc=None):
    """(pairs, skipped-by-reason) from the corrections export (`doc`, else read from `path`)."""
    if doc is None:
        with open(path) as f:
            doc = json.load(f)
    items = doc.get("corrections") if isinstance(doc, dict) else doc
    if not isinstance(items, list):
        raise SystemExit(f"{path}: expected {{\"corrections\": [...]}} or a JSON array")
    pairs, skipped = [], {}

    def skip(reason):
        skipped[reason] = skipped.get(reason, 0) + 1

    for it in items:
        if not isinstance(it, dict):
            skip("not an object")
            continue
        inputs = it.get("inputs")
        query = inputs.get("text") if isinstance(inputs, dict) else None
        if not isinstance(query, str) or not query.strip():
            skip("no inputs.text")
            continue
        answer = it.get("answer")
        text = answer.get("text") if isinstance(answer, dict) else None
        if not isinstance(text, str) or not text.strip():
            skip("no answer.text")
            continue
        pairs.append((query, text))
    return pairs, skipped


class Pairs(torch.utils.data.Dataset):
    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]


def collate(batch):
    return [q for q, _ in batch], [a for _, a in batch]


# ---------------------------------------------------------------- model


def mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), p=2, dim=-1)


def banded_attention(window):
    """An attention function for transformers' AttentionInterface: each query attends to the keys
    within window // 2 of it (prism-node's --attention-window), computed one block of queries at a
    time against only the keys in reach, so the work is O(L * window), not O(L^2)."""
    radius = max(window // 2, 0)
    block = min(max(radius, 16), 256)

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # query/key/value: [B, H, L, D]; attention_mask: None, or [B, 1, 1 or L, L] boolean
        # (True = may attend) or additive floats, as the model built it for padding.
        L = query.shape[2]
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        low = torch.finfo(query.dtype).min
        outs = []
        for s in range(0, L, block):
            e, k0, k1 = min(L, s + block), max(0, s - radius), min(L, s + block + radius)
            w = torch.matmul(query[:, :, s:e], key[:, :, k0:k1].transpose(2, 3)) * scaling
            i = torch.arange(s, e, device=query.device)[:, None]
            j = torch.arange(k0, k1, device=query.device)[None, :]
            w = w.masked_fill((i - j).abs() > radius, low)
            if attention_mask is not None:
                m = attention_mask[..., s:e, k0:k1] if attention_mask.shape[-2] > 1 else attention_mask[..., k0:k1]
                w = w.masked_fill(~m, low) if m.dtype == torch.bool else w + m
            p = F.dropout(F.softmax(w, dim=-1), p=dropout, training=module.training)
            outs.append(torch.matmul(p, value[:, :, k0:k1]))
        return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None

    return attend


def embed(model, tok, texts, device, max_length):
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(device)
    out = model(**enc)
    return mean_pool(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0], enc["attention_mask"])


def load_base(path, window=0):
    """Tokenizer and encoder; with window > 0 every self-attention is banded_attention(window)."""
    from transformers import AttentionInterface, AutoModel, AutoTokenizer
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    attn = "eager"
    if window > 0:
        attn = f"prism_band_{window}"
        AttentionInterface.register(attn, banded_attention(window))
        # The padding mask, as the boolean [B, 1, L, L] sdpa takes (None when nothing is padded);
        # without a mask function of its own a new implementation gets no padding mask at all.
        AttentionMaskInterface.register(attn, sdpa_mask)
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True, attn_implementation=attn)
    return tok, model


def lora_model(base, args):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=[t.strip() for t in args.target_modules.split(",") if t.strip()],
        bias="none",
    )
    return get_peft_model(base, cfg)


def adapter_key(name):
    """A PEFT parameter name (maybe under DDP/FSDP wrappers) as prism-node reads it:
    base_model.model.<layer>.lora_A.weight."""
    for prefix in ("module.", "_fsdp_wrapped_module.", "_orig_mod."):
        name = name.replace(prefix, "")
    return name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def lora_state(named):
    return {adapter_key(k): v.detach().to("cpu", torch.float32).contiguous() for k, v in named if "lora_" in k}


def load_lora_into(peft_model, tensors):
    """Loads adapter tensors (prism-node key layout) into a fresh PEFT model; every LoRA parameter must be
    covered, so a key-layout mistake fails here rather than silently at serving time."""
    params = dict(peft_model.named_parameters())
    want = {adapter_key(k): k for k in params if "lora_" in k}
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise RuntimeError(f"adapter keys do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for k, t in tensors.items():
            params[want[k]].copy_(t)


# ---------------------------------------------------------------- distributed


def setup_dist():
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))
    return rank, world, local, device


def all_mean(x, world):
    t = torch.tensor([float(x)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return t.item() / world


def gather(obj, world):
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def emit(obj):
    """One JSON line in a single write(2): every rank shares torchrun's stdout pipe, and print()
    writes the text and its newline separately, so two ranks' lines could interleave. A pipe write
    up to PIPE_BUF (4096 bytes) is atomic."""
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (json.dumps(obj) + "\n").encode())


def log(me, **kv):
    """A JSON progress line, printed by rank 0 only (`me` is the caller's rank)."""
    if me == 0:
        emit(kv)


def wrap(model, args, device, world):
    if args.fsdp:
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            if world == 1 and not dist.is_initialized():
                raise RuntimeError("--fsdp needs torch.distributed (run under torchrun)")
            return FSDP(model, use_orig_params=True, device_id=device if device.type == "cuda" else None)
        except Exception as e:  # noqa: BLE001 - the point is a clear message, whatever FSDP raised
            raise SystemExit(
                f"--fsdp failed on {device.type} ({type(e).__name__}: {e}). FSDP is meant for CUDA/nccl; "
                "on CPU run without --fsdp (DDP over gloo)."
            )
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def full_named_params(model, args):
    if args.fsdp:
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel as FSDP, StateDictType

        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            return list(model.state_dict().items())
    return list(model.named_parameters())


# ---------------------------------------------------------------- checkpoints


def ckpt_path(args):
    return os.path.join(args.checkpoint_dir, "last.pt") if args.checkpoint_dir else None


def save_ckpt(args, rank, epoch, model, opt, history):
    p = ckpt_path(args)
    if not p:
        return
    lora = lora_state(full_named_params(model, args))
    if rank != 0:
        return
    os.makedirs(args.checkpoint_dir, exist_ok=True)
    tmp = p + ".tmp"
    torch.save({"epoch": epoch, "lora": lora, "optimizer": None if args.fsdp else opt.state_dict(), "history": history}, tmp)
    os.replace(tmp, p)  # atomic: a crash mid-save keeps the previous checkpoint


def load_ckpt(args, peft_model, opt):
    p = ckpt_path(args)
    if not p or not os.path.isfile(p):
        return 0, []
    ck = torch.load(p, map_location="cpu", weights_only=False)
    load_lora_into(peft_model, ck["lora"])
    if ck.get("optimizer") is not None:
        opt.load_state_dict(ck["optimizer"])
    return ck["epoch"] + 1, ck.get("history", [])


# ---------------------------------------------------------------- output


def write_output(args, lora, history, used, skipped, world, per_rank, wall_s):
    from safetensors.torch import save_file

    out = args.output
    os.makedirs(out, exist_ok=True)
    for name in sorted(os.listdir(args.model)):
        src = os.path.join(os.path.abspath(args.model), name)
        dst = os.path.join(out, name)
        if not os.path.isfile(src) or name.startswith("adapter_") or name in ("train_metrics.json", "reference.json"):
            continue
        if os.path.lexists(dst):
            os.remove(dst)
        if args.copy_base:
            shutil.copy2(src, dst)
        else:
            os.symlink(src, dst)
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()]
    cfg = {
        "peft_type": "LORA",
        "base_model_name_or_path": os.path.abspath(args.model),
        "r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "lora_dropout": args.lora_dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "task_type": None,
    }
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(lora, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})

    # reference.json: a fresh base + the adapter as written (so the file's key layout is what is checked),
    # eval mode, the training's attention (full, or --sliding-window as prism-node's
    # --attention-window serves it), mean pooling + L2 norm: what prism-node must reproduce.
    tok, base = load_base(args.model, args.sliding_window)
    base.eval()
    with torch.no_grad():
        base_emb = embed(base, tok, REFERENCE_SENTENCES, "cpu", 512)
        pm = lora_model(base, args)
        load_lora_into(pm, lora)
        pm.eval()
        emb = embed(pm, tok, REFERENCE_SENTENCES, "cpu", 512)
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(
            {
                "sentences": REFERENCE_SENTENCES,
                "embeddings": emb.tolist(),
                "base_embeddings": base_emb.tolist(),
                "attention_window": args.sliding_window or None,
            },
            f,
        )
    metrics = {
        "world_size": world,
        "epochs": len(history),
        "epoch_losses": history,
        "first_loss": history[0] if history else None,
        "last_loss": history[-1] if history else None,
        "examples_used": used,
        "examples_skipped": skipped,
        "per_rank": per_rank,
        "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "targets": targets, "tensors": len(lora)},
        "sliding_window": args.sliding_window or None,
        "parallelism": "fsdp" if args.fsdp else ("ddp" if world > 1 else "single"),
        "wall_s": round(wall_s, 2),
    }
    with open(os.path.join(out, "train_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


# ---------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    rank, world, _local, device = setup_dist()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(world, 1)))

    pairs, skipped = load_pairs(args.corrections, read_export(args, rank, world))
    log(rank, event="data", examples=len(pairs), skipped=skipped, world_size=world)
    if len(pairs) < 2:
        raise SystemExit(f"{args.corrections}: {len(pairs)} usable pairs (inputs.text + answer.text); need >= 2")

    tok, base = load_base(args.model, args.sliding_window)
    torch.manual_seed(args.seed)  # LoRA init identical on every rank (DDP also broadcasts rank 0's)
    model = lora_model(base, args).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr)
    start_epoch, history = load_ckpt(args, model, opt)
    if start_epoch:
        log(rank, event="resume", from_epoch=start_epoch, checkpoint=ckpt_path(args))
    wrapped = wrap(model, args, device, world)

    ds = Pairs(pairs)
    sampler = torch.utils.data.distributed.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=sampler, collate_fn=collate)
    steps = seen = 0
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        wrapped.train()
        losses = []
        for step, (queries, answers) in enumerate(loader):
            # One forward over queries + answers (DDP: one forward per backward).
            e = embed(wrapped, tok, queries + answers, device, args.max_length)
            q, a = e[: len(queries)], e[len(queries) :]
            logits = q @ a.T / args.temperature
            labels = torch.arange(len(queries), device=device)
            loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            steps += 1
            seen += len(queries)
            log(rank, epoch=epoch, step=step, loss=round(loss.item(), 5), rank=rank)
        epoch_loss = all_mean(sum(losses) / max(len(losses), 1), world)
        history.append(epoch_loss)
        log(rank, event="epoch", epoch=epoch, mean_loss=round(epoch_loss, 5), rank=rank)
        save_ckpt(args, rank, epoch, wrapped, opt, history)

    lora = lora_state(full_named_params(wrapped, args))
    per_rank = gather({"rank": rank, "steps": steps, "examples": seen, "shard": len(sampler)}, world)
    emit({"event": "rank_done", "rank": rank, "steps": steps, "examples": seen, "world_size": world})
    if rank == 0:
        m = write_output(args, lora, history, len(pairs), skipped, world, per_rank, time.time() - t0)
        log(rank, event="done", output=os.path.abspath(args.output), first_loss=m["first_loss"], last_loss=m["last_loss"])
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
