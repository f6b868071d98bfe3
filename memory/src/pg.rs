//! The PostgreSQL backend: one database shared by several routers.
//!
//! The design of the embedded store carries over: one writer thread group-commits the ops that
//! arrived meanwhile in one transaction and answers each caller only after `COMMIT` returned (the
//! server's default `synchronous_commit = on`: the commit is flushed to its WAL). Reads go through
//! a reader thread with its own connection. The sync `postgres` client runs its own tokio runtime
//! and must never be used (nor dropped) on an async worker thread, so every connection lives on a
//! thread of this module.
//!
//! Several routers, one database: each router's in-memory vector index also loads the records the
//! others committed. Records carry a `seq` (BIGSERIAL); a poller loads `seq > last seen` every
//! [`POLL_INTERVAL`] (and searches do the same first, at most every [`SEARCH_CATCH_UP`]). Every
//! writer transaction takes one advisory lock before it inserts, so records commit in `seq` order
//! across all routers: a reader that sees seq n also sees every committed seq below n, and the
//! poller never skips a row that commits late.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls, Statement};
use prism_api::wire::router::InferResponse;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::index::VectorIndex;
use crate::log::{
    failed_batch, next_batch, replicas_of, Done, LogBackend, MemoryError, Op, RawCorrection, RawExample, RawRecord,
    Record, CORRECTED_RECORDS_SQL, COUNT_SQL, RATED_RESPONSES_SQL,
};

/// How often a router loads the records other routers committed.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// A search first loads other routers' records, unless that was done this recently.
pub(crate) const SEARCH_CATCH_UP: Duration = Duration::from_millis(50);
/// Rows per catch-up query (a fresh router loads a big table in pages).
const CATCH_UP_PAGE: i64 = 5000;
/// The advisory lock every writer transaction holds: records commit in `seq` order.
const WRITE_LOCK: i64 = 0x7072_6973_6d6d; // "prismm"
/// Connecting gives up after this long unless the URL sets `connect_timeout`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    seq BIGSERIAL NOT NULL,
    id TEXT PRIMARY KEY,
    pipeline TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    inputs TEXT NOT NULL,
    response TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS records_by_seq ON records (seq);
CREATE INDEX IF NOT EXISTS records_by_time ON records (at_ms);
CREATE TABLE IF NOT EXISTS corrections (
    seq BIGSERIAL PRIMARY KEY,
    request_id TEXT NOT NULL REFERENCES records (id) ON DELETE CASCADE,
    at_ms BIGINT NOT NULL,
    rating DOUBLE PRECISION NOT NULL,
    answer TEXT
);
CREATE INDEX IF NOT EXISTS corrections_by_request ON corrections (request_id);
";

/// A connection URL, parsed, with a description safe to print (never the password).
pub(crate) struct Target {
    config: postgres::Config,
    location: String,
    password: Option<String>,
}

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Self, MemoryError> {
        let mut config = postgres::Config::from_str(url).map_err(|e| MemoryError::Connect {
            location: redact_url(url),
            reason: format!("{}; expected postgres://USER:PASSWORD@HOST:PORT/DATABASE", reason(&e)),
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("prism-router");
        }
        let password = config.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).filter(|p| !p.is_empty());
        Ok(Self { location: describe(&config), config, password })
    }

    pub(crate) fn location(&self) -> &str {
        &self.location
    }

    /// A message from the server or the client library, with the password (should it ever
    /// appear) masked.
    fn scrub(&self, msg: String) -> String {
        match &self.password {
            Some(p) if msg.contains(p.as_str()) => msg.replace(p.as_str(), "***"),
            _ => msg,
        }
    }

    fn error(&self, e: &postgres::Error) -> String {
        self.scrub(reason(e))
    }

    fn connect(&self) -> Result<Client, MemoryError> {
        self.config
            .connect(NoTls)
            .map_err(|e| MemoryError::Connect { location: self.location.clone(), reason: self.error(&e) })
    }
}

/// `postgres://user@host:port/db`: what a log line or an error may say about a database.
fn describe(c: &postgres::Config) -> String {
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                postgres::config::Host::Tcp(h) => h.clone(),
                postgres::config::Host::Unix(p) => p.display().to_string(),
            };
            let port = c.get_ports().get(i).or_else(|| c.get_ports().first()).copied().unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    let user = c.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    let hosts = if hosts.is_empty() { "localhost:5432".to_string() } else { hosts.join(",") };
    format!("postgres://{user}{hosts}/{}", c.get_dbname().or(c.get_user()).unwrap_or("postgres"))
}

