//! The OpenAI-compatible surface: `POST /v1/embeddings`, `GET /v1/models`, `GET /v1/models/{id}`.
//! Pure functions (parsing, model names, encodings) so the fuzz target and unit tests reach them
//! without a server.
//!
//! Model names. A router serves one pipeline; the names a client may put in `model` are
//! * the pipeline's name: its `text` modality (the name a user knows from the manifest);
//! * each encoder modality of the pipeline (`text`, `caption`, `image`, ...): that modality;
//! * each ModalityNode serving one (the routing table's `node`): that node's modality.
//!
//! `GET /v1/models` lists exactly these. An absent `model` means `text` (Prism's own clients omit
//! it). A value that could not be a name (empty, over 256 bytes, whitespace or control characters)
//! is a 400; any other name not in the list a 404 with OpenAI's `code: model_not_found` and the
//! valid names. Either way no node is called.

use std::collections::BTreeSet;

use base64::Engine as _;
use prism_api::pipeline::NodeRole;
use prism_api::wire::frontdoor::clip;
use prism_api::wire::router::{EmbeddingVector, EmbeddingsInput, EmbeddingsRequest};
use serde::Serialize;

use crate::engine::Snapshot;
use crate::error::RouterError;

/// Longest accepted `model` value (OpenAI's own ids are under 100 bytes).
pub const MAX_MODEL_NAME_BYTES: usize = 256;

/// The modality that serves a request without `model`, and the pipeline name.
pub const DEFAULT_MODALITY: &str = "text";

/// One entry of `GET /v1/models` (OpenAI's Model object, plus where it routes).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelEntry {
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// Unix seconds; the router's start (Prism does not track when a model was made).
    pub created: u64,
    pub owned_by: String,
    /// `pipeline`, `modality` or `node`.
    pub kind: &'static str,
    /// The modality a request naming this model is routed to.
    pub modality: String,
}

/// Every valid `model` name of this snapshot, pipeline first, then modalities, then nodes
/// (first occurrence wins when names collide). Fusion modalities are not listed: they take
/// vectors, not text.
pub fn catalog(snap: &Snapshot, created: u64) -> Vec<ModelEntry> {
    let encoders: BTreeSet<&str> =
        snap.configs.iter().filter(|(_, c)| c.role == NodeRole::Encoder).map(|(m, _)| m.as_str()).collect();
    let owner = if snap.pipeline.is_empty() { "prism".to_string() } else { snap.pipeline.clone() };
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut push = |id: &str, kind: &'static str, modality: &str| {
        if !id.is_empty() && seen.insert(id.to_string()) {
            out.push(ModelEntry {
                id: id.to_string(),
                object: "model",
                created,
                owned_by: owner.clone(),
                kind,
                modality: modality.to_string(),
            });
        }
    };
    if encoders.contains(DEFAULT_MODALITY) {
        push(&snap.pipeline, "pipeline", DEFAULT_MODALITY);
    }
    for m in &encoders {
        push(m, "modality", m);
    }
    for (m, eps) in &snap.table.modalities {
        if encoders.contains(m.as_str()) {
            for e in eps {
                push(&e.node, "node", m);
            }
        }
    }
    out
}

/// A `model` value that cannot be a name at all: refused before any lookup (400).
pub fn check_model_name(model: &str) -> Result<(), RouterError> {
    let bad = |why: &str| RouterError::InvalidParam {
        param: "model",
        message: format!("`model` {why}; GET /v1/models lists the valid names"),
    };
    if model.is_empty() {
        return Err(bad("is empty"));
    }
    if model.len() > MAX_MODEL_NAME_BYTES {
        return Err(bad(&format!("is {} bytes long; names are at most {MAX_MODEL_NAME_BYTES}", model.len())));
    }
    if let Some(c) = model.chars().find(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad(&format!("contains the character {c:?}; names have no whitespace or control characters")));
    }
    Ok(())
}

/// The modality `model` routes to, or why not: 400 for an impossible name, 404
/// `model_not_found` (with the valid names) for an unknown one.
pub fn resolve_model(snap: &Snapshot, model: Option<&str>) -> Result<String, RouterError> {
    let Some(model) = model else { return Ok(DEFAULT_MODALITY.to_string()) };
    check_model_name(model)?;
    let entries = catalog(snap, 0);
    match entries.iter().find(|e| e.id == model) {
        Some(e) => Ok(e.modality.clone()),
        None => Err(model_not_found(model, &entries)),
    }
}

pub fn model_not_found(model: &str, entries: &[ModelEntry]) -> RouterError {
    let known: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    RouterError::ModelNotFound {
        model: clip(model, 100),
        known: if known.is_empty() { "(none: no routing table loaded)".into() } else { known.join(", ") },
    }
}

