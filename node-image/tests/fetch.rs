//! `prism-node fetch` against loopback servers started by the test: a Hugging Face `resolve` layout
//! and an OCI distribution API (manifest + blobs, with the anonymous-token challenge of ghcr.io /
//! Docker Hub). The real all-MiniLM-L6-v2 files go through both, then the fetched folder is served
//! (HF) or loaded (`--verify-load`, OCI). Failures: missing files, 401s, corrupted blobs, unsafe
//! layer names and bad URIs end non-zero with a message naming the file and the fix, and leave no
//! partial file.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use prism_node::fetch::{ModelUri, OciReference};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// A canned loopback HTTP server

#[derive(Clone)]
struct Canned {
    status: u16,
    body: Bytes,
    headers: Vec<(&'static str, String)>,
    /// Answer 503 to this many requests first.
    fail_first: usize,
}

impl Canned {
    fn ok(body: impl Into<Bytes>) -> Self {
        Self { status: 200, body: body.into(), headers: vec![], fail_first: 0 }
    }
    fn status(status: u16, headers: Vec<(&'static str, String)>) -> Self {
        Self { status, body: Bytes::from_static(b"{\"error\":\"canned\"}"), headers, fail_first: 0 }
    }
}

/// Requests must carry `Authorization: Bearer <token>` except on `open` paths; otherwise 401 with
/// `challenge` as WWW-Authenticate (when set).
#[derive(Clone)]
struct AuthRule {
    token: String,
    challenge: Option<String>,
    open: Vec<String>,
}

#[derive(Clone, Debug)]
struct Hit {
    path: String,
    query: String,
    auth: Option<String>,
}

#[derive(Clone, Default)]
struct Server {
    routes: Arc<Mutex<HashMap<String, Canned>>>,
    auth: Arc<Mutex<Option<AuthRule>>>,
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Server {
    /// Starts on 127.0.0.1:0; returns the server and its `http://ADDR`.
    async fn start() -> (Server, String) {
        let s = Server::default();
        let app = axum::Router::new().fallback(answer).with_state(s.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        (s, format!("http://{addr}"))
    }
    fn route(&self, path: impl Into<String>, c: Canned) {
        self.routes.lock().expect("lock").insert(path.into(), c);
    }
    fn require(&self, rule: AuthRule) {
        *self.auth.lock().expect("lock") = Some(rule);
    }
    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("lock").clone()
    }
}

async fn answer(State(s): State<Server>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
    s.hits.lock().expect("lock").push(Hit {
        path: path.clone(),
        query: req.uri().query().unwrap_or_default().to_string(),
        auth: auth.clone(),
    });
    let rule = s.auth.lock().expect("lock").clone();
    if let Some(rule) = rule.filter(|r| !r.open.contains(&path)) {
        if auth.as_deref() != Some(format!("Bearer {}", rule.token).as_str()) {
            let mut headers = vec![];
            if let Some(ch) = rule.challenge {
                headers.push(("www-authenticate", ch));
            }
            return respond(&Canned::status(401, headers));
        }
    }
    let canned = {
        let mut routes = s.routes.lock().expect("lock");
        match routes.get_mut(&path) {
            Some(c) if c.fail_first > 0 => {
                c.fail_first -= 1;
                Canned::status(503, vec![])
            }
            Some(c) => c.clone(),
            None => Canned::status(404, vec![]),
        }
    };
    respond(&canned)
}

fn respond(c: &Canned) -> Response {
    let mut r = Response::new(Body::from(c.body.clone()));
    *r.status_mut() = StatusCode::from_u16(c.status).expect("status");
    for (k, v) in &c.headers {
        r.headers_mut().insert(*k, HeaderValue::from_str(v).expect("header"));
    }
    r
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Runs `prism-node fetch ARGS` with a clean environment plus `envs`; returns (success, stderr).
async fn fetch(args: &[&str], envs: &[(&str, &str)]) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_prism-node"));
    cmd.arg("fetch").args(args).args(["--retry-backoff-ms", "10"]);
    for k in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "OCI_TOKEN", "OCI_INSECURE", "PRISM_ARCHITECTURE"] {
        cmd.env_remove(k);
    }
    cmd.envs(envs.iter().copied());
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("prism-node fetch did not finish within 120 s")
        .expect("run prism-node fetch");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("--- prism-node fetch {args:?} (exit {:?}) ---\n{stderr}", out.status.code());
    if !out.status.success() {
        assert_eq!(out.status.code(), Some(1), "failures exit with 1: {stderr}");
    }
    (out.status.success(), stderr)
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

fn read(dir: &Path, name: &str) -> Bytes {
    Bytes::from(std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display())))
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().to_string()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn no_part_files(dir: &Path) {
    let parts: Vec<String> = listing(dir).into_iter().filter(|n| n.ends_with(".part")).collect();
    assert!(parts.is_empty(), "partial files left in {}: {parts:?}", dir.display());
}

/// A valid, tiny safetensors file (one f32 tensor).
fn tiny_safetensors() -> Vec<u8> {
    let header = br#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header);
    v.extend_from_slice(&1.0f32.to_le_bytes());
    v
}

const TINY_CONFIG: &[u8] = br#"{"model_type": "bert", "hidden_size": 4}"#;

fn hf_path(repo: &str, rev: &str, file: &str) -> String {
    format!("/{repo}/resolve/{rev}/{file}")
}

/// OCI image manifest with one layer per (title, bytes) and an empty config.
fn oci_manifest(layers: &[(&str, &[u8])]) -> Vec<u8> {
    let layers: Vec<Value> = layers
        .iter()
        .map(|(title, b)| {
            json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": format!("sha256:{}", sha256_hex(b)),
                "size": b.len(),
                "annotations": {"org.opencontainers.image.title": title},
            })
        })
        .collect();
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.prism.model.v1",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": format!("sha256:{}", sha256_hex(b"{}")), "size": 2},
        "layers": layers,
    }))
    .expect("manifest json")
}

