//! `prism train shared-space`: learns projection heads that put text and audio vectors into the
//! vision model's embedding space, so that "seven", a spoken "seven" and a handwritten 7 land near
//! each other and fusion across modalities means something.
//!
//! Recipe (CLIP-style, with candle autograd): the vision encoder is the frozen anchor; a small MLP
//! head per other modality is trained with a symmetric InfoNCE loss over batches of (image, text,
//! audio) triples of the same label. Several items of one label can share a batch, so the target
//! of each row is spread over every item of its label (supervised contrastive) instead of CLIP's
//! identity, which would push same-digit pairs apart. Everything is seeded: same data, same heads.
//!
//! The data set is a folder with `manifest.json` (see `scripts/make-digits-pairs.py`): images,
//! texts and audio clips, each with a label and a `train`/`test` split. Retrieval accuracy is
//! measured on the held-out split only (held-out images, phrasings and speaker accents).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use base64::Engine as _;
use candle_core::{Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use prism_api::wire::node::{EmbedInput, InputItem};
use serde::{Deserialize, Serialize};

use crate::backend::classifier::{self, Classifier};
use crate::backend::projection::{self, ProjectionHead};
use crate::backend::{self, AudioWindow, BackendError, DeviceChoice, LoadSpec};

pub mod corrections;
pub mod fusion;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Data(String),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("training: {0}")]
    Candle(#[from] candle_core::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io { path: path.to_path_buf(), source }
}

/// What to train from and where to write it.
#[derive(Clone, Debug)]
pub struct SharedSpaceConfig {
    pub data: PathBuf,
    pub text_model: PathBuf,
    pub vision_model: PathBuf,
    pub audio_model: PathBuf,
    pub out: PathBuf,
    pub steps: usize,
    pub batch: usize,
    pub learning_rate: f64,
    /// Hidden width of each head's MLP; 0 = a single linear layer.
    pub hidden: usize,
    /// Softmax temperature of the contrastive loss.
    pub temperature: f64,
    pub seed: u64,
    /// The frames whisper computes: train on the setting the audio node serves.
    pub audio_window: AudioWindow,
}

impl SharedSpaceConfig {
    pub fn new(data: PathBuf, text: PathBuf, vision: PathBuf, audio: PathBuf, out: PathBuf) -> Self {
        Self {
            data,
            text_model: text,
            vision_model: vision,
            audio_model: audio,
            out,
            steps: 400,
            batch: 128,
            learning_rate: 2e-3,
            hidden: 256,
            temperature: 0.1,
            seed: 20261201,
            audio_window: AudioWindow::Full,
        }
    }
}

/// Held-out retrieval accuracy, before (random heads) and after training, and what it cost.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SharedSpaceReport {
    pub text_to_image_top1: f64,
    pub audio_to_image_top1: f64,
    pub text_to_image_top1_untrained: f64,
    pub audio_to_image_top1_untrained: f64,
    pub chance: f64,
    pub held_out: HeldOut,
    pub steps: usize,
    pub final_loss: f64,
    pub embed_seconds: f64,
    pub train_seconds: f64,
    /// Held-out top-1 of the classification head every folder serves (`classifier.json`), per
    /// modality, and of the late fusion of all three label distributions (equal weights) over
    /// held-out items of the same digit.
    pub label_top1: LabelTop1,
}

/// Top-1 of the served labels on held-out items.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabelTop1 {
    pub vision: f64,
    pub text: f64,
    pub audio: f64,
    pub fused: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeldOut {
    pub images: usize,
    pub texts: usize,
    pub audio: usize,
}

#[derive(Deserialize)]
struct Manifest {
    labels: Vec<String>,
    images: Vec<Item>,
    texts: Vec<TextItem>,
    audio: Vec<Item>,
    /// The corrupted copies `prism train fusion` learns from (absent in data made before it).
    #[serde(default)]
    corrupted: Option<fusion::Corrupted>,
}

