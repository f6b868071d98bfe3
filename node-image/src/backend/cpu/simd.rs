//! Element-wise and attention kernels of the packed CPU path, written as plain loops that LLVM
//! vectorises, each compiled three times (AVX-512, AVX2+FMA, baseline) and picked at run time by
//! [`multiversion!`]. No libm calls in the hot loops: erf and exp are polynomial approximations
//! (tested against f64 below) because a call per element stops vectorisation.

use rayon::prelude::*;

/// 4 = AVX-512 (F/BW/VL), 3 = AVX2 + FMA, 0 = baseline.
pub fn level() -> u8 {
    use std::sync::atomic::{AtomicU8, Ordering};
    static LEVEL: AtomicU8 = AtomicU8::new(u8::MAX);
    let l = LEVEL.load(Ordering::Relaxed);
    if l != u8::MAX {
        return l;
    }
    let l = detect();
    LEVEL.store(l, Ordering::Relaxed);
    l
}

#[cfg(target_arch = "x86_64")]
fn detect() -> u8 {
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
    {
        4
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        3
    } else {
        0
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> u8 {
    0
}

/// Defines `fn $name(args)`: the body compiled for AVX-512, for AVX2+FMA and for the baseline,
/// dispatched on [`level`].
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) { imp($($arg),*) }
                match level() {
                    // Safety: level() checked that the CPU has these features.
                    4 => return unsafe { v4($($arg),*) },
                    3 => return unsafe { v3($($arg),*) },
                    _ => {}
                }
            }
            imp($($arg),*)
        }
    };
}

pub const LANES: usize = 16;

/// Sum with 16 independent accumulators (an in-order f32 sum cannot be vectorised).
#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// erf for f32, as a rational approximation on [-4, 4] (outside, erf is ±1 in f32).
/// Max abs error ~1e-7 (test below).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_600_1e-3;
    p = x2 * p + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329_3e-3;
    q = x2 * q + -1.426_473_9e-2;
    p / q
}

/// Exact (erf) GELU, BERT's "gelu".
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// e^x for f32: x = n ln2 + r, 2^n from the exponent bits, e^r by its degree-7 Taylor polynomial on
/// |r| <= ln2/2. Relative error ~1e-7 over [-87, 88] (inputs are clamped there).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer in the mantissa
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let n_int = t.to_bits() as i32 - 0x4B40_0000;
    f32::from_bits(((n_int + 127) << 23) as u32) * p
}

multiversion! {
    /// GELU in place.
    pub fn gelu_inplace(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x = gelu(*x);
        }
    }
}

multiversion! {
    /// `row += bias`, then GELU if asked (the epilogue of a matmul block).
    pub fn bias_act(row: &mut [f32], bias: &[f32], gelu_after: bool) {
        for (y, b) in row.iter_mut().zip(bias) {
            *y += *b;
        }
        if gelu_after {
            for y in row.iter_mut() {
                *y = gelu(*y);
            }
        }
    }
}

/// GELU over a row-major buffer of `width`-wide rows, split across the rayon pool.
pub fn gelu_rows(xs: &mut [f32], width: usize) {
    xs.par_chunks_mut(width * 16).for_each(gelu_inplace);
}

