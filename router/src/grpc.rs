//! gRPC front door (tonic): `prism.v1.Router/Infer`, the same engine and error table as HTTP,
//! and on the same port `inference.GRPCInferenceService` (the Open Inference Protocol, see
//! [`crate::oip_grpc`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine as _;
use prism_api::wire::node::{EmbedInput, InputItem as WireItem};
use prism_api::wire::router as wire;
use tonic::{Request, Response, Status};

use crate::engine::Router;
use crate::error::RouterError;

/// Generated from api/proto/prism/v1/router.proto (+ node.proto, which it imports).
pub mod pb {
    tonic::include_proto!("prism.v1");
}

pub use pb::router_client::RouterClient;
pub use pb::router_server::RouterServer;

/// The service: a thin adapter over [`Router`] (linkerd's `InboundPolicyServer` shape).
pub struct GrpcRouter {
    router: Arc<Router>,
    tokens: Arc<Vec<String>>,
}

impl GrpcRouter {
    pub fn new(router: Arc<Router>, tokens: Vec<String>) -> Self {
        Self { router, tokens: Arc::new(tokens) }
    }

    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        crate::auth::authorize_grpc(&self.tokens, req)
    }
}

fn to_wire_input(modality: &str, item: pb::InputItem) -> Result<EmbedInput, RouterError> {
    use pb::input_item::Item;
    let b64 = |b: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(b);
    match item.item {
        Some(Item::Text(t)) => Ok(EmbedInput::Text(t)),
        Some(Item::Image(b)) => Ok(EmbedInput::Item(WireItem { image_base64: Some(b64(b)), ..Default::default() })),
        Some(Item::Audio(b)) => Ok(EmbedInput::Item(WireItem { audio_base64: Some(b64(b)), ..Default::default() })),
        Some(Item::Embeddings(m)) => Ok(EmbedInput::Item(WireItem {
            embeddings: Some(m.embeddings.into_iter().map(|(k, v)| (k, v.values)).collect()),
            ..Default::default()
        })),
        None => Err(RouterError::Validation(format!("input for modality '{modality}' is empty"))),
    }
}

fn replica(r: wire::ReplicaRef) -> pb::Replica {
    pb::Replica { node: r.node, endpoint: r.endpoint, revision: r.revision }
}

fn to_pb(r: wire::InferResponse) -> pb::InferResponse {
    pb::InferResponse {
        id: r.id,
        pipeline: r.pipeline,
        generation: r.generation,
        strategy: r.strategy,
        embedding: r.embedding.map(|values| pb::Vector { values }),
        modalities: r
            .modalities
            .into_iter()
            .map(|(m, x)| {
                (
                    m,
                    pb::ModalityResult {
                        embedding: Some(pb::Vector { values: x.embedding }),
                        replica: Some(replica(x.replica)),
                        weight: x.weight,
                        attempts: x.attempts,
                        latency_ms: x.latency_ms,
                        labels: scored(x.labels),
                    },
                )
            })
            .collect(),
        contributions: r.contributions.unwrap_or_default().into_iter().collect(),
        fusion_replica: r.fusion_replica.map(replica),
        timings: Some(pb::RouterTimings {
            route_ms: r.timings.route_ms,
            fanout_ms: r.timings.fanout_ms,
            fuse_ms: r.timings.fuse_ms,
            total_ms: r.timings.total_ms,
        }),
        degraded: r.degraded.map(|d| pb::Degraded { missing: d.missing, reason: d.reason, cached: d.cached }),
        labels: scored(r.labels),
    }
}

fn scored(labels: Option<Vec<prism_api::wire::node::ScoredLabel>>) -> Vec<pb::ScoredLabel> {
    labels.unwrap_or_default().into_iter().map(|l| pb::ScoredLabel { label: l.label, score: l.score }).collect()
}

