//! The Open Inference Protocol v2 (KServe's V2 protocol, Triton's HTTP/gRPC API): server and
//! model metadata, readiness, and `infer`, over the same engine as `/v1/*`. The HTTP handlers
//! (`http.rs`) and the gRPC service (`oip_grpc.rs`) only move bytes: every rule about tensors
//! (datatypes, shapes, the binary extension, what a modality accepts) lives here, once.
//!
//! Models. A router serves one pipeline; its models are
//! * the pipeline (its name): one input per encoder modality (send any subset, the router fans
//!   out, fuses and degrades as `/v1/infer` does), output `embedding` = the fused vector;
//! * each encoder modality and each ModalityNode serving one (the names of `GET /v1/models`):
//!   one input named after the modality, output `embedding` = that modality's vector.
//!
//! Tensors (the batch is the first dimension, one embedding per item):
//! * text: `BYTES` `[batch]` (or `[batch, 1]`), UTF-8 elements;
//! * images: `BYTES` `[batch]` of encoded PNG/JPEG files, or `UINT8` `[batch, H, W, C]` pixels
//!   (C = 1, 3 or 4), which the router wraps losslessly in a PNG for the node;
//! * audio: `FP32` `[batch, samples]` mono samples in [-1, 1] at 16000 Hz (a `sample_rate`
//!   input parameter other than 16000 is refused), or `BYTES` `[batch]` of WAV files;
//! * output `embedding`: `FP32` `[batch, dim]`.
//!
//! In JSON, `BYTES` elements are strings: UTF-8 text for text, base64 for image and audio files
//! (JSON strings cannot carry raw bytes; the binary extension sends them as they are).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use base64::Engine as _;
use futures::StreamExt;
use prism_api::pipeline::NodeRole;
use prism_api::wire::frontdoor::clip;
use prism_api::wire::node::{EmbedInput, InputItem, NodeInfo};
use prism_api::wire::router::InferRequest;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use thiserror::Error;

use crate::engine::{Router, Snapshot};
use crate::error::RouterError;

/// The binary tensor data extension's header: the length of the JSON part of the body.
pub const HEADER_LENGTH: &str = "inference-header-content-length";
/// What `GET /v2` lists.
pub const EXTENSIONS: &[&str] = &["binary_tensor_data"];
/// The only output of every model.
pub const OUTPUT: &str = "embedding";
/// Sample rate of `FP32` audio tensors: the whisper encoder's (the node refuses other rates).
pub const AUDIO_SAMPLE_RATE: i64 = 16_000;
/// Most items in one infer call (the same bound as `/v1/embeddings`).
pub const MAX_BATCH: usize = 2048;
/// Pipeline items run through the engine this many at a time (each is a fan-out of its own).
const PIPELINE_CONCURRENCY: usize = 16;
/// Model versions are not modelled: every model has one, `1`.
pub const VERSION: &str = "1";

/// Why an OIP call failed. Bad requests are 400 (OIP's status, where `/v1` says 422), unknown
/// models 404; everything else keeps the engine's status. The body is OIP's `{"error": "..."}`.
#[derive(Debug, Error)]
pub enum OipError {
    #[error("model '{model}' is not served by this router; models: {known}")]
    ModelNotFound { model: String, known: String },
    /// A tensor is wrong: the message names the input.
    #[error("input '{input}': {message}")]
    BadInput { input: String, message: String },
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Router(#[from] RouterError),
}

impl OipError {
    fn input(input: &str, message: impl Into<String>) -> Self {
        OipError::BadInput { input: clip(input, 64), message: message.into() }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            OipError::ModelNotFound { .. } => StatusCode::NOT_FOUND,
            OipError::BadInput { .. } | OipError::BadRequest(_) => StatusCode::BAD_REQUEST,
            OipError::Router(e) if e.status() == StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            OipError::Router(e) => e.status(),
        }
    }

    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            OipError::ModelNotFound { .. } => tonic::Code::NotFound,
            OipError::BadInput { .. } | OipError::BadRequest(_) => tonic::Code::InvalidArgument,
            OipError::Router(e) => e.grpc_code(),
        }
    }

    /// OIP's error body.
    pub fn body(&self) -> Value {
        json!({ "error": self.to_string() })
    }
}

impl axum::response::IntoResponse for OipError {
    fn into_response(self) -> axum::response::Response {
        let status = self.status();
        let body = axum::body::Body::from(self.body().to_string());
        // Keep the engine's headers (Retry-After, WWW-Authenticate, Connection: close), with
        // OIP's body and status.
        let mut resp = match self {
            OipError::Router(e) => e.into_response(),
            _ => axum::response::Response::new(axum::body::Body::empty()),
        };
        *resp.status_mut() = status;
        resp.headers_mut().remove(axum::http::header::CONTENT_LENGTH);
        resp.headers_mut()
            .insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/json"));
        *resp.body_mut() = body;
        resp
    }
}

impl From<OipError> for tonic::Status {
    fn from(e: OipError) -> Self {
        tonic::Status::new(e.grpc_code(), e.to_string())
    }
}

/// Whether `path` is an infer route: the only one whose body may be the binary extension.
pub fn is_infer_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/v2/models/") else { return false };
    let Some(name) = rest.strip_suffix("/infer") else { return false };
    !name.is_empty() && !name.contains('/')
}

// ---------------------------------------------------------------------------------------------
// Models

/// What a model name routes to.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// The whole pipeline: these encoder modalities, fused.
    Pipeline(Vec<String>),
    /// One modality.
    Modality(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub name: String,
    pub target: Target,
}

