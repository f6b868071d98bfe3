//! The engine tested in-process: a stand-in node on loopback (a few lines of axum, not a
//! model) and request logs injected through the `RequestLog` seam, so what a user sees when
//! the log works, or when its writes fail, is checked without a disk to fill.

use std::sync::{Arc, Mutex};

use axum::routing::post;
use axum::Json;
use futures::future::BoxFuture;
use prism_api::wire::node::{EmbedResponse, ScoredLabel};
use prism_api::wire::router::{InferRequest, ReplicaRef};
use prism_api::RoutingTable;
use prism_memory::{Correction, Hit, MemoryError, Record, RevisionFeedback, StoredRecord};
use prism_router::memory::RequestLog;
use prism_router::{EngineOptions, Router};
use serde_json::{json, Value};

/// A text node that answers every input with the same unit vector.
async fn stand_in_node() -> String {
    stand_in("text", None).await
}

/// A node of `modality` answering [0.6, 0.8, 0] and, with a classification head, `labels`.
async fn stand_in(modality: &'static str, labels: Option<Vec<ScoredLabel>>) -> String {
    let app = axum::Router::new().route(
        "/embed",
        post(move |Json(req): Json<Value>| async move {
            let n = req["inputs"].as_array().map_or(1, Vec::len);
            Json(EmbedResponse {
                embeddings: vec![vec![0.6f32, 0.8, 0.0]; n],
                node: modality.into(),
                modality: modality.into(),
                revision: "1".into(),
                timings: Default::default(),
                prompt_tokens: None,
                labels: labels.map(|l| vec![l; n]),
            })
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

async fn router_to(node: &str) -> Arc<Router> {
    let spec = serde_json::from_value(json!({"nodes": [{"name": "text"}], "memory": {"enabled": true}})).unwrap();
    let table: RoutingTable = serde_json::from_value(json!({
        "pipeline": "p", "generation": 1,
        "modalities": {"text": [{"endpoint": node, "node": "text", "revision": "1", "weight": 1.0, "accuracy": 0.9, "ready": true}]}
    }))
    .unwrap();
    let options = EngineOptions { probe_interval: None, node_ca_pem: None, node_max_body_bytes: 1 << 20 };
    Router::new("p".into(), spec, Some(table), options).unwrap()
}

/// A request log in RAM whose writes succeed or fail on demand.
#[derive(Default)]
struct TestLog {
    records: Mutex<Vec<Record>>,
    failing: bool,
}

impl RequestLog for TestLog {
    fn record(&self, rec: Record) -> BoxFuture<'_, Result<(), MemoryError>> {
        Box::pin(async move {
            if self.failing {
                return Err(MemoryError::Write("disk full (test)".into()));
            }
            self.records.lock().unwrap().push(rec);
            Ok(())
        })
    }
    fn correct(&self, c: Correction) -> BoxFuture<'_, Result<Vec<ReplicaRef>, MemoryError>> {
        Box::pin(async move { Err(MemoryError::UnknownRequest(c.request_id)) })
    }
    fn feedback(&self) -> Result<Vec<RevisionFeedback>, MemoryError> {
        Ok(Vec::new())
    }
    fn get(&self, id: &str) -> Result<Option<StoredRecord>, MemoryError> {
        Err(MemoryError::UnknownRequest(id.into()))
    }
    fn search(&self, _: Option<&str>, _: &str, _: &[f32], _: usize) -> (Vec<Hit>, bool) {
        (Vec::new(), true)
    }
    fn training_set(&self) -> Result<Vec<Value>, MemoryError> {
        Ok(Vec::new())
    }
}

fn request() -> InferRequest {
    serde_json::from_value(json!({"inputs": {"text": "a dog in the snow"}})).unwrap()
}

#[tokio::test]
async fn an_answer_is_acknowledged_as_recorded_once_the_log_holds_it() {
    let router = router_to(&stand_in_node().await).await;
    let log = Arc::new(TestLog::default());
    router.set_memory(log.clone()).unwrap();
    let resp = router.infer(request(), "req-1").await.expect("served");
    assert_eq!(resp.recorded, Some(true));
    let records = log.records.lock().unwrap().clone();
    assert_eq!(records.len(), 1);
    assert_eq!((records[0].id.as_str(), records[0].pipeline.as_str()), ("req-1", "p"));
    assert_eq!(records[0].response.modalities["text"].embedding, vec![0.6, 0.8, 0.0], "the answer as served");
    assert!(resp.timings.memory_ms.is_some());
}

#[tokio::test]
async fn a_log_that_cannot_write_still_serves_the_answer_and_says_it_was_not_recorded() {
    let router = router_to(&stand_in_node().await).await;
    router.set_memory(Arc::new(TestLog { failing: true, ..Default::default() })).unwrap();
    let resp = router.infer(request(), "req-2").await.expect("served despite the log");
    assert_eq!(resp.recorded, Some(false), "nothing acknowledged is lost: the client is told");
    assert_eq!(resp.modalities["text"].embedding, vec![0.6, 0.8, 0.0]);
    let without = router_to(&stand_in_node().await).await;
    assert_eq!(without.infer(request(), "req-3").await.unwrap().recorded, None, "memory off: no claim either way");
}

fn scored(items: &[(&str, f32)]) -> Vec<ScoredLabel> {
    items.iter().map(|(l, s)| ScoredLabel { label: l.to_string(), score: *s }).collect()
}

#[tokio::test]
async fn late_fusion_mixes_the_label_distributions_of_the_nodes_with_a_head() {
    // The image node is unsure (3 or 8), the audio node hears "eight", the text node has no head.
    let image = stand_in("image", Some(scored(&[("3", 0.6), ("8", 0.4)]))).await;
    let audio = stand_in("audio", Some(scored(&[("8", 0.9), ("3", 0.1)]))).await;
    let text = stand_in("text", None).await;
    let spec = serde_json::from_value(json!({
        "nodes": [{"name": "image", "weight": 1.0}, {"name": "audio", "weight": 3.0}, {"name": "text", "weight": 4.0}],
        "fusion": {"strategy": "late"}
    }))
    .unwrap();
    let ep = |url: &str, node: &str| json!({"endpoint": url, "node": node, "revision": "1", "weight": 1.0, "accuracy": 0.9, "ready": true});
    let table: RoutingTable = serde_json::from_value(json!({
        "pipeline": "p", "generation": 1,
        "modalities": {"image": [ep(&image, "image")], "audio": [ep(&audio, "audio")], "text": [ep(&text, "text")]}
    }))
    .unwrap();
    let options = EngineOptions { probe_interval: None, node_ca_pem: None, node_max_body_bytes: 1 << 20 };
    let router = Router::new("p".into(), spec, Some(table), options).unwrap();
    // Stand-in nodes take any input, so text stands in for the image and the clip.
    let req = serde_json::from_value(json!({"inputs": {
        "image": {"text": "stand-in"}, "audio": {"text": "stand-in"}, "text": {"text": "stand-in"}
    }}))
    .unwrap();
    let resp = router.infer(req, "req-labels").await.expect("served");
    assert_eq!(resp.modalities["image"].labels.as_ref().unwrap()[0].label, "3", "each modality keeps its own");
    assert_eq!(resp.modalities["text"].labels, None);
    let fused = resp.labels.expect("fused labels");
    // Weights renormalised over the modalities with a head: image 1/4, audio 3/4.
    assert_eq!(fused[0].label, "8", "{fused:?}");
    assert!((fused[0].score - (0.25 * 0.4 + 0.75 * 0.9)).abs() < 1e-5, "{fused:?}");
}

#[tokio::test]
async fn early_fusion_answers_with_the_fusion_nodes_own_labels() {
    // The modality nodes are unsure or wrong; the fusion node, which sees both together, says 3.
    let image = stand_in("image", Some(scored(&[("8", 0.6), ("3", 0.4)]))).await;
    let audio = stand_in("audio", Some(scored(&[("8", 0.7), ("3", 0.3)]))).await;
    let fusion = stand_in("fusion", Some(scored(&[("3", 0.9), ("8", 0.1)]))).await;
    let no_head = stand_in("fusion", None).await;
    let ep = |url: &str, node: &str| json!({"endpoint": url, "node": node, "revision": "1", "weight": 1.0, "accuracy": 0.9, "ready": true});
    let router_with = |fusion_url: String| {
        let spec = serde_json::from_value(json!({
            "nodes": [{"name": "image"}, {"name": "audio"}, {"name": "fusion", "role": "fusion"}],
            "fusion": {"strategy": "early"}
        }))
        .unwrap();
        let table: RoutingTable = serde_json::from_value(json!({
            "pipeline": "p", "generation": 1,
            "modalities": {"image": [ep(&image, "image")], "audio": [ep(&audio, "audio")], "fusion": [ep(&fusion_url, "fusion")]}
        }))
        .unwrap();
        let options = EngineOptions { probe_interval: None, node_ca_pem: None, node_max_body_bytes: 1 << 20 };
        Router::new("p".into(), spec, Some(table), options).unwrap()
    };
    let req = || {
        serde_json::from_value(json!({"inputs": {"image": {"text": "stand-in"}, "audio": {"text": "stand-in"}}}))
            .unwrap()
    };
    let resp = router_with(fusion).infer(req(), "req-early").await.expect("served");
    assert_eq!(resp.strategy, "early");
    let labels = resp.labels.expect("the fusion node's labels");
    assert_eq!((labels[0].label.as_str(), labels[0].score), ("3", 0.9), "{labels:?}");
    // A fusion node without a head: the modalities' labels are mixed, as under late fusion.
    let resp = router_with(no_head).infer(req(), "req-early-mixed").await.expect("served");
    assert_eq!(resp.labels.expect("mixed labels")[0].label, "8");
}
