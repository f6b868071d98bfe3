//! `prism-node train` (and `prism train`, which runs it): wiring of the candle training in
//! `prism_node::train` to the command line. It lives in the node binary, which links candle
//! anyway, so the `prism` CLI does not.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use prism_node::backend::AudioWindow;
use prism_node::train::corrections::{train_from_corrections, CorrectionsConfig};
use prism_node::train::fusion::tokens::{train_token_fusion, TokenCounts};
use prism_node::train::fusion::{train_fusion, FusionTrainConfig};
use prism_node::train::{train_shared_space, SharedSpaceConfig};

#[derive(Subcommand, Debug)]
pub enum TrainCmd {
    /// Learn projection heads that put text and audio vectors into the vision model's space
    /// (contrastive, on paired data such as `make digits-data`), and write three servable model
    /// folders (text/, audio/, vision/) with a model card and held-out retrieval accuracy.
    SharedSpace(SharedSpaceArgs),
    /// Fine-tune a shared-space head on users' corrections (the router's GET
    /// /v1/memory/corrections, with the pipeline logging inputs: `memory.inputs: full`) and write
    /// a new revision folder; prints the gain on corrections held out of training.
    FromCorrections(FromCorrectionsArgs),
    /// Train the two early-fusion nodes (perceiver-fusion, mot-fusion) with classification heads
    /// on corrupted images plus noisy spoken names (the `corrupted` set of `make models`), and
    /// report held-out top-1 against each modality alone and their late fusion.
    Fusion(FusionArgs),
}

#[derive(Args, Debug)]
pub struct FromCorrectionsArgs {
    /// The router's training set: `curl ROUTER/v1/memory/corrections > corrections.json`.
    #[arg(long)]
    corrections: PathBuf,
    /// Which input of each request the head reads: text or audio.
    #[arg(long, default_value = "text")]
    modality: String,
    /// Encoder architecture of --model (default: bert for text, whisper-encoder for audio).
    #[arg(long)]
    architecture: Option<String>,
    /// The revision to correct (a folder with projection.safetensors); default
    /// .cache/models/digits-space/<modality>.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The space's anchor folder.
    #[arg(long, default_value = ".cache/models/digits-space/vision")]
    vision_model: PathBuf,
    /// The paired data the space was trained on (anchors, replay, forgetting check).
    #[arg(long, default_value = ".cache/data/digits-pairs")]
    data: PathBuf,
    /// The new revision's folder.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 200)]
    steps: usize,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    learning_rate: f64,
    #[arg(long, default_value_t = 0.1)]
    temperature: f64,
    #[arg(long, default_value_t = 20261201)]
    seed: u64,
}

/// The paired data and the three encoders it is embedded with.
#[derive(Args, Debug)]
pub struct PairedData {
    /// Paired data folder with manifest.json (scripts/make-digits-pairs.py writes one).
    #[arg(long, default_value = ".cache/data/digits-pairs")]
    data: PathBuf,
    /// Text encoder folder (bert architecture).
    #[arg(long, default_value = ".cache/models/all-minilm-l6-v2")]
    text_model: PathBuf,
    /// Vision encoder folder (vit architecture).
    #[arg(long, default_value = ".cache/models/vit-digits")]
    vision_model: PathBuf,
    /// Audio encoder folder (whisper-encoder architecture).
    #[arg(long, default_value = ".cache/models/whisper-base-encoder")]
    audio_model: PathBuf,
    /// The frames whisper computes (prism-node's `--audio-window`): train on what you serve.
    #[arg(long, env = "PRISM_AUDIO_WINDOW", value_enum, default_value_t = AudioWindow::Full)]
    audio_window: AudioWindow,
}

