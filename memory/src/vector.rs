//! Vector arithmetic shared by the request log's index and the answer cache.

/// `v` scaled to unit length (computed in f64), or None for an empty, zero or non-finite vector.
pub(crate) fn normalised(v: &[f32]) -> Option<Vec<f32>> {
    let n = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
    (n.is_finite() && n > 0.0).then(|| v.iter().map(|x| (f64::from(*x) / n) as f32).collect())
}

/// Dot product in 16 independent lanes: a plain `zip().sum()` is one serial chain of adds
/// (float addition is not reassociated by the compiler), which made every distance ~8x slower
/// than the SIMD the CPU has. Distances are nearly all of HNSW's build and search time.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above; the result is cached by std).
        return unsafe { dot_avx2(a, b) };
    }
    dot_lanes(a, b)
}

/// The same loop compiled for AVX2 (8 f32 per instruction instead of SSE2's 4), chosen at run
/// time so one binary runs on any x86-64.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}
