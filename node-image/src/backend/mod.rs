//! Model backends: everything that turns one modality's inputs into vectors.
//!
//! # How a model plugs in
//!
//! A model is two halves, split along the thread they run on (TEI's layering, see
//! `shared/notes/style-anchors.md` §4):
//!
//! * [`Preprocessor`] (`Send + Sync`, `&self`): runs on the request path, on tokio worker threads,
//!   one input at a time. It validates and converts an [`EmbedInput`] into a [`Prepared`] item
//!   (token ids, a decoded image tensor, log-mel frames, ...). Rejecting bad input here means a 400
//!   answer before the request ever occupies the queue or the model thread. It must be cheap and
//!   must never panic on user data.
//! * [`Encoder`] (`Send`, `&mut self`): owned by the single model thread (see `crate::infer`). It
//!   receives a batch of [`Prepared`] items from the batching queue and returns one vector per item,
//!   in order. It may assume every item came from its own preprocessor. Batches arrive sorted by
//!   [`Prepared::cost`] and never exceed `--max-batch` items, so an encoder that pads to the longest
//!   item wastes little.
//!
//! To add an architecture (e.g. `vit`, `clip-vision`, `whisper-encoder`, `perceiver-fusion`):
//! 1. add a file `backend/<name>.rs` with a `pub fn load(spec: &LoadSpec) -> Result<LoadedModel,
//!    BackendError>` that returns both halves;
//! 2. add one [`Architecture`] line to [`REGISTRY`].
//!
//! Nothing in the server, batching queue or metrics code changes: they only see the traits.

pub mod bert;
pub mod classifier;
pub mod cpu;
pub mod fusion;
pub mod projection;
pub mod transformer;
pub mod vit;
pub mod whisper;

use std::any::Any;
use std::path::PathBuf;
use std::sync::Arc;

use prism_api::wire::node::EmbedInput;

/// Errors of loading or running a model. Validation errors are the caller's fault (HTTP 400);
/// the others are the node's (startup failure or HTTP 500).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The input is not acceptable for this model (wrong modality, empty, undecodable, ...).
    #[error("{0}")]
    Validation(String),
    /// The model files are missing or malformed; the message names the file and the fix.
    #[error("loading model: {0}")]
    Load(String),
    /// The forward pass failed.
    #[error("inference: {0}")]
    Inference(String),
    /// `--architecture` is not in the registry.
    #[error("unknown architecture {name:?}; known: {known}")]
    UnknownArchitecture { name: String, known: String },
    /// The requested device cannot be used (e.g. `--device cuda` in a CPU build).
    #[error("device: {0}")]
    Device(String),
}

impl From<candle_core::Error> for BackendError {
    fn from(e: candle_core::Error) -> Self {
        BackendError::Inference(e.to_string())
    }
}

/// `--device`: where the forward pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    /// CUDA when this binary was built with the `cuda` feature and a GPU is visible, else CPU.
    Auto,
    Cpu,
    Cuda,
}

impl DeviceChoice {
    /// Resolves the choice to a candle device. `cuda` in a CPU build is an error that names the fix
    /// rather than a silent fallback: a GPU pod running on CPU would look healthy and be 20x slow.
    pub fn resolve(self) -> Result<candle_core::Device, BackendError> {
        match self {
            DeviceChoice::Cpu => Ok(candle_core::Device::Cpu),
            DeviceChoice::Auto => {
                if cfg!(feature = "cuda") {
                    Ok(candle_core::Device::cuda_if_available(0).unwrap_or(candle_core::Device::Cpu))
                } else {
                    Ok(candle_core::Device::Cpu)
                }
            }
            DeviceChoice::Cuda => {
                if !cfg!(feature = "cuda") {
                    return Err(BackendError::Device(
                        "--device cuda needs a binary built with `--features cuda` (the prism-node-cuda image); \
                         use --device cpu or --device auto"
                            .into(),
                    ));
                }
                candle_core::Device::new_cuda(0)
                    .map_err(|e| BackendError::Device(format!("no usable CUDA device 0: {e}; use --device cpu")))
            }
        }
    }
}

/// Human-readable device name for `/info` and logs.
pub fn device_name(d: &candle_core::Device) -> String {
    match d {
        candle_core::Device::Cpu => "cpu".into(),
        candle_core::Device::Cuda(_) => "cuda:0".into(),
        candle_core::Device::Metal(_) => "metal".into(),
    }
}

