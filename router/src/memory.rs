//! Seams for the memory loop (prism-memory plugs in here later; the router builds without it).

use std::collections::BTreeMap;

use prism_api::wire::node::EmbedInput;
use prism_api::wire::router::InferResponse;

/// Receives every answered request, after the response is built. Implementations must not
/// block: the router calls `record` inline on the request path, so a durable store should hand
/// the record to its own writer task.
pub trait MemorySink: Send + Sync + 'static {
    fn record(&self, pipeline: &str, inputs: &BTreeMap<String, EmbedInput>, response: &InferResponse);
}

/// Serves a past answer when a required modality is down and the pipeline says
/// `degradation.onMissingRequired: cached`.
pub trait AnswerCache: Send + Sync + 'static {
    /// Nearest past answer to a request of which only `served` modality vectors are known,
    /// if its cosine similarity is at least `min_similarity`.
    fn nearest(
        &self,
        pipeline: &str,
        served: &BTreeMap<String, Vec<f32>>,
        min_similarity: f64,
    ) -> Option<InferResponse>;
}
