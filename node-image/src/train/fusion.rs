//! `prism train fusion`: trains the two fusion nodes (`perceiver-fusion`, `mot-fusion`) on a task
//! where one modality alone is not enough: telling the digit from a corrupted image (a third to
//! a half of it wiped out, plus noise) and its name spoken under louder white noise (the
//! `corrupted` part of the digits data, scripts/make-digits-pairs.py).
//!
//! Every model here reads the raw encoder vectors the pipeline's modality nodes serve (vit-digits
//! 64-d, whisper-base 512-d, MiniLM 384-d), so the folders it writes are what an early-fusion
//! pipeline over those nodes calls. Each fusion network is the serving code itself
//! ([`fusion::trainable`]), with a linear classification head on its L2-normalised output that
//! the folder serves as `classifier.json`; both are trained together with cross-entropy and AdamW
//! (candle autograd). Batches mix modality subsets (vision + audio most of the time, each alone,
//! text alone or with both), so a node asked with a modality missing still answers sensibly.
//!
//! The comparison, on held-out pairs (held-out images, held-out accents, fresh noise): a
//! classifier of the same width per modality alone, trained the same way; their late fusion
//! (equal-weight mean of the two distributions, what `fusion::mix_labels` does); each trained
//! fusion node.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use candle_nn::{VarBuilder, VarMap};
use prism_api::wire::node::EmbedInput;
use serde::{Deserialize, Serialize};

use super::{embed_split, file_input, io, rows, Embedded, Manifest, Output, SplitMix64, TrainError};
use crate::backend::classifier::{self, Classifier};
use crate::backend::fusion::{self, FusionConfig, FusionNet};

pub mod tokens;

/// What to train from and where to write it.
#[derive(Clone, Debug)]
pub struct FusionTrainConfig {
    pub data: PathBuf,
    pub text_model: PathBuf,
    pub vision_model: PathBuf,
    pub audio_model: PathBuf,
    /// `perceiver/` and `mot/` model folders, `metrics.json` and `model_card.md` go here.
    pub out: PathBuf,
    pub steps: usize,
    pub batch: usize,
    pub learning_rate: f64,
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub latents: usize,
    /// Augmentation: Gaussian noise of this standard deviation added to every (standardised)
    /// feature of the training vectors; 0 = none.
    pub input_noise: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// The frames whisper computes: train on the setting the audio node serves.
    pub audio_window: crate::backend::AudioWindow,
}

impl FusionTrainConfig {
    pub fn new(data: PathBuf, text: PathBuf, vision: PathBuf, audio: PathBuf, out: PathBuf) -> Self {
        Self {
            data,
            text_model: text,
            vision_model: vision,
            audio_model: audio,
            out,
            steps: 3000,
            batch: 64,
            learning_rate: 1e-3,
            hidden: 128,
            heads: 4,
            layers: 2,
            latents: 8,
            input_noise: 0.5,
            weight_decay: 1e-4,
            seed: 20261207,
            audio_window: crate::backend::AudioWindow::Full,
        }
    }
}

/// Held-out top-1 on (corrupted image, noisy clip) pairs of the same digit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FusionReport {
    pub held_out_pairs: usize,
    pub chance: f64,
    pub vision_top1: f64,
    pub audio_top1: f64,
    pub best_single_top1: f64,
    /// Equal-weight mean of the two single-modality distributions.
    pub late_fusion_top1: f64,
    pub perceiver_top1: f64,
    pub mot_top1: f64,
    /// The better trained fusion node.
    pub fusion_top1: f64,
    /// Held-out phrasings through each fusion node with text as its only input (clean text).
    pub perceiver_text_only_top1: f64,
    pub mot_text_only_top1: f64,
    pub steps: usize,
    pub embed_seconds: f64,
    pub train_seconds: f64,
}

/// The corrupted copies of the paired data (manifest.json's `corrupted`).
#[derive(Deserialize)]
pub(super) struct Corrupted {
    pub(super) images: Vec<super::Item>,
    pub(super) audio: Vec<super::Item>,
    #[serde(default)]
    pub(super) recipe: String,
}

