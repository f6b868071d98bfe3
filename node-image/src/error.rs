//! One error type for the request path, mapped once to HTTP and once to gRPC (TEI's error table).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use prism_api::wire::ErrorBody;

use crate::backend::BackendError;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Malformed JSON, empty or too many inputs, wrong modality: the client must change the request.
    #[error("{0}")]
    Validation(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The queue is full: retry elsewhere or later (HTTP 429 / RESOURCE_EXHAUSTED).
    #[error("{0}")]
    Overloaded(String),
    /// The request's deadline passed before it was served; it was dropped from the queue.
    #[error("deadline of {0} ms exceeded before the request was served")]
    Timeout(u64),
    /// Not ready yet (model loading/warming) or shutting down.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Inference(String),
}

impl NodeError {
    /// The `err` label of `prism_node_request_failures_total` and the `type` of the JSON error:
    /// a small fixed set so dashboards and the router can match on it.
    pub fn kind(&self) -> &'static str {
        match self {
            NodeError::Validation(_) => "validation",
            NodeError::PayloadTooLarge(_) => "payload_too_large",
            NodeError::Overloaded(_) => "overloaded",
            NodeError::Timeout(_) => "timeout",
            NodeError::Unavailable(_) => "unavailable",
            NodeError::Inference(_) => "inference",
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            NodeError::Validation(_) => StatusCode::BAD_REQUEST,
            NodeError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            NodeError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            NodeError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            NodeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            NodeError::Inference(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn grpc_status(&self) -> tonic::Status {
        let msg = self.to_string();
        match self {
            NodeError::Validation(_) | NodeError::PayloadTooLarge(_) => tonic::Status::invalid_argument(msg),
            NodeError::Overloaded(_) => tonic::Status::resource_exhausted(msg),
            NodeError::Timeout(_) => tonic::Status::deadline_exceeded(msg),
            NodeError::Unavailable(_) => tonic::Status::unavailable(msg),
            NodeError::Inference(_) => tonic::Status::internal(msg),
        }
    }
}

impl From<BackendError> for NodeError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Validation(m) => NodeError::Validation(m),
            other => NodeError::Inference(other.to_string()),
        }
    }
}

impl IntoResponse for NodeError {
    fn into_response(self) -> Response {
        (self.http_status(), Json(ErrorBody::new(self.kind(), self.to_string()))).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one error table: every kind maps to the HTTP status and gRPC code clients and the router
    /// rely on (429/RESOURCE_EXHAUSTED is what makes a router retry elsewhere).
    #[test]
    fn error_table_maps_both_transports() {
        let cases = [
            (NodeError::Validation("x".into()), "validation", 400, tonic::Code::InvalidArgument),
            (NodeError::PayloadTooLarge("x".into()), "payload_too_large", 413, tonic::Code::InvalidArgument),
            (NodeError::Overloaded("x".into()), "overloaded", 429, tonic::Code::ResourceExhausted),
            (NodeError::Timeout(5), "timeout", 504, tonic::Code::DeadlineExceeded),
            (NodeError::Unavailable("x".into()), "unavailable", 503, tonic::Code::Unavailable),
            (NodeError::Inference("x".into()), "inference", 500, tonic::Code::Internal),
        ];
        for (e, kind, http, grpc) in cases {
            assert_eq!(e.kind(), kind);
            assert_eq!(e.http_status().as_u16(), http, "{kind}");
            assert_eq!(e.grpc_status().code(), grpc, "{kind}");
        }
    }

    #[test]
    fn backend_validation_stays_a_client_error() {
        assert_eq!(NodeError::from(BackendError::Validation("bad".into())).kind(), "validation");
        assert_eq!(NodeError::from(BackendError::Inference("oops".into())).kind(), "inference");
    }
}
