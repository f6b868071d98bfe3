//! gRPC front door against real nodes: same engine, same error table.

mod common;

use common::*;
use prism_router::grpc::pb;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_infer_fans_out_and_maps_errors() {
    let text = spawn_node("minilm-text", "text", "127.0.0.1:0");
    let caption = spawn_node("minilm-caption", "caption", "127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tmp");
    let routes = json!({"pipeline": "g", "generation": 4, "modalities": {"text": [endpoint(&text, 1.0)], "caption": [endpoint(&caption, 1.0)]}});
    let router = router_on(dir.path(), &routes, None, &["--grpc-listen", "127.0.0.1:0"]);
    let addr = router.grpc_addr();
    let mut client = prism_router::grpc::RouterClient::connect(format!("http://{addr}")).await.expect("connect");
    let item = |t: &str| pb::InputItem { item: Some(pb::input_item::Item::Text(t.to_string())) };
    let req = pb::InferRequest {
        inputs: [("text".to_string(), item("a dog")), ("caption".to_string(), item("a puppy"))].into(),
        timeout_ms: 0,
        de_fusion: Some(true),
    };
    let resp = client.infer(req).await.expect("infer").into_inner();
    assert_eq!(resp.pipeline, "g");
    assert_eq!(resp.generation, 4);
    assert_eq!(resp.embedding.expect("fused").values.len(), 384);
    assert_eq!(resp.modalities.len(), 2);
    assert_eq!(resp.modalities["caption"].replica.as_ref().unwrap().node, "minilm-caption");
    let s: f64 = resp.contributions.values().sum();
    assert!((s - 1.0).abs() < 1e-6);
    assert!(resp.degraded.is_none());

    let bad = pb::InferRequest { inputs: [("smell".to_string(), item("x"))].into(), timeout_ms: 0, de_fusion: None };
    let err = client.infer(bad).await.expect_err("unknown modality");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("smell"));
    let empty = pb::InferRequest { inputs: Default::default(), timeout_ms: 0, de_fusion: None };
    assert_eq!(client.infer(empty).await.expect_err("empty").code(), tonic::Code::InvalidArgument);
}
