//! `clip-vision` on a small generated checkpoint in the exact HF CLIPModel layout
//! (`vision_model.*`, `visual_projection.weight`), checked against candle-transformers' own,
//! independently written CLIP vision transformer run on the same weights and pixels.

use base64::Engine;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::clip::text_model::Activation;
use candle_transformers::models::clip::vision_model::{ClipVisionConfig, ClipVisionTransformer};
use prism_api::wire::node::{EmbedInput, InputItem};
use prism_node::backend::{self, DeviceChoice, LoadSpec};

const S: usize = 32;
const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

#[test]
fn clip_vision_matches_candle_transformers_reference() {
    let dir = std::env::temp_dir().join(format!("prism-clip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cfg = ClipVisionConfig {
        embed_dim: 48,
        activation: Activation::QuickGelu,
        intermediate_size: 96,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        projection_dim: 24,
        num_channels: 3,
        image_size: S,
        patch_size: 8,
    };
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    // candle-transformers only reads the class embedding when the checkpoint has one: create it
    // first so both implementations see the same (saved) values.
    vb.pp("vision_model.embeddings")
        .get_with_hints(48, "class_embedding", candle_nn::Init::Randn { mean: 0.0, stdev: 1.0 })
        .expect("class embedding");
    let reference = ClipVisionTransformer::new(vb.pp("vision_model"), &cfg).expect("reference model");
    let projection = candle_nn::linear_no_bias(48, 24, vb.pp("visual_projection")).expect("projection");
    vm.save(dir.join("model.safetensors")).expect("save weights");
    std::fs::write(
        dir.join("config.json"),
        r#"{"projection_dim": 24, "vision_config": {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}}"#,
    )
    .expect("config");
    std::fs::write(
        dir.join("preprocessor_config.json"),
        format!(
            r#"{{"do_resize": true, "size": {{"shortest_edge": {S}}}, "do_center_crop": true, "crop_size": {{"height": {S}, "width": {S}}},
            "do_rescale": true, "rescale_factor": 0.00392156862745098, "do_normalize": true, "image_mean": {MEAN:?}, "image_std": {STD:?}}}"#
        ),
    )
    .expect("preprocessor config");

    // A random RGB image at the model's size: decoded and normalised by the node, by hand here.
    let pixels: Vec<u8> = (0..S * S * 3).map(|i| ((i * 7919 + 13) % 251) as u8).collect();
    let img = image::RgbImage::from_raw(S as u32, S as u32, pixels.clone()).expect("image");
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png).expect("png");
    let mut chw = vec![0f32; 3 * S * S];
    for i in 0..S * S {
        for c in 0..3 {
            chw[c * S * S + i] = (pixels[i * 3 + c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    let x = Tensor::from_vec(chw, (1, 3, S, S), &Device::Cpu).expect("tensor");
    let want: Vec<f32> = projection
        .forward(&reference.forward(&x).expect("reference forward"))
        .expect("proj")
        .squeeze(0)
        .expect("sq")
        .to_vec1()
        .expect("vec");

    let mut model =
        backend::load("clip-vision", &LoadSpec::new(dir.clone(), DeviceChoice::Cpu)).expect("load clip-vision");
    assert_eq!(model.info.dim, 24);
    let input = |bytes: Vec<u8>| {
        EmbedInput::Item(InputItem {
            image_base64: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
            ..Default::default()
        })
    };
    let p = model.preprocessor.preprocess(&input(png.into_inner())).expect("preprocess");
    let got = model.encoder.encode_batch(&[p]).expect("encode").remove(0);
    let dot: f64 = got.iter().zip(&want).map(|(a, b)| *a as f64 * *b as f64).sum();
    let nw = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
    let c = dot / nw; // got is unit-norm
    eprintln!("clip-vision vs candle-transformers CLIP: cosine {c:.8}");
    assert!(c >= 0.9999, "cosine {c}");

    // A non-square image goes through shortest-edge resize + centre crop.
    let wide = image::RgbImage::from_pixel(80, 40, image::Rgb([200, 30, 90]));
    let mut buf = std::io::Cursor::new(Vec::new());
    wide.write_to(&mut buf, image::ImageFormat::Png).expect("png");
    let p = model.preprocessor.preprocess(&input(buf.into_inner())).expect("preprocess wide image");
    assert_eq!(model.encoder.encode_batch(&[p]).expect("encode").remove(0).len(), 24);
    let _ = std::fs::remove_dir_all(dir);
}
