//! The node's encoder in-process, without HTTP: the Prism side of bench/models/vs_torch.py's
//! forward-only comparison with PyTorch (which times its model on prepared tensors).
//!
//! Usage: forward ARCH MODEL_DIR INPUTS_JSON BATCH ROUNDS [full|clip]
//! INPUTS_JSON holds a list of /embed inputs, cycled into ROUNDS batches of BATCH (plus one to
//! warm up), all preprocessed first (decode, resize, log-mel, ...); then the batches are
//! encoded. Prints one JSON object: `forward_ips` (items/s of encode_batch alone) and
//! `preprocess_ms` (per item).

use std::time::Instant;

use anyhow::{bail, Context};
use prism_api::wire::node::EmbedInput;
use prism_node::backend::{self, AudioWindow, DeviceChoice, LoadSpec};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        bail!("usage: forward ARCH MODEL_DIR INPUTS_JSON BATCH ROUNDS [full|clip]");
    }
    let (arch, dir, inputs_path) = (&args[0], &args[1], &args[2]);
    let batch: usize = args[3].parse().context("BATCH")?;
    let rounds: usize = args[4].parse().context("ROUNDS")?;
    let mut spec = LoadSpec::new(dir, DeviceChoice::Auto);
    spec.audio_window = match args.get(5).map(String::as_str) {
        None | Some("full") => AudioWindow::Full,
        Some("clip") => AudioWindow::Clip,
        Some(other) => bail!("window must be full or clip, got {other}"),
    };
    let mut model = backend::load(arch, &spec)?;
    let inputs: Vec<EmbedInput> =
        serde_json::from_slice(&std::fs::read(inputs_path).with_context(|| inputs_path.clone())?)?;
    if inputs.is_empty() || batch == 0 {
        bail!("need at least one input and a batch of at least 1");
    }
    // `Prepared` is opaque (not Clone): every batch is prepared before the clock starts.
    let t = Instant::now();
    let mut batches = (0..=rounds)
        .map(|r| (0..batch).map(|i| model.preprocessor.preprocess(&inputs[(r * batch + i) % inputs.len()])).collect())
        .collect::<Result<Vec<Vec<_>>, _>>()?;
    let preprocess_ms = t.elapsed().as_secs_f64() * 1000.0 / ((rounds + 1) * batch) as f64;
    model.encoder.encode_batch(&batches.remove(0))?; // warm
    let t = Instant::now();
    for b in &batches {
        model.encoder.encode_batch(b)?;
    }
    let forward_ips = (batch * rounds) as f64 / t.elapsed().as_secs_f64();
    println!("{}", serde_json::json!({"forward_ips": forward_ips, "preprocess_ms": preprocess_ms}));
    Ok(())
}
