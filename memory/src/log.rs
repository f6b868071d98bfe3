//! The request log, independent of where it is kept: what is logged ([`Record`], [`Correction`]),
//! the writer threads' operations ([`Op`], answered through [`Done`] once their batch's fate is
//! known), the rows as stored, and [`LogBackend`], the reads each store answers (`sqlite.rs`: one
//! embedded file; `pg.rs`: one PostgreSQL database shared by several routers).

use std::path::{Path, PathBuf};

use prism_api::wire::router::{InferResponse, ReplicaRef};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tracing::error;

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

/// Where a writer-thread operation's result goes.
type Reply<T> = oneshot::Sender<Result<T, MemoryError>>;

pub(crate) enum Op {
    Record(Box<Record>, Reply<()>),
    Correct(Correction, Reply<Vec<ReplicaRef>>),
}

/// A record row as stored: id, pipeline, at_ms, inputs JSON, response JSON.
pub(crate) type RawRecord = (String, String, i64, String, String);
/// A correction row: request id, rating, answer JSON, at_ms.
pub(crate) type RawCorrection = (String, f64, Option<String>, i64);
/// A training-set row: the correction's fields, then the record's pipeline, inputs, response.
pub(crate) type RawExample = (String, f64, Option<String>, i64, String, String, String);

pub(crate) fn record_from_raw((id, pipeline, at_ms, inputs, response): RawRecord) -> Result<Record, MemoryError> {
    let bad = |e: serde_json::Error| MemoryError::Read(format!("record {id}: {e}"));
    Ok(Record {
        inputs: serde_json::from_str(&inputs).map_err(bad)?,
        response: serde_json::from_str(&response).map_err(bad)?,
        id,
        pipeline,
        at_ms,
    })
}

pub(crate) fn correction_from_raw((request_id, rating, answer, at_ms): RawCorrection) -> Correction {
    Correction { request_id, rating, answer: answer.and_then(|a| serde_json::from_str(&a).ok()), at_ms }
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

/// The next commit's operations: the first to arrive (blocking; None once every sender is gone)
/// and whatever else is already waiting, up to [`MAX_BATCH`] (group commit under load).
pub(crate) fn next_batch(rx: &mut mpsc::Receiver<Op>) -> Option<Vec<Op>> {
    let mut batch = vec![rx.blocking_recv()?];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// All of a batch failed, because of `why`.
pub(crate) fn failed_batch(done: Vec<Done>, why: &str) -> Vec<Done> {
    error!(error = %why, ops = done.len(), "memory store commit failed");
    done.into_iter().map(|d| d.failed(why)).collect()
}

/// The replicas that served a request: each modality's, and the fusion node's.
pub(crate) fn replicas_of(r: &InferResponse) -> Vec<ReplicaRef> {
    let mut v: Vec<ReplicaRef> = r.modalities.values().map(|m| m.replica.clone()).collect();
    v.extend(r.fusion_replica.clone());
    v
}

/// Every correction with the response it corrects, oldest first (feeds [`RevisionFeedback`]).
///
/// [`RevisionFeedback`]: crate::RevisionFeedback
pub(crate) const RATED_RESPONSES_SQL: &str =
    "SELECT c.rating, r.response FROM corrections c JOIN records r ON r.id = c.request_id ORDER BY c.seq";
/// Every correction joined with its record, oldest first (the training set).
pub(crate) const CORRECTED_RECORDS_SQL: &str =
    "SELECT c.request_id, c.rating, c.answer, c.at_ms, r.pipeline, r.inputs, r.response
     FROM corrections c JOIN records r ON r.id = c.request_id ORDER BY c.seq";
pub(crate) const COUNT_SQL: &str = "SELECT COUNT(*) FROM records";

/// The reads (and the rare maintenance deletes) a store answers. Writes go to the store's writer
/// thread as [`Op`]s; it group-commits them, adds committed records to the vector index, then
/// answers. One implementation per store, so each query is written once per SQL dialect and
/// [`crate::Memory`] holds no backend-specific code.
pub(crate) trait LogBackend: Send + Sync {
    /// A record and its corrections (oldest first), as stored.
    fn get(&self, id: &str) -> Result<Option<(RawRecord, Vec<RawCorrection>)>, MemoryError>;
    fn count(&self) -> Result<u64, MemoryError>;
    /// [`RATED_RESPONSES_SQL`]: (rating, response JSON).
    fn rated_responses(&self) -> Result<Vec<(f64, String)>, MemoryError>;
    /// [`CORRECTED_RECORDS_SQL`].
    fn corrected_records(&self) -> Result<Vec<RawExample>, MemoryError>;
    /// Delete the records older than `cutoff_ms` with their corrections; how many went.
    fn delete_before(&self, cutoff_ms: i64) -> Result<u64, MemoryError>;
    /// `at_ms` of the record `offset` places after the newest, if there are that many.
    fn at_ms_from_newest(&self, offset: i64) -> Result<Option<i64>, MemoryError>;
    /// The file, for an embedded store.
    fn path(&self) -> Option<&Path> {
        None
    }
    /// Load what other routers committed into the index now; how many records. A store with one
    /// writer has nothing to load.
    fn catch_up(&self) -> Result<usize, MemoryError> {
        Ok(0)
    }
    /// Before a search: [`Self::catch_up`] unless that was done moments ago.
    fn catch_up_if_stale(&self) {}
}