/// What a loader gets: the resolved model folder and device.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// Local folder in HF layout (config.json, tokenizer.json, model.safetensors, ...).
    pub dir: PathBuf,
    pub device: DeviceChoice,
    /// `--max-input-tokens` override; `None` = the model's own default.
    pub max_input_tokens: Option<usize>,
    /// `spec.model.adapters` (`--adapter`), merged in this order after any adapter in `dir`.
    pub adapters: Vec<NamedAdapter>,
    /// `spec.model.attention.window` (`--attention-window`): tokens each query attends to, itself
    /// and half of them on each side. `None` is full attention. Architectures without a 1-D token
    /// order refuse it at load.
    pub attention_window: Option<usize>,
    /// `--audio-window`: which encoder frames whisper computes (audio models only).
    pub audio_window: AudioWindow,
}

impl LoadSpec {
    /// A folder on a device, with the model's defaults: no adapters, full attention, whisper's
    /// padded 30 s window.
    pub fn new(dir: impl Into<PathBuf>, device: DeviceChoice) -> Self {
        Self {
            dir: dir.into(),
            device,
            max_input_tokens: None,
            adapters: Vec::new(),
            attention_window: None,
            audio_window: AudioWindow::Full,
        }
    }
}

/// The frames a whisper encoder computes for a clip shorter than its 30 s window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AudioWindow {
    /// Whisper as trained: every clip padded to 30 s and all 1500 frames computed (under a
    /// sliding window, only the frames the clip's outputs can see). The default: heads and
    /// fusion nodes trained on these vectors keep their measured quality.
    #[default]
    Full,
    /// Only the clip's own frames (a 2 s clip: 100 of 1500): about 15x less work on short
    /// clips. Vectors differ from the padded window's (cosine 0.965-0.99 on 2-10 s of speech), so
    /// heads and fusion nodes must be trained on the same setting.
    Clip,
}

/// One LoRA adapter of `spec.model.adapters`: a safetensors file of `<layer>.lora_A.weight`
/// [rank, in] / `<layer>.lora_B.weight` [out, rank] pairs (PEFT names, `base_model.model.`
/// prefix optional), merged as W + (alpha / rank) B A. `path` may also be a PEFT output folder
/// (its `adapter_model.safetensors` is read).
#[derive(Clone, Debug, PartialEq)]
pub struct NamedAdapter {
    pub name: String,
    pub path: PathBuf,
    pub rank: usize,
    pub alpha: f64,
}

/// Parses `--adapter`, as `prism_api::node::AdapterSpec::server_arg` writes it:
/// `name=NAME,rank=R,alpha=A,path=PATH`, `path` last (it may hold commas).
impl std::str::FromStr for NamedAdapter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        const FORM: &str = "expected name=NAME,rank=R,alpha=A,path=PATH";
        let (head, path) = s.split_once(",path=").ok_or_else(|| format!("{s:?}: no path; {FORM}"))?;
        let (mut name, mut rank, mut alpha) = (None, None, None);
        for kv in head.split(',') {
            match kv.split_once('=') {
                Some(("name", v)) if !v.is_empty() => name = Some(v.to_string()),
                Some(("rank", v)) => {
                    rank = Some(
                        v.parse::<usize>()
                            .ok()
                            .filter(|r| *r > 0)
                            .ok_or_else(|| format!("{s:?}: rank {v:?} is not a whole number >= 1"))?,
                    )
                }
                Some(("alpha", v)) => {
                    alpha = Some(
                        v.parse::<f64>()
                            .ok()
                            .filter(|a| a.is_finite() && *a >= 0.0)
                            .ok_or_else(|| format!("{s:?}: alpha {v:?} is not a number >= 0"))?,
                    )
                }
                _ => return Err(format!("{s:?}: unexpected {kv:?}; {FORM}")),
            }
        }
        match (name, rank, alpha) {
            (Some(name), Some(rank), Some(alpha)) if !path.is_empty() => {
                Ok(NamedAdapter { name, path: PathBuf::from(path), rank, alpha })
            }
            _ => Err(format!("{s:?}: {FORM}")),
        }
    }
}

/// One preprocessed input, ready for its encoder. The payload is opaque to the server (a new
/// modality brings its own payload type without touching the queue); `cost` is what batching sorts
/// by and what a token budget counts (tokens for text, frames for audio, 1 for fixed-size images).
pub struct Prepared {
    pub cost: usize,
    /// Tokens the model reads for this item (token-based models only): reported as
    /// `prompt_tokens` so clients see the tokenizer's count, not a word count.
    pub tokens: Option<usize>,
    payload: Box<dyn Any + Send>,
}

