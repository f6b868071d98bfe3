//! Intel AMX bf16 matmul: `y = x Wᵀ + b` on the tile unit (TDPBF16PS, f32 accumulation).
//!
//! One TDPBF16PS multiplies a 16x32 bf16 tile by a 32x16 bf16 tile into 16x16 f32: 16k FLOPs per
//! instruction, ~16x what AVX-512 f32 FMAs do per cycle. Weights are packed once at load time into
//! the tile layout (pairs of consecutive `k` interleaved per output column); activations are
//! rounded to bf16 per call. Written with `asm!` because Rust's AMX intrinsics are not stable;
//! the instructions are only reached after [`available`] has checked CPUID and Linux granted the
//! process the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`).

use rayon::prelude::*;

use super::{simd, Epilogue};

/// Output columns per tile and reduction depth per tile (bf16 pairs x 16).
const TILE_N: usize = 16;
const TILE_K: usize = 32;
/// A task's block: 32 rows (two A tiles) x 32 columns (two B tiles), four accumulators.
const BLOCK_M: usize = 32;
const BLOCK_N: usize = 32;
/// One rayon task: up to 128 rows x 128 columns (4 x 4 blocks).
const TASK_M: usize = 128;
const TASK_N: usize = 128;

/// Whether this CPU and kernel let the process use AMX bf16 tiles (checked once).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(detect)
}

