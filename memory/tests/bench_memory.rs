//! The memory store's numbers for `make bench-memory` (bench/memory/run.py drives it; ignored
//! in the test suite because it measures, it does not check).
//!
//! Reads `base.f32`, `queries.f32` (row-major little-endian f32) and `truth.u32` (exact top-10
//! ids per query, from numpy) from `BENCH_MEMORY_DATA`, and prints one JSON line:
//! 1. The index alone: build on all cores, every query (k = 10) one at a time, resident memory
//!    per vector.
//! 2. Unless `BENCH_MEMORY_INDEX_ONLY=1`, the durable store holding the same vectors as records:
//!    64 writers loading it (each record acknowledged after its commit); then 8 searchers while
//!    64 writers keep committing (search p99 under writes, and every acknowledged write read
//!    back); then 8 searchers while half of the records (51%: enough to compact the graph) are
//!    pruned (search p99 during a prune and its compaction).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prism_memory::{Memory, Precision, Record, VectorIndex};

fn read_f32(path: &PathBuf) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Resident set size of this process in bytes (Linux).
fn rss_bytes() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(f64::NAN);
    kb * 1024.0
}

fn record(id: String, at_ms: i64, v: &[f32]) -> Record {
    let response = serde_json::from_value(serde_json::json!({
        "id": id, "pipeline": "bench", "generation": 1, "strategy": "weighted",
        "modalities": {"text": {"embedding": v, "replica": {"node": "n", "endpoint": "e", "revision": "1"}, "weight": 1.0, "attempts": 1, "latency_ms": 1.0}},
        "timings": {"route_ms": 0.0, "fanout_ms": 0.0, "fuse_ms": 0.0, "total_ms": 0.0}
    }))
    .expect("a valid response");
    Record { id, pipeline: "bench".into(), at_ms, inputs: serde_json::json!({}), response }
}

