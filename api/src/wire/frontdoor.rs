//! Rules every HTTP front door of Prism enforces before it reads a request's meaning (the router's
//! port and each node's own port alike): JSON only, headers within a limit, a body that is a JSON
//! object. Pure functions over bytes so both servers (and the fuzz targets) share one definition.
//!
//! Why JSON only: a browser sends `text/plain`, `application/x-www-form-urlencoded` and
//! `multipart/form-data` POSTs cross-site without asking (no CORS preflight), so any web page a
//! user visits could otherwise drive a server on their loopback. `application/json` always needs a
//! preflight, which the server answers only for origins it was told to trust.

/// Most bytes of request line target plus headers (each header counted as name + value + 4 for
/// `": "` and CRLF). Over it: 431. nginx's default large-header buffers are 4 x 8 KiB; common
/// clients send under 2 KiB.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Default largest request body of a node (`prism-node --max-body-bytes`) and so of the router,
/// which must never accept a body its nodes would refuse.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Why a request is refused at the front door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 431: headers (and target) larger than [`MAX_HEADER_BYTES`].
    HeadersTooLarge { bytes: usize, limit: usize },
    /// 415: a body-carrying method without `Content-Type: application/json`.
    NotJson { got: Option<String> },
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::HeadersTooLarge { .. } => 431,
            Refusal::NotJson { .. } => 415,
        }
    }

    /// `error.type` of the JSON error body.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::HeadersTooLarge { .. } => "headers_too_large",
            Refusal::NotJson { .. } => "unsupported_media_type",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Refusal::HeadersTooLarge { bytes, limit } => {
                format!("request headers are {bytes} bytes; the limit is {limit} bytes (URL and headers together)")
            }
            Refusal::NotJson { got: None } => {
                "request bodies must be JSON: send `Content-Type: application/json`".to_string()
            }
            Refusal::NotJson { got: Some(t) } => {
                format!("request bodies must be JSON: send `Content-Type: application/json`, not {:?}", clip(t, 100))
            }
        }
    }

    pub fn body(&self) -> super::ErrorBody {
        super::ErrorBody::new(self.kind(), self.message())
    }
}

/// Whether a `Content-Type` value is JSON: `application/json`, any case, parameters allowed
/// (`application/json; charset=utf-8`).
pub fn is_json_content_type(value: &[u8]) -> bool {
    let essence = value.split(|&b| b == b';').next().unwrap_or_default();
    essence.trim_ascii().eq_ignore_ascii_case(b"application/json")
}

/// Whether `method` carries a body that the server parses (so must be JSON).
pub fn method_has_body(method: &str) -> bool {
    matches!(method, "POST" | "PUT" | "PATCH")
}

/// The checks that need only the request head: header size, then content type.
/// `headers` yields (name, value) pairs; `content_type` is the first `Content-Type` value.
pub fn check_head<'a>(
    method: &str,
    target_len: usize,
    headers: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    content_type: Option<&[u8]>,
) -> Result<(), Refusal> {
    check_head_with(method, target_len, headers, content_type, false)
}

/// Content types of an Open Inference Protocol body with the binary tensor extension:
/// `application/octet-stream`, JSON, or none (tritonclient sends no `Content-Type`).
pub fn is_binary_tensor_content_type(value: Option<&[u8]>) -> bool {
    value.is_none_or(|v| {
        let essence = v.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
        essence.eq_ignore_ascii_case(b"application/octet-stream") || is_json_content_type(v)
    })
}

