//! The sliding-window part of `make bench-models`: what `spec.model.attention` (sliding-window)
//! saves, and what it changes, on this CPU.
//!
//! 1. Kernel at 4k tokens: the packed CPU attention (`simd::attend`, every head of MiniLM's shape:
//!    12 heads of 32) over one 4096-token sequence, full against a 256-token window. MiniLM's
//!    position table stops at 512, so no served text model reads 4k tokens: this times the kernel
//!    alone, on fixed pseudo-random q/k/v.
//! 2. Text, end to end: MiniLM on 256-token passages, full against a 64-token window: time per
//!    batch and the cosine of each windowed vector to the full one.
//! 3. Audio, end to end: whisper-base on real speech cut to 1, 5, 10 and 30 s, full against
//!    128- and 512-frame windows: time per clip (the window also skips the silent rest of the 30 s
//!    window) and the cosine to the full-attention vector.
//!
//! Usage: sliding_window <minilm-dir> <whisper-dir> <wav> [<wav> ...]
//! Progress goes to stderr; stdout is one JSON object.

use std::time::Instant;

use base64::Engine as _;
use prism_api::wire::node::{EmbedInput, InputItem};
use prism_node::backend::cpu::simd::{self, HeadJob};
use prism_node::backend::whisper::{decode_wav, wav_bytes, SAMPLE_RATE};
use prism_node::backend::{self, AudioWindow, DeviceChoice, LoadSpec, LoadedModel, Prepared};
use serde_json::json;

/// Median seconds of `reps` runs of `f` (after one warm-up run).
fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64) * (*y as f64)).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// A model with `window` (None: full attention); whisper over its padded 30 s window, the
/// baseline the bands are measured against.
fn load(arch: &str, dir: &str, window: Option<usize>) -> anyhow::Result<LoadedModel> {
    let spec =
        LoadSpec { attention_window: window, audio_window: AudioWindow::Full, ..LoadSpec::new(dir, DeviceChoice::Cpu) };
    Ok(backend::load(arch, &spec)?)
}

/// Seconds per call (median of 3) and the vectors of `inputs` encoded as one batch.
fn timed_batch(model: &mut LoadedModel, inputs: &[EmbedInput]) -> anyhow::Result<(f64, Vec<Vec<f32>>)> {
    let prepared: Vec<Prepared> = inputs.iter().map(|i| model.preprocessor.preprocess(i)).collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    let mut failed = None;
    let secs = median_secs(3, || match model.encoder.encode_batch(&prepared) {
        Ok(v) => out = v,
        Err(e) => failed = Some(e),
    });
    match failed {
        Some(e) => Err(e.into()),
        None => Ok((secs, out)),
    }
}