/// Modality subsets a training batch carries, with how often each is drawn (names in the order
/// the node sees them: a BTreeMap's).
const SUBSETS: [(&[&str], usize); 6] = [
    (&["audio", "vision"], 12),
    (&["vision"], 1),
    (&["audio"], 1),
    (&["text"], 1),
    (&["audio", "text", "vision"], 1),
    (&["text", "vision"], 1),
];

/// Trains both fusion nodes and the single-modality baselines, writes the two served folders
/// and returns the held-out figures. `progress` gets one line per phase and every 200 steps.
pub fn train_fusion(cfg: &FusionTrainConfig, progress: &mut dyn FnMut(String)) -> Result<FusionReport, TrainError> {
    let (manifest, corrupted) = read_corrupted(&cfg.data)?;
    let classes = manifest.labels.len();
    let started = Instant::now();
    let (data, images, clips) = (&cfg.data, &corrupted.images, &corrupted.audio);
    let aw = cfg.audio_window;
    let vision =
        embed_split("vit", &cfg.vision_model, data, files(data, images, "image"), Output::Pooled, aw, progress)?;
    let audio = embed_split(
        "whisper-encoder",
        &cfg.audio_model,
        data,
        files(data, clips, "audio"),
        Output::Pooled,
        aw,
        progress,
    )?;
    let mut text = manifest.embed("text", "bert", &cfg.text_model, &cfg.data, aw, progress)?;
    let (mut vision, mut audio) = (vision, audio);
    // Every model here trains on standardised vectors; the fusion folders fold it into proj.<m>.
    let scales = BTreeMap::from([
        ("audio".to_string(), Standardizer::fit(&mut audio)?),
        ("text".to_string(), Standardizer::fit(&mut text)?),
        ("vision".to_string(), Standardizer::fit(&mut vision)?),
    ]);
    let embed_seconds = started.elapsed().as_secs_f64();
    let pools = BTreeMap::from([("audio", &audio), ("text", &text), ("vision", &vision)]);
    check_labels(&pools, classes)?;
    let held_out = HeldOutPairs::new(&vision, &audio)?;
    progress(format!(
        "fusion: {} held-out pairs (corrupted image + noisy clip); corruption: {}",
        held_out.labels.len(),
        corrupted.recipe
    ));

    let train_started = Instant::now();
    let mut rng = SplitMix64(cfg.seed);
    let dims: BTreeMap<String, usize> = pools.iter().map(|(m, e)| (m.to_string(), e.train.dims()[1])).collect();
    // Baselines: one classifier per modality, as wide as the fusion networks.
    let mut single = BTreeMap::new();
    for m in ["vision", "audio"] {
        let net = Mlp::new(dims[m], cfg.hidden, classes, &mut rng)?;
        let logits = |b: &[(&str, Tensor)]| net.logits(&b[0].1);
        train_loop(cfg, &pools, classes, &[&[m]], &net.varmap, &mut rng, progress, m, logits, &mut |_| Ok(()))?;
        single.insert(m, net);
    }
    let pv = softmax_rows(&single["vision"].logits(&held_out.vision)?)?;
    let pa = softmax_rows(&single["audio"].logits(&held_out.audio)?)?;
    let (vision_top1, audio_top1) = (top1(&pv, &held_out.labels), top1(&pa, &held_out.labels));
    let late: Vec<Vec<f32>> =
        pv.iter().zip(&pa).map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x + y) / 2.0).collect()).collect();
    let late_fusion_top1 = top1(&late, &held_out.labels);

    let mut trained = BTreeMap::new();
    for arch in ["perceiver-fusion", "mot-fusion"] {
        let fcfg = network_config(cfg, arch, dims.clone(), BTreeMap::new());
        let model = FusionModel::new(&fcfg, classes, &mut rng)?;
        let subsets: Vec<&[&str]> = SUBSETS.iter().flat_map(|(s, w)| std::iter::repeat_n(*s, *w)).collect();
        let logits = |b: &[(&str, Tensor)]| model.logits(b);
        train_loop(cfg, &pools, classes, &subsets, &model.varmap, &mut rng, progress, arch, logits, &mut |_| Ok(()))?;
        let pair = model.logits(&[("audio", held_out.audio.clone()), ("vision", held_out.vision.clone())])?;
        let alone = |m: &str, x: &Tensor| -> Result<f64, TrainError> {
            Ok(top1(&softmax_rows(&model.logits(&[(m, x.clone())])?)?, &held_out.labels))
        };
        progress(format!(
            "{arch}: held-out top-1 with only vision {:.3}, only audio {:.3}",
            alone("vision", &held_out.vision)?,
            alone("audio", &held_out.audio)?
        ));
        let texts = Tensor::from_vec(text.test.concat(), (text.test.len(), dims["text"]), &Device::Cpu)?;
        let text_only = top1(&softmax_rows(&model.logits(&[("text", texts)])?)?, &text.test_labels);
        trained.insert(arch, (model, top1(&softmax_rows(&pair)?, &held_out.labels), text_only, fcfg));
    }
    let train_seconds = train_started.elapsed().as_secs_f64();
    let best_single_top1 = vision_top1.max(audio_top1);
    let (perceiver_top1, mot_top1) = (trained["perceiver-fusion"].1, trained["mot-fusion"].1);
    let report = FusionReport {
        held_out_pairs: held_out.labels.len(),
        chance: 1.0 / classes as f64,
        vision_top1,
        audio_top1,
        best_single_top1,
        late_fusion_top1,
        perceiver_top1,
        mot_top1,
        fusion_top1: perceiver_top1.max(mot_top1),
        perceiver_text_only_top1: trained["perceiver-fusion"].2,
        mot_text_only_top1: trained["mot-fusion"].2,
        steps: cfg.steps,
        embed_seconds,
        train_seconds,
    };
    progress(format!(
        "fusion: held-out top-1 vision {:.3} audio {:.3} late {:.3} perceiver {:.3} mot {:.3}",
        vision_top1, audio_top1, late_fusion_top1, perceiver_top1, mot_top1
    ));
    for (arch, (model, _, _, fcfg)) in &trained {
        let folder = if *arch == "perceiver-fusion" { "perceiver" } else { "mot" };
        model.save(&cfg.out.join(folder), fcfg, &manifest.labels, &scales)?;
    }
    write_report(cfg, &report)?;
    Ok(report)
}

