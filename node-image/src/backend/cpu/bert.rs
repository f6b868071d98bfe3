//! BERT encoder forward pass on CPU over a packed batch: the tokens of all sequences back to back
//! (no padding), so every dense layer is one matmul over the whole batch and attention runs per
//! (sequence, head) on exactly its own tokens.

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use candle_transformers::models::bert::{Config, HiddenAct};
use rayon::prelude::*;

use super::simd;
use super::{CpuKernels, Epilogue, Linear, Norm};
use crate::backend::BackendError;

/// Why this forward pass cannot run a model with this config (the caller then uses candle's),
/// or None.
pub fn unsupported(config: &Config) -> Option<String> {
    if config.hidden_act != HiddenAct::Gelu {
        return Some(format!("hidden_act {:?} (the packed CPU path implements \"gelu\")", config.hidden_act));
    }
    if config.num_attention_heads == 0 || !config.hidden_size.is_multiple_of(config.num_attention_heads) {
        return Some("hidden_size is not a multiple of num_attention_heads".into());
    }
    None
}

struct Layer {
    /// Query, key and value projections fused into one `[3H, H]` matmul.
    qkv: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    up: Linear,
    down: Linear,
    out_norm: Norm,
}

/// Buffers of one forward pass, kept between batches so the large ones are not faulted in anew
/// each time (fresh multi-MiB allocations cost page faults and zeroing: ~10% of a batch).
#[derive(Default)]
pub struct Workspace {
    x: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    dense: Vec<f32>,
    inner: Vec<f32>,
    bf16: Vec<u16>,
}

pub struct PackedBert {
    config: Config,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type0: Vec<f32>,
    max_positions: usize,
    emb_norm: Norm,
    layers: Vec<Layer>,
    /// A one-thread pool for small batches: waking the other workers for each of a layer's ~8
    /// parallel steps costs more than it saves when a batch is a sentence or two.
    small_batches: Option<rayon::ThreadPool>,
    /// Sliding-window attention radius ([`simd::HeadJob::radius`]); `usize::MAX` is full attention.
    radius: usize,
}

/// Batches of at most this many tokens run on one thread (see `small_batches`).
const SMALL_BATCH_TOKENS: usize = 64;

/// Finds `name` with or without the `bert.` prefix of BertForX checkpoints, as f32 values.
fn take(tensors: &HashMap<String, Tensor>, name: &str, len: usize) -> Result<Vec<f32>, BackendError> {
    let t = tensors
        .get(name)
        .or_else(|| tensors.get(&format!("bert.{name}")))
        .ok_or_else(|| BackendError::Load(format!("BERT weights: {name} is missing")))?;
    let v = t
        .to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| BackendError::Load(format!("BERT weights: {name}: {e}")))?;
    if v.len() != len {
        return Err(BackendError::Load(format!("BERT weights: {name} has {} values, expected {len}", v.len())));
    }
    Ok(v)
}

