//! `spec.model.adapters` end to end under `prism up`: a ModalityNode naming a LoRA adapter in
//! the models volume (pvc://models/adapters/...) serves, through the router and a real
//! prism-node process, the vectors of its base model with that adapter merged, not those of the
//! base model. The merge itself is checked against hand-merged weights in
//! node-image/tests/lora.rs.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::{Device, Tensor};
use common::{models, Up};
use prism_api::wire::node::EmbedInput;
use prism_node::backend::{self, DeviceChoice, LoadSpec, NamedAdapter};
use serde_json::{json, Value};

const TEXTS: [&str; 3] = ["a dog runs in the snow", "how do I reset my password?", "quarterly tax filing"];

fn in_process(dir: &Path, adapters: Vec<NamedAdapter>) -> Vec<Vec<f32>> {
    let spec = LoadSpec { adapters, ..LoadSpec::new(dir, DeviceChoice::Cpu) };
    let mut m = backend::load("bert", &spec).expect("load bert");
    let prepared: Vec<_> =
        TEXTS.iter().map(|t| m.preprocessor.preprocess(&EmbedInput::Text(t.to_string())).expect("tokenize")).collect();
    m.encoder.encode_batch(&prepared).expect("encode")
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let n = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

/// An adapter on two attention layers of MiniLM (PEFT names), strong enough to move vectors.
fn write_adapter(path: &Path, r: usize) {
    let d = 384;
    let mut t = HashMap::new();
    for layer in ["encoder.layer.0.attention.self.value", "encoder.layer.3.output.dense"] {
        let (inp, out) = if layer.ends_with("output.dense") { (1536, d) } else { (d, d) };
        let a = (Tensor::randn(0f32, 1.0, (r, inp), &Device::Cpu).unwrap() * 0.05).unwrap();
        let b = (Tensor::randn(0f32, 1.0, (out, r), &Device::Cpu).unwrap() * 0.05).unwrap();
        t.insert(format!("base_model.model.{layer}.lora_A.weight"), a);
        t.insert(format!("base_model.model.{layer}.lora_B.weight"), b);
    }
    candle_core::safetensors::save(&t, path).unwrap();
}

fn embeddings(router: &str) -> Vec<Vec<f32>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let body: Value = rt.block_on(async {
        let c = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().unwrap();
        c.post(format!("{router}/v1/embeddings"))
            .json(&json!({"input": TEXTS}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("no data in {body}"))
        .iter()
        .map(|d| d["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect()
}

#[test]
fn a_node_serves_its_spec_adapters_merged_into_the_base_model() {
    let tmp = tempfile::tempdir().unwrap();
    // The models volume: the real MiniLM folder and an adapters folder beside it.
    let vol: PathBuf = tmp.path().join("models");
    std::fs::create_dir_all(vol.join("adapters")).unwrap();
    let base = models().join("all-minilm-l6-v2");
    std::os::unix::fs::symlink(&base, vol.join("all-minilm-l6-v2")).unwrap();
    let (r, alpha) = (4usize, 8.0);
    write_adapter(&vol.join("adapters/tone.safetensors"), r);

    let manifest = r#"
apiVersion: prism.dev/v1alpha1
kind: ModalityNode
metadata: {name: text}
spec:
  modality: text
  model:
    uri: pvc://models/all-minilm-l6-v2
    architecture: bert
    revision: "1"
    adapters:
    - {name: tone, uri: pvc://models/adapters/tone.safetensors, rank: 4, alpha: 8}
  replicas: {min: 1, max: 1}
  device: cpu
---
apiVersion: prism.dev/v1alpha1
kind: MultimodalPipeline
metadata: {name: adapted}
spec:
  nodes:
  - {name: text, required: true}
"#;
    let up = Up::start(tmp.path(), manifest, &vol);
    let served = embeddings(&up.router);
    drop(up);

    let adapter = NamedAdapter { name: "tone".into(), path: vol.join("adapters/tone.safetensors"), rank: r, alpha };
    let merged = in_process(&base, vec![adapter]);
    let plain = in_process(&base, vec![]);
    assert_eq!(served.len(), TEXTS.len());
    for (i, t) in TEXTS.iter().enumerate() {
        let with = cosine(&served[i], &merged[i]);
        assert!(with > 0.9999, "{t:?}: served vs base+adapter cosine {with}");
    }
    let moved = (0..TEXTS.len()).map(|i| cosine(&served[i], &plain[i])).fold(1.0, f64::min);
    assert!(moved < 0.999, "the served vectors are the base model's (min cosine {moved}): the adapter was ignored");
}