/// The network `arch` at the trainer's width and depth; `modalities` gives each modality's
/// (token) dimension, `tokens` its tokens per input (empty: pooled vectors).
fn network_config(
    cfg: &FusionTrainConfig,
    arch: &str,
    modalities: BTreeMap<String, usize>,
    tokens: BTreeMap<String, usize>,
) -> FusionConfig {
    FusionConfig {
        architecture: arch.into(),
        hidden_size: cfg.hidden,
        num_heads: cfg.heads,
        num_layers: cfg.layers,
        intermediate_size: 2 * cfg.hidden,
        layer_norm_eps: 1e-5,
        hidden_act: "gelu".into(),
        num_latents: if arch == "perceiver-fusion" { cfg.latents } else { 0 },
        modalities,
        tokens,
    }
}

/// The paired data's manifest and its `corrupted` set (taken out of it), checked for what
/// training needs before minutes of embedding: the set itself and at least two labels.
fn read_corrupted(data: &Path) -> Result<(Manifest, Corrupted), TrainError> {
    let mut manifest = Manifest::read(data)?;
    let Some(corrupted) = manifest.corrupted.take() else {
        return Err(TrainError::Data(format!(
            "{}: has no `corrupted` set; run `make models` (scripts/make-digits-pairs.py writes it)",
            data.join("manifest.json").display()
        )));
    };
    if manifest.labels.len() < 2 {
        return Err(TrainError::Data("the paired data needs at least two labels".into()));
    }
    Ok((manifest, corrupted))
}

