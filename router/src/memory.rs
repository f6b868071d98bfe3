//! The engine's two memory seams. [`RequestLog`]: the durable log of every answer, its
//! corrections and its search (`prism_memory::Memory`, SQLite or PostgreSQL; tests put any log
//! in, e.g. one whose writes fail). [`AnswerCache`]: behind `degradation.onMissingRequired:
//! cached`, the log itself when the router has one (durable, and shared by the routers of one
//! PostgreSQL database), prism-memory's in-process [`RecentAnswers`] otherwise.

use std::collections::BTreeMap;

use futures::future::BoxFuture;
use prism_api::wire::router::{InferResponse, ReplicaRef};
use prism_memory::{Correction, Hit, Memory, MemoryError, RecentAnswers, Record, RevisionFeedback, StoredRecord};
use tracing::warn;

/// What the engine and the HTTP API need of the request log.
pub trait RequestLog: Send + Sync + 'static {
    /// Logs one answered request; resolves once it is durable (the answer says `recorded`).
    fn record(&self, rec: Record) -> BoxFuture<'_, Result<(), MemoryError>>;
    /// Stores a correction of a past request; returns the replicas (revisions) that served it.
    fn correct(&self, c: Correction) -> BoxFuture<'_, Result<Vec<ReplicaRef>, MemoryError>>;
    /// Corrections so far, per node revision (the accuracy estimates start from them).
    fn feedback(&self) -> Result<Vec<RevisionFeedback>, MemoryError>;
    fn get(&self, id: &str) -> Result<Option<StoredRecord>, MemoryError>;
    /// The `k` nearest logged vectors under `key` (a modality or the fused vector); `true` when
    /// the search was exact.
    fn search(&self, pipeline: Option<&str>, key: &str, query: &[f32], k: usize) -> (Vec<Hit>, bool);
    /// Corrected requests as training examples (`prism train`'s input).
    fn training_set(&self) -> Result<Vec<serde_json::Value>, MemoryError>;
}

impl RequestLog for Memory {
    fn record(&self, rec: Record) -> BoxFuture<'_, Result<(), MemoryError>> {
        Box::pin(Memory::record(self, rec))
    }
    fn correct(&self, c: Correction) -> BoxFuture<'_, Result<Vec<ReplicaRef>, MemoryError>> {
        Box::pin(Memory::correct(self, c))
    }
    fn feedback(&self) -> Result<Vec<RevisionFeedback>, MemoryError> {
        Memory::feedback(self)
    }
    fn get(&self, id: &str) -> Result<Option<StoredRecord>, MemoryError> {
        Memory::get(self, id)
    }
    fn search(&self, pipeline: Option<&str>, key: &str, query: &[f32], k: usize) -> (Vec<Hit>, bool) {
        Memory::search(self, pipeline, key, query, k)
    }
    fn training_set(&self) -> Result<Vec<serde_json::Value>, MemoryError> {
        Memory::training_set(self)
    }
}

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
