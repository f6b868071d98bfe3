//! Fusion nodes: one vector from several modalities' embeddings (`InputItem.embeddings`, any
//! non-empty subset of the modalities the checkpoint knows).
//!
//! * `perceiver-fusion` (Perceiver IO style): each present modality's embedding is projected to one
//!   token (`proj.<m>` + a learned modality embedding `type.<m>`); a learned latent array
//!   (`latents`, [num_latents, hidden]) cross-attends to those tokens, then latent self-attention
//!   blocks; output = mean over latents after the final LayerNorm, L2-normalised. The latent array
//!   fixes the cost whatever the number of modalities, and a missing modality is simply a missing
//!   token (no imputation).
//! * `mot-fusion` (Mixture-of-Transformers style): one token per present modality; every
//!   non-embedding weight is modality-specific (LayerNorms, q/k/v/o projections, MLP: `layers.N.<m>.*`)
//!   while self-attention is global across the modalities' tokens; output = mean over tokens of the
//!   per-modality final LayerNorm, L2-normalised.
//! * `dense-fusion`: the MoT's control, a plain transformer (shared weights for every token) over
//!   the same tokens; what `prism train fusion --tokens` compares the MoT with.
//!
//! Token sequences: `tokens` in config.json (modality -> count, default 1) makes a modality's
//! input `count` tokens of its dimension, flattened (e.g. 16 ViT patch tokens of 64 = 1024
//! values); each becomes one fusion token.
//!
//! Layout (scripts/make-fusion-model.py): config.json with `architecture`, `hidden_size`,
//! `num_heads`, `num_layers`, `intermediate_size`, `layer_norm_eps`, `hidden_act`, `num_latents`
//! (perceiver) and `modalities` (name -> input dim); model.safetensors with the names above.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Device, Module, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{LayerNorm, Linear, VarBuilder, VarMap};
use prism_api::wire::node::{EmbedInput, InputItem};
use serde::{Deserialize, Serialize};

use super::cpu::mot::PackedMot;
use super::transformer::{self as core, attend, Act, Attention, Block, FUSION_NAMES};
use super::{device_name, BackendError, Encoder, LoadSpec, LoadedModel, ModelInfo, Prepared, Preprocessor};

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FusionConfig {
    pub architecture: String,
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub num_latents: usize,
    /// Modality name -> embedding dimension it accepts (of each token).
    pub modalities: BTreeMap<String, usize>,
    /// Modality name -> tokens per input (absent: 1, a pooled vector).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tokens: BTreeMap<String, usize>,
}

impl FusionConfig {
    /// Values one input of modality `m` carries: its tokens times their dimension.
    pub fn input_len(&self, m: &str) -> Option<usize> {
        self.modalities.get(m).map(|d| d * self.tokens.get(m).copied().unwrap_or(1))
    }

    /// Every modality's input length (what the preprocessor checks).
    fn input_lens(&self) -> BTreeMap<String, usize> {
        self.modalities.keys().filter_map(|m| Some((m.clone(), self.input_len(m)?))).collect()
    }
}

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "gelu".into()
}

/// The validated embeddings of one input, in modality-name order.
pub struct ModalityEmbeddings(pub Vec<(String, Vec<f32>)>);

pub struct FusionPreprocessor {
    modalities: BTreeMap<String, usize>,
}

impl FusionPreprocessor {
    fn known(&self) -> String {
        self.modalities.iter().map(|(m, d)| format!("{m} ({d})")).collect::<Vec<_>>().join(", ")
    }
}

impl Preprocessor for FusionPreprocessor {
    fn preprocess(&self, input: &EmbedInput) -> Result<Prepared, BackendError> {
        let bad = |m: String| BackendError::Validation(m);
        let shape = format!(
            "this is a fusion node: each input must be {{\"embeddings\": {{\"<modality>\": [..]}}}} with modalities among {}",
            self.known()
        );
        let EmbedInput::Item(InputItem { embeddings: Some(map), text: None, image_base64: None, audio_base64: None }) =
            input
        else {
            return Err(bad(shape));
        };
        if map.is_empty() {
            return Err(bad(format!("embeddings is empty; give at least one of {}", self.known())));
        }
        let mut out = Vec::with_capacity(map.len());
        for (m, v) in map {
            let Some(&dim) = self.modalities.get(m) else {
                return Err(bad(format!("unknown modality {m:?}; this fusion node knows {}", self.known())));
            };
            if v.len() != dim {
                return Err(bad(format!("embeddings[{m:?}] has {} values; this fusion node expects {dim}", v.len())));
            }
            if v.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("embeddings[{m:?}] contains NaN or infinite values")));
            }
            out.push((m.clone(), v.clone()));
        }
        Ok(Prepared::new(out.len(), ModalityEmbeddings(out)))
    }

    fn warmup_input(&self) -> EmbedInput {
        // Every modality, unit-norm constant vectors: exercises every projection.
        let map = self.modalities.iter().map(|(m, &d)| (m.clone(), vec![1.0 / (d as f32).sqrt(); d])).collect();
        EmbedInput::Item(InputItem { embeddings: Some(map), ..Default::default() })
    }
}

