//! Pre-norm transformer blocks (ViT, whisper's encoder) on CPU over a packed batch: the same
//! treatment as the packed BERT ([`super::bert`]) for the shared core of the other modalities.
//! All tokens of a batch are rows of one matrix, so each dense layer is one matmul over the whole
//! batch (AMX bf16 tiles or f32 gemm, see [`Linear`]), GELU runs in the matmul's epilogue,
//! attention runs per (sequence, block of queries) on exactly its own tokens, and the buffers
//! are kept between batches.
//!
//! Block: x += o(attn(LN1(x))); x += fc2(gelu(fc1(LN2(x)))) — what
//! [`crate::backend::transformer::Block`] computes with candle (a test checks they agree).

use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::{add_and_normalize, dense_weights, Bias, CpuKernels, Epilogue, Linear, Norm};
use crate::backend::transformer::BlockNames;

/// One pre-norm block's weights (also one modality's expert in a MoT layer, [`super::mot`]).
pub(super) struct Layer {
    pub ln1: Norm,
    /// Query, key and value projections fused into one `[3d, d]` matmul.
    pub qkv: Linear,
    pub out: Linear,
    pub ln2: Norm,
    pub up: Linear,
    pub down: Linear,
}

impl Layer {
    /// Reads the block at `vb` (its prefix) under `names`; `bias` says whether a missing bias is
    /// zero or an error (see [`Bias`]).
    pub(super) fn load(
        vb: &VarBuilder,
        names: &BlockNames,
        d: usize,
        ffn: usize,
        bias: Bias,
        kernels: CpuKernels,
    ) -> candle_core::Result<Self> {
        let (mut w, mut b) = (Vec::with_capacity(3 * d * d), Vec::with_capacity(3 * d));
        for part in [names.q, names.k, names.v] {
            let (pw, pb) = dense_weights(&vb.pp(part), d, d, bias)?;
            w.extend(pw);
            b.extend(pb);
        }
        Ok(Layer {
            ln1: Norm::load(&vb.pp(names.ln1), d)?,
            qkv: Linear::new(w, b, 3 * d, d, kernels),
            out: Linear::load(&vb.pp(names.o), d, d, bias, kernels)?,
            ln2: Norm::load(&vb.pp(names.ln2), d)?,
            up: Linear::load(&vb.pp(names.fc1), ffn, d, bias, kernels)?,
            down: Linear::load(&vb.pp(names.fc2), d, ffn, bias, kernels)?,
        })
    }
}

/// Buffers of one forward pass, reused across batches (see [`super::bert::Workspace`]).
#[derive(Default)]
pub struct Workspace {
    normed: Vec<f32>,
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    dense: Vec<f32>,
    inner: Vec<f32>,
    bf16: Vec<u16>,
}

/// The layers of a pre-norm encoder with exact (erf) GELU MLPs.
pub struct PackedPreNorm {
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    eps: f32,
    /// Sliding-window attention radius; `usize::MAX` is full attention.
    radius: usize,
}

/// The shape of the encoder to load.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub hidden: usize,
    pub heads: usize,
    pub ffn: usize,
    pub eps: f64,
}

