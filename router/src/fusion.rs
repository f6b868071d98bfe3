//! Fusion and de-fusion of per-modality embeddings: pure functions.
//!
//! Every input vector is L2-normalised first, so a modality's weight means what it says
//! whatever the scale of its encoder's output. The fused vector is L2-normalised too.
//! De-fusion: with u = sum_m w_m v_m (before normalisation), the share of modality m is
//! c_m = w_m <v_m, u> / |u|^2. The shares sum to exactly 1 (they decompose |u|^2 along u);
//! a negative share means that modality pulled the answer away from where the others point.

use std::collections::BTreeMap;

use prism_api::wire::node::ScoredLabel;
use thiserror::Error;

/// Softmax temperature of attention fusion: agreement scores are cosines in [-1, 1], so a
/// temperature of 0.5 lets a modality that agrees with the rest weigh up to e^4 ~ 55x one that
/// contradicts them, without ever silencing it.
pub const ATTENTION_TEMPERATURE: f64 = 0.5;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum FusionError {
    #[error("no modality embeddings to fuse")]
    Empty,
    #[error("cannot fuse: modality '{modality}' has dimension {got} but '{first}' has {expected}; weighted and attention fusion need every encoder to emit the same dimension (use fusion.strategy late or early)")]
    DimensionMismatch { first: String, modality: String, expected: usize, got: usize },
    #[error("modality '{0}' returned an empty or non-finite embedding")]
    Invalid(String),
}

/// A fused answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Fused {
    pub vector: Vec<f32>,
    /// Weight each modality got after renormalisation (attention: alpha_m).
    pub weights: BTreeMap<String, f64>,
    /// De-fusion shares (sum to 1).
    pub contributions: BTreeMap<String, f64>,
}

fn normalised(name: &str, v: &[f32]) -> Result<Vec<f64>, FusionError> {
    let norm = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt();
    if v.is_empty() || !norm.is_finite() || norm == 0.0 {
        return Err(FusionError::Invalid(name.to_string()));
    }
    Ok(v.iter().map(|x| *x as f64 / norm).collect())
}

fn check_dims(vectors: &BTreeMap<String, Vec<f32>>) -> Result<BTreeMap<String, Vec<f64>>, FusionError> {
    let mut first: Option<(&String, usize)> = None;
    let mut out = BTreeMap::new();
    for (m, v) in vectors {
        match first {
            None => first = Some((m, v.len())),
            Some((f, d)) if d != v.len() => {
                return Err(FusionError::DimensionMismatch {
                    first: f.clone(),
                    modality: m.clone(),
                    expected: d,
                    got: v.len(),
                })
            }
            _ => {}
        }
        out.insert(m.clone(), normalised(m, v)?);
    }
    if out.is_empty() {
        return Err(FusionError::Empty);
    }
    Ok(out)
}

/// Renormalise `weights` over the modalities present. Missing or non-positive weights count as
/// 0; if all are 0 every present modality weighs the same (an answer beats a division by zero).
pub fn renormalise(present: &[&String], weights: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let w = |m: &String| weights.get(m).copied().filter(|x| x.is_finite() && *x > 0.0).unwrap_or(0.0);
    let total: f64 = present.iter().map(|m| w(m)).sum();
    present
        .iter()
        .map(|m| {
            let share = if total > 0.0 { w(m) / total } else { 1.0 / present.len() as f64 };
            ((*m).clone(), share)
        })
        .collect()
}

fn combine(units: &BTreeMap<String, Vec<f64>>, weights: BTreeMap<String, f64>) -> Fused {
    let dim = units.values().next().map_or(0, |v| v.len());
    let mut u = vec![0f64; dim];
    for (m, v) in units {
        let w = weights.get(m).copied().unwrap_or(0.0);
        for (acc, x) in u.iter_mut().zip(v) {
            *acc += w * x;
        }
    }
    let norm2: f64 = u.iter().map(|x| x * x).sum();
    let contributions = units
        .iter()
        .map(|(m, v)| {
            let w = weights.get(m).copied().unwrap_or(0.0);
            let dot: f64 = v.iter().zip(&u).map(|(a, b)| a * b).sum();
            let c = if norm2 > 0.0 { w * dot / norm2 } else { 0.0 };
            (m.clone(), c)
        })
        .collect();
    let norm = norm2.sqrt();
    // Opposite vectors can cancel exactly; then the fused direction is undefined and we
    // return the zero vector rather than NaNs.
    let vector = u.iter().map(|x| if norm > 0.0 { (x / norm) as f32 } else { 0.0 }).collect();
    Fused { vector, weights, contributions }
}