#[derive(Args, Debug)]
pub struct SharedSpaceArgs {
    #[command(flatten)]
    paired: PairedData,
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

#[derive(Args, Debug)]
pub struct FusionArgs {
    #[command(flatten)]
    paired: PairedData,
    /// Where perceiver/ and mot/ (servable model folders), model_card.md and metrics.json go.
    #[arg(long, default_value = ".cache/models/digits-fusion")]
    out: PathBuf,
    /// Optimiser steps per model.
    #[arg(long, default_value_t = 3000)]
    steps: usize,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    learning_rate: f64,
    /// Width of the fusion networks (and of the single-modality baselines).
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Augmentation: Gaussian noise of this standard deviation on every standardised feature of
    /// the training vectors.
    #[arg(long, default_value_t = 0.5)]
    input_noise: f64,
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,
    #[arg(long, default_value_t = 20261207)]
    seed: u64,
    /// Instead: a Mixture-of-Transformers and a dense transformer over the encoders' token
    /// sequences (16 patch, 16 frame, 8 word tokens), compared by held-out loss per training
    /// FLOP (out/tokens/: mot/, dense/, metrics.json, model_card.md).
    #[arg(long)]
    tokens: bool,
}

fn check_hyper(steps: usize, batch: usize, temperature: f64, learning_rate: f64) -> anyhow::Result<()> {
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if steps == 0 || batch < 2 || !positive(temperature) || !positive(learning_rate) {
        anyhow::bail!("--steps must be >= 1, --batch >= 2, --temperature and --learning-rate > 0");
    }
    Ok(())
}

pub fn run(cmd: TrainCmd) -> anyhow::Result<()> {
    match cmd {
        TrainCmd::FromCorrections(a) => {
            check_hyper(a.steps, a.batch, a.temperature, a.learning_rate)?;
            let architecture = match (a.architecture, a.modality.as_str()) {
                (Some(arch), _) => arch,
                (None, "text") => "bert".into(),
                (None, "audio") => "whisper-encoder".into(),
                (None, other) => anyhow::bail!("--modality {other}: give --architecture"),
            };
            let cfg = CorrectionsConfig {
                model: a.model.unwrap_or_else(|| PathBuf::from(".cache/models/digits-space").join(&a.modality)),
                corrections: a.corrections,
                modality: a.modality,
                architecture,
                vision_model: a.vision_model,
                data: a.data,
                out: a.out,
                steps: a.steps,
                batch: a.batch,
                learning_rate: a.learning_rate,
                temperature: a.temperature,
                seed: a.seed,
            };
            let r = train_from_corrections(&cfg, &mut |line| eprintln!("{line}"))
                .with_context(|| format!("training from {}", cfg.corrections.display()))?;
            println!(
                "train: correction_gain={:+.3} before_top1={:.3} after_top1={:.3} data_before_top1={:.3} data_after_top1={:.3} trained={} held_out={} out={}",
                r.correction_gain,
                r.before_top1,
                r.after_top1,
                r.data_before_top1,
                r.data_after_top1,
                r.corrections_trained,
                r.corrections_held_out,
                cfg.out.display()
            );
            Ok(())
        }
        TrainCmd::SharedSpace(a) => {
            check_hyper(a.steps, a.batch, a.temperature, a.learning_rate)?;
            let cfg = SharedSpaceConfig {
                steps: a.steps,
                batch: a.batch,
                learning_rate: a.learning_rate,
                hidden: a.hidden,
                temperature: a.temperature,
                seed: a.seed,
                audio_window: a.paired.audio_window,
                ..SharedSpaceConfig::new(
                    a.paired.data,
                    a.paired.text_model,
                    a.paired.vision_model,
                    a.paired.audio_model,
                    a.out.clone(),
                )
            };
            let report = train_shared_space(&cfg, &mut |line| eprintln!("{line}"))
                .with_context(|| format!("training the shared space from {}", cfg.data.display()))?;
            println!(
                "train: text_to_image_top1={:.3} audio_to_image_top1={:.3} chance={:.3} (untrained {:.3}/{:.3}) \
                 label_top1_vision={:.3} label_top1_text={:.3} label_top1_audio={:.3} label_top1_fused={:.3} out={}",
                report.text_to_image_top1,
                report.audio_to_image_top1,
                report.chance,
                report.text_to_image_top1_untrained,
                report.audio_to_image_top1_untrained,
                report.label_top1.vision,
                report.label_top1.text,
                report.label_top1.audio,
                report.label_top1.fused,
                a.out.display()
            );
            Ok(())
        }
        TrainCmd::Fusion(a) => {
            check_hyper(a.steps, a.batch, 1.0, a.learning_rate)?;
            if a.hidden == 0 || a.hidden % 4 != 0 || a.layers == 0 {
                anyhow::bail!("--hidden must be a positive multiple of 4 (4 attention heads), --layers >= 1");
            }
            let cfg = FusionTrainConfig {
                steps: a.steps,
                batch: a.batch,
                learning_rate: a.learning_rate,
                hidden: a.hidden,
                layers: a.layers,
                input_noise: a.input_noise,
                weight_decay: a.weight_decay,
                seed: a.seed,
                audio_window: a.paired.audio_window,
                ..FusionTrainConfig::new(
                    a.paired.data,
                    a.paired.text_model,
                    a.paired.vision_model,
                    a.paired.audio_model,
                    a.out.clone(),
                )
            };
            if a.tokens {
                let r = train_token_fusion(&cfg, &TokenCounts::default(), &mut |line| eprintln!("{line}"))
                    .with_context(|| format!("training fusion over token sequences from {}", cfg.data.display()))?;
                let or_none = |x: Option<String>| x.unwrap_or_else(|| "none".into());
                println!(
                    "train: mot_flops_vs_dense={} mot_steps_to_dense_loss={} mot_loss={:.4} dense_loss={:.4} \
                     mot_top1={:.3} dense_top1={:.3} train_flops_per_step={:.3e} steps={} out={}",
                    or_none(r.mot_flops_vs_dense.map(|f| format!("{f:.3}"))),
                    or_none(r.mot_steps_to_dense_loss.map(|s| s.to_string())),
                    r.mot_loss,
                    r.dense_loss,
                    r.mot_top1,
                    r.dense_top1,
                    r.train_flops_per_step,
                    r.steps,
                    a.out.join("tokens").display()
                );
                return Ok(());
            }
            let r = train_fusion(&cfg, &mut |line| eprintln!("{line}"))
                .with_context(|| format!("training the fusion nodes from {}", cfg.data.display()))?;
            println!(
                "train: fusion_top1={:.3} best_single_top1={:.3} perceiver_top1={:.3} mot_top1={:.3} \
                 vision_top1={:.3} audio_top1={:.3} late_fusion_top1={:.3} held_out={} out={}",
                r.fusion_top1,
                r.best_single_top1,
                r.perceiver_top1,
                r.mot_top1,
                r.vision_top1,
                r.audio_top1,
                r.late_fusion_top1,
                r.held_out_pairs,
                a.out.display()
            );
            Ok(())
        }
    }
}
