//! LoRA adapters (PEFT layout) merged at load time, on the vit-digits model. The expected effects
//! are computed by hand, not by the same merge code: a zero B changes nothing, and an adapter with
//! B A = -(r / alpha) W cancels the pooler weight exactly, so every image must map to the same vector.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use candle_core::{Device, Tensor};
use prism_api::wire::node::{EmbedInput, InputItem};
use prism_node::backend::{self, BackendError, DeviceChoice, LoadSpec};

fn vit_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/vit-digits");
    assert!(dir.join("model.safetensors").is_file(), "model folder {} is missing: run `make models`", dir.display());
    dir
}

/// A copy of vit-digits with an adapter on `pooler.dense`.
fn with_adapter(tag: &str, r: usize, alpha: f64, a: Tensor, b: Tensor) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prism-lora-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for f in ["config.json", "preprocessor_config.json", "model.safetensors"] {
        std::fs::copy(vit_dir().join(f), dir.join(f)).expect("copy model file");
    }
    std::fs::write(
        dir.join("adapter_config.json"),
        format!(r#"{{"r": {r}, "lora_alpha": {alpha}, "peft_type": "LORA"}}"#),
    )
    .expect("write");
    let t = HashMap::from([
        ("base_model.model.pooler.dense.lora_A.weight".to_string(), a),
        ("base_model.model.pooler.dense.lora_B.weight".to_string(), b),
    ]);
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).expect("save adapter");
    dir
}

fn embed_samples(dir: &Path) -> Result<Vec<Vec<f32>>, BackendError> {
    embed_spec(LoadSpec::new(dir.to_path_buf(), DeviceChoice::Cpu))
}

fn embed_spec(spec: LoadSpec) -> Result<Vec<Vec<f32>>, BackendError> {
    let mut model = backend::load("vit", &spec)?;
    let prepared = ["digit0_1.png", "digit3_1.png", "digit7_1.png"]
        .iter()
        .map(|f| {
            let bytes = std::fs::read(vit_dir().join("samples").join(f)).expect("sample");
            model.preprocessor.preprocess(&EmbedInput::Item(InputItem {
                image_base64: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                ..Default::default()
            }))
        })
        .collect::<Result<Vec<_>, _>>()?;
    model.encoder.encode_batch(&prepared)
}

fn pooler_weight() -> Tensor {
    let t = candle_core::safetensors::load(vit_dir().join("model.safetensors"), &Device::Cpu).expect("load");
    t["pooler.dense.weight"].clone()
}

#[test]
fn zero_b_is_a_no_op_and_cancelling_adapter_collapses_the_pooler() {
    let base = embed_samples(&vit_dir()).expect("base");
    let d = 64;
    let (r, alpha) = (4usize, 8.0);
    let a = Tensor::randn(0f32, 1.0, (r, d), &Device::Cpu).expect("randn");
    let zero =
        with_adapter("zero", r, alpha, a, Tensor::zeros((d, r), candle_core::DType::F32, &Device::Cpu).expect("zeros"));
    assert_eq!(embed_samples(&zero).expect("zero adapter"), base, "B = 0 must leave the model unchanged");

    // Full rank: A = I, B = -(r / alpha) W  =>  W + (alpha / r) B A = 0.
    let (r, alpha) = (d, 16.0);
    let w = pooler_weight();
    let eye = Tensor::eye(d, candle_core::DType::F32, &Device::Cpu).expect("eye");
    let b = (w * (-(r as f64) / alpha)).expect("scale");
    let cancel = with_adapter("cancel", r, alpha, eye, b);
    let out = embed_samples(&cancel).expect("cancelling adapter");
    for v in &out[1..] {
        let diff = v.iter().zip(&out[0]).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "with a zero pooler weight every image must embed the same (max diff {diff})");
    }
    assert_ne!(out[0], base[0], "the adapter was not applied");
    let _ = std::fs::remove_dir_all(zero);
    let _ = std::fs::remove_dir_all(cancel);
}