/// How vectors are sent back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Float,
    /// Little-endian float32 bytes, base64 (what the `openai` package asks for by default).
    Base64,
}

/// A checked `/v1/embeddings` request.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    pub texts: Vec<String>,
    pub model: Option<String>,
    pub encoding: Encoding,
    pub dimensions: Option<usize>,
}

/// Parse and check a `/v1/embeddings` body (already known to be a JSON object). A bad item of
/// `input` is named by its index.
pub fn parse_embeddings(body: &[u8], max_inputs: usize) -> Result<Embeddings, RouterError> {
    let req: EmbeddingsRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return Err(explain_embeddings_error(body, e)),
    };
    let encoding = match req.encoding_format.as_deref() {
        None | Some("float") => Encoding::Float,
        Some("base64") => Encoding::Base64,
        Some(f) => {
            return Err(RouterError::InvalidParam {
                param: "encoding_format",
                message: format!("`encoding_format` {:?} is not supported; use \"float\" or \"base64\"", clip(f, 40)),
            })
        }
    };
    if req.dimensions == Some(0) {
        return Err(RouterError::InvalidParam {
            param: "dimensions",
            message: "`dimensions` must be at least 1".into(),
        });
    }
    let texts = match req.input {
        EmbeddingsInput::One(s) => vec![s],
        EmbeddingsInput::Many(v) => v,
    };
    if texts.is_empty() {
        return Err(RouterError::InvalidParam { param: "input", message: "`input` is an empty list".into() });
    }
    if texts.len() > max_inputs {
        return Err(RouterError::InvalidParam {
            param: "input",
            message: format!("`input` has {} items; at most {max_inputs}", texts.len()),
        });
    }
    if let Some(i) = texts.iter().position(String::is_empty) {
        return Err(RouterError::InvalidParam {
            param: "input",
            message: format!("`input[{i}]` is the empty string; send some text (whitespace is fine)"),
        });
    }
    if let Some(m) = &req.model {
        check_model_name(m)?;
    }
    Ok(Embeddings { texts, model: req.model, encoding, dimensions: req.dimensions })
}

/// serde's message for an untagged enum says only "did not match any variant"; say which item.
fn explain_embeddings_error(body: &[u8], e: serde_json::Error) -> RouterError {
    if !matches!(e.classify(), serde_json::error::Category::Data) {
        return RouterError::InvalidJson(e.to_string());
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return RouterError::InvalidJson(e.to_string());
    };
    let kind = |v: &serde_json::Value| match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    };
    let param = |param: &'static str, message: String| RouterError::InvalidParam { param, message };
    match v.get("input") {
        None => return param("input", "`input` is missing: a string or a list of strings".into()),
        Some(serde_json::Value::String(_)) => {}
        Some(serde_json::Value::Array(items)) => {
            if let Some((i, item)) = items.iter().enumerate().find(|(_, x)| !x.is_string()) {
                return param(
                    "input",
                    format!(
                        "`input[{i}]` is {}; each item must be a string (token-id arrays are not supported: send text)",
                        kind(item)
                    ),
                );
            }
        }
        Some(other) => {
            return param("input", format!("`input` is {}; send a string or a list of strings", kind(other)))
        }
    }
    for field in ["model", "encoding_format", "user"] {
        if let Some(x) = v.get(field).filter(|x| !x.is_string() && !x.is_null()) {
            let p = match field {
                "model" => "model",
                "encoding_format" => "encoding_format",
                _ => "user",
            };
            return param(p, format!("`{field}` is {}; it must be a string", kind(x)));
        }
    }
    if let Some(x) = v.get("dimensions").filter(|x| !x.is_u64() && !x.is_null()) {
        return param("dimensions", format!("`dimensions` is {}; it must be a positive integer", kind(x)));
    }
    RouterError::Validation(format!("invalid request: {e}"))
}

/// Keep the first `dims` components and scale back to unit length (what OpenAI does for
/// `dimensions`). More than the model emits is a 400; the model's own size is a no-op.
pub fn shorten(v: &mut Vec<f32>, dims: usize) -> Result<(), RouterError> {
    if dims > v.len() {
        return Err(RouterError::InvalidParam {
            param: "dimensions",
            message: format!("`dimensions` is {dims} but this model emits {}; ask for at most that", v.len()),
        });
    }
    if dims == v.len() {
        return Ok(());
    }
    v.truncate(dims);
    let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x = (f64::from(*x) / norm) as f32);
    }
    Ok(())
}

