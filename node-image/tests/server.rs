//! The real `prism-node` binary on loopback (port 0) with real all-MiniLM-L6-v2 weights: readiness,
//! HTTP and gRPC embeds checked against the float64 reference, batching under concurrency,
//! overload (429), deadlines (504), bad input (4xx JSON, never a crash) and the /metrics counts.

mod common;

use std::time::Duration;

use common::NodeProc;
use serde_json::{json, Value};

/// Starts the binary on the real text model, reads the bound ports and waits (bounded) for /ready.
async fn start(extra: &[&str]) -> NodeProc {
    let dir = common::minilm_dir();
    let mut args: Vec<String> = ["--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0", "--node-name", "test-text"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--model-uri".into(), format!("file://{}", dir.display())]);
    args.extend(["--architecture", "bert", "--revision", "r1"].iter().map(|s| s.to_string()));
    args.extend(extra.iter().map(|s| s.to_string()));
    let node = common::spawn_node(&args, true);
    let c = reqwest::Client::new();
    assert_eq!(c.get(format!("{}/live", node.http)).send().await.expect("live").status(), 200);
    node.wait_ready().await;
    node
}

async fn post(c: &reqwest::Client, node: &NodeProc, body: String) -> (u16, Value) {
    let r = c
        .post(format!("{}/embed", node.http))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("non-JSON answer ({status}): {e}: {text}"));
    (status, v)
}