/// Weighted fusion with weights renormalised over the modalities present.
pub fn weighted(vectors: &BTreeMap<String, Vec<f32>>, weights: &BTreeMap<String, f64>) -> Result<Fused, FusionError> {
    let units = check_dims(vectors)?;
    let present: Vec<&String> = units.keys().collect();
    let w = renormalise(&present, weights);
    Ok(combine(&units, w))
}

/// Attention fusion: alpha_m = softmax_m(e_m / T + ln w_m), with e_m the cosine between
/// modality m and the mean of all modalities (agreement) and w_m its renormalised prior weight.
pub fn attention(vectors: &BTreeMap<String, Vec<f32>>, weights: &BTreeMap<String, f64>) -> Result<Fused, FusionError> {
    let units = check_dims(vectors)?;
    let present: Vec<&String> = units.keys().collect();
    let prior = renormalise(&present, weights);
    let dim = units.values().next().map_or(0, |v| v.len());
    let mut mean = vec![0f64; dim];
    for v in units.values() {
        for (a, x) in mean.iter_mut().zip(v) {
            *a += x / units.len() as f64;
        }
    }
    let mnorm = mean.iter().map(|x| x * x).sum::<f64>().sqrt();
    let logits: BTreeMap<String, f64> = units
        .iter()
        .map(|(m, v)| {
            let e = if mnorm > 0.0 { v.iter().zip(&mean).map(|(a, b)| a * b).sum::<f64>() / mnorm } else { 0.0 };
            let p = prior.get(m).copied().unwrap_or(0.0);
            // ln 0 = -inf: a zero-weight modality gets alpha 0, as in weighted fusion.
            (m.clone(), e / ATTENTION_TEMPERATURE + if p > 0.0 { p.ln() } else { f64::NEG_INFINITY })
        })
        .collect();
    let max = logits.values().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: BTreeMap<String, f64> =
        logits.iter().map(|(m, l)| (m.clone(), if max.is_finite() { (l - max).exp() } else { 1.0 })).collect();
    let z: f64 = exps.values().sum();
    let alphas = exps.into_iter().map(|(m, e)| (m, e / z)).collect();
    Ok(combine(&units, alphas))
}

/// De-fusion of a vector produced elsewhere (early fusion, any vector sizes): each modality's
/// share is how far the fused vector moves when that modality is left out, `1 - cos(fused,
/// fused_without_m)`, normalised to sum 1. `without` holds the fusion of every modality but the
/// key. One modality alone gets the whole share. None when no removal moves the vector (the
/// shares are then undefined) or a vector is empty or not finite.
pub fn leave_one_out_shares(fused: &[f32], without: &BTreeMap<String, Vec<f32>>) -> Option<BTreeMap<String, f64>> {
    let f = normalised("fused", fused).ok()?;
    if without.len() == 1 {
        return without.keys().next().map(|m| BTreeMap::from([(m.clone(), 1.0)]));
    }
    let mut raw = BTreeMap::new();
    for (m, v) in without {
        let w = normalised(m, v).ok()?;
        if w.len() != f.len() {
            return None;
        }
        let cos: f64 = f.iter().zip(&w).map(|(a, b)| a * b).sum();
        raw.insert(m.clone(), (1.0 - cos).max(0.0));
    }
    let total: f64 = raw.values().sum();
    if total < 1e-9 {
        return None;
    }
    Some(raw.into_iter().map(|(m, c)| (m, c / total)).collect())
}

