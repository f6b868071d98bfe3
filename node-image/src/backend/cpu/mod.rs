//! Hand-written CPU inference kernels for the text encoder's hot path.
//!
//! candle's stock BERT on CPU spends a third of its time outside matmuls (scalar erf GELU,
//! transpose copies around attention, padded positions) and runs each layer as one small gemm per
//! sequence. On 2 vCPUs that made prism-node 0.52x the throughput of sentence-transformers
//! (bench/RESULTS.md). This module is the replacement used on CPU devices:
//!
//! * [`Linear`]: `y = x Wᵀ + b` over *all tokens of a batch at once* (no padding: sequences are
//!   packed back to back), on Intel AMX bf16 tiles when the CPU and kernel allow it ([`amx`]),
//!   otherwise on `gemm`'s f32 kernels. bf16 operands with f32 accumulation keep the embeddings
//!   within cosine 0.99997 of the float64 reference (tests/minilm_reference.rs checks >= 0.9999).
//! * [`simd`]: LayerNorm, GELU (vectorised erf), softmax and the per-head attention loops,
//!   compiled for AVX-512 / AVX2 and chosen at run time, so one binary serves every x86 CPU.
//!
//! GPU devices keep candle (its CUDA kernels are the fast path there).

pub mod amx;
pub mod bert;
pub mod fma;
pub mod mot;
pub mod prenorm;
pub mod simd;

use rayon::prelude::*;

/// Which matmul kernels the packed CPU path uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuKernels {
    /// AMX bf16 tiles when available (Sapphire Rapids and later, Linux >= 5.16), otherwise f32.
    Auto,
    /// f32 only (exact f32 products; what a CPU without AMX runs): the AVX-512 FMA panels
    /// ([`fma`]), or `gemm` on CPUs without AVX-512.
    F32,
    /// `gemm`'s f32 kernels whatever the CPU (to compare with the FMA panels).
    Gemm,
    /// candle's stock BERT (padded batches): kept to compare against and for GPU devices.
    Candle,
}

impl CpuKernels {
    /// `PRISM_CPU_KERNELS=auto|f32|gemm|candle` (default auto): a diagnostic switch to compare kernels
    /// on one machine without rebuilding.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("PRISM_CPU_KERNELS").as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(CpuKernels::Auto),
            Ok("f32") => Ok(CpuKernels::F32),
            Ok("gemm") => Ok(CpuKernels::Gemm),
            Ok("candle") => Ok(CpuKernels::Candle),
            Ok(other) => Err(format!("PRISM_CPU_KERNELS={other:?}: expected auto, f32, gemm or candle")),
        }
    }
}

/// A dense layer `y = x Wᵀ + b` with `W` in PyTorch's `[out, in]` layout.
pub struct Linear {
    out_dim: usize,
    in_dim: usize,
    bias: Vec<f32>,
    weights: Weights,
}

enum Weights {
    /// `Wᵀ`, `[in, out]` row-major, for `gemm` (CPUs without AVX-512).
    F32(Vec<f32>),
    /// 32-column panels for the AVX-512 FMA kernels ([`fma`]).
    Fma(fma::PackedWeights),
    Amx(amx::PackedWeights),
}

/// What runs on each output element after the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Epilogue {
    Bias,
    BiasGelu,
}

impl Linear {
    /// `weight` is `[out_dim, in_dim]` row-major. AMX needs both dims to be multiples of 32;
    /// other shapes use f32 whatever `kernels` says.
    pub fn new(weight: Vec<f32>, bias: Vec<f32>, out_dim: usize, in_dim: usize, kernels: CpuKernels) -> Self {
        debug_assert_eq!(weight.len(), out_dim * in_dim);
        debug_assert_eq!(bias.len(), out_dim);
        let weights = if kernels == CpuKernels::Auto && amx::available() && amx::fits(out_dim, in_dim) {
            Weights::Amx(amx::PackedWeights::pack(&weight, out_dim, in_dim))
        } else if kernels != CpuKernels::Gemm && fma::available() {
            Weights::Fma(fma::PackedWeights::pack(&weight, &bias, out_dim, in_dim))
        } else {
            Self::gemm_weights(&weight, out_dim, in_dim)
        };
        Linear { out_dim, in_dim, bias, weights }
    }

