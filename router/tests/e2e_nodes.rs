//! Router + real prism-node processes (all-MiniLM-L6-v2) on loopback.
// The tests hold a process-wide lock across awaits on purpose: they share CPU-heavy node
// processes and must not run concurrently.
#![allow(clippy::await_holding_lock)]
//!
//! Two text models registered under different modality names (`text`, `caption`) make a real
//! multi-modality fan-out with the one public model we have.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Node processes are heavy on a 2-core box: run these tests one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client")
}

async fn post(c: &reqwest::Client, url: &str, body: &Value) -> (u16, Value, reqwest::header::HeaderMap) {
    let r = c.post(url).json(body).send().await.expect("send");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let v = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, v, headers)
}

async fn node_embed(c: &reqwest::Client, node: &Proc, text: &str) -> Vec<f32> {
    let (s, v, _) = post(c, &format!("{}/embed", node.url), &json!({"inputs": [text]})).await;
    assert_eq!(s, 200, "node answered {v}");
    floats(&v["embeddings"][0])
}

fn table(gen: u64, modalities: Value) -> Value {
    json!({"pipeline": "search", "generation": gen, "modalities": modalities})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fans_out_to_two_modalities_and_fuses() {
    let _g = serial();
    let text = spawn_node("minilm-text", "text", "127.0.0.1:0");
    let caption = spawn_node("minilm-caption", "caption", "127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tmp");
    let tpath = dir.path().join("table.json");
    write_json(&tpath, &table(1, json!({"text": [endpoint(&text, 1.0)], "caption": [endpoint(&caption, 1.0)]})));
    let ppath = dir.path().join("pipeline.yaml");
    std::fs::write(
        &ppath,
        "apiVersion: prism.dev/v1alpha1\nkind: MultimodalPipeline\nmetadata: {name: search}\nspec:\n  nodes:\n    - {name: minilm-text, weight: 3}\n    - {name: minilm-caption, weight: 1}\n  fusion: {strategy: weighted, deFusion: true}\n",
    )
    .expect("pipeline");
    let router = spawn_router(&["--routing-table", tpath.to_str().unwrap(), "--pipeline", ppath.to_str().unwrap()]);
    wait_ready(&router.url, Duration::from_secs(10));
    let c = client();

    let (s, v, h) = post(
        &c,
        &format!("{}/v1/infer", router.url),
        &json!({"inputs": {"text": "a red bicycle leaning on a wall", "caption": "photo of a bike"}}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        h.get("x-request-id").and_then(|x| x.to_str().ok()),
        v["id"].as_str(),
        "x-request-id must equal body id"
    );
    assert_eq!(v["pipeline"], "search");
    assert_eq!(v["generation"], 1);
    assert!(v.get("degraded").is_none(), "{v}");
    let fused = floats(&v["embedding"]);
    assert_eq!(fused.len(), 384);
    assert!((l2(&fused) - 1.0).abs() < 1e-4);
    assert_eq!(v["modalities"]["text"]["replica"]["node"], "minilm-text");
    assert_eq!(v["modalities"]["caption"]["replica"]["node"], "minilm-caption");
    assert_eq!(v["modalities"]["text"]["replica"]["endpoint"], text.url.as_str());
    assert!((v["modalities"]["text"]["weight"].as_f64().unwrap() - 0.75).abs() < 1e-9, "weights renormalise 3:1");

    // The fused vector is normalize(0.75*t + 0.25*c) of what the nodes answer directly.
    let t = node_embed(&c, &text, "a red bicycle leaning on a wall").await;
    let cap = node_embed(&c, &caption, "photo of a bike").await;
    let (nt, nc) = (l2(&t), l2(&cap));
    let expect: Vec<f32> =
        t.iter().zip(&cap).map(|(a, b)| (0.75 * *a as f64 / nt + 0.25 * *b as f64 / nc) as f32).collect();
    assert!(
        cosine(&fused, &expect) > 0.9999,
        "fused differs from the weighted combination: cos={}",
        cosine(&fused, &expect)
    );
    let contrib = &v["contributions"];
    let sum = contrib["text"].as_f64().unwrap() + contrib["caption"].as_f64().unwrap();
    assert!((sum - 1.0).abs() < 1e-6, "{contrib}");
    assert!(contrib["text"].as_f64().unwrap() > contrib["caption"].as_f64().unwrap());

    // OpenAI-compatible endpoint: same vector as the node's own.
    let (s, e, _) = post(
        &c,
        &format!("{}/v1/embeddings", router.url),
        &json!({"input": ["a red bicycle leaning on a wall", "x"], "model": "search"}),
    )
    .await;
    assert_eq!(s, 200, "{e}");
    assert_eq!(e["object"], "list");
    assert_eq!(e["data"].as_array().unwrap().len(), 2);
    assert_eq!(e["data"][1]["index"], 1);
    assert_eq!(e["model"], "search");
    // The tokenizer's count: [CLS] a red bicycle leaning on a wall [SEP] + [CLS] x [SEP].
    assert_eq!(e["usage"]["prompt_tokens"], 12, "{e}");
    assert!(cosine(&floats(&e["data"][0]["embedding"]), &t) > 0.99999);
    // `model` naming a modality routes there.
    let (s, e2, _) =
        post(&c, &format!("{}/v1/embeddings", router.url), &json!({"input": "photo of a bike", "model": "caption"}))
            .await;
    assert_eq!(s, 200, "{e2}");
    assert!(cosine(&floats(&e2["data"][0]["embedding"]), &cap) > 0.99999);

    let m = c.get(format!("{}/metrics", router.url)).send().await.unwrap().text().await.unwrap();
    assert!(
        metric(&m, "prism_router_request_duration_seconds_count", &[("pipeline", "search"), ("outcome", "ok")]) >= 3.0,
        "{m}"
    );
    assert_eq!(metric(&m, "prism_routing_table_generation", &[("pipeline", "search")]), 1.0);
}

/// kill -9 one of three text replicas under steady load: no request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_one_of_three_replicas_under_load_no_request_fails() {
    let _g = serial();
    let nodes: Vec<Proc> = (0..3).map(|i| spawn_node(&format!("text-{i}"), "text", "127.0.0.1:0")).collect();
    let dir = tempfile::tempdir().expect("tmp");
    let eps: Vec<Value> = nodes.iter().map(|n| endpoint(n, 1.0)).collect();
    let pipeline = json!({"nodes": [], "routing": {"retries": 2, "consecutiveErrors": 2, "timeoutMs": 5000}});
    let router = router_on(dir.path(), &table(1, json!({ "text": eps })), Some(&pipeline), &[]);

    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let after_kill = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (ok, failed, after_kill, killed, url) =
            (ok.clone(), failed.clone(), after_kill.clone(), killed.clone(), router.url.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            for i in 0..60 {
                let body = json!({"inputs": {"text": format!("worker {w} request {i}")}});
                let r = c.post(format!("{url}/v1/infer")).json(&body).send().await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        let v: Value = r.json().await.unwrap_or(Value::Null);
                        if v.get("degraded").is_some() || v["embedding"].as_array().map_or(0, |a| a.len()) != 384 {
                            failed.lock().unwrap().push(format!("bad answer {v}"));
                        } else {
                            ok.fetch_add(1, Ordering::SeqCst);
                            if killed.load(Ordering::SeqCst) {
                                after_kill.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                    Ok(r) => {
                        let s = r.status();
                        let text = r.text().await.unwrap_or_default();
                        failed.lock().unwrap().push(format!("{s}: {text}"));
                    }
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
            }
        }));
    }
    // Let load build up, then kill one replica while requests are in flight.
    let t0 = Instant::now();
    while ok.load(Ordering::SeqCst) < 60 && t0.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut nodes = nodes;
    nodes[1].kill9();
    killed.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.expect("worker");
    }
    let failed = failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "{} of 480 requests failed, first: {:?}", failed.len(), failed.first());
    assert_eq!(ok.load(Ordering::SeqCst), 480);
    assert!(
        after_kill.load(Ordering::SeqCst) >= 100,
        "too little load after the kill: {}",
        after_kill.load(Ordering::SeqCst)
    );
    let m = client().get(format!("{}/metrics", router.url)).send().await.unwrap().text().await.unwrap();
    let failures = metric(&m, "prism_router_upstream_failures_total", &[("node", "text-1")]);
    let ejections = metric(&m, "prism_router_ejections_total", &[("node", "text-1")]);
    eprintln!(
        "kill-9 under load: 480/480 ok, {} after the kill; text-1 failures={failures} ejections={ejections}",
        after_kill.load(Ordering::SeqCst)
    );
    assert!(ejections >= 1.0, "the dead replica should have been ejected: {m}");
}