#[tonic::async_trait]
impl pb::router_server::Router for GrpcRouter {
    async fn infer(&self, request: Request<pb::InferRequest>) -> Result<Response<pb::InferResponse>, Status> {
        self.authorize(&request)?;
        let id = request
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty() && s.len() <= 128)
            .map(str::to_string)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let req = request.into_inner();
        let mut inputs = BTreeMap::new();
        for (m, item) in req.inputs {
            let input = to_wire_input(&m, item)?;
            inputs.insert(m, input);
        }
        let wreq = wire::InferRequest {
            inputs,
            timeout_ms: (req.timeout_ms > 0).then_some(req.timeout_ms),
            de_fusion: req.de_fusion,
        };
        let resp = self.router.infer(wreq, &id).await?;
        let mut out = Response::new(to_pb(resp));
        if let Ok(v) = id.parse() {
            out.metadata_mut().insert("x-request-id", v);
        }
        Ok(out)
    }
}

/// Bind `addr` and return the bound address plus the server future (the caller spawns it).
pub async fn serve(
    router: Arc<Router>,
    addr: SocketAddr,
    tokens: Vec<String>,
) -> std::io::Result<(SocketAddr, impl Future<Output = Result<(), tonic::transport::Error>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let svc = RouterServer::new(GrpcRouter::new(router.clone(), tokens.clone()));
    // The Open Inference Protocol's service on the same port (KServe / Triton gRPC clients).
    let oip = crate::oip_grpc::GrpcInferenceServiceServer::new(crate::oip_grpc::OipGrpc::new(
        crate::oip::Oip::new(router),
        tokens,
    ));
    // Dead peers are found by HTTP/2 pings instead of holding streams for ever.
    let fut = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .add_service(svc)
        .add_service(oip)
        .serve_with_incoming(incoming);
    Ok((bound, fut))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(value: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        if let Some(v) = value {
            req.metadata_mut().insert("authorization", v.parse().unwrap());
        }
        req
    }

    #[test]
    fn bearer_tokens_gate_both_grpc_services() {
        let tokens = vec!["s3cret".to_string(), "other".to_string()];
        assert!(crate::auth::authorize_grpc(&tokens, &with_auth(Some("Bearer s3cret"))).is_ok());
        assert!(crate::auth::authorize_grpc(&tokens, &with_auth(Some("bearer other"))).is_ok());
        for bad in [None, Some("Bearer s3cre"), Some("Bearer s3cret2"), Some("s3cret"), Some("Bearer ")] {
            let err = crate::auth::authorize_grpc(&tokens, &with_auth(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert!(crate::auth::authorize_grpc(&[], &with_auth(None)).is_ok(), "no tokens configured admits all");
    }

    #[test]
    fn labels_reach_grpc_clients_per_modality_and_mixed() {
        let label = |l: &str, s: f32| prism_api::wire::node::ScoredLabel { label: l.into(), score: s };
        let resp: wire::InferResponse = serde_json::from_value(serde_json::json!({
            "id": "r", "pipeline": "p", "generation": 1, "strategy": "late",
            "modalities": {"image": {"embedding": [1.0], "replica": {"node": "n", "endpoint": "e", "revision": "1"},
                                     "weight": 1.0, "attempts": 1, "latency_ms": 1.0,
                                     "labels": [{"label": "3", "score": 0.6}, {"label": "8", "score": 0.4}]}},
            "labels": [{"label": "3", "score": 0.6}, {"label": "8", "score": 0.4}],
            "timings": {"route_ms": 0.0, "fanout_ms": 0.0, "fuse_ms": 0.0, "total_ms": 0.0}
        }))
        .unwrap();
        let want = scored(Some(vec![label("3", 0.6), label("8", 0.4)]));
        let pb = to_pb(resp);
        assert_eq!(pb.modalities["image"].labels, want);
        assert_eq!(pb.labels, want);
        assert_eq!(want[0], pb::ScoredLabel { label: "3".into(), score: 0.6 });
    }
}
