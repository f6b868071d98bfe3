//! The embedded store: one SQLite file in WAL mode with `synchronous=FULL`, so a committed
//! transaction survives kill -9 and power loss. A single writer thread group-commits whatever
//! arrived meanwhile in one transaction, and answers each caller only after that commit: an
//! acknowledged write is on disk. Reads use a second connection (WAL: they never block the writer).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use prism_api::wire::router::{InferResponse, ReplicaRef};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::mpsc;

use crate::index::VectorIndex;
use crate::log::{
    failed_batch, next_batch, replicas_of, Done, LogBackend, MemoryError, Op, RawCorrection, RawExample, RawRecord,
    Record, CORRECTED_RECORDS_SQL, COUNT_SQL, RATED_RESPONSES_SQL,
};

impl From<rusqlite::Error> for MemoryError {
    fn from(e: rusqlite::Error) -> Self {
        MemoryError::Read(e.to_string())
    }
}

/// The reader side of the embedded store (the writer thread owns the other connection).
pub(crate) struct SqliteLog {
    path: PathBuf,
    reader: Mutex<Connection>,
}

/// Open (or create) the store at `path`, load every record into `index` (exact search at once;
/// the indexer builds graphs in the background) and start the writer thread.
pub(crate) fn open(
    path: &Path,
    index: &Arc<RwLock<VectorIndex>>,
) -> Result<(SqliteLog, mpsc::Sender<Op>), MemoryError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| MemoryError::Open {
            path: path.to_path_buf(),
            source: rusqlite::Error::InvalidPath(PathBuf::from(format!("{}: {e}", dir.display()))),
        })?;
    }
    let writer = connect(path)?;
    writer.execute_batch(SCHEMA).map_err(|source| MemoryError::Open { path: path.to_path_buf(), source })?;
    let reader = connect(path)?;
    {
        let mut stmt = reader.prepare("SELECT id, pipeline, at_ms, inputs, response FROM records")?;
        let rows = stmt.query_map([], row_to_record)?;
        let mut idx = index.write().unwrap_or_else(|p| p.into_inner());
        for r in rows {
            idx.add(&r?);
        }
    }
    let (tx, rx) = mpsc::channel(4096);
    let widx = index.clone();
    std::thread::Builder::new()
        .name("prism-memory-writer".into())
        .spawn(move || writer_loop(writer, rx, widx))
        .map_err(|e| MemoryError::Write(format!("cannot start the writer thread: {e}")))?;
    Ok((SqliteLog { path: path.to_path_buf(), reader: Mutex::new(reader) }, tx))
}

impl SqliteLog {
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>) -> Result<T, MemoryError> {
        let conn = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        f(&conn).map_err(MemoryError::from)
    }
}

impl LogBackend for SqliteLog {
    fn get(&self, id: &str) -> Result<Option<(RawRecord, Vec<RawCorrection>)>, MemoryError> {
        self.read(|c| {
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
        })
    }

    fn count(&self) -> Result<u64, MemoryError> {
        self.read(|c| c.query_row(COUNT_SQL, [], |r| r.get::<_, i64>(0))).map(|n| n as u64)
    }

    fn rated_responses(&self) -> Result<Vec<(f64, String)>, MemoryError> {
        self.read(|c| {
            let mut stmt = c.prepare(RATED_RESPONSES_SQL)?;
            let rows = stmt.query_map([], |row| Ok((row.get(0)?, row.get(1)?)))?;
            rows.collect()
        })
    }

    fn corrected_records(&self) -> Result<Vec<RawExample>, MemoryError> {
        self.read(|c| {
            let mut stmt = c.prepare(CORRECTED_RECORDS_SQL)?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)))?;
            rows.collect()
        })
    }

    fn delete_before(&self, cutoff_ms: i64) -> Result<u64, MemoryError> {
        // Through the reader connection: a rare, bounded maintenance write; WAL serialises it
        // with the writer thread's commits.
        self.read(|c| c.execute("DELETE FROM records WHERE at_ms < ?1", [cutoff_ms]).map(|n| n as u64))
    }

    fn at_ms_from_newest(&self, offset: i64) -> Result<Option<i64>, MemoryError> {
        self.read(|c| {
            c.query_row("SELECT at_ms FROM records ORDER BY at_ms DESC LIMIT 1 OFFSET ?1", [offset], |r| r.get(0))
                .optional()
        })
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
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
    while let Some(batch) = next_batch(&mut rx) {
        commit_batch(&mut conn, batch, &index);
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
