//! `prism train fusion --tokens`: a Mixture-of-Transformers over token sequences, against a dense
//! transformer of the same width and depth trained on the same batches.
//!
//! Each modality enters as the encoder's own tokens, not one pooled vector: ViT's 16 patch tokens
//! of vit-digits, whisper's frames over the clip's real audio, MiniLM's word pieces (after each
//! encoder's final LayerNorm). Frames and word pieces vary in number, so each sequence is
//! resampled to a fixed count (contiguous segments averaged, [`TokenStates::resample`]) and a
//! batch is one tensor without masks.
//!
//! `mot-fusion` gives every modality its own norms, q/k/v/o projections and feed-forward, with one
//! global self-attention over all tokens; `dense-fusion` shares those weights across modalities.
//! Both have the same per-modality input projections and type embeddings, so a token costs the
//! same FLOPs in both: the MoT has more parameters, not more compute. The comparison is the one
//! the MoT papers make (quality reached per training FLOP): the held-out loss is measured every
//! `EVAL_EVERY` steps on both, and `mot_flops_vs_dense` is the training FLOPs the MoT spent to
//! first reach the dense model's best held-out loss, over the FLOPs the dense model spent to reach
//! it. The best, not the last: on a few hundred clips a long run starts to overfit, and the last
//! loss would flatter whichever model overfits more.
//!
//! [`TokenStates::resample`]: crate::backend::TokenStates::resample

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{
    check_labels, files, io, network_config, read_corrupted, softmax_rows, top1, train_loop, Embedded, FusionModel,
    FusionTrainConfig, HeldOutPairs, Standardizer, SUBSETS,
};
use crate::backend::fusion::FusionConfig;
use crate::train::{embed_split, Output, SplitMix64, TrainError};

/// Steps between two held-out evaluations.
pub const EVAL_EVERY: usize = 100;

/// Tokens per input of each modality.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenCounts {
    pub vision: usize,
    pub audio: usize,
    pub text: usize,
}

impl Default for TokenCounts {
    /// vit-digits has 16 patches; a 1-2 s clip has 50-100 whisper frames and a digit's phrase
    /// 4-10 word pieces, averaged down to 16 and 8.
    fn default() -> Self {
        Self { vision: 16, audio: 16, text: 8 }
    }
}

/// One held-out evaluation of both models.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CurvePoint {
    pub step: usize,
    /// Training FLOPs spent so far (the same for both models).
    pub train_flops: f64,
    pub mot_loss: f64,
    pub mot_top1: f64,
    pub dense_loss: f64,
    pub dense_top1: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenFusionReport {
    pub held_out_pairs: usize,
    pub tokens: TokenCounts,
    pub steps: usize,
    pub batch: usize,
    pub hidden: usize,
    pub layers: usize,
    pub mot_params: usize,
    pub dense_params: usize,
    /// Forward + backward FLOPs of one training step (matmuls and attention; 3x the forward).
    pub train_flops_per_step: f64,
    /// Forward FLOPs of one (vision + audio) pair at serving time.
    pub pair_forward_flops: f64,
    /// Held-out cross-entropy and top-1 on (corrupted image, noisy clip) pairs after training.
    pub mot_loss: f64,
    pub mot_top1: f64,
    pub dense_loss: f64,
    pub dense_top1: f64,
    /// The dense model's lowest held-out loss, and the step it reached it.
    pub dense_best_loss: f64,
    pub dense_best_step: usize,
    pub mot_best_loss: f64,
    /// First evaluated step at which the MoT's held-out loss was at most `dense_best_loss`;
    /// `None` if it never was.
    pub mot_steps_to_dense_loss: Option<usize>,
    /// Training FLOPs of the MoT to that step over the dense model's to `dense_best_step`.
    pub mot_flops_vs_dense: Option<f64>,
    pub curve: Vec<CurvePoint>,
    pub embed_seconds: f64,
    pub mot_seconds: f64,
    pub dense_seconds: f64,
}

/// The two architectures compared, in training order.
const ARCHS: [&str; 2] = ["mot-fusion", "dense-fusion"];