/// Per-modality input projection + modality-type embedding: each item's embedding -> one token.
struct Tokenizer {
    proj: BTreeMap<String, Linear>,
    typ: BTreeMap<String, Tensor>,
}

impl Tokenizer {
    fn load(cfg: &FusionConfig, vb: &VarBuilder) -> candle_core::Result<Self> {
        let mut proj = BTreeMap::new();
        let mut typ = BTreeMap::new();
        for (m, &d) in &cfg.modalities {
            proj.insert(m.clone(), candle_nn::linear(d, cfg.hidden_size, vb.pp(format!("proj.{m}")))?);
            typ.insert(m.clone(), vb.get(cfg.hidden_size, &format!("type.{m}"))?);
        }
        Ok(Self { proj, typ })
    }

    /// `x`: [b, k · dim of m] (k tokens, flattened) -> [b, k, hidden].
    fn tokens(&self, m: &str, x: &Tensor) -> candle_core::Result<Tensor> {
        let (Some(p), Some(t)) = (self.proj.get(m), self.typ.get(m)) else {
            candle_core::bail!("no projection for modality {m}");
        };
        let (b, len) = x.dims2()?;
        let dim = p.weight().dim(1)?;
        if dim == 0 || !len.is_multiple_of(dim) {
            candle_core::bail!("{m}: {len} values are not whole tokens of {dim}");
        }
        p.forward(&x.reshape((b, len / dim, dim))?)?.broadcast_add(t)
    }
}

/// A fusion network over a batch whose items all carry the same modalities: `inputs` holds one
/// [b, tokens · dim] tensor per modality, in modality-name order; returns the pooled [b, hidden] vectors
/// before L2 normalisation. Plain candle ops, so `prism train fusion` backpropagates through the
/// very code that serves.
pub trait FusionNet: Send {
    fn pooled(&self, inputs: &[(&str, Tensor)]) -> candle_core::Result<Tensor>;
}

/// Rows divided by their L2 norm.
pub fn l2_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&(x.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?)
}

pub struct PerceiverEncoder {
    tok: Tokenizer,
    latents: Tensor,
    ln_q: LayerNorm,
    ln_kv: LayerNorm,
    cross: Attention,
    cross_ln: LayerNorm,
    cross_fc1: Linear,
    cross_fc2: Linear,
    blocks: Vec<Block>,
    final_ln: LayerNorm,
    act: Act,
}

impl PerceiverEncoder {
    pub fn new(cfg: &FusionConfig, vb: &VarBuilder) -> candle_core::Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let act = Act::from_hf(&cfg.hidden_act).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let c = vb.pp("cross");
        Ok(Self {
            tok: Tokenizer::load(cfg, vb)?,
            latents: vb.get((cfg.num_latents, h), "latents")?,
            ln_q: candle_nn::layer_norm(h, eps, c.pp("ln_q"))?,
            ln_kv: candle_nn::layer_norm(h, eps, c.pp("ln_kv"))?,
            cross: Attention::load(h, cfg.num_heads, &FUSION_NAMES, &c)?,
            cross_ln: candle_nn::layer_norm(h, eps, c.pp("ln2"))?,
            cross_fc1: candle_nn::linear(h, cfg.intermediate_size, c.pp("mlp.fc1"))?,
            cross_fc2: candle_nn::linear(cfg.intermediate_size, h, c.pp("mlp.fc2"))?,
            blocks: (0..cfg.num_layers)
                .map(|i| {
                    let p = vb.pp(format!("layers.{i}"));
                    Block::load(h, cfg.num_heads, cfg.intermediate_size, eps, act, &FUSION_NAMES, p)
                })
                .collect::<candle_core::Result<_>>()?,
            final_ln: candle_nn::layer_norm(h, eps, vb.pp("final_ln"))?,
            act,
        })
    }
}

