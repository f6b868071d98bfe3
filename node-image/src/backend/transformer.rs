//! The shared transformer core of the non-text backends (whisper encoder, ViT, fusion): pre-norm
//! blocks of multi-head attention + MLP, with LayerNorm. One implementation, parameterised by the
//! tensor names of each published layout ([`BlockNames`]), so every architecture loads its real HF
//! checkpoint without renaming files.
//!
//! Optional: sliding-window (banded) self-attention via [`Attention::radius`], computed band by
//! band ([`attend_band`]) so its cost grows as O(L·w), not O(L²).

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{LayerNorm, Linear, VarBuilder};

use super::cpu::prenorm::{self, PackedPreNorm};
use super::cpu::{batch_parts, CpuKernels, Spare};
use super::{BackendError, LoadSpec, NamedAdapter};
use rayon::prelude::*;

/// Reads a model folder's file into a string, with an error that names the file and the fix.
pub fn read_model_file(dir: &std::path::Path, name: &str) -> Result<String, BackendError> {
    let p = dir.join(name);
    std::fs::read_to_string(&p).map_err(|e| {
        BackendError::Load(format!(
            "{}: {e}; run `make models` or point --model-uri at a complete model folder",
            p.display()
        ))
    })
}

/// Loads `model.safetensors` of the spec's folder as f32, with its LoRA adapters merged in
/// (see [`load_tensors`]).
pub fn var_builder(spec: &LoadSpec, device: &Device) -> Result<VarBuilder<'static>, BackendError> {
    Ok(VarBuilder::from_tensors(load_tensors(spec, device)?, DType::F32, device))
}

/// The tensors of the spec's `model.safetensors`, with the folder's own LoRA adapter merged in
/// ([`merge_lora`]), then each of `spec.adapters` in order ([`merge_named_adapter`]).
pub fn load_tensors(spec: &LoadSpec, device: &Device) -> Result<HashMap<String, Tensor>, BackendError> {
    let p = spec.dir.join("model.safetensors");
    if !p.is_file() {
        return Err(BackendError::Load(format!("{} is missing; run `make models`", p.display())));
    }
    let mut tensors =
        candle_core::safetensors::load(&p, device).map_err(|e| BackendError::Load(format!("{}: {e}", p.display())))?;
    merge_lora(&spec.dir, &mut tensors)?;
    for adapter in &spec.adapters {
        merge_named_adapter(adapter, &mut tensors)?;
    }
    Ok(tensors)
}

/// PEFT's adapter_config.json fields that the merge needs.
#[derive(serde::Deserialize)]
struct LoraConfig {
    r: usize,
    lora_alpha: f64,
}

/// LoRA adapters on any linear layer, PEFT layout: `adapter_config.json` (`r`, `lora_alpha`) and
/// `adapter_model.safetensors` with `<prefix><layer>.lora_A.weight` [r, in] and
/// `<prefix><layer>.lora_B.weight` [out, r], where `<prefix>` is PEFT's `base_model.model.` (or
/// nothing). Each pair is merged into the base weight once at load time:
/// W' = W + (lora_alpha / r) * B A. A merged adapter costs nothing per request, which is what a
/// serving node wants; the adapters are fixed for the process's life (a different set = a new
/// pod), so nothing needs unmerging. This is the folder's own adapter (what the adaptation Job
/// writes); `spec.model.adapters` come after it ([`merge_named_adapter`]).
pub fn merge_lora(dir: &std::path::Path, tensors: &mut HashMap<String, Tensor>) -> Result<usize, BackendError> {
    let (cfg_path, ad_path) = (dir.join("adapter_config.json"), dir.join("adapter_model.safetensors"));
    if !ad_path.is_file() {
        return Ok(0);
    }
    let cfg: LoraConfig = serde_json::from_str(&read_model_file(dir, "adapter_config.json")?)
        .map_err(|e| BackendError::Load(format!("{}: {e}", cfg_path.display())))?;
    if cfg.r == 0 {
        return Err(BackendError::Load(format!("{}: r must be >= 1", cfg_path.display())));
    }
    // PEFT's rank_pattern may give layers other ranks than `r`: the folder's rows are not checked.
    let merged = merge_pairs(&ad_path, cfg.lora_alpha / cfg.r as f64, None, &ad_path.display().to_string(), tensors)?;
    tracing::info!(adapters = merged, r = cfg.r, alpha = cfg.lora_alpha, "merged LoRA adapters into the base weights");
    Ok(merged)
}