impl Model {
    /// The modalities this model's inputs are named after.
    pub fn modalities(&self) -> Vec<String> {
        match &self.target {
            Target::Pipeline(ms) => ms.clone(),
            Target::Modality(m) => vec![m.clone()],
        }
    }
}

/// Every model of this snapshot: the pipeline first, then the `/v1/models` names (modalities,
/// nodes). One list of names for both protocols ([`crate::openai::catalog`]); only what the
/// pipeline's own name means differs (here: the whole pipeline).
pub fn models(snap: &Snapshot) -> Vec<Model> {
    let encoders: Vec<String> =
        snap.configs.iter().filter(|(_, c)| c.role == NodeRole::Encoder).map(|(m, _)| m.clone()).collect();
    let mut out = Vec::new();
    if !snap.pipeline.is_empty() && !encoders.is_empty() {
        out.push(Model { name: snap.pipeline.clone(), target: Target::Pipeline(encoders) });
    }
    for e in crate::openai::catalog(snap, 0) {
        if e.kind != "pipeline" && e.id != snap.pipeline {
            out.push(Model { name: e.id, target: Target::Modality(e.modality) });
        }
    }
    out
}

/// The model called `name` (version empty or [`VERSION`]), or a 404 listing the models.
pub fn resolve(snap: &Snapshot, name: &str, version: &str) -> Result<Model, OipError> {
    let all = models(snap);
    let found = all.iter().find(|m| m.name == name).cloned();
    match found {
        Some(m) if version.is_empty() || version == VERSION => Ok(m),
        Some(_) => Err(OipError::ModelNotFound {
            model: format!("{}' version '{}", clip(name, 100), clip(version, 20)),
            known: format!("{name} (version {VERSION} only)"),
        }),
        None => {
            let known: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
            Err(OipError::ModelNotFound {
                model: clip(name, 100),
                known: if known.is_empty() { "(none: no routing table loaded)".into() } else { known.join(", ") },
            })
        }
    }
}

/// What a modality's node takes, from its `GET /info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Image,
    Audio,
}

impl Kind {
    /// From a node's `modality` (`text`, `vision`, `audio`, ...). Anything else takes text, as
    /// the node API's bare-string input does.
    pub fn of_node(modality: &str) -> Kind {
        match modality {
            "vision" | "image" => Kind::Image,
            "audio" | "speech" => Kind::Audio,
            _ => Kind::Text,
        }
    }

    /// The datatype and shape metadata lists for an input of this kind.
    pub fn input_meta(self) -> (&'static str, Vec<i64>) {
        match self {
            Kind::Text | Kind::Image => ("BYTES", vec![-1]),
            Kind::Audio => ("FP32", vec![-1, -1]),
        }
    }
}

/// One modality's input kind and embedding width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModalityInfo {
    pub kind: Kind,
    pub dim: usize,
}

/// Tensor metadata (`inputs` / `outputs` of model metadata).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TensorMeta {
    pub name: String,
    pub datatype: &'static str,
    pub shape: Vec<i64>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelMeta {
    pub name: String,
    pub versions: Vec<String>,
    pub platform: String,
    pub inputs: Vec<TensorMeta>,
    pub outputs: Vec<TensorMeta>,
}

// ---------------------------------------------------------------------------------------------
// Tensors

/// The datatypes a Prism model takes; any other OIP datatype is refused by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datatype {
    Bytes,
    Fp32,
    Uint8,
}

const OIP_DATATYPES: &[&str] = &[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "BF16", "FP32", "FP64",
    "BYTES",
];

impl Datatype {
    fn parse(input: &str, s: &str) -> Result<Datatype, OipError> {
        match s {
            "BYTES" => Ok(Datatype::Bytes),
            "FP32" => Ok(Datatype::Fp32),
            "UINT8" => Ok(Datatype::Uint8),
            other if OIP_DATATYPES.contains(&other) => Err(OipError::input(
                input,
                format!("datatype {other} is not accepted: Prism models take BYTES (text, image or audio files), UINT8 (image pixels) or FP32 (audio samples)"),
            )),
            other => Err(OipError::input(input, format!("{:?} is not an OIP datatype", clip(other, 20)))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Datatype::Bytes => "BYTES",
            Datatype::Fp32 => "FP32",
            Datatype::Uint8 => "UINT8",
        }
    }
}

/// A decoded input tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub datatype: Datatype,
    pub shape: Vec<usize>,
    pub data: Data,
    /// The `sample_rate` input parameter, when sent.
    pub sample_rate: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Bytes(Vec<Vec<u8>>),
    Fp32(Vec<f32>),
    Uint8(Vec<u8>),
}

/// An input as a transport delivers it, before any check.
#[derive(Debug, Clone)]
pub struct RawInput {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub sample_rate: Option<i64>,
    pub content: Content,
}

#[derive(Debug, Clone)]
pub enum Content {
    /// JSON `data` (nested or flat, row-major).
    Json(Value),
    /// Binary extension / gRPC raw contents: little-endian elements, BYTES length-prefixed.
    Raw(Vec<u8>),
    /// gRPC typed contents.
    Bytes(Vec<Vec<u8>>),
    Fp32(Vec<f32>),
    Uint(Vec<u32>),
    /// No data at all.
    Missing,
}

