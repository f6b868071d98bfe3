//! The front door on real processes (prism-router and prism-node serving all-MiniLM-L6-v2):
//! JSON-only POSTs (415), header and body limits (431, 413) enforced before any node is called,
//! JSON objects only (400), CORS off unless allowed, and, with two replicas, oversized requests
//! that eject nothing and cost no later request.
// The tests hold a process-wide lock across awaits on purpose: node processes are CPU-heavy.
#![allow(clippy::await_holding_lock)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client")
}

fn table(modalities: Value) -> Value {
    json!({"pipeline": "door", "generation": 1, "modalities": modalities})
}

async fn metrics(c: &reqwest::Client, url: &str) -> String {
    c.get(format!("{url}/metrics")).send().await.expect("metrics").text().await.expect("metrics body")
}

/// Requests a node has seen, answered or failed (probes of /ready are not counted).
async fn node_requests(c: &reqwest::Client, node: &Proc) -> f64 {
    let m = metrics(c, &node.url).await;
    metric(&m, "prism_node_request_duration_seconds_count", &[]) + metric(&m, "prism_node_request_failures_total", &[])
}

/// Status and JSON body; a body that is not JSON fails the test.
async fn send(req: reqwest::RequestBuilder, what: &str) -> (u16, Value) {
    let r = req.send().await.unwrap_or_else(|e| panic!("{what}: no answer: {e}"));
    let s = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    let v = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{what}: {s} with a body that is not JSON ({e}): {}", &text[..text.len().min(200)]));
    (s, v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_requests_eject_no_replica_and_cost_no_later_request() {
    let _g = serial();
    let a = spawn_node("text-a", "text", "127.0.0.1:0");
    let b = spawn_node("text-b", "text", "127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tmp");
    // Default limits: the router's 8 MiB is the nodes' default --max-body-bytes.
    let router = router_on(dir.path(), &table(json!({"text": [endpoint(&a, 1.0), endpoint(&b, 1.0)]})), None, &[]);
    let c = client();
    let before = node_requests(&c, &a).await + node_requests(&c, &b).await;

    // 10 MB: over the router's limit. Drained and answered 413 (a client that writes its whole
    // body before reading, like Python's, sees the 413 rather than a broken pipe).
    let ten_mb = "a ".repeat(5_000_000);
    let emb = serde_json::to_vec(&json!({"input": ten_mb})).expect("json");
    let inf = serde_json::to_vec(&json!({"inputs": {"text": ten_mb}})).expect("json");
    for _ in 0..3 {
        for (path, body) in [("/v1/embeddings", &emb), ("/v1/infer", &inf)] {
            let req =
                c.post(format!("{}{path}", router.url)).header("content-type", "application/json").body(body.clone());
            let (s, v) = send(req, path).await;
            assert_eq!((s, v["error"]["type"].as_str()), (413, Some("payload_too_large")), "{path}: {v}");
        }
    }
    // Exactly at the router's limit, but the node request it becomes ({"inputs":[...],
    // "deadline_ms":N}) is a few bytes larger than what nodes accept: refused before sending.
    let limit = 8 * 1024 * 1024;
    let overhead = r#"{"inputs":{"text":""}}"#.len();
    let at_limit = format!(r#"{{"inputs":{{"text":"{}"}}}}"#, "a".repeat(limit - overhead));
    assert_eq!(at_limit.len(), limit);
    for _ in 0..3 {
        let req = c
            .post(format!("{}/v1/infer", router.url))
            .header("content-type", "application/json")
            .body(at_limit.clone());
        let (s, v) = send(req, "at the limit").await;
        assert_eq!(s, 413, "{v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("--node-max-body-bytes")), "{v}");
    }

    // No node saw any of them, and no replica was charged for them.
    let after = node_requests(&c, &a).await + node_requests(&c, &b).await;
    assert_eq!(after, before, "oversized requests reached a node");
    let m = metrics(&c, &router.url).await;
    assert_eq!(metric(&m, "prism_router_ejections_total", &[]), 0.0, "{m}");
    assert_eq!(metric(&m, "prism_router_upstream_failures_total", &[]), 0.0, "{m}");
    // Every later request is served: no 503, both replicas still routable.
    let mut served_by = std::collections::BTreeSet::new();
    for i in 0..20 {
        let r = c
            .post(format!("{}/v1/embeddings", router.url))
            .json(&json!({"input": format!("request {i} after the oversized ones")}))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status().as_u16(), 200, "request {i} after the oversized ones");
        if let Some(n) = r.headers().get("x-prism-node").and_then(|v| v.to_str().ok()) {
            served_by.insert(n.to_string());
        }
    }
    assert_eq!(http_status(&router.url, "/ready"), Some(200));
    let m = metrics(&c, &router.url).await;
    assert_eq!(metric(&m, "prism_router_ejections_total", &[]), 0.0, "{m}");
    eprintln!("after 9 oversized requests: 20 of 20 served, by {served_by:?}; 0 ejections, 0 upstream failures");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_only_header_limit_and_objects_only_on_router_and_node() {
    let _g = serial();
    let node = spawn_node("text-n", "text", "127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tmp");
    let router = router_on(dir.path(), &table(json!({"text": [endpoint(&node, 1.0)]})), None, &[]);
    let c = client();

    // Every body-carrying route of the router, and the node's /embed.
    let mut posts: Vec<(String, String)> = prism_router::http::routes()
        .into_iter()
        .filter(|(m, _)| *m == "post" || *m == "put")
        .map(|(m, p)| (m.to_uppercase(), format!("{}{p}", router.url)))
        .collect();
    assert!(posts.len() >= 5, "{posts:?}");
    let node_embed = format!("{}/embed", node.url);
    posts.push(("POST".into(), node_embed.clone()));
    let good_shape = r#"{"inputs":{"text":"x"},"input":"x"}"#;
    for (method, url) in &posts {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        for ctype in [Some("text/plain"), Some("application/x-www-form-urlencoded"), Some("multipart/form-data"), None]
        {
            let mut req = c.request(m.clone(), url).body(good_shape);
            if let Some(t) = ctype {
                req = req.header("content-type", t);
            }
            let (s, v) = send(req, url).await;
            assert_eq!(
                (s, v["error"]["type"].as_str()),
                (415, Some("unsupported_media_type")),
                "{method} {url} {ctype:?}: {v}"
            );
        }
        for body in ["[1, 2]", "null", "\"text\"", "5", "", "   "] {
            let req = c.request(m.clone(), url).header("content-type", "application/json").body(body);
            let (s, v) = send(req, url).await;
            assert_eq!(s, 400, "{method} {url} body {body:?}: {v}");
        }
    }
    // Headers over 16 KiB: 431 on both ports, for any method.
    let big = "x".repeat(70_000);
    for url in [format!("{}/v1/models", router.url), format!("{}/info", node.url), node_embed.clone()] {
        let (s, v) = send(c.get(&url).header("x-padding", &big), &url).await;
        assert_eq!((s, v["error"]["type"].as_str()), (431, Some("headers_too_large")), "{url}: {v}");
    }
    // A body over the node's own limit is a JSON 413 there too.
    let huge = serde_json::to_vec(&json!({"inputs": ["a ".repeat(5_000_000)]})).expect("json");
    let (s, v) = send(c.post(&node_embed).header("content-type", "application/json").body(huge), "node 10 MB").await;
    assert_eq!(s, 413, "{v}");

    // Invalid `model` values: a clear 4xx, and no node is called for them.
    let before = node_requests(&c, &node).await;
    let emb = format!("{}/v1/embeddings", router.url);
    let megabyte = "m".repeat(1 << 20);
    for (model, status) in [
        ("", 400),
        ("../../etc/passwd", 404),
        ("a\u{0}b", 400),
        ("a\r\nX-Injected: yes", 400),
        (megabyte.as_str(), 400),
        ("text-embedding-3-small", 404),
    ] {
        let (s, v) = send(c.post(&emb).json(&json!({"input": "x", "model": model})), "model").await;
        assert_eq!(s, status, "model {:?}: {v}", &model[..model.len().min(20)]);
        assert_eq!(v["error"]["param"], "model", "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.len() < 1000, "the error must not echo the value: {} bytes", msg.len());
        if status == 404 {
            assert_eq!(v["error"]["code"], "model_not_found", "{v}");
            assert!(msg.contains("door, text, text-n"), "lists the valid names: {msg}");
        }
    }
    assert_eq!(node_requests(&c, &node).await, before, "a refused request reached the node");

    // A bad item names its index; whitespace-only text embeds and keeps its batch.
    let (s, v) = send(c.post(&emb).json(&json!({"input": ["a", "b", 7]})), "bad item").await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.contains("input[2]")), "{v}");
    let (s, v) = send(c.post(&emb).json(&json!({"input": ["a", " ", "c"], "model": "door"})), "blank").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"].as_array().map(Vec::len), Some(3));
    let (s, v) = send(c.post(&node_embed).json(&json!({"inputs": ["fine", ""]})), "node empty item").await;
    assert_eq!(s, 400);
    assert!(v["error"]["message"].as_str().is_some_and(|m| m.starts_with("inputs[1]")), "{v}");

    // GET /v1/models and /v1/models/{id}.
    let (s, v) = send(c.get(format!("{}/v1/models", router.url)), "models").await;
    assert_eq!(s, 200);
    let ids: Vec<&str> = v["data"].as_array().expect("data").iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, ["door", "text", "text-n"], "{v}");
    let (s, v) = send(c.get(format!("{}/v1/models/text-n", router.url)), "model").await;
    assert_eq!((s, v["modality"].as_str()), (200, Some("text")), "{v}");
    let (s, v) = send(c.get(format!("{}/v1/models/nope", router.url)), "model").await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("model_not_found")), "{v}");

    // Still serving.
    assert_eq!(http_status(&router.url, "/ready"), Some(200));
    assert_eq!(http_status(&node.url, "/ready"), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cors_is_off_by_default_and_allows_only_listed_origins() {
    let _g = serial();
    let node = spawn_node("text-n", "text", "127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tmp");
    let routes = table(json!({"text": [endpoint(&node, 1.0)]}));
    let c = client();
    let preflight = |url: String, origin: &'static str| {
        c.request(reqwest::Method::OPTIONS, url)
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type")
    };

    let closed = router_on(dir.path(), &routes, None, &[]);
    let r = preflight(format!("{}/v1/embeddings", closed.url), "https://evil.example").send().await.expect("preflight");
    assert!(r.headers().get("access-control-allow-origin").is_none(), "CORS must be off by default: {:?}", r.headers());
    let r = c.get(format!("{}/v1/models", closed.url)).header("origin", "https://evil.example").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    drop(closed);

    let dir2 = tempfile::tempdir().expect("tmp");
    let open = router_on(dir2.path(), &routes, None, &["--cors-allow-origin", "https://app.example"]);
    let r = preflight(format!("{}/v1/embeddings", open.url), "https://app.example").send().await.expect("preflight");
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        r.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()),
        Some("https://app.example")
    );
    let methods = r.headers().get("access-control-allow-methods").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(methods.contains("POST"), "{methods}");
    let r = preflight(format!("{}/v1/embeddings", open.url), "https://evil.example").send().await.expect("preflight");
    assert!(r.headers().get("access-control-allow-origin").is_none(), "an unlisted origin must get no CORS grant");
    let r = c
        .post(format!("{}/v1/embeddings", open.url))
        .header("origin", "https://app.example")
        .json(&json!({"input": "from a page"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()),
        Some("https://app.example")
    );
    let exposed = r.headers().get("access-control-expose-headers").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(exposed.contains("x-request-id"), "{exposed}");
}

