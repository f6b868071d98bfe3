//! The answer cache seam behind `degradation.onMissingRequired: cached`: the memory store
//! itself when the router has one (`prism_memory::Memory`: durable, and shared by the routers of
//! one PostgreSQL database), prism-memory's in-process [`RecentAnswers`] otherwise. The durable
//! request log is `Memory`, used by the engine directly.

use std::collections::BTreeMap;

use prism_api::wire::router::InferResponse;
use prism_memory::{Memory, RecentAnswers};
use tracing::warn;

/// Serves a past answer when a required modality is down and the pipeline says
/// `degradation.onMissingRequired: cached`.
pub trait AnswerCache: Send + Sync + 'static {
    /// Called with every whole answer of a pipeline whose policy is `cached` (after the engine
    /// has logged it to memory, when memory is on).
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

/// The request log is the cache: the engine logs every answer before it is sent (whole, partial;
/// never a cached one), so `remember` has nothing to add, and `nearest` searches the log,
/// skipping degraded records. A failed read is a cache miss (the request then gets the 503).
impl AnswerCache for Memory {
    fn remember(&self, _pipeline: &str, _answer: &InferResponse) {}

    fn nearest(
        &self,
        pipeline: &str,
        served: &BTreeMap<String, Vec<f32>>,
        min_similarity: f64,
    ) -> Option<(InferResponse, f64)> {
        let lookup = || match self.nearest_answer(pipeline, served, min_similarity) {
            Ok(found) => found,
            Err(e) => {
                warn!(error = %e, pipeline, "cached answer lookup in memory failed");
                None
            }
        };
        // One store read per candidate (a round trip each on PostgreSQL): off the async worker
        // where the runtime allows it.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(lookup),
            _ => lookup(),
        }
    }
}