/// Trains both networks over token sequences and writes `out/tokens/{mot,dense}` (servable
/// fusion folders whose inputs are flattened token sequences), `metrics.json` and `model_card.md`.
pub fn train_token_fusion(
    cfg: &FusionTrainConfig,
    counts: &TokenCounts,
    progress: &mut dyn FnMut(String),
) -> Result<TokenFusionReport, TrainError> {
    let (manifest, corrupted) = read_corrupted(&cfg.data)?;
    let classes = manifest.labels.len();
    if [counts.vision, counts.audio, counts.text].contains(&0) {
        return Err(TrainError::Data("every modality needs at least one token".into()));
    }
    let started = Instant::now();
    let data = &cfg.data;
    let (images, clips) = (&corrupted.images, &corrupted.audio);
    let aw = cfg.audio_window;
    let image_files = files(data, images, "image");
    let mut vision =
        embed_split("vit", &cfg.vision_model, data, image_files, Output::Tokens(counts.vision), aw, progress)?;
    let audio_files = files(data, clips, "audio");
    let mut audio = embed_split(
        "whisper-encoder",
        &cfg.audio_model,
        data,
        audio_files,
        Output::Tokens(counts.audio),
        aw,
        progress,
    )?;
    let mut text =
        manifest.embed_as("text", "bert", &cfg.text_model, data, Output::Tokens(counts.text), aw, progress)?;
    let k = BTreeMap::from([
        ("audio".to_string(), counts.audio),
        ("text".to_string(), counts.text),
        ("vision".to_string(), counts.vision),
    ]);
    let scales = BTreeMap::from([
        ("audio".to_string(), Standardizer::fit_tokens(&mut audio, counts.audio)?),
        ("text".to_string(), Standardizer::fit_tokens(&mut text, counts.text)?),
        ("vision".to_string(), Standardizer::fit_tokens(&mut vision, counts.vision)?),
    ]);
    let embed_seconds = started.elapsed().as_secs_f64();
    let pools: BTreeMap<&str, &Embedded> = BTreeMap::from([("audio", &audio), ("text", &text), ("vision", &vision)]);
    let dims: BTreeMap<String, usize> = pools.iter().map(|(m, e)| (m.to_string(), e.train.dims()[1] / k[*m])).collect();
    check_labels(&pools, classes)?;
    let held_out = HeldOutPairs::new(&vision, &audio)?;
    let targets = Tensor::from_vec(
        held_out.labels.iter().map(|l| *l as u32).collect::<Vec<_>>(),
        held_out.labels.len(),
        &Device::Cpu,
    )?;
    progress(format!(
        "fusion --tokens: {} held-out pairs; tokens per input vision {} audio {} text {}",
        held_out.labels.len(),
        counts.vision,
        counts.audio,
        counts.text
    ));

    let subsets: Vec<&[&str]> = SUBSETS.iter().flat_map(|(s, w)| std::iter::repeat_n(*s, *w)).collect();
    let mut curves: BTreeMap<&str, Vec<(usize, f64, f64)>> = BTreeMap::new();
    let mut params = BTreeMap::new();
    let mut seconds = BTreeMap::new();
    let mut configs = BTreeMap::new();
    for arch in ARCHS {
        let fcfg = network_config(cfg, arch, dims.clone(), k.clone());
        // One seed for the weights, another for the data: both models see the same batches.
        let model = FusionModel::new(&fcfg, classes, &mut SplitMix64(cfg.seed))?;
        let mut data_rng = SplitMix64(cfg.seed ^ 0x0DA7_A5EE_D000);
        let pair = [("audio", held_out.audio.clone()), ("vision", held_out.vision.clone())];
        let mut curve = Vec::new();
        let t0 = Instant::now();
        let mut eval = |step: usize| -> Result<(), TrainError> {
            if step.is_multiple_of(EVAL_EVERY) || step == cfg.steps {
                let logits = model.logits(&pair)?;
                let loss = candle_nn::loss::cross_entropy(&logits, &targets)?.to_scalar::<f32>()? as f64;
                curve.push((step, loss, top1(&softmax_rows(&logits)?, &held_out.labels)));
            }
            Ok(())
        };
        let logits = |b: &[(&str, Tensor)]| model.logits(b);
        train_loop(cfg, &pools, classes, &subsets, &model.varmap, &mut data_rng, progress, arch, logits, &mut eval)?;
        seconds.insert(arch, t0.elapsed().as_secs_f64());
        params.insert(arch, model.varmap.all_vars().iter().map(|v| v.elem_count()).sum::<usize>());
        if let Some((_, loss, top)) = curve.last() {
            progress(format!("{arch}: held-out loss {loss:.4} top-1 {top:.3} over tokens"));
        }
        curves.insert(arch, curve);
        let folder = if arch == "mot-fusion" { "mot" } else { "dense" };
        model.save(&cfg.out.join("tokens").join(folder), &fcfg, &manifest.labels, &scales)?;
        configs.insert(arch, fcfg);
    }

    let fcfg = &configs["mot-fusion"];
    let step_flops = |step: usize| -> f64 {
        let subset = subsets[(step - 1) % subsets.len()];
        3.0 * cfg.batch as f64 * forward_flops(fcfg, subset, classes)
    };
    let cumulative: Vec<f64> = (1..=cfg.steps)
        .scan(0.0, |acc, s| {
            *acc += step_flops(s);
            Some(*acc)
        })
        .collect();
    let at = |step: usize| cumulative.get(step.saturating_sub(1)).copied().unwrap_or(0.0);
    let curve: Vec<CurvePoint> = curves["mot-fusion"]
        .iter()
        .zip(&curves["dense-fusion"])
        .map(|(m, d)| CurvePoint {
            step: m.0,
            train_flops: at(m.0),
            mot_loss: m.1,
            mot_top1: m.2,
            dense_loss: d.1,
            dense_top1: d.2,
        })
        .collect();
    let last = curve.last().cloned().ok_or_else(|| TrainError::Data("no evaluation ran (0 steps?)".into()))?;
    let best = |loss: fn(&CurvePoint) -> f64| curve.iter().min_by(|a, b| loss(a).total_cmp(&loss(b))).cloned();
    let (dense_best, mot_best) =
        (best(|p| p.dense_loss).unwrap_or(last.clone()), best(|p| p.mot_loss).unwrap_or(last.clone()));
    let crossing = curve.iter().find(|p| p.mot_loss <= dense_best.dense_loss).map(|p| p.step);
    let report = TokenFusionReport {
        held_out_pairs: held_out.labels.len(),
        tokens: counts.clone(),
        steps: cfg.steps,
        batch: cfg.batch,
        hidden: cfg.hidden,
        layers: cfg.layers,
        mot_params: params["mot-fusion"],
        dense_params: params["dense-fusion"],
        train_flops_per_step: at(cfg.steps) / cfg.steps as f64,
        pair_forward_flops: forward_flops(fcfg, &["audio", "vision"], classes),
        mot_loss: last.mot_loss,
        mot_top1: last.mot_top1,
        dense_loss: last.dense_loss,
        dense_top1: last.dense_top1,
        dense_best_loss: dense_best.dense_loss,
        dense_best_step: dense_best.step,
        mot_best_loss: mot_best.mot_loss,
        mot_steps_to_dense_loss: crossing,
        mot_flops_vs_dense: crossing.map(|s| at(s) / at(dense_best.step)),
        curve,
        embed_seconds,
        mot_seconds: seconds["mot-fusion"],
        dense_seconds: seconds["dense-fusion"],
    };
    write_report(cfg, &report)?;
    Ok(report)
}

