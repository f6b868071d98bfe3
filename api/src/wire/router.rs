//! Router client API (`POST /v1/infer`, `POST /v1/embeddings`, admin) bodies.
//!
//! A request carries any subset of the pipeline's modalities, keyed by modality name (an open
//! set: `text`, `image`, `audio`, `caption`, ...). The router never special-cases a name: the
//! value is forwarded to that modality's node as one `/embed` input, so whatever the node accepts
//! (a bare string, or an object with `text` / `image_base64` / `audio_base64`) is accepted here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::node::{EmbedInput, ScoredLabel};

/// `POST /v1/infer`: one multimodal item.
///
/// ```json
/// {"inputs": {"text": "a red bicycle", "image": {"image_base64": "iVBOR..."}}, "timeout_ms": 2000}
/// ```
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct InferRequest {
    /// Modality name -> input for that modality's node (bare string, or an input object).
    pub inputs: BTreeMap<String, EmbedInput>,
    /// Tighter deadline than the pipeline's `routing.timeoutMs` (the smaller one wins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Override the pipeline's `fusion.deFusion` for this request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub de_fusion: Option<bool>,
}

/// The `strategy` of a memory record that logs one input of an embeddings call (`POST
/// /v1/embeddings`, or an Open Inference Protocol request to a modality model): one modality's
/// vector, nothing fused. Never served as a cached answer.
pub const EMBEDDINGS_CALL: &str = "embeddings";

/// Answer of `POST /v1/infer`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct InferResponse {
    /// Request id (also the `x-request-id` response header).
    pub id: String,
    pub pipeline: String,
    /// Routing-table generation the request was routed with.
    pub generation: u64,
    /// `weighted`, `attention`, `late` or `early` (in memory records also [`EMBEDDINGS_CALL`]).
    pub strategy: String,
    /// Fused, L2-normalised vector; absent for `late` fusion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<Vec<f32>>,
    /// Per-modality answers (only the modalities that were served).
    pub modalities: BTreeMap<String, ModalityResult>,
    /// De-fusion: each modality's share of the fused vector (sums to 1), when requested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contributions: Option<BTreeMap<String, f64>>,
    /// The fusion node used by `early` fusion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fusion_replica: Option<ReplicaRef>,
    /// Labels with scores, highest first. Under `early` fusion with a fusion node that carries a
    /// classification head: that head's reading of the fused vector (`prism train fusion` trains
    /// one). Otherwise the label distributions of the modalities whose nodes carry a head, mixed
    /// with the fusion weights (renormalised over those modalities). Absent when none has a head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<ScoredLabel>>,
    pub timings: RouterTimings,
    /// Present when the answer is partial or cached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded: Option<Degraded>,
    /// With memory on: true once this request and answer are durably in the memory log (it then
    /// survives a router crash), false when the log write failed. Absent with memory off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded: Option<bool>,
}

/// One modality's answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ModalityResult {
    pub embedding: Vec<f32>,
    /// The replica that answered.
    pub replica: ReplicaRef,
    /// Weight used in fusion after renormalisation over the modalities present (attention: alpha_i).
    pub weight: f64,
    /// Calls made for this modality (1 + retries).
    pub attempts: u32,
    /// Wall time of the successful call, milliseconds.
    pub latency_ms: f64,
    /// The node's labels for this input, when it carries a classification head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<ScoredLabel>>,
}

/// A replica: node name, endpoint URL and model revision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ReplicaRef {
    pub node: String,
    pub endpoint: String,
    pub revision: String,
}

/// Where the router's time went, milliseconds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct RouterTimings {
    /// Validation and replica choice.
    pub route_ms: f64,
    /// Parallel fan-out to the modality nodes (the slowest modality, retries included).
    pub fanout_ms: f64,
    /// Fusion (including the fusion node call for `early`).
    pub fuse_ms: f64,
    /// The durable memory-log write (with memory on): the answer waits for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_ms: Option<f64>,
    pub total_ms: f64,
}

/// Why an answer is not whole.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Degraded {
    /// Modalities requested but not served (sorted).
    pub missing: Vec<String>,
    /// Human-readable cause per the degradation policy.
    pub reason: String,
    /// True when the answer came from the cache of past answers (`onMissingRequired: cached`).
    #[serde(default)]
    pub cached: bool,
}

/// `POST /v1/embeddings` (OpenAI-compatible).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EmbeddingsRequest {
    pub input: EmbeddingsInput,
    /// Which model embeds: the pipeline's name (its `text` modality), a modality name, or the
    /// name of a node serving one (`GET /v1/models` lists them). Absent: the `text` modality.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `float` (default) or `base64` (little-endian float32 bytes, base64, as OpenAI sends them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<String>,
    /// Keep the first `dimensions` components and renormalise to unit length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A string or a list of strings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum EmbeddingsInput {
    One(String),
    Many(Vec<String>),
}

impl EmbeddingsInput {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            EmbeddingsInput::One(s) => vec![s],
            EmbeddingsInput::Many(v) => v,
        }
    }
}

/// Answer of `POST /v1/embeddings`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EmbeddingsResponse {
    /// Always `list`.
    pub object: String,
    pub data: Vec<EmbeddingData>,
    pub model: String,
    pub usage: EmbeddingsUsage,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EmbeddingData {
    /// Always `embedding`.
    pub object: String,
    pub index: usize,
    pub embedding: EmbeddingVector,
}

/// One vector: a list of floats (`encoding_format: float`) or the base64 of its little-endian
/// float32 bytes (`encoding_format: base64`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum EmbeddingVector {
    Float(Vec<f32>),
    Base64(String),
}

/// Token counts, as the node's tokenizer counted them (special tokens included, after
/// truncation).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct EmbeddingsUsage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
}

/// Answer of `PUT /admin/routing-table`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ReloadResponse {
    /// Whether the table replaced the current one.
    pub applied: bool,
    /// Generation now in force.
    pub generation: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infer_request_accepts_strings_and_objects() {
        let r: InferRequest =
            serde_json::from_str(r#"{"inputs":{"text":"hi","image":{"image_base64":"AAAA"}},"timeout_ms":50}"#)
                .unwrap();
        assert_eq!(r.inputs.len(), 2);
        assert!(matches!(r.inputs["text"], EmbedInput::Text(_)));
        assert!(matches!(r.inputs["image"], EmbedInput::Item(_)));
        assert!(serde_json::from_str::<InferRequest>(r#"{"inputs":{"text":5}}"#).is_err());
        assert!(serde_json::from_str::<InferRequest>(r#"{"inputs":{},"bogus":1}"#).is_err());
    }

    #[test]
    fn openai_input_is_string_or_list() {
        let one: EmbeddingsRequest = serde_json::from_str(r#"{"input":"a","model":"m"}"#).unwrap();
        assert_eq!(one.input.into_vec(), vec!["a"]);
        let many: EmbeddingsRequest = serde_json::from_str(r#"{"input":["a","b"]}"#).unwrap();
        assert_eq!(many.input.into_vec().len(), 2);
        assert!(serde_json::from_str::<EmbeddingsRequest>(r#"{"input":[1,2]}"#).is_err());
    }
}