/// Merges one adapter of `spec.model.adapters` (see [`NamedAdapter`]): every pair's lora_A must
/// have `rank` rows, and every pair must name a weight of the model. An adapter that would
/// change nothing (no pair) is refused too: a wrong file must not be served as if applied.
pub fn merge_named_adapter(
    adapter: &NamedAdapter,
    tensors: &mut HashMap<String, Tensor>,
) -> Result<usize, BackendError> {
    let file =
        if adapter.path.is_dir() { adapter.path.join("adapter_model.safetensors") } else { adapter.path.clone() };
    let what = format!("adapter {:?} ({})", adapter.name, file.display());
    if !file.is_file() {
        return Err(BackendError::Load(format!("{what}: no such file")));
    }
    let merged = merge_pairs(&file, adapter.alpha / adapter.rank as f64, Some(adapter.rank), &what, tensors)?;
    tracing::info!(adapter = %adapter.name, layers = merged, rank = adapter.rank, alpha = adapter.alpha, "merged LoRA adapter into the base weights");
    Ok(merged)
}

/// W += scale * B A for every lora_A/lora_B pair of the safetensors file `path`; the number of
/// weights changed. `rank`: the rows every lora_A must have. `what` names the adapter in errors.
fn merge_pairs(
    path: &std::path::Path,
    scale: f64,
    rank: Option<usize>,
    what: &str,
    tensors: &mut HashMap<String, Tensor>,
) -> Result<usize, BackendError> {
    let device = tensors.values().next().map(|t| t.device().clone()).unwrap_or(Device::Cpu);
    let adapter =
        candle_core::safetensors::load(path, &device).map_err(|e| BackendError::Load(format!("{what}: {e}")))?;
    let mut merged = 0;
    for (name, a) in &adapter {
        let Some(layer) = name.strip_suffix(".lora_A.weight") else { continue };
        let b_name = format!("{layer}.lora_B.weight");
        let b =
            adapter.get(&b_name).ok_or_else(|| BackendError::Load(format!("{what}: has {name} but no {b_name}")))?;
        if let Some(r) = rank {
            if a.dims().first() != Some(&r) {
                return Err(BackendError::Load(format!(
                    "{what}: {name} is {:?}, so its rank is not the {r} the spec gives (spec.model.adapters[].rank)",
                    a.dims()
                )));
            }
        }
        let base = layer.strip_prefix("base_model.model.").unwrap_or(layer);
        let w_name = format!("{base}.weight");
        let w = tensors
            .get(&w_name)
            .ok_or_else(|| BackendError::Load(format!("{what}: targets {w_name}, which the model does not have")))?;
        let delta = (b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?;
        if delta.dims() != w.dims() {
            return Err(BackendError::Load(format!(
                "{what}: for {w_name}, B A is {:?}, the weight is {:?}",
                delta.dims(),
                w.dims()
            )));
        }
        let new = (w.to_dtype(DType::F32)? + delta)?;
        tensors.insert(w_name, new);
        merged += 1;
    }
    if merged == 0 {
        return Err(BackendError::Load(format!("{what}: holds no lora_A/lora_B pairs")));
    }
    Ok(merged)
}

/// Maps a candle error raised while loading weights to a load error naming what was loaded.
pub fn load_err(what: &str) -> impl Fn(candle_core::Error) -> BackendError + '_ {
    move |e| BackendError::Load(format!("{what}: {e}"))
}

