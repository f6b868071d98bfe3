//! BERT-family text encoder (e.g. all-MiniLM-L6-v2): HF tokenizer, candle `BertModel`, mean
//! pooling over real tokens, L2 normalisation.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::{BertModel, Config};
use prism_api::wire::node::EmbedInput;
use tokenizers::{Tokenizer, TruncationParams};

use super::cpu::bert::{self as packed, PackedBert, Workspace};
use super::cpu::CpuKernels;
use super::{
    device_name, l2_normalize, BackendError, Encoder, LoadSpec, LoadedModel, ModelInfo, Prepared, Preprocessor,
    TokenStates,
};

/// Default truncation. Sentence-transformers' all-MiniLM-L6-v2 uses 256 (`max_seq_length`), not the
/// 128 baked into the shipped tokenizer.json nor the 512 positions of the config.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// Token ids of one text; padding is added per batch by the encoder.
#[derive(Debug, Clone)]
pub struct TextTokens {
    pub ids: Vec<u32>,
}

pub struct BertPreprocessor {
    tokenizer: Tokenizer,
}

/// Extracts the text of a text input, or says why the input is not text.
pub fn input_text(input: &EmbedInput) -> Result<&str, BackendError> {
    let text = match input {
        EmbedInput::Text(s) => s.as_str(),
        EmbedInput::Item(item) => {
            let other = item.image_base64.is_some() || item.audio_base64.is_some() || item.embeddings.is_some();
            match (&item.text, other) {
                (Some(t), false) => t.as_str(),
                _ => {
                    return Err(BackendError::Validation(
                        "this is a text node: each input must be a string or {\"text\": \"...\"}".into(),
                    ))
                }
            }
        }
    };
    // Only the empty string is refused (as TEI does). Whitespace-only text is embedded as the
    // reference does: sentence-transformers tokenises it to `[CLS] [SEP]`. Refusing it would fail
    // a whole batch over one blank field.
    if text.is_empty() {
        return Err(BackendError::Validation("text input is the empty string".into()));
    }
    Ok(text)
}

impl Preprocessor for BertPreprocessor {
    fn preprocess(&self, input: &EmbedInput) -> Result<Prepared, BackendError> {
        let text = input_text(input)?;
        let enc =
            self.tokenizer.encode(text, true).map_err(|e| BackendError::Validation(format!("tokenizing: {e}")))?;
        let ids = enc.get_ids().to_vec();
        let n = ids.len();
        Ok(Prepared::new(n, TextTokens { ids }).with_tokens(n))
    }

    fn warmup_input(&self) -> EmbedInput {
        EmbedInput::Text("Prism warms the model up with one short sentence before it reports ready.".into())
    }
}

/// The text encoder: the packed CPU forward pass on CPU devices, candle's BERT on GPUs (and on CPU
/// when asked, for comparison).
pub enum BertEncoder {
    Packed(PackedBert, Workspace),
    Candle { model: BertModel, device: Device, pad_id: u32 },
}

impl Encoder for BertEncoder {
    fn encode_batch(&mut self, batch: &[Prepared]) -> Result<Vec<Vec<f32>>, BackendError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let toks: Vec<&TextTokens> = batch.iter().map(|p| p.payload::<TextTokens>()).collect::<Result<_, _>>()?;
        match self {
            BertEncoder::Packed(model, workspace) => {
                let seqs: Vec<&[u32]> = toks.iter().map(|t| t.ids.as_slice()).collect();
                model.embed(&seqs, workspace)
            }
            BertEncoder::Candle { model, device, pad_id } => candle_encode(model, device, *pad_id, &toks),
        }
    }

    fn encode_tokens(&mut self, batch: &[Prepared]) -> Result<Vec<TokenStates>, BackendError> {
        let toks: Vec<&TextTokens> = batch.iter().map(|p| p.payload::<TextTokens>()).collect::<Result<_, _>>()?;
        let BertEncoder::Packed(model, workspace) = self else {
            return Err(BackendError::Validation("token states come from the packed CPU path only".into()));
        };
        let seqs: Vec<&[u32]> = toks.iter().map(|t| t.ids.as_slice()).collect();
        let dim = model.hidden_size();
        Ok(model.token_states(&seqs, workspace)?.into_iter().map(|values| TokenStates { dim, values }).collect())
    }
}