/// A URL that does not even parse, with anything that may be a password removed: the part
/// between `://user:` and `@`, and `password=...` parameters.
pub(crate) fn redact_url(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_at = scheme_end + 3;
        let authority_end = out[rest_at..].find('/').map_or(out.len(), |i| rest_at + i);
        if let Some(at) = out[rest_at..authority_end].rfind('@').map(|i| rest_at + i) {
            if let Some(colon) = out[rest_at..at].find(':').map(|i| rest_at + i) {
                out.replace_range(colon..at, ":***");
            }
        }
    }
    let lower = out.to_ascii_lowercase();
    if let Some(i) = lower.find("password=") {
        let start = i + "password=".len();
        let end = out[start..].find(['&', ' ']).map_or(out.len(), |j| start + j);
        out.replace_range(start..end, "***");
    }
    out
}

/// The error and its causes: the library's `Display` says only "db error" or "error connecting
/// to server"; the server's message and the I/O error are in the source chain.
fn reason(e: &postgres::Error) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// What the catch-up has loaded, shared by the writer (which indexes its own records at commit)
/// and the poller (which loads everyone's).
#[derive(Default)]
pub(crate) struct Tail {
    /// Every record with `seq <= last_seq` is in the index (or was pruned).
    last_seq: i64,
    /// This router's own records above `last_seq`, indexed at commit: the poller skips them.
    own: BTreeSet<i64>,
    last_run: Option<Instant>,
}

/// Load records with `seq > last_seq` into `index`; returns how many were added. With
/// `wait == false` (a search), gives up at once when the writer or the poller is at it.
fn catch_up(
    client: &mut Client,
    tail: &Mutex<Tail>,
    index: &RwLock<VectorIndex>,
    wait: bool,
) -> Result<usize, postgres::Error> {
    let mut t = if wait {
        tail.lock().unwrap_or_else(|p| p.into_inner())
    } else {
        match tail.try_lock() {
            Ok(t) => t,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(0),
        }
    };
    let mut added = 0;
    loop {
        let rows = client.query(
            "SELECT seq, id, pipeline, at_ms, response FROM records WHERE seq > $1 ORDER BY seq LIMIT $2",
            &[&t.last_seq, &CATCH_UP_PAGE],
        )?;
        let n = rows.len();
        let mut records = Vec::with_capacity(n);
        for row in &rows {
            let seq: i64 = row.try_get(0)?;
            t.last_seq = t.last_seq.max(seq);
            if t.own.remove(&seq) {
                continue;
            }
            let response: String = row.try_get(4)?;
            let Ok(response) = serde_json::from_str::<InferResponse>(&response) else {
                warn!(seq, "memory record with an unreadable response: not searchable");
                continue;
            };
            records.push(Record {
                id: row.try_get(1)?,
                pipeline: row.try_get(2)?,
                at_ms: row.try_get(3)?,
                inputs: serde_json::Value::Null,
                response,
            });
        }
        if !records.is_empty() {
            let mut idx = index.write().unwrap_or_else(|p| p.into_inner());
            for r in &records {
                idx.add(r);
            }
            added += records.len();
        }
        if (n as i64) < CATCH_UP_PAGE {
            break;
        }
    }
    // Own seqs at or below what was seen and not met were pruned meanwhile.
    let last = t.last_seq;
    t.own.retain(|s| *s > last);
    t.last_run = Some(Instant::now());
    Ok(added)
}

/// A closure run on the reader thread with its connection (or the reason there is none).
type Job = Box<dyn FnOnce(Result<&mut Client, MemoryError>) + Send>;

/// The reader thread's handle; the thread ends when this is dropped.
pub(crate) struct Reader {
    target: Arc<Target>,
    jobs: std::sync::mpsc::Sender<Job>,
    tail: Arc<Mutex<Tail>>,
    index: Arc<RwLock<VectorIndex>>,
}

impl Reader {
    pub(crate) fn location(&self) -> &str {
        self.target.location()
    }

    /// Run `f` on the reader connection and wait for its result.
    pub(crate) fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, postgres::Error> + Send + 'static,
    ) -> Result<T, MemoryError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let target = self.target.clone();
        let job: Job = Box::new(move |client| {
            let r = client.and_then(|c| f(c).map_err(|e| MemoryError::Read(target.error(&e))));
            let _ = tx.send(r);
        });
        self.jobs.send(job).map_err(|_| MemoryError::Closed)?;
        rx.recv().map_err(|_| MemoryError::Closed)?
    }

    /// Load what other routers committed; `wait == false` skips when a catch-up is under way.
    fn load_committed(&self, wait: bool) -> Result<usize, MemoryError> {
        let (tail, index) = (self.tail.clone(), self.index.clone());
        self.call(move |c| catch_up(c, &tail, &index, wait))
    }
}

