//! The durable request log: every answered request, its inputs (or their hashes), outputs,
//! embeddings, replicas and timings, plus user corrections. Embedded backend: one SQLite file
//! in WAL mode with `synchronous=FULL`, so a committed transaction survives kill -9 and power
//! loss. A single writer thread group-commits whatever arrived meanwhile in one transaction, and
//! answers each caller only after that commit: an acknowledged write is on disk. The PostgreSQL
//! backend (`pg.rs`, one database shared by several routers) keeps that design; [`Memory`] is the
//! same type for both.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use prism_api::pipeline::InputLogging;
use prism_api::wire::node::EmbedInput;
use prism_api::wire::router::{InferResponse, ReplicaRef};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

use crate::hnsw::Precision;
use crate::index::{indexer_loop, VectorIndex};

/// Index key of a record's fused vector (modality names are the other keys).
pub const FUSED: &str = "fused";
/// Most operations one commit carries (group commit under load).
pub(crate) const MAX_BATCH: usize = 512;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot open the memory store {}: {source}", path.display())]
    Open { path: PathBuf, source: rusqlite::Error },
    /// The PostgreSQL store is unreachable or refused us. `location` never holds the password.
    #[error("cannot connect to the memory database {location}: {reason}")]
    Connect { location: String, reason: String },
    #[error("memory store write failed (nothing from this batch was kept): {0}")]
    Write(String),
    #[error("memory store read failed: {0}")]
    Read(String),
    #[error("no request with id '{0}' in memory")]
    UnknownRequest(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the memory writer has stopped")]
    Closed,
}

impl From<rusqlite::Error> for MemoryError {
    fn from(e: rusqlite::Error) -> Self {
        MemoryError::Read(e.to_string())
    }
}

/// One answered request, as logged.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub id: String,
    pub pipeline: String,
    pub at_ms: i64,
    /// The inputs verbatim or `{modality: {"sha256": ...}}`, per `memory.inputs`.
    pub inputs: serde_json::Value,
    pub response: InferResponse,
}

/// A user's verdict on a past answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Correction {
    pub request_id: String,
    /// 1 = right, 0 = wrong (anything between is a graded rating).
    pub rating: f64,
    /// The right answer, when the user gives one (exported with the training set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<serde_json::Value>,
    #[serde(default)]
    pub at_ms: i64,
}

/// A stored record with its corrections.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StoredRecord {
    #[serde(flatten)]
    pub record: Record,
    pub corrections: Vec<Correction>,
}

/// A search hit.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Hit {
    pub id: String,
    pub pipeline: String,
    pub similarity: f64,
    pub at_ms: i64,
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

/// Where a writer-thread operation's result goes.
type Reply<T> = oneshot::Sender<Result<T, MemoryError>>;

pub(crate) enum Op {
    Record(Box<Record>, Reply<()>),
    Correct(Correction, Reply<Vec<ReplicaRef>>),
}

/// The memory store. Cheap to share (`Arc`); writes go through the writer thread.
pub struct Memory {
    /// What the store is, for messages: a file path, or a database URL without its password.
    location: String,
    tx: mpsc::Sender<Op>,
    backend: Backend,
    index: Arc<RwLock<VectorIndex>>,
}

/// Where reads go.
enum Backend {
    Sqlite { path: PathBuf, reader: Mutex<Connection> },
    Postgres(crate::pg::Reader),
}

/// A record row as stored: id, pipeline, at_ms, inputs JSON, response JSON.
type RawRecord = (String, String, i64, String, String);
/// A correction row: request id, rating, answer JSON, at_ms.
type RawCorrection = (String, f64, Option<String>, i64);
/// A training-set row: the correction's fields, then the record's pipeline, inputs, response.
type RawExample = (String, f64, Option<String>, i64, String, String, String);

fn record_from_raw((id, pipeline, at_ms, inputs, response): RawRecord) -> Result<Record, MemoryError> {
    let bad = |e: serde_json::Error| MemoryError::Read(format!("record {id}: {e}"));
    Ok(Record {
        inputs: serde_json::from_str(&inputs).map_err(bad)?,
        response: serde_json::from_str(&response).map_err(bad)?,
        id,
        pipeline,
        at_ms,
    })
}

fn correction_from_raw((request_id, rating, answer, at_ms): RawCorrection) -> Correction {
    Correction { request_id, rating, answer: answer.and_then(|a| serde_json::from_str(&a).ok()), at_ms }
}