/// The only replica of an optional modality dies: answers come back degraded within one
/// request timeout, then whole again once it restarts (same port, found by health probes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_replica_dies_degraded_then_whole_after_restart() {
    let _g = serial();
    let text = spawn_node("minilm-text", "text", "127.0.0.1:0");
    let mut audio = spawn_node("minilm-audio", "audio", "127.0.0.1:0");
    let audio_port = audio.port();
    let dir = tempfile::tempdir().expect("tmp");
    let pipeline = json!({"nodes": [{"name": "minilm-text", "required": true}, {"name": "minilm-audio"}], "routing": {"timeoutMs": 2000}});
    let routes = table(1, json!({"text": [endpoint(&text, 1.0)], "audio": [endpoint(&audio, 1.0)]}));
    let router = router_on(dir.path(), &routes, Some(&pipeline), &[]);
    let c = client();
    let url = format!("{}/v1/infer", router.url);
    let body = json!({"inputs": {"text": "hello", "audio": "hello world"}});
    let (s, v, _) = post(&c, &url, &body).await;
    assert_eq!(s, 200, "{v}");
    assert!(v.get("degraded").is_none());

    audio.kill9();
    let t0 = Instant::now();
    let (s, v, _) = post(&c, &url, &body).await;
    let took = t0.elapsed();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["degraded"]["missing"], json!(["audio"]), "{v}");
    assert!(v["degraded"]["reason"].as_str().unwrap().contains("audio"));
    assert!(v["modalities"].get("audio").is_none());
    assert_eq!(floats(&v["embedding"]).len(), 384);
    assert!(took < Duration::from_millis(2000), "degraded answer took {took:?}, more than one request timeout");

    // Required modality down -> 503 naming it.
    let mut t2 = text;
    t2.kill9();
    let (s, v, _) = post(&c, &url, &json!({"inputs": {"text": "hello"}})).await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["type"], "unavailable");
    assert!(v["error"]["message"].as_str().unwrap().contains("text"), "{v}");
    let text = spawn_node("minilm-text", "text", &t2.url.replace("http://", ""));

    // Restart audio on its old port: health probes bring it back without a table change.
    let _audio = spawn_node("minilm-audio", "audio", &format!("127.0.0.1:{audio_port}"));
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(30);
    loop {
        let (s, v, _) = post(&c, &url, &body).await;
        if s == 200 && v.get("degraded").is_none() && v["modalities"].get("audio").is_some() {
            eprintln!("whole again {:?} after the audio node was ready again", restarted.elapsed());
            break;
        }
        assert!(Instant::now() < deadline, "still degraded 30 s after restart: {s} {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(text);
    let m = c.get(format!("{}/metrics", router.url)).send().await.unwrap().text().await.unwrap();
    assert!(metric(&m, "prism_router_degraded_total", &[("pipeline", "search"), ("missing", "audio")]) >= 1.0, "{m}");
}

/// Early fusion through a real Perceiver fusion node over text (384-d) and vision (64-d):
/// de-fusion gives each modality's share; with the fusion node killed the answer is degraded,
/// naming the fusion node, with the per-modality vectors unfused (they cannot be averaged), never
/// an error; whole again once the node is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn early_fusion_degrades_when_its_fusion_node_dies() {
    use base64::Engine as _;
    let _g = serial();
    let text = spawn_node("text-n", "text", "127.0.0.1:0");
    let vision = spawn_arch("vision-n", "vit", "vit-digits");
    let mut fusion = spawn_arch("fusion-n", "perceiver-fusion", "perceiver-fusion");
    let fusion_port = fusion.port();
    let dir = tempfile::tempdir().expect("tmp");
    let pipeline = json!({
        "nodes": [{"name": "text-n", "required": true}, {"name": "vision-n"}, {"name": "fusion-n", "role": "fusion"}],
        "fusion": {"strategy": "early", "deFusion": true},
        "routing": {"timeoutMs": 3000},
    });
    let routes = table(
        1,
        json!({"text": [endpoint(&text, 1.0)], "vision": [endpoint(&vision, 1.0)], "fusion": [endpoint(&fusion, 1.0)]}),
    );
    let router = router_on(dir.path(), &routes, Some(&pipeline), &[]);
    let c = client();
    let url = format!("{}/v1/infer", router.url);
    let png = std::fs::read(models().join("vit-digits/samples/digit3_1.png")).expect("sample png");
    let image = base64::engine::general_purpose::STANDARD.encode(png);
    let body = json!({"inputs": {"text": "the digit three", "vision": {"image_base64": image}}});

    let (s, v, _) = post(&c, &url, &body).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["strategy"], "early", "{v}");
    assert_eq!(floats(&v["embedding"]).len(), 128, "the fusion node's width: {v}");
    assert_eq!(v["fusion_replica"]["node"], "fusion-n", "{v}");
    let shares = v["contributions"].as_object().unwrap_or_else(|| panic!("de-fusion shares missing: {v}"));
    let (t, i) = (shares["text"].as_f64().unwrap(), shares["vision"].as_f64().unwrap());
    assert!(t > 0.0 && i > 0.0 && (t + i - 1.0).abs() < 1e-6, "{v}");
    // One modality: it holds the whole share.
    let (s, v, _) = post(&c, &url, &json!({"inputs": {"text": "the digit three"}})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["contributions"], json!({"text": 1.0}), "{v}");

    fusion.kill9();
    let (s, v, _) = post(&c, &url, &body).await;
    assert_eq!(s, 200, "a dead fusion node degrades the answer: {v}");
    assert_eq!(v["degraded"]["missing"], json!(["fusion"]), "{v}");
    let reason = v["degraded"]["reason"].as_str().unwrap();
    assert!(reason.contains("fusion node 'fusion' unavailable") && reason.contains("differ in size"), "{reason}");
    assert_eq!(v["strategy"], "late", "{v}");
    assert!(v.get("embedding").is_none(), "nothing fused: {v}");
    assert_eq!(floats(&v["modalities"]["text"]["embedding"]).len(), 384, "{v}");
    assert_eq!(floats(&v["modalities"]["vision"]["embedding"]).len(), 64, "{v}");

    // Back on its port: health probes bring it back, whole early answers again.
    let _fusion = spawn_node_with(
        "fusion-n",
        &[
            "--listen",
            &format!("127.0.0.1:{fusion_port}"),
            "--node-name",
            "fusion-n",
            "--architecture",
            "perceiver-fusion",
        ],
        &models().join("perceiver-fusion"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, v, _) = post(&c, &url, &body).await;
        if s == 200 && v.get("degraded").is_none() && v["strategy"] == "early" {
            break;
        }
        assert!(Instant::now() < deadline, "still degraded 60 s after the fusion node came back: {s} {v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let m = c.get(format!("{}/metrics", router.url)).send().await.unwrap().text().await.unwrap();
    assert!(metric(&m, "prism_router_degraded_total", &[("pipeline", "search"), ("missing", "fusion")]) >= 1.0, "{m}");
}

/// `onMissingRequired: cached`: with a required modality down, a request like an earlier one
/// gets that earlier whole answer, marked cached; an unlike one gets the 503 naming the modality.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn required_modality_down_serves_the_nearest_cached_answer() {
    let _g = serial();
    let text = spawn_node("minilm-text", "text", "127.0.0.1:0");
    let mut audio = spawn_node("minilm-audio", "audio", "127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tmp");
    let pipeline = json!({
        "nodes": [{"name": "minilm-text", "required": true}, {"name": "minilm-audio", "required": true}],
        "routing": {"timeoutMs": 2000},
        "degradation": {"onMissingRequired": "cached", "cache": {"minSimilarity": 0.9}}
    });
    let routes = table(1, json!({"text": [endpoint(&text, 1.0)], "audio": [endpoint(&audio, 1.0)]}));
    let router = router_on(dir.path(), &routes, Some(&pipeline), &[]);
    let c = client();
    let url = format!("{}/v1/infer", router.url);
    let dog = json!({"inputs": {"text": "a dog running in the snow", "audio": "barking"}});
    let (s, whole, _) = post(&c, &url, &dog).await;
    assert_eq!(s, 200, "{whole}");
    assert!(whole.get("degraded").is_none(), "{whole}");
    let (s, _, _) =
        post(&c, &url, &json!({"inputs": {"text": "quarterly tax report for the board", "audio": "typing"}})).await;
    assert_eq!(s, 200);

    audio.kill9();
    // Same wording with different punctuation: nearest is the dog answer, served whole from memory.
    let (s, v, h) =
        post(&c, &url, &json!({"inputs": {"text": "A dog running in the snow!", "audio": "barking"}})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["degraded"]["cached"], json!(true), "{v}");
    assert_eq!(v["degraded"]["missing"], json!(["audio"]), "{v}");
    let reason = v["degraded"]["reason"].as_str().unwrap();
    assert!(reason.contains(whole["id"].as_str().unwrap()), "names the request it reused: {reason}");
    assert_eq!(floats(&v["embedding"]), floats(&whole["embedding"]), "the remembered fused answer");
    assert_ne!(v["id"], whole["id"], "a new request id");
    assert_eq!(h["x-request-id"].to_str().unwrap(), v["id"].as_str().unwrap());

    // Nothing similar enough: the 503 names the missing modality.
    let (s, v, _) = post(&c, &url, &json!({"inputs": {"text": "how do volcanoes form", "audio": "rumble"}})).await;
    assert_eq!(s, 503, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("audio"), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("no cached answer"), "{v}");
    let m = c.get(format!("{}/metrics", router.url)).send().await.unwrap().text().await.unwrap();
    assert!(metric(&m, "prism_router_request_duration_seconds_count", &[("outcome", "cached")]) >= 1.0, "{m}");
    drop(text);
}