/// Matmul and attention FLOPs (2 per multiply-add) of one input carrying `subset` through a
/// `mot-fusion` or `dense-fusion` network and its head; the two cost the same, token for token.
pub fn forward_flops(cfg: &FusionConfig, subset: &[&str], classes: usize) -> f64 {
    let h = cfg.hidden_size as f64;
    let tokens = |m: &str| cfg.tokens.get(m).copied().unwrap_or(1) as f64;
    let n: f64 = subset.iter().map(|m| tokens(m)).sum();
    let input: f64 =
        subset.iter().map(|m| tokens(m) * 2.0 * cfg.modalities.get(*m).copied().unwrap_or(0) as f64 * h).sum();
    // Per layer and token: q, k, v, o (4 h x h) and the feed-forward (h x ffn twice); scores and
    // the weighted sum over the n tokens (2 n h).
    let per_layer = n * (2.0 * 4.0 * h * h + 2.0 * 2.0 * h * cfg.intermediate_size as f64) + 2.0 * 2.0 * n * n * h;
    input + cfg.num_layers as f64 * per_layer + 2.0 * h * classes as f64
}

fn write_report(cfg: &FusionTrainConfig, r: &TokenFusionReport) -> Result<(), TrainError> {
    let dir = cfg.out.join("tokens");
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let metrics = dir.join("metrics.json");
    let json = serde_json::to_vec_pretty(r).map_err(|e| TrainError::Data(e.to_string()))?;
    std::fs::write(&metrics, json).map_err(io(&metrics))?;
    let crossing = match (r.mot_steps_to_dense_loss, r.mot_flops_vs_dense) {
        (Some(s), Some(f)) => format!("step {s}: {:.1}% of the FLOPs the dense model spent to get there", 100.0 * f),
        _ => "never, within the run".into(),
    };
    let mut table = String::from("| step | MoT loss | MoT top-1 | dense loss | dense top-1 |\n|---|---|---|---|---|\n");
    for p in &r.curve {
        table += &format!(
            "| {} | {:.4} | {:.3} | {:.4} | {:.3} |\n",
            p.step, p.mot_loss, p.mot_top1, p.dense_loss, p.dense_top1
        );
    }
    let card = format!(
        "# Mixture-of-Transformers vs dense over token sequences (generated by `prism train fusion --tokens`)\n\n\
         `mot/` (mot-fusion) and `dense/` (dense-fusion): width {h}, {layers} layers, tokens per input vision \
         {tv}, audio {ta}, text {tt}; {steps} steps of batch {batch}, the same batches for both. Parameters: \
         MoT {mp}, dense {dp}; FLOPs per training step {fs:.3e} for either, {pf:.3e} per (image, clip) pair \
         at serving time.\n\n\
         Held-out (corrupted image + noisy clip, {n} pairs) after training: MoT loss {ml:.4} top-1 {mt:.3}; \
         dense loss {dl:.4} top-1 {dt:.3}. The dense model's best held-out loss was {db:.4} (step {dbs}); the MoT's \
         {mb:.4}. The MoT first reached the dense model's best at {crossing}.\n\n\
         {table}\nEmbedding {es:.1} s; training MoT {ms:.1} s, dense {ds:.1} s.\n",
        h = r.hidden,
        layers = r.layers,
        tv = r.tokens.vision,
        ta = r.tokens.audio,
        tt = r.tokens.text,
        steps = r.steps,
        batch = r.batch,
        mp = r.mot_params,
        dp = r.dense_params,
        fs = r.train_flops_per_step,
        pf = r.pair_forward_flops,
        n = r.held_out_pairs,
        ml = r.mot_loss,
        mt = r.mot_top1,
        dl = r.dense_loss,
        dt = r.dense_top1,
        db = r.dense_best_loss,
        dbs = r.dense_best_step,
        mb = r.mot_best_loss,
        es = r.embed_seconds,
        ms = r.mot_seconds,
        ds = r.dense_seconds,
    );
    let path = dir.join("model_card.md");
    std::fs::write(&path, card).map_err(io(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: usize = 4;
    const D: usize = 8;
    const CLASSES: usize = 4;

    /// `n` items of one modality: K noise tokens, one of them (at a random place) carrying the
    /// class's prototype, faintly, so each modality alone is an unreliable witness.
    fn items(n: usize, protos: &[Vec<f32>], rng: &mut SplitMix64) -> (Vec<Vec<f32>>, Vec<usize>) {
        let noise = |rng: &mut SplitMix64| (rng.next_f64() * 2.0 - 1.0) as f32;
        (0..n)
            .map(|_| {
                let label = rng.below(CLASSES);
                let at = rng.below(K);
                let mut row: Vec<f32> = (0..K * D).map(|_| 2.2 * noise(rng)).collect();
                row[at * D..(at + 1) * D].iter_mut().zip(&protos[label]).for_each(|(x, p)| *x += p);
                (row, label)
            })
            .unzip()
    }

    fn modality(protos: &[Vec<f32>], rng: &mut SplitMix64) -> Result<Embedded, TrainError> {
        let (train, train_labels) = items(2000, protos, rng);
        let (test, test_labels) = items(400, protos, rng);
        let train = Tensor::from_vec(train.concat(), (train_labels.len(), K * D), &Device::Cpu)?;
        Ok(Embedded { train, train_labels, test, test_labels })
    }

    /// Both token-sequence networks learn to read the one informative token of each modality
    /// and to combine the two witnesses: together they beat either alone.
    #[test]
    fn mot_and_dense_over_token_sequences_fuse_two_weak_witnesses() -> Result<(), TrainError> {
        let mut rng = SplitMix64(7);
        let mut proto = || -> Vec<Vec<f32>> {
            (0..CLASSES).map(|_| (0..D).map(|_| (rng.next_f64() * 4.0 - 2.0) as f32).collect()).collect()
        };
        let (pv, pa) = (proto(), proto());
        let mut rng = SplitMix64(8);
        let (vision, audio) = (modality(&pv, &mut rng)?, modality(&pa, &mut rng)?);
        let pools: BTreeMap<&str, &Embedded> = BTreeMap::from([("audio", &audio), ("vision", &vision)]);
        let held_out = HeldOutPairs::new(&vision, &audio)?;
        let cfg = FusionTrainConfig {
            steps: 800,
            batch: 32,
            hidden: 32,
            layers: 1,
            input_noise: 0.0,
            ..FusionTrainConfig::new(".".into(), ".".into(), ".".into(), ".".into(), ".".into())
        };
        let subsets: [&[&str]; 3] = [&["audio", "vision"], &["vision"], &["audio"]];
        for arch in ARCHS {
            let fcfg = network_config(
                &cfg,
                arch,
                BTreeMap::from([("audio".into(), D), ("vision".into(), D)]),
                BTreeMap::from([("audio".into(), K), ("vision".into(), K)]),
            );
            let model = FusionModel::new(&fcfg, CLASSES, &mut SplitMix64(1))?;
            let logits = |b: &[(&str, Tensor)]| model.logits(b);
            let mut quiet = |_: String| {};
            train_loop(
                &cfg,
                &pools,
                CLASSES,
                &subsets,
                &model.varmap,
                &mut SplitMix64(2),
                &mut quiet,
                arch,
                logits,
                &mut |_| Ok(()),
            )?;
            let score = |inputs: &[(&str, Tensor)]| -> Result<f64, TrainError> {
                Ok(top1(&softmax_rows(&model.logits(inputs)?)?, &held_out.labels))
            };
            let both = score(&[("audio", held_out.audio.clone()), ("vision", held_out.vision.clone())])?;
            let (v, a) = (score(&[("vision", held_out.vision.clone())])?, score(&[("audio", held_out.audio.clone())])?);
            assert!(v > 0.4 && a > 0.4, "{arch}: each modality alone should beat chance (0.25): vision {v} audio {a}");
            // A network that ignored either modality would score at most the better one alone.
            assert!(
                both >= v.max(a) + 0.04 && both >= 0.55,
                "{arch}: both {both} should beat vision {v} and audio {a} alone"
            );
            // The same cost per token, more weights for the MoT.
            assert_eq!(forward_flops(&fcfg, &["audio", "vision"], CLASSES), {
                let h = cfg.hidden as f64;
                let n = 2.0 * K as f64;
                n * 2.0 * D as f64 * h + n * (8.0 * h * h + 8.0 * h * h) + 4.0 * n * n * h + 2.0 * h * CLASSES as f64
            });
        }
        Ok(())
    }

    #[test]
    fn resampling_averages_segments_and_repeats_short_sequences() {
        let t = crate::backend::TokenStates { dim: 1, values: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0] };
        assert_eq!(t.resample(3), vec![1.5, 3.5, 5.5]);
        assert_eq!(t.resample(6), t.values);
        let short = crate::backend::TokenStates { dim: 2, values: vec![1.0, 10.0, 2.0, 20.0] };
        assert_eq!(short.resample(4), vec![1.0, 10.0, 1.0, 10.0, 2.0, 20.0, 2.0, 20.0]);
        assert_eq!(t.resample(1), vec![3.5]);
    }
}