/// Element count of `shape`, refusing negative dimensions and overflow.
fn element_count(input: &str, shape: &[i64]) -> Result<(Vec<usize>, usize), OipError> {
    let mut dims = Vec::with_capacity(shape.len());
    let mut n: usize = 1;
    for &d in shape {
        let d = usize::try_from(d)
            .map_err(|_| OipError::input(input, format!("shape {shape:?} has a negative dimension")))?;
        n = n.checked_mul(d).ok_or_else(|| OipError::input(input, format!("shape {shape:?} is too large")))?;
        dims.push(d);
    }
    if dims.is_empty() {
        return Err(OipError::input(input, "shape is empty; the first dimension is the batch"));
    }
    Ok((dims, n))
}

/// Split BYTES raw contents (`u32` little-endian length, then the bytes, per element).
fn split_bytes(input: &str, raw: &[u8]) -> Result<Vec<Vec<u8>>, OipError> {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(OipError::input(input, "BYTES data ends inside an element's 4-byte length"));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > tail.len() {
            return Err(OipError::input(
                input,
                format!("BYTES element {} claims {len} bytes but only {} remain", out.len(), tail.len()),
            ));
        }
        out.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    Ok(out)
}

fn flatten(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|x| flatten(x, out)),
        other => out.push(other.clone()),
    }
}

/// Check and decode one input: datatype, shape against the number of elements, element types.
pub fn decode(raw: RawInput) -> Result<Tensor, OipError> {
    let name = raw.name.as_str();
    let datatype = Datatype::parse(name, &raw.datatype)?;
    let (shape, count) = element_count(name, &raw.shape)?;
    let data = match (datatype, raw.content) {
        (_, Content::Missing) => {
            return Err(OipError::input(name, "has no data: send `data`, or binary data with `binary_data_size`"))
        }
        (Datatype::Bytes, Content::Raw(b)) => Data::Bytes(split_bytes(name, &b)?),
        (Datatype::Fp32, Content::Raw(b)) => {
            if b.len() % 4 != 0 {
                return Err(OipError::input(
                    name,
                    format!("{} bytes of FP32 data is not a whole number of elements", b.len()),
                ));
            }
            Data::Fp32(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
        }
        (Datatype::Uint8, Content::Raw(b)) => Data::Uint8(b),
        (Datatype::Bytes, Content::Bytes(v)) => Data::Bytes(v),
        (Datatype::Fp32, Content::Fp32(v)) => Data::Fp32(v),
        (Datatype::Uint8, Content::Uint(v)) => Data::Uint8(
            v.into_iter()
                .map(u8::try_from)
                .collect::<Result<_, _>>()
                .map_err(|_| OipError::input(name, "UINT8 contents hold a value over 255"))?,
        ),
        (dt, Content::Json(v)) => {
            let mut flat = Vec::new();
            flatten(&v, &mut flat);
            let bad = |i: usize, want: &str| {
                OipError::input(name, format!("data[{i}] is not {want} (datatype {})", dt.name()))
            };
            match dt {
                Datatype::Bytes => Data::Bytes(
                    flat.iter()
                        .enumerate()
                        .map(|(i, x)| x.as_str().map(|s| s.as_bytes().to_vec()).ok_or_else(|| bad(i, "a string")))
                        .collect::<Result<_, _>>()?,
                ),
                Datatype::Fp32 => Data::Fp32(
                    flat.iter()
                        .enumerate()
                        .map(|(i, x)| x.as_f64().map(|f| f as f32).ok_or_else(|| bad(i, "a number")))
                        .collect::<Result<_, _>>()?,
                ),
                Datatype::Uint8 => Data::Uint8(
                    flat.iter()
                        .enumerate()
                        .map(|(i, x)| {
                            x.as_u64().and_then(|u| u8::try_from(u).ok()).ok_or_else(|| bad(i, "an integer in 0..=255"))
                        })
                        .collect::<Result<_, _>>()?,
                ),
            }
        }
        (dt, _) => {
            return Err(OipError::input(name, format!("the typed contents do not match datatype {}", dt.name())));
        }
    };
    let got = match &data {
        Data::Bytes(v) => v.len(),
        Data::Fp32(v) => v.len(),
        Data::Uint8(v) => v.len(),
    };
    if got != count {
        return Err(OipError::input(
            name,
            format!("shape {:?} needs {count} elements but the data has {got}", raw.shape),
        ));
    }
    Ok(Tensor { name: raw.name, datatype, shape, data, sample_rate: raw.sample_rate })
}

/// The node inputs (one per batch item) of a tensor sent to a modality of `kind`.
pub fn to_node_inputs(t: &Tensor, kind: Kind) -> Result<Vec<EmbedInput>, OipError> {
    let name = t.name.as_str();
    let Some(&batch) = t.shape.first() else {
        return Err(OipError::input(name, "shape is empty; the first dimension is the batch"));
    };
    if batch == 0 {
        return Err(OipError::input(name, "the batch (first dimension) is 0"));
    }
    if batch > MAX_BATCH {
        return Err(OipError::input(name, format!("the batch is {batch}; at most {MAX_BATCH}")));
    }
    let per_item: usize = t.shape[1..].iter().product();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    match (kind, &t.data) {
        (Kind::Text | Kind::Image, Data::Bytes(items)) | (Kind::Audio, Data::Bytes(items)) => {
            if per_item != 1 {
                return Err(OipError::input(
                    name,
                    format!("shape {:?}: BYTES inputs are [batch] or [batch, 1], one element per item", t.shape),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, b)| match kind {
                    Kind::Text => String::from_utf8(b.clone())
                        .map(EmbedInput::Text)
                        .map_err(|_| OipError::input(name, format!("element {i} is not UTF-8 text"))),
                    // A file: as raw bytes (binary extension, gRPC), or base64 in a JSON string.
                    Kind::Image | Kind::Audio => {
                        let file = as_file(b);
                        let item = if kind == Kind::Image {
                            InputItem { image_base64: Some(b64(&file)), ..Default::default() }
                        } else {
                            InputItem { audio_base64: Some(b64(&file)), ..Default::default() }
                        };
                        Ok(EmbedInput::Item(item))
                    }
                })
                .collect()
        }
        (Kind::Image, Data::Uint8(px)) => {
            let [_, h, w, c] = t.shape[..] else {
                return Err(OipError::input(
                    name,
                    format!("shape {:?}: UINT8 images are [batch, height, width, channels]", t.shape),
                ));
            };
            if !matches!(c, 1 | 3 | 4) || h == 0 || w == 0 {
                return Err(OipError::input(
                    name,
                    format!("shape {:?}: channels must be 1, 3 or 4 and sides non-zero", t.shape),
                ));
            }
            Ok(px
                .chunks_exact(per_item)
                .map(|img| {
                    let png = png_stored(w, h, c, img);
                    EmbedInput::Item(InputItem { image_base64: Some(b64(&png)), ..Default::default() })
                })
                .collect())
        }
        (Kind::Audio, Data::Fp32(samples)) => {
            if let Some(r) = t.sample_rate.filter(|r| *r != AUDIO_SAMPLE_RATE) {
                return Err(OipError::input(
                    name,
                    format!("sample_rate is {r} Hz; this model takes {AUDIO_SAMPLE_RATE} Hz mono: resample first"),
                ));
            }
            if t.shape.len() != 2 || per_item == 0 {
                return Err(OipError::input(
                    name,
                    format!("shape {:?}: FP32 audio is [batch, samples] at 16000 Hz mono", t.shape),
                ));
            }
            if let Some(i) = samples.iter().position(|x| !x.is_finite()) {
                return Err(OipError::input(name, format!("sample {i} is not finite")));
            }
            Ok(samples
                .chunks_exact(per_item)
                .map(|s| EmbedInput::Item(InputItem { audio_base64: Some(b64(&wav_f32(s))), ..Default::default() }))
                .collect())
        }
        (kind, _) => {
            let (want, _) = kind.input_meta();
            let extra = match kind {
                Kind::Image => " or UINT8 pixels",
                Kind::Audio => " or BYTES WAV files",
                Kind::Text => "",
            };
            Err(OipError::input(
                name,
                format!("datatype {} is not accepted here: send {want}{extra}", t.datatype.name()),
            ))
        }
    }
}

/// A file sent as a JSON string arrives base64-encoded; one sent as raw bytes (binary extension,
/// gRPC) arrives as it is. Raw PNG, JPEG and WAV files start with their magic bytes and pass
/// untouched; anything else that decodes as base64 is taken as base64 (PNG's 0x89 and JPEG's
/// 0xFF are not base64 characters, so those can never be mistaken).
fn as_file(b: &[u8]) -> Vec<u8> {
    let magic = b.starts_with(b"\x89PNG") || b.starts_with(&[0xFF, 0xD8]) || b.starts_with(b"RIFF");
    if !magic {
        if let Ok(d) = base64::engine::general_purpose::STANDARD.decode(b) {
            return d;
        }
    }
    b.to_vec()
}

/// IEEE float mono WAV at [`AUDIO_SAMPLE_RATE`]: the node's audio input format.
pub fn wav_f32(samples: &[f32]) -> Vec<u8> {
    let data_len = (samples.len() * 4) as u32;
    let rate = AUDIO_SAMPLE_RATE as u32;
    let mut w = Vec::with_capacity(44 + samples.len() * 4);
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + data_len).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&3u16.to_le_bytes()); // WAVE_FORMAT_IEEE_FLOAT
    w.extend_from_slice(&1u16.to_le_bytes()); // mono
    w.extend_from_slice(&rate.to_le_bytes());
    w.extend_from_slice(&(rate * 4).to_le_bytes());
    w.extend_from_slice(&4u16.to_le_bytes());
    w.extend_from_slice(&32u16.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&data_len.to_le_bytes());
    samples.iter().for_each(|s| w.extend_from_slice(&s.to_le_bytes()));
    w
}