/// Shapes the tile kernel covers without a remainder path.
pub fn fits(out_dim: usize, in_dim: usize) -> bool {
    out_dim.is_multiple_of(BLOCK_N) && in_dim.is_multiple_of(TILE_K) && out_dim > 0 && in_dim > 0
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid_count;
    if __cpuid_count(0, 0).eax < 7 {
        return false;
    }
    let leaf7 = __cpuid_count(7, 0);
    let (amx_bf16, amx_tile) = (leaf7.edx & (1 << 22) != 0, leaf7.edx & (1 << 24) != 0);
    if !(amx_bf16 && amx_tile) {
        return false;
    }
    // Linux keeps the 8 KiB tile state disabled until a process asks for it.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // Safety: a plain syscall with integer arguments.
    let granted = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0;
    if !granted {
        tracing::info!("CPU has AMX but the kernel refused the tile state; using f32 matmuls");
    }
    granted
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// `W` (`[out, in]`, f32) rounded to bf16 and laid out as B tiles: for each 16-column strip and each
/// 32-deep slice, 16 rows of (column, k-pair) = 512 bf16, contiguous.
pub struct PackedWeights {
    out_dim: usize,
    in_dim: usize,
    data: Vec<u16>,
}

impl PackedWeights {
    pub fn pack(w: &[f32], out_dim: usize, in_dim: usize) -> Self {
        let mut bf = vec![0u16; w.len()];
        simd::to_bf16(w, &mut bf);
        let k_tiles = in_dim / TILE_K;
        let mut data = vec![0u16; w.len()];
        for col in 0..out_dim {
            let (strip, c) = (col / TILE_N, col % TILE_N);
            for k in 0..in_dim {
                let (slice, kk) = (k / TILE_K, k % TILE_K);
                let tile = (strip * k_tiles + slice) * TILE_N * TILE_K;
                data[tile + (kk / 2) * 2 * TILE_N + c * 2 + kk % 2] = bf[col * in_dim + k];
            }
        }
        PackedWeights { out_dim, in_dim, data }
    }
}

/// All 8 tiles 16 rows x 64 bytes: C0..C3 accumulators, A0/A1 activations, B0/B1 weights.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

static TILE_CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// Raw pointers of one call, shared by its tasks (each writes a disjoint block of `out`).
#[derive(Clone, Copy)]
struct Shared {
    a: *const u16,
    b: *const u16,
    out: *mut f32,
}
// Safety: tasks only read `a`/`b` and write disjoint output blocks.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// `out = x Wᵀ + bias` (then the epilogue) for `rows` rows of `x`. `out` gets `rows` rounded up to
/// 32 rows; the extra rows are padding. `a` is scratch for the bf16 copy of `x`.
pub fn linear_into(
    w: &PackedWeights,
    x: &[f32],
    rows: usize,
    bias: &[f32],
    epilogue: Epilogue,
    a: &mut Vec<u16>,
    out: &mut Vec<f32>,
) {
    let (n, k) = (w.out_dim, w.in_dim);
    let m_pad = rows.div_ceil(BLOCK_M) * BLOCK_M;
    // Padding rows keep whatever an earlier call left (finite bf16 values): rows are independent,
    // so they only affect padding rows of `out`.
    a.resize(m_pad * k, 0);
    out.resize(m_pad * n, 0.0);
    a[..rows * k].par_chunks_mut(k * 16).zip(x[..rows * k].par_chunks(k * 16)).for_each(|(d, s)| simd::to_bf16(s, d));
    let shared = Shared { a: a.as_ptr(), b: w.data.as_ptr(), out: out.as_mut_ptr() };
    let (m_tasks, n_tasks) = (m_pad.div_ceil(TASK_M), n.div_ceil(TASK_N));
    (0..m_tasks * n_tasks).into_par_iter().for_each(|t| {
        let (m0, n0) = ((t / n_tasks) * TASK_M, (t % n_tasks) * TASK_N);
        let (m1, n1) = ((m0 + TASK_M).min(m_pad), (n0 + TASK_N).min(n));
        // Safety: available() was true when these weights were packed (Linear::new), the buffers
        // hold m_pad x k, (n/16 * k/32 tiles) and m_pad x n elements, and rows m0..m1 x columns
        // n0..n1 are written by this task only.
        unsafe { block(shared, k, n, m0, m1, n0, n1) };
        for r in m0..m1.min(rows) {
            // Safety: as above, this task's own rows and columns.
            let row = unsafe { std::slice::from_raw_parts_mut(shared.out.add(r * n + n0), n1 - n0) };
            simd::bias_act(row, &bias[n0..n1], epilogue == Epilogue::BiasGelu);
        }
    });
}

/// Rows `m0..m1`, columns `n0..n1` of `out = A Bᵀ` (no bias), on the tile unit. Columns outer,
/// rows inner: one 32-column strip of weights (24-96 KiB) stays in L1/L2 while every row block
/// of the task passes over it.
#[cfg(target_arch = "x86_64")]
unsafe fn block(s: Shared, k: usize, n: usize, m0: usize, m1: usize, n0: usize, n1: usize) {
    use std::arch::asm;
    let k_tiles = k / TILE_K;
    let lda = k * 2; // bytes between A rows
    let ldc = n * 4; // bytes between output rows
    asm!("ldtilecfg [{}]", in(reg) &TILE_CONFIG, options(nostack, readonly));
    let mut col = n0;
    while col < n1 {
        let strip = col / TILE_N;
        let b0 = s.b.add(strip * k_tiles * TILE_N * TILE_K);
        let b1 = s.b.add((strip + 1) * k_tiles * TILE_N * TILE_K);
        let mut m = m0;
        while m < m1 {
            let a0 = s.a.add(m * k);
            let a1 = s.a.add((m + 16) * k);
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            for kt in 0..k_tiles {
                asm!(
                    "tileloadd tmm4, [{a0} + {lda}*1]",
                    "tileloadd tmm6, [{b0} + {ldb}*1]",
                    "tileloadd tmm7, [{b1} + {ldb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm5, [{a1} + {lda}*1]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0.add(kt * TILE_K),
                    a1 = in(reg) a1.add(kt * TILE_K),
                    b0 = in(reg) b0.add(kt * TILE_N * TILE_K),
                    b1 = in(reg) b1.add(kt * TILE_N * TILE_K),
                    lda = in(reg) lda,
                    ldb = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
            let c = s.out.add(m * n + col);
            asm!(
                "tilestored [{c00} + {ldc}*1], tmm0",
                "tilestored [{c01} + {ldc}*1], tmm1",
                "tilestored [{c10} + {ldc}*1], tmm2",
                "tilestored [{c11} + {ldc}*1], tmm3",
                c00 = in(reg) c,
                c01 = in(reg) c.add(TILE_N),
                c10 = in(reg) c.add(16 * n),
                c11 = in(reg) c.add(16 * n + TILE_N),
                ldc = in(reg) ldc,
                options(nostack),
            );
            m += BLOCK_M;
        }
        col += BLOCK_N;
    }
    asm!("tilerelease", options(nostack, nomem));
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn block(_: Shared, _: usize, _: usize, _: usize, _: usize, _: usize, _: usize) {
    unreachable!("AMX is x86_64 only; available() is false elsewhere")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_matmul_matches_f64_on_bf16_operands() {
        if !available() {
            eprintln!("no AMX on this machine: the tile kernel is not exercised here");
            return;
        }
        let (rows, n, k) = (150, 160, 64); // several tasks each way, and 150 rows: padding rows
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0).collect();
        let x: Vec<f32> = (0..rows * k).map(|i| ((i * 17 % 89) as f32 - 44.0) / 40.0).collect();
        let bias: Vec<f32> = (0..n).map(|i| i as f32 / 10.0).collect();
        let mut y = Vec::new();
        linear_into(&PackedWeights::pack(&w, n, k), &x, rows, &bias, Epilogue::Bias, &mut Vec::new(), &mut y);
        let bf = |v: f32| {
            let mut o = [0u16];
            simd::to_bf16(&[v], &mut o);
            f32::from_bits((o[0] as u32) << 16) as f64
        };
        for r in 0..rows {
            for c in 0..n {
                let want: f64 = (0..k).map(|i| bf(x[r * k + i]) * bf(w[c * k + i])).sum::<f64>() + bias[c] as f64;
                let got = y[r * n + c] as f64;
                assert!((got - want).abs() < 1e-3, "y[{r}][{c}] = {got}, want {want}");
            }
        }
    }
}