multiversion! {
    /// `row = LayerNorm(row + delta) * gamma + beta` (pass an empty `delta` for no residual).
    pub fn residual_layer_norm(row: &mut [f32], delta: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let h = row.len();
        if !delta.is_empty() {
            for (x, d) in row.iter_mut().zip(delta) {
                *x += *d;
            }
        }
        let mean = sum(row) / h as f32;
        for x in row.iter_mut() {
            *x -= mean;
        }
        let mut acc = [0f32; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().map(|x| x * x).sum();
        for c in chunks {
            for i in 0..LANES {
                acc[i] += c[i] * c[i];
            }
        }
        let var = (acc.iter().sum::<f32>() + tail) / h as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for ((x, g), b) in row.iter_mut().zip(gamma).zip(beta) {
            *x = *x * inv * *g + *b;
        }
    }
}

multiversion! {
    /// f32 -> bf16 with round-to-nearest-even (what AMX's operands hold).
    pub fn to_bf16(src: &[f32], dst: &mut [u16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            let u = s.to_bits();
            *d = (u.wrapping_add(0x7FFF + ((u >> 16) & 1)) >> 16) as u16;
        }
    }
}

multiversion! {
    /// Each `width`-long row of `scores` replaced by its softmax.
    pub fn softmax_rows(scores: &mut [f32], width: usize) {
        for row in scores.chunks_exact_mut(width) {
            let mut lane_max = [f32::NEG_INFINITY; LANES];
            let chunks = row.chunks_exact(LANES);
            let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            for c in chunks {
                for l in 0..LANES {
                    lane_max[l] = lane_max[l].max(c[l]);
                }
            }
            let max = lane_max.iter().fold(tail, |m, &x| m.max(x));
            for x in row.iter_mut() {
                *x = exp(*x - max);
            }
            let inv = 1.0 / sum(row);
            for x in row.iter_mut() {
                *x *= inv;
            }
        }
    }
}

multiversion! {
    /// Full attention of one head whose dimensions are fewer than a vector's lanes (ViT-tiny's
    /// 4), vectorised over the queries instead of over keys or dimensions: queries are
    /// transposed once, then each key adds its scores to all queries at once, and the softmax
    /// and the value sums run column-wise, so no step reduces across lanes. [`attend`] on such
    /// heads spent most of its time in per-query horizontal reductions. `buf` is scratch.
    pub fn attend_narrow(job: &HeadJob, buf: &mut Vec<f32>, out: &mut [f32], out_stride: usize) {
        let (n, hd, rs) = (job.n, job.head_dim, job.row_stride);
        let m = job.queries.len();
        let mp = m.div_ceil(LANES) * LANES;
        // buf: queries transposed [hd][mp] | scores [n][mp] | outputs [hd][mp] | max | sum.
        buf.clear();
        buf.resize((2 * hd + n + 2) * mp, 0.0);
        let (qt, rest) = buf.split_at_mut(hd * mp);
        let (st, rest) = rest.split_at_mut(n * mp);
        let (ot, rest) = rest.split_at_mut(hd * mp);
        let (max, sum) = rest.split_at_mut(mp);
        for (r, i) in job.queries.clone().enumerate() {
            let q = &job.qkv[i * rs + job.q_col..][..hd];
            for d in 0..hd {
                qt[d * mp + r] = q[d] * job.scale;
            }
        }
        // 16 queries at a time, each sum kept in a register across its loop.
        max.fill(f32::NEG_INFINITY);
        for j in 0..n {
            let k = &job.qkv[j * rs + job.k_col..][..hd];
            for c in (0..mp).step_by(LANES) {
                let mut acc = [0f32; LANES];
                for d in 0..hd {
                    let (kd, q) = (k[d], &qt[d * mp + c..][..LANES]);
                    for l in 0..LANES {
                        acc[l] += q[l] * kd;
                    }
                }
                let mx = &mut max[c..c + LANES];
                for l in 0..LANES {
                    mx[l] = if acc[l] > mx[l] { acc[l] } else { mx[l] };
                }
                st[j * mp + c..][..LANES].copy_from_slice(&acc);
            }
        }
        for j in 0..n {
            for ((x, mx), z) in st[j * mp..(j + 1) * mp].iter_mut().zip(max.iter()).zip(sum.iter_mut()) {
                *x = exp(*x - *mx);
                *z += *x;
            }
        }
        for c in (0..mp).step_by(LANES) {
            for d in 0..hd {
                let mut acc = [0f32; LANES];
                for j in 0..n {
                    let (vd, p) = (job.qkv[j * rs + job.v_col + d], &st[j * mp + c..][..LANES]);
                    for l in 0..LANES {
                        acc[l] += p[l] * vd;
                    }
                }
                ot[d * mp + c..][..LANES].copy_from_slice(&acc);
            }
        }
        for r in 0..m {
            let inv = 1.0 / sum[r];
            let o = &mut out[r * out_stride..][..hd];
            for (d, od) in o.iter_mut().enumerate() {
                *od = ot[d * mp + r] * inv;
            }
        }
    }
}

/// One attention head over one sequence, in the packed layout.
pub struct HeadJob<'a> {
    /// The sequence's rows of the fused QKV projection, `row_stride` floats apart.
    pub qkv: &'a [f32],
    pub row_stride: usize,
    /// Keys (and values) of the sequence: rows `0..n` of `qkv`.
    pub n: usize,
    /// The queries computed by this job (a block of the sequence's rows, or all of them); row
    /// `i` of them is written to row `i - queries.start` of `out`.
    pub queries: std::ops::Range<usize>,
    /// Columns of this head's query, key and value inside a row.
    pub q_col: usize,
    pub k_col: usize,
    pub v_col: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Sliding-window attention: query i sees keys i-radius..=i+radius only, and only those
    /// are computed. `usize::MAX` (or anything >= n) is full attention.
    pub radius: usize,
}