impl PackedPreNorm {
    /// Reads each layer from `layers[i]` (a VarBuilder at the layer's prefix) under `names`.
    pub fn load(
        layers: &[VarBuilder],
        names: &BlockNames,
        shape: Shape,
        radius: Option<usize>,
        kernels: CpuKernels,
    ) -> candle_core::Result<Self> {
        let Shape { hidden: d, heads, ffn, eps } = shape;
        if heads == 0 || !d.is_multiple_of(heads) {
            candle_core::bail!("hidden size {d} is not divisible by {heads} heads");
        }
        // Biases as candle's `transformer::linear` reads them: whisper's k_proj has none.
        let layers = layers
            .iter()
            .map(|vb| Layer::load(vb, names, d, ffn, Bias::ZeroIfAbsent, kernels))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { layers, hidden: d, heads, eps: eps as f32, radius: radius.unwrap_or(usize::MAX) })
    }

    pub fn uses_amx(&self) -> bool {
        self.layers.first().is_some_and(|l| l.qkv.uses_amx())
    }

    /// Runs every layer over `x` in place: rows of `hidden`, sequence `s` on rows
    /// `offsets[s]..offsets[s + 1]`.
    pub fn forward(&self, x: &mut [f32], offsets: &[usize], ws: &mut Workspace) {
        let tokens = offsets.last().copied().unwrap_or(0);
        let h = self.hidden;
        debug_assert_eq!(x.len(), tokens * h);
        for (i, layer) in self.layers.iter().enumerate() {
            // The previous layer's MLP output joins the residual stream here, in the same pass
            // over the rows as this layer's first LayerNorm.
            let pending = if i == 0 { &[][..] } else { &ws.dense[..tokens * h] };
            add_and_normalize(x, pending, &layer.ln1, self.eps, &mut ws.normed);
            layer.qkv.forward_into(&ws.normed, tokens, Epilogue::Bias, &mut ws.bf16, &mut ws.qkv);
            super::self_attention(&ws.qkv, offsets, h, self.heads, self.radius, &mut ws.ctx);
            layer.out.forward_into(&ws.ctx, tokens, Epilogue::Bias, &mut ws.bf16, &mut ws.dense);
            add_and_normalize(x, &ws.dense[..tokens * h], &layer.ln2, self.eps, &mut ws.normed);
            layer.up.forward_into(&ws.normed, tokens, Epilogue::BiasGelu, &mut ws.bf16, &mut ws.inner);
            layer.down.forward_into(&ws.inner, tokens, Epilogue::Bias, &mut ws.bf16, &mut ws.dense);
        }
        if !self.layers.is_empty() {
            x.par_chunks_mut(h * 16).zip(ws.dense[..tokens * h].par_chunks(h * 16)).for_each(|(xs, ds)| {
                xs.iter_mut().zip(ds).for_each(|(a, b)| *a += *b);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::backend::transformer::{Act, Block, WHISPER_NAMES};

    /// Random weights for `layers` whisper-named blocks (k_proj without a bias, as whisper's).
    fn weights(layers: usize, d: usize, ffn: usize) -> HashMap<String, Tensor> {
        let mut t = HashMap::new();
        let mut put = |name: String, shape: &[usize], mean: f64| {
            let v = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).expect("randn");
            let v = ((v * (0.5 / (shape[shape.len() - 1] as f64).sqrt())).expect("scale") + mean).expect("shift");
            t.insert(name, v);
        };
        let n = &WHISPER_NAMES;
        for i in 0..layers {
            for (part, out, inp) in
                [(n.q, d, d), (n.k, d, d), (n.v, d, d), (n.o, d, d), (n.fc1, ffn, d), (n.fc2, d, ffn)]
            {
                put(format!("l.{i}.{part}.weight"), &[out, inp], 0.0);
                if part != n.k {
                    put(format!("l.{i}.{part}.bias"), &[out], 0.0);
                }
            }
            for ln in [n.ln1, n.ln2] {
                put(format!("l.{i}.{ln}.weight"), &[d], 1.0);
                put(format!("l.{i}.{ln}.bias"), &[d], 0.0);
            }
        }
        t
    }

    /// The packed stack over sequences of different lengths, packed back to back, against candle's
    /// blocks run on each sequence alone: same function, and no sequence sees another's tokens.
    /// Lengths cover the per-query kernel (5, 40) and the gemm attention (150, 300), and a band.
    #[test]
    fn packed_blocks_match_candle_blocks_per_sequence() {
        let (layers, d, heads, ffn) = (2, 64, 4, 128);
        let vb = VarBuilder::from_tensors(weights(layers, d, ffn), DType::F32, &Device::Cpu);
        let per_layer: Vec<VarBuilder> = (0..layers).map(|i| vb.pp(format!("l.{i}"))).collect();
        let shape = Shape { hidden: d, heads, ffn, eps: 1e-5 };
        let lens = [5usize, 150, 40, 300];
        for radius in [None, Some(7)] {
            let candle: Vec<Block> = per_layer
                .iter()
                .map(|vb| {
                    let mut b = Block::load(d, heads, ffn, 1e-5, Act::Gelu, &WHISPER_NAMES, vb.clone()).expect("block");
                    b.attn.radius = radius;
                    b
                })
                .collect();
            let inputs: Vec<Tensor> =
                lens.iter().map(|&n| Tensor::randn(0f32, 1.0, (1, n, d), &Device::Cpu).expect("x")).collect();
            let want: Vec<Vec<f32>> = inputs
                .iter()
                .map(|x| {
                    let y = candle.iter().try_fold(x.clone(), |x, b| b.forward(&x, None)).expect("candle");
                    y.flatten_all().and_then(|y| y.to_vec1()).expect("vec")
                })
                .collect();
            for kernels in [CpuKernels::F32, CpuKernels::Auto] {
                let packed = PackedPreNorm::load(&per_layer, &WHISPER_NAMES, shape, radius, kernels).expect("packed");
                let mut x: Vec<f32> =
                    inputs.iter().flat_map(|t| t.flatten_all().and_then(|t| t.to_vec1()).expect("vec")).collect();
                let mut offsets = vec![0];
                for n in lens {
                    offsets.push(offsets[offsets.len() - 1] + n);
                }
                packed.forward(&mut x, &offsets, &mut Workspace::default());
                // bf16 operands (AMX) round each product's inputs to 8 bits of mantissa.
                let tol = if packed.uses_amx() { 0.05 } else { 2e-3 };
                for (s, w) in want.iter().enumerate() {
                    let got = &x[offsets[s] * d..offsets[s + 1] * d];
                    let worst = got.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                    assert!(
                        worst < tol,
                        "{kernels:?} radius {radius:?}: sequence of {} tokens differs from candle by {worst}",
                        lens[s]
                    );
                }
            }
        }
    }
}