/// MLP activation, by its HF config name (`hidden_act` / `activation_function`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// Exact erf GELU: HF's "gelu" (ViT, Whisper: both train with torch's exact GELU).
    Gelu,
    /// tanh approximation: HF's "gelu_new" / "gelu_pytorch_tanh".
    GeluTanh,
    /// x * sigmoid(1.702 x): CLIP's "quick_gelu".
    QuickGelu,
    Relu,
}

impl Act {
    pub fn from_hf(name: &str) -> Result<Self, BackendError> {
        match name {
            "gelu" => Ok(Act::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Act::GeluTanh),
            "quick_gelu" => Ok(Act::QuickGelu),
            "relu" => Ok(Act::Relu),
            other => {
                Err(BackendError::Load(format!("unsupported activation {other:?} (gelu, gelu_new, quick_gelu, relu)")))
            }
        }
    }

    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Act::Gelu => x.gelu_erf(),
            Act::GeluTanh => x.gelu(),
            Act::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Act::Relu => x.relu(),
        }
    }
}

/// A linear layer whose bias is optional in the checkpoint (whisper's k_proj has none).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    let has_bias = vb.contains_tensor("bias");
    candle_nn::linear_b(in_dim, out_dim, has_bias, vb)
}

/// Tensor names of one pre-norm block inside its layer prefix.
#[derive(Clone, Copy, Debug)]
pub struct BlockNames {
    pub ln1: &'static str,
    pub q: &'static str,
    pub k: &'static str,
    pub v: &'static str,
    pub o: &'static str,
    pub ln2: &'static str,
    pub fc1: &'static str,
    pub fc2: &'static str,
}

/// HF WhisperEncoderLayer (also CLIP's encoder layer uses the same attention names).
pub const WHISPER_NAMES: BlockNames = BlockNames {
    ln1: "self_attn_layer_norm",
    q: "self_attn.q_proj",
    k: "self_attn.k_proj",
    v: "self_attn.v_proj",
    o: "self_attn.out_proj",
    ln2: "final_layer_norm",
    fc1: "fc1",
    fc2: "fc2",
};

/// HF ViTLayer.
pub const VIT_NAMES: BlockNames = BlockNames {
    ln1: "layernorm_before",
    q: "attention.attention.query",
    k: "attention.attention.key",
    v: "attention.attention.value",
    o: "attention.output.dense",
    ln2: "layernorm_after",
    fc1: "intermediate.dense",
    fc2: "output.dense",
};

/// Prism's fusion checkpoints (scripts/make-fusion-model.py).
pub const FUSION_NAMES: BlockNames = BlockNames {
    ln1: "ln1",
    q: "attn.q",
    k: "attn.k",
    v: "attn.v",
    o: "attn.o",
    ln2: "ln2",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
};

/// HF CLIPEncoderLayer.
pub const CLIP_NAMES: BlockNames = BlockNames {
    ln1: "layer_norm1",
    q: "self_attn.q_proj",
    k: "self_attn.k_proj",
    v: "self_attn.v_proj",
    o: "self_attn.out_proj",
    ln2: "layer_norm2",
    fc1: "mlp.fc1",
    fc2: "mlp.fc2",
};

/// Multi-head attention. Queries come from `x`, keys/values from `ctx` (= `x` for self-attention).
pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    /// Sliding-window self-attention: query i attends only to keys j with |i - j| <= radius
    /// ([`band_radius`] of `spec.model.attention.window`). `None` is full attention. Local
    /// attention caps what a token sees, the usual trade for long inputs.
    pub radius: Option<usize>,
}

impl Attention {
    pub fn load(dim: usize, heads: usize, names: &BlockNames, vb: &VarBuilder) -> candle_core::Result<Self> {
        if heads == 0 || !dim.is_multiple_of(heads) {
            candle_core::bail!("hidden size {dim} is not divisible by {heads} heads");
        }
        Ok(Self {
            q: linear(dim, dim, vb.pp(names.q))?,
            k: linear(dim, dim, vb.pp(names.k))?,
            v: linear(dim, dim, vb.pp(names.v))?,
            o: linear(dim, dim, vb.pp(names.o))?,
            heads,
            radius: None,
        })
    }

