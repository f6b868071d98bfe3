//! Wire types: JSON bodies exchanged by clients, routers and nodes. The gRPC services in
//! `api/proto/prism/v1` carry the same fields.

pub mod node;
pub mod router;

use serde::{Deserialize, Serialize};

/// Error body of every 4xx/5xx answer from a router or a node:
/// `{"error": {"type": "validation", "message": "..."}}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ErrorDetail {
    /// Machine-readable class: `validation`, `overloaded`, `unavailable`, `timeout`, `not_found`, `unauthorized`, `internal`, ...
    #[serde(rename = "type")]
    pub type_: String,
    /// What went wrong and what to change.
    pub message: String,
}

impl ErrorBody {
    pub fn new(type_: impl Into<String>, message: impl Into<String>) -> Self {
        Self { error: ErrorDetail { type_: type_.into(), message: message.into() } }
    }
}
