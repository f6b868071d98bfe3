//! The answer cache seam behind `degradation.onMissingRequired: cached` (prism-memory's
//! [`RecentAnswers`]). The durable request log is `prism_memory::Memory`, used by the engine
//! directly.

use std::collections::BTreeMap;

use prism_api::wire::router::InferResponse;
use prism_memory::RecentAnswers;

/// Serves a past answer when a required modality is down and the pipeline says
/// `degradation.onMissingRequired: cached`.
pub trait AnswerCache: Send + Sync + 'static {
    /// Called with every whole answer of a pipeline whose policy is `cached`.
    fn remember(&self, pipeline: &str, answer: &InferResponse);
    /// Nearest past answer, with its similarity, to a request of which only the `served`
    /// modality vectors are known, if the similarity is at least `min_similarity`.
    fn nearest(
        &self,
        pipeline: &str,
        served: &BTreeMap<String, Vec<f32>>,
        min_similarity: f64,
    ) -> Option<(InferResponse, f64)>;
}

impl AnswerCache for RecentAnswers {
    fn remember(&self, pipeline: &str, answer: &InferResponse) {
        RecentAnswers::remember(self, pipeline, answer)
    }

    fn nearest(
        &self,
        pipeline: &str,
        served: &BTreeMap<String, Vec<f32>>,
        min_similarity: f64,
    ) -> Option<(InferResponse, f64)> {
        RecentAnswers::nearest(self, pipeline, served, min_similarity)
    }
}