    /// `x`: [b, n, d]; `ctx`: [b, m, d]; `mask`: additive, broadcastable to [b, heads, n, m].
    pub fn forward(&self, x: &Tensor, ctx: Option<&Tensor>, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let kv = ctx.unwrap_or(x);
        let (q, k, v) = (self.q.forward(x)?, self.k.forward(kv)?, self.v.forward(kv)?);
        let out = match (self.radius, ctx, mask) {
            (Some(r), None, None) => attend_band(&q, &k, &v, self.heads, r)?,
            // Cross-attention or an extra mask: the band as one more additive mask (dense work;
            // no served architecture takes this path, it keeps the general case correct).
            (Some(r), _, _) => {
                let band = sliding_window_mask(q.dim(1)?, k.dim(1)?, r, x.device())?;
                let mask = match mask {
                    Some(m) => m.broadcast_add(&band)?,
                    None => band,
                };
                attend(&q, &k, &v, self.heads, Some(&mask))?
            }
            (None, _, _) => attend(&q, &k, &v, self.heads, mask)?,
        };
        self.o.forward(&out)
    }
}

/// Keys on each side that a query sees for `spec.model.attention.window` tokens: the query and
/// `window / 2` on either side (Longformer's convention, as the training job uses).
pub fn band_radius(window: usize) -> usize {
    window / 2
}

/// Sliding-window self-attention computed one block of queries at a time against only the keys
/// within `radius` of the block, so the work is O(n·(block + 2·radius)) instead of O(n²). Equal
/// to [`attend`] with [`sliding_window_mask`] (a test checks it).
pub fn attend_band(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, radius: usize) -> candle_core::Result<Tensor> {
    let (b, n, d) = q.dims3()?;
    if radius + 1 >= n {
        return attend(q, k, v, heads, None);
    }
    let hd = d / heads;
    let split =
        |t: &Tensor| -> candle_core::Result<Tensor> { t.reshape((b, n, heads, hd))?.transpose(1, 2)?.contiguous() };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    // A block as wide as the radius: the keys computed per query are at most 3x the band's,
    // and the number of small matmuls stays low.
    let block = radius.clamp(16, 256);
    let mut outs = Vec::with_capacity(n.div_ceil(block));
    for start in (0..n).step_by(block) {
        let end = (start + block).min(n);
        let (k0, k1) = (start.saturating_sub(radius), (end + radius).min(n));
        let qb = q.narrow(2, start, end - start)?;
        let kb = k.narrow(2, k0, k1 - k0)?;
        let scores = (qb.matmul(&kb.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?;
        let mask = band_mask(start..end, k0..k1, radius, q.device())?;
        let probs = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
        outs.push(probs.matmul(&v.narrow(2, k0, k1 - k0)?.contiguous()?)?);
    }
    Tensor::cat(&outs, 2)?.transpose(1, 2)?.reshape((b, n, d))
}

/// Scaled dot-product attention over already-projected q [b, n, d], k and v [b, m, d], split into
/// `heads`; returns [b, n, d] (before the output projection). Shared by [`Attention`] and the
/// Mixture-of-Transformers fusion, whose projections differ per token.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    let (b, n, d) = q.dims3()?;
    let m = k.dim(1)?;
    let hd = d / heads;
    let split = |t: &Tensor, len: usize| -> candle_core::Result<Tensor> {
        t.reshape((b, len, heads, hd))?.transpose(1, 2)?.contiguous()
    };
    let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let mut scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (hd as f64).sqrt()))?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))
}

/// Additive [n, m] mask: 0 where |i - j| <= radius, a large negative number elsewhere (finite, so a
/// row can never become all -inf and turn into NaN). The dense reference of [`attend_band`].
pub fn sliding_window_mask(n: usize, m: usize, radius: usize, device: &Device) -> candle_core::Result<Tensor> {
    band_mask(0..n, 0..m, radius, device)
}