/// Full attention against a `window`-token band, one head after another, as the packed BERT
/// path runs them; returns (full s, band s).
fn kernel_4k(window: usize) -> (f64, f64) {
    let (n, heads, hd) = (4096usize, 12usize, 32usize);
    let h = heads * hd;
    let qkv: Vec<f32> = (0..n * 3 * h).map(|i| ((i * 7919) % 1009) as f32 / 504.5 - 1.0).collect();
    let mut out = vec![0f32; n * h];
    let (mut kt, mut scores) = (Vec::new(), Vec::new());
    let mut run = |radius: usize| {
        for head in 0..heads {
            let job = HeadJob {
                qkv: &qkv,
                row_stride: 3 * h,
                n,
                queries: 0..n,
                q_col: head * hd,
                k_col: h + head * hd,
                v_col: 2 * h + head * hd,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                radius,
            };
            simd::attend(&job, &mut kt, &mut scores, &mut out[head * hd..], h);
        }
    };
    let full = median_secs(3, || run(usize::MAX));
    let band = median_secs(3, || run(window / 2));
    (full, band)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [minilm, whisper, wavs @ ..] = args.as_slice() else {
        anyhow::bail!("usage: sliding_window <minilm-dir> <whisper-dir> <wav> [<wav> ...]");
    };
    anyhow::ensure!(!wavs.is_empty(), "give at least one WAV file of speech");

    eprintln!("sliding-window: attention kernel at 4096 tokens (12 heads x 32), full vs window 256 ...");
    let (full_4k, band_4k) = kernel_4k(256);
    eprintln!("  full {:.1} ms, window 256 {:.1} ms", full_4k * 1e3, band_4k * 1e3);

    // 256-token passages: sentences of a public-domain text repeated with numbering, so each
    // passage reaches MiniLM's 256-token limit.
    let base = "The sun had risen over the valley and the river ran quietly past the old mill, where \
                the miller counted sacks of grain while children played along the muddy bank.";
    let passages: Vec<EmbedInput> = (0..8)
        .map(|p| EmbedInput::Text((0..6).map(|s| format!("Part {p}.{s}: {base}")).collect::<Vec<_>>().join(" ")))
        .collect();
    eprintln!("sliding-window: MiniLM, 8 passages of 256 tokens, full vs window 64 ...");
    let (text_full_s, text_full) = timed_batch(&mut load("bert", minilm, None)?, &passages)?;
    let (text_band_s, text_band) = timed_batch(&mut load("bert", minilm, Some(64))?, &passages)?;
    let text_cos: Vec<f64> = text_full.iter().zip(&text_band).map(|(a, b)| cosine(a, b)).collect();
    let text_min_cos = text_cos.iter().cloned().fold(f64::MAX, f64::min);
    eprintln!(
        "  full {:.1} ms, window 64 {:.1} ms, min cosine {text_min_cos:.4}",
        text_full_s * 1e3,
        text_band_s * 1e3
    );

    // Real speech (16 kHz WAVs), concatenated and repeated to each length.
    let mut speech = Vec::new();
    for w in wavs {
        speech.extend(decode_wav(&std::fs::read(w)?).map_err(|e| anyhow::anyhow!("{w}: {e}"))?);
    }
    anyhow::ensure!(!speech.is_empty(), "the WAV files hold no samples");
    let clip = |secs: usize| -> EmbedInput {
        let samples: Vec<f32> = speech.iter().copied().cycle().take(secs * SAMPLE_RATE as usize).collect();
        EmbedInput::Item(InputItem {
            audio_base64: Some(base64::engine::general_purpose::STANDARD.encode(wav_bytes(&samples))),
            ..Default::default()
        })
    };
    let mut audio = Vec::new();
    let mut full_model = load("whisper-encoder", whisper, None)?;
    let mut windowed: Vec<(usize, LoadedModel)> = [128, 512]
        .into_iter()
        .map(|w| Ok((w, load("whisper-encoder", whisper, Some(w))?)))
        .collect::<anyhow::Result<_>>()?;
    for secs in [1usize, 5, 10, 30] {
        let input = [clip(secs)];
        let (full_s, full_v) = timed_batch(&mut full_model, &input)?;
        for (window, model) in windowed.iter_mut() {
            let (band_s, band_v) = timed_batch(model, &input)?;
            let cos = cosine(&full_v[0], &band_v[0]);
            eprintln!(
                "  whisper {secs:>2} s: full {:.0} ms, window {window} {:.0} ms ({:.2}x), cosine {cos:.4}",
                full_s * 1e3,
                band_s * 1e3,
                full_s / band_s
            );
            audio.push(json!({"clip_s": secs, "window": window, "full_ms": full_s * 1e3, "window_ms": band_s * 1e3,
                              "speedup": full_s / band_s, "cosine": cos}));
        }
    }
    // `--audio-window clip`: only the clip's own frames (no band), against the padded window.
    let clip_spec = LoadSpec { audio_window: AudioWindow::Clip, ..LoadSpec::new(whisper.as_str(), DeviceChoice::Cpu) };
    let mut clip_model = backend::load("whisper-encoder", &clip_spec)?;
    let mut audio_clip = Vec::new();
    for secs in [2usize, 5, 10] {
        let input = [clip(secs)];
        let (full_s, full_v) = timed_batch(&mut full_model, &input)?;
        let (clip_s, clip_v) = timed_batch(&mut clip_model, &input)?;
        let cos = cosine(&full_v[0], &clip_v[0]);
        eprintln!(
            "  whisper {secs:>2} s: padded window {:.0} ms, clip frames only {:.0} ms ({:.1}x), cosine {cos:.4}",
            full_s * 1e3,
            clip_s * 1e3,
            full_s / clip_s
        );
        audio_clip.push(json!({"clip_s": secs, "full_ms": full_s * 1e3, "clip_ms": clip_s * 1e3,
                               "speedup": full_s / clip_s, "cosine": cos}));
    }
    let out = json!({
        "kernel_4k": {"tokens": 4096, "window": 256, "full_ms": full_4k * 1e3, "window_ms": band_4k * 1e3,
                      "speedup": full_4k / band_4k},
        "text_256": {"window": 64, "full_ms": text_full_s * 1e3, "window_ms": text_band_s * 1e3,
                     "speedup": text_full_s / text_band_s, "min_cosine": text_min_cos},
        "audio": audio,
        "audio_clip": audio_clip,
    });
    println!("{out}");
    Ok(())
}