fn connect(path: &Path) -> Result<Connection, MemoryError> {
    let open = |source| MemoryError::Open { path: path.to_path_buf(), source };
    let conn = Connection::open(path).map_err(open)?;
    // WAL: readers never block the writer; synchronous=FULL: a commit is fsynced before it returns.
    conn.pragma_update(None, "journal_mode", "WAL").map_err(open)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(open)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(open)?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(open)?;
    Ok(conn)
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY,
    pipeline TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    inputs TEXT NOT NULL,
    response TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS records_by_time ON records (at_ms);
CREATE TABLE IF NOT EXISTS corrections (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL REFERENCES records (id) ON DELETE CASCADE,
    at_ms INTEGER NOT NULL,
    rating REAL NOT NULL,
    answer TEXT
);
CREATE INDEX IF NOT EXISTS corrections_by_request ON corrections (request_id);
";

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
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| MemoryError::Open {
                path: path.to_path_buf(),
                source: rusqlite::Error::InvalidPath(PathBuf::from(format!("{}: {e}", dir.display()))),
            })?;
        }
        let writer = connect(path)?;
        writer.execute_batch(SCHEMA).map_err(|source| MemoryError::Open { path: path.to_path_buf(), source })?;
        let reader = connect(path)?;
        let index = {
            let mut stmt = reader.prepare("SELECT id, pipeline, at_ms, inputs, response FROM records")?;
            let rows = stmt.query_map([], row_to_record)?;
            // Exact at once; the indexer thread builds the graphs in the background, so a big
            // store opens in seconds and searches are exact (slower, never wrong) meanwhile.
            let mut loading = VectorIndex::with_precision(precision);
            for r in rows {
                loading.add(&r?);
            }
            loading
        };
        info!(path = %path.display(), vectors = index.len(), "memory store open");
        let index = Arc::new(RwLock::new(index));
        let (tx, rx) = mpsc::channel(4096);
        let weak = Arc::downgrade(&index);
        std::thread::Builder::new()
            .name("prism-memory-indexer".into())
            .spawn(move || indexer_loop(weak))
            .map_err(|e| MemoryError::Write(format!("cannot start the indexer thread: {e}")))?;
        let widx = index.clone();
        std::thread::Builder::new()
            .name("prism-memory-writer".into())
            .spawn(move || writer_loop(writer, rx, widx))
            .map_err(|e| MemoryError::Write(format!("cannot start the writer thread: {e}")))?;
        Ok(Arc::new(Self {
            location: path.display().to_string(),
            tx,
            backend: Backend::Sqlite { path: path.to_path_buf(), reader: Mutex::new(reader) },
            index,
        }))
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
        let location = reader.location().to_string();
        info!(location = %location, vectors = index.read().unwrap_or_else(|p| p.into_inner()).len(), "memory store open");
        let weak = Arc::downgrade(&index);
        std::thread::Builder::new()
            .name("prism-memory-indexer".into())
            .spawn(move || indexer_loop(weak))
            .map_err(|e| MemoryError::Write(format!("cannot start the indexer thread: {e}")))?;
        Ok(Arc::new(Self { location, tx, backend: Backend::Postgres(reader), index }))
    }

    /// The SQLite file, for the embedded store.
    pub fn path(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Sqlite { path, .. } => Some(path),
            Backend::Postgres(_) => None,
        }
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
        match &self.backend {
            Backend::Sqlite { .. } => Ok(0),
            Backend::Postgres(r) => r.catch_up(true),
        }
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

    /// Run `sqlite` on the embedded store's reader connection, or `pg` on the database's.
    fn read<T: Send + 'static>(
        &self,
        sqlite: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
        pg: impl FnOnce(&mut postgres::Client) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, MemoryError> {
        match &self.backend {
            Backend::Sqlite { reader, .. } => {
                let conn = reader.lock().unwrap_or_else(|p| p.into_inner());
                sqlite(&conn).map_err(MemoryError::from)
            }
            Backend::Postgres(r) => r.call(pg),
        }
    }

    /// A stored record with its corrections.
    pub fn get(&self, id: &str) -> Result<Option<StoredRecord>, MemoryError> {
        let owned = id.to_string();
        let raw = self.read(
            |c| {
                let Some(record) = c
                    .query_row("SELECT id, pipeline, at_ms, inputs, response FROM records WHERE id = ?1", [id], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })
                    .optional()?
                else {
                    return Ok(None);
                };
                let mut stmt = c.prepare(
                    "SELECT request_id, rating, answer, at_ms FROM corrections WHERE request_id = ?1 ORDER BY seq",
                )?;
                let corrections = stmt
                    .query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                    .collect::<Result<Vec<RawCorrection>, _>>()?;
                Ok(Some((record, corrections)))
            },
            move |c| {
                let id = owned;
                let Some(r) =
                    c.query_opt("SELECT id, pipeline, at_ms, inputs, response FROM records WHERE id = $1", &[&id])?
                else {
                    return Ok(None);
                };
                let record: RawRecord = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?, r.try_get(4)?);
                let corrections = c
                    .query(
                        "SELECT request_id, rating, answer, at_ms FROM corrections WHERE request_id = $1 ORDER BY seq",
                        &[&id],
                    )?
                    .iter()
                    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
                    .collect::<Result<Vec<RawCorrection>, postgres::Error>>()?;
                Ok(Some((record, corrections)))
            },
        )?;
        let Some((record, corrections)) = raw else { return Ok(None) };
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
        if let Backend::Postgres(r) = &self.backend {
            r.catch_up_if_stale();
        }
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
        self.read(
            |c| c.query_row("SELECT COUNT(*) FROM records", [], |r| r.get::<_, i64>(0)),
            |c| c.query_one("SELECT COUNT(*) FROM records", &[])?.try_get::<_, i64>(0),
        )
        .map(|n| n as u64)
    }

    /// Corrections aggregated per (node, revision) of the replicas that served the corrected
    /// requests: what the router's accuracy estimates start from after a restart.
    pub fn feedback(&self) -> Result<Vec<RevisionFeedback>, MemoryError> {
        const SQL: &str =
            "SELECT c.rating, r.response FROM corrections c JOIN records r ON r.id = c.request_id ORDER BY c.seq";
        let rows = self.read(
            |c| {
                let mut stmt = c.prepare(SQL)?;
                let rows = stmt.query_map([], |row| Ok((row.get::<_, f64>(0)?, row.get::<_, String>(1)?)))?;
                rows.collect::<Result<Vec<_>, _>>()
            },
            |c| {
                c.query(SQL, &[])?
                    .iter()
                    .map(|r| Ok((r.try_get::<_, f64>(0)?, r.try_get::<_, String>(1)?)))
                    .collect::<Result<Vec<_>, postgres::Error>>()
            },
        )?;
        let mut agg: BTreeMap<(String, String), (f64, u64)> = BTreeMap::new();
        for (rating, response) in rows {
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
        const SQL: &str = "SELECT c.request_id, c.rating, c.answer, c.at_ms, r.pipeline, r.inputs, r.response
             FROM corrections c JOIN records r ON r.id = c.request_id ORDER BY c.seq";
        let rows: Vec<RawExample> = self.read(
            |c| {
                let mut stmt = c.prepare(SQL)?;
                let rows = stmt.query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))
                })?;
                rows.collect::<Result<Vec<_>, _>>()
            },
            |c| {
                c.query(SQL, &[])?
                    .iter()
                    .map(|r| {
                        Ok((
                            r.try_get(0)?,
                            r.try_get(1)?,
                            r.try_get(2)?,
                            r.try_get(3)?,
                            r.try_get(4)?,
                            r.try_get(5)?,
                            r.try_get(6)?,
                        ))
                    })
                    .collect::<Result<Vec<_>, postgres::Error>>()
            },
        )?;
        Ok(rows
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

    /// Delete records (and their corrections) older than `cutoff_ms`; returns how many.
    pub fn prune_before(&self, cutoff_ms: i64) -> Result<u64, MemoryError> {
        // Through the reader connection: a rare, bounded maintenance write; WAL (or PostgreSQL)
        // serialises it with the writer thread's commits. On a shared database every router
        // prunes (the same rows: idempotent) and so drops them from its own index.
        let n = self.read(
            |c| c.execute("DELETE FROM records WHERE at_ms < ?1", [cutoff_ms]).map(|n| n as u64),
            move |c| c.execute("DELETE FROM records WHERE at_ms < $1", &[&cutoff_ms]),
        )?;
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
        let oldest_kept: Option<i64> = self.read(
            |c| {
                c.query_row("SELECT at_ms FROM records ORDER BY at_ms DESC LIMIT 1 OFFSET ?1", [offset], |r| r.get(0))
                    .optional()
            },
            move |c| {
                c.query_opt("SELECT at_ms FROM records ORDER BY at_ms DESC LIMIT 1 OFFSET $1", &[&offset])
                    .map(|row| row.map(|r| r.get(0)))
            },
        )?;
        match oldest_kept {
            Some(cutoff) => self.prune_before(cutoff),
            None => Ok(0),
        }
    }
}