pub fn encode(v: Vec<f32>, encoding: Encoding) -> EmbeddingVector {
    match encoding {
        Encoding::Float => EmbeddingVector::Float(v),
        Encoding::Base64 => {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prism_api::RoutingTable;

    fn snap() -> Snapshot {
        let table: RoutingTable = serde_json::from_value(serde_json::json!({
            "pipeline": "search", "generation": 1,
            "modalities": {
                "text": [{"endpoint": "http://127.0.0.1:9", "node": "minilm", "revision": "r", "weight": 1.0, "accuracy": 0.9, "ready": true}],
                "caption": [{"endpoint": "http://127.0.0.1:8", "node": "cap-node", "revision": "r", "weight": 1.0, "accuracy": 0.9, "ready": true}],
                "fused": [{"endpoint": "http://127.0.0.1:7", "node": "fuser", "revision": "r", "weight": 1.0, "accuracy": 0.9, "ready": true}]
            }
        }))
        .unwrap();
        let spec: prism_api::MultimodalPipelineSpec =
            serde_json::from_value(serde_json::json!({"nodes": [{"name": "fuser", "role": "fusion"}]})).unwrap();
        Snapshot::new("search".into(), table, spec)
    }

    #[test]
    fn catalog_lists_pipeline_modalities_and_nodes_but_not_fusion() {
        let ids: Vec<String> = catalog(&snap(), 5).into_iter().map(|e| e.id).collect();
        assert_eq!(ids, ["search", "caption", "text", "cap-node", "minilm"]);
    }

    #[test]
    fn model_names_resolve_to_modalities() {
        let s = snap();
        assert_eq!(resolve_model(&s, None).unwrap(), "text");
        assert_eq!(resolve_model(&s, Some("search")).unwrap(), "text");
        assert_eq!(resolve_model(&s, Some("cap-node")).unwrap(), "caption");
        assert_eq!(resolve_model(&s, Some("caption")).unwrap(), "caption");
        let e = resolve_model(&s, Some("fuser")).unwrap_err();
        assert_eq!(e.status().as_u16(), 404);
        let e = resolve_model(&s, Some("../../etc/passwd")).unwrap_err();
        assert_eq!(e.status().as_u16(), 404);
        assert!(e.to_string().contains("search, caption, text, cap-node, minilm"), "{e}");
        let huge = "m".repeat(1 << 20);
        for bad in ["", "a\0b", "a\r\nX-Injected: 1", "two words", huge.as_str()] {
            let e = resolve_model(&s, Some(bad)).unwrap_err();
            assert_eq!(e.status().as_u16(), 400, "{bad:?}");
            assert!(e.to_string().len() < 400, "error must not echo the whole value");
        }
    }

    #[test]
    fn embeddings_requests_name_the_bad_item() {
        let p = |b: &str| parse_embeddings(b.as_bytes(), 2048);
        let ok = p(r#"{"input":["a"," "],"encoding_format":"base64","dimensions":8,"model":"text"}"#).unwrap();
        assert_eq!(ok.texts, ["a", " "]);
        assert_eq!(ok.encoding, Encoding::Base64);
        let msg = |b: &str| p(b).unwrap_err().to_string();
        assert!(msg(r#"{"input":["a","b",7]}"#).contains("`input[2]` is a number"));
        assert!(msg(r#"{"input":["a",""]}"#).contains("`input[1]` is the empty string"));
        assert!(msg(r#"{"input":[[1,2]]}"#).contains("token-id arrays"));
        assert!(msg(r#"{"input":{"text":"a"}}"#).contains("`input` is an object"));
        assert!(msg(r#"{"input":"a","model":7}"#).contains("`model` is a number"));
        assert!(msg(r#"{"input":"a","dimensions":-1}"#).contains("`dimensions`"));
        assert!(msg(r#"{"input":"a","encoding_format":"binary"}"#).contains("binary"));
        assert_eq!(p(r#"{"input":"a","dimensions":0}"#).unwrap_err().status().as_u16(), 400);
        assert_eq!(p(r#"{"input":[]}"#).unwrap_err().status().as_u16(), 400);
        assert_eq!(p(r#"{"nothing":1}"#).unwrap_err().status().as_u16(), 400);
    }

    #[test]
    fn base64_is_little_endian_f32() {
        let EmbeddingVector::Base64(s) = encode(vec![1.0, -2.5], Encoding::Base64) else { panic!("base64") };
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        assert_eq!(bytes, [1.0f32.to_le_bytes(), (-2.5f32).to_le_bytes()].concat());
    }

    #[test]
    fn shorten_truncates_and_renormalises() {
        let mut v = vec![0.6, 0.0, 0.8, 0.0];
        shorten(&mut v, 2).unwrap();
        assert_eq!(v, [1.0, 0.0]);
        let mut v = vec![0.6, 0.8];
        shorten(&mut v, 2).unwrap();
        assert_eq!(v, [0.6, 0.8]);
        assert_eq!(shorten(&mut v, 3).unwrap_err().status().as_u16(), 400);
    }
}