/// The rows `queries` x columns `keys` of the sliding-window mask (one block of [`attend_band`]).
fn band_mask(
    queries: std::ops::Range<usize>,
    keys: std::ops::Range<usize>,
    radius: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let shape = (queries.len(), keys.len());
    let data: Vec<f32> =
        queries.flat_map(|i| keys.clone().map(move |j| if i.abs_diff(j) <= radius { 0.0 } else { -1e9 })).collect();
    Tensor::from_vec(data, shape, device)
}

/// Pre-norm transformer block: x + attn(ln1(x)), then x + fc2(act(fc1(ln2(x)))).
pub struct Block {
    ln1: LayerNorm,
    pub attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Act,
}

impl Block {
    pub fn load(
        dim: usize,
        heads: usize,
        ffn: usize,
        eps: f64,
        act: Act,
        names: &BlockNames,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            ln1: candle_nn::layer_norm(dim, eps, vb.pp(names.ln1))?,
            attn: Attention::load(dim, heads, names, &vb)?,
            ln2: candle_nn::layer_norm(dim, eps, vb.pp(names.ln2))?,
            fc1: linear(dim, ffn, vb.pp(names.fc1))?,
            fc2: linear(ffn, dim, vb.pp(names.fc2))?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let h = self.attn.forward(&self.ln1.forward(x)?, None, mask)?;
        let x = (x + h)?;
        let h = self.fc2.forward(&self.act.apply(&self.fc1.forward(&self.ln2.forward(&x)?)?)?)?;
        x + h
    }
}

/// The kernels of the packed CPU path ([`super::cpu`]) for a network whose MLP uses `act`, or
/// `None` where candle runs it: a GPU, `PRISM_CPU_KERNELS=candle`, or an activation other than
/// exact GELU (the packed epilogue's).
pub fn packed_kernels(device: &Device, act: Act) -> Result<Option<CpuKernels>, BackendError> {
    let kernels = CpuKernels::from_env().map_err(BackendError::Load)?;
    Ok((device.is_cpu() && kernels != CpuKernels::Candle && act == Act::Gelu).then_some(kernels))
}

/// A stack of pre-norm blocks. On CPU the packed kernels ([`PackedPreNorm`]: one matmul per
/// layer over the whole batch, fused GELU, retained buffers); on a GPU, under
/// `PRISM_CPU_KERNELS=candle`, or with an activation the packed path lacks, candle's [`Block`]s.
pub enum Blocks {
    Candle(Vec<Block>),
    Packed(PackedPreNorm, Spare<prenorm::Workspace>),
}

impl Blocks {
    /// `layers[i]`: the VarBuilder at layer i's prefix. `radius`: sliding-window attention
    /// ([`band_radius`]), `None` for full attention. `what` names the weights in errors.
    pub fn load(
        layers: &[VarBuilder],
        names: &BlockNames,
        shape: prenorm::Shape,
        act: Act,
        radius: Option<usize>,
        device: &Device,
        what: &str,
    ) -> Result<Self, BackendError> {
        if let Some(kernels) = packed_kernels(device, act)? {
            let packed = PackedPreNorm::load(layers, names, shape, radius, kernels).map_err(load_err(what))?;
            return Ok(Blocks::Packed(packed, Default::default()));
        }
        let blocks = layers
            .iter()
            .map(|vb| {
                let mut block = Block::load(shape.hidden, shape.heads, shape.ffn, shape.eps, act, names, vb.clone())?;
                block.attn.radius = radius;
                Ok(block)
            })
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(load_err(what))?;
        Ok(Blocks::Candle(blocks))
    }

    /// `x`: [b, n, d], every sequence n tokens long.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Blocks::Candle(blocks) => blocks.iter().try_fold(x.clone(), |x, b| b.forward(&x, None)),
            Blocks::Packed(model, spare) => {
                let (b, n, d) = x.dims3()?;
                let mut rows = x.flatten_all()?.to_vec1::<f32>()?;
                // One part of the batch per thread, each on its own rows (see `batch_parts`).
                let per_part = b.div_ceil(batch_parts(b, 1));
                let offsets: Vec<usize> = (0..=per_part).map(|i| i * n).collect();
                let run = |part: &mut [f32]| {
                    let items = part.len() / (n * d).max(1);
                    spare.with(|ws| model.forward(part, &offsets[..=items], ws));
                };
                if per_part >= b {
                    run(&mut rows);
                } else {
                    rows.par_chunks_mut(per_part * n * d).for_each(run);
                }
                Tensor::from_vec(rows, (b, n, d), x.device())
            }
        }
    }

    /// Which kernels run the blocks, for the startup log.
    pub fn kernels(&self) -> &'static str {
        match self {
            Blocks::Candle(_) => "candle",
            Blocks::Packed(m, _) if m.uses_amx() => "packed (AMX bf16)",
            Blocks::Packed(..) => "packed (f32)",
        }
    }
}

