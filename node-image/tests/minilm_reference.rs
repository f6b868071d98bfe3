//! Model correctness: the BERT backend on real all-MiniLM-L6-v2 weights against the independent
//! float64 numpy reference in tests/fixtures/minilm_reference.json (tests/fixtures/reference/minilm.py).

mod common;

use prism_api::wire::node::EmbedInput;
use prism_node::backend::cpu::CpuKernels;
use prism_node::backend::{self, bert, DeviceChoice, LoadSpec};

const MIN_COSINE: f64 = 0.9999;

fn spec() -> LoadSpec {
    LoadSpec { dir: common::minilm_dir(), device: DeviceChoice::Cpu, max_input_tokens: None, adapters: vec![] }
}

fn load() -> backend::LoadedModel {
    backend::load("bert", &spec()).expect("loading all-MiniLM-L6-v2")
}

/// Every CPU kernel choice must match the float64 reference: the packed path on AMX bf16 tiles
/// (where the CPU has them; f32 elsewhere), the packed path on f32 gemm (what CPUs without AMX
/// run), and candle's stock BERT (the GPU path's model code).
#[test]
fn matches_float64_reference_batched_and_single() {
    for kernels in [CpuKernels::Auto, CpuKernels::F32, CpuKernels::Candle] {
        let model = bert::load_with(&spec(), kernels).expect("loading all-MiniLM-L6-v2");
        let worst = check_against_reference(model);
        eprintln!("{kernels:?}: worst cosine vs float64 reference: {worst:.9}");
    }
}

fn check_against_reference(mut model: backend::LoadedModel) -> f64 {
    let reference = common::minilm_reference();
    assert!(reference.items.len() >= 30, "fixture must hold at least 30 sentences");
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

    // One mixed-length batch: exercises packing/padding, attention over each item's own tokens
    // and pooling.
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
    // Each alone (no padding at all; the packed path's one-thread small-batch pool) must agree too.
    for (p, it) in prepared.iter().zip(&reference.items) {
        let v = model.encoder.encode_batch(std::slice::from_ref(p)).expect("encode single");
        let c = common::cosine(&v[0], &it.embedding);
        assert!(c >= MIN_COSINE, "single cosine {c} < {MIN_COSINE} for {:?}", it.text);
        worst = worst.min(c);
    }
    worst
}

#[test]
fn rejects_non_text_and_empty_inputs() {
    let model = load();
    let image = EmbedInput::Item(prism_api::wire::node::InputItem {
        image_base64: Some("aGVsbG8=".into()),
        ..Default::default()
    });
    for bad in [image, EmbedInput::Text(String::new())] {
        match model.preprocessor.preprocess(&bad) {
            Err(backend::BackendError::Validation(_)) => {}
            other => panic!("expected a validation error for {bad:?}, got {other:?}"),
        }
    }
    // Whitespace only is not empty: `[CLS] [SEP]`, as sentence-transformers embeds it (the
    // reference fixture holds its float64 vector), with its token count reported.
    let blank = model.preprocessor.preprocess(&EmbedInput::Text(" \t\n".into())).expect("whitespace embeds");
    assert_eq!((blank.cost, blank.tokens), (2, Some(2)));
}

#[test]
fn unknown_architecture_names_the_known_ones() {
    let err = backend::load("no-such-arch", &spec()).err().expect("must fail");
    assert!(err.to_string().contains("bert"), "{err}");
}
