//! The memory store's numbers for `make bench-memory` (bench/memory/run.py drives it; ignored
//! in the test suite because it measures, it does not check).
//!
//! Reads `base.f32`, `queries.f32` (row-major little-endian f32) and `truth.u32` (exact top-10
//! ids per query, from numpy) from `BENCH_MEMORY_DATA`, builds the search index, answers every
//! query (k = 10) one at a time, and measures the durable write path. Prints one JSON line.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use prism_memory::{Memory, Record, VectorIndex};

fn read_f32(path: &PathBuf) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_memory_search_and_writes() {
    let dir = PathBuf::from(std::env::var("BENCH_MEMORY_DATA").expect("BENCH_MEMORY_DATA"));
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap();
    let dim = meta["dim"].as_u64().unwrap() as usize;
    let base = read_f32(&dir.join("base.f32"));
    let queries = read_f32(&dir.join("queries.f32"));
    let truth: Vec<u32> = std::fs::read(dir.join("truth.u32"))
        .unwrap()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let n = base.len() / dim;

    let t0 = Instant::now();
    let mut idx = VectorIndex::default();
    for (i, v) in base.chunks_exact(dim).enumerate() {
        idx.insert("bench", "text", &i.to_string(), i as i64, v);
    }
    idx.catch_up();
    let build_s = t0.elapsed().as_secs_f64();
    eprintln!("indexed {n} x {dim} in {build_s:.1} s");

    let mut lat = Vec::new();
    let mut found = 0usize;
    let mut exact_answers = 0usize;
    for (qi, q) in queries.chunks_exact(dim).enumerate() {
        let t = Instant::now();
        let (hits, exact) = idx.search(Some("bench"), "text", q, 10, false);
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        exact_answers += usize::from(exact);
        let want = &truth[qi * 10..qi * 10 + 10];
        found += hits.iter().filter(|h| h.id.parse::<u32>().is_ok_and(|id| want.contains(&id))).count();
    }
    let nq = queries.len() / dim;
    let recall = found as f64 / (nq * 10) as f64;
    assert_eq!(exact_answers, 0, "searches past the threshold use the graph");

    // Durable writes: 64 concurrent writers, each record fsynced before it is acknowledged.
    let tmp = tempfile::tempdir().unwrap();
    let mem = Memory::open(&tmp.path().join("bench.db")).unwrap();
    let per_writer = 60usize;
    let t1 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..64 {
        let mem: Arc<Memory> = mem.clone();
        let v: Vec<f32> = base[w * dim..(w + 1) * dim].to_vec();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                let response = serde_json::from_value(serde_json::json!({
                    "id": format!("w{w}-{i}"), "pipeline": "bench", "generation": 1, "strategy": "weighted",
                    "embedding": v,
                    "modalities": {"text": {"embedding": v, "replica": {"node": "n", "endpoint": "e", "revision": "1"}, "weight": 1.0, "attempts": 1, "latency_ms": 1.0}},
                    "timings": {"route_ms": 0.0, "fanout_ms": 0.0, "fuse_ms": 0.0, "total_ms": 0.0}
                }))
                .unwrap();
                let rec =
                    Record { id: format!("w{w}-{i}"), pipeline: "bench".into(), at_ms: i as i64, inputs: serde_json::json!({}), response };
                mem.record(rec).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let write_rps = (per_writer * 64) as f64 / t1.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "vectors": n, "dim": dim, "queries": nq, "build_s": build_s, "recall_at_10": recall,
            "search_p50_ms": pct(&mut lat, 0.5), "search_p99_ms": pct(&mut lat, 0.99), "write_rps": write_rps
        })
    );
}