/// The replicas that served a request: each modality's, and the fusion node's.
pub(crate) fn replicas_of(r: &InferResponse) -> Vec<ReplicaRef> {
    let mut v: Vec<ReplicaRef> = r.modalities.values().map(|m| m.replica.clone()).collect();
    v.extend(r.fusion_replica.clone());
    v
}

fn row_to_record(row: &rusqlite::Row<'_>) -> Result<Record, rusqlite::Error> {
    let inputs: String = row.get(3)?;
    let response: String = row.get(4)?;
    let bad =
        |e: serde_json::Error| rusqlite::Error::FromSqlConversionFailure(4, rusqlite::types::Type::Text, Box::new(e));
    Ok(Record {
        id: row.get(0)?,
        pipeline: row.get(1)?,
        at_ms: row.get(2)?,
        inputs: serde_json::from_str(&inputs).map_err(bad)?,
        response: serde_json::from_str(&response).map_err(bad)?,
    })
}

fn writer_loop(mut conn: Connection, mut rx: mpsc::Receiver<Op>, index: Arc<RwLock<VectorIndex>>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        commit_batch(&mut conn, batch, &index);
    }
}

/// An operation's outcome inside a batch, answered only once the batch's fate is known.
pub(crate) enum Done {
    Record(Box<Record>, Reply<()>, Result<(), MemoryError>),
    Correct(Reply<Vec<ReplicaRef>>, Result<Vec<ReplicaRef>, MemoryError>),
}

