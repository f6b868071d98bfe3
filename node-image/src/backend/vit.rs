//! Vision nodes: ViT (`--architecture vit`, HF `ViTModel` / `ViTForImageClassification` layout)
//! and CLIP's vision tower (`--architecture clip-vision`, HF `CLIPVisionModelWithProjection`
//! layout). Both are a patch-embedding conv, a class token, learned position embeddings and
//! pre-norm transformer blocks (the shared core in `transformer.rs`); they differ in tensor names,
//! CLIP's extra pre-LayerNorm and its projection.
//!
//! Input: PNG or JPEG bytes (`image_base64`). Preprocessing follows the folder's
//! preprocessor_config.json: with `crop_size` (CLIP) resize the shortest edge to `size` then centre
//! crop; without it (ViT) resize to `size` directly; rescale by 1/255, normalise by
//! `image_mean`/`image_std`. Bilinear (triangle) filtering; an image already at the target size is
//! not resampled at all, so a 1:1 input reaches the model bit-exact.
//!
//! Embedding: ViT - the class token after the final LayerNorm, through the pooler (dense + tanh)
//! when the checkpoint has one (HF's `pooler_output`); CLIP - the post-LayerNorm class token through
//! `visual_projection` (HF's `image_embeds`). L2-normalised.

use std::sync::Arc;

use base64::Engine;
use candle_core::{Device, Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder};
use prism_api::wire::node::EmbedInput;
use serde::Deserialize;

use super::cpu::prenorm::Shape;
use super::transformer::{self as core, Act, BlockNames, Blocks, CLIP_NAMES, VIT_NAMES};
use super::{
    device_name, l2_normalize, BackendError, Encoder, LoadSpec, LoadedModel, ModelInfo, Prepared, Preprocessor,
    TokenStates,
};

/// Largest accepted image side: decoding is bounded before allocation, so a tiny compressed file
/// claiming a huge canvas cannot exhaust memory.
const MAX_SIDE: u32 = 8192;

#[derive(Debug, Clone, Deserialize)]
struct VitConfig {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    image_size: usize,
    patch_size: usize,
    #[serde(default = "default_channels")]
    num_channels: usize,
    /// CLIP only.
    #[serde(default)]
    projection_dim: Option<usize>,
}

fn default_act() -> String {
    "gelu".into()
}
fn default_eps() -> f64 {
    1e-12
}
fn default_channels() -> usize {
    3
}

/// CLIP's full config nests the vision tower's under `vision_config`.
#[derive(Deserialize)]
struct ClipConfig {
    vision_config: VitConfig,
    #[serde(default)]
    projection_dim: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeSpec {
    Square(usize),
    Hw { height: usize, width: usize },
    Shortest { shortest_edge: usize },
}

#[derive(Debug, Clone, Deserialize)]
struct PreprocessorConfig {
    #[serde(default = "yes")]
    do_resize: bool,
    size: Option<SizeSpec>,
    #[serde(default)]
    do_center_crop: Option<bool>,
    crop_size: Option<SizeSpec>,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "default_rescale")]
    rescale_factor: f32,
    #[serde(default = "yes")]
    do_normalize: bool,
    image_mean: Option<Vec<f32>>,
    image_std: Option<Vec<f32>>,
}

fn yes() -> bool {
    true
}
fn default_rescale() -> f32 {
    1.0 / 255.0
}

/// The resolved preprocessing recipe.
#[derive(Debug, Clone)]
pub struct ImagePipeline {
    /// Resize target: (height, width) exact, or shortest edge.
    resize: Option<Resize>,
    crop: Option<(usize, usize)>,
    rescale: f32,
    mean: [f32; 3],
    std: [f32; 3],
    /// Final (height, width) = the model's image_size.
    out: usize,
}

#[derive(Debug, Clone, Copy)]
enum Resize {
    Exact(usize, usize),
    Shortest(usize),
}

fn hw(s: &SizeSpec) -> (usize, usize) {
    match *s {
        SizeSpec::Square(n) | SizeSpec::Shortest { shortest_edge: n } => (n, n),
        SizeSpec::Hw { height, width } => (height, width),
    }
}

