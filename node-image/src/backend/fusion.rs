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
//!
//! Layout (scripts/make-fusion-model.py): config.json with `architecture`, `hidden_size`,
//! `num_heads`, `num_layers`, `intermediate_size`, `layer_norm_eps`, `hidden_act`, `num_latents`
//! (perceiver) and `modalities` (name -> input dim); model.safetensors with the names above.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use prism_api::wire::node::{EmbedInput, InputItem};
use serde::Deserialize;

use super::transformer::{self as core, attend, Act, Attention, Block, FUSION_NAMES};
use super::{device_name, BackendError, Encoder, LoadSpec, LoadedModel, ModelInfo, Prepared, Preprocessor};

#[derive(Debug, Clone, Deserialize)]
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
    /// Modality name -> embedding dimension it accepts.
    pub modalities: BTreeMap<String, usize>,
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

/// Per-modality input projection + modality-type embedding: embedding -> one token [1, 1, hidden].
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

    fn token(&self, m: &str, v: &[f32], device: &Device) -> Result<Tensor, BackendError> {
        let (Some(p), Some(t)) = (self.proj.get(m), self.typ.get(m)) else {
            return Err(BackendError::Inference(format!("no projection for modality {m}")));
        };
        let x = Tensor::from_slice(v, (1, 1, v.len()), device)?;
        Ok(p.forward(&x)?.broadcast_add(t)?)
    }
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
    device: Device,
}

impl PerceiverEncoder {
    fn forward_one(&self, item: &ModalityEmbeddings) -> Result<Vec<f32>, BackendError> {
        let tokens = item.0.iter().map(|(m, v)| self.tok.token(m, v, &self.device)).collect::<Result<Vec<_>, _>>()?;
        let x = Tensor::cat(&tokens, 1)?; // [1, n, h]
        let lat = self.latents.unsqueeze(0)?; // [1, L, h]
        let kv = self.ln_kv.forward(&x)?;
        let lat = (&lat + self.cross.forward(&self.ln_q.forward(&lat)?, Some(&kv), None)?)?;
        let h = self.cross_fc2.forward(&self.act.apply(&self.cross_fc1.forward(&self.cross_ln.forward(&lat)?)?)?)?;
        let mut lat = (lat + h)?;
        for b in &self.blocks {
            lat = b.forward(&lat, None)?;
        }
        let lat = self.final_ln.forward(&lat)?.squeeze(0)?;
        let n = lat.dim(0)?;
        core::mean_pool_l2(&lat, n)
    }
}

