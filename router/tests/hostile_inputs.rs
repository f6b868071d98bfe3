//! Every request in `tests/fixtures/hostile-requests.json` (malformed JSON, wrong types, huge and
//! deeply nested bodies, invalid UTF-8, NaN, corrupt and bomb images, empty and lying WAVs, path
//! traversal in modality names, HTTP-level misuse) is replayed against a router fronting real text,
//! vision and audio nodes. Each must get a 4xx with a JSON error body naming a type and saying
//! what is wrong; afterwards every process is still ready and a good request still works.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use serde_json::{json, Value};

/// The raw bytes of one case's body.
fn body_of(case: &Value) -> Vec<u8> {
    if let Some(b) = case["body"].as_str() {
        return b.as_bytes().to_vec();
    }
    if let Some(b) = case["body_b64"].as_str() {
        return base64::engine::general_purpose::STANDARD.decode(b).expect("fixture base64");
    }
    if let Some(r) = case.get("body_repeat") {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let n = r["count"].as_u64().expect("count") as usize;
        return format!("{}{}{}{}{}", s("prefix"), s("unit").repeat(n), s("middle"), s("close").repeat(n), s("suffix"))
            .into_bytes();
    }
    Vec::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_hostile_request_gets_a_4xx_json_error_and_nothing_falls_over() {
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(workspace_root().join("tests/fixtures/hostile-requests.json")).expect("fixture"),
    )
    .expect("fixture json");
    let cases = fixture["cases"].as_array().expect("cases");
    assert!(cases.len() >= 40, "the list keeps at least 40 hostile requests");

    let text = spawn_node("text-n", "text", "127.0.0.1:0");
    let vision = spawn_arch("vision-n", "vit", "vit-digits");
    let audio = spawn_arch("audio-n", "whisper-encoder", "whisper-base-encoder");
    let dir = tempfile::tempdir().expect("tmp");
    let table = json!({"pipeline": "hostile", "generation": 1, "modalities": {
        "text": [endpoint(&text, 1.0)], "vision": [endpoint(&vision, 1.0)], "audio": [endpoint(&audio, 1.0)],
    }});
    let pipeline = json!({"nodes": [{"name": "text-n"}, {"name": "vision-n"}, {"name": "audio-n"}], "fusion": {"strategy": "late"}});
    let router = router_on(dir.path(), &table, Some(&pipeline), &["--max-body-bytes", "1048576"]);
    let c = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("client");

    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let path = case["path"].as_str().expect("path");
        let method = case["method"].as_str().unwrap_or("POST");
        let ctype = case["content_type"].as_str().unwrap_or("application/json");
        let url = format!("{}{path}", router.url);
        let req = match method {
            "GET" => c.get(&url),
            _ => c.post(&url).header("content-type", ctype).body(body_of(case)),
        };
        let res = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{name}: no answer ({e})"));
                continue;
            }
        };
        let status = res.status();
        let bytes = res.bytes().await.unwrap_or_default();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let kind = v["error"]["type"].as_str().unwrap_or("");
        let message = v["error"]["message"].as_str().unwrap_or("");
        if !status.is_client_error() || kind.is_empty() || message.is_empty() {
            failures.push(format!("{name}: {status} {}", String::from_utf8_lossy(&bytes[..bytes.len().min(300)])));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile requests were not a 4xx JSON error:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // Everyone survived, and good requests of every modality still work.
    for p in [&router, &text, &vision, &audio] {
        assert_eq!(http_status(&p.url, "/ready"), Some(200), "{} not ready after the hostile requests", p.name);
    }
    let sample = std::fs::read_dir(models().join("vit-digits/samples"))
        .expect("vit samples")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "png"))
        .expect("a sample png");
    let wav = models().join("speech-samples/clone-test.wav");
    let b64 = |p: &std::path::Path| base64::engine::general_purpose::STANDARD.encode(std::fs::read(p).expect("sample"));
    let good = json!({"inputs": {
        "text": "still serving",
        "vision": {"image_base64": b64(&sample)},
        "audio": {"audio_base64": b64(&wav)},
    }});
    let r = c.post(format!("{}/v1/infer", router.url)).json(&good).send().await.expect("send");
    let status = r.status();
    let v: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["modalities"].as_object().map(|m| m.len()), Some(3), "all three modalities answered: {v}");
}
