//! Recent whole answers, found again by meaning when a required modality is down.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use prism_api::wire::router::InferResponse;

use crate::vector::normalised;

/// One remembered answer: its per-modality vectors (L2-normalised, for cosine by dot product)
/// and the answer itself.
struct Entry {
    vectors: BTreeMap<String, Vec<f32>>,
    answer: Arc<InferResponse>,
}

/// The last `capacity` whole answers of each pipeline (oldest evicted first). Exact search:
/// it runs only on the degraded path, and a scan of 10k 384-d entries takes about a
/// millisecond; the memory store's ANN index serves the large, durable case.
pub struct RecentAnswers {
    capacity: usize,
    by_pipeline: Mutex<HashMap<String, VecDeque<Entry>>>,
}

/// Similarity of a request (the modalities that were served) to a past answer: the mean
/// cosine over the request's modalities. A past answer lacking one of them cannot be compared
/// and gets None: an answer is only reused when every modality we know agrees with it.
pub fn similarity(query: &BTreeMap<String, Vec<f32>>, past: &BTreeMap<String, Vec<f32>>) -> Option<f64> {
    if query.is_empty() {
        return None;
    }
    let mut sum = 0.0;
    for (m, q) in query {
        let p = past.get(m)?;
        if p.len() != q.len() {
            return None;
        }
        sum += q.iter().zip(p).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>();
    }
    Some(sum / query.len() as f64)
}

