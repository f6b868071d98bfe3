//! The answer cache of `onMissingRequired: cached` on a shared PostgreSQL memory: a whole answer
//! one router logged is the cached answer of another router of the same database, and of a
//! router started after the first is gone. Needs the PostgreSQL server binaries
//! (scripts/install-deps.sh).

#[path = "common/postgres.rs"]
mod pg_server;

use std::collections::BTreeMap;

use pg_server::PgServer;
use prism_api::wire::router::{Degraded, InferResponse, ModalityResult, ReplicaRef, RouterTimings};
use prism_memory::{Memory, Record};

fn record(id: &str, at_ms: i64, text: Vec<f32>, audio: Vec<f32>, degraded: Option<Degraded>) -> Record {
    let result = |embedding: Vec<f32>| ModalityResult {
        embedding,
        replica: ReplicaRef { node: "minilm".into(), endpoint: "http://e".into(), revision: "1".into() },
        weight: 0.5,
        attempts: 1,
        latency_ms: 1.0,
        labels: None,
    };
    Record {
        id: id.into(),
        pipeline: "p".into(),
        at_ms,
        inputs: serde_json::json!({"text": format!("input of {id}")}),
        response: InferResponse {
            id: id.into(),
            pipeline: "p".into(),
            generation: 1,
            strategy: "weighted".into(),
            embedding: Some(text.clone()),
            modalities: BTreeMap::from([("text".to_string(), result(text)), ("audio".to_string(), result(audio))]),
            contributions: None,
            fusion_replica: None,
            labels: None,
            timings: RouterTimings::default(),
            degraded,
            recorded: None,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cached_answer_is_shared_by_the_routers_of_one_database() {
    let server = PgServer::start();
    let url = server.url();
    let a = Memory::open_postgres(&url).expect("router A opens");
    let b = Memory::open_postgres(&url).expect("router B opens");
    a.record(record("dog", 10, vec![1.0, 0.0], vec![0.0, 1.0], None)).await.expect("A records");
    a.record(record("cat", 20, vec![0.0, 1.0], vec![1.0, 0.0], None)).await.expect("A records");
    let cached = Degraded { missing: vec!["audio".into()], reason: "down".into(), cached: true };
    a.record(record("guess", 30, vec![1.0, 0.05], vec![0.0, 1.0], Some(cached))).await.expect("A records");

    // B never saw these writes: its lookup catches up with the database first (a search does,
    // unless B caught up in the last 50 ms, as it did when it opened).
    tokio::time::sleep(std::time::Duration::from_millis(60)).await;
    let query = BTreeMap::from([("text".to_string(), vec![0.9f32, 0.1])]);
    let (answer, s) = b.nearest_answer("p", &query, 0.9).expect("B reads").expect("B finds A's answer");
    assert_eq!(answer.id, "dog", "the cached record 'guess' is nearer but never served");
    assert!(answer.degraded.is_none());
    assert!((s - 0.9 / 0.82f64.sqrt()).abs() < 1e-6, "{s}");
    assert!(b.nearest_answer("p", &query, 0.999).expect("B reads").is_none());

    // Both routers gone; a third one started later still has it.
    drop((a, b));
    let c = Memory::open_postgres(&url).expect("router C opens");
    let (answer, _) = c.nearest_answer("p", &query, 0.9).expect("C reads").expect("C finds it");
    assert_eq!(answer.id, "dog");
}