impl ImagePipeline {
    fn from_config(p: &PreprocessorConfig, image_size: usize) -> Self {
        let crop = match (&p.crop_size, p.do_center_crop) {
            (Some(c), Some(true) | None) => Some(hw(c)),
            _ => None,
        };
        let resize = if !p.do_resize {
            None
        } else {
            match (&p.size, crop) {
                (Some(SizeSpec::Shortest { shortest_edge }), _) => Some(Resize::Shortest(*shortest_edge)),
                (Some(SizeSpec::Square(n)), Some(_)) => Some(Resize::Shortest(*n)),
                (Some(s), _) => {
                    let (h, w) = hw(s);
                    Some(Resize::Exact(h, w))
                }
                (None, _) => Some(Resize::Exact(image_size, image_size)),
            }
        };
        let three = |v: &Option<Vec<f32>>, d: f32| match v.as_deref() {
            Some([a, b, c, ..]) => [*a, *b, *c],
            Some([a]) => [*a; 3],
            _ => [d; 3],
        };
        let (mean, std) =
            if p.do_normalize { (three(&p.image_mean, 0.5), three(&p.image_std, 0.5)) } else { ([0.0; 3], [1.0; 3]) };
        Self { resize, crop, rescale: if p.do_rescale { p.rescale_factor } else { 1.0 }, mean, std, out: image_size }
    }

    /// The recipe of a `preprocessor_config.json` (text) for a model of `image_size`; the fuzz
    /// target drives the decoder through this, exactly as a loaded model would.
    pub fn from_preprocessor_json(json: &str, image_size: usize) -> Result<Self, BackendError> {
        let p: PreprocessorConfig =
            serde_json::from_str(json).map_err(|e| BackendError::Load(format!("preprocessor_config.json: {e}")))?;
        Ok(Self::from_config(&p, image_size))
    }

    /// Decodes and preprocesses an image into CHW f32 of `out x out`.
    pub fn run(&self, bytes: &[u8]) -> Result<Vec<f32>, BackendError> {
        let bad = |m: String| BackendError::Validation(m);
        let format = image::guess_format(bytes)
            .map_err(|_| bad("image_base64 is not a PNG or JPEG image (unrecognised header)".into()))?;
        if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
            return Err(bad(format!("image format {format:?} is not accepted; send PNG or JPEG")));
        }
        let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(MAX_SIDE);
        limits.max_image_height = Some(MAX_SIDE);
        limits.max_alloc = Some(512 * 1024 * 1024);
        reader.limits(limits);
        let img = reader.decode().map_err(|e| bad(format!("decoding {format:?} image: {e}")))?;
        let mut img = img.to_rgb8();
        if img.width() == 0 || img.height() == 0 {
            return Err(bad("image is empty".into()));
        }
        let filter = image::imageops::FilterType::Triangle;
        match self.resize {
            Some(Resize::Exact(h, w)) if (img.height() as usize, img.width() as usize) != (h, w) => {
                img = image::imageops::resize(&img, w as u32, h as u32, filter);
            }
            Some(Resize::Shortest(s)) => {
                let (w0, h0) = (img.width() as usize, img.height() as usize);
                let (w, h) =
                    if w0 <= h0 { (s, (h0 * s).div_ceil(w0).max(1)) } else { ((w0 * s).div_ceil(h0).max(1), s) };
                if (w, h) != (w0, h0) {
                    img = image::imageops::resize(&img, w as u32, h as u32, filter);
                }
            }
            _ => {}
        }
        if let Some((ch, cw)) = self.crop {
            let (w0, h0) = (img.width() as usize, img.height() as usize);
            if w0 < cw || h0 < ch {
                // Smaller than the crop: upscale to cover it first (HF pads instead; both rare).
                img = image::imageops::resize(&img, cw.max(w0) as u32, ch.max(h0) as u32, filter);
            }
            let (x, y) = ((img.width() as usize - cw) / 2, (img.height() as usize - ch) / 2);
            img = image::imageops::crop_imm(&img, x as u32, y as u32, cw as u32, ch as u32).to_image();
        }
        if (img.height() as usize, img.width() as usize) != (self.out, self.out) {
            return Err(BackendError::Inference(format!(
                "preprocessor_config.json yields {}x{} images but the model expects {}x{}",
                img.height(),
                img.width(),
                self.out,
                self.out
            )));
        }
        let n = self.out * self.out;
        let mut chw = vec![0f32; 3 * n];
        for (i, px) in img.pixels().enumerate() {
            for c in 0..3 {
                chw[c * n + i] = (px[c] as f32 * self.rescale - self.mean[c]) / self.std[c];
            }
        }
        Ok(chw)
    }
}

