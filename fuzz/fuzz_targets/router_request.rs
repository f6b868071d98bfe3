//! Router request parsing: the bytes of a request through the same serde types, front-door checks
//! and validation the router runs, against a fixed routing table. Must never panic.
//! Covers `/v1/infer`, `/v1/embeddings` (OpenAI: `model`, `encoding_format`, `dimensions`),
//! `/v1/models/{id}`, the front door (header limit, JSON-only, objects only) and the CORS flag,
//! and the Open Inference Protocol v2 routes: `/v2/models/{name}[/ready]` model names and
//! `/v2/models/{name}/infer` bodies (JSON and the binary tensor extension) through tensor
//! decoding and the per-modality conversion (text, image bytes and pixels, audio samples).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prism_api::routing::RoutingTable;
use prism_api::wire::frontdoor;
use prism_api::wire::router::{EmbeddingsRequest, InferRequest};
use prism_router::engine::Snapshot;
use prism_router::{oip, openai};

fn snapshot() -> &'static Snapshot {
    static SNAP: OnceLock<Snapshot> = OnceLock::new();
    SNAP.get_or_init(|| {
        let table: RoutingTable = serde_json::from_str(
            r#"{"pipeline":"p","generation":1,"modalities":{"text":[{"endpoint":"http://127.0.0.1:9","node":"t","revision":"1","weight":1.0,"accuracy":0.9,"ready":true}],"vision":[],"fused":[{"endpoint":"http://127.0.0.1:8","node":"f","revision":"1","weight":1.0,"accuracy":0.9,"ready":true}]}}"#,
        )
        .expect("fixed table");
        let spec: prism_api::MultimodalPipelineSpec =
            serde_json::from_str(r#"{"nodes":[{"name":"t"},{"name":"v"},{"name":"f","role":"fusion"}]}"#)
                .expect("fixed spec");
        Snapshot::new("p".into(), table, spec)
    })
}

fuzz_target!(|data: &[u8]| {
    let snap = snapshot();
    // Front door: the first byte picks a method, the rest is split into a header value and a body.
    if let Some((&sel, rest)) = data.split_first() {
        let method = ["GET", "POST", "PUT", "OPTIONS"][usize::from(sel % 4)];
        let cut = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let (value, _) = rest.split_at(cut);
        let _ = frontdoor::check_head(method, rest.len(), [(&b"x-h"[..], value)], Some(value));
        let _ = frontdoor::is_json_content_type(value);
        let _ = frontdoor::check_head_with(method, rest.len(), [(&b"x-h"[..], value)], Some(value), sel & 4 != 0);
        if let Ok(p) = std::str::from_utf8(value) {
            let _ = oip::is_infer_path(p);
        }
    }
    // /v2/models/{name}/infer: the first byte's low bits pick JSON or the binary extension (the
    // JSON header length from the next two bytes), then every input is decoded and converted
    // for each kind of modality, as the handler does before any node is called.
    if let Some((&sel, rest)) = data.split_first() {
        let header = (sel & 1 == 1 && rest.len() >= 2).then(|| usize::from(u16::from_le_bytes([rest[0], rest[1]])).to_string());
        let body = if header.is_some() { &rest[2..] } else { rest };
        if let Ok(req) = oip::parse_http(body, header.as_deref()) {
            let _ = req.outputs.binary("p");
            for raw in req.inputs {
                if let Ok(t) = oip::decode(raw) {
                    for kind in [oip::Kind::Text, oip::Kind::Image, oip::Kind::Audio] {
                        let _ = oip::to_node_inputs(&t, kind);
                    }
                }
            }
        }
    }
    let object = frontdoor::require_object(data).is_ok();

    if let Ok(req) = serde_json::from_slice::<InferRequest>(data) {
        let _ = prism_router::plan::validate_modalities(req.inputs.keys(), &snap.configs);
        let _ = serde_json::to_vec(&req);
    }
    let _ = serde_json::from_slice::<EmbeddingsRequest>(data).map(|r| r.input.into_vec());
    // /v1/embeddings as the handler runs it (only for objects, as there).
    if object {
        if let Ok(e) = openai::parse_embeddings(data, 2048) {
            let _ = openai::resolve_model(snap, e.model.as_deref());
            if let Some(d) = e.dimensions {
                let mut v: Vec<f32> = (0..384).map(|i| (i as f32).sin()).collect();
                if openai::shorten(&mut v, d).is_ok() {
                    assert_eq!(v.len(), d.min(384));
                }
            }
            let _ = openai::encode(vec![0.5, -1.0, f32::NAN], e.encoding);
        }
    }
    // /v1/models/{id} and --cors-allow-origin take arbitrary text.
    if let Ok(s) = std::str::from_utf8(data) {
        if openai::check_model_name(s).is_ok() {
            let _ = openai::resolve_model(snap, Some(s));
        }
        let _ = frontdoor::clip(s, 100);
        let _ = oip::resolve(snap, s, "");
        let _ = prism_router::http::parse_cors_origin(s);
    }
    let _ = serde_json::from_slice::<RoutingTable>(data);
});
