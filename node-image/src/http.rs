//! HTTP/JSON transport: `POST /embed`, `GET /info`, `/live`, `/ready`, `/metrics`.
//! Handlers are thin: parse, call [`Infer`], map [`NodeError`] (one table for both transports).
//!
//! Front door (the same rules as the router's, `prism_api::wire::frontdoor`): URL plus headers
//! over 16 KiB get a JSON 431, a POST without `Content-Type: application/json` a JSON 415 (a
//! browser page cannot send one without a CORS preflight, which this port never grants), a body
//! over `--max-body-bytes` a JSON 413, and a body that is not a JSON object a 400.

use std::sync::{Arc, OnceLock};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use prism_api::wire::frontdoor;
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
            max_batch_tokens: Some(infer.config.max_batch_tokens),
            labels: infer.info.classifier.as_ref().map(|c| c.labels.clone()),
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
        // The handler enforces `max_body_bytes` itself (draining over-limit bodies so the client
        // reads the 413); this outer bound only stops a body from being read for ever.
        .layer(DefaultBodyLimit::max(max_body_bytes.max(DRAIN_CAP_BYTES as usize)))
        .layer(middleware::from_fn_with_state(state.clone(), front_door))
        .with_state(state)
}

/// Header size (431) and JSON-only bodies (415), before any handler runs.
async fn front_door(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    let headers = req.headers().iter().map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
    let ctype = req.headers().get(header::CONTENT_TYPE).map(HeaderValue::as_bytes);
    if let Err(refusal) = frontdoor::check_head(req.method().as_str(), target, headers, ctype) {
        st.metrics.fail(refusal.kind());
        let status = StatusCode::from_u16(refusal.status()).unwrap_or(StatusCode::BAD_REQUEST);
        let mut resp = (status, Json(refusal.body())).into_response();
        // The body was not read: this connection cannot carry another request.
        resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    next.run(req).await
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
    let labels = infer.info.classifier.as_ref().map(|c| out.embeddings.iter().map(|v| c.classify(v)).collect());
    Ok(EmbedResponse {
        labels,
        embeddings: out.embeddings,
        node: st.id.node.clone(),
        modality: st.id.modality.clone(),
        revision: st.id.revision.clone(),
        timings: out.timings,
        prompt_tokens: out.prompt_tokens,
    })
}

/// Most bytes of an over-limit body read and thrown away before the 413 is sent (clients that
/// write the whole body before reading would otherwise see a broken pipe, not the 413).
const DRAIN_CAP_BYTES: u64 = 64 * 1024 * 1024;

/// Reads the body up to `limit` bytes. Over the limit: 413. A declared Content-Length over the
/// limit is answered at once while the body is drained in the background (up to
/// [`DRAIN_CAP_BYTES`], beyond which it is not read at all); a streamed body is drained first.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, NodeError> {
    use http_body_util::BodyExt;
    let too_large = || {
        NodeError::PayloadTooLarge(format!(
            "request body larger than {limit} bytes (--max-body-bytes); split the inputs over several requests"
        ))
    };
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > (limit as u64).max(DRAIN_CAP_BYTES)) {
        return Err(too_large());
    }
    if declared.is_some_and(|n| n > limit as u64) {
        // Answer at once, and read the rest in the background so the connection is not reset
        // under a client that writes its whole body before reading (it then reads the 413).
        tokio::spawn(async move {
            use http_body_util::BodyExt;
            let mut body = body;
            let drain = async { while let Some(Ok(_)) = body.frame().await {} };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), drain).await;
        });
        return Err(too_large());
    }
    let mut body = body;
    let mut buf: Vec<u8> = Vec::new();
    let mut seen = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) {
                too_large()
            } else {
                NodeError::Validation(format!("reading request body: {e}"))
            }
        })?;
        let Ok(data) = frame.into_data() else { continue };
        seen = seen.saturating_add(data.len() as u64);
        if seen <= limit as u64 {
            buf.extend_from_slice(&data);
        } else if seen > DRAIN_CAP_BYTES {
            break;
        } else if !buf.is_empty() {
            buf = Vec::new();
        }
    }
    if seen > limit as u64 {
        return Err(too_large());
    }
    Ok(Bytes::from(buf))
}

fn parse(bytes: &[u8]) -> Result<EmbedRequest, NodeError> {
    frontdoor::require_object(bytes).map_err(|m| {
        NodeError::Validation(format!(
            "{m}: {{\"inputs\": [\"text\", {{\"text\": \"...\"}}, ...], \"deadline_ms\": 1000}}"
        ))
    })?;
    serde_json::from_slice::<EmbedRequest>(bytes).map_err(|e| {
        NodeError::Validation(format!(
            "invalid JSON body: {e}; expected {{\"inputs\": [\"text\", {{\"text\": \"...\"}}, ...], \"deadline_ms\": 1000}}"
        ))
    })
}
