//! The memory store as the answer cache of `degradation.onMissingRequired: cached`: every whole
//! answer is already in the request log with its per-modality vectors, so the log is a cache that
//! survives restarts and, on PostgreSQL, is shared by every router replica.

use std::collections::{BTreeMap, BTreeSet};

use prism_api::wire::router::{InferResponse, EMBEDDINGS_CALL};

use crate::answers::similarity;
use crate::log::MemoryError;
use crate::store::Memory;
use crate::vector::normalised;

/// Candidates taken from the index per served modality; the exact score decides among them.
const CANDIDATES_PER_MODALITY: usize = 16;

impl Memory {
    /// The logged whole answer of `pipeline` nearest to a request of which only the `served`
    /// modality vectors are known, with its similarity, if that is at least `min_similarity`.
    ///
    /// Candidates are the union of the top 16 records per served modality (the index: exact
    /// below [`crate::ANN_MIN_VECTORS`] vectors, HNSW above); each is scored exactly by
    /// [`similarity`] (mean cosine over the served modalities) on its stored vectors. Degraded
    /// answers (partial ones, and cached ones, which carry `degraded.cached`) are never returned:
    /// the cache must not feed on its own guesses; nor are logged embeddings calls, which are
    /// one modality's vector, not an answer. Ties go to the newer record. Blocking: one
    /// read per candidate.
    pub fn nearest_answer(
        &self,
        pipeline: &str,
        served: &BTreeMap<String, Vec<f32>>,
        min_similarity: f64,
    ) -> Result<Option<(InferResponse, f64)>, MemoryError> {
        let query: BTreeMap<String, Vec<f32>> =
            served.iter().filter_map(|(m, v)| Some((m.clone(), normalised(v)?))).collect();
        if query.is_empty() || query.len() != served.len() {
            return Ok(None);
        }
        let mut candidates = BTreeSet::new();
        for (m, v) in &query {
            let (hits, _) = self.search(Some(pipeline), m, v, CANDIDATES_PER_MODALITY);
            candidates.extend(hits.into_iter().map(|h| h.id));
        }
        let mut best: Option<(InferResponse, f64, i64)> = None;
        for id in candidates {
            // Gone meanwhile (retention): not a candidate any more.
            let Some(stored) = self.get(&id)? else { continue };
            let r = stored.record;
            if r.pipeline != pipeline || r.response.degraded.is_some() || r.response.strategy == EMBEDDINGS_CALL {
                continue;
            }
            let past: BTreeMap<String, Vec<f32>> = r
                .response
                .modalities
                .iter()
                .filter_map(|(m, res)| Some((m.clone(), normalised(&res.embedding)?)))
                .collect();
            let Some(s) = similarity(&query, &past) else { continue };
            let better = match &best {
                None => true,
                Some((_, b, at)) => s > *b || (s == *b && r.at_ms > *at),
            };
            if s >= min_similarity && better {
                best = Some((r.response, s, r.at_ms));
            }
        }
        Ok(best.map(|(answer, s, _)| (answer, s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::answers::tests::{answer, q};
    use crate::log::Record;
    use prism_api::wire::router::Degraded;

    fn record(pipeline: &str, at_ms: i64, response: InferResponse) -> Record {
        Record {
            id: response.id.clone(),
            pipeline: pipeline.into(),
            at_ms,
            inputs: serde_json::json!({"text": "x"}),
            response,
        }
    }

    #[tokio::test]
    async fn the_nearest_whole_answer_is_found_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        {
            let m = Memory::open(&path).unwrap();
            let dog = answer("dog", &[("text", vec![1.0, 0.0]), ("audio", vec![0.0, 1.0])]);
            let cat = answer("cat", &[("text", vec![0.6, 0.8]), ("audio", vec![1.0, 0.0])]);
            m.record(record("p", 10, dog)).await.unwrap();
            m.record(record("p", 20, cat)).await.unwrap();
            // Nearer to the text query than "dog", but degraded (partial), or itself a cached
            // answer: never served.
            let mut partial = answer("partial", &[("text", vec![10.0, 1.0])]);
            partial.degraded = Some(Degraded { missing: vec!["audio".into()], reason: "down".into(), cached: false });
            m.record(record("p", 30, partial)).await.unwrap();
            let mut cached = answer("cached", &[("text", vec![10.0, 1.0]), ("audio", vec![0.0, 1.0])]);
            cached.degraded = Some(Degraded { missing: vec!["audio".into()], reason: "down".into(), cached: true });
            m.record(record("p", 40, cached)).await.unwrap();
            // A logged embeddings call with the query's own text vector: one modality's vector,
            // not an answer.
            let mut embedded = answer("embedded", &[("text", vec![10.0, 1.0])]);
            embedded.strategy = EMBEDDINGS_CALL.into();
            embedded.embedding = None;
            m.record(record("p", 45, embedded)).await.unwrap();
            // The same vectors in another pipeline: not a candidate.
            let other = answer("other", &[("text", vec![10.0, 1.0]), ("audio", vec![0.0, 1.0])]);
            m.record(record("other", 50, other)).await.unwrap();

            // Text alone, close to "dog" (cos 0.995) and to "cat" (0.677).
            let (a, s) = m.nearest_answer("p", &q(&[("text", vec![10.0, 1.0])]), 0.9).unwrap().unwrap();
            assert_eq!(a.id, "dog");
            assert!(a.degraded.is_none());
            assert!((s - 10.0 / 101f64.sqrt()).abs() < 1e-6, "{s}");
            // Above the best similarity: nothing.
            assert!(m.nearest_answer("p", &q(&[("text", vec![10.0, 1.0])]), 0.999).unwrap().is_none());
            // Two modalities: the mean of both cosines.
            let (a, s) = m
                .nearest_answer("p", &q(&[("text", vec![0.6, 0.8]), ("audio", vec![2.0, 0.0])]), 0.5)
                .unwrap()
                .unwrap();
            assert_eq!(a.id, "cat");
            assert!((s - 1.0).abs() < 1e-6, "{s}");
            // Unknown pipeline or modality, a zero vector: nothing to compare.
            assert!(m.nearest_answer("nope", &q(&[("text", vec![1.0, 0.0])]), -1.0).unwrap().is_none());
            assert!(m.nearest_answer("p", &q(&[("vision", vec![1.0, 0.0])]), -1.0).unwrap().is_none());
            assert!(m.nearest_answer("p", &q(&[("text", vec![0.0, 0.0])]), -1.0).unwrap().is_none());
            assert!(m.nearest_answer("p", &BTreeMap::new(), -1.0).unwrap().is_none());
        }
        // Closed and reopened: the same answer, from the file.
        let m = Memory::open(&path).unwrap();
        let (a, s) = m.nearest_answer("p", &q(&[("text", vec![10.0, 1.0])]), 0.9).unwrap().unwrap();
        assert_eq!(a.id, "dog");
        assert!((s - 10.0 / 101f64.sqrt()).abs() < 1e-6, "{s}");
        // The cached record's own vectors (similarity 1 to it): it is skipped, "dog" is next.
        let like_cached = q(&[("text", vec![10.0, 1.0]), ("audio", vec![0.0, 1.0])]);
        let (a, s) = m.nearest_answer("p", &like_cached, 0.0).unwrap().unwrap();
        assert_eq!(a.id, "dog");
        assert!(s < 1.0 - 1e-6, "{s}");
        assert!(m.nearest_answer("p", &like_cached, 0.999).unwrap().is_none(), "only degraded ones are that close");
    }

    #[tokio::test]
    async fn ties_go_to_the_newer_answer() {
        let dir = tempfile::tempdir().unwrap();
        let m = Memory::open(&dir.path().join("m.db")).unwrap();
        for (id, at) in [("b", 20), ("c", 30), ("a", 10)] {
            m.record(record("p", at, answer(id, &[("text", vec![1.0, 0.0])]))).await.unwrap();
        }
        let (a, s) = m.nearest_answer("p", &q(&[("text", vec![3.0, 0.0])]), 0.9).unwrap().unwrap();
        assert_eq!(a.id, "c");
        assert!((s - 1.0).abs() < 1e-6, "{s}");
    }
}