impl Manifest {
    /// `<data>/manifest.json`.
    fn read(data: &Path) -> Result<Self, TrainError> {
        let path = data.join("manifest.json");
        serde_json::from_slice(&std::fs::read(&path).map_err(io(&path))?)
            .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))
    }

    /// The raw-encoder vectors of one modality's items (`vision`, `text` or `audio`), split;
    /// `dir` is the encoder's folder (read as `architecture`, head ignored).
    fn embed(
        &self,
        modality: &str,
        architecture: &str,
        dir: &Path,
        data: &Path,
        audio_window: AudioWindow,
        progress: &mut dyn FnMut(String),
    ) -> Result<Embedded, TrainError> {
        self.embed_as(modality, architecture, dir, data, Output::Pooled, audio_window, progress)
    }

    /// [`Self::embed`], as pooled vectors or as token sequences.
    #[allow(clippy::too_many_arguments)] // the encoder's folder and settings, the data, the output
    fn embed_as(
        &self,
        modality: &str,
        architecture: &str,
        dir: &Path,
        data: &Path,
        output: Output,
        audio_window: AudioWindow,
        progress: &mut dyn FnMut(String),
    ) -> Result<Embedded, TrainError> {
        match modality {
            "vision" => embed_split(
                architecture,
                dir,
                data,
                self.images.iter().map(|i| Ok((file_input(data, "image", &i.file)?, i.label, i.split.as_str()))),
                output,
                audio_window,
                progress,
            ),
            "text" => embed_split(
                architecture,
                dir,
                data,
                self.texts.iter().map(|t| Ok((EmbedInput::Text(t.text.clone()), t.label, t.split.as_str()))),
                output,
                audio_window,
                progress,
            ),
            "audio" => embed_split(
                architecture,
                dir,
                data,
                self.audio.iter().map(|a| Ok((file_input(data, "audio", &a.file)?, a.label, a.split.as_str()))),
                output,
                audio_window,
                progress,
            ),
            other => Err(TrainError::Data(format!("modality {other}: the paired data has vision, text and audio"))),
        }
    }
}

#[derive(Deserialize)]
struct Item {
    file: String,
    label: usize,
    split: String,
}

#[derive(Deserialize)]
struct TextItem {
    text: String,
    label: usize,
    split: String,
}

/// One modality's vectors with their labels, split.
struct Embedded {
    train: Tensor,
    train_labels: Vec<usize>,
    test: Vec<Vec<f32>>,
    test_labels: Vec<usize>,
}