    /// `Wᵀ` for `gemm`, whatever the CPU (what CPUs without AVX-512 run; tests compare it).
    fn gemm_weights(weight: &[f32], out_dim: usize, in_dim: usize) -> Weights {
        // Stored transposed (`[in, out]`, output columns contiguous): `gemm` then reads it in
        // place instead of re-packing all the weights on every call, which was ~60% of a small
        // batch's time.
        let mut transposed = vec![0f32; weight.len()];
        for (o, row) in weight.chunks_exact(in_dim).enumerate() {
            for (i, &v) in row.iter().enumerate() {
                transposed[i * out_dim + o] = v;
            }
        }
        Weights::F32(transposed)
    }

    /// The `[out, in]` weight and the bias at `vb` (a layer's prefix), as the candle layer
    /// of the same checkpoint reads them (`bias`).
    pub fn load(
        vb: &candle_nn::VarBuilder,
        out: usize,
        inp: usize,
        bias: Bias,
        kernels: CpuKernels,
    ) -> candle_core::Result<Self> {
        let (w, b) = dense_weights(vb, out, inp, bias)?;
        Ok(Linear::new(w, b, out, inp, kernels))
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    pub fn uses_amx(&self) -> bool {
        matches!(self.weights, Weights::Amx(_))
    }

    /// `out = x Wᵀ + b` (then the epilogue) for `rows` rows of `in_dim` in `x`. `out` gets at
    /// least `rows` rows of `out_dim` (a few padding rows may follow, which callers ignore);
    /// `scratch` holds the bf16 copy of `x` on AMX. Both buffers are reused across calls.
    pub fn forward_into(&self, x: &[f32], rows: usize, epilogue: Epilogue, scratch: &mut Vec<u16>, out: &mut Vec<f32>) {
        let (n, k) = (self.out_dim, self.in_dim);
        debug_assert!(x.len() >= rows * k);
        match &self.weights {
            Weights::Amx(packed) => amx::linear_into(packed, x, rows, &self.bias, epilogue, scratch, out),
            Weights::Fma(packed) => fma::linear_into(packed, x, rows, epilogue, out),
            Weights::F32(w) => {
                out.clear();
                for _ in 0..rows {
                    out.extend_from_slice(&self.bias);
                }
                if rows > 0 {
                    let threads = if inside_parallel_task() { 1 } else { rayon::current_num_threads() };
                    // Safety: out is rows x n, x is rows x k, w is k x n; strides describe exactly
                    // those row-major buffers.
                    unsafe {
                        gemm::gemm(
                            rows,
                            n,
                            k,
                            out.as_mut_ptr(),
                            1,
                            n as isize,
                            true,
                            x.as_ptr(),
                            1,
                            k as isize,
                            w.as_ptr(),
                            1,
                            n as isize,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None },
                        );
                    }
                }
                if epilogue == Epilogue::BiasGelu {
                    simd::gelu_rows(out, n);
                }
            }
        }
    }
}

/// Whether a checkpoint may leave a dense layer's bias out, as the candle code that serves the
/// same architecture elsewhere decides: the packed path accepts exactly what candle accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bias {
    /// `candle_nn::linear`: a missing bias is a load error (MoT fusion).
    Required,
    /// `transformer::linear`: a missing bias is zero (whisper's k_proj).
    ZeroIfAbsent,
}

/// `(weight [out, in] row-major, bias [out])` at `vb`, under the `bias` rule.
pub fn dense_weights(
    vb: &candle_nn::VarBuilder,
    out: usize,
    inp: usize,
    bias: Bias,
) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    let w = vb.get((out, inp), "weight")?.flatten_all()?.to_vec1::<f32>()?;
    let b = if bias == Bias::Required || vb.contains_tensor("bias") {
        vb.get(out, "bias")?.to_vec1::<f32>()?
    } else {
        vec![0.0; out]
    };
    Ok((w, b))
}

/// True inside a rayon task: the caller (a part of a split batch) already keeps every thread
/// busy, so a matmul runs on this thread alone instead of splitting once more.
fn inside_parallel_task() -> bool {
    rayon::current_thread_index().is_some()
}

/// `x += delta` (nothing when `delta` is empty; it may run past `x` with padding rows), then
/// `normed = LayerNorm(x)`, row by row; `normed` is resized to `x`.
pub fn add_and_normalize(x: &mut [f32], delta: &[f32], norm: &Norm, eps: f32, normed: &mut Vec<f32>) {
    let h = norm.gamma.len();
    let rows = 16;
    normed.resize(x.len(), 0.0);
    x.par_chunks_mut(h * rows).zip(normed.par_chunks_mut(h * rows)).enumerate().for_each(|(c, (xs, ns))| {
        let ds = if delta.is_empty() { &[][..] } else { &delta[c * h * rows..][..xs.len()] };
        for (r, (row, out)) in xs.chunks_exact_mut(h).zip(ns.chunks_exact_mut(h)).enumerate() {
            if !ds.is_empty() {
                row.iter_mut().zip(&ds[r * h..][..h]).for_each(|(a, b)| *a += *b);
            }
            out.copy_from_slice(row);
            simd::residual_layer_norm(out, &[], &norm.gamma, &norm.beta, eps);
        }
    });
}