/// [`check_head`], where `binary_tensors` says the request is an OIP infer call carrying the
/// binary extension's `Inference-Header-Content-Length`: that header is not CORS-safelisted, so
/// a browser must get a preflight through before it can send one, whatever the content type,
/// and [`is_binary_tensor_content_type`] bodies are admitted.
pub fn check_head_with<'a>(
    method: &str,
    target_len: usize,
    headers: impl IntoIterator<Item = (&'a [u8], &'a [u8])>,
    content_type: Option<&[u8]>,
    binary_tensors: bool,
) -> Result<(), Refusal> {
    let bytes = target_len + headers.into_iter().map(|(n, v)| n.len() + v.len() + 4).sum::<usize>();
    if bytes > MAX_HEADER_BYTES {
        return Err(Refusal::HeadersTooLarge { bytes, limit: MAX_HEADER_BYTES });
    }
    let ok = if binary_tensors {
        is_binary_tensor_content_type(content_type)
    } else {
        content_type.is_some_and(is_json_content_type)
    };
    if method_has_body(method) && !ok {
        return Err(Refusal::NotJson { got: content_type.map(|t| String::from_utf8_lossy(t).into_owned()) });
    }
    Ok(())
}

/// `Ok` when the body's first non-whitespace byte opens a JSON object. Every request body of
/// Prism is an object; serde would otherwise take a top-level array as a struct's fields in order.
/// An empty body, `null`, a string, a number or an array is refused here (400) before parsing.
pub fn require_object(body: &[u8]) -> Result<(), String> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(()),
        None => Err("the request body is empty; send a JSON object".into()),
        Some(b'[') => Err("the request body is a JSON array; send a JSON object".into()),
        Some(_) => Err("the request body is not a JSON object; send a JSON object".into()),
    }
}

/// At most `max` characters of `s` (on a char boundary), with `...` when cut: client-supplied
/// text quoted in an error must not make the error as large as the request.
pub fn clip(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_content_types() {
        for ok in ["application/json", "Application/JSON", "application/json; charset=utf-8", " application/json "] {
            assert!(is_json_content_type(ok.as_bytes()), "{ok}");
        }
        for bad in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "application/jsonx", ""] {
            assert!(!is_json_content_type(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn head_checks() {
        let json: &[u8] = b"application/json";
        assert!(check_head("POST", 10, [(&b"a"[..], &b"b"[..])], Some(json)).is_ok());
        assert!(check_head("GET", 10, [], None).is_ok());
        assert_eq!(check_head("POST", 10, [], None).unwrap_err().status(), 415);
        assert_eq!(check_head("PUT", 10, [], Some(b"text/plain")).unwrap_err().status(), 415);
        let big = vec![b'x'; MAX_HEADER_BYTES];
        let e = check_head("GET", 1, [(&b"x-big"[..], big.as_slice())], None).unwrap_err();
        assert_eq!(e.status(), 431);
        // Header size is checked first: a huge header with a wrong type is a 431.
        assert_eq!(check_head("POST", 1, [(&b"x-big"[..], big.as_slice())], None).unwrap_err().status(), 431);
    }

    #[test]
    fn binary_tensor_bodies_only_when_flagged() {
        let oct: &[u8] = b"application/octet-stream";
        assert_eq!(check_head("POST", 1, [], Some(oct)).unwrap_err().status(), 415);
        assert!(check_head_with("POST", 1, [], Some(oct), true).is_ok());
        assert!(check_head_with("POST", 1, [], None, true).is_ok());
        assert!(check_head_with("POST", 1, [], Some(b"application/json"), true).is_ok());
        for bad in [&b"text/plain"[..], b"multipart/form-data", b"application/x-www-form-urlencoded"] {
            assert_eq!(check_head_with("POST", 1, [], Some(bad), true).unwrap_err().status(), 415);
        }
    }

    #[test]
    fn only_objects() {
        assert!(require_object(b" \n{\"a\":1}").is_ok());
        for bad in [&b""[..], b"   ", b"[1]", b"null", b"\"s\"", b"5", b"true"] {
            assert!(require_object(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn clip_cuts_on_char_boundaries() {
        assert_eq!(clip("abc", 5), "abc");
        assert_eq!(clip("ééé", 2), "éé...");
        assert_eq!(clip(&"x".repeat(1_000_000), 3), "xxx...");
    }
}
