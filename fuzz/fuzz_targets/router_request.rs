//! Router request parsing: the bytes of a POST body through the same serde types and modality
//! validation the router runs, against a fixed routing table. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prism_api::routing::RoutingTable;
use prism_api::wire::router::{EmbeddingsRequest, InferRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<InferRequest>(data) {
        let table: RoutingTable = serde_json::from_str(
            r#"{"pipeline":"p","generation":1,"modalities":{"text":[{"endpoint":"http://127.0.0.1:9","node":"t","revision":"1","weight":1.0,"accuracy":0.9,"ready":true}],"vision":[]}}"#,
        )
        .expect("fixed table");
        let spec: prism_api::MultimodalPipelineSpec =
            serde_json::from_str(r#"{"nodes":[{"name":"t"},{"name":"v"}]}"#).expect("fixed spec");
        let configs = prism_router::plan::modality_configs(&spec, &table);
        let _ = prism_router::plan::validate_modalities(req.inputs.keys(), &configs);
        let _ = serde_json::to_vec(&req);
    }
    let _ = serde_json::from_slice::<EmbeddingsRequest>(data).map(|r| r.input.into_vec());
    let _ = serde_json::from_slice::<RoutingTable>(data);
});