/// Sends only the headers of a POST declaring `len` body bytes and reads the answer.
async fn raw_post_declared_len(node: &NodeProc, len: usize) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = node.http.trim_start_matches("http://");
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "POST /embed HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n{{\"inputs\": [\""
    );
    sock.write_all(head.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = sock.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf);
            if let Some(i) = text.find("\r\n\r\n") {
                if serde_json::from_str::<Value>(&text[i + 4..]).is_ok() {
                    break;
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to an oversized body within 10 s");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or_else(|e| panic!("non-JSON answer {e}: {text}")))
}

fn vecs(v: &Value) -> Vec<Vec<f32>> {
    serde_json::from_value(v["embeddings"].clone()).expect("embeddings")
}

async fn metrics(c: &reqwest::Client, node: &NodeProc) -> String {
    c.get(format!("{}/metrics", node.http)).send().await.expect("metrics").text().await.expect("text")
}

/// Value of the first sample whose line starts with `prefix` (name plus label set).
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serves_real_embeddings_batches_and_rejects_bad_input() {
    let reference = common::minilm_reference();
    let node =
        start(&["--max-batch", "16", "--max-wait-ms", "5", "--max-inputs", "64", "--max-body-bytes", "1048576"]).await;
    let c = reqwest::Client::new();

    let info: Value = c.get(format!("{}/info", node.http)).send().await.expect("info").json().await.expect("json");
    assert_eq!(info["dim"], 384);
    assert_eq!(info["modality"], "text");
    assert_eq!(info["architecture"], "bert");
    assert_eq!(info["node"], "test-text");
    assert_eq!(info["revision"], "r1");

    // Single, as a bare string and as {"text": ...}.
    for input in [json!(reference.items[0].text), json!({"text": reference.items[0].text})] {
        let (s, v) = post(&c, &node, json!({"inputs": [input]}).to_string()).await;
        assert_eq!(s, 200, "{v}");
        let c0 = common::cosine(&vecs(&v)[0], &reference.items[0].embedding);
        assert!(c0 >= 0.9999, "cosine {c0}");
        assert_eq!(v["node"], "test-text");
    }

    // The whole reference set in one request (more than --max-batch: split into sorted chunks).
    let texts: Vec<&str> = reference.items.iter().map(|i| i.text.as_str()).collect();
    let (s, v) = post(&c, &node, json!({"inputs": texts}).to_string()).await;
    assert_eq!(s, 200, "{v}");
    let got = vecs(&v);
    assert_eq!(got.len(), reference.items.len());
    for (g, it) in got.iter().zip(&reference.items) {
        let cs = common::cosine(g, &it.embedding);
        assert!(cs >= 0.9999, "cosine {cs} for {:?}", it.text);
    }

    // Concurrent burst of single-sentence requests: all succeed, answers stay in order per
    // request, and the queue groups them into batches larger than one.
    let mut tasks = Vec::new();
    for i in 0..48 {
        let (c, url, item) = (c.clone(), node.http.clone(), reference.items[i % reference.items.len()].text.clone());
        tasks.push(tokio::spawn(async move {
            let r = c.post(format!("{url}/embed")).json(&json!({"inputs": [item]})).send().await.expect("send");
            (r.status().as_u16(), r.json::<Value>().await.expect("json"), i)
        }));
    }
    for t in tasks {
        let (s, v, i) = t.await.expect("task");
        assert_eq!(s, 200, "{v}");
        let cs = common::cosine(&vecs(&v)[0], &reference.items[i % reference.items.len()].embedding);
        assert!(cs >= 0.9999, "burst answer {i} does not match its input (cosine {cs})");
    }
    let m = metrics(&c, &node).await;
    let batches = sample(&m, "prism_node_batch_size_count{modality=\"text\",node=\"test-text\"}");
    let size_one = sample(&m, "prism_node_batch_size_bucket{modality=\"text\",node=\"test-text\",le=\"1\"}");
    assert!(batches > size_one, "no batch larger than 1 under a burst of 48 requests:\n{m}");

    // Bad input: each is a 4xx JSON error with a type, and the node keeps serving.
    let too_many: Vec<&str> = std::iter::repeat_n("x", 65).collect();
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "validation"),
        (json!({"inputs": []}).to_string(), 400, "validation"),
        (json!({"inputs": too_many}).to_string(), 400, "validation"),
        (json!({"inputs": [{"image_base64": "aGVsbG8="}]}).to_string(), 400, "validation"),
        (json!({"inputs": [""]}).to_string(), 400, "validation"),
        (json!({"inputs": ["ok"], "unknown": 1}).to_string(), 400, "validation"),
        (json!({"inputs": [42]}).to_string(), 400, "validation"),
    ];
    for (body, status, ty) in &cases {
        let (s, v) = post(&c, &node, body.clone()).await;
        assert_eq!(s, *status, "body {:.80}: {v}", body);
        assert_eq!(v["error"]["type"], *ty, "{v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    }

    // Huge body: refused from Content-Length alone with a JSON 413, before the node reads it. A
    // raw socket because an HTTP client still streaming the body sees the early answer as a reset.
    let (s, v) = raw_post_declared_len(&node, 2 * 1024 * 1024).await;
    assert_eq!(s, 413, "{v}");
    assert_eq!(v["error"]["type"], "payload_too_large", "{v}");

    // Deadline: 1 ms cannot cover a 256-token forward pass -> 504, and the node stays healthy.
    let long = reference.items.iter().max_by_key(|i| i.n_tokens).map(|i| i.text.clone()).unwrap_or_default();
    let (s, v) = post(&c, &node, json!({"inputs": [long], "deadline_ms": 1}).to_string()).await;
    assert_eq!(s, 504, "{v}");
    assert_eq!(v["error"]["type"], "timeout");
    let (s, _) = post(&c, &node, json!({"inputs": ["still alive?"]}).to_string()).await;
    assert_eq!(s, 200);

    let m = metrics(&c, &node).await;
    let ok = sample(&m, "prism_node_request_duration_seconds_count{modality=\"text\",node=\"test-text\"}");
    assert_eq!(ok, 2.0 + 1.0 + 48.0 + 1.0, "successful request count:\n{m}");
    let validation = sample(&m, "prism_node_request_failures_total{err=\"validation\"");
    assert_eq!(validation, 7.0, "{m}");
    assert_eq!(sample(&m, "prism_node_request_failures_total{err=\"payload_too_large\""), 1.0, "{m}");
    assert_eq!(sample(&m, "prism_node_request_failures_total{err=\"timeout\""), 1.0, "{m}");
    assert_eq!(sample(&m, "prism_node_inflight{modality=\"text\",node=\"test-text\"}"), 0.0, "{m}");
    assert!(m.contains("prism_node_queue_duration_seconds_bucket"), "{m}");

    // gRPC: same vectors, health SERVING, INVALID_ARGUMENT on empty input.
    let grpc = node.grpc.clone().expect("grpc address");
    let mut client = prism_node::pb::node_client::NodeClient::connect(grpc.clone()).await.expect("grpc connect");
    let resp = client
        .embed(prism_node::pb::EmbedRequest {
            inputs: vec![prism_node::pb::InputItem {
                item: Some(prism_node::pb::input_item::Item::Text(reference.items[1].text.clone())),
            }],
            deadline_ms: 0,
        })
        .await
        .expect("grpc embed")
        .into_inner();
    let cs = common::cosine(&resp.embeddings[0].values, &reference.items[1].embedding);
    assert!(cs >= 0.9999, "grpc cosine {cs}");
    let err = client
        .embed(prism_node::pb::EmbedRequest { inputs: vec![], deadline_ms: 0 })
        .await
        .expect_err("empty inputs must be refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let info = client.info(prism_node::pb::InfoRequest {}).await.expect("info").into_inner();
    assert_eq!(info.dim, 384);
    let channel = tonic::transport::Channel::from_shared(grpc).expect("uri").connect().await.expect("health connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest { service: "prism.v1.Node".into() })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(h.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_queue_answers_429_and_recovers() {
    // One-item batches and a one-request queue: a burst must overflow.
    let node = start(&["--max-batch", "1", "--max-wait-ms", "0", "--max-queue", "1"]).await;
    let c = reqwest::Client::new();
    let text = "Prism batches concurrent requests dynamically to keep the model busy. ".repeat(12);
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (c, url, text) = (c.clone(), node.http.clone(), text.clone());
        tasks.push(tokio::spawn(async move {
            let r = c.post(format!("{url}/embed")).json(&json!({"inputs": [text]})).send().await.expect("send");
            (r.status().as_u16(), r.json::<Value>().await.expect("json"))
        }));
    }
    let (mut ok, mut overloaded) = (0, 0);
    for t in tasks {
        let (s, v) = t.await.expect("task");
        match s {
            200 => ok += 1,
            429 => {
                assert_eq!(v["error"]["type"], "overloaded", "{v}");
                overloaded += 1;
            }
            other => panic!("unexpected status {other}: {v}"),
        }
    }
    assert!(ok >= 1 && overloaded >= 1, "ok={ok} overloaded={overloaded}");
    let m = metrics(&c, &node).await;
    assert_eq!(sample(&m, "prism_node_request_failures_total{err=\"overloaded\""), overloaded as f64, "{m}");
    // After the burst the node serves normally again.
    let (s, _) = post(&c, &node, json!({"inputs": ["after the storm"]}).to_string()).await;
    assert_eq!(s, 200);
    // gRPC maps the same condition to RESOURCE_EXHAUSTED; covered by NodeError::grpc_status's table.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_of_clients_that_left_are_dropped_from_the_queue() {
    // One input per forward pass, so a few long requests keep the model busy while short-lived
    // clients queue behind them and give up.
    let node = start(&["--max-batch", "1", "--max-wait-ms", "0", "--max-queue", "64"]).await;
    let c = reqwest::Client::new();
    let long = "Prism batches concurrent requests dynamically to keep the model busy. ".repeat(24);
    let mut busy = Vec::new();
    for _ in 0..4 {
        let (c, url, text) = (c.clone(), node.http.clone(), long.clone());
        busy.push(tokio::spawn(async move {
            c.post(format!("{url}/embed"))
                .json(&json!({"inputs": [text]}))
                .send()
                .await
                .expect("send")
                .status()
                .as_u16()
        }));
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(30)).build().expect("client");
    let mut gone = Vec::new();
    for i in 0..5 {
        let (c, url) = (impatient.clone(), node.http.clone());
        gone.push(tokio::spawn(async move {
            c.post(format!("{url}/embed")).json(&json!({"inputs": [format!("gone {i}")]})).send().await.is_err()
        }));
    }
    for g in gone {
        assert!(g.await.expect("task"), "an impatient client got an answer within 30 ms; the model was not busy");
    }
    for b in busy {
        assert_eq!(b.await.expect("task"), 200);
    }
    // The batcher drops closed entries when it next pops the queue; one more request drives it.
    let (s, _) = post(&c, &node, json!({"inputs": ["after"]}).to_string()).await;
    assert_eq!(s, 200);
    let m = metrics(&c, &node).await;
    let dropped = sample(&m, "prism_node_request_failures_total{err=\"dropped\"");
    assert!(dropped >= 1.0, "no queued request of a departed client was dropped:\n{m}");
    assert_eq!(
        sample(&m, "prism_node_request_duration_seconds_count{modality=\"text\",node=\"test-text\"}"),
        5.0,
        "{m}"
    );
    assert_eq!(sample(&m, "prism_node_inflight{modality=\"text\",node=\"test-text\"}"), 0.0, "{m}");
}

/// `--max-batch-tokens` cuts one request of many inputs into forward passes that each stay within
/// the token budget (the batch-size histogram counts the passes), every answer still matches its
/// input, and an input longer than the whole budget is served alone rather than refused. Under the
/// default budget the same request is a single pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_budget_cuts_a_batch_into_passes() {
    let reference = common::minilm_reference();
    let texts: Vec<&str> = reference.items.iter().map(|i| i.text.as_str()).collect();
    let total_tokens: usize = reference.items.iter().map(|i| i.n_tokens).sum();
    let longest = reference.items.iter().map(|i| i.n_tokens).max().unwrap_or(0);
    const BUDGET: usize = 40;
    assert!(longest > BUDGET, "the fixture needs an input over the budget (longest {longest})");
    let c = reqwest::Client::new();
    let passes_key = "prism_node_batch_size_count{modality=\"text\",node=\"test-text\"}";
    let mut passes = Vec::new();
    for extra in [vec!["--max-batch-tokens", "40"], vec![]] {
        let mut args = vec!["--max-batch", "64", "--max-inputs", "64"];
        args.extend(extra.iter().copied());
        let node = start(&args).await;
        let info: Value = c.get(format!("{}/info", node.http)).send().await.expect("info").json().await.expect("json");
        let before = sample(&metrics(&c, &node).await, passes_key);
        let (s, v) = post(&c, &node, json!({"inputs": texts}).to_string()).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["prompt_tokens"], total_tokens, "{}", v["prompt_tokens"]);
        for (g, it) in vecs(&v).iter().zip(&reference.items) {
            let cs = common::cosine(g, &it.embedding);
            assert!(cs >= 0.9999, "cosine {cs} for an input of {} tokens", it.n_tokens);
        }
        passes.push((info["max_batch_tokens"].clone(), sample(&metrics(&c, &node).await, passes_key) - before));
    }
    let (budget_info, cut) = passes[0].clone();
    assert_eq!(budget_info, BUDGET, "/info reports the budget");
    assert_eq!(passes[1], (json!(16384), 1.0), "default budget: one pass for {} inputs", texts.len());
    // Each input over the budget is a pass of its own; every other pass holds at most BUDGET.
    let (over, rest): (Vec<usize>, Vec<usize>) = reference.items.iter().map(|i| i.n_tokens).partition(|&n| n > BUDGET);
    let lower = (over.len() + rest.iter().sum::<usize>().div_ceil(BUDGET)) as f64;
    assert!(cut >= lower, "{cut} passes for {total_tokens} tokens under a budget of {BUDGET} (at least {lower})");
    assert!(cut < texts.len() as f64, "{cut} passes: one per input, no batching left");
}
