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
pub mod simd;

/// Which matmul kernels the packed CPU path uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuKernels {
    /// AMX bf16 tiles when available (Sapphire Rapids and later, Linux >= 5.16), otherwise f32.
    Auto,
    /// f32 gemm only (exact f32 products; what a CPU without AMX runs).
    F32,
    /// candle's stock BERT (padded batches): kept to compare against and for GPU devices.
    Candle,
}

impl CpuKernels {
    /// `PRISM_CPU_KERNELS=auto|f32|candle` (default auto): a diagnostic switch to compare kernels
    /// on one machine without rebuilding.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var("PRISM_CPU_KERNELS").as_deref() {
            Err(_) | Ok("") | Ok("auto") => Ok(CpuKernels::Auto),
            Ok("f32") => Ok(CpuKernels::F32),
            Ok("candle") => Ok(CpuKernels::Candle),
            Ok(other) => Err(format!("PRISM_CPU_KERNELS={other:?}: expected auto, f32 or candle")),
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
    /// `Wᵀ`, `[in, out]` row-major.
    F32(Vec<f32>),
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
        } else {
            // Stored transposed (`[in, out]`, output columns contiguous): `gemm` then reads it in
            // place instead of re-packing all the weights on every call, which was ~60% of a
            // small batch's time.
            let mut transposed = vec![0f32; weight.len()];
            for (o, row) in weight.chunks_exact(in_dim).enumerate() {
                for (i, &v) in row.iter().enumerate() {
                    transposed[i * out_dim + o] = v;
                }
            }
            Weights::F32(transposed)
        };
        Linear { out_dim, in_dim, bias, weights }
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
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
            Weights::F32(w) => {
                out.clear();
                for _ in 0..rows {
                    out.extend_from_slice(&self.bias);
                }
                if rows > 0 {
                    let threads = rayon::current_num_threads();
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