/// Extracts the image bytes of a vision input, or says why the input is not an image.
pub fn input_image(input: &EmbedInput) -> Result<Vec<u8>, BackendError> {
    let msg = "this is a vision node: each input must be {\"image_base64\": \"<PNG or JPEG, base64>\"}";
    let EmbedInput::Item(item) = input else {
        return Err(BackendError::Validation(msg.into()));
    };
    let (Some(b64), None, None, None) = (&item.image_base64, &item.text, &item.audio_base64, &item.embeddings) else {
        return Err(BackendError::Validation(msg.into()));
    };
    base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| BackendError::Validation(format!("image_base64 is not valid base64: {e}")))
}

pub struct VitPreprocessor {
    pipeline: ImagePipeline,
}

/// A preprocessed image, CHW.
pub struct Pixels(pub Vec<f32>);

impl Preprocessor for VitPreprocessor {
    fn preprocess(&self, input: &EmbedInput) -> Result<Prepared, BackendError> {
        Ok(Prepared::new(1, Pixels(self.pipeline.run(&input_image(input)?)?)))
    }

    fn warmup_input(&self) -> EmbedInput {
        // A mid-grey square PNG at the model's size.
        let img = image::RgbImage::from_pixel(
            self.pipeline.out as u32,
            self.pipeline.out as u32,
            image::Rgb([128, 128, 128]),
        );
        let mut png = std::io::Cursor::new(Vec::new());
        // Encoding a small in-memory image cannot fail; if it did, the warm-up would report a
        // validation error at startup, which is the right place to see it.
        let _ = img.write_to(&mut png, image::ImageFormat::Png);
        EmbedInput::Item(prism_api::wire::node::InputItem {
            image_base64: Some(base64::engine::general_purpose::STANDARD.encode(png.into_inner())),
            ..Default::default()
        })
    }
}

pub struct VitEncoder {
    patch: Conv2d,
    cls: Tensor,
    positions: Tensor,
    pre_ln: Option<LayerNorm>,
    blocks: Blocks,
    final_ln: LayerNorm,
    head: Head,
    image_size: usize,
    device: Device,
}

enum Head {
    /// ViT: HF pooler (dense + tanh) over the class token.
    Pooler(Linear),
    /// ViT without a pooler: the class token itself.
    Cls,
    /// CLIP: visual_projection (no bias).
    Projection(Linear),
}

impl VitEncoder {
    /// [b, 3, s, s] -> [b, dim] (before L2).
    pub fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.states(pixels)?;
        // ViT normalises every token then takes the class token; CLIP normalises the class token
        // only. LayerNorm is per token, so the two orders are the same.
        let cls = self.final_ln.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        match &self.head {
            Head::Pooler(l) => l.forward(&cls)?.tanh(),
            Head::Cls => Ok(cls),
            Head::Projection(l) => l.forward(&cls),
        }
    }

    /// The patch tokens after the final LayerNorm: [b, patches, d] (the class token left out).
    pub fn patch_tokens(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.states(pixels)?;
        let n = x.dim(1)?;
        self.final_ln.forward(&x.narrow(1, 1, n - 1)?)
    }

    /// Class token then patch tokens after the last block: [b, 1 + patches, d].
    fn states(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.patch.forward(pixels)?; // [b, d, s/p, s/p]
        let (b, d, _, _) = x.dims4()?;
        let x = x.flatten_from(2)?.transpose(1, 2)?; // [b, n, d]
        let cls = self.cls.reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &x], 1)?;
        let mut x = x.broadcast_add(&self.positions)?;
        if let Some(ln) = &self.pre_ln {
            x = ln.forward(&x)?;
        }
        self.blocks.forward(&x)
    }

    fn pixels(&self, batch: &[Prepared]) -> Result<Tensor, BackendError> {
        let s = self.image_size;
        let mut flat = Vec::with_capacity(batch.len() * 3 * s * s);
        for p in batch {
            flat.extend_from_slice(&p.payload::<Pixels>()?.0);
        }
        Ok(Tensor::from_vec(flat, (batch.len(), 3, s, s), &self.device)?)
    }
}