/// A PNG of 8-bit pixels (gray, RGB or RGBA) with stored (uncompressed) deflate blocks: lossless
/// and dependency-free; the node decodes it as any PNG. It lives one hop, on loopback or the
/// cluster network, so its size does not matter much.
pub fn png_stored(width: usize, height: usize, channels: usize, px: &[u8]) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        !c
    }
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let color = match channels {
        1 => 0u8,
        4 => 6,
        _ => 2,
    };
    // Scanlines with filter byte 0.
    let row = width * channels;
    let mut raw = Vec::with_capacity(height * (row + 1));
    for y in 0..height {
        raw.push(0);
        raw.extend_from_slice(&px[y * row..(y + 1) * row]);
    }
    // zlib: header, stored blocks of at most 65535 bytes, adler32.
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = if raw.is_empty() { vec![&[][..]] } else { raw.chunks(65_535).collect() };
    for (i, b) in blocks.iter().enumerate() {
        z.push(u8::from(i + 1 == blocks.len()));
        let len = b.len() as u16;
        z.extend_from_slice(&len.to_le_bytes());
        z.extend_from_slice(&(!len).to_le_bytes());
        z.extend_from_slice(b);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &x in &raw {
        a = (a + u32::from(x)) % 65_521;
        b = (b + a) % 65_521;
    }
    z.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&(width as u32).to_be_bytes());
    ihdr.extend_from_slice(&(height as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, color, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &z);
    chunk(&mut out, b"IEND", &[]);
    out
}