impl Encoder for PerceiverEncoder {
    fn encode_batch(&mut self, batch: &[Prepared]) -> Result<Vec<Vec<f32>>, BackendError> {
        // One small forward per item: items carry different modality subsets (token counts), and
        // at a handful of tokens padding + masks would cost more than it saves.
        batch.iter().map(|p| self.forward_one(p.payload::<ModalityEmbeddings>()?)).collect()
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
    device: Device,
}

impl MotEncoder {
    fn forward_one(&self, item: &ModalityEmbeddings) -> Result<Vec<f32>, BackendError> {
        let mods: Vec<&str> = item.0.iter().map(|(m, _)| m.as_str()).collect();
        let mut xs = item.0.iter().map(|(m, v)| self.tok.token(m, v, &self.device)).collect::<Result<Vec<_>, _>>()?;
        let missing = |m: &&str| BackendError::Inference(format!("no weights for modality {m}"));
        for layer in &self.layers {
            let experts =
                mods.iter().map(|m| layer.get(*m).ok_or_else(|| missing(m))).collect::<Result<Vec<_>, _>>()?;
            // Modality-specific norms and projections, one token each...
            let mut q = Vec::with_capacity(xs.len());
            let mut k = Vec::with_capacity(xs.len());
            let mut v = Vec::with_capacity(xs.len());
            for (x, e) in xs.iter().zip(&experts) {
                let h = e.ln1.forward(x)?;
                q.push(e.q.forward(&h)?);
                k.push(e.k.forward(&h)?);
                v.push(e.v.forward(&h)?);
            }
            // ...then one global attention over all modalities' tokens.
            let a = attend(&Tensor::cat(&q, 1)?, &Tensor::cat(&k, 1)?, &Tensor::cat(&v, 1)?, self.heads, None)?;
            for (i, (x, e)) in xs.iter_mut().zip(&experts).enumerate() {
                let y = (&*x + e.o.forward(&a.narrow(1, i, 1)?)?)?;
                let f = e.fc2.forward(&self.act.apply(&e.fc1.forward(&e.ln2.forward(&y)?)?)?)?;
                *x = (y + f)?;
            }
        }
        let outs = mods
            .iter()
            .zip(&xs)
            .map(|(m, x)| self.final_ln.get(*m).ok_or_else(|| missing(m))?.forward(x).map_err(BackendError::from))
            .collect::<Result<Vec<_>, _>>()?;
        let all = Tensor::cat(&outs, 1)?.squeeze(0)?;
        let n = all.dim(0)?;
        core::mean_pool_l2(&all, n)
    }
}

impl Encoder for MotEncoder {
    fn encode_batch(&mut self, batch: &[Prepared]) -> Result<Vec<Vec<f32>>, BackendError> {
        batch.iter().map(|p| self.forward_one(p.payload::<ModalityEmbeddings>()?)).collect()
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
    if cfg.modalities.is_empty() {
        return Err(BackendError::Load("config.json lists no modalities".into()));
    }
    Ok(cfg)
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
        preprocessor: Arc::new(FusionPreprocessor { modalities: cfg.modalities.clone() }),
        encoder,
    }
}

/// `--architecture perceiver-fusion`.
pub fn load_perceiver(spec: &LoadSpec) -> Result<LoadedModel, BackendError> {
    let cfg = read_config(spec, "perceiver-fusion")?;
    if cfg.num_latents == 0 {
        return Err(BackendError::Load("perceiver-fusion needs num_latents >= 1 in config.json".into()));
    }
    let device = spec.device.resolve()?;
    let vb = core::var_builder(spec, &device)?;
    let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
    let act = Act::from_hf(&cfg.hidden_act)?;
    let e = core::load_err("perceiver-fusion weights");
    let c = vb.pp("cross");
    let enc = PerceiverEncoder {
        tok: Tokenizer::load(&cfg, &vb).map_err(&e)?,
        latents: vb.get((cfg.num_latents, h), "latents").map_err(&e)?,
        ln_q: candle_nn::layer_norm(h, eps, c.pp("ln_q")).map_err(&e)?,
        ln_kv: candle_nn::layer_norm(h, eps, c.pp("ln_kv")).map_err(&e)?,
        cross: Attention::load(h, cfg.num_heads, &FUSION_NAMES, &c).map_err(&e)?,
        cross_ln: candle_nn::layer_norm(h, eps, c.pp("ln2")).map_err(&e)?,
        cross_fc1: candle_nn::linear(h, cfg.intermediate_size, c.pp("mlp.fc1")).map_err(&e)?,
        cross_fc2: candle_nn::linear(cfg.intermediate_size, h, c.pp("mlp.fc2")).map_err(&e)?,
        blocks: (0..cfg.num_layers)
            .map(|i| {
                Block::load(
                    h,
                    cfg.num_heads,
                    cfg.intermediate_size,
                    eps,
                    act,
                    &FUSION_NAMES,
                    vb.pp(format!("layers.{i}")),
                )
            })
            .collect::<candle_core::Result<_>>()
            .map_err(&e)?,
        final_ln: candle_nn::layer_norm(h, eps, vb.pp("final_ln")).map_err(&e)?,
        act,
        device: device.clone(),
    };
    Ok(model(&cfg, &device, "perceiver-fusion", Box::new(enc)))
}

/// `--architecture mot-fusion`.
pub fn load_mot(spec: &LoadSpec) -> Result<LoadedModel, BackendError> {
    let cfg = read_config(spec, "mot-fusion")?;
    let device = spec.device.resolve()?;
    let vb = core::var_builder(spec, &device)?;
    let (h, eps, ffn) = (cfg.hidden_size, cfg.layer_norm_eps, cfg.intermediate_size);
    if cfg.num_heads == 0 || h % cfg.num_heads != 0 {
        return Err(BackendError::Load(format!("hidden_size {h} is not divisible by num_heads {}", cfg.num_heads)));
    }
    let act = Act::from_hf(&cfg.hidden_act)?;
    let e = core::load_err("mot-fusion weights");
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let mut experts = BTreeMap::new();
        for m in cfg.modalities.keys() {
            let p = vb.pp(format!("layers.{i}.{m}"));
            let expert = MotExpert {
                ln1: candle_nn::layer_norm(h, eps, p.pp("ln1")).map_err(&e)?,
                q: candle_nn::linear(h, h, p.pp("attn.q")).map_err(&e)?,
                k: candle_nn::linear(h, h, p.pp("attn.k")).map_err(&e)?,
                v: candle_nn::linear(h, h, p.pp("attn.v")).map_err(&e)?,
                o: candle_nn::linear(h, h, p.pp("attn.o")).map_err(&e)?,
                ln2: candle_nn::layer_norm(h, eps, p.pp("ln2")).map_err(&e)?,
                fc1: candle_nn::linear(h, ffn, p.pp("mlp.fc1")).map_err(&e)?,
                fc2: candle_nn::linear(ffn, h, p.pp("mlp.fc2")).map_err(&e)?,
            };
            experts.insert(m.clone(), expert);
        }
        layers.push(experts);
    }
    let mut final_ln = BTreeMap::new();
    for m in cfg.modalities.keys() {
        final_ln.insert(m.clone(), candle_nn::layer_norm(h, eps, vb.pp(format!("final_ln.{m}"))).map_err(&e)?);
    }
    let enc = MotEncoder {
        tok: Tokenizer::load(&cfg, &vb).map_err(&e)?,
        layers,
        final_ln,
        heads: cfg.num_heads,
        act,
        device: device.clone(),
    };
    Ok(model(&cfg, &device, "mot-fusion", Box::new(enc)))
}
