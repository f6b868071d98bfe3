//! Vision node: the `vit` backend on the vit-digits model (HF ViTModel layout, made by
//! scripts/make-vision-model.py during `make models`), checked against that script's independent
//! float64 numpy forward pass, plus digit clustering and input validation.

mod common;

use std::path::PathBuf;

use base64::Engine;
use prism_api::wire::node::{EmbedInput, InputItem};
use prism_node::backend::{self, BackendError, DeviceChoice, LoadSpec};

fn model_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/vit-digits");
    assert!(
        dir.join("model.safetensors").is_file() && dir.join("reference.json").is_file(),
        "model folder {} is missing: run `make models` (builds vit-digits with scripts/make-vision-model.py)",
        dir.display()
    );
    dir
}

fn image_input(bytes: &[u8]) -> EmbedInput {
    EmbedInput::Item(InputItem {
        image_base64: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ..Default::default()
    })
}

fn load() -> backend::LoadedModel {
    let spec = LoadSpec::new(model_dir(), DeviceChoice::Cpu);
    backend::load("vit", &spec).expect("loading vit-digits")
}

#[derive(serde::Deserialize)]
struct RefItem {
    png: String,
    label: usize,
    embedding: Vec<f64>,
}

#[derive(serde::Deserialize)]
struct Reference {
    items: Vec<RefItem>,
}

fn reference() -> Reference {
    let p = model_dir().join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).expect("reference.json")).expect("parse reference.json")
}

fn embed_samples(model: &mut backend::LoadedModel, reference: &Reference) -> Vec<Vec<f32>> {
    let prepared: Vec<_> = reference
        .items
        .iter()
        .map(|it| {
            let bytes = std::fs::read(model_dir().join("samples").join(&it.png)).expect("sample png");
            model.preprocessor.preprocess(&image_input(&bytes)).expect("preprocess")
        })
        .collect();
    model.encoder.encode_batch(&prepared).expect("encode")
}

#[test]
fn matches_numpy_reference_forward() {
    let reference = reference();
    assert_eq!(reference.items.len(), 50);
    let mut model = load();
    assert_eq!(model.info.dim, 64);
    assert_eq!(model.info.modality, "vision");
    let out = embed_samples(&mut model, &reference);
    let mut worst = f64::MAX;
    for (v, it) in out.iter().zip(&reference.items) {
        let want: Vec<f32> = it.embedding.iter().map(|x| *x as f32).collect();
        let c = common::cosine(v, &want);
        assert!(c >= 0.9999, "{}: cosine {c} vs numpy reference", it.png);
        worst = worst.min(c);
    }
    eprintln!("worst cosine vs float64 numpy reference over 50 digits: {worst:.7}");
}

#[test]
fn same_digit_embeddings_cluster() {
    let reference = reference();
    let mut model = load();
    let out = embed_samples(&mut model, &reference);
    let labels: Vec<usize> = reference.items.iter().map(|it| it.label).collect();
    // Leave-one-out 1-nearest-neighbour over the 50 held-out digits (5 per class).
    let mut hits = 0;
    let (mut same, mut n_same, mut diff, mut n_diff) = (0.0, 0, 0.0, 0);
    for i in 0..out.len() {
        let mut best = (f64::MIN, 0);
        for j in 0..out.len() {
            if i == j {
                continue;
            }
            let c = common::cosine(&out[i], &out[j]);
            if c > best.0 {
                best = (c, j);
            }
            if labels[i] == labels[j] {
                same += c;
                n_same += 1;
            } else {
                diff += c;
                n_diff += 1;
            }
        }
        hits += usize::from(labels[best.1] == labels[i]);
    }
    let acc = hits as f64 / out.len() as f64;
    let (same, diff) = (same / n_same as f64, diff / n_diff as f64);
    eprintln!("1-NN accuracy {acc:.2} (chance 0.1); mean cosine same digit {same:.3}, different {diff:.3}");
    assert!(acc >= 0.8, "held-out digits do not cluster: 1-NN accuracy {acc}");
    assert!(same > diff + 0.3, "same-digit cosine {same} not clearly above different-digit {diff}");
}