/// With memory on, the memory log is the answer cache of `onMissingRequired: cached`: a whole
/// answer logged before a kill -9 of the router is served, marked cached, by the restarted
/// router (same SQLite file, its index now bf16) once a required modality is down; the cached
/// answer is not logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cached_answer_survives_a_router_restart() {
    let _g = serial();
    let text = spawn_node("minilm-text", "text", "127.0.0.1:0");
    let mut audio = spawn_node("minilm-audio", "audio", "127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tmp");
    let db = dir.path().join("memory.db");
    let flags = ["--memory-path", db.to_str().unwrap()];
    let pipeline = json!({
        "nodes": [{"name": "minilm-text", "required": true}, {"name": "minilm-audio", "required": true}],
        "routing": {"timeoutMs": 2000},
        "degradation": {"onMissingRequired": "cached", "cache": {"minSimilarity": 0.9}}
    });
    let routes = table(1, json!({"text": [endpoint(&text, 1.0)], "audio": [endpoint(&audio, 1.0)]}));
    let mut router = router_on(dir.path(), &routes, Some(&pipeline), &flags);
    let c = client();
    let dog = json!({"inputs": {"text": "a dog running in the snow", "audio": "barking"}});
    let (s, whole, _) = post(&c, &format!("{}/v1/infer", router.url), &dog).await;
    assert_eq!(s, 200, "{whole}");
    assert!(whole.get("degraded").is_none(), "{whole}");
    assert_eq!(whole["recorded"], json!(true), "{whole}");
    let (s, _, _) = post(
        &c,
        &format!("{}/v1/infer", router.url),
        &json!({"inputs": {"text": "quarterly tax report for the board", "audio": "typing"}}),
    )
    .await;
    assert_eq!(s, 200);

    // kill -9: nothing but the SQLite file carries the answers over. The restart also switches
    // the index to bf16 vectors (`memory.vectors`), which rebuilds it from the stored answers.
    router.kill9();
    drop(router);
    let mut pipeline = pipeline;
    pipeline["memory"] = json!({"vectors": "bf16"});
    let router = router_on(dir.path(), &routes, Some(&pipeline), &flags);
    let url = format!("{}/v1/infer", router.url);
    audio.kill9();
    let (s, v, _) = post(&c, &url, &dog).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["degraded"]["cached"], json!(true), "{v}");
    assert_eq!(v["degraded"]["missing"], json!(["audio"]), "{v}");
    let reason = v["degraded"]["reason"].as_str().unwrap();
    assert!(reason.contains(whole["id"].as_str().unwrap()), "names the request it reused: {reason}");
    let similarity: f64 = reason
        .rsplit_once("(similarity ")
        .and_then(|(_, r)| r.strip_suffix(')'))
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no similarity in {reason}"));
    assert!(similarity >= 0.9999, "same text, same node: {reason}");
    assert_eq!(floats(&v["embedding"]), floats(&whole["embedding"]), "the logged fused answer");
    assert_eq!(v["modalities"]["audio"], whole["modalities"]["audio"], "with the audio it had then");
    assert_ne!(v["id"], whole["id"], "a new request id");

    // The cached answer is not logged (so it never feeds the cache), and the 503 still comes
    // for a request like nothing logged.
    let r = c.get(format!("{}/v1/memory/records/{}", router.url, v["id"].as_str().unwrap())).send().await;
    assert_eq!(r.expect("get").status().as_u16(), 404, "a cached answer is not a record");
    let (s, v, _) = post(&c, &url, &json!({"inputs": {"text": "how do volcanoes form", "audio": "rumble"}})).await;
    assert_eq!(s, 503, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("no cached answer"), "{v}");
    drop(text);
}