// ---------------------------------------------------------------------------------------------
// Requests and answers

/// Which outputs to return, and in which form.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutputSpec {
    /// Request parameter `binary_data_output`: outputs not listed are binary.
    pub binary_default: bool,
    /// The listed outputs, each with its `binary_data` parameter; `None` = every output.
    pub requested: Option<Vec<(String, Option<bool>)>>,
}

impl OutputSpec {
    /// Whether `embedding` is returned in binary form; an unknown output name is a 400.
    pub fn binary(&self, model: &str) -> Result<bool, OipError> {
        let Some(list) = &self.requested else { return Ok(self.binary_default) };
        if let Some((bad, _)) = list.iter().find(|(n, _)| n != OUTPUT) {
            return Err(OipError::BadRequest(format!(
                "output '{}' is not an output of model '{model}' (outputs: {OUTPUT})",
                clip(bad, 64)
            )));
        }
        Ok(list.iter().find_map(|(_, b)| *b).unwrap_or(self.binary_default))
    }
}

/// A transport-neutral infer request.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: String,
    pub inputs: Vec<RawInput>,
    pub outputs: OutputSpec,
}

/// The answer: `embedding` `[batch, dim]`, plus response parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub model: String,
    pub id: String,
    pub embeddings: Vec<Vec<f32>>,
    /// `degraded`: the modalities a pipeline answer went without (comma-separated), when any.
    pub parameters: BTreeMap<String, String>,
}

impl Answer {
    pub fn dim(&self) -> usize {
        self.embeddings.first().map_or(0, Vec::len)
    }
    pub fn flat(&self) -> impl Iterator<Item = f32> + '_ {
        self.embeddings.iter().flatten().copied()
    }
    pub fn le_bytes(&self) -> Vec<u8> {
        self.flat().flat_map(f32::to_le_bytes).collect()
    }
}

#[derive(Deserialize)]
struct JsonRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    inputs: Vec<JsonInput>,
    #[serde(default)]
    outputs: Option<Vec<JsonOutput>>,
}

#[derive(Deserialize)]
struct JsonInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct JsonOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

fn param_bool(p: &Option<Map<String, Value>>, key: &str) -> Option<bool> {
    p.as_ref().and_then(|m| m.get(key)).and_then(Value::as_bool)
}

/// Parse an HTTP infer body: JSON, or (with `Inference-Header-Content-Length`) a JSON header
/// followed by the binary data of the inputs that name a `binary_data_size`, in input order.
pub fn parse_http(body: &[u8], header_length: Option<&str>) -> Result<Request, OipError> {
    let (json_part, mut binary) = match header_length {
        None => (body, &[][..]),
        Some(v) => {
            let n: usize = v.trim().parse().map_err(|_| {
                OipError::BadRequest(format!("Inference-Header-Content-Length {:?} is not a byte count", clip(v, 20)))
            })?;
            if n > body.len() {
                return Err(OipError::BadRequest(format!(
                    "Inference-Header-Content-Length is {n} but the body has only {} bytes",
                    body.len()
                )));
            }
            body.split_at(n)
        }
    };
    prism_api::wire::frontdoor::require_object(json_part).map_err(OipError::BadRequest)?;
    let req: JsonRequest =
        serde_json::from_slice(json_part).map_err(|e| OipError::BadRequest(format!("invalid infer request: {e}")))?;
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for i in req.inputs {
        let size = i.parameters.as_ref().and_then(|p| p.get("binary_data_size"));
        let content = match (size, i.data) {
            (Some(_), Some(_)) => {
                return Err(OipError::input(&i.name, "has both `data` and `binary_data_size`; send one"));
            }
            (Some(s), None) => {
                let n = s
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| OipError::input(&i.name, "binary_data_size must be a byte count"))?;
                if n > binary.len() {
                    return Err(OipError::input(
                        &i.name,
                        format!("binary_data_size is {n} but only {} binary bytes are left in the body", binary.len()),
                    ));
                }
                let (mine, rest) = binary.split_at(n);
                binary = rest;
                Content::Raw(mine.to_vec())
            }
            (None, Some(d)) => Content::Json(d),
            (None, None) => Content::Missing,
        };
        let sample_rate = i.parameters.as_ref().and_then(|p| p.get("sample_rate")).and_then(Value::as_i64);
        inputs.push(RawInput { name: i.name, datatype: i.datatype, shape: i.shape, sample_rate, content });
    }
    if !binary.is_empty() {
        return Err(OipError::BadRequest(format!(
            "{} bytes after the JSON header belong to no input (each binary input needs `binary_data_size`)",
            binary.len()
        )));
    }
    let outputs = OutputSpec {
        binary_default: param_bool(&req.parameters, "binary_data_output").unwrap_or(false),
        requested: req
            .outputs
            .map(|os| os.into_iter().map(|o| (o.name, param_bool(&o.parameters, "binary_data"))).collect()),
    };
    Ok(Request { id: req.id.unwrap_or_default(), inputs, outputs })
}

/// An HTTP infer answer: `(body, Some(json header length))` when the output is binary.
pub fn http_answer(a: &Answer, binary: bool) -> (Vec<u8>, Option<usize>) {
    let shape = [a.embeddings.len(), a.dim()];
    let mut out = json!({"name": OUTPUT, "datatype": "FP32", "shape": shape});
    let bytes = a.le_bytes();
    if binary {
        out["parameters"] = json!({"binary_data_size": bytes.len()});
    } else {
        out["data"] = json!(a.flat().collect::<Vec<f32>>());
    }
    let mut head = json!({"model_name": a.model, "model_version": VERSION, "outputs": [out]});
    if !a.id.is_empty() {
        head["id"] = json!(a.id);
    }
    if !a.parameters.is_empty() {
        head["parameters"] = json!(a.parameters);
    }
    let mut body = head.to_string().into_bytes();
    if binary {
        let n = body.len();
        body.extend_from_slice(&bytes);
        (body, Some(n))
    } else {
        (body, None)
    }
}