multiversion! {
    /// softmax(q kᵀ · scale) v for every query of the sequence, written to `out` (rows
    /// `out_stride` apart, starting at this head's column). `kt`/`scores` are scratch.
    pub fn attend(job: &HeadJob, kt: &mut Vec<f32>, scores: &mut Vec<f32>, out: &mut [f32], out_stride: usize) {
        let (n, hd, rs) = (job.n, job.head_dim, job.row_stride);
        // Keys transposed, so each score row is built with contiguous multiply-adds over keys;
        // rows padded to whole vectors (zeros), so those loops have no scalar remainder.
        let np = n.div_ceil(LANES) * LANES;
        kt.clear();
        kt.resize(hd * np, 0.0);
        for j in 0..n {
            let k = &job.qkv[j * rs + job.k_col..][..hd];
            for d in 0..hd {
                kt[d * np + j] = k[d];
            }
        }
        scores.clear();
        scores.resize(np, 0.0);
        for i in job.queries.clone() {
            let q = &job.qkv[i * rs + job.q_col..][..hd];
            // The keys this query sees (all of them under full attention), widened to whole
            // 16-key chunks; the chunks' extra keys are masked out below.
            let (lo, hi) = (i.saturating_sub(job.radius), i.saturating_add(job.radius).saturating_add(1).min(n));
            let (c0, c1) = (lo / LANES, hi.div_ceil(LANES));
            let s = &mut scores[c0 * LANES..c1 * LANES];
            // 16 keys at a time, accumulated in registers over the head's dimensions.
            for (c, chunk) in s.chunks_exact_mut(LANES).enumerate() {
                let c = c0 + c;
                let mut acc = [0f32; LANES];
                for (d, &qd) in q.iter().enumerate() {
                    let qd = qd * job.scale;
                    let k = &kt[d * np + c * LANES..][..LANES];
                    for l in 0..LANES {
                        acc[l] += qd * k[l];
                    }
                }
                chunk.copy_from_slice(&acc);
            }
            s[..lo - c0 * LANES].fill(f32::NEG_INFINITY);
            s[hi - c0 * LANES..].fill(f32::NEG_INFINITY);
            let mut lane_max = [f32::NEG_INFINITY; LANES];
            for chunk in s.chunks_exact(LANES) {
                for l in 0..LANES {
                    lane_max[l] = lane_max[l].max(chunk[l]);
                }
            }
            let max = lane_max.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            // Padded keys: exp(-inf) is clamped to ~1e-38, nothing next to the real keys' sum.
            for sj in s.iter_mut() {
                *sj = exp(*sj - max);
            }
            let inv = 1.0 / sum(s);
            let s = &s[lo - c0 * LANES..hi - c0 * LANES];
            // Output 16 dimensions at a time, accumulated in registers over the keys.
            let o = &mut out[(i - job.queries.start) * out_stride..][..hd];
            let mut chunks = o.chunks_exact_mut(LANES);
            for (c, chunk) in chunks.by_ref().enumerate() {
                let mut acc = [0f32; LANES];
                for (j, &p) in (lo..hi).zip(s) {
                    let v = &job.qkv[j * rs + job.v_col + c * LANES..][..LANES];
                    for l in 0..LANES {
                        acc[l] += p * v[l];
                    }
                }
                for l in 0..LANES {
                    chunk[l] = acc[l] * inv;
                }
            }
            let done = hd - chunks.into_remainder().len();
            for (d, od) in o.iter_mut().enumerate().skip(done) {
                let mut acc = 0f32;
                for (j, &p) in (lo..hi).zip(s) {
                    acc += p * job.qkv[j * rs + job.v_col + d];
                }
                *od = acc * inv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_gelu_and_exp_match_f64() {
        let mut worst_erf = 0f64;
        let mut worst_exp = 0f64;
        for i in -100_000..=100_000 {
            let x = i as f64 * 6e-5; // [-6, 6]
            worst_erf = worst_erf.max((erf(x as f32) as f64 - candle_core::cpu::erf::erf_f64(x)).abs());
            let e = (x * 14.0) as f32 as f64; // [-84, 84], exactly representable in f32
            worst_exp = worst_exp.max(((exp(e as f32) as f64 - e.exp()) / e.exp()).abs());
        }
        assert!(worst_erf < 5e-7, "erf abs error {worst_erf}");
        assert!(worst_exp < 5e-7, "exp rel error {worst_exp}");
        let g = gelu(1.0) as f64;
        assert!((g - 0.841_344_746_068_542_9).abs() < 1e-6, "gelu(1) = {g}");
    }

    #[test]
    fn vectorised_kernels_agree_with_the_baseline_bodies() {
        // The dispatched (AVX) versions against plain per-element math.
        let xs: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 97.0).collect();
        let mut g = xs.clone();
        gelu_inplace(&mut g);
        for (x, y) in xs.iter().zip(&g) {
            let want = 0.5 * *x as f64 * (1.0 + candle_core::cpu::erf::erf_f64(*x as f64 / 2f64.sqrt()));
            assert!((*y as f64 - want).abs() < 1e-6, "gelu({x}) = {y}, want {want}");
        }
        let mut row: Vec<f32> = (0..384).map(|i| (i as f32).sin() * 3.0 + 1.0).collect();
        let delta: Vec<f32> = (0..384).map(|i| (i as f32).cos()).collect();
        let gamma = vec![2.0f32; 384];
        let beta = vec![0.5f32; 384];
        let summed: Vec<f64> = row.iter().zip(&delta).map(|(a, b)| (*a + *b) as f64).collect();
        residual_layer_norm(&mut row, &delta, &gamma, &beta, 1e-12);
        let mean = summed.iter().sum::<f64>() / 384.0;
        let var = summed.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / 384.0;
        for (y, x) in row.iter().zip(&summed) {
            let want = (x - mean) / var.sqrt() * 2.0 + 0.5;
            assert!((*y as f64 - want).abs() < 1e-4, "{y} vs {want}");
        }
        let mut bf = vec![0u16; 3];
        to_bf16(&[1.0, -2.5, 1.0 + 1.0 / 256.0], &mut bf);
        assert_eq!(bf, vec![0x3F80, 0xC020, 0x3F80], "1 + 2^-8 rounds to even (1.0)");
    }

    #[test]
    fn attention_matches_a_direct_softmax() {
        // hd 4 and 8: the narrow-head kernel (queries padded to 16, and 17 queries: two chunks);
        // hd 20: one 16-wide chunk plus a remainder; n 21: padded keys.
        for (n, hd, nh) in [(5, 4, 2), (17, 8, 2), (21, 20, 3)] {
            check_attention(n, hd, nh, usize::MAX);
        }
    }

    #[test]
    fn banded_attention_matches_a_direct_softmax_over_the_band() {
        // Radius 0 (the token alone), bands that start and end inside a 16-key chunk, one that
        // spans chunk borders, and one wider than the sequence (full attention).
        for (n, hd, nh, radius) in [(5, 4, 2, 0), (40, 20, 3, 3), (70, 32, 2, 17), (21, 16, 1, 30)] {
            check_attention(n, hd, nh, radius);
        }
    }

    fn check_attention(n: usize, hd: usize, nh: usize, radius: usize) {
        let rs = 3 * hd * nh;
        let qkv: Vec<f32> = (0..n * rs).map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0).collect();
        let mut out = vec![0f32; n * hd * nh];
        let (mut kt, mut scores) = (Vec::new(), Vec::new());
        for h in 0..nh {
            let job = HeadJob {
                qkv: &qkv,
                row_stride: rs,
                n,
                queries: 0..n,
                q_col: h * hd,
                k_col: hd * nh + h * hd,
                v_col: 2 * hd * nh + h * hd,
                head_dim: hd,
                scale: 0.5,
                radius,
            };
            if radius >= n && hd < LANES {
                attend_narrow(&job, &mut kt, &mut out[h * hd..], hd * nh);
            } else {
                attend(&job, &mut kt, &mut scores, &mut out[h * hd..], hd * nh);
            }
            for i in 0..n {
                // Keys outside the band get -inf: exp(-inf) = 0 takes them out of the softmax.
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        if i.abs_diff(j) > radius {
                            return f64::NEG_INFINITY;
                        }
                        (0..hd).map(|d| (qkv[i * rs + job.q_col + d] * qkv[j * rs + job.k_col + d]) as f64).sum::<f64>()
                            * 0.5
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for d in 0..hd {
                    let want: f64 = (0..n).map(|j| (s[j] - m).exp() / z * qkv[j * rs + job.v_col + d] as f64).sum();
                    let got = out[i * hd * nh + h * hd + d] as f64;
                    assert!((got - want).abs() < 1e-5, "radius {radius} head {h} query {i} dim {d}: {got} vs {want}");
                }
            }
        }
    }
}