impl Encoder for VitEncoder {
    fn encode_batch(&mut self, batch: &[Prepared]) -> Result<Vec<Vec<f32>>, BackendError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let out: Vec<Vec<f32>> = self.forward(&self.pixels(batch)?)?.to_vec2()?;
        Ok(out
            .into_iter()
            .map(|mut v| {
                l2_normalize(&mut v);
                v
            })
            .collect())
    }

    fn encode_tokens(&mut self, batch: &[Prepared]) -> Result<Vec<TokenStates>, BackendError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let tokens = self.patch_tokens(&self.pixels(batch)?)?;
        let dim = tokens.dim(2)?;
        (0..batch.len()).map(|i| Ok(TokenStates { dim, values: tokens.get(i)?.flatten_all()?.to_vec1()? })).collect()
    }
}

fn read_preprocessor(dir: &std::path::Path) -> Result<PreprocessorConfig, BackendError> {
    serde_json::from_str(&core::read_model_file(dir, "preprocessor_config.json")?)
        .map_err(|e| BackendError::Load(format!("preprocessor_config.json: {e}")))
}

struct Layout {
    names: BlockNames,
    clip: bool,
}

fn build(
    spec: &LoadSpec,
    cfg: VitConfig,
    projection_dim: Option<usize>,
    layout: Layout,
    vb: VarBuilder,
) -> Result<LoadedModel, BackendError> {
    let device = spec.device.resolve()?;
    if !cfg.image_size.is_multiple_of(cfg.patch_size) || cfg.num_channels != 3 {
        return Err(BackendError::Load(format!(
            "image_size {} must be a multiple of patch_size {} with 3 channels (got {})",
            cfg.image_size, cfg.patch_size, cfg.num_channels
        )));
    }
    let pre = read_preprocessor(&spec.dir)?;
    let pipeline = ImagePipeline::from_config(&pre, cfg.image_size);
    let act = Act::from_hf(&cfg.hidden_act)?;
    let d = cfg.hidden_size;
    let n_pos = (cfg.image_size / cfg.patch_size).pow(2) + 1;
    let conv = Conv2dConfig { stride: cfg.patch_size, ..Default::default() };
    let e = core::load_err("vision weights");
    let arch = if layout.clip { "clip-vision" } else { "vit" };
    let (emb, enc, blocks_prefix) = if layout.clip {
        (vb.pp("embeddings"), vb.pp("encoder"), "layers")
    } else {
        (vb.pp("embeddings"), vb.pp("encoder"), "layer")
    };
    let patch = if layout.clip {
        candle_nn::conv2d_no_bias(3, d, cfg.patch_size, conv, emb.pp("patch_embedding")).map_err(&e)?
    } else {
        candle_nn::conv2d(3, d, cfg.patch_size, conv, emb.pp("patch_embeddings.projection")).map_err(&e)?
    };
    let (cls, positions) = if layout.clip {
        (
            emb.get(d, "class_embedding").map_err(&e)?,
            emb.get((n_pos, d), "position_embedding.weight").map_err(&e)?.unsqueeze(0).map_err(&e)?,
        )
    } else {
        (emb.get((1, 1, d), "cls_token").map_err(&e)?, emb.get((1, n_pos, d), "position_embeddings").map_err(&e)?)
    };
    let layers: Vec<VarBuilder> = (0..cfg.num_hidden_layers).map(|i| enc.pp(format!("{blocks_prefix}.{i}"))).collect();
    let shape =
        Shape { hidden: d, heads: cfg.num_attention_heads, ffn: cfg.intermediate_size, eps: cfg.layer_norm_eps };
    let blocks = Blocks::load(&layers, &layout.names, shape, act, None, &device, "vision weights")?;
    tracing::info!(kernels = blocks.kernels(), "vision encoder blocks");
    let (pre_ln, final_ln, head, dim) = if layout.clip {
        let pdim = projection_dim.or(cfg.projection_dim).unwrap_or(d);
        (
            Some(candle_nn::layer_norm(d, cfg.layer_norm_eps, vb.pp("pre_layrnorm")).map_err(&e)?),
            candle_nn::layer_norm(d, cfg.layer_norm_eps, vb.pp("post_layernorm")).map_err(&e)?,
            Head::Projection(candle_nn::linear_no_bias(d, pdim, vb.root().pp("visual_projection")).map_err(&e)?),
            pdim,
        )
    } else {
        let head = if vb.contains_tensor("pooler.dense.weight") {
            Head::Pooler(candle_nn::linear(d, d, vb.pp("pooler.dense")).map_err(&e)?)
        } else {
            Head::Cls
        };
        (None, candle_nn::layer_norm(d, cfg.layer_norm_eps, vb.pp("layernorm")).map_err(&e)?, head, d)
    };
    let encoder = VitEncoder {
        patch,
        cls,
        positions,
        pre_ln,
        blocks,
        final_ln,
        head,
        image_size: cfg.image_size,
        device: device.clone(),
    };
    Ok(LoadedModel {
        info: ModelInfo {
            modality: "vision".into(),
            architecture: arch.into(),
            dim,
            device: device_name(&device),
            max_input_tokens: None,
            classifier: None,
        },
        preprocessor: Arc::new(VitPreprocessor { pipeline }),
        encoder: Box::new(encoder),
    })
}

