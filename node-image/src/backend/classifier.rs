//! Classification heads: labels with scores next to a node's vectors (issue 22 item 6).
//!
//! A model folder with a `classifier.json` serves, for every input, the head's labels with
//! their probabilities: `softmax(W v + b)` over the node's final vector `v` (after the projection
//! head, so a head trained in a shared space classifies every modality of that space). `prism
//! train shared-space` writes one for each of its folders. The file is small JSON (labels, an
//! [labels x dim] weight, a bias), so a user can read it or write one from any framework.

use std::path::Path;

use prism_api::wire::node::{ScoredLabel, MAX_LABELS};
use serde::{Deserialize, Serialize};

use super::BackendError;

/// File name inside a model folder.
pub const FILE: &str = "classifier.json";

/// A linear head over the node's vectors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Classifier {
    pub labels: Vec<String>,
    /// One row per label, each as long as the node's vectors.
    pub weight: Vec<Vec<f32>>,
    pub bias: Vec<f32>,
}

impl Classifier {
    /// Reads and checks a head for `dim`-long vectors.
    pub fn load(path: &Path, dim: usize) -> Result<Self, BackendError> {
        let e = |m: String| BackendError::Load(format!("{}: {m}", path.display()));
        let bytes = std::fs::read(path).map_err(|x| e(x.to_string()))?;
        let c: Classifier = serde_json::from_slice(&bytes).map_err(|x| e(x.to_string()))?;
        if c.labels.len() < 2 {
            return Err(e(format!("{} labels; a classifier needs at least two", c.labels.len())));
        }
        if c.weight.len() != c.labels.len() || c.bias.len() != c.labels.len() {
            return Err(e(format!(
                "{} labels but {} weight rows and {} biases",
                c.labels.len(),
                c.weight.len(),
                c.bias.len()
            )));
        }
        if let Some((i, row)) = c.weight.iter().enumerate().find(|(_, r)| r.len() != dim) {
            return Err(e(format!(
                "weight row {i} ({}) has {} values but the model gives {dim}-d vectors; it was trained for another model",
                c.labels[i],
                row.len()
            )));
        }
        if c.weight.iter().flatten().chain(&c.bias).any(|x| !x.is_finite()) {
            return Err(e("weights must be finite".into()));
        }
        Ok(c)
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, serde_json::to_vec(self).map_err(std::io::Error::other)?)
    }

    /// The labels of one vector, highest probability first, at most [`MAX_LABELS`].
    pub fn classify(&self, v: &[f32]) -> Vec<ScoredLabel> {
        let logits: Vec<f64> = self
            .weight
            .iter()
            .zip(&self.bias)
            .map(|(row, b)| row.iter().zip(v).map(|(w, x)| f64::from(*w) * f64::from(*x)).sum::<f64>() + f64::from(*b))
            .collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let exp: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let total: f64 = exp.iter().sum();
        let mut out: Vec<ScoredLabel> = self
            .labels
            .iter()
            .zip(exp)
            .map(|(label, x)| ScoredLabel { label: label.clone(), score: (x / total) as f32 })
            .collect();
        out.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.label.cmp(&b.label)));
        out.truncate(MAX_LABELS);
        out
    }
}

/// The folder's head, when it has one, checked against the model's vector size.
pub fn load_for(dir: &Path, dim: usize) -> Result<Option<Classifier>, BackendError> {
    let path = dir.join(FILE);
    if !path.is_file() {
        return Ok(None);
    }
    Classifier::load(&path, dim).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_labels() -> Classifier {
        Classifier {
            labels: vec!["cat".into(), "dog".into()],
            weight: vec![vec![2.0, 0.0], vec![0.0, 2.0]],
            bias: vec![0.0, 0.5],
        }
    }

    #[test]
    fn scores_are_a_softmax_of_the_linear_head_highest_first() {
        let c = two_labels();
        let got = c.classify(&[1.0, 0.0]);
        assert_eq!(got[0].label, "cat");
        let p_cat = 1.0 / (1.0 + (0.5f64 - 2.0).exp());
        assert!((f64::from(got[0].score) - p_cat).abs() < 1e-6, "{got:?}");
        assert!((got.iter().map(|l| l.score).sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(c.classify(&[0.0, 1.0])[0].label, "dog");
    }

    #[test]
    fn a_head_for_another_vector_size_or_with_missing_rows_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        two_labels().save(&path).unwrap();
        assert_eq!(load_for(dir.path(), 2).unwrap(), Some(two_labels()), "round trip");
        let err = load_for(dir.path(), 3).unwrap_err().to_string();
        assert!(err.contains("3-d vectors") && err.contains("cat"), "{err}");
        let mut bad = two_labels();
        bad.bias.pop();
        bad.save(&path).unwrap();
        let err = load_for(dir.path(), 2).unwrap_err().to_string();
        assert!(err.contains("2 labels but 2 weight rows and 1 biases"), "{err}");
        assert_eq!(load_for(&dir.path().join("none"), 2).unwrap(), None, "no file, no head");
    }
}
