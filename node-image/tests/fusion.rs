//! Fusion nodes: `perceiver-fusion` and `mot-fusion` on the seeded checkpoints of
//! scripts/make-fusion-model.py, against that script's independent float64 numpy forward passes
//! (every modality present, and modalities missing), plus input validation.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use prism_api::wire::node::{EmbedInput, InputItem};
use prism_node::backend::{self, BackendError, DeviceChoice, LoadSpec};

fn model_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models").join(name);
    assert!(
        dir.join("model.safetensors").is_file() && dir.join("reference.json").is_file(),
        "model folder {} is missing: run `make models` (scripts/make-fusion-model.py)",
        dir.display()
    );
    dir
}

fn load(arch: &str) -> backend::LoadedModel {
    let spec = LoadSpec::new(model_dir(arch), DeviceChoice::Cpu);
    backend::load(arch, &spec).unwrap_or_else(|e| panic!("loading {arch}: {e}"))
}

#[derive(serde::Deserialize)]
struct RefItem {
    embeddings: BTreeMap<String, Vec<f32>>,
    output: Vec<f64>,
}

#[derive(serde::Deserialize)]
struct Reference {
    items: Vec<RefItem>,
}

fn input(map: BTreeMap<String, Vec<f32>>) -> EmbedInput {
    EmbedInput::Item(InputItem { embeddings: Some(map), ..Default::default() })
}

fn check_reference(arch: &str) {
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(model_dir(arch).join("reference.json")).expect("reference.json"))
            .expect("parse");
    let mut model = load(arch);
    assert_eq!(model.info.modality, "fusion");
    assert_eq!(model.info.dim, 128);
    let prepared: Vec<_> = reference
        .items
        .iter()
        .map(|it| model.preprocessor.preprocess(&input(it.embeddings.clone())).expect("preprocess"))
        .collect();
    // Mixed subsets in one batch (3, 2, 1, 1, 3 modalities) must each match on their own.
    let out = model.encoder.encode_batch(&prepared).expect("encode");
    assert_eq!(out.len(), reference.items.len());
    for (i, (v, it)) in out.iter().zip(&reference.items).enumerate() {
        let c = common::cosine(v, &it.output);
        let mods: Vec<&String> = it.embeddings.keys().collect();
        eprintln!("{arch} case {i} {mods:?}: cosine vs numpy reference {c:.8}");
        assert!(c >= 0.9999, "{arch} case {i} {mods:?}: cosine {c}");
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
    }
    // A missing modality changes the result (it is not silently imputed as the full input).
    assert!(common::cosine(&out[0], &reference.items[1].output) < 0.9999, "{arch}: dropping audio changed nothing");
}

#[test]
fn perceiver_matches_numpy_reference_with_and_without_modalities() {
    check_reference("perceiver-fusion");
}

#[test]
fn mot_matches_numpy_reference_with_and_without_modalities() {
    check_reference("mot-fusion");
}

#[test]
fn rejects_unknown_modality_wrong_dims_and_non_embedding_inputs() {
    for arch in ["perceiver-fusion", "mot-fusion"] {
        let model = load(arch);
        let unknown = input(BTreeMap::from([("smell".to_string(), vec![0.0; 8])]));
        match model.preprocessor.preprocess(&unknown) {
            Err(BackendError::Validation(m)) => {
                assert!(m.contains("smell") && m.contains("audio") && m.contains("text") && m.contains("vision"), "{m}")
            }
            other => panic!("unknown modality must be a validation error, got {other:?}"),
        }
        let bad = [
            input(BTreeMap::new()),
            input(BTreeMap::from([("text".to_string(), vec![0.1; 10])])),
            input(BTreeMap::from([("text".to_string(), vec![f32::NAN; 384])])),
            EmbedInput::Text("hello".into()),
            EmbedInput::Item(InputItem {
                text: Some("x".into()),
                embeddings: Some(BTreeMap::from([("text".to_string(), vec![0.1; 384])])),
                ..Default::default()
            }),
        ];
        for b in &bad {
            match model.preprocessor.preprocess(b) {
                Err(BackendError::Validation(_)) => {}
                other => panic!("{arch}: must be a validation error, got {other:?}"),
            }
        }
        model.preprocessor.preprocess(&model.preprocessor.warmup_input()).expect("warm-up");
    }
}
