//! Vector arithmetic shared by the request log's index and the answer cache.

/// `v` scaled to unit length (computed in f64), or None for an empty, zero or non-finite vector.
pub(crate) fn normalised(v: &[f32]) -> Option<Vec<f32>> {
    let n = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    (n.is_finite() && n > 0.0).then(|| v.iter().map(|x| (f64::from(*x) / n) as f32).collect())
}

/// Which dot-product kernel this CPU runs: chosen once at run time, so one binary runs on any
/// x86-64 and uses AVX-512 where it exists (Zen 4, Sapphire Rapids), AVX2+FMA elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

pub(crate) fn kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("fma") {
            return Kernel::Avx512;
        }
        if has!("avx2") && has!("fma") {
            return Kernel::Avx2Fma;
        }
    }
    Kernel::Baseline
}

/// The kernels this CPU can run (the tests check each one against a plain sum).
#[cfg(test)]
pub(crate) fn kernels() -> Vec<Kernel> {
    let mut v = vec![Kernel::Baseline];
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") {
            v.push(Kernel::Avx2Fma);
        }
        if has!("avx512f") && has!("fma") {
            v.push(Kernel::Avx512);
        }
    }
    v
}

/// The kernel's name, for benchmark lines (`baseline`, `avx2+fma`, `avx512f+fma`).
pub fn kernel_name() -> &'static str {
    match *KERNEL.get_or_init(kernel) {
        Kernel::Baseline => "baseline",
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2Fma => "avx2+fma",
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => "avx512f+fma",
    }
}

static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();

/// Dot product: nearly all of HNSW's build and search time. 32 independent lanes (a plain
/// `zip().sum()` is one serial chain of adds, ~8x slower than the SIMD the CPU has), fused
/// multiply-adds where the CPU has them.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_with(*KERNEL.get_or_init(kernel), a, b)
}

pub(crate) fn dot_with(k: Kernel, a: &[f32], b: &[f32]) -> f32 {
    match k {
        Kernel::Baseline => lanes(a, b),
        // SAFETY: `kernel()` chose these only where the CPU has the features.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2Fma => unsafe { dot_avx2(a, b) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { dot_avx512(a, b) },
    }
}

/// `q` against four rows at once, for a graph walk's neighbours: the four rows' cache misses
/// overlap and each chunk of `q` is loaded once (FAISS's `distances_batch_4` does the same).
pub(crate) fn dot4(q: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
    dot4_with(*KERNEL.get_or_init(kernel), q, rows)
}