/// Late fusion of label distributions: each label's score is the weighted mean of its score
/// in every modality that gave labels (a label a modality did not list counts 0 there), with
/// `weights` renormalised over those modalities; highest first. None when none gave labels.
pub fn mix_labels(
    per_modality: &BTreeMap<String, Vec<ScoredLabel>>,
    weights: &BTreeMap<String, f64>,
) -> Option<Vec<ScoredLabel>> {
    if per_modality.is_empty() {
        return None;
    }
    let present: Vec<&String> = per_modality.keys().collect();
    let w = renormalise(&present, weights);
    let mut mixed: BTreeMap<&str, f64> = BTreeMap::new();
    for (m, labels) in per_modality {
        let wm = w.get(m).copied().unwrap_or(0.0);
        for l in labels {
            *mixed.entry(l.label.as_str()).or_default() += wm * f64::from(l.score);
        }
    }
    let mut out: Vec<ScoredLabel> =
        mixed.into_iter().map(|(label, score)| ScoredLabel { label: label.to_string(), score: score as f32 }).collect();
    out.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.label.cmp(&b.label)));
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map(items: &[(&str, Vec<f32>)]) -> BTreeMap<String, Vec<f32>> {
        items.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    fn wmap(items: &[(&str, f64)]) -> BTreeMap<String, f64> {
        items.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    fn labels(items: &[(&str, f32)]) -> Vec<ScoredLabel> {
        items.iter().map(|(l, s)| ScoredLabel { label: l.to_string(), score: *s }).collect()
    }

    #[test]
    fn label_distributions_mix_with_the_weights_of_the_modalities_that_gave_labels() {
        // The image is unsure between 3 and 8; the spoken name says 8; audio weighs 3 times text
        // (which has no head, so it takes no share).
        let per = BTreeMap::from([
            ("image".to_string(), labels(&[("3", 0.6), ("8", 0.4)])),
            ("audio".to_string(), labels(&[("8", 0.9), ("3", 0.1)])),
        ]);
        let w = wmap(&[("image", 1.0), ("audio", 3.0), ("text", 5.0)]);
        let mixed = mix_labels(&per, &w).unwrap();
        assert_eq!(mixed[0].label, "8", "{mixed:?}");
        assert!((mixed[0].score - (0.25 * 0.4 + 0.75 * 0.9)).abs() < 1e-6, "{mixed:?}");
        assert!((mixed.iter().map(|l| l.score).sum::<f32>() - 1.0).abs() < 1e-6, "still a distribution");
        // A label only one modality listed counts 0 in the others.
        let one_sided = BTreeMap::from([
            ("image".to_string(), labels(&[("3", 1.0)])),
            ("audio".to_string(), labels(&[("8", 1.0)])),
        ]);
        let m = mix_labels(&one_sided, &wmap(&[("image", 1.0), ("audio", 1.0)])).unwrap();
        assert_eq!(m.iter().map(|l| (l.label.as_str(), l.score)).collect::<Vec<_>>(), [("3", 0.5), ("8", 0.5)]);
        assert_eq!(mix_labels(&BTreeMap::new(), &w), None, "no head anywhere, no labels");
    }

    fn vecs(dim: usize, n: usize) -> impl Strategy<Value = Vec<Vec<f32>>> {
        prop::collection::vec(prop::collection::vec(-1.0f32..1.0, dim), n)
            .prop_filter("non-zero", |vs| vs.iter().all(|v| v.iter().any(|x| x.abs() > 1e-3)))
    }

    proptest! {
        /// Weights renormalise over the modalities present (sum 1, proportions kept), the fused
        /// vector is unit length, and the de-fusion shares sum to 1.
        #[test]
        fn weighted_renormalises_and_normalises(vs in vecs(8, 3), ws in prop::collection::vec(0.01f64..10.0, 3), present in 1usize..=3) {
            let names = ["text", "image", "audio"];
            let vectors: BTreeMap<String, Vec<f32>> = (0..present).map(|i| (names[i].to_string(), vs[i].clone())).collect();
            let weights: BTreeMap<String, f64> = (0..3).map(|i| (names[i].to_string(), ws[i])).collect();
            let f = weighted(&vectors, &weights).unwrap();
            let sum: f64 = f.weights.values().sum();
            prop_assert!((sum - 1.0).abs() < 1e-9);
            prop_assert_eq!(f.weights.len(), present);
            let total: f64 = (0..present).map(|i| ws[i]).sum();
            for i in 0..present {
                prop_assert!((f.weights[names[i]] - ws[i] / total).abs() < 1e-9);
            }
            let n: f64 = f.vector.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            prop_assert!(n == 0.0 || (n - 1.0).abs() < 1e-4, "norm {}", n);
            if n > 0.0 {
                let c: f64 = f.contributions.values().sum();
                prop_assert!((c - 1.0).abs() < 1e-6, "contributions sum {}", c);
            }
        }

        #[test]
        fn attention_weights_are_a_distribution(vs in vecs(6, 3), ws in prop::collection::vec(0.01f64..10.0, 3)) {
            let names = ["a", "b", "c"];
            let vectors: BTreeMap<String, Vec<f32>> = (0..3).map(|i| (names[i].to_string(), vs[i].clone())).collect();
            let weights: BTreeMap<String, f64> = (0..3).map(|i| (names[i].to_string(), ws[i])).collect();
            let f = attention(&vectors, &weights).unwrap();
            let sum: f64 = f.weights.values().sum();
            prop_assert!((sum - 1.0).abs() < 1e-9);
            prop_assert!(f.weights.values().all(|a| *a > 0.0 && *a < 1.0));
        }
    }

    #[test]
    fn single_modality_is_its_own_unit_vector() {
        let f = weighted(&map(&[("text", vec![3.0, 4.0])]), &wmap(&[("text", 2.0), ("image", 5.0)])).unwrap();
        assert!((f.vector[0] - 0.6).abs() < 1e-6 && (f.vector[1] - 0.8).abs() < 1e-6);
        assert_eq!(f.weights["text"], 1.0);
        assert!((f.contributions["text"] - 1.0).abs() < 1e-9);
    }

    #[test]
    fn dimension_mismatch_names_both_modalities() {
        let err = weighted(&map(&[("audio", vec![1.0; 3]), ("text", vec![1.0; 4])]), &BTreeMap::new()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("'text'") && msg.contains("'audio'") && msg.contains('4') && msg.contains('3'), "{msg}");
    }

    #[test]
    fn zero_and_nan_vectors_are_rejected() {
        assert!(matches!(weighted(&map(&[("t", vec![0.0, 0.0])]), &BTreeMap::new()), Err(FusionError::Invalid(_))));
        assert!(matches!(
            weighted(&map(&[("t", vec![f32::NAN, 1.0])]), &BTreeMap::new()),
            Err(FusionError::Invalid(_))
        ));
        assert!(matches!(weighted(&BTreeMap::new(), &BTreeMap::new()), Err(FusionError::Empty)));
    }

    #[test]
    fn attention_favours_the_agreeing_majority() {
        let v = map(&[("a", vec![1.0, 0.0]), ("b", vec![0.9, 0.1]), ("c", vec![-1.0, 0.2])]);
        let f = attention(&v, &BTreeMap::new()).unwrap();
        assert!(f.weights["a"] > f.weights["c"] && f.weights["b"] > f.weights["c"], "{:?}", f.weights);
        assert!(f.vector[0] > 0.0);
    }

    #[test]
    fn heavier_modality_contributes_more() {
        let v = map(&[("text", vec![1.0, 0.0]), ("image", vec![0.0, 1.0])]);
        let f = weighted(&v, &wmap(&[("text", 3.0), ("image", 1.0)])).unwrap();
        assert!((f.contributions["text"] - 0.9).abs() < 1e-9, "{:?}", f.contributions);
        assert!((f.contributions["image"] - 0.1).abs() < 1e-9);
    }

    #[test]
    fn leave_one_out_shares_follow_how_far_the_fused_vector_moves() {
        // Leaving out text turns the fused vector by 90 degrees, leaving out audio by 60.
        let fused = [1.0, 0.0];
        let without = map(&[("text", vec![0.0, 1.0]), ("audio", vec![0.5, 0.75f32.sqrt()])]);
        let c = leave_one_out_shares(&fused, &without).unwrap();
        assert!((c["text"] - 1.0 / 1.5).abs() < 1e-6, "{c:?}");
        assert!((c["audio"] - 0.5 / 1.5).abs() < 1e-6, "{c:?}");
        // One modality holds everything; no movement at all leaves the shares undefined.
        assert_eq!(leave_one_out_shares(&fused, &map(&[("text", vec![3.0, 1.0])])).unwrap()["text"], 1.0);
        assert!(leave_one_out_shares(&fused, &map(&[("a", vec![2.0, 0.0]), ("b", vec![1.0, 0.0])])).is_none());
        // A fusion node that answered another size or a zero vector: nothing to compare.
        assert!(leave_one_out_shares(&fused, &map(&[("a", vec![1.0, 0.0, 0.0]), ("b", vec![0.0, 1.0])])).is_none());
        assert!(leave_one_out_shares(&[0.0, 0.0], &without).is_none());
    }
}
