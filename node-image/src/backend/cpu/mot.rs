//! Mixture-of-Transformers fusion ([`crate::backend::fusion::MotEncoder`]) served on CPU with the
//! packed kernels. candle ran each modality's ~8 small ops per layer as separate tensor
//! programs, so a batch of 32 items cost ~3x PyTorch; here each modality's tokens of the whole
//! batch are one matrix (one matmul per projection), the global attention runs per item over a
//! gathered copy of its tokens' q/k/v rows, and the buffers are kept between batches.
//!
//! Training keeps the candle network (it backpropagates); a test checks the two agree.

use std::collections::BTreeMap;

use candle_core::Tensor;
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::prenorm::Layer;
use super::{add_and_normalize, Bias, CpuKernels, Epilogue, Linear, Norm, Spare};
use crate::backend::fusion::{FusionConfig, FusionNet};
use crate::backend::transformer::FUSION_NAMES;

/// One modality's input side and output norm.
struct Modality {
    proj: Linear,
    typ: Vec<f32>,
    final_ln: Norm,
}

#[derive(Default)]
pub struct Workspace {
    /// Per modality (in the batch's order): its tokens' residual stream, `rows x h`.
    x: Vec<Vec<f32>>,
    normed: Vec<f32>,
    /// Per modality: its tokens' fused q/k/v rows.
    qkv: Vec<Vec<f32>>,
    /// The q/k/v rows gathered item by item (each item's tokens contiguous), and their context.
    items_qkv: Vec<f32>,
    items_ctx: Vec<f32>,
    ctx: Vec<f32>,
    dense: Vec<f32>,
    inner: Vec<f32>,
    bf16: Vec<u16>,
}

pub struct PackedMot {
    modalities: BTreeMap<String, Modality>,
    /// `layers[i][modality]`.
    layers: Vec<BTreeMap<String, Layer>>,
    hidden: usize,
    heads: usize,
    eps: f32,
    /// Tokens per input of each modality (absent: 1).
    tokens: BTreeMap<String, usize>,
    /// One workspace per batch part in flight (see [`Self::pooled_rows`]).
    spare: Spare<Workspace>,
}

/// Items per part below which a batch is not split across threads.
const MIN_ITEMS_PER_PART: usize = 8;

