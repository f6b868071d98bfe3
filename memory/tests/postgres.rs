//! The memory store on a real PostgreSQL server: two stores on one database behave as two
//! routers sharing one memory; an acknowledged write survives kill -9 of its writer; a bad URL
//! is a clear error that never shows the password. Needs the PostgreSQL server binaries
//! (scripts/install-deps.sh): without them these tests fail and say so.

#[path = "common/postgres.rs"]
mod pg_server;

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pg_server::{PgServer, DATABASE, PASSWORD, USER};
use prism_api::wire::router::{InferResponse, ModalityResult, ReplicaRef, RouterTimings};
use prism_memory::{Correction, Memory, MemoryError, Record, FUSED};

fn record(id: &str, v: Vec<f32>, rev: &str) -> Record {
    Record {
        id: id.into(),
        pipeline: "p".into(),
        at_ms: 1_000,
        inputs: serde_json::json!({"text": format!("input of {id}")}),
        response: InferResponse {
            id: id.into(),
            pipeline: "p".into(),
            generation: 1,
            strategy: "weighted".into(),
            embedding: Some(v.clone()),
            modalities: BTreeMap::from([(
                "text".to_string(),
                ModalityResult {
                    embedding: v,
                    replica: ReplicaRef { node: "minilm".into(), endpoint: "http://e".into(), revision: rev.into() },
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
        },
    }
}

fn ids(hits: &[prism_memory::Hit]) -> Vec<&str> {
    hits.iter().map(|h| h.id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_routers_share_one_database() {
    let server = PgServer::start();
    let url = server.url();
    let a = Memory::open_postgres(&url).expect("router A opens");
    let b = Memory::open_postgres(&url).expect("router B opens");
    assert_eq!(a.location(), format!("postgres://{USER}@127.0.0.1:{}/{DATABASE}", server.port));
    assert!(!a.location().contains(PASSWORD));
    assert!(a.path().is_none());

    // Written through A: B reads it straight from the database, and finds it by meaning after
    // catching up.
    a.record(record("r1", vec![1.0, 0.0], "rev1")).await.expect("A records");
    let got = b.get("r1").expect("B reads").expect("B finds A's record");
    assert_eq!(got.record.inputs["text"], "input of r1");
    // A search catches up first (at most every 50 ms; the poll runs every 500 ms).
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(b.search(Some("p"), "text", &[1.0, 0.1], 5).0.first().map(|h| h.id.as_str()), Some("r1"));

    // The background poll alone (search_exact does not catch up) brings B the next one.
    a.record(record("r2", vec![0.0, 1.0], "rev1")).await.expect("A records");
    let t0 = Instant::now();
    while b.search_exact(Some("p"), FUSED, &[0.0, 1.0], 5).first().map(|h| h.id.as_str()) != Some("r2") {
        assert!(t0.elapsed() < Duration::from_secs(5), "B's index never saw r2 without a search");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A correction through B: A's feedback, training set and get see it.
    let replicas = b
        .correct(Correction { request_id: "r1".into(), rating: 0.0, answer: Some(serde_json::json!("cat")), at_ms: 0 })
        .await
        .expect("B corrects A's record");
    assert_eq!(replicas[0].revision, "rev1");
    let fb = a.feedback().expect("A's feedback");
    assert_eq!((fb.len(), fb[0].revision.as_str(), fb[0].count, fb[0].rating_sum), (1, "rev1", 1, 0.0));
    let set = a.training_set().expect("A's training set");
    assert_eq!(set.len(), 1);
    assert_eq!((set[0]["requestId"].as_str(), set[0]["answer"].as_str()), (Some("r1"), Some("cat")));
    assert_eq!(set[0]["embeddings"]["text"], serde_json::json!([1.0, 0.0]));
    assert_eq!(a.get("r1").unwrap().unwrap().corrections.len(), 1);
    assert!(matches!(
        b.correct(Correction { request_id: "nope".into(), rating: 1.0, answer: None, at_ms: 0 }).await,
        Err(MemoryError::UnknownRequest(_))
    ));

    // Both write at once: each index ends up with every record exactly once (its own indexed at
    // commit, the other's by catch-up; none skipped, none twice).
    let mut tasks = Vec::new();
    for i in 0..200 {
        let m = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move { m.record(record(&format!("c{i}"), vec![1.0, i as f32], "rev2")).await }));
    }
    for t in tasks {
        t.await.expect("task").expect("concurrent record");
    }
    tokio::time::sleep(Duration::from_millis(1200)).await; // > 2 polls
    for (name, m) in [("A", &a), ("B", &b)] {
        m.catch_up().expect("catch up");
        let hits = m.search_exact(Some("p"), "text", &[1.0, 0.0], 10_000);
        let unique: BTreeSet<&str> = ids(&hits).into_iter().collect();
        assert_eq!(hits.len(), 202, "{name}'s index holds every record once");
        assert_eq!(unique.len(), 202, "{name}'s index has no duplicates");
    }
    assert_eq!(a.count().unwrap(), 202);

    // A third router starting now loads everything; retention through one prunes for all.
    let c = Memory::open_postgres(&url).expect("router C opens");
    assert_eq!(c.search_exact(None, FUSED, &[1.0, 0.0], 10_000).len(), 202);
    // Size retention on PostgreSQL: every record shares one millisecond, so keeping the newest
    // 10 keeps that whole millisecond.
    assert_eq!(c.prune_to_count(10).unwrap(), 0);
    assert_eq!(c.prune_before(2_000).unwrap(), 202);
    assert_eq!(a.count().unwrap(), 0);
    assert!(b.get("r1").unwrap().is_none());
    assert!(a.feedback().unwrap().is_empty(), "corrections went with their records");
}

/// The writer of `acknowledged_writes_survive_kill9`, run in a child process: records as fast
/// as it can from 8 tasks and prints each id once acknowledged. Ignored: it is a helper process,
/// not a test, and runs only when that test starts it with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "helper process of acknowledged_writes_survive_kill9"]
async fn child_writer() {
    let url =
        std::env::var("PRISM_PG_CHILD_URL").expect("PRISM_PG_CHILD_URL (set by acknowledged_writes_survive_kill9)");
    let m = Memory::open_postgres(&url).expect("child opens");
    println!("ready");
    let mut tasks = Vec::new();
    for t in 0..8 {
        let m = m.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0.. {
                let id = format!("w{t}-{i}");
                m.record(record(&id, vec![1.0, i as f32], "rev")).await.expect("record");
                println!("acked {id}");
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill9() {
    let server = PgServer::start();
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args(["--exact", "child_writer", "--ignored", "--nocapture", "--test-threads", "1"])
        .env("PRISM_PG_CHILD_URL", server.url())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the writer");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut acked = Vec::new();
    let t0 = Instant::now();
    while acked.len() < 500 {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => acked.extend(l.strip_prefix("acked ").map(str::to_string)),
            Err(e) => panic!("the writer stopped after {} acks: {e}", acked.len()),
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the writer is too slow");
    }
    child.kill().expect("kill -9 the writer"); // SIGKILL
    let status = child.wait().expect("wait");
    assert!(!status.success(), "killed mid-stream");
    reader.join().expect("reader");
    // Lines printed before the kill are still in the pipe.
    acked.extend(rx.try_iter().filter_map(|l| l.strip_prefix("acked ").map(str::to_string)));

    let m = Memory::open_postgres(&server.url()).expect("reopen");
    let stored = m.count().expect("count");
    let mut lost = Vec::new();
    for id in &acked {
        if m.get(id).expect("get").is_none() {
            lost.push(id.clone());
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged records lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(stored >= acked.len() as u64);
    eprintln!("kill -9 after {} acknowledged records ({stored} stored): none lost", acked.len());
}

fn connect_error(url: &str) -> String {
    match Memory::open_postgres(url) {
        Err(e @ MemoryError::Connect { .. }) => e.to_string(),
        Err(e) => panic!("expected a connection error, got {e}"),
        Ok(_) => panic!("connected to {url}"),
    }
}

#[tokio::test]
async fn bad_urls_are_clear_errors_without_the_password() {
    let server = PgServer::start();
    // Nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = connect_error(&format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{closed}/{DATABASE}"));
    assert!(e.contains(&format!("127.0.0.1:{closed}")) && e.contains(DATABASE), "{e}");
    assert!(!e.contains(PASSWORD), "{e}");

    // The server is there; the password is wrong.
    let wrong = "wr0ng-Passw0rd-K2";
    let e = connect_error(&format!("postgres://{USER}:{wrong}@127.0.0.1:{}/{DATABASE}", server.port));
    assert!(e.contains(&format!("127.0.0.1:{}", server.port)) && e.contains("password authentication failed"), "{e}");
    assert!(!e.contains(wrong), "{e}");

    // No such database.
    let e = connect_error(&format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/nosuchdb", server.port));
    assert!(e.contains("nosuchdb") && e.contains("does not exist") && !e.contains(PASSWORD), "{e}");

    // Not even a URL.
    let e = connect_error(&format!("postgres://{USER}:{PASSWORD}@db.example:notaport/{DATABASE}"));
    assert!(e.contains("db.example") && !e.contains(PASSWORD), "{e}");
}
