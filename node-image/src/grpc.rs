//! gRPC transport (`prism.v1.Node`): the same [`Infer`] path and error table as HTTP.

use std::time::Duration;

use base64::Engine as _;
use prism_api::wire::node::{EmbedInput, InputItem};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::error::NodeError;
use crate::http::AppState;
use crate::infer::request_span;
use crate::pb;

pub struct NodeService {
    pub state: AppState,
}

impl NodeService {
    pub fn server(state: AppState) -> pb::node_server::NodeServer<Self> {
        pb::node_server::NodeServer::new(Self { state })
    }
}

/// Converts a proto input to the JSON wire form that preprocessors take, so every model has one
/// preprocessing path whatever the transport.
fn to_input(i: usize, item: pb::InputItem) -> Result<EmbedInput, NodeError> {
    let b64 = |b: Vec<u8>| base64::engine::general_purpose::STANDARD.encode(b);
    match item.item {
        Some(pb::input_item::Item::Text(t)) => Ok(EmbedInput::Text(t)),
        Some(pb::input_item::Item::Image(b)) => {
            Ok(EmbedInput::Item(InputItem { image_base64: Some(b64(b)), ..Default::default() }))
        }
        Some(pb::input_item::Item::Audio(b)) => {
            Ok(EmbedInput::Item(InputItem { audio_base64: Some(b64(b)), ..Default::default() }))
        }
        Some(pb::input_item::Item::Embeddings(m)) => Ok(EmbedInput::Item(InputItem {
            embeddings: Some(m.embeddings.into_iter().map(|(k, v)| (k, v.values)).collect()),
            ..Default::default()
        })),
        None => Err(NodeError::Validation(format!("inputs[{i}]: no field of the `item` oneof is set"))),
    }
}

/// Parses the `grpc-timeout` header (e.g. `250m`, `3S`) so a client's gRPC deadline becomes the
/// request's queue deadline.
fn grpc_timeout<T>(req: &Request<T>) -> Option<Duration> {
    let v = req.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[tonic::async_trait]
impl pb::node_server::Node for NodeService {
    async fn embed(&self, request: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        let request_id = request
            .metadata()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let header_deadline = grpc_timeout(&request).map(|d| d.as_millis() as u64);
        let req = request.into_inner();
        let body_deadline = (req.deadline_ms > 0).then_some(req.deadline_ms);
        let deadline_ms = match (header_deadline, body_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let st = &self.state;
        async move {
            let pre = || -> Result<_, NodeError> {
                let inputs =
                    req.inputs.into_iter().enumerate().map(|(i, it)| to_input(i, it)).collect::<Result<Vec<_>, _>>()?;
                Ok((inputs, st.infer()?))
            };
            let (inputs, infer) = pre().map_err(|e| {
                st.metrics.fail(e.kind());
                e.grpc_status()
            })?;
            let out = infer.embed(&inputs, deadline_ms).await.map_err(|e| e.grpc_status())?;
            Ok(Response::new(pb::EmbedResponse {
                embeddings: out.embeddings.into_iter().map(|values| pb::Vector { values }).collect(),
                node: st.id.node.clone(),
                modality: st.id.modality.clone(),
                revision: st.id.revision.clone(),
                timings: Some(pb::NodeTimings {
                    queue_ms: out.timings.queue_ms,
                    preprocess_ms: out.timings.preprocess_ms,
                    inference_ms: out.timings.inference_ms,
                    batch_size: out.timings.batch_size as u32,
                }),
            }))
        }
        .instrument(request_span(&request_id, "grpc"))
        .await
    }

    async fn info(&self, _request: Request<pb::InfoRequest>) -> Result<Response<pb::NodeInfo>, Status> {
        let i = self.state.info().map_err(|e| e.grpc_status())?;
        Ok(Response::new(pb::NodeInfo {
            node: i.node,
            modality: i.modality,
            architecture: i.architecture,
            revision: i.revision,
            dim: i.dim as u32,
            device: i.device,
            max_batch: i.max_batch as u32,
            max_input_tokens: i.max_input_tokens.unwrap_or(0) as u32,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut().insert("grpc-timeout", v.parse().expect("ascii"));
        r
    }

    #[test]
    fn parses_grpc_timeout_units() {
        assert_eq!(grpc_timeout(&req("250m")), Some(Duration::from_millis(250)));
        assert_eq!(grpc_timeout(&req("3S")), Some(Duration::from_secs(3)));
        assert_eq!(grpc_timeout(&req("2M")), Some(Duration::from_secs(120)));
        assert_eq!(grpc_timeout(&req("1500u")), Some(Duration::from_micros(1500)));
        assert_eq!(grpc_timeout(&req("oops")), None);
        assert_eq!(grpc_timeout(&req("")), None);
        assert_eq!(grpc_timeout(&Request::new(())), None);
    }

    #[test]
    fn proto_inputs_convert_and_empty_oneof_is_rejected() {
        let t = to_input(0, pb::InputItem { item: Some(pb::input_item::Item::Text("hi".into())) });
        assert!(matches!(t, Ok(EmbedInput::Text(ref s)) if s == "hi"));
        let img = to_input(0, pb::InputItem { item: Some(pb::input_item::Item::Image(vec![1, 2, 3])) });
        assert!(matches!(img, Ok(EmbedInput::Item(ref i)) if i.image_base64.as_deref() == Some("AQID")));
        assert!(
            matches!(to_input(3, pb::InputItem { item: None }), Err(NodeError::Validation(m)) if m.contains("inputs[3]"))
        );
    }
}