/// Workspaces kept between batches, one per part of a batch in flight on its own thread.
pub struct Spare<W>(std::sync::Mutex<Vec<W>>);

impl<W: Default> Default for Spare<W> {
    fn default() -> Self {
        Spare(std::sync::Mutex::new(Vec::new()))
    }
}

impl<W: Default> Spare<W> {
    /// Runs `f` with a workspace of the pool (a new one when all are in use).
    pub fn with<R>(&self, f: impl FnOnce(&mut W) -> R) -> R {
        // A workspace is scratch: one left behind by a panicking batch is still usable.
        let mut ws = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default();
        let out = f(&mut ws);
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(ws);
        out
    }
}

/// How many parts to cut a batch of `items` into, one per thread, each part at least
/// `min_items` long. Small matmuls split across threads spend more in wake-ups than they
/// save; whole parts on their own threads do not wait for each other.
pub fn batch_parts(items: usize, min_items: usize) -> usize {
    rayon::current_num_threads().min(items / min_items.max(1)).max(1)
}

/// LayerNorm parameters, as f32 rows of the hidden size.
pub struct Norm {
    pub gamma: Vec<f32>,
    pub beta: Vec<f32>,
}

impl Norm {
    /// `weight` and `bias` of `d` values at `vb`.
    pub fn load(vb: &candle_nn::VarBuilder, d: usize) -> candle_core::Result<Self> {
        Ok(Norm { gamma: vb.get(d, "weight")?.to_vec1()?, beta: vb.get(d, "bias")?.to_vec1()? })
    }
}

/// Self-attention over every sequence of a packed batch. `qkv` holds each token's fused
/// `[q | k | v]` row (`3 h` wide); `offsets` each sequence's first row (and the end). Writes the
/// heads of each token side by side into `ctx` (`h` wide). Tasks are (sequence, block of
/// queries), so a single long sequence (a 1500-frame whisper window) still keeps every thread
/// busy, while short ones stay one task each. `radius`: see [`simd::HeadJob::radius`].
pub fn self_attention(qkv: &[f32], offsets: &[usize], h: usize, heads: usize, radius: usize, ctx: &mut Vec<f32>) {
    let tokens = offsets.last().copied().unwrap_or(0);
    let hd = h / heads;
    // Every element of ctx's rows is written below, so it needs no clearing.
    ctx.resize(tokens * h, 0.0);
    // Blocks of at least 64 queries: each block transposes its sequence's keys once more.
    let threads = rayon::current_num_threads();
    let mut tasks = Vec::with_capacity(offsets.len());
    let mut rest = &mut ctx[..tokens * h];
    for w in offsets.windows(2) {
        let (start, n) = (w[0], w[1] - w[0]);
        let block = n.div_ceil(2 * threads).max(64);
        let mut q0 = 0;
        while q0 < n {
            let q1 = (q0 + block).min(n);
            let (this, tail) = rest.split_at_mut((q1 - q0) * h);
            tasks.push((start, n, q0..q1, this));
            rest = tail;
            q0 = q1;
        }
    }
    let scale = 1.0 / (hd as f32).sqrt();
    tasks.into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(kt, scores), (start, n, queries, out)| {
            let seq = &qkv[start * 3 * h..(start + n) * 3 * h];
            if n >= GEMM_ATTENTION_MIN_TOKENS && radius >= n {
                attend_gemm(seq, n, queries, h, heads, scale, scores, out);
                return;
            }
            let narrow = hd < simd::LANES && radius >= n;
            for head in 0..heads {
                let job = simd::HeadJob {
                    qkv: seq,
                    row_stride: 3 * h,
                    n,
                    queries: queries.clone(),
                    q_col: head * hd,
                    k_col: h + head * hd,
                    v_col: 2 * h + head * hd,
                    head_dim: hd,
                    scale,
                    radius,
                };
                if narrow {
                    simd::attend_narrow(&job, kt, &mut out[head * hd..], h);
                } else {
                    simd::attend(&job, kt, scores, &mut out[head * hd..], h);
                }
            }
        },
    );
}