impl PackedMot {
    /// The weights of a `mot-fusion` checkpoint (the names [`crate::backend::fusion::MotEncoder`]
    /// reads), for configs whose MLP activation is exact GELU.
    pub fn load(cfg: &FusionConfig, vb: &VarBuilder, kernels: CpuKernels) -> candle_core::Result<Self> {
        let (h, ffn) = (cfg.hidden_size, cfg.intermediate_size);
        let mut modalities = BTreeMap::new();
        for (m, &dim) in &cfg.modalities {
            modalities.insert(
                m.clone(),
                Modality {
                    proj: Linear::load(&vb.pp(format!("proj.{m}")), h, dim, Bias::Required, kernels)?,
                    typ: vb.get(h, &format!("type.{m}"))?.to_vec1()?,
                    final_ln: Norm::load(&vb.pp(format!("final_ln.{m}")), h)?,
                },
            );
        }
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let mut experts = BTreeMap::new();
            for m in cfg.modalities.keys() {
                // Biases required, as `candle_nn::linear` in MotEncoder reads them.
                let p = vb.pp(format!("layers.{i}.{m}"));
                let expert = Layer::load(&p, &FUSION_NAMES, h, ffn, Bias::Required, kernels)?;
                experts.insert(m.clone(), expert);
            }
            layers.push(experts);
        }
        Ok(Self {
            modalities,
            layers,
            hidden: h,
            heads: cfg.num_heads,
            eps: cfg.layer_norm_eps as f32,
            tokens: cfg.tokens.clone(),
            spare: Spare::default(),
        })
    }

    /// Pooled vectors (before L2) of `b` items; `inputs[k]` = (modality, its `b` rows of
    /// `tokens · dim` values, item-major).
    ///
    /// The matmuls of a fusion batch are small (32 items x 3 tokens x 128 wide): splitting each
    /// one across threads cost more in wake-ups than it saved (~40% of the time in the
    /// scheduler). So the batch is cut into one part per thread, each run whole on one thread.
    pub fn pooled_rows(&self, inputs: &[(&str, &[f32])], b: usize) -> candle_core::Result<Vec<f32>> {
        let parts = super::batch_parts(b, MIN_ITEMS_PER_PART);
        let per_part = b.div_ceil(parts);
        let ranges: Vec<(usize, usize)> = (0..b).step_by(per_part.max(1)).map(|i| (i, (i + per_part).min(b))).collect();
        let run = |&(i0, i1): &(usize, usize)| -> candle_core::Result<Vec<f32>> {
            let part: Vec<(&str, &[f32])> = inputs
                .iter()
                .map(|(m, rows)| {
                    let per = rows.len().checked_div(b).unwrap_or(0);
                    (*m, &rows[i0 * per..i1 * per])
                })
                .collect();
            self.spare.with(|ws| self.forward_part(&part, i1 - i0, ws))
        };
        if ranges.len() <= 1 {
            return run(&(0, b));
        }
        let outs = ranges.par_iter().map(run).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(outs.concat())
    }

    fn forward_part(&self, inputs: &[(&str, &[f32])], b: usize, ws: &mut Workspace) -> candle_core::Result<Vec<f32>> {
        let h = self.hidden;
        let mut mods = Vec::with_capacity(inputs.len());
        for (m, rows) in inputs {
            let Some(modality) = self.modalities.get(*m) else { candle_core::bail!("no weights for modality {m}") };
            let t = self.tokens.get(*m).copied().unwrap_or(1);
            let dim = modality.proj.in_dim();
            if rows.len() != b * t * dim {
                candle_core::bail!("{m}: {} values are not {b} items of {t} tokens of {dim}", rows.len());
            }
            mods.push((*m, modality, t));
        }
        let per_item: usize = mods.iter().map(|(_, _, t)| t).sum();
        ws.x.resize_with(mods.len(), Vec::new);
        ws.qkv.resize_with(mods.len(), Vec::new);
        // Tokens: each modality's rows through its projection, plus its type embedding.
        for (k, ((_, modality, t), (_, rows))) in mods.iter().zip(inputs).enumerate() {
            modality.proj.forward_into(rows, b * t, Epilogue::Bias, &mut ws.bf16, &mut ws.x[k]);
            ws.x[k].truncate(b * t * h);
            for row in ws.x[k].chunks_exact_mut(h) {
                row.iter_mut().zip(&modality.typ).for_each(|(a, b)| *a += *b);
            }
        }
        let offsets: Vec<usize> = (0..=b).map(|i| i * per_item).collect();
        for layer in &self.layers {
            let experts = mods
                .iter()
                .map(|(m, _, _)| {
                    layer.get(*m).ok_or_else(|| candle_core::Error::Msg(format!("no weights for modality {m}")))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            for (k, (expert, (_, _, t))) in experts.iter().zip(&mods).enumerate() {
                add_and_normalize(&mut ws.x[k], &[], &expert.ln1, self.eps, &mut ws.normed);
                expert.qkv.forward_into(&ws.normed, b * t, Epilogue::Bias, &mut ws.bf16, &mut ws.qkv[k]);
            }
            // Each item's tokens side by side (modality order), for one attention over them all.
            ws.items_qkv.clear();
            for i in 0..b {
                for (k, (_, _, t)) in mods.iter().enumerate() {
                    ws.items_qkv.extend_from_slice(&ws.qkv[k][i * t * 3 * h..(i + 1) * t * 3 * h]);
                }
            }
            super::self_attention(&ws.items_qkv, &offsets, h, self.heads, usize::MAX, &mut ws.items_ctx);
            let mut row = 0;
            for (k, (expert, (_, _, t))) in experts.iter().zip(&mods).enumerate() {
                ws.ctx.clear();
                for i in 0..b {
                    let start = i * per_item + row;
                    ws.ctx.extend_from_slice(&ws.items_ctx[start * h..(start + t) * h]);
                }
                row += t;
                expert.out.forward_into(&ws.ctx, b * t, Epilogue::Bias, &mut ws.bf16, &mut ws.dense);
                add_and_normalize(&mut ws.x[k], &ws.dense, &expert.ln2, self.eps, &mut ws.normed);
                expert.up.forward_into(&ws.normed, b * t, Epilogue::BiasGelu, &mut ws.bf16, &mut ws.inner);
                expert.down.forward_into(&ws.inner, b * t, Epilogue::Bias, &mut ws.bf16, &mut ws.dense);
                add(&mut ws.x[k], &ws.dense);
            }
        }
        // The mean over each item's tokens of their modality's final LayerNorm.
        let mut pooled = vec![0f32; b * h];
        for (k, (_, modality, t)) in mods.iter().enumerate() {
            add_and_normalize(&mut ws.x[k], &[], &modality.final_ln, self.eps, &mut ws.normed);
            for (r, row) in ws.normed.chunks_exact(h).enumerate() {
                pooled[(r / t) * h..][..h].iter_mut().zip(row).for_each(|(a, b)| *a += *b);
            }
        }
        let inv = 1.0 / per_item as f32;
        pooled.iter_mut().for_each(|v| *v *= inv);
        Ok(pooled)
    }
}

/// `x += delta` over `x`'s length (`delta` may carry padding rows after it).
fn add(x: &mut [f32], delta: &[f32]) {
    x.iter_mut().zip(delta).for_each(|(a, b)| *a += *b);
}

impl FusionNet for PackedMot {
    fn pooled(&self, inputs: &[(&str, Tensor)]) -> candle_core::Result<Tensor> {
        let b = inputs.first().map(|(_, x)| x.dim(0)).transpose()?.unwrap_or(0);
        let rows = inputs
            .iter()
            .map(|(m, x)| Ok((*m, x.flatten_all()?.to_vec1::<f32>()?)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let views: Vec<(&str, &[f32])> = rows.iter().map(|(m, v)| (*m, v.as_slice())).collect();
        let device = inputs.first().map(|(_, x)| x.device().clone()).unwrap_or(candle_core::Device::Cpu);
        Tensor::from_vec(self.pooled_rows(&views, b)?, (b, self.hidden), &device)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    use super::*;
    use crate::backend::fusion::{trainable, MotEncoder};

    /// The packed MoT against the candle MoT (what training runs) on the same random weights: a
    /// batch large enough to be cut into parts, a modality of 3 tokens, and a subset of the
    /// modalities (a missing one is a missing token).
    #[test]
    fn packed_mot_matches_the_candle_network() {
        let cfg: FusionConfig = serde_json::from_value(serde_json::json!({
            "architecture": "mot-fusion", "hidden_size": 32, "num_heads": 4, "num_layers": 2,
            "intermediate_size": 64, "modalities": {"audio": 24, "text": 16, "vision": 8},
            "tokens": {"vision": 3}
        }))
        .expect("config");
        let varmap = VarMap::new();
        let candle = trainable(&cfg, &varmap, &Device::Cpu).expect("candle network");
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        for kernels in [CpuKernels::F32, CpuKernels::Auto] {
            let packed = PackedMot::load(&cfg, &vb, kernels).expect("packed");
            for mods in [vec![("audio", 24), ("text", 16), ("vision", 24)], vec![("text", 16), ("vision", 24)]] {
                let b = 37;
                let inputs: Vec<(&str, Tensor)> = mods
                    .iter()
                    .map(|(m, len)| (*m, Tensor::randn(0f32, 1.0, (b, *len), &Device::Cpu).expect("input")))
                    .collect();
                let want: Vec<f32> = candle.pooled(&inputs).and_then(|t| t.flatten_all()?.to_vec1()).expect("candle");
                let got: Vec<f32> = packed.pooled(&inputs).and_then(|t| t.flatten_all()?.to_vec1()).expect("packed");
                assert_eq!(got.len(), want.len());
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst < 1e-3, "{kernels:?} {mods:?}: packed MoT differs from candle's by {worst}");
            }
        }
        // A checkpoint the candle MoT refuses (an expert without its bias) is refused here too,
        // not served with a zero bias.
        let mut tensors: std::collections::HashMap<String, Tensor> =
            varmap.data().lock().expect("varmap").iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        tensors.remove("layers.1.text.attn.o.bias").expect("the expert's bias exists");
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        assert!(MotEncoder::new(&cfg, &vb).is_err(), "candle's MoT needs every bias");
        assert!(PackedMot::load(&cfg, &vb, CpuKernels::F32).is_err(), "a missing MoT bias must be a load error");
    }
}