impl FusionNet for PerceiverEncoder {
    fn pooled(&self, inputs: &[(&str, Tensor)]) -> candle_core::Result<Tensor> {
        let tokens = inputs.iter().map(|(m, x)| self.tok.tokens(m, x)).collect::<candle_core::Result<Vec<_>>>()?;
        let x = Tensor::cat(&tokens, 1)?; // [b, n, h]
        let b = x.dim(0)?;
        let (l, h) = self.latents.dims2()?;
        let lat = self.latents.unsqueeze(0)?.broadcast_as((b, l, h))?.contiguous()?;
        let kv = self.ln_kv.forward(&x)?;
        let lat = (&lat + self.cross.forward(&self.ln_q.forward(&lat)?, Some(&kv), None)?)?;
        let f = self.cross_fc2.forward(&self.act.apply(&self.cross_fc1.forward(&self.cross_ln.forward(&lat)?)?)?)?;
        let mut lat = (lat + f)?;
        for block in &self.blocks {
            lat = block.forward(&lat, None)?;
        }
        self.final_ln.forward(&lat)?.mean(1)
    }
}

/// One Mixture-of-Transformers layer's weights for one modality.
struct MotExpert {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct MotEncoder {
    tok: Tokenizer,
    layers: Vec<BTreeMap<String, MotExpert>>,
    final_ln: BTreeMap<String, LayerNorm>,
    heads: usize,
    act: Act,
}

impl MotEncoder {
    pub fn new(cfg: &FusionConfig, vb: &VarBuilder) -> candle_core::Result<Self> {
        let (h, eps, ffn) = (cfg.hidden_size, cfg.layer_norm_eps, cfg.intermediate_size);
        if cfg.num_heads == 0 || !h.is_multiple_of(cfg.num_heads) {
            candle_core::bail!("hidden_size {h} is not divisible by num_heads {}", cfg.num_heads);
        }
        let act = Act::from_hf(&cfg.hidden_act).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let mut experts = BTreeMap::new();
            for m in cfg.modalities.keys() {
                let p = vb.pp(format!("layers.{i}.{m}"));
                let expert = MotExpert {
                    ln1: candle_nn::layer_norm(h, eps, p.pp("ln1"))?,
                    q: candle_nn::linear(h, h, p.pp("attn.q"))?,
                    k: candle_nn::linear(h, h, p.pp("attn.k"))?,
                    v: candle_nn::linear(h, h, p.pp("attn.v"))?,
                    o: candle_nn::linear(h, h, p.pp("attn.o"))?,
                    ln2: candle_nn::layer_norm(h, eps, p.pp("ln2"))?,
                    fc1: candle_nn::linear(h, ffn, p.pp("mlp.fc1"))?,
                    fc2: candle_nn::linear(ffn, h, p.pp("mlp.fc2"))?,
                };
                experts.insert(m.clone(), expert);
            }
            layers.push(experts);
        }
        let final_ln = cfg
            .modalities
            .keys()
            .map(|m| Ok((m.clone(), candle_nn::layer_norm(h, eps, vb.pp(format!("final_ln.{m}")))?)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { tok: Tokenizer::load(cfg, vb)?, layers, final_ln, heads: cfg.num_heads, act })
    }
}

impl FusionNet for MotEncoder {
    fn pooled(&self, inputs: &[(&str, Tensor)]) -> candle_core::Result<Tensor> {
        let mut xs = inputs.iter().map(|(m, x)| self.tok.tokens(m, x)).collect::<candle_core::Result<Vec<_>>>()?;
        for layer in &self.layers {
            let experts = inputs
                .iter()
                .map(|(m, _)| {
                    layer.get(*m).ok_or_else(|| candle_core::Error::Msg(format!("no weights for modality {m}")))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            // Modality-specific norms and projections, one token each...
            let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
            for (x, e) in xs.iter().zip(&experts) {
                let h = e.ln1.forward(x)?;
                q.push(e.q.forward(&h)?);
                k.push(e.k.forward(&h)?);
                v.push(e.v.forward(&h)?);
            }
            // ...then one global attention over all modalities' tokens.
            let a = attend(&Tensor::cat(&q, 1)?, &Tensor::cat(&k, 1)?, &Tensor::cat(&v, 1)?, self.heads, None)?;
            let mut start = 0;
            for (x, e) in xs.iter_mut().zip(&experts) {
                let n = x.dim(1)?;
                let y = (&*x + e.o.forward(&a.narrow(1, start, n)?)?)?;
                start += n;
                let f = e.fc2.forward(&self.act.apply(&e.fc1.forward(&e.ln2.forward(&y)?)?)?)?;
                *x = (y + f)?;
            }
        }
        let outs = inputs
            .iter()
            .zip(&xs)
            .map(|((m, _), x)| match self.final_ln.get(*m) {
                Some(ln) => ln.forward(x),
                None => candle_core::bail!("no weights for modality {m}"),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&outs, 1)?.mean(1)
    }
}

/// The MoT's dense control: every token through the same blocks.
pub struct DenseEncoder {
    tok: Tokenizer,
    blocks: Vec<Block>,
    final_ln: LayerNorm,
}

impl DenseEncoder {
    pub fn new(cfg: &FusionConfig, vb: &VarBuilder) -> candle_core::Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let act = Act::from_hf(&cfg.hidden_act).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let p = vb.pp(format!("layers.{i}"));
                Block::load(h, cfg.num_heads, cfg.intermediate_size, eps, act, &FUSION_NAMES, p)
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { tok: Tokenizer::load(cfg, vb)?, blocks, final_ln: candle_nn::layer_norm(h, eps, vb.pp("final_ln"))? })
    }
}

impl FusionNet for DenseEncoder {
    fn pooled(&self, inputs: &[(&str, Tensor)]) -> candle_core::Result<Tensor> {
        let tokens = inputs.iter().map(|(m, x)| self.tok.tokens(m, x)).collect::<candle_core::Result<Vec<_>>>()?;
        let mut x = Tensor::cat(&tokens, 1)?;
        for block in &self.blocks {
            x = block.forward(&x, None)?;
        }
        self.final_ln.forward(&x)?.mean(1)
    }
}

/// Serves a [`FusionNet`]: items are grouped by the modalities they carry (one forward per group,
/// each a real batch), and the vectors come back in the batch's order, L2-normalised.
struct Served<N> {
    net: N,
    device: Device,
}

impl<N: FusionNet + 'static> Encoder for Served<N> {
    fn encode_batch(&mut self, batch: &[Prepared]) -> Result<Vec<Vec<f32>>, BackendError> {
        let mut groups: BTreeMap<Vec<&str>, Vec<usize>> = BTreeMap::new();
        let items = batch.iter().map(|p| p.payload::<ModalityEmbeddings>()).collect::<Result<Vec<_>, _>>()?;
        for (i, item) in items.iter().enumerate() {
            groups.entry(item.0.iter().map(|(m, _)| m.as_str()).collect()).or_default().push(i);
        }
        let mut out = vec![Vec::new(); batch.len()];
        for (mods, idx) in groups {
            let inputs = mods
                .iter()
                .enumerate()
                .map(|(k, m)| {
                    let rows: Vec<f32> = idx.iter().flat_map(|i| items[*i].0[k].1.iter().copied()).collect();
                    let dim = rows.len() / idx.len();
                    Ok((*m, Tensor::from_vec(rows, (idx.len(), dim), &self.device)?))
                })
                .collect::<Result<Vec<_>, BackendError>>()?;
            let vectors = l2_rows(&self.net.pooled(&inputs)?)?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
            for (i, v) in idx.into_iter().zip(vectors) {
                out[i] = v;
            }
        }
        Ok(out)
    }
}

fn read_config(spec: &LoadSpec, want: &str) -> Result<FusionConfig, BackendError> {
    let cfg: FusionConfig = serde_json::from_str(&core::read_model_file(&spec.dir, "config.json")?)
        .map_err(|e| BackendError::Load(format!("config.json is not a fusion config: {e}")))?;
    if cfg.architecture != want {
        return Err(BackendError::Load(format!(
            "{} holds a {:?} checkpoint, not {want:?}",
            spec.dir.display(),
            cfg.architecture
        )));
    }
    check_config(&cfg)?;
    Ok(cfg)
}

fn check_config(cfg: &FusionConfig) -> Result<(), BackendError> {
    if cfg.modalities.is_empty() {
        return Err(BackendError::Load("config.json lists no modalities".into()));
    }
    if cfg.architecture == "perceiver-fusion" && cfg.num_latents == 0 {
        return Err(BackendError::Load("perceiver-fusion needs num_latents >= 1 in config.json".into()));
    }
    if let Some((m, _)) = cfg.tokens.iter().find(|(m, k)| **k == 0 || !cfg.modalities.contains_key(*m)) {
        return Err(BackendError::Load(format!("tokens.{m}: needs a known modality and at least 1 token")));
    }
    let (h, heads) = (cfg.hidden_size, cfg.num_heads);
    if heads == 0 || !h.is_multiple_of(heads) {
        return Err(BackendError::Load(format!("hidden_size {h} is not divisible by num_heads {heads}")));
    }
    Ok(())
}

fn model(cfg: &FusionConfig, device: &Device, arch: &str, encoder: Box<dyn Encoder>) -> LoadedModel {
    LoadedModel {
        info: ModelInfo {
            modality: "fusion".into(),
            architecture: arch.into(),
            dim: cfg.hidden_size,
            device: device_name(device),
            max_input_tokens: None,
            classifier: None,
        },
        preprocessor: Arc::new(FusionPreprocessor { modalities: cfg.input_lens() }),
        encoder,
    }
}

/// `--architecture perceiver-fusion`.
pub fn load_perceiver(spec: &LoadSpec) -> Result<LoadedModel, BackendError> {
    let cfg = read_config(spec, "perceiver-fusion")?;
    let device = spec.device.resolve()?;
    let vb = core::var_builder(spec, &device)?;
    let net = PerceiverEncoder::new(&cfg, &vb).map_err(core::load_err("perceiver-fusion weights"))?;
    Ok(model(&cfg, &device, "perceiver-fusion", Box::new(Served { net, device: device.clone() })))
}

/// `--architecture mot-fusion`.
pub fn load_mot(spec: &LoadSpec) -> Result<LoadedModel, BackendError> {
    let cfg = read_config(spec, "mot-fusion")?;
    let device = spec.device.resolve()?;
    let vb = core::var_builder(spec, &device)?;
    let e = core::load_err("mot-fusion weights");
    let kernels = core::packed_kernels(&device, Act::from_hf(&cfg.hidden_act)?)?;
    tracing::info!(kernels = if kernels.is_some() { "packed" } else { "candle" }, "mot-fusion layers");
    let encoder: Box<dyn Encoder> = match kernels {
        Some(kernels) => {
            Box::new(Served { net: PackedMot::load(&cfg, &vb, kernels).map_err(&e)?, device: device.clone() })
        }
        None => Box::new(Served { net: MotEncoder::new(&cfg, &vb).map_err(&e)?, device: device.clone() }),
    };
    Ok(model(&cfg, &device, "mot-fusion", encoder))
}

/// `--architecture dense-fusion`.
pub fn load_dense(spec: &LoadSpec) -> Result<LoadedModel, BackendError> {
    let cfg = read_config(spec, "dense-fusion")?;
    let device = spec.device.resolve()?;
    let vb = core::var_builder(spec, &device)?;
    let net = DenseEncoder::new(&cfg, &vb).map_err(core::load_err("dense-fusion weights"))?;
    Ok(model(&cfg, &device, "dense-fusion", Box::new(Served { net, device: device.clone() })))
}

/// A freshly initialised, trainable network of `cfg.architecture` whose weights live in
/// `varmap` (what `prism train fusion` optimises and then saves as `model.safetensors`):
/// linear layers as candle initialises them (with biases), LayerNorms at identity, and the
/// latent array and modality-type embeddings drawn from N(0, 0.02) (zeros would leave every
/// latent identical forever).
pub fn trainable(cfg: &FusionConfig, varmap: &VarMap, device: &Device) -> Result<Box<dyn FusionNet>, BackendError> {
    check_config(cfg)?;
    let small = candle_nn::Init::Randn { mean: 0.0, stdev: 0.02 };
    let f32 = candle_core::DType::F32;
    for m in cfg.modalities.keys() {
        varmap.get(cfg.hidden_size, &format!("type.{m}"), small, f32, device)?;
    }
    let vb = VarBuilder::from_backend(Box::new(Trainable(varmap.clone())), f32, device.clone());
    let e = core::load_err("fusion network");
    Ok(match cfg.architecture.as_str() {
        "perceiver-fusion" => {
            varmap.get((cfg.num_latents, cfg.hidden_size), "latents", small, f32, device)?;
            Box::new(PerceiverEncoder::new(cfg, &vb).map_err(&e)?)
        }
        "mot-fusion" => Box::new(MotEncoder::new(cfg, &vb).map_err(&e)?),
        "dense-fusion" => Box::new(DenseEncoder::new(cfg, &vb).map_err(&e)?),
        other => return Err(BackendError::Load(format!("{other:?} is not a fusion architecture"))),
    })
}

/// A VarMap that also creates the optional biases ([`core::linear`] asks whether the checkpoint
/// has one; a network being trained should).
struct Trainable(VarMap);

impl SimpleBackend for Trainable {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: candle_core::DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.get(s, name, h, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: candle_core::DType, dev: &Device) -> candle_core::Result<Tensor> {
        SimpleBackend::get_unchecked(&self.0, name, dtype, dev)
    }
    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}