impl PackedBert {
    /// `config` must pass [`unsupported`].
    pub fn load(tensors: &HashMap<String, Tensor>, config: &Config, kernels: CpuKernels) -> Result<Self, BackendError> {
        let (h, inter) = (config.hidden_size, config.intermediate_size);
        let norm = |p: &str| -> Result<Norm, BackendError> {
            Ok(Norm { gamma: take(tensors, &format!("{p}.weight"), h)?, beta: take(tensors, &format!("{p}.bias"), h)? })
        };
        let linear = |p: &str, out: usize, inp: usize| -> Result<Linear, BackendError> {
            Ok(Linear::new(
                take(tensors, &format!("{p}.weight"), out * inp)?,
                take(tensors, &format!("{p}.bias"), out)?,
                out,
                inp,
                kernels,
            ))
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let mut w = Vec::with_capacity(3 * h * h);
            let mut b = Vec::with_capacity(3 * h);
            for part in ["query", "key", "value"] {
                w.extend(take(tensors, &format!("{p}.attention.self.{part}.weight"), h * h)?);
                b.extend(take(tensors, &format!("{p}.attention.self.{part}.bias"), h)?);
            }
            layers.push(Layer {
                qkv: Linear::new(w, b, 3 * h, h, kernels),
                attn_out: linear(&format!("{p}.attention.output.dense"), h, h)?,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                up: linear(&format!("{p}.intermediate.dense"), inter, h)?,
                down: linear(&format!("{p}.output.dense"), h, inter)?,
                out_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        // Single-segment inputs only use token type 0.
        let token_types = take(tensors, "embeddings.token_type_embeddings.weight", config.type_vocab_size.max(1) * h)?;
        let mut model = PackedBert {
            word: take(tensors, "embeddings.word_embeddings.weight", config.vocab_size * h)?,
            position: take(tensors, "embeddings.position_embeddings.weight", config.max_position_embeddings * h)?,
            token_type0: token_types[..h].to_vec(),
            max_positions: config.max_position_embeddings,
            emb_norm: norm("embeddings.LayerNorm")?,
            layers,
            config: config.clone(),
            small_batches: None,
            radius: usize::MAX,
        };
        // f32 matmuls are compute-bound even for one sentence: those keep every core.
        if model.uses_amx() && rayon::current_num_threads() > 1 {
            model.small_batches =
                rayon::ThreadPoolBuilder::new().num_threads(1).thread_name(|_| "prism-small-batch".into()).build().ok();
        }
        Ok(model)
    }

    /// Sliding-window attention of `window` tokens per query (`spec.model.attention.window`), or
    /// full attention for `None`.
    pub fn set_attention_window(&mut self, window: Option<usize>) {
        self.radius = window.map_or(usize::MAX, crate::backend::transformer::band_radius);
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    pub fn uses_amx(&self) -> bool {
        self.layers.first().is_some_and(|l| l.qkv.uses_amx())
    }

    /// Mean-pooled, L2-normalised embeddings of each token sequence.
    pub fn embed(&self, seqs: &[&[u32]], ws: &mut Workspace) -> Result<Vec<Vec<f32>>, BackendError> {
        let offsets = self.hidden(seqs, ws)?;
        let h = self.config.hidden_size;
        let x = &ws.x;
        // Mean pooling over each sequence's tokens, then L2 normalisation.
        Ok(offsets
            .windows(2)
            .map(|w| {
                let mut v = vec![0f32; h];
                for row in x[w[0] * h..w[1] * h].chunks_exact(h) {
                    for (a, b) in v.iter_mut().zip(row) {
                        *a += *b;
                    }
                }
                let n = (w[1] - w[0]) as f32;
                v.iter_mut().for_each(|a| *a /= n);
                crate::backend::l2_normalize(&mut v);
                v
            })
            .collect())
    }

    /// Each sequence's token states after the last layer (what [`Self::embed`] pools).
    pub fn token_states(&self, seqs: &[&[u32]], ws: &mut Workspace) -> Result<Vec<Vec<f32>>, BackendError> {
        let offsets = self.hidden(seqs, ws)?;
        let h = self.config.hidden_size;
        Ok(offsets.windows(2).map(|w| ws.x[w[0] * h..w[1] * h].to_vec()).collect())
    }

    /// Runs the layers over the packed batch, leaving the states in `ws.x`; returns each
    /// sequence's start row (and the end).
    fn hidden(&self, seqs: &[&[u32]], ws: &mut Workspace) -> Result<Vec<usize>, BackendError> {
        let tokens: usize = seqs.iter().map(|s| s.len()).sum();
        match &self.small_batches {
            Some(pool) if tokens <= SMALL_BATCH_TOKENS => pool.install(|| self.hidden_here(seqs, ws)),
            _ => self.hidden_here(seqs, ws),
        }
    }

    fn hidden_here(&self, seqs: &[&[u32]], ws: &mut Workspace) -> Result<Vec<usize>, BackendError> {
        let h = self.config.hidden_size;
        let vocab = self.word.len() / h;
        let mut offsets = Vec::with_capacity(seqs.len() + 1);
        offsets.push(0usize);
        for s in seqs {
            if s.is_empty() || s.len() > self.max_positions {
                return Err(BackendError::Inference(format!(
                    "a sequence of {} tokens (1..={} fit the position table)",
                    s.len(),
                    self.max_positions
                )));
            }
            if let Some(bad) = s.iter().find(|&&id| id as usize >= vocab) {
                return Err(BackendError::Inference(format!("token id {bad} outside the vocabulary of {vocab}")));
            }
            offsets.push(offsets.last().copied().unwrap_or(0) + s.len());
        }
        let tokens = offsets.last().copied().unwrap_or(0);

        // Embeddings: word + position + token type 0, then LayerNorm.
        let x = &mut ws.x;
        x.clear();
        x.resize(tokens * h, 0.0);
        let ids: Vec<(u32, usize)> = seqs.iter().flat_map(|s| s.iter().enumerate().map(|(p, &id)| (id, p))).collect();
        x.par_chunks_mut(h).zip(&ids).for_each(|(row, &(id, pos))| {
            let word = &self.word[id as usize * h..][..h];
            let position = &self.position[pos * h..][..h];
            for (((y, w), p), t) in row.iter_mut().zip(word).zip(position).zip(&self.token_type0) {
                *y = w + p + t;
            }
            simd::residual_layer_norm(
                row,
                &[],
                &self.emb_norm.gamma,
                &self.emb_norm.beta,
                self.config.layer_norm_eps as f32,
            );
        });

        for layer in &self.layers {
            self.layer(layer, ws, tokens, &offsets);
        }
        Ok(offsets)
    }

    fn layer(&self, layer: &Layer, ws: &mut Workspace, tokens: usize, offsets: &[usize]) {
        let h = self.config.hidden_size;
        let heads = self.config.num_attention_heads;
        let eps = self.config.layer_norm_eps as f32;
        layer.qkv.forward_into(&ws.x, tokens, Epilogue::Bias, &mut ws.bf16, &mut ws.qkv);

        super::self_attention(&ws.qkv, offsets, h, heads, self.radius, &mut ws.ctx);

        let norm_rows = |x: &mut [f32], delta: &[f32], norm: &Norm| {
            x[..tokens * h].par_chunks_mut(h * 8).zip(delta[..tokens * h].par_chunks(h * 8)).for_each(|(xs, ds)| {
                for (row, d) in xs.chunks_exact_mut(h).zip(ds.chunks_exact(h)) {
                    simd::residual_layer_norm(row, d, &norm.gamma, &norm.beta, eps);
                }
            })
        };
        layer.attn_out.forward_into(&ws.ctx, tokens, Epilogue::Bias, &mut ws.bf16, &mut ws.dense);
        norm_rows(&mut ws.x, &ws.dense, &layer.attn_norm);
        layer.up.forward_into(&ws.x, tokens, Epilogue::BiasGelu, &mut ws.bf16, &mut ws.inner);
        layer.down.forward_into(&ws.inner, tokens, Epilogue::Bias, &mut ws.bf16, &mut ws.dense);
        norm_rows(&mut ws.x, &ws.dense, &layer.out_norm);
    }
}