/// Trains the heads, writes the three served model folders and returns the held-out accuracy.
/// `progress` gets one line per phase and every 50 steps.
pub fn train_shared_space(
    cfg: &SharedSpaceConfig,
    progress: &mut dyn FnMut(String),
) -> Result<SharedSpaceReport, TrainError> {
    let manifest = Manifest::read(&cfg.data)?;
    let classes = manifest.labels.len();
    if classes < 2 {
        return Err(TrainError::Data(format!(
            "{}: needs at least two labels",
            cfg.data.join("manifest.json").display()
        )));
    }
    let started = Instant::now();
    let aw = cfg.audio_window;
    let images = manifest.embed("vision", "vit", &cfg.vision_model, &cfg.data, aw, progress)?;
    let texts = manifest.embed("text", "bert", &cfg.text_model, &cfg.data, aw, progress)?;
    let audio = manifest.embed("audio", "whisper-encoder", &cfg.audio_model, &cfg.data, aw, progress)?;
    let embed_seconds = started.elapsed().as_secs_f64();
    for (name, e) in [("images", &images), ("texts", &texts), ("audio", &audio)] {
        if e.train_labels.is_empty() || e.test_labels.is_empty() {
            return Err(TrainError::Data(format!("{name}: needs items in both the train and the test split")));
        }
        if let Some(l) = e.train_labels.iter().chain(&e.test_labels).find(|l| **l >= classes) {
            return Err(TrainError::Data(format!("{name}: label {l} but only {classes} labels are named")));
        }
    }

    let mut rng = SplitMix64(cfg.seed);
    let dim = images.train.dims()[1];
    let (text_head, text_vars) = init_head(texts.train.dims()[1], cfg.hidden, dim, &mut rng)?;
    let (audio_head, audio_vars) = init_head(audio.train.dims()[1], cfg.hidden, dim, &mut rng)?;
    let text_untrained = retrieval_top1(&text_head, &texts.test, &texts.test_labels, &images)?;
    let audio_untrained = retrieval_top1(&audio_head, &audio.test, &audio.test_labels, &images)?;

    // Indexes of every train item per label, to draw same-label text/audio for each image.
    let by_label = |labels: &[usize]| {
        let mut m = vec![Vec::new(); classes];
        labels.iter().enumerate().for_each(|(i, l)| m[*l].push(i as u32));
        m
    };
    let (text_by_label, audio_by_label) = (by_label(&texts.train_labels), by_label(&audio.train_labels));
    if let Some(c) = (0..classes).find(|c| text_by_label[*c].is_empty() || audio_by_label[*c].is_empty()) {
        return Err(TrainError::Data(format!("label {c} ({}) has no train text or audio", manifest.labels[c])));
    }
    let mut vars = text_vars;
    vars.extend(audio_vars);
    let mut opt = AdamW::new(vars, ParamsAdamW { lr: cfg.learning_rate, weight_decay: 1e-4, ..Default::default() })?;
    let train_started = Instant::now();
    let mut final_loss = f64::NAN;
    let n_images = images.train_labels.len();
    for step in 1..=cfg.steps {
        let mut img_idx = Vec::with_capacity(cfg.batch);
        let (mut txt_idx, mut aud_idx, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..cfg.batch {
            let i = rng.below(n_images);
            let l = images.train_labels[i];
            img_idx.push(i as u32);
            txt_idx.push(text_by_label[l][rng.below(text_by_label[l].len())]);
            aud_idx.push(audio_by_label[l][rng.below(audio_by_label[l].len())]);
            labels.push(l);
        }
        let v = rows(&images.train, img_idx)?;
        let target = same_label_targets(&labels)?;
        let zt = text_head.forward(&rows(&texts.train, txt_idx)?)?;
        let za = audio_head.forward(&rows(&audio.train, aud_idx)?)?;
        let loss = (contrastive_loss(&zt, &v, &target, cfg.temperature)?
            + contrastive_loss(&za, &v, &target, cfg.temperature)?)?;
        opt.backward_step(&loss)?;
        final_loss = loss.to_scalar::<f32>()? as f64;
        if step % 50 == 0 || step == cfg.steps {
            progress(format!("train: step {step}/{} loss {final_loss:.4}", cfg.steps));
        }
    }
    let train_seconds = train_started.elapsed().as_secs_f64();
    let head = prototype_classifier(&images, &manifest.labels, cfg.temperature)?;
    let label_top1 = label_accuracy(&head, &images, &texts, &audio, &text_head, &audio_head)?;
    progress(format!(
        "labels: held-out top-1 vision {:.3} text {:.3} audio {:.3}, fused {:.3}",
        label_top1.vision, label_top1.text, label_top1.audio, label_top1.fused
    ));
    let report = SharedSpaceReport {
        label_top1,
        text_to_image_top1: retrieval_top1(&text_head, &texts.test, &texts.test_labels, &images)?,
        audio_to_image_top1: retrieval_top1(&audio_head, &audio.test, &audio.test_labels, &images)?,
        text_to_image_top1_untrained: text_untrained,
        audio_to_image_top1_untrained: audio_untrained,
        chance: 1.0 / classes as f64,
        held_out: HeldOut {
            images: images.test_labels.len(),
            texts: texts.test_labels.len(),
            audio: audio.test_labels.len(),
        },
        steps: cfg.steps,
        final_loss,
        embed_seconds,
        train_seconds,
    };
    write_outputs(cfg, &text_head, &audio_head, &head, &report)?;
    Ok(report)
}

/// The shared space's classification head: one prototype per label, the normalised mean of its
/// training images (the space's anchor), as the rows of a linear head scaled by 1 / the
/// training temperature, so its softmax is the one the contrastive loss was trained with.
fn prototype_classifier(images: &Embedded, labels: &[String], temperature: f64) -> Result<Classifier, TrainError> {
    let train = images.train.to_vec2::<f32>()?;
    let dim = train.first().map(Vec::len).unwrap_or(0);
    let mut sums = vec![vec![0f64; dim]; labels.len()];
    for (v, l) in train.iter().zip(&images.train_labels) {
        sums[*l].iter_mut().zip(v).for_each(|(s, x)| *s += f64::from(*x));
    }
    let weight = sums
        .into_iter()
        .map(|s| {
            let n = s.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            s.into_iter().map(|x| (x / n / temperature) as f32).collect()
        })
        .collect();
    Ok(Classifier { labels: labels.to_vec(), weight, bias: vec![0.0; labels.len()] })
}

/// Held-out top-1 of `head` per modality (text and audio through their projection heads), and
/// of the equal-weight mixture of the three distributions for each held-out image paired with
/// a held-out phrasing and clip of the same label.
fn label_accuracy(
    head: &Classifier,
    images: &Embedded,
    texts: &Embedded,
    audio: &Embedded,
    text_head: &ProjectionHead,
    audio_head: &ProjectionHead,
) -> Result<LabelTop1, TrainError> {
    let projected = |h: &ProjectionHead, e: &Embedded| -> Result<Vec<Vec<f32>>, TrainError> {
        let d = e.test.first().map(Vec::len).unwrap_or(0);
        Ok(h.forward(&Tensor::from_vec(e.test.concat(), (e.test.len(), d), &Device::Cpu)?)?.to_vec2::<f32>()?)
    };
    let (zt, za) = (projected(text_head, texts)?, projected(audio_head, audio)?);
    let probs = |vs: &[Vec<f32>]| -> Vec<Vec<f64>> {
        vs.iter()
            .map(|v| {
                let mut p = vec![0f64; head.labels.len()];
                for l in head.classify(v) {
                    if let Some(i) = head.labels.iter().position(|x| *x == l.label) {
                        p[i] = f64::from(l.score);
                    }
                }
                p
            })
            .collect()
    };
    let argmax = |p: &[f64]| p.iter().enumerate().fold((0, f64::MIN), |a, (i, x)| if *x > a.1 { (i, *x) } else { a }).0;
    let top1 = |p: &[Vec<f64>], labels: &[usize]| {
        p.iter().zip(labels).filter(|(p, l)| argmax(p) == **l).count() as f64 / labels.len().max(1) as f64
    };
    let (pv, pt, pa) = (probs(&images.test), probs(&zt), probs(&za));
    // Each held-out image with the first held-out phrasing and clip of its label.
    let first_of = |labels: &[usize], l: usize| labels.iter().position(|x| *x == l);
    let (mut hits, mut n) = (0usize, 0usize);
    for (i, l) in images.test_labels.iter().enumerate() {
        if let (Some(t), Some(a)) = (first_of(&texts.test_labels, *l), first_of(&audio.test_labels, *l)) {
            let mixed: Vec<f64> = (0..head.labels.len()).map(|k| (pv[i][k] + pt[t][k] + pa[a][k]) / 3.0).collect();
            hits += usize::from(argmax(&mixed) == *l);
            n += 1;
        }
    }
    Ok(LabelTop1 {
        vision: top1(&pv, &images.test_labels),
        text: top1(&pt, &texts.test_labels),
        audio: top1(&pa, &audio.test_labels),
        fused: hits as f64 / n.max(1) as f64,
    })
}

/// A file of the data folder as an embed input (`image` or `audio`).
fn file_input(data: &Path, kind: &str, file: &str) -> Result<EmbedInput, TrainError> {
    let path = data.join(file);
    let b64 = base64::engine::general_purpose::STANDARD.encode(std::fs::read(&path).map_err(io(&path))?);
    Ok(EmbedInput::Item(match kind {
        "image" => InputItem { image_base64: Some(b64), ..Default::default() },
        _ => InputItem { audio_base64: Some(b64), ..Default::default() },
    }))
}

/// Embeds every item with the raw encoder (no head: a folder produced by an earlier run would
/// otherwise project twice), in batches, and splits by the manifest's `split`. Vectors are cached
/// in `<data>/.embeddings/` under a key of the model file and the inputs, so a second run (another
/// seed, more steps) skips the minutes whisper takes over its 30 s windows.
fn embed_split<'a>(
    architecture: &str,
    dir: &Path,
    data: &Path,
    items: impl Iterator<Item = Result<(EmbedInput, usize, &'a str), TrainError>>,
    output: Output,
    audio_window: AudioWindow,
    progress: &mut dyn FnMut(String),
) -> Result<Embedded, TrainError> {
    let items = items.collect::<Result<Vec<_>, _>>()?;
    let spec = LoadSpec { audio_window, ..LoadSpec::new(dir, DeviceChoice::Auto) };
    let mut what = match output {
        Output::Pooled => String::new(),
        Output::Tokens(k) => format!("tokens{k}-"),
    };
    // Whisper's vectors depend on the frames it computes (the padded window unless clip).
    if architecture == "whisper-encoder" && spec.audio_window != AudioWindow::Full {
        what += &format!("{:?}-", spec.audio_window).to_lowercase();
    }
    let cache = data.join(".embeddings").join(format!("{architecture}-{what}{}.safetensors", cache_key(dir, &items)?));
    let cached = candle_core::safetensors::load(&cache, &Device::Cpu).ok().and_then(|mut t| t.remove("vectors"));
    let (vectors, d) = match cached.filter(|t| t.dims().first() == Some(&items.len())) {
        Some(t) => {
            progress(format!("embed: {} {architecture} vectors from the cache {}", items.len(), cache.display()));
            (t.to_vec2::<f32>()?, t.dims()[1])
        }
        None => {
            let mut model = (backend::lookup(architecture)?.load)(&spec)?;
            progress(format!(
                "embed: {} {} inputs with {architecture} from {}",
                items.len(),
                model.info.modality,
                dir.display()
            ));
            let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(items.len());
            for chunk in items.chunks(16) {
                let mut prepared = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, (x, _, _))| Ok((i, model.preprocessor.preprocess(x)?)))
                    .collect::<Result<Vec<_>, BackendError>>()?;
                // Encoders expect batches sorted by cost (they pad to the longest item).
                prepared.sort_by_key(|(_, p)| p.cost);
                let (order, batch): (Vec<usize>, Vec<_>) = prepared.into_iter().unzip();
                let mut chunk_vectors = vec![Vec::new(); chunk.len()];
                let encoded = match output {
                    Output::Pooled => model.encoder.encode_batch(&batch)?,
                    Output::Tokens(k) => model.encoder.encode_tokens(&batch)?.iter().map(|t| t.resample(k)).collect(),
                };
                for (i, v) in order.into_iter().zip(encoded) {
                    chunk_vectors[i] = v;
                }
                vectors.extend(chunk_vectors);
            }
            let d = vectors.first().map(Vec::len).unwrap_or(model.info.dim);
            let t = Tensor::from_vec(vectors.concat(), (vectors.len(), d), &Device::Cpu)?;
            // A read-only data folder only costs the next run the same minutes again.
            let saved = cache.parent().map(std::fs::create_dir_all).transpose().ok().and_then(|_| {
                candle_core::safetensors::save(&HashMap::from([("vectors".to_string(), t)]), &cache).ok()
            });
            if saved.is_none() {
                progress(format!("embed: could not cache vectors at {}", cache.display()));
            }
            (vectors, d)
        }
    };
    let (mut train, mut train_labels, mut test, mut test_labels) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((_, label, split), v) in items.iter().zip(vectors) {
        match *split {
            "train" => {
                train.extend(v);
                train_labels.push(*label);
            }
            "test" => {
                test.push(v);
                test_labels.push(*label);
            }
            other => return Err(TrainError::Data(format!("split {other:?}: expected \"train\" or \"test\""))),
        }
    }
    let train = Tensor::from_vec(train, (train_labels.len(), d), &Device::Cpu)?;
    Ok(Embedded { train, train_labels, test, test_labels })
}

