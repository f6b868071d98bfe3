//! [`Memory`]: the durable request log (every answered request, its inputs or their hashes,
//! outputs, embeddings, replicas and timings, plus user corrections) with its vector index, on
//! either store behind [`LogBackend`]: one embedded SQLite file (`sqlite.rs`) or one PostgreSQL
//! database shared by several routers (`pg.rs`). Both group-commit on a writer thread and
//! acknowledge a write only once it is durable.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use prism_api::pipeline::InputLogging;
use prism_api::wire::node::EmbedInput;
use prism_api::wire::router::{InferResponse, ReplicaRef};
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tracing::info;

use crate::hnsw::Precision;
use crate::index::{indexer_loop, Hit, VectorIndex};
use crate::log::{correction_from_raw, record_from_raw, replicas_of, LogBackend, Op};
use crate::log::{Correction, MemoryError, Record};

/// A stored record with its corrections.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoredRecord {
    #[serde(flatten)]
    pub record: Record,
    pub corrections: Vec<Correction>,
}

/// Aggregated corrections of one model revision (feeds the router's accuracy estimate A_i).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RevisionFeedback {
    pub node: String,
    pub revision: String,
    pub rating_sum: f64,
    pub count: u64,
}

/// What the inputs of a request look like in the log.
pub fn logged_inputs(inputs: &BTreeMap<String, EmbedInput>, mode: InputLogging) -> serde_json::Value {
    match mode {
        InputLogging::Full => serde_json::to_value(inputs).unwrap_or(serde_json::Value::Null),
        InputLogging::Hash => serde_json::Value::Object(
            inputs
                .iter()
                .map(|(m, input)| {
                    let bytes = serde_json::to_vec(input).unwrap_or_default();
                    let hex: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
                    (m.clone(), serde_json::json!({ "sha256": hex }))
                })
                .collect(),
        ),
    }
}

