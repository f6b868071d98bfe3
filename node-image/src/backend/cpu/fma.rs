//! f32 dense layers on AVX-512 FMAs with the weights packed once at load: the path of CPUs
//! without AMX (Zen 4, or Xeons whose kernel or hypervisor hides the tile unit).
//!
//! `gemm`'s kernels re-pack their operands on every call and split each call across threads in
//! small steps; for the few dozen rows of a single sentence that kept the text node at ~75
//! GFLOP/s on 2 cores (half of OpenVINO's batch-1 rate). Here the weights sit in 32-column
//! panels (`k` rows of 32 floats), each task computes 8 rows x 32 columns in 16 registers
//! over the whole `k`, with the bias as the accumulators' start, so a call is one pass over the
//! panels with no packing at all.

use std::ops::Range;

use rayon::prelude::*;

use super::{simd, Epilogue};

/// Output columns per panel: two AVX-512 vectors.
const NR: usize = 32;
/// Rows per register tile.
const MR: usize = 8;
/// Rows per task: a task's rows (x) stay in L2 while its panels pass over them.
const TASK_ROWS: usize = 64;
/// Panels per task, at most.
const TASK_PANELS: usize = 4;
/// Inputs per block of k: 256 x 32 floats of a panel (32 KiB) fit L1.
const KC: usize = 256;

/// Whether this CPU runs these kernels.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `W` (`[out, in]`) as `ceil(out / 32)` panels of `in x 32` floats (zero columns past `out`).
pub struct PackedWeights {
    data: Vec<f32>,
    out_dim: usize,
    in_dim: usize,
    /// The bias padded to whole panels.
    bias: Vec<f32>,
}

impl PackedWeights {
    pub fn pack(weight: &[f32], bias: &[f32], out_dim: usize, in_dim: usize) -> Self {
        let panels = out_dim.div_ceil(NR);
        let mut data = vec![0f32; panels * in_dim * NR];
        for (o, row) in weight.chunks_exact(in_dim).enumerate() {
            let (p, c) = (o / NR, o % NR);
            for (i, &v) in row.iter().enumerate() {
                data[(p * in_dim + i) * NR + c] = v;
            }
        }
        let mut padded = bias.to_vec();
        padded.resize(panels * NR, 0.0);
        PackedWeights { data, out_dim, in_dim, bias: padded }
    }
}

/// Raw pointers of one call, shared by its tasks (each writes a disjoint block of `out`).
#[derive(Clone, Copy)]
struct Shared {
    x: *const f32,
    out: *mut f32,
}
// Safety: tasks only read `x` and write disjoint blocks of `out`.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// `out = x Wᵀ + b` (then the epilogue) for `rows` rows of `x`; `out` gets exactly `rows` rows.
/// Must only be called where [`available`] is true (`Linear::new` checks it).
pub fn linear_into(w: &PackedWeights, x: &[f32], rows: usize, epilogue: Epilogue, out: &mut Vec<f32>) {
    let (n, k) = (w.out_dim, w.in_dim);
    assert!(x.len() >= rows * k, "input shorter than rows x in_dim");
    out.resize(rows * n, 0.0);
    let panels = n.div_ceil(NR);
    let m_tasks = rows.div_ceil(TASK_ROWS);
    // Few rows (one sentence): narrower tasks, at least 4 per thread, so the threads finish
    // together instead of one waiting on a last wide task.
    let want = (4 * rayon::current_num_threads()).div_ceil(m_tasks.max(1));
    let per_task = (panels / want.max(1)).clamp(1, TASK_PANELS);
    let n_tasks = panels.div_ceil(per_task);
    let shared = Shared { x: x.as_ptr(), out: out.as_mut_ptr() };
    let task = |t: usize| {
        let (m0, p0) = ((t / n_tasks) * TASK_ROWS, (t % n_tasks) * per_task);
        let (m1, p1) = ((m0 + TASK_ROWS).min(rows), (p0 + per_task).min(panels));
        // k in blocks whose panel slice (KC x 32 floats) stays in L1 while the task's row
        // tiles pass over it; later blocks add to what the earlier ones stored.
        for k0 in (0..k).step_by(KC) {
            let k1 = (k0 + KC).min(k);
            for p in p0..p1 {
                let cols = (n - p * NR).min(NR);
                let mut r = m0;
                while r < m1 {
                    let mr = (m1 - r).min(MR);
                    // Safety: rows r..r+mr of x (k each) and of out (n each) exist; the panel
                    // holds k x 32 floats and the bias 32 from p * 32; columns p*32..p*32+cols
                    // of these rows belong to this task alone; available() holds (module
                    // contract).
                    unsafe { tile(shared, w, p, r, mr, cols, k0..k1) };
                    r += mr;
                }
            }
        }
        if epilogue == Epilogue::BiasGelu {
            for r in m0..m1 {
                let (c0, c1) = (p0 * NR, (p1 * NR).min(n));
                // Safety: this task's own rows and columns of out.
                let seg = unsafe { std::slice::from_raw_parts_mut(shared.out.add(r * n + c0), c1 - c0) };
                simd::gelu_inplace(seg);
            }
        }
    };
    // A single task needs no pool; see `inside_parallel_task` for the other case.
    if m_tasks * n_tasks == 1 || super::inside_parallel_task() {
        (0..m_tasks * n_tasks).for_each(task);
    } else {
        (0..m_tasks * n_tasks).into_par_iter().for_each(task);
    }
}

