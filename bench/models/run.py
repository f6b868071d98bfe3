#!/usr/bin/env python3
"""`make bench-models`: the shared space Prism trains, per-modality throughput, and the seed's
headline comparison (separate modality nodes in parallel vs one monolithic model, sequential).

1. `prism train shared-space` on the digits pairs (scikit-learn digits, MiniLM text, espeak-ng
   speech through whisper-base): held-out text->image and audio->image top-1 vs chance.
   Then `prism train fusion`: the perceiver and MoT fusion nodes on a corrupted image plus its
   noisy spoken name, against each modality alone and their late fusion (held-out top-1).
   Then `prism train fusion --tokens`: a Mixture-of-Transformers over patch, frame and word tokens
   against a dense transformer of the same width and depth on the same batches
   (`mot_flops_vs_dense`: the MoT's training FLOPs to reach the dense model's final held-out loss).
2. `prism up` a pipeline of the three trained nodes (64-d shared space, weighted fusion) and:
   - per-modality throughput: items/s straight to each node's /embed (batched requests);
   - parallel: one client, the same multimodal requests through the router's /v1/infer;
     peak memory = the sum of every process's VmHWM (three nodes + router).
3. monolithic: node-image/examples/monolithic.rs holds the same three encoders and heads in one
   process and runs them one after another per request (no network hop at all): latency and
   VmHWM of that process.

4. sliding-window attention (node-image/examples/sliding_window.rs): the packed attention kernel
   at 4096 tokens, full vs a 256-token window; MiniLM on 256-token passages, full vs window 64;
   whisper-base on real speech of 1/5/10/30 s, full vs windows 128 and 512 (time and cosine to the
   full-attention vector). `--sliding-only` runs just this part.

Last line: `models: text_to_image_top1=... audio_to_image_top1=... chance=0.1 parallel_ms=...
monolithic_ms=... parallel_peak_mb=... monolithic_peak_mb=... fusion_top1=... best_single_top1=...
mot_flops_vs_dense=... sliding_speedup_4k=...
sliding_audio_speedup_5s=... sliding_audio_cosine_5s=... audio_2s_ms=... audio_2s_cosine=...`
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "common"))
from prism_up import MODELS_DIR, ROOT, TARGET, PrismUp, b64, call, check_prereqs, fail, headline, log, process_name  # noqa: E402

DATA = os.path.join(ROOT, ".cache", "data", "digits-pairs")
SPACE = os.path.join(MODELS_DIR, "digits-space")
FUSION = os.path.join(MODELS_DIR, "digits-fusion")
INTRO = """
`make bench-models` (bench/models/run.py). Shared space: `prism train shared-space` learns MLP
projection heads (candle autograd, supervised InfoNCE) that map all-MiniLM-L6-v2 text vectors and
whisper-base speech vectors into vit-digits' 64-d image space, from scikit-learn's handwritten digits
paired with their names (text) and the names spoken by espeak-ng. Top-1 = the nearest of 500
held-out images has the query's digit; queries are held-out phrasings and speech in two accents
never heard in training; chance is 0.1. Parallel vs monolithic: the same requests (text + image +
speech, fused by weighted mean) through Prism's router over three node processes, against one
process holding the same three encoders and heads running them one after another with no network
hop (node-image/examples/monolithic.rs). Peak memory: the sum of the processes' VmHWM (nodes +
router) vs the monolith's VmHWM. The seed claims 71 ms vs 120 ms and 21 GB vs 36 GB at its scale.
"""

def node_yaml(name, architecture, max_batch):
    """One node of the trained space (pvc://models/... is .cache/models/... under prism up)."""
    return f"""apiVersion: prism.dev/v1alpha1
kind: ModalityNode
metadata: {{name: {name}}}
spec:
  modality: {name}
  model: {{uri: pvc://models/digits-space/{name}, architecture: {architecture}, revision: "1"}}
  replicas: {{min: 1, max: 1}}
  batching: {{maxBatch: {max_batch}, maxWaitMs: 1}}
  device: cpu
---
"""


PIPELINE = node_yaml("text", "bert", 32) + node_yaml("vision", "vit", 32) + node_yaml("audio", "whisper-encoder", 4) + """\
apiVersion: prism.dev/v1alpha1
kind: MultimodalPipeline
metadata: {name: digits}
spec:
  nodes:
  - {name: text, required: true, weight: 1.0}
  - {name: vision, weight: 1.0}
  - {name: audio, weight: 1.0}
  routing: {timeoutMs: 30000}
  fusion: {strategy: weighted, deFusion: true}
  degradation: {onMissingOptional: partial, onMissingRequired: fail}
"""


def vmhwm_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def children(pid):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return out


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def train(prism, what, out, title, extra=(), metrics="metrics.json"):
    """`prism train <what>` on the digits data into `out`; its metrics file."""
    log(f"== {title}: prism train {what} {' '.join(extra)}".rstrip())
    r = subprocess.run([prism, "train", what, "--data", DATA, "--out", out, *extra], cwd=ROOT,
                       capture_output=True, text=True)
    sys.stdout.write("".join(f"  | {l}\n" for l in r.stderr.splitlines()))
    if r.returncode != 0:
        fail(f"prism train {what} failed ({r.returncode})")
    log("  " + next(l for l in r.stdout.splitlines() if l.startswith("train: ")))
    return json.load(open(os.path.join(out, metrics)))


def mot_ratio(m):
    """The MoT's training FLOPs to reach the dense model's final held-out loss over the dense
    model's; `none` when it never did within the run."""
    r = m.get("mot_flops_vs_dense")
    return "none" if r is None else f"{r:.3f}"


def requests_set(n):
    """n held-out triples: a held-out phrasing, image and unseen-accent clip of the same digit."""
    m = json.load(open(os.path.join(DATA, "manifest.json")))
    out = []
    for i in range(n):
        label = i % 10
        text = [t for t in m["texts"] if t["split"] == "test" and t["label"] == label][i // 10 % 4]["text"]
        imgs = [x for x in m["images"] if x["split"] == "test" and x["label"] == label]
        clips = [x for x in m["audio"] if x["split"] == "test" and x["label"] == label]
        out.append({"label": label, "text": text, "image": os.path.join(DATA, imgs[i // 10 % len(imgs)]["file"]),
                    "audio": os.path.join(DATA, clips[i // 10 % len(clips)]["file"])})
    return out


def throughput(url, make_inputs, batch, rounds):
    call(url + "/embed", {"inputs": make_inputs(batch)}, timeout=120)  # warm
    t = time.monotonic()
    for _ in range(rounds):
        status, body, _ = call(url + "/embed", {"inputs": make_inputs(batch)}, timeout=120)
        if status != 200:
            fail(f"{url}/embed answered {status}: {body}")
    return batch * rounds / (time.monotonic() - t)


SLIDING_INTRO = """
`make bench-models BENCH_ARGS=--sliding-only` (bench/models/run.py, node-image/examples/sliding_window.rs).
What `spec.model.attention: {kind: sliding-window, window: W}` saves and changes. Kernel: the packed
CPU attention of MiniLM's shape (12 heads of 32) over one 4096-token sequence, full vs W=256 (no
served text model reads 4k tokens: MiniLM stops at 512 positions). Text: MiniLM on 8 passages of
256 tokens, full vs W=64. Audio: whisper-base on real speech (speech-samples) cut to 1/5/10/30 s,
full vs W=128 and 512; the window also skips the silent rest of whisper's 30 s window (frames past
the clip + layers x W/2 cannot reach the clip's frames). Cosine: windowed vector vs full-attention
vector of the same input (whisper was trained with full attention; a window is an approximation).
"""


def sliding(example):
    """Runs the sliding-window example; returns its JSON and logs a table."""
    log("== sliding-window attention: full vs banded (node-image/examples/sliding_window.rs)")
    wavs = [os.path.join(MODELS_DIR, "speech-samples", w) for w in ("beckett.wav", "clone-test.wav")]
    r = subprocess.run([example, os.path.join(MODELS_DIR, "all-minilm-l6-v2"),
                        os.path.join(MODELS_DIR, "whisper-base-encoder"), *wavs], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"sliding_window example failed: {r.stderr[-2000:]}")
    for l in r.stderr.splitlines():
        log("  " + l.strip())
    return json.loads(r.stdout)


def sliding_fields(s):
    """The key=value fields of the sliding-window result (the 5 s clip at window 128 for audio)."""
    a5 = next(a for a in s["audio"] if a["clip_s"] == 5 and a["window"] == 128)
    return (f"sliding_speedup_4k={s['kernel_4k']['speedup']:.1f} sliding_text_speedup_256={s['text_256']['speedup']:.2f} "
            f"sliding_text_cosine_256={s['text_256']['min_cosine']:.3f} sliding_audio_speedup_5s={a5['speedup']:.1f} "
            f"sliding_audio_cosine_5s={a5['cosine']:.3f} audio_2s_ms={audio_2s(s)['clip_ms']:.0f} "
            f"audio_2s_cosine={audio_2s(s)['cosine']:.3f}")


def audio_2s(s):
    """The default audio path (the clip's own frames) on a 2 s clip, vs the padded 30 s window."""
    return next(a for a in s["audio_clip"] if a["clip_s"] == 2)


def sliding_table(s):
    rows = [f"kernel 4096 tokens: full {s['kernel_4k']['full_ms']:.0f} ms, window 256 "
            f"{s['kernel_4k']['window_ms']:.0f} ms"]
    rows += [f"whisper {a['clip_s']} s, window {a['window']}: {a['full_ms']:.0f} -> {a['window_ms']:.0f} ms "
             f"({a['speedup']:.1f}x), cosine {a['cosine']:.3f}" for a in s["audio"]]
    rows += [f"whisper {a['clip_s']} s, clip frames only: {a['full_ms']:.0f} -> {a['clip_ms']:.0f} ms "
             f"({a['speedup']:.1f}x), cosine {a['cosine']:.3f}" for a in s["audio_clip"]]
    return "; ".join(rows)


def torch_fields():
    """The ratios to PyTorch that bench/models/vs_torch.py (run first by `make bench-models`)
    measured in the last hour, as line fields; nothing when it did not run."""
    path = os.path.join(ROOT, ".cache", "bench", "models-torch.json")
    try:
        r = json.load(open(path))
    except (OSError, ValueError):
        return ""
    if time.time() - r.get("at", 0) > 3600:
        return ""
    return "".join(f" {k}={r[k]:.2f}" for k in ("vision_ratio", "audio_ratio", "audio_clip_ratio", "fusion_ratio"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prism", default=os.path.join(TARGET, "release", "prism"))
    ap.add_argument("--monolithic", default=os.path.join(TARGET, "release", "examples", "monolithic"))
    ap.add_argument("--sliding-window", default=os.path.join(TARGET, "release", "examples", "sliding_window"))
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--sliding-only", action="store_true", help="run only the sliding-window part")
    ap.add_argument("--no-append", action="store_true", help="do not record the run in bench/RESULTS.md")
    args = ap.parse_args()
    check_prereqs(args.prism, models=("all-minilm-l6-v2", "vit-digits", "whisper-base-encoder"))
    if args.sliding_only:
        load_before = os.getloadavg()[0]
        s = sliding(args.sliding_window)
        headline(args, "models-sliding", "models: sliding-window attention, full vs banded", SLIDING_INTRO,
                 "models-sliding: " + sliding_fields(s), "1 process, 2 threads", load_before,
                 suffix="; " + sliding_table(s))
        return
    if not os.path.exists(os.path.join(DATA, "manifest.json")):
        fail(f"{DATA}/manifest.json is missing: run `make models`")
    load_before = os.getloadavg()[0]
    metrics = train(args.prism, "shared-space", SPACE, "shared space")
    fused = train(args.prism, "fusion", FUSION, "fusion (corrupted image + noisy spoken name)")
    mot = train(args.prism, "fusion", FUSION, "Mixture-of-Transformers vs dense over token sequences",
                ["--tokens"], os.path.join("tokens", "metrics.json"))
    reqs = requests_set(args.requests)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(reqs, f)
        reqs_file = f.name

    slide = sliding(args.sliding_window)

    log("== monolithic: one process, three encoders in sequence")
    r = subprocess.run([args.monolithic, os.path.join(SPACE, "text"), os.path.join(SPACE, "vision"),
                        os.path.join(SPACE, "audio"), reqs_file], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"monolithic failed: {r.stderr}")
    mono = json.loads(r.stdout)
    mono_ms = statistics.median(mono["latencies_ms"])
    log(f"  p50 {mono_ms:.1f} ms p99 {pct(mono['latencies_ms'], 99):.1f} ms, peak RSS {mono['peak_rss_mb']:.0f} MB")

    log("== parallel: prism up, three nodes + router")
    with PrismUp(args.prism, PIPELINE, "models", echo=False) as up:
        st = up.state()
        urls = {n["name"]: n["replicas"][0]["url"] for n in st["nodes"]}
        body = lambda r: {"inputs": {"text": r["text"], "vision": {"image_base64": b64(r["image"])},
                                     "audio": {"audio_base64": b64(r["audio"])}}}
        status, resp, _ = call(up.url + "/v1/infer", body(reqs[0]), timeout=60)  # warm the whole path
        if status != 200:
            fail(f"/v1/infer answered {status}: {resp}")
        lat, correct = [], 0
        for r in reqs:
            status, resp, secs = call(up.url + "/v1/infer", body(r), timeout=60)
            if status != 200 or resp.get("degraded"):
                fail(f"/v1/infer answered {status}: {resp}")
            lat.append(secs * 1000)
        par_ms = statistics.median(lat)
        pids = [rep["pid"] for n in st["nodes"] for rep in n["replicas"] if rep.get("pid")]
        pids += [p for p in children(st["pid"]) if process_name(p) == "prism-router"]
        peaks = [vmhwm_mb(p) for p in pids]
        if len(pids) != 4 or any(p is None for p in peaks):
            fail(f"could not read VmHWM of the three nodes and the router: pids {pids}, peaks {peaks}")
        par_peak = sum(peaks)
        log(f"  p50 {par_ms:.1f} ms p99 {pct(lat, 99):.1f} ms, peak RSS {par_peak:.0f} MB (nodes + router: "
            + ", ".join(f"{p:.0f}" for p in peaks) + ")")

        log("== per-modality throughput (items/s, batched /embed straight to each node)")
        tput = {
            "text": throughput(urls["text"], lambda n: [reqs[i % len(reqs)]["text"] for i in range(n)], 32, 8),
            "vision": throughput(urls["vision"], lambda n: [{"image_base64": b64(reqs[i % len(reqs)]["image"])}
                                                            for i in range(n)], 32, 8),
            "audio": throughput(urls["audio"], lambda n: [{"audio_base64": b64(reqs[i % len(reqs)]["audio"])}
                                                          for i in range(n)], 4, 3),
        }
        log("  " + ", ".join(f"{k} {v:.1f}/s" for k, v in tput.items()))
        up.ok = True

    line = (f"models: text_to_image_top1={metrics['text_to_image_top1']:.3f} "
            f"audio_to_image_top1={metrics['audio_to_image_top1']:.3f} chance={metrics['chance']:.1f} "
            f"parallel_ms={par_ms:.1f} monolithic_ms={mono_ms:.1f} parallel_peak_mb={par_peak:.0f} "
            f"monolithic_peak_mb={mono['peak_rss_mb']:.0f} fusion_top1={fused['fusion_top1']:.3f} "
            f"best_single_top1={fused['best_single_top1']:.3f} mot_flops_vs_dense={mot_ratio(mot)} "
            f"{sliding_fields(slide)}")
    suffix = (f" throughput/s text={tput['text']:.0f} vision={tput['vision']:.0f} audio={tput['audio']:.1f};"
              f" p99 parallel {pct(lat, 99):.1f} ms, monolithic {pct(mono['latencies_ms'], 99):.1f} ms;"
              f" untrained top-1 text {metrics['text_to_image_top1_untrained']:.2f} audio "
              f"{metrics['audio_to_image_top1_untrained']:.2f}; fusion on {fused['held_out_pairs']} held-out corrupted "
              f"pairs: vision {fused['vision_top1']:.3f}, audio {fused['audio_top1']:.3f}, late "
              f"{fused['late_fusion_top1']:.3f}, perceiver {fused['perceiver_top1']:.3f}, mot {fused['mot_top1']:.3f}; "
              f"MoT over tokens vs dense (same batches, {mot['steps']} steps): held-out loss {mot['mot_loss']:.3f} vs "
              f"{mot['dense_loss']:.3f}, top-1 {mot['mot_top1']:.3f} vs {mot['dense_top1']:.3f}; "
              f"{sliding_table(slide)}")
    line += torch_fields()
    headline(args, "models", "models: shared space, per-modality throughput, parallel nodes vs monolithic",
             INTRO, line, f"{args.requests} requests", load_before, suffix=suffix)


if __name__ == "__main__":
    main()
