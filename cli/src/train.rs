//! `prism train`: wiring of the candle training in `prism_node::train` to the command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use prism_node::train::{train_shared_space, SharedSpaceConfig};

#[derive(Subcommand)]
pub enum TrainCmd {
    /// Learn projection heads that put text and audio vectors into the vision model's space
    /// (contrastive, on paired data such as `make digits-data`), and write three servable model
    /// folders (text/, audio/, vision/) with a model card and held-out retrieval accuracy.
    SharedSpace(SharedSpaceArgs),
}

#[derive(Args)]
pub struct SharedSpaceArgs {
    /// Paired data folder with manifest.json (scripts/make-digits-pairs.py writes one).
    #[arg(long, default_value = ".cache/data/digits-pairs")]
    data: PathBuf,
    /// Text encoder folder (bert architecture).
    #[arg(long, default_value = ".cache/models/all-minilm-l6-v2")]
    text_model: PathBuf,
    /// Vision encoder folder (vit architecture): the frozen anchor of the space.
    #[arg(long, default_value = ".cache/models/vit-digits")]
    vision_model: PathBuf,
    /// Audio encoder folder (whisper-encoder architecture).
    #[arg(long, default_value = ".cache/models/whisper-base-encoder")]
    audio_model: PathBuf,
    /// Where the three model folders, model_card.md and metrics.json go.
    #[arg(long, default_value = ".cache/models/digits-space")]
    out: PathBuf,
    #[arg(long, default_value_t = 400)]
    steps: usize,
    #[arg(long, default_value_t = 128)]
    batch: usize,
    #[arg(long, default_value_t = 2e-3)]
    learning_rate: f64,
    /// Hidden width of each head (0 = one linear layer).
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    #[arg(long, default_value_t = 0.1)]
    temperature: f64,
    #[arg(long, default_value_t = 20261201)]
    seed: u64,
}

pub fn run(cmd: TrainCmd) -> anyhow::Result<()> {
    match cmd {
        TrainCmd::SharedSpace(a) => {
            let positive = |x: f64| x.is_finite() && x > 0.0;
            if a.steps == 0 || a.batch < 2 || !positive(a.temperature) || !positive(a.learning_rate) {
                anyhow::bail!("--steps must be >= 1, --batch >= 2, --temperature and --learning-rate > 0");
            }
            let cfg = SharedSpaceConfig {
                steps: a.steps,
                batch: a.batch,
                learning_rate: a.learning_rate,
                hidden: a.hidden,
                temperature: a.temperature,
                seed: a.seed,
                ..SharedSpaceConfig::new(a.data, a.text_model, a.vision_model, a.audio_model, a.out.clone())
            };
            let report = train_shared_space(&cfg, &mut |line| eprintln!("{line}"))
                .with_context(|| format!("training the shared space from {}", cfg.data.display()))?;
            println!(
                "train: text_to_image_top1={:.3} audio_to_image_top1={:.3} chance={:.3} (untrained {:.3}/{:.3}) out={}",
                report.text_to_image_top1,
                report.audio_to_image_top1,
                report.chance,
                report.text_to_image_top1_untrained,
                report.audio_to_image_top1_untrained,
                a.out.display()
            );
            Ok(())
        }
    }
}