#[test]
fn resizes_other_sizes_and_decodes_jpeg() {
    let mut model = load();
    let reference = reference();
    let png = std::fs::read(model_dir().join("samples").join(&reference.items[0].png)).expect("png");
    let img = image::load_from_memory(&png).expect("decode sample").to_rgb8();
    // The same digit at 64x64 (resized back to 32x32 by the node) and as JPEG must stay close to
    // the original: preprocessing is applied, not skipped or garbled.
    let big = image::imageops::resize(&img, 64, 64, image::imageops::FilterType::Nearest);
    let mut jpeg = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(big.clone()).write_to(&mut jpeg, image::ImageFormat::Jpeg).expect("jpeg");
    let mut png64 = std::io::Cursor::new(Vec::new());
    big.write_to(&mut png64, image::ImageFormat::Png).expect("png");
    let items = [png, png64.into_inner(), jpeg.into_inner()];
    let prepared: Vec<_> =
        items.iter().map(|b| model.preprocessor.preprocess(&image_input(b)).expect("preprocess")).collect();
    let out = model.encoder.encode_batch(&prepared).expect("encode");
    let (c_png, c_jpeg) = (common::cosine(&out[0], &out[1]), common::cosine(&out[0], &out[2]));
    eprintln!("cosine to the original: 64x64 PNG {c_png:.4}, 64x64 JPEG {c_jpeg:.4}");
    assert!(c_png > 0.9 && c_jpeg > 0.8, "resized/JPEG copies drifted: {c_png} {c_jpeg}");
}

#[test]
fn rejects_corrupt_and_non_image_inputs() {
    let model = load();
    let reference = reference();
    let png = std::fs::read(model_dir().join("samples").join(&reference.items[0].png)).expect("png");
    let truncated = &png[..png.len() / 2];
    let mut garbled = png.clone();
    for b in garbled.iter_mut().skip(40) {
        *b ^= 0x5a;
    }
    let bad = vec![
        image_input(truncated),
        image_input(&garbled),
        image_input(b"GIF89a not accepted"),
        image_input(b"plain bytes"),
        EmbedInput::Text("a photo of a digit".into()),
        EmbedInput::Item(InputItem { image_base64: Some("%%%".into()), ..Default::default() }),
        EmbedInput::Item(InputItem { audio_base64: Some("aGVsbG8=".into()), ..Default::default() }),
    ];
    for input in &bad {
        match model.preprocessor.preprocess(input) {
            Err(BackendError::Validation(_)) => {}
            other => panic!("must be a validation error, got {other:?}"),
        }
    }
    model.preprocessor.preprocess(&model.preprocessor.warmup_input()).expect("warm-up input");
}

/// The patch tokens `prism train fusion --tokens` reads: 16 of them (32 px / 8 px patches), each
/// as wide as the model, the same in a batch as alone, and different for different digits.
#[test]
fn patch_tokens_are_one_per_patch_and_independent_of_the_batch() {
    let mut model = load();
    let reference = reference();
    let prepared: Vec<_> = reference.items[..2]
        .iter()
        .map(|it| {
            let bytes = std::fs::read(model_dir().join("samples").join(&it.png)).expect("sample png");
            model.preprocessor.preprocess(&image_input(&bytes)).expect("preprocess")
        })
        .collect();
    let both = model.encoder.encode_tokens(&prepared).expect("patch tokens");
    let alone = model.encoder.encode_tokens(&prepared[..1]).expect("patch tokens");
    assert_eq!((both[0].dim, both[0].rows()), (64, 16));
    assert!(common::cosine(&both[0].values, &alone[0].values) > 0.99999, "a batch changed the tokens");
    assert!(both[0].values.iter().all(|x| x.is_finite()));
    if reference.items[0].label != reference.items[1].label {
        assert!(common::cosine(&both[0].values, &both[1].values) < 0.999, "two digits gave the same tokens");
    }
}
