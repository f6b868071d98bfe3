//! Node API (`POST /embed`, `GET /info`) bodies.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `POST /embed` on a node. Each input is one item of the node's modality.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct EmbedRequest {
    pub inputs: Vec<EmbedInput>,
    /// Deadline for this request in milliseconds from receipt; the node drops it (504) when exceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

/// One input. A bare JSON string is text; otherwise an object with exactly one field set.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum EmbedInput {
    Text(String),
    Item(InputItem),
}

/// A non-text input item.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct InputItem {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// PNG or JPEG bytes, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_base64: Option<String>,
    /// WAV (RIFF, PCM 16-bit or float, 16 kHz mono) bytes, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audio_base64: Option<String>,
    /// Per-modality embeddings, for fusion nodes (modality name -> vector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embeddings: Option<BTreeMap<String, Vec<f32>>>,
}

/// Answer of `POST /embed`: one vector per input, in order.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EmbedResponse {
    pub embeddings: Vec<Vec<f32>>,
    /// ModalityNode (or local node) name.
    pub node: String,
    pub modality: String,
    pub revision: String,
    pub timings: NodeTimings,
    /// Tokens the model read for all inputs together (special tokens included, after truncation),
    /// for token-based models; absent for images, audio and fusion, and from nodes older than
    /// this field (the router then has no count to report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    /// With a classification head in the model folder (`classifier.json`): per input, its labels
    /// with scores (a softmax over the head's labels), highest first, at most
    /// [`MAX_LABELS`]. Absent without a head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<Vec<ScoredLabel>>>,
}

/// Labels a node returns per input, at most (the highest scores).
pub const MAX_LABELS: usize = 10;

/// A label and its probability under the classification head (or the fused mixture).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ScoredLabel {
    pub label: String,
    pub score: f32,
}

/// Where a node's time went for this request, in milliseconds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct NodeTimings {
    /// Waiting in the batching queue.
    pub queue_ms: f64,
    /// Tokenising or decoding/preprocessing.
    pub preprocess_ms: f64,
    /// Forward pass of the batch this request rode in.
    pub inference_ms: f64,
    /// Size of that batch.
    pub batch_size: usize,
}

/// `GET /info` on a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NodeInfo {
    pub node: String,
    pub modality: String,
    pub architecture: String,
    pub revision: String,
    pub dim: usize,
    pub device: String,
    pub max_batch: usize,
    /// Most cost per forward pass (`--max-batch-tokens`); absent from older nodes.
    #[serde(default)]
    pub max_batch_tokens: Option<usize>,
    pub max_input_tokens: Option<usize>,
    /// The classification head's labels, when the model folder has one (`classifier.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embed_response_without_token_count_still_parses() {
        let old = r#"{"embeddings":[[1.0]],"node":"n","modality":"text","revision":"r","timings":{"queue_ms":0,"preprocess_ms":0,"inference_ms":0,"batch_size":1}}"#;
        let r: EmbedResponse = serde_json::from_str(old).unwrap();
        assert_eq!(r.prompt_tokens, None);
        let v = serde_json::to_value(&r).unwrap();
        assert!(v.get("prompt_tokens").is_none(), "absent stays absent: {v}");
    }
}
