//! What the `prism up` end-to-end tests share: starting `prism up` on a manifest in a temp
//! folder, reading its state file, waiting for a condition.
#![allow(dead_code)] // each test binary uses a different part

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `make models`' folder.
pub fn models() -> PathBuf {
    let m = repo().join(".cache/models");
    assert!(m.join("all-minilm-l6-v2").is_dir(), "run `make models` first");
    m
}

/// A running `prism up`, stopped (SIGTERM, then kill) when dropped.
pub struct Up {
    pub child: Child,
    pub dir: PathBuf,
    pub router: String,
    /// The manifest file `prism up` watches.
    pub manifest: PathBuf,
}

impl Drop for Up {
    fn drop(&mut self) {
        // SIGTERM lets `prism up` stop its nodes and Prometheus; kill if it does not.
        signal(u64::from(self.child.id()), libc::SIGTERM);
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
    }
}

pub fn signal(pid: u64, sig: i32) {
    // SAFETY: kill(2) on a pid this test started (or read from the state file of one it started).
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

impl Up {
    /// Writes `manifest` into `dir` and runs `prism up` on it with `models` as the models folder.
    pub fn start(dir: &Path, manifest: &str, models: &Path) -> Self {
        let path = dir.join("pipeline.yaml");
        std::fs::write(&path, manifest).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_prism"))
            .args(["up", "-f", path.to_str().unwrap(), "--port", "0"])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--models-dir")
            .arg(models)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting prism up");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("[prism up] {line}");
                if let Some(u) = line.strip_prefix("router: ") {
                    let _ = tx.send(u.trim().to_string());
                }
            }
        });
        let router = rx.recv_timeout(Duration::from_secs(180)).expect("prism up printed `router: URL`");
        Self { child, dir: dir.join("state"), router, manifest: path }
    }

    pub fn state(&self) -> Value {
        let text = std::fs::read_to_string(self.dir.join("state.json")).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    pub fn replicas(&self) -> usize {
        self.state()["nodes"][0]["replicas"].as_array().map(Vec::len).unwrap_or(0)
    }

    pub fn autoscaler(&self) -> Value {
        self.state()["nodes"][0]["autoscaler"].clone()
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&Self) -> bool) -> Duration {
        let start = Instant::now();
        while !f(self) {
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}; state: {}",
                self.state()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        start.elapsed()
    }
}