/// Every label has train and held-out items in every modality (the batches draw one of each per
/// label, the held-out pairs match a clip to each image), and no item has an unnamed label.
fn check_labels(pools: &BTreeMap<&str, &Embedded>, classes: usize) -> Result<(), TrainError> {
    for (name, e) in pools {
        if let Some(c) = (0..classes).find(|c| !e.train_labels.contains(c) || !e.test_labels.contains(c)) {
            return Err(TrainError::Data(format!("{name}: label {c} needs train and held-out items")));
        }
        if let Some(l) = e.train_labels.iter().chain(&e.test_labels).find(|l| **l >= classes) {
            return Err(TrainError::Data(format!("{name}: label {l} but only {classes} labels are named")));
        }
    }
    Ok(())
}

/// The data folder's files as embed inputs with their labels and splits.
fn files<'a>(
    data: &'a Path,
    items: &'a [super::Item],
    kind: &'static str,
) -> impl Iterator<Item = Result<(EmbedInput, usize, &'a str), TrainError>> + 'a {
    items.iter().map(move |i| Ok((file_input(data, kind, &i.file)?, i.label, i.split.as_str())))
}

/// Per-feature standardisation of one modality's vectors, fitted on its train split: the
/// encoders' pooled vectors share a large common component (whisper's most of all), which
/// LayerNorm-ed tokens train poorly on.
struct Standardizer {
    mean: Tensor,
    inv_std: Tensor,
}

impl Standardizer {
    /// Fits on `e.train` and standardises both splits in place.
    fn fit(e: &mut Embedded) -> Result<Self, TrainError> {
        Self::fit_tokens(e, 1)
    }

    /// [`Self::fit`] for rows of `k` tokens: one mean and scale per feature, shared by every
    /// token position, so it folds into the per-token projection.
    fn fit_tokens(e: &mut Embedded, k: usize) -> Result<Self, TrainError> {
        let (n, len) = e.train.dims2()?;
        if k == 0 || !len.is_multiple_of(k) {
            return Err(TrainError::Data(format!("rows of {len} values are not {k} whole tokens")));
        }
        let d = len / k;
        let tokens = e.train.reshape((n * k, d))?;
        let mean = tokens.mean(0)?;
        let var = tokens.broadcast_sub(&mean)?.sqr()?.mean(0)?;
        let inv_std = (var + 1e-8)?.sqrt()?.recip()?;
        let apply = |x: &Tensor| {
            let rows = x.dim(0)?;
            x.reshape((rows * k, d))?.broadcast_sub(&mean)?.broadcast_mul(&inv_std)?.reshape((rows, len))
        };
        e.train = apply(&e.train)?;
        let test = Tensor::from_vec(e.test.concat(), (e.test.len(), len), &Device::Cpu)?;
        e.test = apply(&test)?.to_vec2::<f32>()?;
        Ok(Self { mean, inv_std })
    }

    /// A linear layer over standardised inputs as one over raw inputs:
    /// W (x - mean) * inv_std + b = (W * inv_std) x + (b - (W * inv_std) mean).
    fn fold(&self, weight: &Tensor, bias: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let w = weight.broadcast_mul(&self.inv_std)?;
        let shift = w.matmul(&self.mean.unsqueeze(1)?)?.squeeze(1)?;
        Ok((w, (bias - shift)?))
    }
}

/// Each held-out corrupted image with a held-out noisy clip of its digit (the label's clips in
/// turn), as two aligned [n, dim] tensors.
struct HeldOutPairs {
    vision: Tensor,
    audio: Tensor,
    labels: Vec<usize>,
}

impl HeldOutPairs {
    fn new(vision: &Embedded, audio: &Embedded) -> Result<Self, TrainError> {
        let mut next: BTreeMap<usize, usize> = BTreeMap::new();
        let (mut v, mut a) = (Vec::new(), Vec::new());
        for (img, label) in vision.test.iter().zip(&vision.test_labels) {
            let clips: Vec<usize> = (0..audio.test_labels.len()).filter(|i| audio.test_labels[*i] == *label).collect();
            let k = next.entry(*label).or_default();
            v.extend_from_slice(img);
            a.extend_from_slice(&audio.test[clips[*k % clips.len()]]);
            *k += 1;
        }
        let n = vision.test_labels.len();
        let dim = |e: &Embedded| e.test.first().map(Vec::len).unwrap_or(0);
        Ok(Self {
            vision: Tensor::from_vec(v, (n, dim(vision)), &Device::Cpu)?,
            audio: Tensor::from_vec(a, (n, dim(audio)), &Device::Cpu)?,
            labels: vision.test_labels.clone(),
        })
    }
}

/// AdamW over `varmap` for `cfg.steps` steps of cross-entropy; each step draws a subset in turn
/// from `subsets` and a batch of random digits, one train item of each modality per digit.
#[allow(clippy::too_many_arguments)]
fn train_loop(
    cfg: &FusionTrainConfig,
    pools: &BTreeMap<&str, &Embedded>,
    classes: usize,
    subsets: &[&[&str]],
    varmap: &VarMap,
    rng: &mut SplitMix64,
    progress: &mut dyn FnMut(String),
    what: &str,
    logits: impl Fn(&[(&str, Tensor)]) -> candle_core::Result<Tensor>,
    after_step: &mut dyn FnMut(usize) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let by_label: BTreeMap<&str, Vec<Vec<u32>>> = pools
        .iter()
        .map(|(m, e)| {
            let mut v = vec![Vec::new(); classes];
            e.train_labels.iter().enumerate().for_each(|(i, l)| v[*l].push(i as u32));
            (*m, v)
        })
        .collect();
    let params = ParamsAdamW { lr: cfg.learning_rate, weight_decay: cfg.weight_decay, ..Default::default() };
    let mut opt = AdamW::new(varmap.all_vars(), params)?;
    for step in 1..=cfg.steps {
        let subset = subsets[(step - 1) % subsets.len()];
        let labels: Vec<u32> = (0..cfg.batch).map(|_| rng.below(classes) as u32).collect();
        let mut inputs = Vec::with_capacity(subset.len());
        for m in subset {
            let idx = labels.iter().map(|l| by_label[m][*l as usize][rng.below(by_label[m][*l as usize].len())]);
            let x = rows(&pools[m].train, idx.collect())?;
            inputs.push((*m, if cfg.input_noise > 0.0 { jitter(&x, cfg.input_noise, rng)? } else { x }));
        }
        let target = Tensor::from_vec(labels, cfg.batch, &Device::Cpu)?;
        let loss = candle_nn::loss::cross_entropy(&logits(&inputs)?, &target)?;
        opt.backward_step(&loss)?;
        after_step(step)?;
        if step % 200 == 0 || step == cfg.steps {
            progress(format!("train {what}: step {step}/{} loss {:.4}", cfg.steps, loss.to_scalar::<f32>()?));
        }
    }
    Ok(())
}

/// A fusion network and its classification head, trained together.
struct FusionModel {
    net: Box<dyn FusionNet>,
    head: candle_nn::Linear,
    varmap: VarMap,
}

impl FusionModel {
    fn new(cfg: &FusionConfig, classes: usize, rng: &mut SplitMix64) -> Result<Self, TrainError> {
        let varmap = VarMap::new();
        let net = fusion::trainable(cfg, &varmap, &Device::Cpu)?;
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let head = candle_nn::linear(cfg.hidden_size, classes, vb.pp(HEAD))?;
        reseed(&varmap, rng)?;
        Ok(Self { net, head, varmap })
    }

    /// What the node serves: the classifier over the L2-normalised fused vector (times
    /// [`LOGIT_SCALE`], folded into the saved weight).
    fn logits(&self, inputs: &[(&str, Tensor)]) -> candle_core::Result<Tensor> {
        self.head.forward(&(fusion::l2_rows(&self.net.pooled(inputs)?)? * LOGIT_SCALE)?)
    }

    /// `dir`: config.json, model.safetensors (the network), classifier.json (the head).
    fn save(
        &self,
        dir: &Path,
        cfg: &FusionConfig,
        labels: &[String],
        scales: &BTreeMap<String, Standardizer>,
    ) -> Result<(), TrainError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let config = dir.join("config.json");
        let json = serde_json::to_vec_pretty(cfg).map_err(|e| TrainError::Data(e.to_string()))?;
        std::fs::write(&config, json).map_err(io(&config))?;
        let data = self.varmap.data().lock().map_err(|_| TrainError::Data("weights lock poisoned".into()))?;
        let mut network: std::collections::HashMap<String, Tensor> = data
            .iter()
            .filter(|(name, _)| !name.starts_with(HEAD))
            .map(|(name, var)| (name.clone(), var.as_tensor().clone()))
            .collect();
        for (m, scale) in scales {
            let (w, b) = (format!("proj.{m}.weight"), format!("proj.{m}.bias"));
            if let (Some(weight), Some(bias)) = (network.get(&w), network.get(&b)) {
                let (weight, bias) = scale.fold(weight, bias)?;
                network.insert(w, weight);
                network.insert(b, bias);
            }
        }
        candle_core::safetensors::save(&network, dir.join("model.safetensors"))?;
        let head = Classifier {
            labels: labels.to_vec(),
            weight: (self.head.weight() * LOGIT_SCALE)?.to_vec2::<f32>()?,
            bias: self.head.bias().map(|b| b.to_vec1::<f32>()).transpose()?.unwrap_or_else(|| vec![0.0; labels.len()]),
        };
        let path = dir.join(classifier::FILE);
        head.save(&path).map_err(io(&path))?;
        // A reference file of the seeded checkpoints does not describe trained weights.
        let _ = std::fs::remove_file(dir.join("reference.json"));
        Ok(())
    }
}