#[test]
fn adapter_for_a_missing_layer_is_a_load_error() {
    let dir = std::env::temp_dir().join(format!("prism-lora-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for f in ["config.json", "preprocessor_config.json", "model.safetensors"] {
        std::fs::copy(vit_dir().join(f), dir.join(f)).expect("copy");
    }
    std::fs::write(dir.join("adapter_config.json"), r#"{"r": 2, "lora_alpha": 4}"#).expect("write");
    let t = HashMap::from([
        (
            "no.such.layer.lora_A.weight".to_string(),
            Tensor::zeros((2, 64), candle_core::DType::F32, &Device::Cpu).expect("z"),
        ),
        (
            "no.such.layer.lora_B.weight".to_string(),
            Tensor::zeros((64, 2), candle_core::DType::F32, &Device::Cpu).expect("z"),
        ),
    ]);
    candle_core::safetensors::save(&t, dir.join("adapter_model.safetensors")).expect("save");
    match embed_samples(&dir) {
        Err(BackendError::Load(m)) => assert!(m.contains("no.such.layer.weight"), "{m}"),
        other => panic!("expected a load error, got {:?}", other.map(|v| v.len())),
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn minilm_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/all-minilm-l6-v2");
    assert!(dir.join("model.safetensors").is_file(), "model folder {} is missing: run `make models`", dir.display());
    dir
}

fn embed_texts(dir: &Path) -> Vec<Vec<f32>> {
    let mut model = backend::load("bert", &LoadSpec::new(dir.to_path_buf(), DeviceChoice::Cpu)).expect("load bert");
    let prepared = ["a dog in the snow", "how do I reset my password?"]
        .iter()
        .map(|t| model.preprocessor.preprocess(&EmbedInput::Text(t.to_string())))
        .collect::<Result<Vec<_>, _>>()
        .expect("tokenize");
    model.encoder.encode_batch(&prepared).expect("encode")
}

/// BERT (the text encoder) merges a folder's adapter too: the served vectors equal those of a
/// copy whose weight was replaced by W + (alpha / r) B A outside the loader.
#[test]
fn bert_serves_its_adapter_like_the_merged_weights() {
    let layer = "encoder.layer.0.attention.self.value";
    let (r, alpha, d) = (4usize, 8.0, 384);
    let a = (Tensor::randn(0f32, 1.0, (r, d), &Device::Cpu).expect("randn") * 0.05).expect("scale");
    let b = (Tensor::randn(0f32, 1.0, (d, r), &Device::Cpu).expect("randn") * 0.05).expect("scale");
    let base_dir = minilm_dir();
    let tmp = std::env::temp_dir().join(format!("prism-lora-bert-{}", std::process::id()));
    let (with_adapter, merged) = (tmp.join("adapter"), tmp.join("merged"));
    for d in [&with_adapter, &merged] {
        std::fs::create_dir_all(d).expect("temp dir");
        for f in ["config.json", "tokenizer.json"] {
            std::fs::copy(base_dir.join(f), d.join(f)).expect("copy");
        }
    }
    std::fs::copy(base_dir.join("model.safetensors"), with_adapter.join("model.safetensors")).expect("copy");
    std::fs::write(with_adapter.join("adapter_config.json"), format!(r#"{{"r": {r}, "lora_alpha": {alpha}}}"#))
        .expect("write");
    let t = HashMap::from([
        (format!("base_model.model.{layer}.lora_A.weight"), a.clone()),
        (format!("base_model.model.{layer}.lora_B.weight"), b.clone()),
    ]);
    candle_core::safetensors::save(&t, with_adapter.join("adapter_model.safetensors")).expect("save adapter");
    let mut weights = candle_core::safetensors::load(base_dir.join("model.safetensors"), &Device::Cpu).expect("load");
    let w = weights[&format!("{layer}.weight")].to_dtype(candle_core::DType::F32).expect("f32");
    let delta = (b.matmul(&a).expect("BA") * (alpha / r as f64)).expect("scale");
    weights.insert(format!("{layer}.weight"), (w + delta).expect("add"));
    candle_core::safetensors::save(&weights, merged.join("model.safetensors")).expect("save merged");

    let (base, adapted, expected) = (embed_texts(&base_dir), embed_texts(&with_adapter), embed_texts(&merged));
    for (x, y) in adapted.iter().zip(&expected) {
        let diff = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "adapter folder vs merged weights: max diff {diff}");
    }
    assert_ne!(adapted, base, "the adapter was ignored");
    let _ = std::fs::remove_dir_all(tmp);
}

fn embed_with(adapters: Vec<backend::NamedAdapter>) -> Result<Vec<Vec<f32>>, BackendError> {
    embed_spec(LoadSpec { adapters, ..LoadSpec::new(vit_dir(), DeviceChoice::Cpu) })
}

/// A bare adapter file (spec.model.adapters[].uri points at one): PEFT names, no config.
fn adapter_file(tag: &str, pairs: &[(&str, &Tensor, &Tensor)]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("prism-lora-{tag}-{}.safetensors", std::process::id()));
    let mut t = HashMap::new();
    for (layer, a, b) in pairs {
        t.insert(format!("base_model.model.{layer}.lora_A.weight"), (*a).clone());
        t.insert(format!("base_model.model.{layer}.lora_B.weight"), (*b).clone());
    }
    candle_core::safetensors::save(&t, &path).expect("save adapter");
    path
}

fn named(name: &str, path: &Path, rank: usize, alpha: f64) -> backend::NamedAdapter {
    backend::NamedAdapter { name: name.into(), path: path.to_path_buf(), rank, alpha }
}

/// spec.model.adapters, merged in order at load: the vectors equal those of a copy whose weight
/// was set to W + (a1 / r1) B1 A1 + (a2 / r2) B2 A2 outside the loader, and differ from the base.
#[test]
fn named_adapters_are_merged_in_order_like_hand_merged_weights() {
    let d = 64;
    let rnd = |rows, cols| (Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).expect("randn") * 0.2).expect("scale");
    let (a1, b1, a2, b2) = (rnd(4, d), rnd(d, 4), rnd(2, d), rnd(d, 2));
    let f1 = adapter_file("n1", &[("pooler.dense", &a1, &b1)]);
    let f2 = adapter_file("n2", &[("pooler.dense", &a2, &b2)]);
    let served = embed_with(vec![named("first", &f1, 4, 8.0), named("second", &f2, 2, 1.0)]).expect("adapters");

    let w = pooler_weight();
    let delta1 = (b1.matmul(&a1).expect("BA") * 2.0).expect("scale");
    let delta2 = (b2.matmul(&a2).expect("BA") * 0.5).expect("scale");
    let merged_w = ((w + delta1).expect("add") + delta2).expect("add");
    let dir = std::env::temp_dir().join(format!("prism-lora-handmerged-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(vit_dir().join(f), dir.join(f)).expect("copy");
    }
    let mut tensors = candle_core::safetensors::load(vit_dir().join("model.safetensors"), &Device::Cpu).expect("load");
    tensors.insert("pooler.dense.weight".into(), merged_w);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).expect("save");
    let expected = embed_samples(&dir).expect("hand-merged folder");
    let base = embed_samples(&vit_dir()).expect("base");
    for (s, e) in served.iter().zip(&expected) {
        let diff = s.iter().zip(e).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "served vs hand-merged: max diff {diff}");
    }
    assert!(served.iter().zip(&base).any(|(s, b)| s != b), "the adapters changed nothing: were they merged?");
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(f1);
    let _ = std::fs::remove_file(f2);
}

/// An adapter the spec describes wrongly, that the model cannot take, or that is not there,
/// stops the load with its name and the reason: never served as if applied.
#[test]
fn a_named_adapter_that_cannot_apply_is_a_load_error_naming_it() {
    let d = 64;
    let z = |rows, cols| Tensor::zeros((rows, cols), candle_core::DType::F32, &Device::Cpu).expect("zeros");
    let good = adapter_file("rank4", &[("pooler.dense", &z(4, d), &z(d, 4))]);
    let stray = adapter_file("stray", &[("no.such.layer", &z(4, d), &z(d, 4))]);
    let empty = std::env::temp_dir().join(format!("prism-lora-empty-{}.safetensors", std::process::id()));
    candle_core::safetensors::save(&HashMap::from([("x".to_string(), z(1, 1))]), &empty).expect("save");
    let missing = std::env::temp_dir().join("prism-lora-no-such-file.safetensors");
    for (adapter, want) in [
        (named("wrong-rank", &good, 8, 8.0), "rank is not the 8"),
        (named("stray", &stray, 4, 8.0), "no.such.layer.weight"),
        (named("empty", &empty, 4, 8.0), "no lora_A/lora_B pairs"),
        (named("gone", &missing, 4, 8.0), "no such file"),
    ] {
        let name = adapter.name.clone();
        match embed_with(vec![adapter]) {
            Err(BackendError::Load(m)) => {
                assert!(m.contains(&format!("adapter {name:?}")) && m.contains(want), "{name}: {m}")
            }
            other => panic!("{name}: expected a load error, got {:?}", other.map(|v| v.len())),
        }
    }
    for f in [good, stray, empty] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn the_adapter_flag_reads_what_the_operator_writes() {
    let spec: prism_api::node::AdapterSpec = serde_json::from_value(serde_json::json!(
        {"name": "tone", "uri": "pvc://models/a.safetensors", "rank": 8, "alpha": 16.0}
    ))
    .expect("spec");
    let arg = spec.server_arg("/models/odd,dir/a.safetensors");
    let parsed: backend::NamedAdapter = arg.parse().expect("parse");
    assert_eq!(parsed, named("tone", Path::new("/models/odd,dir/a.safetensors"), 8, 16.0));
    for bad in [
        "name=x,rank=0,alpha=1,path=/a",
        "name=x,rank=2,alpha=-1,path=/a",
        "name=x,rank=2,path=/a",
        "name=x,rank=2,alpha=1",
    ] {
        assert!(bad.parse::<backend::NamedAdapter>().is_err(), "{bad} must be refused");
    }
}