/// 8 threads searching `mem` with the queries, round robin, until `stop`; latencies in ms.
fn searchers(
    mem: &Arc<Memory>,
    queries: &Arc<Vec<f32>>,
    dim: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<f64>>> {
    (0..8)
        .map(|s| {
            let (mem, queries, stop) = (mem.clone(), queries.clone(), stop.clone());
            std::thread::spawn(move || {
                let nq = queries.len() / dim;
                let mut lat = Vec::new();
                let mut i = s;
                while !stop.load(Ordering::Relaxed) && lat.len() < 200_000 {
                    let q = &queries[(i % nq) * dim..(i % nq + 1) * dim];
                    let t = Instant::now();
                    let (hits, _) = mem.search(Some("bench"), "text", q, 10);
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    assert!(!hits.is_empty());
                    i += 8;
                }
                lat
            })
        })
        .collect()
}

fn join_latencies(handles: Vec<std::thread::JoinHandle<Vec<f64>>>) -> Vec<f64> {
    handles.into_iter().flat_map(|h| h.join().expect("searcher")).collect()
}

async fn wait_indexed(mem: &Memory, what: &str) -> f64 {
    let t = Instant::now();
    while mem.index_backlog() != (0, 0) {
        assert!(t.elapsed() < Duration::from_secs(3600), "{what}: the indexer did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.elapsed().as_secs_f64()
}

/// Build the index on all cores, answer every query one at a time; JSON of the numbers.
fn index_stage(base: &[f32], queries: &[f32], truth: &[u32], dim: usize, precision: Precision) -> serde_json::Value {
    let n = base.len() / dim;
    let nq = queries.len() / dim;
    let rss0 = rss_bytes();
    let t0 = Instant::now();
    let mut idx = VectorIndex::with_precision(precision);
    for (i, v) in base.chunks_exact(dim).enumerate() {
        idx.insert("bench", "text", &i.to_string(), i as i64, v);
    }
    idx.catch_up();
    let build_s = t0.elapsed().as_secs_f64();
    let rss_per_vector = (rss_bytes() - rss0) / n as f64;
    eprintln!("{precision}: indexed {n} x {dim} in {build_s:.1} s, {rss_per_vector:.0} B/vector resident");
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
    assert_eq!(exact_answers, 0, "searches past the threshold use the graph");
    serde_json::json!({
        "vectors": n, "dim": dim, "queries": nq, "kernel": prism_memory::vector_kernel(), "build_s": build_s, "recall_at_10": found as f64 / (nq * 10) as f64,
        "search_p50_ms": pct(&mut lat, 0.5), "search_p99_ms": pct(&mut lat, 0.99), "rss_bytes_per_vector": rss_per_vector,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn bench_memory_search_and_writes() {
    let dir = PathBuf::from(std::env::var("BENCH_MEMORY_DATA").expect("BENCH_MEMORY_DATA"));
    let index_only = std::env::var("BENCH_MEMORY_INDEX_ONLY").is_ok_and(|v| v == "1");
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("meta.json")).unwrap()).unwrap();
    let dim = meta["dim"].as_u64().unwrap() as usize;
    let base = Arc::new(read_f32(&dir.join("base.f32")));
    let queries = Arc::new(read_f32(&dir.join("queries.f32")));
    let truth: Vec<u32> = std::fs::read(dir.join("truth.u32"))
        .unwrap()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let n = base.len() / dim;
    let nq = queries.len() / dim;
    // 1. The index alone, with f32 and with bf16 vectors.
    let mut out = index_stage(&base, &queries, &truth, dim, Precision::F32);
    // BENCH_MEMORY_BF16=0 skips the bf16 index (the 1M round: its build alone takes minutes).
    if std::env::var("BENCH_MEMORY_BF16").map_or(true, |v| v != "0") {
        let bf16 = index_stage(&base, &queries, &truth, dim, Precision::Bf16);
        for (k, v) in bf16.as_object().unwrap() {
            if k != "vectors" && k != "dim" && k != "queries" {
                out[format!("bf16_{k}")] = v.clone();
            }
        }
    }
    if index_only {
        println!("{out}");
        return;
    }

    // 2. The store: load every vector as a record with 64 writers.
    let tmp = tempfile::tempdir().unwrap();
    let mem = Memory::open(&tmp.path().join("bench.db")).unwrap();
    let t1 = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..64 {
        let (mem, base) = (mem.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            for i in (w..n).step_by(64) {
                mem.record(record(i.to_string(), i as i64, &base[i * dim..(i + 1) * dim])).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let write_rps = n as f64 / t1.elapsed().as_secs_f64();
    let indexed_s = wait_indexed(&mem, "load").await;
    eprintln!("store: {n} records at {write_rps:.0}/s, graph ready {indexed_s:.1} s later");

    // 8 searchers while 64 writers commit for 10 s; every acknowledged write must read back.
    let stop = Arc::new(AtomicBool::new(false));
    let search = searchers(&mem, &queries, dim, &stop);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tasks = Vec::new();
    for w in 0..64usize {
        let (mem, queries, acked) = (mem.clone(), queries.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0usize;
            while Instant::now() < deadline && i < 100_000 {
                let id = format!("w{w}-{i}");
                let q = (w * 7 + i) % nq;
                if mem.record(record(id.clone(), (n + i) as i64, &queries[q * dim..(q + 1) * dim])).await.is_ok() {
                    acked.lock().unwrap().push(id);
                }
                i += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let mut under_writes = join_latencies(search);
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let mut lost = 0usize;
    for id in &acked {
        lost += usize::from(!matches!(mem.get(id), Ok(Some(_))));
    }
    eprintln!("under writes: {} searches, {} writes acknowledged, {lost} lost", under_writes.len(), acked.len());

    // 8 searchers while half of the records are pruned and the graph compacts behind them.
    wait_indexed(&mem, "writes").await;
    let stop = Arc::new(AtomicBool::new(false));
    let search = searchers(&mem, &queries, dim, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t2 = Instant::now();
    // Keep the newest 49%: just past half dead, so the graph is compacted too (below half, its
    // deleted nodes stay as tombstones until more die).
    let total = mem.count().unwrap();
    let pruned = mem.prune_to_count(total * 49 / 100).unwrap();
    let prune_s = t2.elapsed().as_secs_f64();
    let compacted_s = wait_indexed(&mem, "prune").await + prune_s;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut during_prune = join_latencies(search);
    eprintln!("pruned {pruned} records in {prune_s:.1} s, compacted {compacted_s:.1} s after the start");

    let o = out.as_object_mut().unwrap();
    o.insert("write_rps".into(), write_rps.into());
    o.insert("store_indexed_s".into(), indexed_s.into());
    o.insert("search_under_writes_p99_ms".into(), pct(&mut under_writes, 0.99).into());
    o.insert("searches_under_writes".into(), under_writes.len().into());
    o.insert("acked_under_search".into(), acked.len().into());
    o.insert("lost_acked_writes_under_search".into(), lost.into());
    o.insert("pruned".into(), pruned.into());
    o.insert("prune_s".into(), prune_s.into());
    o.insert("search_during_prune_p99_ms".into(), pct(&mut during_prune, 0.99).into());
    o.insert("search_during_prune_max_ms".into(), pct(&mut during_prune, 1.0).into());
    println!("{out}");
}