/// Name prefix of the classification head inside a model's VarMap (saved apart).
const HEAD: &str = "classifier";

/// Unit vectors times this before the head: a softmax over cosines alone is too flat to train
/// (CLIP learns the same factor as its logit scale; a fixed one is enough here).
const LOGIT_SCALE: f64 = 10.0;

/// A one-hidden-layer classifier of one modality's vectors: the single-modality baseline.
struct Mlp {
    fc1: candle_nn::Linear,
    fc2: candle_nn::Linear,
    varmap: VarMap,
}

impl Mlp {
    fn new(input: usize, hidden: usize, classes: usize, rng: &mut SplitMix64) -> Result<Self, TrainError> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let (fc1, fc2) =
            (candle_nn::linear(input, hidden, vb.pp("fc1"))?, candle_nn::linear(hidden, classes, vb.pp("fc2"))?);
        reseed(&varmap, rng)?;
        Ok(Self { fc1, fc2, varmap })
    }

    fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.gelu_erf()?)
    }
}

/// Re-draws the randomly initialised weights from `rng` (candle's CPU generator cannot be
/// seeded): linear weights and biases uniform in ±1/sqrt(fan-in) as PyTorch's nn.Linear, the
/// latent array and modality-type embeddings N(0, 0.02); LayerNorms keep their identity init.
fn reseed(varmap: &VarMap, rng: &mut SplitMix64) -> Result<(), TrainError> {
    let data = varmap.data().lock().map_err(|_| TrainError::Data("weights lock poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let fan_in = match name.rsplit_once('.') {
            Some((layer, "weight")) if dims.len() == 2 => Some((layer, dims[1])),
            Some((layer, "bias")) => {
                data.get(&format!("{layer}.weight")).filter(|w| w.dims().len() == 2).map(|w| (layer, w.dims()[1]))
            }
            _ => None,
        };
        let values: Vec<f32> = if let Some((_, fan_in)) = fan_in {
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect()
        } else if name == "latents" || name.starts_with("type.") {
            (0..n).map(|_| (normal(rng) * 0.02) as f32).collect()
        } else {
            continue;
        };
        var.set(&Tensor::from_vec(values, dims, &Device::Cpu)?)?;
    }
    Ok(())
}