/// The memory store. Cheap to share (`Arc`); writes go through the backend's writer thread.
pub struct Memory {
    /// What the store is, for messages: a file path, or a database URL without its password.
    location: String,
    tx: mpsc::Sender<Op>,
    backend: Box<dyn LogBackend>,
    index: Arc<RwLock<VectorIndex>>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Memory {
    /// Open (or create) the store at `path` and start its writer thread. Must run inside a
    /// tokio runtime only for the async calls; opening itself is blocking.
    pub fn open(path: &Path) -> Result<Arc<Self>, MemoryError> {
        Self::open_with(path, Precision::F32)
    }

    /// [`Self::open`], with the search graphs storing vectors at `precision` (`bf16`: half the
    /// memory per vector; the file always keeps the answers' f32 vectors).
    pub fn open_with(path: &Path, precision: Precision) -> Result<Arc<Self>, MemoryError> {
        let index = Arc::new(RwLock::new(VectorIndex::with_precision(precision)));
        let (log, tx) = crate::sqlite::open(path, &index)?;
        Self::start(path.display().to_string(), tx, Box::new(log), index)
    }

    /// Connect to a PostgreSQL database (`postgres://USER:PASSWORD@HOST:PORT/DB`, or the
    /// key=value form), create the tables if missing, and load every record into the vector
    /// index. Several routers may share the database: each one's index also loads what the
    /// others commit (every 500 ms, and before a search). Blocking; errors name the host and
    /// database, never the password.
    pub fn open_postgres(url: &str) -> Result<Arc<Self>, MemoryError> {
        Self::open_postgres_with(url, Precision::F32)
    }

    /// [`Self::open_postgres`] with the search graphs at `precision` (see [`Self::open_with`]).
    pub fn open_postgres_with(url: &str, precision: Precision) -> Result<Arc<Self>, MemoryError> {
        let index = Arc::new(RwLock::new(VectorIndex::with_precision(precision)));
        let (reader, tx) = crate::pg::open(url, index.clone())?;
        Self::start(reader.location().to_string(), tx, Box::new(reader), index)
    }

    /// The part both stores share: the background indexer over the loaded records.
    fn start(
        location: String,
        tx: mpsc::Sender<Op>,
        backend: Box<dyn LogBackend>,
        index: Arc<RwLock<VectorIndex>>,
    ) -> Result<Arc<Self>, MemoryError> {
        // Exact search at once; the indexer builds the graphs in the background, so a big store
        // opens in seconds and searches are exact (slower, never wrong) meanwhile.
        info!(location = %location, vectors = index.read().unwrap_or_else(|p| p.into_inner()).len(), "memory store open");
        let weak = Arc::downgrade(&index);
        std::thread::Builder::new()
            .name("prism-memory-indexer".into())
            .spawn(move || indexer_loop(weak))
            .map_err(|e| MemoryError::Write(format!("cannot start the indexer thread: {e}")))?;
        Ok(Arc::new(Self { location, tx, backend, index }))
    }

    /// The SQLite file, for the embedded store.
    pub fn path(&self) -> Option<&Path> {
        self.backend.path()
    }

    /// What this store is, fit for logs: the file path, or `postgres://user@host:port/db`
    /// (never the password).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Load the records other routers committed to a shared database into this one's index
    /// now (a background poll does it every 500 ms anyway); returns how many. Nothing to do
    /// for the embedded store.
    pub fn catch_up(&self) -> Result<usize, MemoryError> {
        self.backend.catch_up()
    }

    /// Append a record; returns once it is committed to disk.
    pub async fn record(&self, rec: Record) -> Result<(), MemoryError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Op::Record(Box::new(rec), tx)).await.map_err(|_| MemoryError::Closed)?;
        rx.await.map_err(|_| MemoryError::Closed)?
    }

    /// Store a correction of a past request; returns, once committed, the replicas that served
    /// that request (whose accuracy estimate the correction updates).
    pub async fn correct(&self, mut c: Correction) -> Result<Vec<ReplicaRef>, MemoryError> {
        if !(0.0..=1.0).contains(&c.rating) {
            return Err(MemoryError::Invalid(format!("rating must lie in [0, 1], got {}", c.rating)));
        }
        if c.at_ms == 0 {
            c.at_ms = now_ms();
        }
        let (tx, rx) = oneshot::channel();
        self.tx.send(Op::Correct(c, tx)).await.map_err(|_| MemoryError::Closed)?;
        rx.await.map_err(|_| MemoryError::Closed)?
    }

    /// A stored record with its corrections.
    pub fn get(&self, id: &str) -> Result<Option<StoredRecord>, MemoryError> {
        let Some((record, corrections)) = self.backend.get(id)? else { return Ok(None) };
        Ok(Some(StoredRecord {
            record: record_from_raw(record)?,
            corrections: corrections.into_iter().map(correction_from_raw).collect(),
        }))
    }

    /// Records whose `key` vector (a modality name, or [`FUSED`]) is nearest to `query`, best
    /// first, and whether the search was exact (HNSW past [`ANN_MIN_VECTORS`] per key).
    /// On a shared database, records other routers committed are loaded first (unless that
    /// was done in the last 50 ms).
    pub fn search(&self, pipeline: Option<&str>, key: &str, query: &[f32], k: usize) -> (Vec<Hit>, bool) {
        self.backend.catch_up_if_stale();
        self.index.read().unwrap_or_else(|p| p.into_inner()).search(pipeline, key, query, k, false)
    }

    /// The same search, always exact (the ANN's reference).
    pub fn search_exact(&self, pipeline: Option<&str>, key: &str, query: &[f32], k: usize) -> Vec<Hit> {
        self.index.read().unwrap_or_else(|p| p.into_inner()).search(pipeline, key, query, k, true).0
    }

    /// Number of stored records.
    /// (vectors waiting for their HNSW graph, deleted vectors not yet compacted away): both are
    /// served correctly meanwhile (exact scan, skipped), only slower; exported as metrics.
    pub fn index_backlog(&self) -> (usize, usize) {
        self.index.read().unwrap_or_else(|p| p.into_inner()).backlog()
    }

    pub fn count(&self) -> Result<u64, MemoryError> {
        self.backend.count()
    }

    /// Corrections aggregated per (node, revision) of the replicas that served the corrected
    /// requests: what the router's accuracy estimates start from after a restart.
    pub fn feedback(&self) -> Result<Vec<RevisionFeedback>, MemoryError> {
        let mut agg: BTreeMap<(String, String), (f64, u64)> = BTreeMap::new();
        for (rating, response) in self.backend.rated_responses()? {
            let Ok(resp) = serde_json::from_str::<InferResponse>(&response) else { continue };
            for r in replicas_of(&resp) {
                let e = agg.entry((r.node, r.revision)).or_default();
                e.0 += rating;
                e.1 += 1;
            }
        }
        Ok(agg
            .into_iter()
            .map(|((node, revision), (rating_sum, count))| RevisionFeedback { node, revision, rating_sum, count })
            .collect())
    }

    /// The corrections as a training set: each with the corrected request's logged inputs and
    /// per-modality vectors, oldest first.
    pub fn training_set(&self) -> Result<Vec<serde_json::Value>, MemoryError> {
        Ok(self
            .backend
            .corrected_records()?
            .into_iter()
            .map(|(request_id, rating, answer, at_ms, pipeline, inputs, response)| {
                let resp: Option<InferResponse> = serde_json::from_str(&response).ok();
                serde_json::json!({
                    "requestId": request_id,
                    "rating": rating,
                    "answer": answer.and_then(|a| serde_json::from_str::<serde_json::Value>(&a).ok()),
                    "atMs": at_ms,
                    "pipeline": pipeline,
                    "inputs": serde_json::from_str::<serde_json::Value>(&inputs).unwrap_or(serde_json::Value::Null),
                    "embeddings": resp.as_ref().map(|r| r.modalities.iter().map(|(m, x)| (m.clone(), x.embedding.clone())).collect::<BTreeMap<_, _>>()),
                    "replicas": resp.as_ref().map(replicas_of),
                })
            })
            .collect())
    }

    /// Delete records (and their corrections) older than `cutoff_ms`; returns how many. On a
    /// shared database every router prunes (the same rows: idempotent) and so drops them from its
    /// own index.
    pub fn prune_before(&self, cutoff_ms: i64) -> Result<u64, MemoryError> {
        let n = self.backend.delete_before(cutoff_ms)?;
        if n > 0 {
            self.index.write().unwrap_or_else(|p| p.into_inner()).retain_since(cutoff_ms);
        }
        Ok(n)
    }

    /// Retention by size: keep the newest `max` records (and any sharing the millisecond of the
    /// oldest kept one), delete the rest with their corrections. Returns how many went.
    pub fn prune_to_count(&self, max: u64) -> Result<u64, MemoryError> {
        if max == 0 {
            return Err(MemoryError::Invalid("memory.maxRecords must be at least 1".into()));
        }
        let offset = i64::try_from(max - 1).unwrap_or(i64::MAX);
        match self.backend.at_ms_from_newest(offset)? {
            Some(cutoff) => self.prune_before(cutoff),
            None => Ok(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::FUSED;
    use prism_api::wire::router::{ModalityResult, RouterTimings};

    fn response(id: &str, text: Vec<f32>, node: &str, rev: &str) -> InferResponse {
        InferResponse {
            id: id.into(),
            pipeline: "p".into(),
            generation: 1,
            strategy: "weighted".into(),
            embedding: Some(text.clone()),
            modalities: BTreeMap::from([(
                "text".to_string(),
                ModalityResult {
                    embedding: text,
                    replica: ReplicaRef { node: node.into(), endpoint: "http://e".into(), revision: rev.into() },
                    weight: 1.0,
                    attempts: 1,
                    latency_ms: 1.0,
                    labels: None,
                },
            )]),
            contributions: None,
            fusion_replica: None,
            labels: None,
            timings: RouterTimings::default(),
            degraded: None,
            recorded: None,
        }
    }

    fn record(id: &str, v: Vec<f32>, rev: &str, at_ms: i64) -> Record {
        Record {
            id: id.into(),
            pipeline: "p".into(),
            at_ms,
            inputs: serde_json::json!({"text": "x"}),
            response: response(id, v, "minilm", rev),
        }
    }

    #[tokio::test]
    async fn records_survive_reopen_and_are_searchable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        {
            let m = Memory::open(&path).unwrap();
            m.record(record("a", vec![1.0, 0.0], "1", 10)).await.unwrap();
            m.record(record("b", vec![0.0, 1.0], "1", 20)).await.unwrap();
            assert_eq!(m.search(Some("p"), "text", &[0.9, 0.1], 1).0[0].id, "a");
        }
        let m = Memory::open(&path).unwrap();
        assert_eq!(m.count().unwrap(), 2);
        let (hits, exact) = m.search(None, FUSED, &[0.1, 0.9], 10);
        assert!(exact, "two records: exact search");
        assert_eq!(hits.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        assert!((hits[0].similarity - 0.9 / 0.82f64.sqrt()).abs() < 1e-6);
        assert!(m.search(Some("other"), "text", &[1.0, 0.0], 5).0.is_empty());
        let got = m.get("a").unwrap().unwrap();
        assert_eq!(got.record.response.modalities["text"].embedding, vec![1.0, 0.0]);
        assert!(m.get("zzz").unwrap().is_none());
    }

    #[tokio::test]
    async fn corrections_need_a_known_request_and_aggregate_per_revision() {
        let dir = tempfile::tempdir().unwrap();
        let m = Memory::open(&dir.path().join("m.db")).unwrap();
        m.record(record("good", vec![1.0, 0.0], "r1", 1)).await.unwrap();
        m.record(record("bad", vec![0.0, 1.0], "r2", 2)).await.unwrap();
        let c = |id: &str, rating: f64| Correction { request_id: id.into(), rating, answer: None, at_ms: 0 };
        let replicas = m.correct(c("good", 1.0)).await.unwrap();
        assert_eq!(replicas[0].revision, "r1");
        m.correct(c("bad", 0.0)).await.unwrap();
        m.correct(Correction { answer: Some(serde_json::json!({"label": "cat"})), ..c("bad", 0.0) }).await.unwrap();
        assert!(matches!(m.correct(c("nope", 1.0)).await, Err(MemoryError::UnknownRequest(_))));
        assert!(matches!(m.correct(c("good", 1.5)).await, Err(MemoryError::Invalid(_))));
        let fb = m.feedback().unwrap();
        assert_eq!(
            fb,
            vec![
                RevisionFeedback { node: "minilm".into(), revision: "r1".into(), rating_sum: 1.0, count: 1 },
                RevisionFeedback { node: "minilm".into(), revision: "r2".into(), rating_sum: 0.0, count: 2 },
            ]
        );
        let set = m.training_set().unwrap();
        assert_eq!(set.len(), 3);
        assert_eq!(set[2]["answer"]["label"], "cat");
        assert_eq!(set[2]["embeddings"]["text"], serde_json::json!([0.0, 1.0]));
        assert_eq!(m.get("bad").unwrap().unwrap().corrections.len(), 2);
    }

    #[tokio::test]
    async fn concurrent_writes_group_commit_and_retention_prunes() {
        let dir = tempfile::tempdir().unwrap();
        let m = Memory::open(&dir.path().join("m.db")).unwrap();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let m = m.clone();
            tasks.push(tokio::spawn(
                async move { m.record(record(&format!("r{i}"), vec![1.0, i as f32], "1", i)).await },
            ));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(m.count().unwrap(), 200);
        assert_eq!(m.prune_before(100).unwrap(), 100);
        assert_eq!(m.count().unwrap(), 100);
        assert_eq!(m.search(None, "text", &[1.0, 0.0], 1000).0.len(), 100);
        // Retention by size keeps the newest: r150..r199.
        assert_eq!(m.prune_to_count(50).unwrap(), 50);
        assert_eq!(m.count().unwrap(), 50);
        assert!(m.get("r149").unwrap().is_none() && m.get("r150").unwrap().is_some());
        assert_eq!(m.search(None, "text", &[1.0, 0.0], 1000).0.len(), 50);
        assert_eq!(m.prune_to_count(50).unwrap(), 0, "nothing more to prune");
        assert!(m.prune_to_count(0).is_err());
    }

    #[test]
    fn inputs_are_hashed_unless_full_logging_is_asked() {
        let inputs = BTreeMap::from([("text".to_string(), EmbedInput::Text("my secret".into()))]);
        let hashed = logged_inputs(&inputs, InputLogging::Hash);
        let h = hashed["text"]["sha256"].as_str().unwrap();
        assert_eq!(h.len(), 64);
        assert!(!hashed.to_string().contains("secret"));
        assert_eq!(logged_inputs(&inputs, InputLogging::Full)["text"], "my secret");
    }

    #[test]
    fn an_unwritable_path_is_a_clear_error() {
        let e = match Memory::open(Path::new("/proc/prism-no/m.db")) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("opened"),
        };
        assert!(e.contains("/proc/prism-no"), "{e}");
    }
}
