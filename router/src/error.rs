//! The one error table of the router: every failure a client can see is a `RouterError`,
//! mapped once to an HTTP status + `{"error":{"type","message"}}` body and once to a gRPC code
//! (TEI's pattern: handlers only use `?`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use prism_api::wire::frontdoor::Refusal;
use prism_api::wire::ErrorBody;
use thiserror::Error;

use crate::fusion::FusionError;

#[derive(Debug, Error)]
pub enum RouterError {
    /// Malformed JSON.
    #[error("invalid JSON body: {0}")]
    InvalidJson(String),
    /// Well-formed but wrong shape, types or values.
    #[error("{0}")]
    Validation(String),
    #[error("unknown modality '{modality}'; this pipeline serves: {known}")]
    UnknownModality { modality: String, known: String },
    #[error("request body is larger than the limit of {limit} bytes (router flag --max-body-bytes)")]
    PayloadTooLarge { limit: usize },
    /// The node request this client request turns into would exceed what nodes accept: refused
    /// here, so the node never closes a connection on the router mid-upload (which would read as
    /// a replica failure).
    #[error(
        "the request to modality '{modality}' would be {bytes} bytes, over the nodes' limit of {limit} bytes \
         (router flag --node-max-body-bytes); split the inputs over several requests"
    )]
    UpstreamTooLarge { modality: String, bytes: usize, limit: usize },
    /// Refused at the front door from the request head alone: 431 or 415.
    #[error("{}", .0.message())]
    FrontDoor(Refusal),
    /// An OpenAI-style request parameter is invalid (400, `type: invalid_request_error`, `param`).
    #[error("{message}")]
    InvalidParam { param: &'static str, message: String },
    /// `model` names no model of this router (404, OpenAI's `code: model_not_found`).
    #[error("the model {model:?} does not exist on this router; valid models: {known}")]
    ModelNotFound { model: String, known: String },
    #[error("missing or invalid bearer token (send `Authorization: Bearer <token>`)")]
    Unauthorized,
    #[error("rate limit exceeded for this client; retry after {retry_after_s} s")]
    RateLimited { retry_after_s: u64 },
    /// A modality node rejected the input itself (its 4xx): the client's input is at fault.
    #[error("node for modality '{modality}' rejected the input: {message}")]
    UpstreamRejected { modality: String, message: String },
    /// Required modalities could not be served and no cached answer applies.
    #[error("{0}")]
    Unavailable(String),
    #[error("deadline of {0} ms exceeded")]
    Timeout(u64),
    /// The client did not finish sending its body in time (slow or stalled upload).
    #[error("request body not received within {secs} s (router flag --body-timeout-s)")]
    BodyTimeout { secs: u64 },
    #[error("routing table generation {offered} is not newer than the current generation {current}")]
    StaleGeneration { offered: u64, current: u64 },
    #[error(transparent)]
    Fusion(#[from] FusionError),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl RouterError {
    /// Machine-readable class (`error.type`), also the `outcome` label: a small, fixed set.
    pub fn kind(&self) -> &'static str {
        match self {
            RouterError::InvalidJson(_) => "invalid_json",
            RouterError::Validation(_) | RouterError::UpstreamRejected { .. } => "validation",
            RouterError::UnknownModality { .. } => "unknown_modality",
            RouterError::PayloadTooLarge { .. } | RouterError::UpstreamTooLarge { .. } => "payload_too_large",
            RouterError::FrontDoor(r) => r.kind(),
            RouterError::InvalidParam { .. } | RouterError::ModelNotFound { .. } => "invalid_request_error",
            RouterError::Unauthorized => "unauthorized",
            RouterError::RateLimited { .. } => "rate_limited",
            RouterError::Unavailable(_) => "unavailable",
            RouterError::Timeout(_) => "timeout",
            RouterError::BodyTimeout { .. } => "request_timeout",
            RouterError::StaleGeneration { .. } => "conflict",
            RouterError::Fusion(FusionError::DimensionMismatch { .. }) => "fusion",
            RouterError::Fusion(_) => "fusion",
            RouterError::NotFound(_) => "not_found",
            RouterError::Internal(_) => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            RouterError::InvalidJson(_) | RouterError::InvalidParam { .. } => StatusCode::BAD_REQUEST,
            RouterError::ModelNotFound { .. } => StatusCode::NOT_FOUND,
            RouterError::UpstreamTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RouterError::FrontDoor(r) => StatusCode::from_u16(r.status()).unwrap_or(StatusCode::BAD_REQUEST),
            RouterError::Validation(_) | RouterError::UnknownModality { .. } | RouterError::UpstreamRejected { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            RouterError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RouterError::Unauthorized => StatusCode::UNAUTHORIZED,
            RouterError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            RouterError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            RouterError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            RouterError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            RouterError::StaleGeneration { .. } => StatusCode::CONFLICT,
            // Encoders disagreeing on dimension is a deployment fault, not the client's.
            RouterError::Fusion(_) => StatusCode::FAILED_DEPENDENCY,
            RouterError::NotFound(_) => StatusCode::NOT_FOUND,
            RouterError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            RouterError::InvalidJson(_)
            | RouterError::Validation(_)
            | RouterError::UnknownModality { .. }
            | RouterError::UpstreamRejected { .. }
            | RouterError::InvalidParam { .. }
            | RouterError::FrontDoor(_) => tonic::Code::InvalidArgument,
            RouterError::ModelNotFound { .. } => tonic::Code::NotFound,
            RouterError::PayloadTooLarge { .. }
            | RouterError::UpstreamTooLarge { .. }
            | RouterError::RateLimited { .. } => tonic::Code::ResourceExhausted,
            RouterError::Unauthorized => tonic::Code::Unauthenticated,
            RouterError::Unavailable(_) => tonic::Code::Unavailable,
            RouterError::Timeout(_) | RouterError::BodyTimeout { .. } => tonic::Code::DeadlineExceeded,
            RouterError::StaleGeneration { .. } => tonic::Code::Aborted,
            RouterError::Fusion(_) => tonic::Code::FailedPrecondition,
            RouterError::NotFound(_) => tonic::Code::NotFound,
            RouterError::Internal(_) => tonic::Code::Internal,
        }
    }

    pub fn body(&self) -> ErrorBody {
        match self {
            RouterError::InvalidParam { param, .. } => {
                ErrorBody::openai(self.kind(), self.to_string(), Some((*param).to_string()), None)
            }
            RouterError::ModelNotFound { .. } => {
                ErrorBody::openai(self.kind(), self.to_string(), Some("model".into()), Some("model_not_found".into()))
            }
            _ => ErrorBody::new(self.kind(), self.to_string()),
        }
    }
}

impl IntoResponse for RouterError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), Json(self.body())).into_response();
        if let RouterError::RateLimited { retry_after_s } = &self {
            if let Ok(v) = axum::http::HeaderValue::from_str(&retry_after_s.to_string()) {
                resp.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        if let RouterError::Unauthorized = &self {
            resp.headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        if let RouterError::PayloadTooLarge { .. } | RouterError::FrontDoor(_) = &self {
            // The rest of the body was not read, so this connection cannot carry another request;
            // saying so stops keep-alive clients from reusing it (they would see a reset instead).
            resp.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
        }
        resp
    }
}

impl From<RouterError> for tonic::Status {
    fn from(e: RouterError) -> Self {
        tonic::Status::new(e.grpc_code(), e.to_string())
    }
}

/// Turn a serde_json error into the right client error: syntax -> 400, shape/type -> 422.
pub fn from_json_error(e: serde_json::Error) -> RouterError {
    match e.classify() {
        serde_json::error::Category::Data => RouterError::Validation(format!("invalid request: {e}")),
        _ => RouterError::InvalidJson(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_client_fault_is_4xx_and_every_outage_5xx() {
        let client = [
            RouterError::InvalidJson("x".into()),
            RouterError::Validation("x".into()),
            RouterError::UnknownModality { modality: "x".into(), known: "text".into() },
            RouterError::PayloadTooLarge { limit: 1 },
            RouterError::Unauthorized,
            RouterError::RateLimited { retry_after_s: 1 },
            RouterError::UpstreamRejected { modality: "t".into(), message: "bad".into() },
            RouterError::StaleGeneration { offered: 1, current: 2 },
            RouterError::UpstreamTooLarge { modality: "t".into(), bytes: 2, limit: 1 },
            RouterError::FrontDoor(Refusal::NotJson { got: None }),
            RouterError::FrontDoor(Refusal::HeadersTooLarge { bytes: 2, limit: 1 }),
            RouterError::InvalidParam { param: "model", message: "x".into() },
            RouterError::ModelNotFound { model: "x".into(), known: "text".into() },
        ];
        for e in client {
            assert!(e.status().is_client_error(), "{e:?}");
            assert_ne!(e.grpc_code(), tonic::Code::Internal);
        }
        for e in [RouterError::Unavailable("x".into()), RouterError::Timeout(5), RouterError::Internal("x".into())] {
            assert!(e.status().is_server_error(), "{e:?}");
        }
    }

    #[test]
    fn model_not_found_has_openais_error_shape() {
        let e = RouterError::ModelNotFound { model: "gpt-4".into(), known: "search, text".into() };
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        let v = serde_json::to_value(e.body()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["message"].as_str().unwrap().contains("search, text"), "{v}");
        assert_eq!(RouterError::FrontDoor(Refusal::NotJson { got: None }).status().as_u16(), 415);
        assert_eq!(RouterError::FrontDoor(Refusal::HeadersTooLarge { bytes: 2, limit: 1 }).status().as_u16(), 431);
    }

    #[test]
    fn a_413_closes_the_connection_whose_body_was_left_unread() {
        let resp = RouterError::PayloadTooLarge { limit: 1 }.into_response();
        assert_eq!(resp.headers().get(axum::http::header::CONNECTION).map(|v| v.as_bytes()), Some(&b"close"[..]));
        let other = RouterError::Validation("x".into()).into_response();
        assert!(other.headers().get(axum::http::header::CONNECTION).is_none(), "keep-alive for the rest");
    }

    #[test]
    fn json_errors_split_syntax_from_shape() {
        let syntax = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
        assert_eq!(from_json_error(syntax).status(), StatusCode::BAD_REQUEST);
        let shape = serde_json::from_str::<Vec<u8>>("\"s\"").unwrap_err();
        assert_eq!(from_json_error(shape).status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
}
