//! The node's decoders on untrusted bytes: images (PNG/JPEG/... through the ViT preprocessing
//! recipe) and WAV audio (RIFF parsing + resampling). The first byte picks the decoder so one
//! corpus covers both. Must never panic, hang or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prism_node::backend::vit::ImagePipeline;
use prism_node::backend::whisper::decode_wav;

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    if which % 2 == 0 {
        let pipeline = ImagePipeline::from_preprocessor_json(
            r#"{"size":{"height":32,"width":32},"image_mean":[0.5,0.5,0.5],"image_std":[0.5,0.5,0.5]}"#,
            32,
        )
        .expect("fixed recipe");
        let _ = pipeline.run(bytes);
    } else {
        let _ = decode_wav(bytes);
    }
});
