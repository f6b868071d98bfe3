//! Router overhead and fan-out benchmark over real nodes (run by `make bench-router`;
//! `#[ignore]`d in the test suite because it measures, it does not check).
//!
//! Prints `router: overhead_p50_ms=... overhead_p99_ms=... fanout_vs_slowest=...
//! ray_fanout_vs_slowest=... rps=...`. The peer, Ray Serve, does the same fan-out over the same
//! three nodes in the same run (bench/router/ray_fanout.py, run with `BENCH_RAY_PYTHON`).

mod common;

use std::time::Instant;

use common::*;
use serde_json::{json, Value};

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

async fn run(url: &str, body: Value, clients: usize, per_client: usize) -> (Vec<f64>, f64) {
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (url, body) = (url.to_string(), body.clone());
        tasks.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            let mut lat = Vec::with_capacity(per_client);
            for _ in 0..per_client {
                let t = Instant::now();
                let r = c.post(&url).json(&body).send().await.expect("send");
                assert!(r.status().is_success(), "{}", r.status());
                let _ = r.bytes().await;
                lat.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client"));
    }
    let rps = all.len() as f64 / t0.elapsed().as_secs_f64();
    (all, rps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn bench_router_overhead_and_fanout() {
    let clients: usize = std::env::var("BENCH_CLIENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    let per: usize = std::env::var("BENCH_REQUESTS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let nodes: Vec<Proc> =
        ["text", "caption", "audio"].iter().map(|m| spawn_node(&format!("n-{m}"), m, "127.0.0.1:0")).collect();
    let dir = tempfile::tempdir().expect("tmp");
    let mods: serde_json::Map<String, Value> = ["text", "caption", "audio"]
        .iter()
        .zip(&nodes)
        .map(|(m, n)| (m.to_string(), json!([endpoint(n, 1.0)])))
        .collect();
    let router = router_on(dir.path(), &json!({"pipeline": "bench", "generation": 1, "modalities": mods}), None, &[]);
    let text = "the quick brown fox jumps over the lazy dog";
    // Warm up both paths at full concurrency, so the router's connection pool to the node is as
    // warm as the direct clients' connections (else the first wave pays 200 connects).
    run(&format!("{}/embed", nodes[0].url), json!({"inputs": [text]}), clients, 2).await;
    run(&format!("{}/v1/infer", router.url), json!({"inputs": {"text": text}}), clients, 2).await;
    // Pure added latency: one client, nothing queued.
    let (mut d1, _) = run(&format!("{}/embed", nodes[0].url), json!({"inputs": [text]}), 1, 100).await;
    let (mut v1, _) = run(&format!("{}/v1/infer", router.url), json!({"inputs": {"text": text}}), 1, 100).await;
    let idle_overhead = pct(&mut v1, 0.5) - pct(&mut d1, 0.5);

    let (mut direct, _) = run(&format!("{}/embed", nodes[0].url), json!({"inputs": [text]}), clients, per).await;
    let (mut via, rps) =
        run(&format!("{}/v1/infer", router.url), json!({"inputs": {"text": text}}), clients, per).await;
    let (d50, d99, v50, v99) = (pct(&mut direct, 0.5), pct(&mut direct, 0.99), pct(&mut via, 0.5), pct(&mut via, 0.99));
    // Fan-out: one request with three modalities vs the slowest single modality alone (sequential clients).
    let mut slowest = 0f64;
    for m in ["text", "caption", "audio"] {
        let mut inputs = serde_json::Map::new();
        inputs.insert(m.to_string(), json!(text));
        let (mut l, _) = run(&format!("{}/v1/infer", router.url), json!({ "inputs": inputs }), 1, 30).await;
        slowest = slowest.max(pct(&mut l, 0.5));
    }
    let (mut fan, _) = run(
        &format!("{}/v1/infer", router.url),
        json!({"inputs": {"text": text, "caption": text, "audio": text}}),
        1,
        30,
    )
    .await;
    let fan50 = pct(&mut fan, 0.5);
    let ray = ray_serve_fanout(&nodes, text);
    eprintln!(
        "direct p50={d50:.2} p99={d99:.2} ms; via router p50={v50:.2} p99={v99:.2} ms; {clients} clients x {per}"
    );
    let ray_field = |k: &str| ray.as_ref().and_then(|r| r[k].as_f64()).map_or("nan".to_string(), |v| format!("{v:.2}"));
    eprintln!("prism fan-out p50={fan50:.2} ms, slowest single modality p50={slowest:.2} ms");
    println!(
        "router: overhead_p50_ms={:.2} overhead_p99_ms={:.2} fanout_vs_slowest={:.2} ray_fanout_vs_slowest={} rps={:.0} clients={clients} overhead_1client_p50_ms={idle_overhead:.2} fanout_p50_ms={fan50:.2} ray_fanout_p50_ms={}",
        v50 - d50,
        v99 - d99,
        fan50 / slowest,
        ray_field("ray_fanout_vs_slowest"),
        rps,
        ray_field("ray_fanout_p50_ms"),
    );
}

/// Ray Serve doing the same fan-out + fusion over the same nodes: its JSON summary, or None
/// (printed as nan) when `BENCH_RAY_PYTHON` is unset. A failing peer run fails the benchmark.
fn ray_serve_fanout(nodes: &[Proc], text: &str) -> Option<Value> {
    let python = std::env::var("BENCH_RAY_PYTHON").ok()?;
    let script = workspace_root().join("bench/router/ray_fanout.py");
    let mut cmd = std::process::Command::new(python);
    cmd.arg(script).args(["--text", text, "--requests", "30", "--timeout-s", "600"]);
    for (m, n) in ["text", "caption", "audio"].iter().zip(nodes) {
        cmd.args(["--node", &format!("{m}={}", n.url)]);
    }
    let out = cmd.stderr(std::process::Stdio::inherit()).output().expect("running bench/router/ray_fanout.py");
    assert!(out.status.success(), "Ray Serve peer failed ({})", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().expect("ray_fanout.py printed nothing");
    Some(serde_json::from_str(last).expect("ray_fanout.py's last line is JSON"))
}