impl LogBackend for Reader {
    fn get(&self, id: &str) -> Result<Option<(RawRecord, Vec<RawCorrection>)>, MemoryError> {
        let id = id.to_string();
        self.call(move |c| {
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
        })
    }

    fn count(&self) -> Result<u64, MemoryError> {
        self.call(|c| c.query_one(COUNT_SQL, &[])?.try_get::<_, i64>(0)).map(|n| n as u64)
    }

    fn rated_responses(&self) -> Result<Vec<(f64, String)>, MemoryError> {
        self.call(|c| c.query(RATED_RESPONSES_SQL, &[])?.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect())
    }

    fn corrected_records(&self) -> Result<Vec<RawExample>, MemoryError> {
        self.call(|c| {
            c.query(CORRECTED_RECORDS_SQL, &[])?
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
                .collect()
        })
    }

    fn delete_before(&self, cutoff_ms: i64) -> Result<u64, MemoryError> {
        self.call(move |c| c.execute("DELETE FROM records WHERE at_ms < $1", &[&cutoff_ms]))
    }

    fn at_ms_from_newest(&self, offset: i64) -> Result<Option<i64>, MemoryError> {
        self.call(move |c| {
            c.query_opt("SELECT at_ms FROM records ORDER BY at_ms DESC LIMIT 1 OFFSET $1", &[&offset])?
                .map(|r| r.try_get(0))
                .transpose()
        })
    }

    fn catch_up(&self) -> Result<usize, MemoryError> {
        self.load_committed(true)
    }

    /// Catch up unless that was done in the last [`SEARCH_CATCH_UP`].
    fn catch_up_if_stale(&self) {
        let fresh = self
            .tail
            .try_lock()
            .map(|t| t.last_run.is_some_and(|at| at.elapsed() < SEARCH_CATCH_UP))
            // Busy: someone is catching up right now.
            .unwrap_or(true);
        if !fresh {
            if let Err(e) = self.load_committed(false) {
                debug!(error = %e, "memory catch-up before search failed");
            }
        }
    }
}

fn reader_loop(target: Arc<Target>, jobs: std::sync::mpsc::Receiver<Job>) {
    let mut client: Option<Client> = None;
    while let Ok(job) = jobs.recv() {
        if client.as_ref().is_some_and(Client::is_closed) {
            client = None;
        }
        if client.is_none() {
            match target.connect() {
                Ok(c) => client = Some(c),
                Err(e) => {
                    job(Err(e));
                    continue;
                }
            }
        }
        if let Some(c) = client.as_mut() {
            job(Ok(c));
        }
    }
}

/// Loads other routers' records every [`POLL_INTERVAL`]; ends with the store.
fn poller_loop(target: Arc<Target>, tail: Weak<Mutex<Tail>>, index: Weak<RwLock<VectorIndex>>) {
    let mut client: Option<Client> = None;
    let mut failing = false;
    loop {
        std::thread::sleep(POLL_INTERVAL);
        let (Some(tail), Some(index)) = (tail.upgrade(), index.upgrade()) else { return };
        if client.as_ref().is_some_and(Client::is_closed) {
            client = None;
        }
        let r = match client.as_mut() {
            Some(c) => catch_up(c, &tail, &index, true).map_err(|e| target.error(&e)),
            None => match target.connect() {
                Ok(mut c) => {
                    let r = catch_up(&mut c, &tail, &index, true).map_err(|e| target.error(&e));
                    client = Some(c);
                    r
                }
                Err(e) => Err(e.to_string()),
            },
        };
        match r {
            Ok(n) => {
                if failing {
                    info!(location = %target.location(), "memory catch-up works again");
                }
                failing = false;
                if n > 0 {
                    debug!(records = n, "memory: loaded records other routers committed");
                }
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "memory catch-up failed; retrying");
                }
                failing = true;
            }
        }
    }
}

/// The writer's connection and its prepared statements.
struct Conn {
    client: Client,
    insert: Statement,
    lookup: Statement,
    correct: Statement,
}

