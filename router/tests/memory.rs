//! The memory loop through a real router and real nodes: every answer recorded before it is
//! sent, nothing acknowledged lost across kill -9 of the router, search by meaning, corrections
//! that move routing, clear errors.
// One test at a time holds the node processes (CPU-heavy on a 2-core box).
#![allow(clippy::await_holding_lock)]

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client")
}

async fn post(c: &reqwest::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = c.post(url).json(body).send().await.expect("send");
    let s = r.status().as_u16();
    (s, r.json::<Value>().await.unwrap_or(Value::Null))
}

async fn get(c: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = c.get(url).send().await.expect("send");
    let s = r.status().as_u16();
    (s, r.json::<Value>().await.unwrap_or(Value::Null))
}

fn routes(nodes: &[&Proc]) -> Value {
    let eps: Vec<Value> = nodes.iter().map(|n| endpoint(n, 1.0)).collect();
    json!({"pipeline": "search", "generation": 1, "modalities": {"text": eps}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_records_survive_kill9_and_are_searchable() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let node = spawn_node("minilm", "text", "127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("memory.db");
    let db_flag = ["--memory-path", db.to_str().unwrap()];
    let mut router = router_on(dir.path(), &routes(&[&node]), None, &db_flag);
    let c = client();
    // (status, body), or (0, null) when the connection broke (the kill).
    let infer = |url: String, text: String| {
        let c = c.clone();
        async move {
            match c.post(format!("{url}/v1/infer")).json(&json!({"inputs": {"text": text}})).send().await {
                Ok(r) => {
                    let s = r.status().as_u16();
                    (s, r.json::<Value>().await.unwrap_or(Value::Null))
                }
                Err(_) => (0, Value::Null),
            }
        }
    };

    let (s, dog) = infer(router.url.clone(), "two dogs playing in the snow".into()).await;
    assert_eq!(s, 200, "{dog}");
    assert_eq!(dog["recorded"], json!(true), "{dog}");
    assert!(dog["timings"]["memory_ms"].as_f64().unwrap() >= 0.0);
    let (_, tax) = infer(router.url.clone(), "filing the quarterly tax return".into()).await;

    // Load, then kill -9 mid-flight: every answer that said recorded=true must be there after.
    let mut tasks = Vec::new();
    for i in 0..60 {
        let url = router.url.clone();
        let f = infer(url, format!("sentence number {i} about the weather in spring"));
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(i * 15)).await;
            f.await
        }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    router.kill9();
    let mut acked = vec![dog["id"].as_str().unwrap().to_string(), tax["id"].as_str().unwrap().to_string()];
    let mut failed = 0;
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(30), t).await {
            Ok(Ok((200, v))) if v["recorded"] == json!(true) => acked.push(v["id"].as_str().unwrap().to_string()),
            _ => failed += 1,
        }
    }
    eprintln!("acknowledged {} records, {failed} requests cut off by the kill", acked.len());
    assert!(acked.len() > 2, "some requests must have been answered before the kill");

    let router = router_on(dir.path(), &routes(&[&node]), None, &db_flag);
    let mut lost = Vec::new();
    for id in &acked {
        let (s, v) = get(&c, &format!("{}/v1/memory/records/{id}", router.url)).await;
        if s != 200 {
            lost.push(id.clone());
        } else {
            assert_eq!(v["id"], json!(id));
            assert!(v["inputs"]["text"]["sha256"].is_string(), "inputs hashed by default: {v}");
        }
    }
    assert!(lost.is_empty(), "acknowledged but lost after kill -9: {lost:?}");

    // Search by meaning, through the text node, and by vector.
    let (s, v) = post(
        &c,
        &format!("{}/v1/memory/search", router.url),
        &json!({"modality": "text", "input": "puppies running around in snowfall", "k": 3}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["hits"][0]["id"], dog["id"], "{v}");
    assert!(v["hits"][0]["similarity"].as_f64().unwrap() > 0.5, "{v}");
    assert_eq!(v["hits"].as_array().unwrap().len(), 3);
    let (s, v) =
        post(&c, &format!("{}/v1/memory/search", router.url), &json!({"vector": tax["embedding"], "k": 1})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["hits"][0]["id"], tax["id"]);
    assert!((v["hits"][0]["similarity"].as_f64().unwrap() - 1.0).abs() < 1e-4);

    // Bad searches are 4xx with a JSON error.
    for (body, want) in [
        (json!({"k": 3}), 422),
        (json!({"input": "x"}), 422),
        (json!({"vector": [1.0], "input": "x"}), 422),
        (json!({"vector": [], "k": 1}), 422),
        (json!({"vector": [1.0], "k": 1000}), 422),
        (json!({"modality": "text", "input": "x", "surprise": 1}), 422),
        (json!({"modality": "smell", "input": "x"}), 422),
    ] {
        let (s, v) = post(&c, &format!("{}/v1/memory/search", router.url), &body).await;
        assert_eq!(s, want, "{body} -> {v}");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrections_lower_a_revisions_accuracy_and_move_traffic() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Nodes report the revision the table declares (the operator and `prism up` pass
    // spec.model.revision), so a restarted router knows which record applies before any answer.
    let node = |name: &str| {
        let p =
            spawn_node_with(name, &["--node-name", name, "--architecture", "bert", "--revision", "r1"], &model_dir());
        wait_ready(&p.url, Duration::from_secs(120));
        p
    };
    let (good, bad) = (node("minilm-good"), node("minilm-bad"));
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("memory.db");
    // Accuracy dominates latency here so that the effect of corrections is what decides.
    let pipeline = json!({"nodes": [{"name": "minilm-good"}, {"name": "minilm-bad"}], "routing": {"alpha": 1000.0}});
    let flags = ["--memory-path", db.to_str().unwrap()];
    let router = router_on(dir.path(), &routes(&[&good, &bad]), Some(&pipeline), &flags);
    let c = client();
    let url = format!("{}/v1/infer", router.url);
    let served_by = |v: &Value| v["modalities"]["text"]["replica"]["node"].as_str().unwrap_or("").to_string();

    // Equal accuracy at first: both replicas serve. Then users say every answer of minilm-bad
    // was wrong and every one of minilm-good right.
    let mut served = Vec::new();
    for i in 0..30 {
        let (s, v) = post(&c, &url, &json!({"inputs": {"text": format!("query {i}")}})).await;
        assert_eq!(s, 200, "{v}");
        served.push((v["id"].clone(), served_by(&v)));
    }
    assert!(served.iter().any(|(_, n)| n == "minilm-bad"), "both replicas serve at equal accuracy: {served:?}");
    let mut last = Value::Null;
    for (i, (id, node)) in served.iter().enumerate() {
        let ok = node == "minilm-good";
        let (s, r) = post(
            &c,
            &format!("{}/v1/memory/corrections", router.url),
            &json!({"requestId": id, "correct": ok, "answer": {"label": i}}),
        )
        .await;
        assert_eq!(s, 201, "{r}");
        assert_eq!(r["replicas"][0]["node"], node.as_str());
        if !ok {
            last = r;
        }
    }
    let a_bad = last["replicas"][0]["accuracy"].as_f64().unwrap();
    assert!(a_bad < 0.9, "corrections lowered A_i of the bad revision: {last}");

    let mut by_bad = 0;
    for i in 0..30 {
        let (_, v) = post(&c, &url, &json!({"inputs": {"text": format!("after {i}")}})).await;
        by_bad += usize::from(served_by(&v) == "minilm-bad");
    }
    assert_eq!(by_bad, 0, "traffic left the corrected revision");

    // Exported as a training set.
    let (s, v) = get(&c, &format!("{}/v1/memory/corrections", router.url)).await;
    assert_eq!(s, 200);
    let set = v["corrections"].as_array().unwrap();
    assert_eq!(set.len(), 30);
    assert_eq!(set[0]["answer"]["label"], 0);
    assert_eq!(set[0]["embeddings"]["text"].as_array().unwrap().len(), 384);

    // A restarted router starts from the stored corrections.
    drop(router);
    let router = router_on(dir.path(), &routes(&[&good, &bad]), Some(&pipeline), &flags);
    let mut by_bad = 0;
    for i in 0..10 {
        let (_, v) =
            post(&c, &format!("{}/v1/infer", router.url), &json!({"inputs": {"text": format!("restart {i}")}})).await;
        by_bad += usize::from(served_by(&v) == "minilm-bad");
    }
    assert_eq!(by_bad, 0, "the corrections survived the restart");

    // Errors name the problem.
    let corr = format!("{}/v1/memory/corrections", router.url);
    let (s, v) = post(&c, &corr, &json!({"requestId": "no-such-request", "rating": 1.0})).await;
    assert_eq!((s, v["error"]["type"].as_str()), (404, Some("not_found")), "{v}");
    for body in [
        json!({"requestId": "x", "rating": 1.5}),
        json!({"requestId": "x"}),
        json!({"requestId": "x", "rating": 1.0, "correct": true}),
        json!({"requestId": "", "rating": 1.0}),
    ] {
        let (s, v) = post(&c, &corr, &body).await;
        assert_eq!(s, 422, "{body} -> {v}");
    }
}

/// The README's example: texts sent to `/v1/embeddings` are logged (one record per input) and
/// found by a memory search by meaning; they never become cached answers of `/v1/infer`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn embeddings_calls_are_logged_and_found_by_search() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let node = spawn_node("minilm", "text", "127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("memory.db");
    let router = router_on(dir.path(), &routes(&[&node]), None, &["--memory-path", db.to_str().unwrap()]);
    let c = client();
    let embed = |input: Value| {
        let c = c.clone();
        let url = format!("{}/v1/embeddings", router.url);
        async move {
            let r = c.post(url).json(&json!({ "input": input })).send().await.expect("send");
            assert_eq!(r.status().as_u16(), 200);
            let header = |k: &str| r.headers().get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let (id, recorded) = (header("x-request-id"), header("x-prism-recorded"));
            (id, recorded, r.json::<Value>().await.expect("json"))
        }
    };

    let (batch, recorded, v) = embed(json!(["a dog in the snow", "a cat on a sofa"])).await;
    assert_eq!(recorded, "true");
    assert_eq!(v["data"].as_array().unwrap().len(), 2, "{v}");
    let (single, recorded, _) = embed(json!("filing the quarterly tax return")).await;
    assert_eq!(recorded, "true");

    let (s, v) = post(
        &c,
        &format!("{}/v1/memory/search", router.url),
        &json!({"modality": "text", "input": "puppies in snow", "k": 3}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let ids: Vec<&str> = v["hits"].as_array().unwrap().iter().filter_map(|h| h["id"].as_str()).collect();
    assert_eq!(ids.len(), 3, "every embedded input is a record: {v}");
    assert_eq!(ids[0], format!("{batch}.0"), "the dog text is nearest to puppies in snow: {v}");
    assert!(ids.contains(&format!("{batch}.1").as_str()) && ids.contains(&single.as_str()), "{v}");

    // One record per input: its own text (hashed by default) and the node's vector.
    let (s, rec) = get(&c, &format!("{}/v1/memory/records/{batch}.1", router.url)).await;
    assert_eq!(s, 200, "{rec}");
    assert_eq!(rec["response"]["strategy"], json!("embeddings"), "{rec}");
    assert!(rec["inputs"]["text"]["sha256"].is_string(), "{rec}");
    assert_eq!(rec["response"]["modalities"]["text"]["embedding"].as_array().unwrap().len(), 384, "{rec}");
    let (s, _) = get(&c, &format!("{}/v1/memory/records/{single}", router.url)).await;
    assert_eq!(s, 200, "a single input is recorded under the request id itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_memory_the_endpoints_say_how_to_turn_it_on() {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let node = spawn_node("minilm", "text", "127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tmp");
    let router = router_on(dir.path(), &routes(&[&node]), None, &[]);
    let c = client();
    let (s, v) = post(&c, &format!("{}/v1/infer", router.url), &json!({"inputs": {"text": "hi"}})).await;
    assert_eq!(s, 200);
    assert!(v.get("recorded").is_none(), "no memory, no claim: {v}");
    let r = c.post(format!("{}/v1/embeddings", router.url)).json(&json!({"input": "hi"})).send().await.expect("send");
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers().get("x-prism-recorded").is_none(), "no memory, no claim");
    let (s, v) = post(&c, &format!("{}/v1/memory/search", router.url), &json!({"vector": [1.0, 0.0]})).await;
    assert_eq!(s, 404);
    assert!(v["error"]["message"].as_str().unwrap().contains("--memory-path"), "{v}");
}