#[test]
fn the_router_refuses_unsafe_limits_and_origins_at_start() {
    for (args, says) in [
        (vec!["--max-body-bytes", "16777216"], "--node-max-body-bytes"),
        (vec!["--cors-allow-origin", "*"], "--cors-allow-origin"),
        (vec!["--cors-allow-origin", "https://app.example/path"], "--cors-allow-origin"),
    ] {
        let out = Command::new(router_bin())
            .args(["--listen", "127.0.0.1:0"])
            .args(&args)
            .output()
            .expect("run prism-router");
        assert!(!out.status.success(), "{args:?} must be refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

/// One HTTP/1.1 `GET path` on `s` (kept alive unless the server says otherwise): the status and
/// the lower-cased header block.
fn get_on(s: &mut std::net::TcpStream, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    write!(s, "GET {path} HTTP/1.1\r\nHost: router\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    // /live answers "ok" with a content-length: the headers and 2 bytes end the answer.
    loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before an answer"));
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_lowercase();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            if body.len() >= 2 {
                let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
                return Ok((status, head.to_string()));
            }
        }
    }
}

/// A rolling restart in a cluster sends SIGTERM to the old router while kube-proxy and clients'
/// pooled connections still point at it. With --shutdown-delay-s it keeps answering, on old and
/// new connections, and asks each client to reconnect (`Connection: close`); then it stops.
#[test]
fn a_stopping_router_answers_through_its_shutdown_delay_and_sends_clients_elsewhere() {
    let _g = serial();
    let dir = tempfile::tempdir().expect("tmp");
    // No node needed: /live answers from the router alone (it is not Ready without replicas).
    let tpath = dir.path().join("table.json");
    write_json(&tpath, &table(json!({})));
    let tpath = tpath.display().to_string();
    let mut router = spawn_router(&["--routing-table", &tpath, "--shutdown-delay-s", "2"]);
    let addr = router.url.trim_start_matches("http://").to_string();
    let mut pooled = std::net::TcpStream::connect(&addr).expect("connect");
    pooled.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let (st, head) = get_on(&mut pooled, "/live").expect("answer before SIGTERM");
    assert_eq!(st, 200);
    assert!(!head.contains("connection: close"), "a running router keeps connections open: {head}");

    let pid = router.child.id().to_string();
    let sent = std::time::Instant::now();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().expect("kill").success());
    std::thread::sleep(Duration::from_millis(300));
    // The pooled connection still gets its answer, told to reconnect.
    let (st, head) = get_on(&mut pooled, "/live").expect("a pooled connection is answered during the delay");
    assert_eq!(st, 200);
    assert!(head.contains("connection: close"), "answers during the delay say Connection: close: {head}");
    // A client that kube-proxy still sends here is accepted and answered too.
    let mut fresh = std::net::TcpStream::connect(&addr).expect("new connections accepted during the delay");
    fresh.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let (st, head) = get_on(&mut fresh, "/live").expect("a new connection is answered during the delay");
    assert_eq!(st, 200);
    assert!(head.contains("connection: close"), "{head}");
    assert!(router.child.try_wait().expect("wait").is_none(), "the router exited inside its delay");

    // Then it closes its listener, drains, and exits cleanly.
    let deadline = sent + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = router.child.try_wait().expect("wait") {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "router still running 15 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(sent.elapsed() >= Duration::from_secs(2), "exited after {:?}, before its 2 s delay", sent.elapsed());
    assert!(status.success(), "router exit after SIGTERM: {status}");
    assert!(std::net::TcpStream::connect(&addr).is_err(), "the listener is closed after the delay");
}