/// Rows `r..r + mr` (mr <= 8) x panel `p` of the output over inputs `ks`, `cols` of its 32
/// columns kept: the bias plus the products for the first block of k, added to what is stored
/// for the others.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile(s: Shared, w: &PackedWeights, p: usize, r: usize, mr: usize, cols: usize, ks: Range<usize>) {
    use std::arch::x86_64::*;
    let (n, k) = (w.out_dim, w.in_dim);
    let panel = w.data.as_ptr().add(p * k * NR);
    let (m0, m1): (__mmask16, __mmask16) = if cols >= NR {
        (0xFFFF, 0xFFFF)
    } else if cols > 16 {
        (0xFFFF, ((1u32 << (cols - 16)) - 1) as u16)
    } else {
        (((1u32 << cols) - 1) as u16, 0)
    };
    let (b0, b1) = (_mm512_loadu_ps(w.bias.as_ptr().add(p * NR)), _mm512_loadu_ps(w.bias.as_ptr().add(p * NR + 16)));
    let x = s.x.add(r * k);
    // One body per row count, indexed by constants only, so the accumulators stay in registers
    // (a loop bound read at run time would put them on the stack).
    macro_rules! run {
        ($rows:literal) => {{
            let mut acc = [[b0, b1]; $rows];
            if ks.start > 0 {
                for (i, a) in acc.iter_mut().enumerate() {
                    let o = s.out.add((r + i) * n + p * NR);
                    *a = [_mm512_maskz_loadu_ps(m0, o), _mm512_maskz_loadu_ps(m1, o.wrapping_add(16))];
                }
            }
            for kk in ks.clone() {
                let w0 = _mm512_loadu_ps(panel.add(kk * NR));
                let w1 = _mm512_loadu_ps(panel.add(kk * NR + 16));
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*x.add(i * k + kk));
                    a[0] = _mm512_fmadd_ps(xv, w0, a[0]);
                    a[1] = _mm512_fmadd_ps(xv, w1, a[1]);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                let o = s.out.add((r + i) * n + p * NR);
                _mm512_mask_storeu_ps(o, m0, a[0]);
                _mm512_mask_storeu_ps(o.wrapping_add(16), m1, a[1]);
            }
        }};
    }
    match mr {
        8 => run!(8),
        7 => run!(7),
        6 => run!(6),
        5 => run!(5),
        4 => run!(4),
        3 => run!(3),
        2 => run!(2),
        _ => run!(1),
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile(_: Shared, _: &PackedWeights, _: usize, _: usize, _: usize, _: usize, _: Range<usize>) {
    unreachable!("fma::available() is false off x86_64")
}