/// Hot reload from the file and the admin API, under load, without dropping a request;
/// generations never go backwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn routing_table_hot_reload() {
    let _g = serial();
    let a = spawn_node("node-a", "text", "127.0.0.1:0");
    let b = spawn_node("node-b", "text", "127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tmp");
    let tpath = dir.path().join("table.json");
    write_json(&tpath, &table(1, json!({"text": [endpoint(&a, 1.0)]})));
    let router = spawn_router(&["--routing-table", tpath.to_str().unwrap(), "--reload-interval-ms", "50"]);
    wait_ready(&router.url, Duration::from_secs(10));
    let c = client();
    let url = format!("{}/v1/infer", router.url);
    let body = json!({"inputs": {"text": "hot reload"}});

    // Background load across all reloads: every request must succeed.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, url, body) = (stop.clone(), url.clone(), body.clone());
        tokio::spawn(async move {
            let c = client();
            let (mut ok, mut bad) = (0usize, Vec::new());
            for _ in 0..5000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let (s, v, _) = post(&c, &url, &body).await;
                if s == 200 {
                    ok += 1
                } else {
                    bad.push(format!("{s} {v}"))
                }
            }
            (ok, bad)
        })
    };

    let (_, v, _) = post(&c, &url, &body).await;
    assert_eq!(v["modalities"]["text"]["replica"]["node"], "node-a");
    // File: generation 2 moves traffic to node-b.
    write_json(&tpath, &table(2, json!({"text": [endpoint(&b, 1.0)]})));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v, _) = post(&c, &url, &body).await;
        if v["generation"] == 2 {
            assert_eq!(v["modalities"]["text"]["replica"]["node"], "node-b");
            break;
        }
        assert!(Instant::now() < deadline, "file reload not applied: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Admin: older generation -> 409; newer -> applied.
    let put = |t: Value| {
        let c = c.clone();
        let u = format!("{}/admin/routing-table", router.url);
        async move {
            let r = c.put(u).json(&t).send().await.expect("put");
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (s, v) = put(table(1, json!({"text": [endpoint(&a, 1.0)]}))).await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["error"]["type"], "conflict");
    let (s, v) = put(table(3, json!({"text": [endpoint(&a, 1.0), endpoint(&b, 1.0)]}))).await;
    assert_eq!((s, v["applied"].clone(), v["generation"].clone()), (200, json!(true), json!(3)));
    // A stale file does not roll the table back.
    write_json(&tpath, &table(2, json!({"text": [endpoint(&b, 1.0)]})));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t: Value = c.get(format!("{}/v1/routing-table", router.url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(t["generation"], 3);
    assert_eq!(t["modalities"]["text"].as_array().unwrap().len(), 2);
    // Table for another pipeline is refused.
    let mut other = table(9, json!({"text": []}));
    other["pipeline"] = json!("other");
    assert_eq!(put(other).await.0, 422);

    stop.store(true, Ordering::SeqCst);
    let (ok, bad) = load.await.expect("load");
    assert!(bad.is_empty(), "requests failed during reloads: {bad:?}");
    assert!(ok > 10, "background load too small: {ok}");
}

/// Malformed inputs: every one gets a 4xx with the JSON error body, and the router survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_inputs_get_4xx_json() {
    let _g = serial();
    let text = spawn_node("minilm-text", "text", "127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tmp");
    let mut fusion_ep = endpoint(&text, 1.0);
    fusion_ep["node"] = json!("fuser");
    let routes = table(1, json!({"text": [endpoint(&text, 1.0)], "fused": [fusion_ep]}));
    let pipeline = json!({"nodes": [{"name": "fuser", "role": "fusion"}]});
    let router = router_on(dir.path(), &routes, Some(&pipeline), &["--max-body-bytes", "65536"]);
    let c = client();
    let infer = format!("{}/v1/infer", router.url);
    let emb = format!("{}/v1/embeddings", router.url);
    let huge = format!("{{\"inputs\":{{\"text\":\"{}\"}}}}", "a".repeat(200_000));
    let (infer, emb) = (infer.as_str(), emb.as_str());
    let cases: Vec<(&str, &str, String, &str)> = vec![
        ("invalid json", infer, "{\"inputs\":".into(), "invalid_json"),
        ("not json", infer, "hello".into(), "invalid_json"),
        ("empty body", infer, "".into(), "invalid_json"),
        ("wrong type", infer, r#"{"inputs":{"text":5}}"#.into(), "validation"),
        ("inputs not object", infer, r#"{"inputs":["a"]}"#.into(), "validation"),
        ("unknown field", infer, r#"{"inputs":{"text":"a"},"bogus":1}"#.into(), "validation"),
        ("empty inputs", infer, r#"{"inputs":{}}"#.into(), "validation"),
        ("unknown modality", infer, r#"{"inputs":{"smell":"roses"}}"#.into(), "unknown_modality"),
        ("fusion modality directly", infer, r#"{"inputs":{"fused":"x"}}"#.into(), "validation"),
        ("null", infer, "null".into(), "invalid_json"),
        ("top-level array", infer, r#"[{"text":"a"}]"#.into(), "invalid_json"),
        ("deep nesting", infer, format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)), "invalid_json|validation"),
        ("huge body", infer, huge, "payload_too_large"),
        ("openai wrong type", emb, r#"{"input":[1,2]}"#.into(), "invalid_request_error"),
        ("openai empty list", emb, r#"{"input":[]}"#.into(), "invalid_request_error"),
        ("openai unknown encoding", emb, r#"{"input":"a","encoding_format":"binary"}"#.into(), "invalid_request_error"),
        ("openai more dims than the model", emb, r#"{"input":"a","dimensions":4096}"#.into(), "invalid_request_error"),
        ("openai unknown model", emb, r#"{"input":"a","model":"gpt-4"}"#.into(), "invalid_request_error"),
    ];
    for (name, url, body, kind) in &cases {
        let r = c.post(*url).header("content-type", "application/json").body(body.clone()).send().await.expect("send");
        let s = r.status();
        let v: Value = r.json().await.unwrap_or_else(|e| panic!("{name}: body is not JSON: {e}"));
        assert!(s.is_client_error(), "{name}: expected 4xx, got {s} {v}");
        assert!(kind.split('|').any(|k| v["error"]["type"] == k), "{name}: expected error type {kind}, got {s} {v}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{name}: {v}");
    }
    let r = c.get(format!("{}/nope", router.url)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "not_found");
    let r = c.get(infer).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    // Still serving after all that.
    let (s, v, _) = post(&c, infer, &json!({"inputs": {"text": "still alive"}})).await;
    assert_eq!(s, 200, "{v}");
}

/// Bearer auth (constant-time compare) and per-client rate limit on a real router.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auth_and_rate_limit() {
    let _g = serial();
    let text = spawn_node("minilm-text", "text", "127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tmp");
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "# router tokens\ns3cret-one\ns3cret-two\n").unwrap();
    let flags = ["--auth-token-file", tokens.to_str().unwrap(), "--rate-limit-rps", "1", "--rate-limit-burst", "3"];
    let router = router_on(dir.path(), &table(1, json!({"text": [endpoint(&text, 1.0)]})), None, &flags);
    let c = client();
    let url = format!("{}/v1/infer", router.url);
    let body = json!({"inputs": {"text": "auth"}});
    let r = c.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "unauthorized");
    let r = c.post(&url).bearer_auth("s3cret-on").json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let mut codes = Vec::new();
    for _ in 0..5 {
        codes.push(c.post(&url).bearer_auth("s3cret-two").json(&body).send().await.unwrap().status().as_u16());
    }
    assert_eq!(&codes[..3], &[200, 200, 200], "{codes:?}");
    assert!(codes[3..].contains(&429), "burst of 3 at 1 rps must hit 429: {codes:?}");
    // Another client (other token) has its own bucket.
    let r = c.post(&url).bearer_auth("s3cret-one").json(&body).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Probes and metrics stay open.
    assert_eq!(c.get(format!("{}/metrics", router.url)).send().await.unwrap().status().as_u16(), 200);
    assert_eq!(c.get(format!("{}/openapi.json", router.url)).send().await.unwrap().status().as_u16(), 200);
}

/// Slow and silent clients are cut off (slowloris): a connection that sends nothing, headers
/// that never finish, a body that stalls (JSON 408); the router keeps serving everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_and_silent_connections_are_closed() {
    use std::io::{Read, Write};
    let _g = serial();
    let text = spawn_node("minilm-text", "text", "127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tmp");
    let flags = ["--header-timeout-s", "0.5", "--body-timeout-s", "1"];
    let router = router_on(dir.path(), &table(1, json!({"text": [endpoint(&text, 1.0)]})), None, &flags);
    let addr = router.url.trim_start_matches("http://").to_string();
    // What the server sends before it closes, and how long that took.
    let exchange = |send: &[u8]| {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(send).unwrap();
        let t0 = Instant::now();
        let mut got = Vec::new();
        let r = s.read_to_end(&mut got);
        assert!(r.is_ok() || !got.is_empty(), "still open after 10 s: {r:?}");
        (String::from_utf8_lossy(&got).into_owned(), t0.elapsed())
    };
    let (_, took) = exchange(b"");
    assert!(took < Duration::from_secs(5), "a silent connection stayed open {took:?}");
    let (_, took) = exchange(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Ty");
    assert!(took < Duration::from_secs(5), "unfinished headers held the connection {took:?}");
    let (resp, took) = exchange(
        b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{\"inputs\":",
    );
    assert!(resp.starts_with("HTTP/1.1 408"), "{resp}");
    assert!(resp.contains("\"request_timeout\""), "JSON error body: {resp}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // A kept-alive connection that goes quiet after its request is closed too.
    let (resp, took) = exchange(b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(took < Duration::from_secs(5), "an idle keep-alive connection stayed open {took:?}");
    // Everyone else is still served, on fresh and on kept-alive connections.
    let c = client();
    for _ in 0..3 {
        let (s, v, _) = post(&c, &format!("{}/v1/infer", router.url), &json!({"inputs": {"text": "still here"}})).await;
        assert_eq!(s, 200, "{v}");
    }
}

/// The router refuses to start open on a non-loopback address.
#[test]
fn refuses_open_non_loopback_bind() {
    let out = std::process::Command::new(router_bin())
        .args(["--listen", "0.0.0.0:0", "--probe-interval-ms", "0"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--auth-token-file") && err.contains("--insecure-no-auth"), "{err}");
}
