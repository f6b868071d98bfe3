//! Bearer tokens, one rule for every front door (HTTP, `prism.v1.Router` and the Open Inference
//! Protocol over gRPC): no tokens configured admits all; otherwise every token is compared in
//! constant time, with no early exit, so timing reveals neither how much of a guess matched nor
//! which token was close.

use subtle::ConstantTimeEq;
use tonic::{Request, Status};

use crate::error::RouterError;

/// The token of an `Authorization` header value (`Bearer T` or `bearer T`).
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    authorization.and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer "))).map(str::trim)
}

/// Which configured token `presented` is (its index), if any.
pub fn matching_token(tokens: &[String], presented: &str) -> Option<usize> {
    let mut hit = None;
    for (i, t) in tokens.iter().enumerate() {
        if bool::from(t.as_bytes().ct_eq(presented.as_bytes())) {
            hit = Some(i);
        }
    }
    hit
}

/// The rule for a gRPC request.
pub(crate) fn authorize_grpc<T>(tokens: &[String], req: &Request<T>) -> Result<(), Status> {
    if tokens.is_empty() {
        return Ok(());
    }
    let header = req.metadata().get("authorization").and_then(|v| v.to_str().ok());
    match bearer(header).and_then(|b| matching_token(tokens, b)) {
        Some(_) => Ok(()),
        None => Err(RouterError::Unauthorized.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_configured_token_after_bearer_is_admitted() {
        let tokens = vec!["alpha".to_string(), "beta".to_string()];
        assert_eq!(bearer(Some("Bearer beta ")), Some("beta"));
        assert_eq!(bearer(Some("Basic beta")), None);
        assert_eq!(matching_token(&tokens, "beta"), Some(1));
        assert_eq!(matching_token(&tokens, "bet"), None, "a prefix is not a token");
        let mut req = Request::new(());
        assert!(authorize_grpc(&tokens, &req).is_err(), "no header");
        req.metadata_mut().insert("authorization", "bearer alpha".parse().unwrap());
        assert!(authorize_grpc(&tokens, &req).is_ok());
        assert!(authorize_grpc(&[], &Request::new(())).is_ok(), "no tokens configured admits all");
    }
}