/// The service behind both transports: the engine plus what it learns from nodes' `/info`.
pub struct Oip {
    router: Arc<Router>,
    client: reqwest::Client,
    /// Per routing-table generation: what each modality's nodes take and emit.
    infos: Mutex<(u64, BTreeMap<String, ModalityInfo>)>,
}

impl Oip {
    pub fn new(router: Arc<Router>) -> Arc<Self> {
        Arc::new(Self { router, client: reqwest::Client::new(), infos: Mutex::new((0, BTreeMap::new())) })
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn server_metadata(&self) -> Value {
        json!({"name": "prism-router", "version": env!("CARGO_PKG_VERSION"), "extensions": EXTENSIONS})
    }

    /// A modality's input kind and width, from a replica's `GET /info` (cached per table
    /// generation: a new table may bring other models). The kind cannot be guessed from the
    /// modality's name, which is the user's choice.
    pub async fn modality_info(&self, snap: &Snapshot, modality: &str) -> Result<ModalityInfo, OipError> {
        if let Ok(g) = self.infos.lock() {
            if g.0 == snap.table.generation {
                if let Some(i) = g.1.get(modality) {
                    return Ok(*i);
                }
            }
        }
        let mut eps: Vec<_> = snap.table.modalities.get(modality).map(|v| v.iter().collect()).unwrap_or_default();
        eps.sort_by_key(|e| !e.ready);
        let mut last = String::from("no replica in the routing table");
        for ep in eps {
            let url = format!("{}/info", ep.endpoint.trim_end_matches('/'));
            let got = async {
                let r =
                    self.client.get(&url).timeout(Duration::from_secs(2)).send().await.map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    return Err(format!("HTTP {}", r.status()));
                }
                r.json::<NodeInfo>().await.map_err(|e| e.to_string())
            }
            .await;
            match got {
                Ok(info) => {
                    let mi = ModalityInfo { kind: Kind::of_node(&info.modality), dim: info.dim };
                    if let Ok(mut g) = self.infos.lock() {
                        if g.0 != snap.table.generation {
                            *g = (snap.table.generation, BTreeMap::new());
                        }
                        g.1.insert(modality.to_string(), mi);
                    }
                    return Ok(mi);
                }
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        Err(RouterError::Unavailable(format!(
            "modality '{modality}': no replica answered GET /info, so its input type is unknown ({last})"
        ))
        .into())
    }

    /// Whether `model` can serve now: its modality has a routable replica; for the pipeline,
    /// every required modality does and at least one modality does.
    pub fn model_ready(&self, snap: &Snapshot, model: &Model) -> bool {
        match &model.target {
            Target::Modality(m) => self.router.modality_ready(m),
            Target::Pipeline(ms) => {
                let required = ms.iter().filter(|m| snap.configs.get(*m).is_some_and(|c| c.required));
                self.router.is_ready() && required.into_iter().all(|m| self.router.modality_ready(m))
            }
        }
    }

    pub async fn model_metadata(&self, name: &str, version: &str) -> Result<ModelMeta, OipError> {
        let snap = self.router.snapshot();
        let model = resolve(&snap, name, version)?;
        let mut inputs = Vec::new();
        let mut dim: i64 = -1;
        for m in model.modalities() {
            // A modality whose nodes cannot be asked right now is still listed (as text-like
            // BYTES, the node API's default input) so metadata never depends on an outage.
            let info = self.modality_info(&snap, &m).await.ok();
            let (datatype, shape) = info.map_or(Kind::Text, |i| i.kind).input_meta();
            if let Some(i) = info {
                dim = if dim == -1 || dim == i.dim as i64 { i.dim as i64 } else { -1 };
            }
            inputs.push(TensorMeta { name: m, datatype, shape });
        }
        let platform = match model.target {
            Target::Pipeline(_) => "prism_pipeline",
            Target::Modality(_) => "prism_node",
        };
        Ok(ModelMeta {
            name: model.name,
            versions: vec![VERSION.to_string()],
            platform: platform.to_string(),
            inputs,
            outputs: vec![TensorMeta { name: OUTPUT.to_string(), datatype: "FP32", shape: vec![-1, dim] }],
        })
    }

    /// Run one infer request on `model`.
    pub async fn infer(&self, model: &str, version: &str, req: Request, request_id: &str) -> Result<Answer, OipError> {
        let snap = self.router.snapshot();
        let model = resolve(&snap, model, version)?;
        let names: BTreeSet<String> = model.modalities().into_iter().collect();
        if req.inputs.is_empty() {
            return Err(OipError::BadRequest(format!(
                "no inputs; model '{}' takes {}",
                model.name,
                names.iter().cloned().collect::<Vec<_>>().join(", ")
            )));
        }
        let mut by_modality: BTreeMap<String, Vec<EmbedInput>> = BTreeMap::new();
        let mut batch = None;
        for raw in req.inputs {
            if !names.contains(&raw.name) {
                let list = names.iter().cloned().collect::<Vec<_>>().join(", ");
                return Err(OipError::input(
                    &raw.name,
                    format!("is not an input of model '{}' (inputs: {list})", model.name),
                ));
            }
            if by_modality.contains_key(&raw.name) {
                return Err(OipError::input(&raw.name, "is sent twice"));
            }
            let tensor = decode(raw)?;
            let info = self.modality_info(&snap, &tensor.name).await?;
            let items = to_node_inputs(&tensor, info.kind)?;
            match batch {
                Some(b) if b != items.len() => {
                    return Err(OipError::input(
                        &tensor.name,
                        format!(
                            "has a batch of {} but another input has {b}; every input needs the same batch",
                            items.len()
                        ),
                    ))
                }
                _ => batch = Some(items.len()),
            }
            by_modality.insert(tensor.name, items);
        }
        let mut parameters = BTreeMap::new();
        let embeddings = match &model.target {
            Target::Modality(m) => {
                let items = by_modality.remove(m).ok_or_else(|| OipError::input(m, "is missing"))?;
                let (served, _, recorded) = self.router.embeddings_call(m, items, request_id).await?;
                if let Some(recorded) = recorded {
                    parameters.insert("recorded".to_string(), recorded.to_string());
                }
                served.response.embeddings
            }
            Target::Pipeline(_) => {
                let n = batch.unwrap_or(0);
                let requests: Vec<InferRequest> = (0..n)
                    .map(|i| InferRequest {
                        inputs: by_modality.iter().map(|(m, items)| (m.clone(), items[i].clone())).collect(),
                        timeout_ms: None,
                        de_fusion: None,
                    })
                    .collect();
                let answers: Vec<_> = futures::stream::iter(requests.into_iter().enumerate().map(|(i, r)| {
                    let rid = if n == 1 { request_id.to_string() } else { format!("{request_id}.{i}") };
                    async move { self.router.infer(r, &rid).await }
                }))
                .buffered(PIPELINE_CONCURRENCY)
                .collect()
                .await;
                let mut missing = BTreeSet::new();
                let mut out = Vec::with_capacity(n);
                for a in answers {
                    let a = a?;
                    if let Some(d) = &a.degraded {
                        missing.extend(d.missing.iter().cloned());
                    }
                    let Some(fused) = a.embedding else {
                        // Early fusion with its fusion node down and vectors of different sizes:
                        // there is no fused vector to put in the one output tensor.
                        if let Some(d) = a.degraded {
                            return Err(RouterError::Unavailable(format!(
                                "{}: no fused vector for pipeline '{}'; its modality models still answer",
                                d.reason, model.name
                            ))
                            .into());
                        }
                        return Err(OipError::BadRequest(format!(
                            "pipeline '{}' uses late fusion (no fused vector): ask one of its modality models instead",
                            model.name
                        )));
                    };
                    out.push(fused);
                }
                if !missing.is_empty() {
                    parameters.insert("degraded".to_string(), missing.into_iter().collect::<Vec<_>>().join(","));
                }
                out
            }
        };
        if embeddings.iter().any(|e| e.len() != embeddings[0].len()) {
            return Err(RouterError::Internal("embeddings of one batch differ in width".into()).into());
        }
        Ok(Answer { model: model.name, id: req.id, embeddings, parameters })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(name: &str, dt: &str, shape: &[i64], content: Content) -> RawInput {
        RawInput { name: name.into(), datatype: dt.into(), shape: shape.to_vec(), sample_rate: None, content }
    }

    fn bytes_le(items: &[&[u8]]) -> Vec<u8> {
        items.iter().flat_map(|b| [&(b.len() as u32).to_le_bytes()[..], b].concat()).collect()
    }

    #[test]
    fn infer_paths() {
        assert!(is_infer_path("/v2/models/demo/infer"));
        for p in ["/v2/models//infer", "/v2/models/a/b/infer", "/v2/models/demo", "/v1/infer", "/v2/models/infer"] {
            assert!(!is_infer_path(p), "{p}");
        }
    }

    #[test]
    fn binary_and_json_forms_decode_alike() {
        let j = decode(raw("text", "BYTES", &[2], Content::Json(json!(["a", "bc"])))).unwrap();
        let b = decode(raw("text", "BYTES", &[2], Content::Raw(bytes_le(&[b"a", b"bc"])))).unwrap();
        assert_eq!(j, b);
        let nested = decode(raw("a", "FP32", &[1, 2], Content::Json(json!([[0.5, -1.0]])))).unwrap();
        let rawf = decode(raw(
            "a",
            "FP32",
            &[1, 2],
            Content::Raw([0.5f32, -1.0].iter().flat_map(|x| x.to_le_bytes()).collect()),
        ))
        .unwrap();
        assert_eq!(nested, rawf);
    }

    #[test]
    fn bad_tensors_name_the_input() {
        let msg = |r: RawInput| decode(r).unwrap_err().to_string();
        assert!(msg(raw("text", "INT64", &[1], Content::Json(json!([1])))).starts_with("input 'text': datatype INT64"));
        assert!(msg(raw("text", "STRING", &[1], Content::Json(json!(["a"])))).contains("not an OIP datatype"));
        assert!(msg(raw("text", "BYTES", &[3], Content::Json(json!(["a"]))))
            .contains("needs 3 elements but the data has 1"));
        assert!(msg(raw("text", "BYTES", &[-1], Content::Json(json!(["a"])))).contains("negative"));
        assert!(msg(raw("text", "BYTES", &[1], Content::Missing)).contains("no data"));
        assert!(msg(raw("text", "BYTES", &[1], Content::Raw(vec![9, 0, 0, 0, b'a']))).contains("claims 9 bytes"));
        assert!(msg(raw("text", "BYTES", &[1], Content::Raw(vec![1, 0]))).contains("4-byte length"));
        assert!(msg(raw("t", "BYTES", &[1], Content::Json(json!([5])))).contains("data[0] is not a string"));
        assert!(msg(raw("t", "BYTES", &[i64::MAX, 4], Content::Json(json!([])))).contains("too large"));
        let e = decode(raw("t", "BYTES", &[1], Content::Missing)).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn kinds_take_their_datatypes() {
        let t = decode(raw("text", "BYTES", &[2, 1], Content::Json(json!(["a", "b"])))).unwrap();
        assert_eq!(
            to_node_inputs(&t, Kind::Text).unwrap(),
            vec![EmbedInput::Text("a".into()), EmbedInput::Text("b".into())]
        );
        let f = decode(raw("text", "FP32", &[1, 2], Content::Json(json!([0.0, 1.0])))).unwrap();
        assert!(to_node_inputs(&f, Kind::Text)
            .unwrap_err()
            .to_string()
            .contains("input 'text': datatype FP32 is not accepted here: send BYTES"));
        let img = decode(raw("image", "UINT8", &[2, 2, 3, 3], Content::Raw(vec![7; 36]))).unwrap();
        let items = to_node_inputs(&img, Kind::Image).unwrap();
        assert_eq!(items.len(), 2);
        let EmbedInput::Item(InputItem { image_base64: Some(b), .. }) = &items[0] else { panic!("image") };
        let png = base64::engine::general_purpose::STANDARD.decode(b).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.ends_with(&[0xAE, 0x42, 0x60, 0x82]), "IEND crc");
        let bad = decode(raw("image", "UINT8", &[1, 2, 2], Content::Raw(vec![0; 4]))).unwrap();
        assert!(to_node_inputs(&bad, Kind::Image).is_err());
        let mut audio = decode(raw("audio", "FP32", &[1, 3], Content::Json(json!([0.0, 0.5, -0.5])))).unwrap();
        let EmbedInput::Item(InputItem { audio_base64: Some(w), .. }) =
            &to_node_inputs(&audio, Kind::Audio).unwrap()[0]
        else {
            panic!("audio")
        };
        let wav = base64::engine::general_purpose::STANDARD.decode(w).unwrap();
        assert_eq!(&wav[..4], b"RIFF");
        assert_eq!(u32::from_le_bytes([wav[24], wav[25], wav[26], wav[27]]), 16_000);
        assert_eq!(wav.len(), 44 + 12);
        audio.sample_rate = Some(44_100);
        assert!(to_node_inputs(&audio, Kind::Audio).unwrap_err().to_string().contains("44100 Hz"));
        let b64 = decode(raw("image", "BYTES", &[1], Content::Json(json!(["iVBORw=="])))).unwrap();
        let EmbedInput::Item(InputItem { image_base64: Some(x), .. }) = &to_node_inputs(&b64, Kind::Image).unwrap()[0]
        else {
            panic!("image")
        };
        assert_eq!(x, "iVBORw==", "base64 in JSON is the file, passed on as it is");
    }

    #[test]
    fn png_crc_matches_the_known_iend() {
        // IEND's CRC is fixed by the spec: AE 42 60 82.
        let png = png_stored(1, 1, 1, &[0]);
        assert_eq!(&png[png.len() - 4..], &[0xAE, 0x42, 0x60, 0x82]);
    }

    #[test]
    fn http_bodies_with_the_binary_extension() {
        let head = br#"{"inputs":[{"name":"text","shape":[2],"datatype":"BYTES","parameters":{"binary_data_size":12}}],"parameters":{"binary_data_output":true}}"#;
        let mut body = head.to_vec();
        body.extend(bytes_le(&[b"ab", b"cd"]));
        let r = parse_http(&body, Some(&head.len().to_string())).unwrap();
        assert!(r.outputs.binary("m").unwrap());
        let t = decode(r.inputs[0].clone()).unwrap();
        assert_eq!(t.data, Data::Bytes(vec![b"ab".to_vec(), b"cd".to_vec()]));
        assert!(parse_http(&body, Some("100000")).unwrap_err().to_string().contains("only"));
        assert!(parse_http(&body, Some("x")).is_err());
        let mut extra = body.clone();
        extra.push(1);
        assert!(parse_http(&extra, Some(&head.len().to_string()))
            .unwrap_err()
            .to_string()
            .contains("belong to no input"));
        let short = &body[..body.len() - 3];
        assert!(parse_http(short, Some(&head.len().to_string()))
            .unwrap_err()
            .to_string()
            .contains("binary_data_size is 12"));
        assert!(parse_http(b"[1]", None).is_err());
        let r = parse_http(br#"{"inputs":[],"outputs":[{"name":"nope"}]}"#, None).unwrap();
        assert!(r.outputs.binary("m").unwrap_err().to_string().contains("'nope'"));
    }

    #[test]
    fn answers_in_both_forms() {
        let a =
            Answer { model: "m".into(), id: "7".into(), embeddings: vec![vec![1.0, 2.0]], parameters: BTreeMap::new() };
        let (body, n) = http_answer(&a, false);
        assert!(n.is_none());
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["outputs"][0]["data"], json!([1.0, 2.0]));
        assert_eq!(v["outputs"][0]["shape"], json!([1, 2]));
        assert_eq!(v["id"], "7");
        let (body, n) = http_answer(&a, true);
        let n = n.unwrap();
        let v: Value = serde_json::from_slice(&body[..n]).unwrap();
        assert_eq!(v["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert_eq!(&body[n..], [1.0f32.to_le_bytes(), 2.0f32.to_le_bytes()].concat());
    }
}