impl Conn {
    /// Connect, create the tables if missing, prepare the statements.
    fn open(target: &Target) -> Result<Self, MemoryError> {
        let mut client = target.connect()?;
        create_schema(&mut client).map_err(|e| MemoryError::Connect {
            location: target.location.clone(),
            reason: format!("creating the tables: {}", target.error(&e)),
        })?;
        let fail =
            |e: postgres::Error| MemoryError::Connect { location: target.location.clone(), reason: target.error(&e) };
        let insert = client
            .prepare(
                "INSERT INTO records (id, pipeline, at_ms, inputs, response) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (id) DO UPDATE SET pipeline = EXCLUDED.pipeline, at_ms = EXCLUDED.at_ms,
                 inputs = EXCLUDED.inputs, response = EXCLUDED.response, seq = EXCLUDED.seq
                 RETURNING seq",
            )
            .map_err(fail)?;
        // KEY SHARE: a concurrent prune (another router's retention) waits for this commit
        // instead of failing the correction's foreign key.
        let lookup = client.prepare("SELECT response FROM records WHERE id = $1 FOR KEY SHARE").map_err(fail)?;
        let correct = client
            .prepare("INSERT INTO corrections (request_id, at_ms, rating, answer) VALUES ($1, $2, $3, $4)")
            .map_err(fail)?;
        Ok(Self { client, insert, lookup, correct })
    }
}

/// Create the tables (once; routers starting together serialise on the advisory lock).
fn create_schema(client: &mut Client) -> Result<(), postgres::Error> {
    let mut txn = client.transaction()?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
    txn.batch_execute(SCHEMA)?;
    txn.commit()
}