/// Serves `layers` as `repo:tag` (manifest by tag and by digest, plus every blob); returns the
/// manifest digest.
fn push_oci(s: &Server, repo: &str, tag: &str, layers: &[(&str, &[u8])]) -> String {
    let manifest = oci_manifest(layers);
    let digest = format!("sha256:{}", sha256_hex(&manifest));
    let ct = ("content-type", "application/vnd.oci.image.manifest.v1+json".to_string());
    let m = Canned { headers: vec![ct], ..Canned::ok(manifest) };
    s.route(format!("/v2/{repo}/manifests/{tag}"), m.clone());
    s.route(format!("/v2/{repo}/manifests/{digest}"), m);
    for (_, b) in layers {
        s.route(format!("/v2/{repo}/blobs/sha256:{}", sha256_hex(b)), Canned::ok(b.to_vec()));
    }
    digest
}

fn host_of(base: &str) -> &str {
    base.trim_start_matches("http://")
}

/// The real server on a folder: waits for /ready and embeds one reference text.
async fn serve_and_embed(dir: &Path) {
    let args: Vec<String> = vec![
        "--model-uri".into(),
        dir.display().to_string(),
        "--architecture".into(),
        "bert".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    let node = common::spawn_node(&args, false);
    node.wait_ready().await;
    let (c, http) = (reqwest::Client::new(), node.http.clone());
    let reference = common::minilm_reference();
    let item = &reference.items[0];
    let r = c.post(format!("{http}/embed")).json(&json!({"inputs": [item.text]})).send().await.expect("embed");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("json");
    let got: Vec<f32> = serde_json::from_value(v["embeddings"][0].clone()).expect("embedding");
    let cos = common::cosine(&got, &item.embedding);
    assert!(cos > 0.999, "embedding of the fetched model differs from the reference: cosine {cos}");
    drop(node);
}

// ---------------------------------------------------------------------------------------------
// Hugging Face

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hf_fetch_with_token_and_retry_then_serve_the_folder() {
    let src = common::minilm_dir();
    let (s, base) = Server::start().await;
    let (repo, rev) = ("sentence-transformers/all-MiniLM-L6-v2", "v1.0");
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        s.route(hf_path(repo, rev, f), Canned::ok(read(&src, f)));
    }
    // One transient failure: retried, not fatal.
    s.route(hf_path(repo, rev, "config.json"), Canned { fail_first: 1, ..Canned::ok(read(&src, "config.json")) });
    s.require(AuthRule { token: "hf-secret".into(), challenge: None, open: vec![] });

    let out = tempfile::tempdir().expect("tempdir");
    let dir = out.path().join("model");
    let uri = format!("hf://{repo}@{rev}");
    let (ok, stderr) = fetch(
        &["--model-uri", &uri, "--out", &dir.display().to_string(), "--architecture", "bert"],
        // A serving flag's env var in the environment must not get in the way of `fetch`.
        &[("HF_ENDPOINT", &base), ("HF_TOKEN", "hf-secret"), ("PRISM_LISTEN", "127.0.0.1:1")],
    )
    .await;
    assert!(ok, "fetch failed: {stderr}");
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        assert_eq!(read(&dir, f), read(&src, f), "{f} differs from the served file");
    }
    assert_eq!(listing(&dir), ["config.json", "model.safetensors", "tokenizer.json"]);
    assert!(stderr.contains("fetching model.safetensors (86.7 MiB) from"), "{stderr}");
    assert!(stderr.contains("fetching model.safetensors: 86.7 MiB ... done in"), "{stderr}");
    assert!(stderr.contains("HTTP 503") && stderr.contains("retrying"), "{stderr}");
    assert!(stderr.contains("skipping preprocessor_config.json"), "{stderr}");
    let hits = s.hits();
    assert!(hits.iter().all(|h| h.auth.as_deref() == Some("Bearer hf-secret")), "{hits:?}");
    assert!(hits.iter().any(|h| h.path == hf_path(repo, rev, "adapter_config.json")), "{hits:?}");

    serve_and_embed(&dir).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hf_missing_required_file_fails_naming_it_and_leaves_no_partial_file() {
    let (s, base) = Server::start().await;
    let repo = "org/tiny";
    s.route(hf_path(repo, "main", "config.json"), Canned::ok(TINY_CONFIG));
    s.route(hf_path(repo, "main", "tokenizer.json"), Canned::ok(&b"{}"[..]));
    let out = tempfile::tempdir().expect("tempdir");
    let (ok, stderr) =
        fetch(&["--model-uri", "hf://org/tiny", "--out", &out.path().display().to_string()], &[("HF_ENDPOINT", &base)])
            .await;
    assert!(!ok);
    assert!(stderr.contains("HTTP 404 Not Found"), "{stderr}");
    assert!(stderr.contains("model.safetensors does not exist in org/tiny at revision main"), "{stderr}");
    assert!(stderr.contains(&format!("{base}/org/tiny/resolve/main/model.safetensors")), "{stderr}");
    assert!(!out.path().join("model.safetensors").exists());
    no_part_files(out.path());

    // Once the repository has the file, the same command completes the folder.
    s.route(hf_path(repo, "main", "model.safetensors"), Canned::ok(tiny_safetensors()));
    let (ok, stderr) =
        fetch(&["--model-uri", "hf://org/tiny", "--out", &out.path().display().to_string()], &[("HF_ENDPOINT", &base)])
            .await;
    assert!(ok, "{stderr}");
    assert_eq!(read(out.path(), "model.safetensors"), Bytes::from(tiny_safetensors()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hf_unauthorized_says_to_set_hf_token() {
    let (s, base) = Server::start().await;
    s.route(hf_path("org/private", "main", "config.json"), Canned::ok(TINY_CONFIG));
    s.require(AuthRule { token: "right".into(), challenge: None, open: vec![] });
    let out = tempfile::tempdir().expect("tempdir");
    let args = ["--model-uri", "hf://org/private", "--out", &out.path().display().to_string()];

    let (ok, stderr) = fetch(&args, &[("HF_ENDPOINT", &base)]).await;
    assert!(!ok);
    assert!(stderr.contains("HTTP 401 Unauthorized"), "{stderr}");
    assert!(stderr.contains("set HF_TOKEN"), "{stderr}");
    assert!(!stderr.contains("retrying"), "a 401 is not retried: {stderr}");

    let (ok, stderr) = fetch(&args, &[("HF_ENDPOINT", &base), ("HF_TOKEN", "wrong")]).await;
    assert!(!ok);
    assert!(stderr.contains("HF_TOKEN was refused"), "{stderr}");
    assert!(listing(out.path()).is_empty(), "{:?}", listing(out.path()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hf_architecture_makes_its_files_required_and_the_folder_is_checked() {
    let (s, base) = Server::start().await;
    s.route(hf_path("org/vision", "main", "config.json"), Canned::ok(TINY_CONFIG));
    s.route(hf_path("org/vision", "main", "model.safetensors"), Canned::ok(tiny_safetensors()));
    let out = tempfile::tempdir().expect("tempdir");
    let dir = out.path().display().to_string();
    let env = [("HF_ENDPOINT", base.as_str())];

    // Without --architecture, tokenizer.json is optional.
    let (ok, stderr) = fetch(&["--model-uri", "hf://org/vision", "--out", &dir], &env).await;
    assert!(ok, "{stderr}");
    assert!(stderr.contains("skipping tokenizer.json"), "{stderr}");

    // bert needs it (and PRISM_ARCHITECTURE works like --architecture).
    let (ok, stderr) =
        fetch(&["--model-uri", "hf://org/vision", "--out", &dir], &[env[0], ("PRISM_ARCHITECTURE", "bert")]).await;
    assert!(!ok);
    assert!(stderr.contains("tokenizer.json does not exist in org/vision"), "{stderr}");

    // A weights file that is not safetensors (an HTML error page served with 200) is refused.
    s.route(hf_path("org/vision", "main", "model.safetensors"), Canned::ok(&b"<html>rate limited</html>"[..]));
    let (ok, stderr) = fetch(&["--model-uri", "hf://org/vision", "--out", &dir], &env).await;
    assert!(!ok);
    assert!(stderr.contains("cannot be served: model.safetensors: not a safetensors file"), "{stderr}");

    // Unknown architecture: the known ones are listed.
    let (ok, stderr) = fetch(&["--model-uri", "hf://org/vision", "--out", &dir, "--architecture", "gpt9"], &env).await;
    assert!(!ok);
    assert!(stderr.contains("unknown architecture") && stderr.contains("bert"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// OCI

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_pull_by_tag_and_digest_with_anonymous_token_then_load() {
    let src = common::minilm_dir();
    let (s, base) = Server::start().await;
    let (config, tokenizer, weights) =
        (read(&src, "config.json"), read(&src, "tokenizer.json"), read(&src, "model.safetensors"));
    let repo = "models/minilm";
    let digest = push_oci(
        &s,
        repo,
        "v1",
        &[("config.json", &config[..]), ("tokenizer.json", &tokenizer[..]), ("model.safetensors", &weights[..])],
    );
    // Like ghcr.io: anonymous pulls need a token from the challenge's realm.
    s.route("/token", Canned::ok(&br#"{"token": "anon-tok", "expires_in": 300}"#[..]));
    s.require(AuthRule {
        token: "anon-tok".into(),
        challenge: Some(format!(
            r#"Bearer realm="{base}/token",service="test-registry",scope="repository:{repo}:pull""#
        )),
        open: vec!["/token".into()],
    });

    let out = tempfile::tempdir().expect("tempdir");
    let dir = out.path().display().to_string();
    let uri = format!("oci://{}/{repo}:v1", host_of(&base));
    let (ok, stderr) =
        fetch(&["--model-uri", &uri, "--out", &dir, "--architecture", "bert", "--verify-load"], &[]).await;
    assert!(ok, "{stderr}");
    assert_eq!(read(out.path(), "config.json"), config);
    assert_eq!(read(out.path(), "tokenizer.json"), tokenizer);
    assert_eq!(read(out.path(), "model.safetensors"), weights);
    assert_eq!(listing(out.path()), ["config.json", "model.safetensors", "tokenizer.json"]);
    assert!(stderr.contains(&format!("is manifest {digest}")), "{stderr}");
    assert!(stderr.contains("verified:") && stderr.contains("as bert (dim 384)"), "{stderr}");
    let hits = s.hits();
    let token_hit = hits.iter().find(|h| h.path == "/token").expect("token service was asked");
    assert!(token_hit.query.contains("service=test-registry") && token_hit.query.contains("scope=repository"));
    assert!(
        hits.iter().filter(|h| h.path.contains("/blobs/")).all(|h| h.auth.as_deref() == Some("Bearer anon-tok")),
        "{hits:?}"
    );

    // By digest, into the same folder: everything is already there and verified, nothing downloaded.
    let blob_hits = s.hits().iter().filter(|h| h.path.contains("/blobs/")).count();
    let uri = format!("oci://{}/{repo}@{digest}", host_of(&base));
    let (ok, stderr) = fetch(&["--model-uri", &uri, "--out", &dir], &[]).await;
    assert!(ok, "{stderr}");
    assert_eq!(stderr.matches("already present").count(), 3, "{stderr}");
    assert_eq!(s.hits().iter().filter(|h| h.path.contains("/blobs/")).count(), blob_hits);

    // A digest reference whose manifest bytes do not hash to it is refused.
    let wrong = format!("sha256:{}", "0".repeat(64));
    s.route(format!("/v2/{repo}/manifests/{wrong}"), Canned::ok(oci_manifest(&[("config.json", &config[..])])));
    let uri = format!("oci://{}/{repo}@{wrong}", host_of(&base));
    let (ok, stderr) = fetch(&["--model-uri", &uri, "--out", &dir], &[]).await;
    assert!(!ok);
    assert!(stderr.contains("sha256 mismatch for manifest"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_corrupted_blob_is_refused_and_leaves_no_file() {
    let (s, base) = Server::start().await;
    let weights = tiny_safetensors();
    push_oci(&s, "m/tiny", "v1", &[("config.json", TINY_CONFIG), ("model.safetensors", &weights[..])]);
    // Same size, different bytes.
    let mut corrupt = weights.clone();
    let last = corrupt.len() - 1;
    corrupt[last] ^= 0xff;
    s.route(format!("/v2/m/tiny/blobs/sha256:{}", sha256_hex(&weights)), Canned::ok(corrupt));
    let out = tempfile::tempdir().expect("tempdir");
    let uri = format!("oci://{}/m/tiny:v1", host_of(&base));
    let (ok, stderr) = fetch(&["--model-uri", &uri, "--out", &out.path().display().to_string()], &[]).await;
    assert!(!ok);
    assert!(stderr.contains("sha256 mismatch for model.safetensors"), "{stderr}");
    assert!(stderr.contains(&format!("expected sha256:{}", sha256_hex(&weights))), "{stderr}");
    assert_eq!(listing(out.path()), ["config.json"], "only the verified file is kept");
    no_part_files(out.path());

    // A blob longer than its manifest size is refused too.
    let mut longer = weights.clone();
    longer.push(0);
    s.route(format!("/v2/m/tiny/blobs/sha256:{}", sha256_hex(&weights)), Canned::ok(longer));
    let (ok, stderr) = fetch(&["--model-uri", &uri, "--out", &out.path().display().to_string()], &[]).await;
    assert!(!ok);
    assert!(stderr.contains("the manifest says"), "{stderr}");
    assert_eq!(listing(out.path()), ["config.json"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_unsafe_layer_titles_are_refused() {
    let (s, base) = Server::start().await;
    let root = tempfile::tempdir().expect("tempdir");
    let out = root.path().join("out");
    for (tag, title) in [("a", "../evil"), ("b", "/tmp/evil"), ("c", "sub/evil"), ("d", ".."), ("e", "evil.part")] {
        push_oci(&s, "m/bad", tag, &[("config.json", TINY_CONFIG), (title, &b"x"[..])]);
        let uri = format!("oci://{}/m/bad:{tag}", host_of(&base));
        let (ok, stderr) = fetch(&["--model-uri", &uri, "--out", &out.display().to_string()], &[]).await;
        assert!(!ok, "title {title:?} accepted");
        assert!(stderr.contains(&format!("refusing file name {title:?}")), "{stderr}");
        // Nothing is written before the whole manifest is accepted.
        assert!(listing(&out).is_empty(), "{title:?}: {:?}", listing(&out));
    }
    assert_eq!(listing(root.path()), ["out"], "nothing written next to the output folder");
    assert!(!Path::new("/tmp/evil").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_errors_name_the_tag_and_the_token() {
    let (s, base) = Server::start().await;
    push_oci(&s, "m/x", "v1", &[("config.json", TINY_CONFIG), ("model.safetensors", &tiny_safetensors()[..])]);
    let out = tempfile::tempdir().expect("tempdir");
    let dir = out.path().display().to_string();

    let uri = format!("oci://{}/m/x:nope", host_of(&base));
    let (ok, stderr) = fetch(&["--model-uri", &uri, "--out", &dir], &[]).await;
    assert!(!ok);
    assert!(stderr.contains("HTTP 404 Not Found: tag nope does not exist in"), "{stderr}");

    // A private registry without a challenge: OCI_TOKEN is the fix, and is sent when set.
    s.require(AuthRule { token: "reg-secret".into(), challenge: None, open: vec![] });
    let uri = format!("oci://{}/m/x:v1", host_of(&base));
    let (ok, stderr) = fetch(&["--model-uri", &uri, "--out", &dir], &[]).await;
    assert!(!ok);
    assert!(stderr.contains("HTTP 401 Unauthorized") && stderr.contains("set OCI_TOKEN"), "{stderr}");
    let (ok, stderr) = fetch(&["--model-uri", &uri, "--out", &dir], &[("OCI_TOKEN", "reg-secret")]).await;
    assert!(ok, "{stderr}");
    assert_eq!(listing(out.path()), ["config.json", "model.safetensors"]);

    // Not a model artifact: an image index.
    s.route(
        "/v2/m/x/manifests/multi",
        Canned::ok(
            serde_json::to_vec(
                &json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []}),
            )
            .expect("json"),
        ),
    );
    let uri = format!("oci://{}/m/x:multi", host_of(&base));
    let (ok, stderr) = fetch(&["--model-uri", &uri, "--out", &dir], &[("OCI_TOKEN", "reg-secret")]).await;
    assert!(!ok);
    assert!(stderr.contains("image index"), "{stderr}");

    // Nothing listening: connection errors are retried, then reported with the URL.
    let (ok, stderr) = fetch(&["--model-uri", "oci://127.0.0.1:1/m/x:v1", "--out", &dir, "--attempts", "2"], &[]).await;
    assert!(!ok);
    assert!(stderr.contains("GET http://127.0.0.1:1/v2/m/x/manifests/v1: cannot connect"), "{stderr}");
    assert!(stderr.contains("attempt 2 of 2"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// URIs and the command line

#[test]
fn model_uris_parse_or_say_what_is_wrong() {
    let hf = |s: &str| match ModelUri::parse(s) {
        Ok(ModelUri::Hf(h)) => (h.repo, h.revision),
        other => panic!("{s}: {other:?}"),
    };
    assert_eq!(hf("hf://org/name"), ("org/name".into(), "main".into()));
    assert_eq!(hf("hf://org/name@v1.2"), ("org/name".into(), "v1.2".into()));
    assert_eq!(hf("hf://bert-base-uncased@refs/pr/1"), ("bert-base-uncased".into(), "refs/pr/1".into()));
    let oci = |s: &str| match ModelUri::parse(s) {
        Ok(ModelUri::Oci(o)) => (o.registry, o.repository, o.reference),
        other => panic!("{s}: {other:?}"),
    };
    let d = "a".repeat(64);
    assert_eq!(
        oci("oci://ghcr.io/org/models/minilm:v1"),
        ("ghcr.io".into(), "org/models/minilm".into(), OciReference::Tag("v1".into()))
    );
    assert_eq!(
        oci("oci://localhost:5000/m"),
        ("localhost:5000".into(), "m".into(), OciReference::Tag("latest".into()))
    );
    assert_eq!(
        oci(&format!("oci://reg.io:443/a/b:v1@sha256:{d}")),
        ("reg.io:443".into(), "a/b".into(), OciReference::Digest(d.clone()))
    );
    for uri in [
        "s3://bucket/model",
        "file:///models/x",
        "hf://",
        "hf://a/b/c",
        "hf://org/na me",
        "hf://org/name@",
        "hf://org/../x",
        "hf://org/name@../x",
        "oci://",
        "oci://reg.io",
        "oci://reg.io/",
        "oci://reg.io/Upper:v1",
        "oci://reg.io/a//b",
        "oci://reg.io:99999/a",
        "oci://reg.io/a:bad tag",
        "oci://reg.io/a:-x",
        "oci://reg.io/a@sha256:abc",
        "oci://reg.io/a@md5:0123",
    ] {
        match ModelUri::parse(uri) {
            Err(e) => assert!(e.to_string().starts_with(&format!("invalid model URI {uri:?}: ")), "{e}"),
            Ok(u) => panic!("{uri} accepted as {u:?}"),
        }
    }
    // Display round-trips.
    for uri in ["hf://org/name@main", "oci://localhost:5000/a/b:v1"] {
        assert_eq!(ModelUri::parse(uri).expect(uri).to_string(), uri);
    }
}

#[tokio::test]
async fn bad_uri_exits_non_zero_and_serving_flags_still_parse() {
    let out = tempfile::tempdir().expect("tempdir");
    let (ok, stderr) = fetch(&["--model-uri", "hf://a/b/c", "--out", &out.path().display().to_string()], &[]).await;
    assert!(!ok);
    assert!(stderr.contains("prism-node fetch: error: invalid model URI \"hf://a/b/c\""), "{stderr}");

    // No subcommand: the server's flags, as the operator and `prism up` pass them.
    let bin = env!("CARGO_BIN_EXE_prism-node");
    let o = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--node-name", "x"])
        .env_remove("PRISM_MODEL_URI")
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2), "a missing --model-uri is a usage error");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--model-uri"));
    let missing: PathBuf = out.path().join("absent");
    let o = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--model-uri", &missing.display().to_string(), "--architecture", "bert"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"), "{}", String::from_utf8_lossy(&o.stderr));
    // Flags before the subcommand are the server's and conflict with it.
    let o = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "fetch", "--model-uri", "hf://a/b", "--out", "x"])
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2));
}