pub(crate) fn dot4_with(k: Kernel, q: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
    match k {
        // SAFETY: `kernel()` chose it only where the CPU has the features.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { dot4_avx512(q, rows) },
        other => rows.map(|r| dot_with(other, q, r)),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn dot4_avx512(q: &[f32], rows: [&[f32]; 4]) -> [f32; 4] {
    use std::arch::x86_64::*;
    let n = rows.iter().fold(q.len(), |n, r| n.min(r.len()));
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 16 <= n {
        let qv = _mm512_loadu_ps(q.as_ptr().add(i));
        for (a, r) in acc.iter_mut().zip(&rows) {
            *a = _mm512_fmadd_ps(qv, _mm512_loadu_ps(r.as_ptr().add(i)), *a);
        }
        i += 16;
    }
    let mut out = [0f32; 4];
    for ((o, a), r) in out.iter_mut().zip(acc).zip(&rows) {
        let tail: f32 = q[i..n].iter().zip(&r[i..n]).map(|(x, y)| x * y).sum();
        *o = _mm512_reduce_add_ps(a) + tail;
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    simd::dot_avx2(a, b, |p| simd::load8_f32(b, p))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    simd::dot_avx512(a, b, |p| simd::load16_f32(b, p))
}

/// The x86 kernels, written with intrinsics: left to the auto-vectoriser, the 32-lane loop
/// ended in a serial 32-add reduction (about a third of every dot product's time at 384
/// dimensions), and a tree reduction made LLVM vectorise the loop 2 lanes wide instead.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::Element;

    /// `q · v` over `v`'s elements, 64 at a time in four accumulators (four FMA chains in
    /// flight: with two, a 384-float dot waited on FMA latency when its rows were in cache, as
    /// the graph build's neighbour selection finds them), `load(i)` reading `v[i..i + 16]` as f32.
    #[inline]
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn dot_avx512<E: Element>(q: &[f32], v: &[E], load: impl Fn(usize) -> __m512) -> f32 {
        let n = q.len().min(v.len());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(i + 16 * k)), load(i + 16 * k), *a);
            }
            i += 64;
        }
        let mut k = 0;
        while i + 16 <= n {
            acc[k] = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(i)), load(i), acc[k]);
            k = (k + 1) % 4;
            i += 16;
        }
        let tail: f32 = q[i..n].iter().zip(&v[i..n]).map(|(x, y)| x * y.f32()).sum();
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))) + tail
    }

    /// The same with 8-lane vectors, four accumulators.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_avx2<E: Element>(q: &[f32], v: &[E], load: impl Fn(usize) -> __m256) -> f32 {
        let n = q.len().min(v.len());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i + 8 * k)), load(i + 8 * k), *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(q.as_ptr().add(i)), load(i), acc[0]);
            i += 8;
        }
        let tail: f32 = q[i..n].iter().zip(&v[i..n]).map(|(x, y)| x * y.f32()).sum();
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let s = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
        _mm_cvtss_f32(s) + tail
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn load16_f32(v: &[f32], i: usize) -> __m512 {
        _mm512_loadu_ps(v.as_ptr().add(i))
    }

    /// 16 bfloat16 widened to f32: each 16-bit pattern shifted into the top half of a lane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn load16_bf16(v: &[u16], i: usize) -> __m512 {
        let h = _mm256_loadu_si256(v.as_ptr().add(i).cast());
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn load8_f32(v: &[f32], i: usize) -> __m256 {
        _mm256_loadu_ps(v.as_ptr().add(i))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn load8_bf16(v: &[u16], i: usize) -> __m256 {
        let h = _mm_loadu_si128(v.as_ptr().add(i).cast());
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

/// A stored element: f32 or bfloat16 (widened exactly as it is read).
trait Element: Copy {
    fn f32(self) -> f32;
}

impl Element for f32 {
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl Element for u16 {
    #[inline(always)]
    fn f32(self) -> f32 {
        from_bf16(self)
    }
}

/// The portable kernel (CPUs without AVX2): 32 independent lanes the compiler vectorises for
/// the baseline target (`mul_add` would be a libm call there, so multiply then add).
#[inline(always)]
fn lanes<E: Element>(q: &[f32], v: &[E]) -> f32 {
    const L: usize = 32;
    let mut acc = [0f32; L];
    let (cq, cv) = (q.chunks_exact(L), v.chunks_exact(L));
    let (rq, rv) = (cq.remainder(), cv.remainder());
    for (x, y) in cq.zip(cv) {
        for i in 0..L {
            acc[i] += x[i] * y[i].f32();
        }
    }
    let tail: f32 = rq.iter().zip(rv).map(|(x, y)| x * y.f32()).sum();
    acc.iter().sum::<f32>() + tail
}

/// `x` rounded to the nearest bfloat16 (ties to even): the top 16 bits of an f32.
pub(crate) fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let round = ((bits >> 16) & 1) + 0x7FFF;
    (bits.wrapping_add(round) >> 16) as u16
}

#[inline(always)]
fn from_bf16(x: u16) -> f32 {
    f32::from_bits(u32::from(x) << 16)
}

/// Dot product of an f32 query with a bfloat16 vector, with the kernels of [`dot`].
pub(crate) fn dot_bf16(q: &[f32], v: &[u16]) -> f32 {
    dot_bf16_with(*KERNEL.get_or_init(kernel), q, v)
}

pub(crate) fn dot_bf16_with(k: Kernel, q: &[f32], v: &[u16]) -> f32 {
    match k {
        Kernel::Baseline => lanes(q, v),
        // SAFETY: `kernel()` chose these only where the CPU has the features.
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2Fma => unsafe { dot_bf16_avx2(q, v) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => unsafe { dot_bf16_avx512(q, v) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_avx2(q: &[f32], v: &[u16]) -> f32 {
    simd::dot_avx2(q, v, |p| simd::load8_bf16(v, p))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn dot_bf16_avx512(q: &[f32], v: &[u16]) -> f32 {
    simd::dot_avx512(q, v, |p| simd::load16_bf16(v, p))
}

/// `v` widened back to f32.
pub(crate) fn widen_bf16(v: &[u16], out: &mut Vec<f32>) {
    out.clear();
    out.extend(v.iter().map(|x| from_bf16(*x)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_agree_with_a_plain_sum_on_this_cpu() {
        // Lengths around the 16- and 64-lane chunking, and 384 (MiniLM), on whatever ISA this CPU has.
        for n in [0usize, 1, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 80, 100, 128, 383, 384, 400] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
            let plain: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
            assert!((f64::from(dot(&a, &b)) - plain).abs() < 1e-4, "dot, n={n}");
            for k in kernels() {
                assert!((f64::from(dot_with(k, &a, &b)) - plain).abs() < 1e-4, "{k:?} dot, n={n}");
                // Four rows at once: each answer is its own row's (rows differ, so a mix-up shows).
                let rows: Vec<Vec<f32>> = (0..4).map(|r| b.iter().map(|x| x * (r + 1) as f32).collect()).collect();
                let got = dot4_with(k, &a, [&rows[0], &rows[1], &rows[2], &rows[3]]);
                for (r, g) in got.iter().enumerate() {
                    let want = plain * (r + 1) as f64;
                    assert!((f64::from(*g) - want).abs() < 1e-4 * (r + 1) as f64, "{k:?} dot4 row {r}, n={n}");
                }
            }
            let bh: Vec<u16> = b.iter().map(|x| to_bf16(*x)).collect();
            let plain_bf16: f64 = a.iter().zip(&bh).map(|(x, y)| f64::from(*x) * f64::from(from_bf16(*y))).sum();
            assert!((f64::from(dot_bf16(&a, &bh)) - plain_bf16).abs() < 1e-4, "dot_bf16, n={n}");
            for k in kernels() {
                assert!((f64::from(dot_bf16_with(k, &a, &bh)) - plain_bf16).abs() < 1e-4, "{k:?} dot_bf16, n={n}");
            }
            // bf16 keeps 8 bits of mantissa: each element within 2^-8 relative.
            for (x, y) in b.iter().zip(&bh) {
                assert!((x - from_bf16(*y)).abs() <= x.abs() / 256.0 + 1e-30, "{x} -> {}", from_bf16(*y));
            }
        }
        assert_eq!(to_bf16(1.0), 0x3F80);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        let mut out = Vec::new();
        widen_bf16(&[0x3F80, 0xC000], &mut out);
        assert_eq!(out, vec![1.0, -2.0]);
    }
}