impl Done {
    /// An operation that never ran (the transaction could not begin).
    pub(crate) fn unapplied(op: Op) -> Self {
        match op {
            Op::Record(rec, tx) => Done::Record(rec, tx, Ok(())),
            Op::Correct(_, tx) => Done::Correct(tx, Ok(Vec::new())),
        }
    }

    /// Nothing of the batch was kept: whatever this operation did, it failed.
    fn failed(self, why: &str) -> Self {
        let err = || MemoryError::Write(why.to_string());
        match self {
            Done::Record(rec, tx, _) => Done::Record(rec, tx, Err(err())),
            Done::Correct(tx, _) => Done::Correct(tx, Err(err())),
        }
    }

    pub(crate) fn reply(self) {
        // A caller that went away (its request was cancelled) needs no answer.
        match self {
            Done::Record(_, tx, r) => {
                let _ = tx.send(r);
            }
            Done::Correct(tx, r) => {
                let _ = tx.send(r);
            }
        }
    }
}

/// One operation inside the open transaction.
fn apply(txn: &rusqlite::Transaction<'_>, op: Op) -> Done {
    let write = |e: &dyn std::fmt::Display| MemoryError::Write(e.to_string());
    match op {
        Op::Record(rec, tx) => {
            let r = (|| -> Result<(), MemoryError> {
                let inputs = serde_json::to_string(&rec.inputs).map_err(|e| write(&e))?;
                let response = serde_json::to_string(&rec.response).map_err(|e| write(&e))?;
                txn.execute(
                    "INSERT OR REPLACE INTO records (id, pipeline, at_ms, inputs, response) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![rec.id, rec.pipeline, rec.at_ms, inputs, response],
                )
                .map_err(|e| write(&e))?;
                Ok(())
            })();
            Done::Record(rec, tx, r)
        }
        Op::Correct(c, tx) => {
            let r = (|| -> Result<Vec<ReplicaRef>, MemoryError> {
                let response: Option<String> = txn
                    .query_row("SELECT response FROM records WHERE id = ?1", [&c.request_id], |r| r.get(0))
                    .optional()
                    .map_err(|e| write(&e))?;
                let Some(response) = response else {
                    return Err(MemoryError::UnknownRequest(c.request_id.clone()));
                };
                let answer = c.answer.as_ref().map(|a| a.to_string());
                txn.execute(
                    "INSERT INTO corrections (request_id, at_ms, rating, answer) VALUES (?1, ?2, ?3, ?4)",
                    params![c.request_id, c.at_ms, c.rating, answer],
                )
                .map_err(|e| write(&e))?;
                Ok(serde_json::from_str::<InferResponse>(&response).map(|r| replicas_of(&r)).unwrap_or_default())
            })();
            Done::Correct(tx, r)
        }
    }
}

/// All of a batch failed, because of `why`.
pub(crate) fn failed_batch(done: Vec<Done>, why: &str) -> Vec<Done> {
    error!(error = %why, ops = done.len(), "memory store commit failed");
    done.into_iter().map(|d| d.failed(why)).collect()
}

/// One transaction for the whole batch. Per-operation failures (an unknown request id) leave
/// the others in; a failed begin or commit (disk full, I/O error) fails them all, and nothing of
/// the batch is acknowledged.
fn commit_batch(conn: &mut Connection, batch: Vec<Op>, index: &RwLock<VectorIndex>) {
    let done = match conn.transaction() {
        Ok(txn) => {
            let done: Vec<Done> = batch.into_iter().map(|op| apply(&txn, op)).collect();
            match txn.commit() {
                Ok(()) => {
                    // Committed: make the records searchable, then acknowledge.
                    let mut idx = index.write().unwrap_or_else(|p| p.into_inner());
                    for d in &done {
                        if let Done::Record(rec, _, Ok(())) = d {
                            idx.add(rec);
                        }
                    }
                    done
                }
                Err(e) => failed_batch(done, &e.to_string()),
            }
        }
        Err(e) => failed_batch(batch.into_iter().map(Done::unapplied).collect(), &e.to_string()),
    };
    for d in done {
        d.reply();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
                },
            )]),
            contributions: None,
            fusion_replica: None,
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