/// What [`embed_split`] keeps of each input.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Output {
    /// The vector the node serves.
    Pooled,
    /// The encoder's token states resampled to this many tokens ([`backend::TokenStates::resample`]),
    /// flattened: one row of tokens · dim values.
    Tokens(usize),
}

/// Names the cached vectors: the model's weights file (path, size, mtime) and every input.
fn cache_key(model_dir: &Path, items: &[(EmbedInput, usize, &str)]) -> Result<String, TrainError> {
    use sha2::Digest as _;
    let weights = model_dir.join("model.safetensors");
    let meta = std::fs::metadata(&weights).map_err(io(&weights))?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).unwrap_or_default();
    let mut h = sha2::Sha256::new();
    h.update(format!(
        "{}|{}|{}",
        std::fs::canonicalize(&weights).unwrap_or(weights).display(),
        meta.len(),
        mtime.as_nanos()
    ));
    for (input, _, _) in items {
        h.update(serde_json::to_vec(input).unwrap_or_default());
    }
    Ok(h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// The rows `idx` of `t` (a training batch drawn from a pool of vectors).
fn rows(t: &Tensor, idx: Vec<u32>) -> candle_core::Result<Tensor> {
    let n = idx.len();
    t.index_select(&Tensor::from_vec(idx, n, &Device::Cpu)?, 0)
}

/// A head with PyTorch's `nn.Linear` initialisation (uniform in ±1/sqrt(in)), seeded.
fn init_head(
    input: usize,
    hidden: usize,
    output: usize,
    rng: &mut SplitMix64,
) -> Result<(ProjectionHead, Vec<Var>), TrainError> {
    let dims = if hidden == 0 { vec![(input, output)] } else { vec![(input, hidden), (hidden, output)] };
    let (mut layers, mut vars) = (Vec::new(), Vec::new());
    for (i, o) in dims {
        let bound = 1.0 / (i as f64).sqrt();
        let mut uniform = |n: usize| (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect::<Vec<_>>();
        let w = Var::from_tensor(&Tensor::from_vec(uniform(o * i), (o, i), &Device::Cpu)?)?;
        let b = Var::from_tensor(&Tensor::from_vec(uniform(o), o, &Device::Cpu)?)?;
        // The head holds the Vars' tensors: the optimiser updates them in place.
        layers.push((w.as_tensor().clone(), b.as_tensor().clone()));
        vars.extend([w, b]);
    }
    Ok((ProjectionHead { layers }, vars))
}

/// target[i][j] = 1/|{k: y_k = y_i}| when y_j = y_i: each row's probability mass is spread over
/// the items of its label. Symmetric, so it serves both directions of the loss.
fn same_label_targets(labels: &[usize]) -> candle_core::Result<Tensor> {
    let n = labels.len();
    let mut counts: HashMap<usize, f32> = HashMap::new();
    labels.iter().for_each(|l| *counts.entry(*l).or_default() += 1.0);
    let t: Vec<f32> =
        (0..n * n).map(|k| if labels[k / n] == labels[k % n] { 1.0 / counts[&labels[k / n]] } else { 0.0 }).collect();
    Tensor::from_vec(t, (n, n), &Device::Cpu)
}

/// Symmetric InfoNCE between normalised rows `z` (trained modality) and `v` (anchor images).
fn contrastive_loss(z: &Tensor, v: &Tensor, target: &Tensor, temperature: f64) -> candle_core::Result<Tensor> {
    let logits = (z.matmul(&v.t()?)? / temperature)?;
    let n = z.dims()[0] as f64;
    let ce = |l: &Tensor| -> candle_core::Result<Tensor> {
        (candle_nn::ops::log_softmax(l, 1)? * target)?.sum_all()?.neg()? / n
    };
    (ce(&logits)? + ce(&logits.t()?.contiguous()?)?)? / 2.0
}

/// Top-1 accuracy of retrieving a held-out image of the right label for each held-out query.
fn retrieval_top1(
    head: &ProjectionHead,
    queries: &[Vec<f32>],
    labels: &[usize],
    images: &Embedded,
) -> Result<f64, TrainError> {
    let d = queries.first().map(Vec::len).unwrap_or(0);
    let q = Tensor::from_vec(queries.concat(), (queries.len(), d), &Device::Cpu)?;
    let z = head.forward(&q)?.to_vec2::<f32>()?;
    let hits = z
        .iter()
        .zip(labels)
        .filter(|(zq, label)| {
            let best = images
                .test
                .iter()
                .enumerate()
                .map(|(i, v)| (i, zq.iter().zip(v).map(|(a, b)| a * b).sum::<f32>()))
                .fold((0, f32::NEG_INFINITY), |acc, x| if x.1 > acc.1 { x } else { acc });
            images.test_labels[best.0] == **label
        })
        .count();
    Ok(hits as f64 / z.len().max(1) as f64)
}

/// `out/{text,audio,vision}`: each a complete model folder the node serves as is (the base
/// model's files linked, or copied across file systems, plus the head); a model card and
/// `metrics.json` at the top.
fn write_outputs(
    cfg: &SharedSpaceConfig,
    text: &ProjectionHead,
    audio: &ProjectionHead,
    labels: &Classifier,
    report: &SharedSpaceReport,
) -> Result<(), TrainError> {
    for (name, base, head) in [
        ("text", &cfg.text_model, Some(text)),
        ("audio", &cfg.audio_model, Some(audio)),
        ("vision", &cfg.vision_model, None),
    ] {
        let dir = cfg.out.join(name);
        link_model_folder(base, &dir)?;
        if let Some(head) = head {
            head.save(&dir.join(projection::FILE))?;
        }
        let path = dir.join(classifier::FILE);
        labels.save(&path).map_err(io(&path))?;
    }
    let metrics = cfg.out.join("metrics.json");
    let json = serde_json::to_vec_pretty(report).map_err(|e| TrainError::Data(e.to_string()))?;
    std::fs::write(&metrics, json).map_err(io(&metrics))?;
    let card = format!(
        "# Prism shared space (generated by `prism train shared-space`)\n\n\
         Three model folders whose vectors share one {dim}-d space: `vision/` ({vision}, the frozen \
         anchor), `text/` ({text} + projection head) and `audio/` ({audio} + projection head). Serve \
         each with `prism-node --model-uri <folder>`; the node applies `projection.safetensors`.\n\n\
         Trained with candle autograd: symmetric supervised InfoNCE (temperature {temp}), AdamW lr {lr}, \
         {steps} steps of batch {batch}, head MLP hidden {hidden}, seed {seed}. Data: {data}.\n\n\
         Held-out retrieval, top-1 (held-out images: {hi}, phrasings: {ht}, clips in unseen accents: {ha}):\n\n\
         | query -> image | untrained head | trained | chance |\n|---|---|---|---|\n\
         | text | {tu:.3} | {tt:.3} | {c:.3} |\n| audio | {au:.3} | {at:.3} | {c:.3} |\n\n\
         Classification head (`classifier.json`, one prototype per digit in the shared space), held-out \
         top-1: vision {lv:.3}, text {lt:.3}, audio {la:.3}; the three mixed {lf:.3}.\n\n\
         Final loss {loss:.4}; embedding {es:.1} s, training {ts:.1} s.\n",
        lv = report.label_top1.vision,
        lt = report.label_top1.text,
        la = report.label_top1.audio,
        lf = report.label_top1.fused,
        dim = text.out_dim(),
        vision = cfg.vision_model.display(),
        text = cfg.text_model.display(),
        audio = cfg.audio_model.display(),
        temp = cfg.temperature,
        lr = cfg.learning_rate,
        steps = cfg.steps,
        batch = cfg.batch,
        hidden = cfg.hidden,
        seed = cfg.seed,
        data = cfg.data.display(),
        hi = report.held_out.images,
        ht = report.held_out.texts,
        ha = report.held_out.audio,
        tu = report.text_to_image_top1_untrained,
        tt = report.text_to_image_top1,
        au = report.audio_to_image_top1_untrained,
        at = report.audio_to_image_top1,
        c = report.chance,
        loss = report.final_loss,
        es = report.embed_seconds,
        ts = report.train_seconds,
    );
    let card_path = cfg.out.join("model_card.md");
    let _ = std::fs::remove_file(&card_path);
    std::fs::write(&card_path, card).map_err(io(&card_path))?;
    Ok(())
}

/// Makes `dir` a servable copy of the model folder `base`: its files hard-linked (copied across
/// file systems), except the head and the card/metrics, which belong to each revision: those are
/// written afresh, never through a link that would change the parent revision too.
fn link_model_folder(base: &Path, dir: &Path) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for entry in std::fs::read_dir(base).map_err(io(base))? {
        let src = entry.map_err(io(base))?.path();
        let file = src.file_name().map(PathBuf::from).unwrap_or_default();
        let own = [projection::FILE, classifier::FILE, "model_card.md", "metrics.json"]
            .iter()
            .any(|f| file.as_os_str() == *f);
        let dst = dir.join(&file);
        let _ = std::fs::remove_file(&dst);
        if !src.is_file() || own {
            continue;
        }
        if std::fs::hard_link(&src, &dst).is_err() {
            std::fs::copy(&src, &dst).map_err(io(&dst))?;
        }
    }
    Ok(())
}

/// Small seeded generator (SplitMix64): reproducible heads and batches without a dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_spread_each_row_over_its_label() {
        let t = same_label_targets(&[3, 1, 3]).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(t, vec![vec![0.5, 0.0, 0.5], vec![0.0, 1.0, 0.0], vec![0.5, 0.0, 0.5]]);
    }

    #[test]
    fn loss_is_log_n_for_uninformative_vectors_and_falls_when_aligned() {
        // Identical vectors: every logit equal, so each row's CE is log(batch) for a one-hot target.
        let z = Tensor::from_vec(vec![1f32, 0., 1., 0.], (2, 2), &Device::Cpu).unwrap();
        let target = same_label_targets(&[0, 1]).unwrap();
        let flat = contrastive_loss(&z, &z, &target, 1.0).unwrap().to_scalar::<f32>().unwrap();
        assert!((flat - 2f32.ln()).abs() < 1e-5, "{flat}");
        let aligned = Tensor::from_vec(vec![1f32, 0., 0., 1.], (2, 2), &Device::Cpu).unwrap();
        let l = contrastive_loss(&aligned, &aligned, &target, 0.1).unwrap().to_scalar::<f32>().unwrap();
        // softmax over logits (10, 0): -ln(e^10 / (e^10 + 1)) = ln(1 + e^-10).
        assert!((l - (1.0 + (-10f32).exp()).ln()).abs() < 1e-5, "{l}");
    }

    #[test]
    fn gradient_steps_align_a_head_with_its_anchor() {
        // Two labels, anchors on orthogonal axes, inputs on the other diagonal: a linear head must
        // learn the rotation; the loss has to fall and retrieval become perfect.
        let mut rng = SplitMix64(7);
        let (head, vars) = init_head(2, 0, 2, &mut rng).unwrap();
        let x = Tensor::from_vec(vec![1f32, 1., -1., 1.], (2, 2), &Device::Cpu).unwrap();
        let v = Tensor::from_vec(vec![1f32, 0., 0., 1.], (2, 2), &Device::Cpu).unwrap();
        let target = same_label_targets(&[0, 1]).unwrap();
        let mut opt = AdamW::new(vars, ParamsAdamW { lr: 0.05, ..Default::default() }).unwrap();
        let first = contrastive_loss(&head.forward(&x).unwrap(), &v, &target, 0.1).unwrap().to_scalar::<f32>().unwrap();
        for _ in 0..200 {
            let loss = contrastive_loss(&head.forward(&x).unwrap(), &v, &target, 0.1).unwrap();
            opt.backward_step(&loss).unwrap();
        }
        let last = contrastive_loss(&head.forward(&x).unwrap(), &v, &target, 0.1).unwrap().to_scalar::<f32>().unwrap();
        assert!(last < first / 10.0, "loss {first} -> {last}");
        let z = head.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        assert!(z[0][0] > z[0][1] && z[1][1] > z[1][0], "{z:?}");
    }

    #[test]
    fn a_head_survives_a_save_load_round_trip() {
        let mut rng = SplitMix64(1);
        let (head, _) = init_head(5, 4, 3, &mut rng).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(projection::FILE);
        head.save(&path).unwrap();
        let back = ProjectionHead::load(&path, &Device::Cpu).unwrap();
        let x = Tensor::from_vec((0..10).map(|i| i as f32 / 10.0).collect(), (2, 5), &Device::Cpu).unwrap();
        assert_eq!(
            head.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
            back.forward(&x).unwrap().to_vec2::<f32>().unwrap()
        );
        assert_eq!((back.in_dim(), back.out_dim()), (5, 3));
    }
}
