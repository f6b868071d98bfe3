//! HTTP/JSON transport: `POST /embed`, `GET /info`, `/live`, `/ready`, `/metrics`.
//! Handlers are thin: parse, call [`Infer`], map [`NodeError`] (one table for both transports).

use std::sync::{Arc, OnceLock};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prism_api::wire::node::{EmbedRequest, EmbedResponse, NodeInfo};
use tracing::Instrument;

use crate::error::NodeError;
use crate::infer::{request_span, Infer};
use crate::metrics::Metrics;

/// Identity of this node, known before the model is loaded.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub node: String,
    pub modality: String,
    pub architecture: String,
    pub revision: String,
}

#[derive(Clone)]
pub struct AppState {
    /// Set once the model is loaded and warmed; `/ready` is exactly "this is set".
    pub infer: Arc<OnceLock<Infer>>,
    pub metrics: Metrics,
    pub id: Arc<NodeIdentity>,
    /// Largest accepted request body (`--max-body-bytes`).
    pub max_body_bytes: usize,
}

impl AppState {
    pub fn infer(&self) -> Result<&Infer, NodeError> {
        self.infer.get().ok_or_else(|| NodeError::Unavailable("model is loading or warming up; poll /ready".into()))
    }

    pub fn info(&self) -> Result<NodeInfo, NodeError> {
        let infer = self.infer()?;
        Ok(NodeInfo {
            node: self.id.node.clone(),
            modality: self.id.modality.clone(),
            architecture: self.id.architecture.clone(),
            revision: self.id.revision.clone(),
            dim: infer.info.dim,
            device: infer.info.device.clone(),
            max_batch: infer.config.max_batch,
            max_input_tokens: infer.info.max_input_tokens,
        })
    }
}

pub fn router(state: AppState) -> Router {
    let max_body_bytes = state.max_body_bytes;
    Router::new()
        .route("/embed", post(embed))
        .route("/info", get(info))
        .route("/live", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

async fn ready(State(st): State<AppState>) -> Response {
    match st.infer.get() {
        Some(_) => (StatusCode::OK, "ready").into_response(),
        None => NodeError::Unavailable("model is loading or warming up".into()).into_response(),
    }
}

async fn info(State(st): State<AppState>) -> Result<Json<NodeInfo>, NodeError> {
    st.info().map(Json)
}

async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render())
}

async fn embed(State(st): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let span = request_span(&request_id, "http");
    let result = embed_inner(&st, &headers, body).instrument(span).await;
    let mut resp = match result {
        Ok(r) => {
            let t = r.timings.clone();
            let mut resp = Json(r).into_response();
            // Per-stage times as headers too (TEI's x-*-time), so callers need not parse the body.
            let h = resp.headers_mut();
            for (k, v) in [
                ("x-queue-time", t.queue_ms),
                ("x-preprocess-time", t.preprocess_ms),
                ("x-inference-time", t.inference_ms),
            ] {
                if let Ok(v) = HeaderValue::from_str(&format!("{v:.3}")) {
                    h.insert(k, v);
                }
            }
            resp
        }
        Err(e) => {
            tracing::debug!(request_id = %request_id, error = %e, "embed failed");
            e.into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn embed_inner(st: &AppState, headers: &HeaderMap, body: Body) -> Result<EmbedResponse, NodeError> {
    // Errors before the request reaches `Infer` are counted here; `Infer::embed` counts its own.
    let parsed = match read_body(headers, body, st.max_body_bytes).await {
        Ok(bytes) => parse(&bytes),
        Err(e) => Err(e),
    };
    let req = match parsed {
        Ok(r) => r,
        Err(e) => {
            st.metrics.fail(e.kind());
            return Err(e);
        }
    };
    let infer = match st.infer() {
        Ok(i) => i,
        Err(e) => {
            st.metrics.fail(e.kind());
            return Err(e);
        }
    };
    let out = infer.embed(&req.inputs, req.deadline_ms).await?;
    Ok(EmbedResponse {
        embeddings: out.embeddings,
        node: st.id.node.clone(),
        modality: st.id.modality.clone(),
        revision: st.id.revision.clone(),
        timings: out.timings,
    })
}

/// Reads the body up to `limit` bytes. A declared Content-Length over the limit is refused before
/// reading anything, so the client gets the 413 instead of a reset while it is still uploading.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, NodeError> {
    let too_large = || {
        NodeError::PayloadTooLarge(format!(
            "request body larger than {limit} bytes (--max-body-bytes); split the inputs over several requests"
        ))
    };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) {
            too_large()
        } else {
            NodeError::Validation(format!("reading request body: {e}"))
        }
    })
}

fn parse(bytes: &[u8]) -> Result<EmbedRequest, NodeError> {
    serde_json::from_slice::<EmbedRequest>(bytes).map_err(|e| {
        NodeError::Validation(format!(
            "invalid JSON body: {e}; expected {{\"inputs\": [\"text\", {{\"text\": \"...\"}}, ...], \"deadline_ms\": 1000}}"
        ))
    })
}