/// From this many tokens, full attention runs as two gemm calls per head ([`attend_gemm`]):
/// [`simd::attend`] streams every key and value once per query, which is fine for a sentence but
/// bound by cache bandwidth on a 1500-frame whisper window (slower than candle there).
const GEMM_ATTENTION_MIN_TOKENS: usize = 128;

/// Full attention of `queries` over the `n` tokens of one sequence (`seq`: its fused qkv rows),
/// as scores = Q Kᵀ · scale, softmax, out = P V per head, each product one cache-blocked gemm
/// reading Q, K and V in place (strided). `out`: the queries' rows of the context, `h` wide.
#[allow(clippy::too_many_arguments)]
fn attend_gemm(
    seq: &[f32],
    n: usize,
    queries: std::ops::Range<usize>,
    h: usize,
    heads: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (m, hd, rs) = (queries.len(), h / heads, 3 * h as isize);
    debug_assert!(seq.len() >= n * 3 * h && out.len() >= m * h);
    scores.clear();
    scores.resize(m * n, 0.0);
    for head in 0..heads {
        let (q, k, v) = (queries.start * 3 * h + head * hd, h + head * hd, 2 * h + head * hd);
        // Safety: every pointer/stride pair below addresses only elements inside its buffer:
        // Q is rows queries of seq at columns q..q+hd, K and V rows 0..n at their columns (seq
        // holds n rows of 3h); scores is m x n; out holds m rows of h, this head's hd columns.
        unsafe {
            // scores (m x n) = Q (m x hd) · Kᵀ (hd x n): Kᵀ is K read with its strides swapped.
            gemm::gemm(
                m,
                n,
                hd,
                scores.as_mut_ptr(),
                1,
                n as isize,
                false,
                seq.as_ptr().add(q),
                1,
                rs,
                seq.as_ptr().add(k),
                rs,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        simd::softmax_rows(scores, n);
        // Safety: as above.
        unsafe {
            // out (m x hd, row stride h) = P (m x n) · V (n x hd).
            gemm::gemm(
                m,
                hd,
                n,
                out.as_mut_ptr().add(head * hd),
                1,
                h as isize,
                false,
                scores.as_ptr(),
                1,
                n as isize,
                seq.as_ptr().add(v),
                1,
                rs,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every f32 dense-layer path this CPU can run (the AVX-512 FMA panels where present, `gemm`
    /// always) against a float64 reference, on shapes that leave partial panels (50 outputs),
    /// partial register tiles (9 and 70 rows) and an input width past one k block (256) and not
    /// a multiple of it, with both epilogues.
    #[test]
    fn f32_linear_paths_match_f64() {
        let (out_dim, in_dim) = (50, 300);
        let weight: Vec<f32> = (0..out_dim * in_dim).map(|i| ((i * 7919) % 97) as f32 / 48.0 - 1.0).collect();
        let bias: Vec<f32> = (0..out_dim).map(|i| i as f32 / 25.0 - 1.0).collect();
        let mut layers = vec![("gemm", Linear::new(weight.clone(), bias.clone(), out_dim, in_dim, CpuKernels::F32))];
        layers[0].1.weights = Linear::gemm_weights(&weight, out_dim, in_dim);
        if fma::available() {
            let l = Linear::new(weight.clone(), bias.clone(), out_dim, in_dim, CpuKernels::F32);
            assert!(matches!(l.weights, Weights::Fma(_)), "AVX-512 CPUs run the FMA panels");
            layers.push(("fma", l));
        }
        for rows in [1usize, 9, 70] {
            let x: Vec<f32> = (0..rows * in_dim).map(|i| ((i * 104_729) % 89) as f32 / 44.0 - 1.0).collect();
            for epilogue in [Epilogue::Bias, Epilogue::BiasGelu] {
                for (name, layer) in &layers {
                    let (mut scratch, mut out) = (Vec::new(), Vec::new());
                    layer.forward_into(&x, rows, epilogue, &mut scratch, &mut out);
                    for r in 0..rows {
                        for o in 0..out_dim {
                            let mut want = bias[o] as f64;
                            for i in 0..in_dim {
                                want += x[r * in_dim + i] as f64 * weight[o * in_dim + i] as f64;
                            }
                            if epilogue == Epilogue::BiasGelu {
                                want = 0.5 * want * (1.0 + candle_core::cpu::erf::erf_f64(want / 2f64.sqrt()));
                            }
                            let got = out[r * out_dim + o] as f64;
                            assert!(
                                (got - want).abs() < 2e-4,
                                "{name} {epilogue:?} rows {rows}: [{r}][{o}] = {got}, want {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
