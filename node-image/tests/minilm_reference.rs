//! Model correctness: the BERT backend on real all-MiniLM-L6-v2 weights against the independent
//! float64 numpy reference in tests/fixtures/minilm_reference.json (tests/fixtures/reference/minilm.py).

mod common;

use prism_api::wire::node::EmbedInput;
use prism_node::backend::{self, DeviceChoice, LoadSpec};

const MIN_COSINE: f64 = 0.9999;

fn load() -> backend::LoadedModel {
    let spec = LoadSpec { dir: common::minilm_dir(), device: DeviceChoice::Cpu, max_input_tokens: None };
    backend::load("bert", &spec).expect("loading all-MiniLM-L6-v2")
}

#[test]
fn matches_float64_reference_batched_and_single() {
    let reference = common::minilm_reference();
    assert!(reference.items.len() >= 30, "fixture must hold at least 30 sentences");
    let mut model = load();
    assert_eq!(model.info.dim, 384);
    assert_eq!(model.info.max_input_tokens, Some(256));

    let prepared: Vec<_> = reference
        .items
        .iter()
        .map(|it| model.preprocessor.preprocess(&EmbedInput::Text(it.text.clone())).expect("preprocess"))
        .collect();
    // Token counts (incl. truncation at 256) must agree with the reference's tokenizer setup.
    for (p, it) in prepared.iter().zip(&reference.items) {
        assert_eq!(p.cost, it.n_tokens, "token count for {:?}", it.text);
    }

    // One mixed-length batch: exercises dynamic padding + the attention/pooling masks.
    let batched = model.encoder.encode_batch(&prepared).expect("encode batch");
    assert_eq!(batched.len(), reference.items.len());
    let mut worst = f64::MAX;
    for (v, it) in batched.iter().zip(&reference.items) {
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "not L2-normalised: {norm} for {:?}", it.text);
        let c = common::cosine(v, &it.embedding);
        assert!(c >= MIN_COSINE, "batched cosine {c} < {MIN_COSINE} for {:?}", it.text);
        worst = worst.min(c);
    }
    // Each alone (no padding at all) must agree too.
    for (p, it) in prepared.iter().zip(&reference.items) {
        let v = model.encoder.encode_batch(std::slice::from_ref(p)).expect("encode single");
        let c = common::cosine(&v[0], &it.embedding);
        assert!(c >= MIN_COSINE, "single cosine {c} < {MIN_COSINE} for {:?}", it.text);
        worst = worst.min(c);
    }
    eprintln!("worst cosine vs float64 reference: {worst:.9}");
}

#[test]
fn rejects_non_text_and_empty_inputs() {
    let model = load();
    let image = EmbedInput::Item(prism_api::wire::node::InputItem {
        image_base64: Some("aGVsbG8=".into()),
        ..Default::default()
    });
    for bad in [image, EmbedInput::Text("   ".into())] {
        match model.preprocessor.preprocess(&bad) {
            Err(backend::BackendError::Validation(_)) => {}
            other => panic!("expected a validation error for {bad:?}, got {other:?}"),
        }
    }
}

#[test]
fn unknown_architecture_names_the_known_ones() {
    let spec = LoadSpec { dir: common::minilm_dir(), device: DeviceChoice::Cpu, max_input_tokens: None };
    let err = backend::load("no-such-arch", &spec).err().expect("must fail");
    assert!(err.to_string().contains("bert"), "{err}");
}