fn candle_encode(
    model: &BertModel,
    device: &Device,
    pad_id: u32,
    toks: &[&TextTokens],
) -> Result<Vec<Vec<f32>>, BackendError> {
    // Dynamic padding: to the longest item of this batch only. Padding everything to the
    // tokenizer's fixed 128 costs 3-7x on typical sentences.
    let b = toks.len();
    let l = toks.iter().map(|t| t.ids.len()).max().unwrap_or(0).max(1);
    let mut ids = Vec::with_capacity(b * l);
    let mut mask = Vec::with_capacity(b * l);
    for t in toks {
        ids.extend_from_slice(&t.ids);
        mask.extend(std::iter::repeat_n(1u32, t.ids.len()));
        let pad = l - t.ids.len();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        mask.extend(std::iter::repeat_n(0u32, pad));
    }
    let ids = Tensor::from_vec(ids, (b, l), device)?;
    let type_ids = ids.zeros_like()?;
    let mask = Tensor::from_vec(mask, (b, l), device)?;
    // The stock model builds its additive mask as (1 - m) * f32::MIN; that is exact in f32 (the
    // NaN problem only appears in bf16/f16), so the model runs in f32 here.
    let hidden = model.forward(&ids, &type_ids, Some(&mask))?; // (b, l, h)
                                                               // Mean pooling over real tokens only; padded positions must not dilute the mean.
    let maskf = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (b, l, 1)
    let summed = hidden.broadcast_mul(&maskf)?.sum(1)?; // (b, h)
    let counts = maskf.sum(1)?; // (b, 1), >= 1 since every input has [CLS] [SEP]
    let mean = summed.broadcast_div(&counts)?;
    let mut out: Vec<Vec<f32>> = mean.to_vec2()?;
    out.iter_mut().for_each(|v| l2_normalize(v));
    Ok(out)
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>, BackendError> {
    let p = dir.join(name);
    std::fs::read(&p).map_err(|e| {
        BackendError::Load(format!(
            "{}: {e}; an HF-layout folder needs config.json, tokenizer.json and model.safetensors",
            p.display()
        ))
    })
}

/// Loads a BERT folder (config.json, tokenizer.json, model.safetensors; optional LoRA adapter).
/// On CPU the kernels come from `PRISM_CPU_KERNELS` (default auto: see [`CpuKernels`]).
pub fn load(spec: &LoadSpec) -> Result<LoadedModel, BackendError> {
    load_with(spec, CpuKernels::from_env().map_err(BackendError::Load)?)
}

/// [`load`] with the CPU kernels chosen by the caller (tests compare them).
pub fn load_with(spec: &LoadSpec, kernels: CpuKernels) -> Result<LoadedModel, BackendError> {
    let device = spec.device.resolve()?;
    let config: Config = serde_json::from_slice(&read(&spec.dir, "config.json")?)
        .map_err(|e| BackendError::Load(format!("config.json is not a BERT config: {e}")))?;
    let max_tokens = spec.max_input_tokens.unwrap_or(DEFAULT_MAX_TOKENS).min(config.max_position_embeddings);

    let mut tokenizer = Tokenizer::from_bytes(read(&spec.dir, "tokenizer.json")?)
        .map_err(|e| BackendError::Load(format!("tokenizer.json: {e}")))?;
    let pad_id = tokenizer.get_padding().map(|p| p.pad_id).unwrap_or(0);
    // The shipped tokenizer pads every input to 128; the encoder pads per batch (or not at all).
    tokenizer.with_padding(None);
    tokenizer
        .with_truncation(Some(TruncationParams { max_length: max_tokens, ..Default::default() }))
        .map_err(|e| BackendError::Load(format!("tokenizer truncation: {e}")))?;

    // model.safetensors with the folder's LoRA adapter, if any, merged in (adapter_config.json +
    // adapter_model.safetensors in PEFT layout, as train/prism_train.py writes them).
    let tensors = super::transformer::load_tensors(spec, &device)?;
    let packed_why_not = match (&device, kernels) {
        (Device::Cpu, CpuKernels::Candle) => Some("PRISM_CPU_KERNELS=candle".to_string()),
        (Device::Cpu, _) => packed::unsupported(&config),
        _ => Some("GPU device".into()),
    };
    if let (Some(w), Some(why)) = (spec.attention_window, &packed_why_not) {
        return Err(BackendError::Load(format!(
            "--attention-window {w}: bert's sliding-window attention runs on the packed CPU path, \
             and this node runs candle's BERT ({why}); serve it with full attention or on device cpu"
        )));
    }
    let encoder = match packed_why_not {
        None => {
            let mut model = PackedBert::load(&tensors, &config, kernels)?;
            model.set_attention_window(spec.attention_window);
            tracing::info!(amx_bf16 = model.uses_amx(), "BERT on the packed CPU path");
            BertEncoder::Packed(model, Workspace::default())
        }
        Some(why) => {
            if device.is_cpu() {
                tracing::info!(reason = why, "BERT on candle's CPU kernels");
            }
            let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &device);
            let model = BertModel::load(vb, &config).map_err(|e| BackendError::Load(format!("BERT weights: {e}")))?;
            BertEncoder::Candle { model, device: device.clone(), pad_id }
        }
    };

    Ok(LoadedModel {
        info: ModelInfo {
            modality: "text".into(),
            architecture: "bert".into(),
            dim: config.hidden_size,
            device: device_name(&device),
            max_input_tokens: Some(max_tokens),
            classifier: None,
        },
        preprocessor: Arc::new(BertPreprocessor { tokenizer }),
        encoder: Box::new(encoder),
    })
}
