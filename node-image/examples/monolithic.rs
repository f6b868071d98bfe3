//! The monolithic side of `make bench-models`: one process holding the text, vision and audio
//! encoders (with their shared-space heads) that answers each multimodal request by running them
//! one after another and fusing (weighted mean, as the router's `weighted` strategy), the way a
//! single multimodal model serves. Same weights, same kernels, no network hop: the comparison with
//! Prism's parallel pipeline isolates the architecture, not the code.
//!
//! Usage: monolithic <text-dir> <vision-dir> <audio-dir> <requests.json>
//! requests.json: [{"text": "...", "image": "<png path>", "audio": "<wav path>"}, ...]
//! Prints one JSON object: latencies (ms) per request, load time, peak RSS (VmHWM).

use std::path::Path;
use std::time::Instant;

use base64::Engine as _;
use prism_api::wire::node::{EmbedInput, InputItem};
use prism_node::backend::{self, l2_normalize, DeviceChoice, LoadSpec, LoadedModel};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [text, vision, audio, requests] = args.as_slice() else {
        anyhow::bail!("usage: monolithic <text-dir> <vision-dir> <audio-dir> <requests.json>");
    };
    let started = Instant::now();
    let load = |arch: &str, dir: &str| backend::load(arch, &LoadSpec::new(dir, DeviceChoice::Auto));
    let mut models = [load("bert", text)?, load("vit", vision)?, load("whisper-encoder", audio)?];
    let load_seconds = started.elapsed().as_secs_f64();
    let requests: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(requests)?)?;
    let b64 = |p: &str| -> anyhow::Result<String> {
        Ok(base64::engine::general_purpose::STANDARD.encode(std::fs::read(Path::new(p))?))
    };
    let mut latencies = Vec::new();
    let mut warmed = false;
    for r in requests.iter().cycle().take(requests.len() + 1) {
        let inputs = [
            EmbedInput::Text(r["text"].as_str().unwrap_or_default().to_string()),
            EmbedInput::Item(InputItem {
                image_base64: Some(b64(r["image"].as_str().unwrap_or_default())?),
                ..Default::default()
            }),
            EmbedInput::Item(InputItem {
                audio_base64: Some(b64(r["audio"].as_str().unwrap_or_default())?),
                ..Default::default()
            }),
        ];
        let t = Instant::now();
        let mut fused = Vec::new();
        for (model, input) in models.iter_mut().zip(&inputs) {
            let v = encode(model, input)?;
            fused.resize(v.len(), 0.0);
            fused.iter_mut().zip(&v).for_each(|(f, x)| *f += x / 3.0);
        }
        l2_normalize(&mut fused);
        // The first request warms the kernels (as a node's warm-up does before /ready).
        if warmed {
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        warmed = true;
    }
    println!(
        "{}",
        serde_json::json!({"latencies_ms": latencies, "load_seconds": load_seconds, "peak_rss_mb": peak_rss_mb()})
    );
    Ok(())
}

fn encode(model: &mut LoadedModel, input: &EmbedInput) -> anyhow::Result<Vec<f32>> {
    let p = model.preprocessor.preprocess(input)?;
    Ok(model.encoder.encode_batch(&[p])?.remove(0))
}

/// VmHWM: the process's peak resident set, what a pod's memory limit has to cover.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}
