//! Wire types: JSON bodies exchanged by clients, routers and nodes. The gRPC services in
//! `api/proto/prism/v1` carry the same fields.

pub mod frontdoor;
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
    /// The request field at fault (OpenAI's `param`), when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    /// A finer machine-readable code (OpenAI's `code`, e.g. `model_not_found`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl ErrorBody {
    pub fn new(type_: impl Into<String>, message: impl Into<String>) -> Self {
        Self { error: ErrorDetail { type_: type_.into(), message: message.into(), param: None, code: None } }
    }

    /// OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`.
    pub fn openai(
        type_: impl Into<String>,
        message: impl Into<String>,
        param: Option<String>,
        code: Option<String>,
    ) -> Self {
        Self { error: ErrorDetail { type_: type_.into(), message: message.into(), param, code } }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_without_param_and_code_keeps_its_old_shape() {
        let v = serde_json::to_value(ErrorBody::new("validation", "bad")).unwrap();
        assert_eq!(v, serde_json::json!({"error": {"type": "validation", "message": "bad"}}));
        // Old bodies (no param/code) still parse.
        let b: ErrorBody = serde_json::from_str(r#"{"error":{"type":"x","message":"y"}}"#).unwrap();
        assert_eq!(b.error.code, None);
        let v =
            serde_json::to_value(ErrorBody::openai("invalid_request_error", "m", Some("model".into()), None)).unwrap();
        assert_eq!(v["error"]["param"], "model");
    }
}
