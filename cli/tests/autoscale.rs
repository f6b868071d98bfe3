//! `prism up` autoscaling end to end: real node processes (all-MiniLM-L6-v2), a real Prometheus
//! (the Debian package, started by `prism up`) scraping them every second, real load through the
//! router. A load step scales out; steady load changes nothing; a replica killed under load
//! loses no request; a Prometheus outage holds replicas instead of reading as idle; once
//! Prometheus is back, real idleness scales in.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{models, signal, Up};

const MANIFEST: &str = r#"
apiVersion: prism.dev/v1alpha1
kind: ModalityNode
metadata: {name: text}
spec:
  modality: text
  model: {uri: pvc://models/all-minilm-l6-v2, architecture: bert, revision: "1"}
  replicas: {min: 1, max: 3}
  autoscaling:
    targetInflight: 2
    intervalSeconds: 1
    stableWindowSeconds: 10
    panicWindowSeconds: 3
    panicThreshold: 2
    scaleDownStabilizationSeconds: 5
    maxStep: 2
  batching: {maxBatch: 8, maxWaitMs: 2}
  device: cpu
---
apiVersion: prism.dev/v1alpha1
kind: MultimodalPipeline
metadata: {name: scaled}
spec:
  nodes: [{name: text, required: true}]
"#;

/// Closed-loop load: `workers` clients each send the next request when the last one answered.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(router: &str, workers: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let threads = (0..workers)
            .map(|w| {
                let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), format!("{router}/v1/infer"));
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    rt.block_on(async move {
                        let http = reqwest::Client::builder().no_proxy().build().unwrap();
                        let mut i = 0u64;
                        // Bounded: the test stops it; the cap only guards a runaway loop.
                        while !stop.load(Ordering::Relaxed) && i < 1_000_000 {
                            i += 1;
                            let body = serde_json::json!({"inputs": {"text": format!(
                                "worker {w} request {i}: a long enough sentence about dogs playing in fresh snow near the river bank at dawn"
                            )}});
                            let res = http.post(&url).json(&body).timeout(Duration::from_secs(30)).send().await;
                            let counter = match res {
                                Ok(r) if r.status().is_success() => &ok,
                                Ok(r) => {
                                    eprintln!("request failed: HTTP {}: {}", r.status(), r.text().await.unwrap_or_default());
                                    &failed
                                }
                                Err(e) => {
                                    eprintln!("request failed: {e}");
                                    &failed
                                }
                            };
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
            })
            .collect();
        Self { stop, ok, failed, threads }
    }

    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        (self.ok.load(Ordering::Relaxed), self.failed.load(Ordering::Relaxed))
    }
}

#[test]
fn load_scales_out_steady_holds_outage_holds_idle_scales_in() {
    let tmp = tempfile::tempdir().unwrap();
    let up = Up::start(tmp.path(), MANIFEST, &models());
    assert_eq!(up.replicas(), 1, "starts at min");
    assert!(up.state()["prometheus_url"].is_string(), "prism up started a Prometheus: {}", up.state());

    // Load step: 8 clients against a target of 2 in flight per replica.
    let load = Load::start(&up.router, 8);
    let took = up.wait_for("scale-out to 3 replicas", Duration::from_secs(60), |u| u.replicas() == 3);
    println!("scaled out to 3 in {:.1}s after the load step", took.as_secs_f64());
    let scale = up.autoscaler()["last_scale"].clone();
    assert!(scale["reason"].as_str().unwrap().contains("in-flight"), "reason names the metric: {scale}");
    up.wait_for("3 ready replicas", Duration::from_secs(60), |u| {
        u.state()["nodes"][0]["replicas"].as_array().is_some_and(|r| r.iter().all(|r| r["ready"] == true))
    });

    // Steady load: no further change (the wish for 4 is capped by max and says so).
    let steady_from = up.autoscaler()["last_scale"].clone();
    let t0 = Instant::now();
    let mut killed = false;
    while t0.elapsed() < Duration::from_secs(20) {
        assert_eq!(up.replicas(), 3, "steady load must not change the count: {}", up.autoscaler());
        assert_eq!(up.autoscaler()["last_scale"], steady_from, "no scale event under steady load");
        if !killed && t0.elapsed() > Duration::from_secs(5) {
            // A replica dies under load: the router and the supervisor route around it.
            let pid = up.state()["nodes"][0]["replicas"][1]["pid"].as_u64().expect("replica 1 has a pid");
            signal(pid, libc::SIGKILL);
            killed = true;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let (ok, failed) = load.finish();
    println!("load phase: ok={ok} failed={failed}");
    assert!(ok > 50, "the pipeline served the load: ok={ok}");
    assert_eq!(failed, 0, "no request failed during scale-out, steady load or the replica kill");

    // Outage: Prometheus dies while the pipeline is idle. Idle would scale in after 5 s, but an
    // outage must hold: the autoscaler cannot tell idle from blind.
    let prom_pid = up.state()["prometheus_pid"].as_u64().expect("prometheus pid in state");
    signal(prom_pid, libc::SIGKILL);
    up.wait_for("MetricsUnavailable", Duration::from_secs(10), |u| u.autoscaler()["metrics_unavailable"].is_string());
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(7) {
        assert_eq!(up.replicas(), 3, "replicas held during the metrics outage: {}", up.autoscaler());
        std::thread::sleep(Duration::from_millis(250));
    }

    // `prism up` restarts Prometheus; now idleness is real and the node scales in to min.
    up.wait_for("scale-in to 1 after Prometheus is back", Duration::from_secs(90), |u| u.replicas() == 1);
    let last = up.autoscaler()["last_scale"].clone();
    assert_eq!(last["to"], 1, "{last}");
    assert!(up.autoscaler()["metrics_unavailable"].is_null());
}