impl Prepared {
    pub fn new<T: Any + Send>(cost: usize, payload: T) -> Self {
        Self { cost, tokens: None, payload: Box::new(payload) }
    }

    pub fn with_tokens(mut self, tokens: usize) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// Borrows the payload as the type its preprocessor stored. A mismatch is a programming error
    /// (an item routed to the wrong encoder), reported as an inference error rather than a panic.
    pub fn payload<T: Any>(&self) -> Result<&T, BackendError> {
        self.payload
            .downcast_ref::<T>()
            .ok_or_else(|| BackendError::Inference("prepared item of the wrong type for this encoder".into()))
    }
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared").field("cost", &self.cost).finish_non_exhaustive()
    }
}

/// Request-path half of a model. See the module docs.
pub trait Preprocessor: Send + Sync + 'static {
    /// Validates and converts one input. Must return `BackendError::Validation` for anything the
    /// client got wrong (including an input of another modality), never panic.
    fn preprocess(&self, input: &EmbedInput) -> Result<Prepared, BackendError>;

    /// An input used to warm the model up before `/ready` turns true.
    fn warmup_input(&self) -> EmbedInput;
}

/// Model-thread half of a model. See the module docs.
pub trait Encoder: Send + 'static {
    /// Encodes a batch (1..=max_batch items, sorted by cost ascending). Returns exactly one vector
    /// of length [`ModelInfo::dim`] per item, in the same order.
    fn encode_batch(&mut self, batch: &[Prepared]) -> Result<Vec<Vec<f32>>, BackendError>;

    /// The states the encoder pools, per item (one row per token): ViT's patch tokens, whisper's
    /// frames over real audio, BERT's word pieces, after the final LayerNorm. `prism train fusion
    /// --tokens` trains fusion over these sequences. Encoders without token states say so.
    fn encode_tokens(&mut self, _batch: &[Prepared]) -> Result<Vec<TokenStates>, BackendError> {
        Err(BackendError::Validation("this encoder does not expose token states".into()))
    }
}

/// One item's token states: `rows` rows of `dim` floats, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenStates {
    pub dim: usize,
    pub values: Vec<f32>,
}

impl TokenStates {
    pub fn rows(&self) -> usize {
        self.values.len() / self.dim.max(1)
    }

    /// Exactly `k` rows: contiguous, near-equal segments of the rows averaged when there are at
    /// least `k`, rows repeated in order when there are fewer. Fixed counts let a batch of
    /// sequences of different lengths be one tensor without masks.
    pub fn resample(&self, k: usize) -> Vec<f32> {
        let (n, d) = (self.rows(), self.dim);
        let mut out = vec![0f32; k * d];
        if n == 0 {
            return out;
        }
        for (i, row) in out.chunks_exact_mut(d).enumerate() {
            let (lo, hi) = if n >= k { (i * n / k, (i + 1) * n / k) } else { (i * n / k, i * n / k + 1) };
            for src in self.values[lo * d..hi * d].chunks_exact(d) {
                row.iter_mut().zip(src).for_each(|(a, b)| *a += b);
            }
            let count = (hi - lo) as f32;
            row.iter_mut().for_each(|a| *a /= count);
        }
        out
    }
}

/// Static facts about a loaded model, for `/info`, metrics labels and validation.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// `text | vision | audio | fusion | ...` (open set).
    pub modality: String,
    pub architecture: String,
    pub dim: usize,
    pub device: String,
    /// Truncation limit for token-based models.
    pub max_input_tokens: Option<usize>,
    /// The folder's classification head (`classifier.json`), if it has one.
    pub classifier: Option<Arc<classifier::Classifier>>,
}

/// A loaded model: both halves plus its facts.
pub struct LoadedModel {
    pub info: ModelInfo,
    pub preprocessor: Arc<dyn Preprocessor>,
    pub encoder: Box<dyn Encoder>,
}