/// `--architecture vit`.
pub fn load(spec: &LoadSpec) -> Result<LoadedModel, BackendError> {
    let cfg: VitConfig = serde_json::from_str(&core::read_model_file(&spec.dir, "config.json")?)
        .map_err(|e| BackendError::Load(format!("config.json is not a ViT config: {e}")))?;
    let device = spec.device.resolve()?;
    let vb = core::var_builder(spec, &device)?;
    // ViTForImageClassification (and most hub checkpoints) prefix everything with `vit.`; a bare
    // ViTModel does not.
    let vb = if vb.contains_tensor("vit.embeddings.cls_token") { vb.pp("vit") } else { vb };
    build(spec, cfg, None, Layout { names: VIT_NAMES, clip: false }, vb)
}

/// `--architecture clip-vision`: the vision tower + projection of a CLIP checkpoint (full CLIPModel
/// or CLIPVisionModelWithProjection).
pub fn load_clip(spec: &LoadSpec) -> Result<LoadedModel, BackendError> {
    let text = core::read_model_file(&spec.dir, "config.json")?;
    let (cfg, pdim) = match serde_json::from_str::<ClipConfig>(&text) {
        Ok(c) => (c.vision_config, c.projection_dim),
        Err(_) => {
            let c: VitConfig = serde_json::from_str(&text)
                .map_err(|e| BackendError::Load(format!("config.json is not a CLIP (vision) config: {e}")))?;
            let p = c.projection_dim;
            (c, p)
        }
    };
    let cfg =
        VitConfig { layer_norm_eps: if text.contains("layer_norm_eps") { cfg.layer_norm_eps } else { 1e-5 }, ..cfg };
    let device = spec.device.resolve()?;
    let vb = core::var_builder(spec, &device)?;
    let vb = vb.pp("vision_model");
    build(spec, cfg, pdim, Layout { names: CLIP_NAMES, clip: true }, vb)
}
