//! Model correctness: the BERT backend on real all-MiniLM-L6-v2 weights against the independent
//! float64 numpy reference in tests/fixtures/minilm_reference.json (tests/fixtures/reference/minilm.py).

mod common;

use prism_api::wire::node::EmbedInput;
use prism_node::backend::cpu::CpuKernels;
use prism_node::backend::{self, bert, DeviceChoice, LoadSpec};

const MIN_COSINE: f64 = 0.9999;

fn spec() -> LoadSpec {
    LoadSpec::new(common::minilm_dir(), DeviceChoice::Cpu)
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

#[test]
fn a_sliding_window_is_banded_per_sequence_and_refused_off_the_packed_path() {
    let reference = common::minilm_reference();
    let texts: Vec<EmbedInput> = reference.items.iter().take(12).map(|it| EmbedInput::Text(it.text.clone())).collect();
    let embed = |window: Option<usize>, batch: bool| -> Vec<Vec<f32>> {
        let spec = LoadSpec { attention_window: window, ..spec() };
        let mut m = bert::load_with(&spec, CpuKernels::Auto).expect("loading all-MiniLM-L6-v2");
        let prepared: Vec<_> = texts.iter().map(|t| m.preprocessor.preprocess(t).expect("preprocess")).collect();
        if batch {
            m.encoder.encode_batch(&prepared).expect("encode batch")
        } else {
            prepared.chunks(1).map(|p| m.encoder.encode_batch(p).expect("encode one").remove(0)).collect()
        }
    };
    let full = embed(None, true);
    // A window wider than any sequence is full attention.
    for (a, b) in embed(Some(600), true).iter().zip(&full) {
        assert!(common::cosine(a, b) > 0.99999, "a 600-token window must equal full attention");
    }
    // A 4-token window: the band is per sequence, so packing several sequences back to back
    // gives what each gives alone, and the vectors move away from full attention.
    let (batched, alone) = (embed(Some(4), true), embed(Some(4), false));
    let mut moved = f64::MAX;
    for ((b, a), f) in batched.iter().zip(&alone).zip(&full) {
        let c = common::cosine(b, a);
        assert!(c > 0.9999, "window 4: batched vs alone cosine {c}");
        moved = moved.min(common::cosine(b, f));
    }
    eprintln!("window 4 vs full attention: lowest cosine {moved:.4}");
    assert!(moved < 0.999, "a 4-token window left every vector at full attention's (cosine {moved})");

    let spec = LoadSpec { attention_window: Some(64), ..spec() };
    match bert::load_with(&spec, CpuKernels::Candle) {
        Err(backend::BackendError::Load(m)) => assert!(m.contains("packed CPU path"), "message: {m}"),
        other => panic!("candle's BERT with a window must be a load error, got {:?}", other.map(|m| m.info)),
    }
}

/// The word-piece states `prism train fusion --tokens` reads are the ones the served vector pools.
#[test]
fn token_states_are_what_the_served_embedding_pools() {
    let mut model = load();
    let texts = ["five", "the digit seven, said slowly", "a longer sentence about a handwritten nine"];
    let prepared: Vec<_> = texts
        .iter()
        .map(|t| model.preprocessor.preprocess(&EmbedInput::Text(t.to_string())).expect("tokenize"))
        .collect();
    let pooled = model.encoder.encode_batch(&prepared).expect("embed");
    let tokens = model.encoder.encode_tokens(&prepared).expect("token states");
    for ((t, v), p) in tokens.iter().zip(&pooled).zip(&prepared) {
        assert_eq!((t.dim, Some(t.rows())), (384, p.tokens), "one row per word piece");
        let c = common::cosine(&common::mean_pool(t), v);
        assert!(c > 0.99999, "mean of the token states vs the served vector: cosine {c}");
    }
}