/// Connect, create the schema, load every record into `index`, and start the writer, reader and
/// poller threads. Blocking; runs the connections on threads of their own (safe to call from an
/// async context).
pub(crate) fn open(url: &str, index: Arc<RwLock<VectorIndex>>) -> Result<(Reader, mpsc::Sender<Op>), MemoryError> {
    let target = Arc::new(Target::parse(url)?);
    let tail = Arc::new(Mutex::new(Tail::default()));
    let (tx, rx) = mpsc::channel(4096);
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    {
        let (target, index, tail) = (target.clone(), index.clone(), tail.clone());
        std::thread::Builder::new()
            .name("prism-memory-writer".into())
            .spawn(move || match Conn::open(&target) {
                Ok(conn) => {
                    let _ = ready_tx.send(Ok(()));
                    writer_loop(&target, conn, rx, &index, &tail);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| MemoryError::Write(format!("cannot start the writer thread: {e}")))?;
    }
    ready_rx.recv().map_err(|_| MemoryError::Closed)??;
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel::<Job>();
    {
        let target = target.clone();
        std::thread::Builder::new()
            .name("prism-memory-reader".into())
            .spawn(move || reader_loop(target, jobs_rx))
            .map_err(|e| MemoryError::Write(format!("cannot start the reader thread: {e}")))?;
    }
    let reader = Reader { target: target.clone(), jobs: jobs_tx, tail: tail.clone(), index: index.clone() };
    reader.load_committed(true)?;
    let (wt, wi) = (Arc::downgrade(&tail), Arc::downgrade(&index));
    std::thread::Builder::new()
        .name("prism-memory-poller".into())
        .spawn(move || poller_loop(target, wt, wi))
        .map_err(|e| MemoryError::Write(format!("cannot start the catch-up thread: {e}")))?;
    Ok((reader, tx))
}

fn writer_loop(
    target: &Target,
    conn: Conn,
    mut rx: mpsc::Receiver<Op>,
    index: &RwLock<VectorIndex>,
    tail: &Mutex<Tail>,
) {
    let mut conn = Some(conn);
    while let Some(batch) = next_batch(&mut rx) {
        if conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            conn = None;
        }
        if conn.is_none() {
            match Conn::open(target) {
                Ok(c) => {
                    info!(location = %target.location(), "memory writer reconnected");
                    conn = Some(c);
                }
                Err(e) => {
                    let done = batch.into_iter().map(Done::unapplied).collect();
                    for d in failed_batch(done, &e.to_string()) {
                        d.reply();
                    }
                    continue;
                }
            }
        }
        if let Some(c) = conn.as_mut() {
            commit_batch(target, c, batch, index, tail);
        }
    }
}

/// One operation inside the open transaction. `Err` is a database error: the transaction is
/// aborted (PostgreSQL keeps nothing of it), and the whole batch fails.
fn apply(
    txn: &mut postgres::Transaction<'_>,
    conn: (&Statement, &Statement, &Statement),
    op: Op,
) -> (Done, Option<i64>, Option<postgres::Error>) {
    let (insert, lookup, correct) = conn;
    match op {
        Op::Record(rec, tx) => {
            let json = serde_json::to_string(&rec.inputs).and_then(|i| Ok((i, serde_json::to_string(&rec.response)?)));
            let (inputs, response) = match json {
                Ok(j) => j,
                Err(e) => return (Done::Record(rec, tx, Err(MemoryError::Write(e.to_string()))), None, None),
            };
            match txn.query_one(insert, &[&rec.id, &rec.pipeline, &rec.at_ms, &inputs, &response]) {
                Ok(row) => match row.try_get::<_, i64>(0) {
                    Ok(seq) => (Done::Record(rec, tx, Ok(())), Some(seq), None),
                    Err(e) => (Done::Record(rec, tx, Ok(())), None, Some(e)),
                },
                Err(e) => (Done::Record(rec, tx, Ok(())), None, Some(e)),
            }
        }
        Op::Correct(c, tx) => {
            let response: Option<String> = match txn.query_opt(lookup, &[&c.request_id]) {
                Ok(row) => match row.map(|r| r.try_get(0)).transpose() {
                    Ok(r) => r,
                    Err(e) => return (Done::Correct(tx, Ok(Vec::new())), None, Some(e)),
                },
                Err(e) => return (Done::Correct(tx, Ok(Vec::new())), None, Some(e)),
            };
            let Some(response) = response else {
                return (Done::Correct(tx, Err(MemoryError::UnknownRequest(c.request_id.clone()))), None, None);
            };
            let answer = c.answer.as_ref().map(|a| a.to_string());
            if let Err(e) = txn.execute(correct, &[&c.request_id, &c.at_ms, &c.rating, &answer]) {
                return (Done::Correct(tx, Ok(Vec::new())), None, Some(e));
            }
            let replicas =
                serde_json::from_str::<InferResponse>(&response).map(|r| replicas_of(&r)).unwrap_or_default();
            (Done::Correct(tx, Ok(replicas)), None, None)
        }
    }
}

/// One transaction for the whole batch, like the embedded store's: per-operation failures (an
/// unknown request id) leave the others in; a database error fails them all and nothing of the
/// batch is acknowledged.
fn commit_batch(target: &Target, conn: &mut Conn, batch: Vec<Op>, index: &RwLock<VectorIndex>, tail: &Mutex<Tail>) {
    let stmts = (&conn.insert, &conn.lookup, &conn.correct);
    let done = 'done: {
        let mut txn = match conn.client.transaction() {
            Ok(t) => t,
            Err(e) => break 'done failed_batch(batch.into_iter().map(Done::unapplied).collect(), &target.error(&e)),
        };
        if let Err(e) = txn.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK]) {
            break 'done failed_batch(batch.into_iter().map(Done::unapplied).collect(), &target.error(&e));
        }
        let mut done = Vec::with_capacity(batch.len());
        let mut seqs = Vec::with_capacity(batch.len());
        let mut fatal = None;
        for op in batch {
            if fatal.is_some() {
                done.push(Done::unapplied(op));
                seqs.push(None);
                continue;
            }
            let (d, seq, e) = apply(&mut txn, stmts, op);
            done.push(d);
            seqs.push(seq);
            fatal = e;
        }
        if let Some(e) = fatal {
            // Dropping the transaction rolls it back.
            drop(txn);
            break 'done failed_batch(done, &target.error(&e));
        }
        // Held across the commit: the poller must not load these records before they are
        // marked as this router's own (they would be indexed twice).
        let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
        match txn.commit() {
            Ok(()) => {
                let mut idx = index.write().unwrap_or_else(|p| p.into_inner());
                for (d, seq) in done.iter().zip(&seqs) {
                    if let (Done::Record(rec, _, Ok(())), Some(seq)) = (d, seq) {
                        if *seq > t.last_seq {
                            t.own.insert(*seq);
                            idx.add(rec);
                        }
                    }
                }
                done
            }
            Err(e) => {
                error!(location = %target.location(), "memory commit failed");
                failed_batch(done, &target.error(&e))
            }
        }
    };
    for d in done {
        d.reply();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_never_carry_the_password() {
        let t = Target::parse("postgres://prism:hunter2@db.example:6543/memory?sslmode=disable").unwrap();
        assert_eq!(t.location(), "postgres://prism@db.example:6543/memory");
        let t = Target::parse("host=db.example user=prism password=hunter2 dbname=memory").unwrap();
        assert_eq!(t.location(), "postgres://prism@db.example:5432/memory");
        assert_eq!(t.scrub("oops hunter2".into()), "oops ***");
        let bad = match Target::parse("postgres://prism:hunter2@db.example:notaport/memory") {
            Err(e) => e.to_string(),
            Ok(_) => panic!("parsed"),
        };
        assert!(!bad.contains("hunter2") && bad.contains("db.example"), "{bad}");
        assert_eq!(redact_url("host=h password=pw dbname=d"), "host=h password=*** dbname=d");
    }
}