/// One entry of the architecture registry.
pub struct Architecture {
    /// The `--architecture` / `spec.model.architecture` value.
    pub name: &'static str,
    /// The modality this architecture serves (checked against `--modality`).
    pub modality: &'static str,
    /// Files the loader needs besides `config.json` and `model.safetensors` (which all need).
    /// `prism-node fetch --architecture` makes these required rather than optional downloads.
    pub needs: &'static [&'static str],
    /// Serves sliding-window attention (`--attention-window`): only architectures whose tokens
    /// have a 1-D order (text, audio frames). The others refuse it at load.
    pub sliding_window: bool,
    pub load: fn(&LoadSpec) -> Result<LoadedModel, BackendError>,
}

impl Architecture {
    /// Loads a folder as this architecture, with the folder's projection head (if any) after it
    /// and its classification head (if any) beside it. Every load goes through here, so a head
    /// can never be silently skipped.
    pub fn load_model(&self, spec: &LoadSpec) -> Result<LoadedModel, BackendError> {
        if let (Some(w), false) = (spec.attention_window, self.sliding_window) {
            let served: Vec<&str> = REGISTRY.iter().filter(|a| a.sliding_window).map(|a| a.name).collect();
            return Err(BackendError::Load(format!(
                "--attention-window {w}: {} has no 1-D token order for sliding-window attention (served for {}); \
                 remove spec.model.attention",
                self.name,
                served.join(", ")
            )));
        }
        let mut model = projection::attach((self.load)(spec)?, &spec.dir)?;
        model.info.classifier = classifier::load_for(&spec.dir, model.info.dim)?.map(Arc::new);
        Ok(model)
    }
}

/// Every architecture this binary can serve. Add a line here for a new model file (and list in
/// `needs` any file it reads besides config.json and model.safetensors, so `fetch` downloads it).
pub static REGISTRY: &[Architecture] = &[
    Architecture { name: "bert", modality: "text", needs: &["tokenizer.json"], sliding_window: true, load: bert::load },
    Architecture { name: "whisper-encoder", modality: "audio", needs: &[], sliding_window: true, load: whisper::load },
    Architecture {
        name: "vit",
        modality: "vision",
        needs: &["preprocessor_config.json"],
        sliding_window: false,
        load: vit::load,
    },
    Architecture {
        name: "clip-vision",
        modality: "vision",
        needs: &["preprocessor_config.json"],
        sliding_window: false,
        load: vit::load_clip,
    },
    Architecture {
        name: "perceiver-fusion",
        modality: "fusion",
        needs: &[],
        sliding_window: false,
        load: fusion::load_perceiver,
    },
    Architecture { name: "mot-fusion", modality: "fusion", needs: &[], sliding_window: false, load: fusion::load_mot },
    Architecture {
        name: "dense-fusion",
        modality: "fusion",
        needs: &[],
        sliding_window: false,
        load: fusion::load_dense,
    },
];

/// Finds an architecture by name (case-insensitive).
pub fn lookup(name: &str) -> Result<&'static Architecture, BackendError> {
    REGISTRY.iter().find(|a| a.name.eq_ignore_ascii_case(name)).ok_or_else(|| BackendError::UnknownArchitecture {
        name: name.to_string(),
        known: REGISTRY.iter().map(|a| a.name).collect::<Vec<_>>().join(", "),
    })
}

/// Loads `architecture` from `spec`.
pub fn load(architecture: &str, spec: &LoadSpec) -> Result<LoadedModel, BackendError> {
    lookup(architecture)?.load_model(spec)
}

/// Resolves `--model-uri` to a local folder: `file:///abs/path`, `file://rel/path` or a plain
/// path. Remote schemes are resolved by an init container in the cluster (the node never
/// downloads at run time), so here they are an error that says so.
pub fn resolve_model_uri(uri: &str) -> Result<PathBuf, BackendError> {
    let path = if let Some(rest) = uri.strip_prefix("file://") {
        PathBuf::from(rest)
    } else if uri.contains("://") {
        return Err(BackendError::Load(format!(
            "--model-uri {uri:?}: only file:// URIs or plain paths are served by prism-node; \
             pvc://, hf:// and oci:// models are mounted into the pod as a folder by the operator \
             (to download one yourself: prism-node fetch --model-uri URI --out DIR)"
        )));
    } else {
        PathBuf::from(uri)
    };
    if !path.is_dir() {
        return Err(BackendError::Load(format!(
            "model folder {} does not exist; run `make models` or point --model-uri at an HF-layout folder",
            path.display()
        )));
    }
    Ok(path)
}

/// L2-normalises a vector in place; a zero vector stays zero (no NaN).
pub fn l2_normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}