impl RecentAnswers {
    pub fn new(capacity: usize) -> Self {
        Self { capacity, by_pipeline: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<Entry>>> {
        // A panic while holding the lock leaves at most one half-pushed entry; keep serving.
        self.by_pipeline.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remember a whole answer. Degraded or cached answers, and answers without a usable
    /// per-modality vector, are not remembered: a cache must not feed on its own guesses.
    pub fn remember(&self, pipeline: &str, answer: &InferResponse) {
        if self.capacity == 0 || answer.degraded.is_some() {
            return;
        }
        let vectors: BTreeMap<String, Vec<f32>> =
            answer.modalities.iter().filter_map(|(m, r)| Some((m.clone(), normalised(&r.embedding)?))).collect();
        if vectors.len() != answer.modalities.len() || vectors.is_empty() {
            return;
        }
        let entry = Entry { vectors, answer: Arc::new(answer.clone()) };
        let mut all = self.lock();
        let q = all.entry(pipeline.to_string()).or_default();
        if q.len() >= self.capacity {
            q.pop_front();
        }
        q.push_back(entry);
    }

    /// The most similar past answer of `pipeline` to a request whose `served` modality vectors
    /// are known, with its similarity, if that is at least `min_similarity`. Ties go to the
    /// newer answer.
    pub fn nearest(
        &self,
        pipeline: &str,
        served: &BTreeMap<String, Vec<f32>>,
        min_similarity: f64,
    ) -> Option<(InferResponse, f64)> {
        let query: BTreeMap<String, Vec<f32>> =
            served.iter().filter_map(|(m, v)| Some((m.clone(), normalised(v)?))).collect();
        if query.len() != served.len() {
            return None;
        }
        let all = self.lock();
        let mut best: Option<(&Entry, f64)> = None;
        for e in all.get(pipeline)?.iter().rev() {
            if let Some(s) = similarity(&query, &e.vectors) {
                if s >= min_similarity && best.as_ref().is_none_or(|(_, b)| s > *b) {
                    best = Some((e, s));
                }
            }
        }
        best.map(|(e, s)| ((*e.answer).clone(), s))
    }

    /// Answers held for `pipeline`.
    pub fn len(&self, pipeline: &str) -> usize {
        self.lock().get(pipeline).map_or(0, VecDeque::len)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().values().all(VecDeque::is_empty)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use prism_api::wire::router::{Degraded, ModalityResult, ReplicaRef, RouterTimings};
    use proptest::prelude::*;

    /// A whole answer with the given modality embeddings (shared with the durable store's tests).
    pub(crate) fn answer(id: &str, mods: &[(&str, Vec<f32>)]) -> InferResponse {
        InferResponse {
            id: id.into(),
            pipeline: "p".into(),
            generation: 1,
            strategy: "weighted".into(),
            embedding: Some(vec![1.0, 0.0]),
            modalities: mods
                .iter()
                .map(|(m, v)| {
                    (
                        m.to_string(),
                        ModalityResult {
                            embedding: v.clone(),
                            replica: ReplicaRef { node: "n".into(), endpoint: "e".into(), revision: "1".into() },
                            weight: 1.0,
                            attempts: 1,
                            latency_ms: 1.0,
                            labels: None,
                        },
                    )
                })
                .collect(),
            contributions: None,
            fusion_replica: None,
            labels: None,
            timings: RouterTimings::default(),
            degraded: None,
            recorded: None,
        }
    }

    /// The served embeddings of a query.
    pub(crate) fn q(mods: &[(&str, Vec<f32>)]) -> BTreeMap<String, Vec<f32>> {
        mods.iter().map(|(m, v)| (m.to_string(), v.clone())).collect()
    }

    #[test]
    fn nearest_by_mean_cosine_over_the_served_modalities() {
        let c = RecentAnswers::new(10);
        c.remember("p", &answer("dog", &[("text", vec![1.0, 0.0]), ("audio", vec![0.0, 1.0])]));
        c.remember("p", &answer("cat", &[("text", vec![0.6, 0.8]), ("audio", vec![1.0, 0.0])]));
        // Text alone, close to "dog" (cos 0.995) and to "cat" (cos 0.6*0.995+0.8*0.0998 = 0.677).
        let (a, s) = c.nearest("p", &q(&[("text", vec![10.0, 1.0])]), 0.9).unwrap();
        assert_eq!(a.id, "dog");
        assert!((s - 10.0 / 101f64.sqrt()).abs() < 1e-6, "{s}");
        // Scale does not matter; a threshold above the best match gives nothing.
        assert!(c.nearest("p", &q(&[("text", vec![10.0, 1.0])]), 0.999).is_none());
        // Two modalities: the mean of both cosines. "cat": (1 + 1) / 2.
        let (a, s) = c.nearest("p", &q(&[("text", vec![0.6, 0.8]), ("audio", vec![2.0, 0.0])]), 0.5).unwrap();
        assert_eq!(a.id, "cat");
        assert!((s - 1.0).abs() < 1e-6, "{s}");
        // Another pipeline, an unknown modality, a different dimension: nothing to compare.
        assert!(c.nearest("other", &q(&[("text", vec![1.0, 0.0])]), 0.0).is_none());
        assert!(c.nearest("p", &q(&[("vision", vec![1.0, 0.0])]), -1.0).is_none());
        assert!(c.nearest("p", &q(&[("text", vec![1.0, 0.0, 0.0])]), -1.0).is_none());
        assert!(c.nearest("p", &q(&[("text", vec![0.0, 0.0])]), -1.0).is_none(), "zero vector");
    }

    #[test]
    fn only_whole_answers_are_remembered_and_the_oldest_go_first() {
        let c = RecentAnswers::new(2);
        let mut partial = answer("partial", &[("text", vec![1.0, 0.0])]);
        partial.degraded = Some(Degraded { missing: vec!["audio".into()], reason: "down".into(), cached: false });
        c.remember("p", &partial);
        c.remember("p", &answer("nan", &[("text", vec![f32::NAN, 0.0])]));
        assert!(c.is_empty());
        for id in ["a", "b", "c"] {
            c.remember("p", &answer(id, &[("text", vec![1.0, 0.0])]));
        }
        assert_eq!(c.len("p"), 2);
        // Equal similarity: the newest wins; "a" was evicted.
        assert_eq!(c.nearest("p", &q(&[("text", vec![1.0, 0.0])]), 0.9).unwrap().0.id, "c");
        let off = RecentAnswers::new(0);
        off.remember("p", &answer("a", &[("text", vec![1.0, 0.0])]));
        assert!(off.is_empty());
    }

    proptest! {
        /// Whatever is stored, a returned answer meets the threshold and no stored answer is
        /// strictly more similar.
        #[test]
        fn returns_the_best_answer_above_the_threshold(
            stored in proptest::collection::vec(proptest::collection::vec(-1.0f32..1.0, 3), 1..20),
            query in proptest::collection::vec(-1.0f32..1.0, 3),
            min in -1.0f64..1.0,
        ) {
            let c = RecentAnswers::new(100);
            for (i, v) in stored.iter().enumerate() {
                c.remember("p", &answer(&i.to_string(), &[("text", v.clone())]));
            }
            let qv = q(&[("text", query.clone())]);
            let best = stored
                .iter()
                .filter_map(|v| similarity(&q(&[("text", normalised(&query)?)]), &q(&[("text", normalised(v)?)])))
                .fold(f64::NEG_INFINITY, f64::max);
            match c.nearest("p", &qv, min) {
                Some((_, s)) => {
                    prop_assert!(s >= min);
                    prop_assert!((s - best).abs() < 1e-9);
                }
                None => prop_assert!(best < min || !best.is_finite()),
            }
        }
    }
}