/// Mean of rows `0..len` of a [n, d] tensor, L2-normalised, as a Vec.
pub fn mean_pool_l2(x: &Tensor, len: usize) -> Result<Vec<f32>, BackendError> {
    let mut v: Vec<f32> = x.narrow(0, 0, len)?.mean(0)?.to_dtype(DType::F32)?.to_vec1()?;
    super::l2_normalize(&mut v);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn attention(radius: Option<usize>) -> (Attention, VarMap) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let mut a = Attention::load(8, 2, &FUSION_NAMES, &vb.pp("x")).expect("attention");
        a.radius = radius;
        (a, vm)
    }

    /// Largest element-wise difference of two tensors of the same shape.
    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).and_then(|d| d.abs()).and_then(|d| d.max_all()).and_then(|d| d.to_scalar::<f32>()).expect("max |a - b|")
    }

    #[test]
    fn sliding_window_zero_attends_to_self_only_and_wide_window_is_full_attention() {
        let (mut att, _vm) = attention(None);
        let x = Tensor::randn(0f32, 1.0, (1, 5, 8), &Device::Cpu).expect("x");
        let full = att.forward(&x, None, None).expect("full");
        att.radius = Some(10);
        let wide = att.forward(&x, None, None).expect("wide");
        let d = max_abs_diff(&full, &wide);
        assert!(d < 1e-6, "a window wider than the sequence must equal full attention ({d})");
        // Window 0: softmax over one key is 1, so each output is o(v(x_i)) of its own token.
        att.radius = Some(0);
        let local = att.forward(&x, None, None).expect("local");
        let own = att.o.forward(&att.v.forward(&x).expect("v")).expect("o");
        let d = max_abs_diff(&local, &own);
        assert!(d < 1e-5, "window 0 must attend to the token itself only ({d})");
        let d = max_abs_diff(&local, &full);
        assert!(d > 1e-4, "window 0 must differ from full attention");
    }

    #[test]
    fn banded_attention_equals_the_dense_masked_reference() {
        // Lengths around the block size (16 for small radii) and radii 0, 1, 3, 20 and one wider
        // than the sequence; the last block is partial in most of them.
        for (n, radius) in [(5, 0), (17, 1), (40, 3), (100, 20), (33, 40), (64, 16)] {
            let q = Tensor::randn(0f32, 1.0, (2, n, 8), &Device::Cpu).expect("q");
            let k = Tensor::randn(0f32, 1.0, (2, n, 8), &Device::Cpu).expect("k");
            let v = Tensor::randn(0f32, 1.0, (2, n, 8), &Device::Cpu).expect("v");
            let mask = sliding_window_mask(n, n, radius, &Device::Cpu).expect("mask");
            let dense = attend(&q, &k, &v, 2, Some(&mask)).expect("dense");
            let band = attend_band(&q, &k, &v, 2, radius).expect("band");
            let d = max_abs_diff(&dense, &band);
            assert!(d < 1e-5, "n {n} radius {radius}: banded differs from the masked reference by {d}");
        }
    }

    #[test]
    fn window_mask_is_banded() {
        let m: Vec<Vec<f32>> = sliding_window_mask(4, 4, 1, &Device::Cpu).expect("mask").to_vec2().expect("vec");
        for (i, row) in m.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                assert_eq!(*v == 0.0, i.abs_diff(j) <= 1, "({i},{j})");
            }
        }
    }
}