/// `x` plus seeded Gaussian noise of standard deviation `sigma`.
fn jitter(x: &Tensor, sigma: f64, rng: &mut SplitMix64) -> candle_core::Result<Tensor> {
    let (n, d) = x.dims2()?;
    let noise: Vec<f32> = (0..n * d).map(|_| (normal(rng) * sigma) as f32).collect();
    x + Tensor::from_vec(noise, (n, d), x.device())?
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut SplitMix64) -> f64 {
    let u = rng.next_f64().max(f64::MIN_POSITIVE);
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * rng.next_f64()).cos()
}

fn softmax_rows(logits: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    candle_nn::ops::softmax_last_dim(logits)?.to_vec2::<f32>()
}

fn top1(probs: &[Vec<f32>], labels: &[usize]) -> f64 {
    let argmax = |p: &[f32]| p.iter().enumerate().fold((0, f32::MIN), |a, (i, x)| if *x > a.1 { (i, *x) } else { a }).0;
    probs.iter().zip(labels).filter(|(p, l)| argmax(p) == **l).count() as f64 / labels.len().max(1) as f64
}

/// `out/metrics.json` and `out/model_card.md`.
fn write_report(cfg: &FusionTrainConfig, r: &FusionReport) -> Result<(), TrainError> {
    let metrics = cfg.out.join("metrics.json");
    let json = serde_json::to_vec_pretty(r).map_err(|e| TrainError::Data(e.to_string()))?;
    std::fs::write(&metrics, json).map_err(io(&metrics))?;
    let card = format!(
        "# Prism fusion nodes (generated by `prism train fusion`)\n\n\
         `perceiver/` (perceiver-fusion) and `mot/` (mot-fusion): early-fusion nodes over the raw vectors of \
         {vision} (vision), {audio} (audio) and {text} (text), each with a classification head \
         (`classifier.json`, the ten digits). Serve with `prism-node --model-uri <folder> --architecture \
         perceiver-fusion` (or mot-fusion).\n\n\
         Task: the digit from a corrupted image and its name spoken under noise (the `corrupted` set of {data}). \
         Width {h}, {heads} heads, {layers} layers, {latents} latents (perceiver); AdamW lr {lr}, {steps} steps of \
         batch {batch} per model, seed {seed}; batches mix modality subsets.\n\n\
         Held-out top-1 on {n} pairs (chance {chance:.2}):\n\n\
         | model | top-1 |\n|---|---|\n| vision alone (same-width classifier) | {v:.3} |\n\
         | audio alone (same-width classifier) | {a:.3} |\n| late fusion of the two (mean of distributions) | {late:.3} |\n\
         | perceiver-fusion | {p:.3} |\n| mot-fusion | {m:.3} |\n\n\
         Text alone through the fusion nodes (held-out phrasings): perceiver {pt:.3}, mot {mt:.3}.\n\n\
         Embedding {es:.1} s, training {ts:.1} s.\n",
        vision = cfg.vision_model.display(),
        audio = cfg.audio_model.display(),
        text = cfg.text_model.display(),
        data = cfg.data.display(),
        h = cfg.hidden,
        heads = cfg.heads,
        layers = cfg.layers,
        latents = cfg.latents,
        lr = cfg.learning_rate,
        steps = cfg.steps,
        batch = cfg.batch,
        seed = cfg.seed,
        n = r.held_out_pairs,
        chance = r.chance,
        v = r.vision_top1,
        a = r.audio_top1,
        late = r.late_fusion_top1,
        p = r.perceiver_top1,
        m = r.mot_top1,
        pt = r.perceiver_text_only_top1,
        mt = r.mot_text_only_top1,
        es = r.embed_seconds,
        ts = r.train_seconds,
    );
    let path = cfg.out.join("model_card.md");
    std::fs::write(&path, card).map_err(io(&path))
}
