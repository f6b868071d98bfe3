//! HTTP/JSON front door (axum). Handlers are thin: parse, call the engine, map errors once.
//!
//! Security defaults: bearer-token auth on `/v1/*` and `/admin/*` (tokens from
//! `--auth-token-file`, compared in constant time); probes, `/metrics` and `/openapi.json` stay
//! open so kubelets and Prometheus need no secret. Per-client token-bucket rate limit (client =
//! bearer token, else peer IP), a body-size limit answered with a JSON 413, a body-read
//! deadline answered with a JSON 408, and [`serve`]'s connection timeouts (slowloris).
//!
//! The front door, before any handler, auth included (`prism_api::wire::frontdoor`): URL plus
//! headers over 16 KiB get a JSON 431; a POST or PUT without `Content-Type: application/json` a
//! JSON 415 (browsers send text/plain and form POSTs cross-site without a CORS preflight); a
//! body over `--max-body-bytes` a JSON 413 (drained first up to 64 MiB so clients that write
//! before they read see it; a larger declared length is refused unread). Every body must be a
//! JSON object (400 otherwise). CORS is off unless `--cors-allow-origin` names the origins to trust.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put, MethodRouter};
use axum::{Json, Router as AxumRouter};
use prism_api::wire::frontdoor;
use prism_api::wire::node::EmbedInput;
use prism_api::wire::router::{EmbeddingData, EmbeddingsResponse, EmbeddingsUsage, InferRequest};
use prism_api::RoutingTable;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::engine::Router;
use crate::error::{from_json_error, RouterError};
use crate::oip::{self, Oip, OipError};
use crate::{openai, openapi};

/// Most inputs in one `/v1/embeddings` call (OpenAI's own limit is 2048).
pub const MAX_EMBEDDINGS_INPUTS: usize = 2048;

/// Front-door settings.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Accepted bearer tokens; empty = auth off.
    pub tokens: Vec<String>,
    pub max_body_bytes: usize,
    /// Requests per second per client; 0 = unlimited.
    pub rate_limit_rps: f64,
    pub rate_limit_burst: f64,
    /// Longest a client may take to send a request body (408 after it).
    pub body_timeout: Duration,
    /// Origins (`https://app.example.com`) whose web pages may call this router; empty = CORS
    /// off (no CORS headers, so browsers refuse cross-origin JSON requests). Check each with
    /// [`parse_cors_origin`].
    pub cors_allow_origins: Vec<String>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            max_body_bytes: frontdoor::DEFAULT_MAX_BODY_BYTES,
            rate_limit_rps: 0.0,
            rate_limit_burst: 0.0,
            body_timeout: Duration::from_secs(30),
            cors_allow_origins: Vec::new(),
        }
    }
}

/// A `--cors-allow-origin` value: `scheme://host[:port]`, exactly as browsers send `Origin`
/// (no path, no trailing slash). `*` is refused: the point of the option is a list of origins.
pub fn parse_cors_origin(s: &str) -> Result<HeaderValue, String> {
    let rest = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://")).ok_or_else(|| {
        format!(
            "--cors-allow-origin {s:?}: give an origin such as https://app.example.com (http:// or https://, no `*`)"
        )
    })?;
    let ok = !rest.is_empty()
        && rest.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    if !ok {
        return Err(format!(
            "--cors-allow-origin {s:?}: an origin is scheme://host[:port], without path or trailing slash"
        ));
    }
    HeaderValue::from_str(s).map_err(|e| format!("--cors-allow-origin {s:?}: {e}"))
}

#[derive(Clone)]
pub struct AppState {
    pub router: Arc<Router>,
    /// The Open Inference Protocol v2 service (`/v2/*`) over the same engine.
    pub oip: Arc<Oip>,
    pub options: Arc<HttpOptions>,
    limiter: Arc<Mutex<HashMap<String, Bucket>>>,
    /// Unix seconds at start: the `created` of `GET /v1/models` entries.
    started: u64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Request id of this request (from `x-request-id` when the client sent a sane one).
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// Every route, as registered: the OpenAPI test walks this list.
pub fn routes() -> Vec<(&'static str, &'static str)> {
    let mut seen = Vec::new();
    let _ = api_routes(&mut seen);
    let _ = open_routes(&mut seen);
    seen
}

fn add(
    r: AxumRouter<AppState>,
    seen: &mut Vec<(&'static str, &'static str)>,
    method: &'static str,
    path: &'static str,
    h: MethodRouter<AppState>,
) -> AxumRouter<AppState> {
    seen.push((method, path));
    r.route(path, h)
}

fn api_routes(seen: &mut Vec<(&'static str, &'static str)>) -> AxumRouter<AppState> {
    let r = AxumRouter::new();
    let r = add(r, seen, "post", "/v1/infer", post(infer));
    let r = add(r, seen, "post", "/v1/embeddings", post(embeddings));
    let r = add(r, seen, "get", "/v1/models", get(list_models));
    let r = add(r, seen, "get", "/v1/models/{id}", get(get_model));
    let r = add(r, seen, "get", "/v1/routing-table", get(get_table));
    let r = add(r, seen, "post", "/v1/memory/search", post(memory_search));
    let r = add(r, seen, "post", "/v1/memory/corrections", post(memory_correct));
    let r = add(r, seen, "get", "/v1/memory/corrections", get(memory_training_set));
    let r = add(r, seen, "get", "/v1/memory/records/{id}", get(memory_record));
    let r = add(r, seen, "get", "/v2", get(v2_server_metadata));
    let r = add(r, seen, "get", "/v2/models/{name}", get(v2_model_metadata));
    let r = add(r, seen, "get", "/v2/models/{name}/ready", get(v2_model_ready));
    let r = add(r, seen, "post", "/v2/models/{name}/infer", post(v2_infer));
    add(r, seen, "put", "/admin/routing-table", put(put_table))
}

fn open_routes(seen: &mut Vec<(&'static str, &'static str)>) -> AxumRouter<AppState> {
    let r = AxumRouter::new();
    let r = add(r, seen, "get", "/live", get(|| async { "ok" }));
    let r = add(r, seen, "get", "/ready", get(ready));
    // OIP's probes are open like /live and /ready: kubelets and load balancers have no token.
    let r = add(r, seen, "get", "/v2/health/live", get(|| async { StatusCode::OK }));
    let r = add(r, seen, "get", "/v2/health/ready", get(v2_ready));
    let r = add(r, seen, "get", "/metrics", get(metrics));
    add(r, seen, "get", "/openapi.json", get(|| async { Json(openapi::document()) }))
}

/// The whole HTTP app. Serve it with `into_make_service_with_connect_info::<SocketAddr>()` so
/// the rate limiter can key anonymous clients by IP.
pub fn app(router: Arc<Router>, options: HttpOptions) -> AxumRouter {
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let cors = cors_layer(&options.cors_allow_origins);
    let oip = Oip::new(router.clone());
    let state =
        AppState { router, oip, options: Arc::new(options), limiter: Arc::new(Mutex::new(HashMap::new())), started };
    let mut seen = Vec::new();
    let api = api_routes(&mut seen).layer(middleware::from_fn_with_state(state.clone(), guard));
    let app = open_routes(&mut seen)
        .merge(api)
        .fallback(|| async { RouterError::NotFound("no such route; see GET /openapi.json".into()) })
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(prism_api::wire::ErrorBody::new(
                    "method_not_allowed",
                    "method not allowed on this route; see GET /openapi.json",
                )),
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), front_door))
        .layer(middleware::from_fn(request_id))
        .with_state(state);
    match cors {
        Some(c) => app.layer(c),
        None => app,
    }
}

/// CORS for the listed origins only (preflights answered, `x-request-id` and `x-prism-*`
/// readable); `None` when the list is empty. Entries that do not parse are skipped (`main`
/// refuses them at start with [`parse_cors_origin`]).
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{header, HeaderName, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let list: Vec<HeaderValue> = origins.iter().filter_map(|o| parse_cors_origin(o).ok()).collect();
    if list.is_empty() {
        return None;
    }
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(list))
            .allow_methods([Method::GET, Method::POST, Method::PUT])
            .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION, HeaderName::from_static("x-request-id")])
            .expose_headers([
                HeaderName::from_static("x-request-id"),
                HeaderName::from_static("x-prism-node"),
                HeaderName::from_static("x-prism-revision"),
                HeaderName::from_static("x-prism-recorded"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// Header size (431), JSON-only bodies (415) and a declared body over the limit (413), from the
/// request head alone: nothing is read and no node is called.
async fn front_door(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    let headers = req.headers().iter().map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()));
    let ctype = req.headers().get(axum::http::header::CONTENT_TYPE).map(HeaderValue::as_bytes);
    // The OIP binary tensor extension (JSON header + raw tensor bytes) is no JSON body; it is
    // admitted on the infer route only, and only with its own header, which no browser sends
    // without a CORS preflight.
    let binary_tensors = req.headers().contains_key(oip::HEADER_LENGTH) && oip::is_infer_path(req.uri().path());
    if let Err(r) = frontdoor::check_head_with(req.method().as_str(), target, headers, ctype, binary_tensors) {
        return RouterError::FrontDoor(r).into_response();
    }
    let limit = st.options.max_body_bytes;
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    // Far over the limit: answer without reading (the handler drains moderately oversized
    // bodies so that clients which write before they read still see the 413).
    if declared.is_some_and(|n| n > limit.max(DRAIN_CAP_BYTES) as u64) {
        return RouterError::PayloadTooLarge { limit }.into_response();
    }
    next.run(req).await
}

async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId(id.clone()));
    let mut resp = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Auth, then rate limit (keyed by the authenticated token, else by peer IP).
async fn guard(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let header = req.headers().get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let mut client = None;
    if !st.options.tokens.is_empty() {
        let hit = crate::auth::bearer(header).and_then(|b| crate::auth::matching_token(&st.options.tokens, b));
        let Some(i) = hit else { return RouterError::Unauthorized.into_response() };
        client = Some(format!("token:{i}"));
    }
    if st.options.rate_limit_rps > 0.0 {
        let key = client.unwrap_or_else(|| {
            req.extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| format!("ip:{}", c.0.ip()))
                .unwrap_or_else(|| "ip:unknown".into())
        });
        if let Err(e) = st.take_token(&key) {
            return e.into_response();
        }
    }
    next.run(req).await
}

impl AppState {
    fn take_token(&self, key: &str) -> Result<(), RouterError> {
        let rps = self.options.rate_limit_rps;
        let burst = self.options.rate_limit_burst.max(1.0);
        let mut map = self.limiter.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // Bound memory under many distinct clients: forget buckets that are full again.
        if map.len() > 10_000 {
            map.retain(|_, b| (b.tokens + now.duration_since(b.at).as_secs_f64() * rps) < burst);
        }
        let b = map.entry(key.to_string()).or_insert(Bucket { tokens: burst, at: now });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rps).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(RouterError::RateLimited { retry_after_s: ((1.0 - b.tokens) / rps).ceil().max(1.0) as u64 })
        }
    }
}

/// Most bytes of an over-limit body read and thrown away before the 413 is sent. Clients such as
/// Python's (`openai`/httpx, requests, urllib) send the whole body before they read the answer:
/// a server that answers early and closes makes them see a broken pipe instead of the 413, a
/// client error reported as an outage. Past this much, the connection is closed (no honest
/// client sends 8 times the limit).
pub const DRAIN_CAP_BYTES: usize = 64 * 1024 * 1024;

/// Read the body up to `limit` bytes within `timeout`; over the limit is a JSON 413 (after the
/// rest is drained, up to [`DRAIN_CAP_BYTES`]), too slow a JSON 408.
async fn read_body(req: Request, opts: &HttpOptions) -> Result<Bytes, RouterError> {
    use http_body_util::BodyExt;
    let (limit, timeout) = (opts.max_body_bytes, opts.body_timeout);
    let mut body = req.into_body();
    let read = async {
        let mut buf: Vec<u8> = Vec::new();
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| RouterError::InvalidJson(format!("could not read the request body: {e}")))?;
            let Ok(data) = frame.into_data() else { continue };
            seen = seen.saturating_add(data.len());
            if seen <= limit {
                buf.extend_from_slice(&data);
            } else if seen > DRAIN_CAP_BYTES {
                break;
            } else if !buf.is_empty() {
                buf = Vec::new();
            }
        }
        if seen > limit {
            return Err(RouterError::PayloadTooLarge { limit });
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(timeout, read).await.map_err(|_| RouterError::BodyTimeout { secs: timeout.as_secs() })?
}

/// The body as `T`: read within the limits, a JSON object (400 otherwise), then parsed.
async fn read_json<T: DeserializeOwned>(req: Request, opts: &HttpOptions) -> Result<T, RouterError> {
    let body = read_body(req, opts).await?;
    frontdoor::require_object(&body).map_err(RouterError::InvalidJson)?;
    serde_json::from_slice(&body).map_err(from_json_error)
}

fn rid(headers: &axum::http::Extensions) -> String {
    headers.get::<RequestId>().map(|r| r.0.clone()).unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

async fn infer(State(st): State<AppState>, req: Request) -> Result<Response, RouterError> {
    let id = rid(req.extensions());
    let body = read_body(req, &st.options).await?;
    frontdoor::require_object(&body).map_err(RouterError::InvalidJson)?;
    let parsed: InferRequest = serde_json::from_slice(&body).map_err(|e| explain_infer_error(&body, e))?;
    let resp = st.router.infer(parsed, &id).await?;
    Ok(Json(resp).into_response())
}

/// serde says "did not match any variant of untagged enum" for a bad input; name the modality.
fn explain_infer_error(body: &[u8], e: serde_json::Error) -> RouterError {
    if matches!(e.classify(), serde_json::error::Category::Data) {
        if let Ok(serde_json::Value::Object(v)) = serde_json::from_slice::<serde_json::Value>(body) {
            if let Some(serde_json::Value::Object(inputs)) = v.get("inputs") {
                for (m, item) in inputs {
                    if let Err(ie) = serde_json::from_value::<EmbedInput>(item.clone()) {
                        return RouterError::Validation(format!(
                            "`inputs.{}` must be a string or an object with one of text, image_base64, audio_base64, embeddings ({ie})",
                            frontdoor::clip(m, 64)
                        ));
                    }
                }
            }
        }
    }
    from_json_error(e)
}

async fn embeddings(State(st): State<AppState>, req: Request) -> Result<Response, RouterError> {
    let id = rid(req.extensions());
    let body = read_body(req, &st.options).await?;
    frontdoor::require_object(&body).map_err(RouterError::InvalidJson)?;
    let parsed = openai::parse_embeddings(&body, MAX_EMBEDDINGS_INPUTS)?;
    // An unknown or impossible `model` is answered here: no node is called for it.
    let modality = openai::resolve_model(&st.router.snapshot(), parsed.model.as_deref())?;
    let inputs = parsed.texts.into_iter().map(EmbedInput::Text).collect();
    let (served, snap, recorded) = st.router.embeddings_call(&modality, inputs, &id).await?;
    // The node's tokenizer count; 0 from a node that reports none (non-text models, old nodes).
    let tokens = served.response.prompt_tokens.unwrap_or(0);
    let mut data = Vec::with_capacity(served.response.embeddings.len());
    for (index, mut v) in served.response.embeddings.into_iter().enumerate() {
        if let Some(d) = parsed.dimensions {
            openai::shorten(&mut v, d)?;
        }
        data.push(EmbeddingData { object: "embedding".into(), index, embedding: openai::encode(v, parsed.encoding) });
    }
    let resp = EmbeddingsResponse {
        object: "list".into(),
        data,
        model: parsed.model.unwrap_or_else(|| snap.pipeline.clone()),
        usage: EmbeddingsUsage { prompt_tokens: tokens, total_tokens: tokens },
    };
    let mut r = Json(resp).into_response();
    let h: &mut HeaderMap = r.headers_mut();
    for (k, v) in [("x-prism-node", &served.replica.node), ("x-prism-revision", &served.replica.revision)] {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(k, v);
        }
    }
    // OpenAI's body has no place for it: with memory on, a header says whether the inputs are
    // durably logged (as `recorded` does in /v1/infer answers).
    if let Some(recorded) = recorded {
        h.insert("x-prism-recorded", HeaderValue::from_static(if recorded { "true" } else { "false" }));
    }
    Ok(r)
}

/// `GET /v1/models`: the valid `model` names (see [`openai`]), OpenAI's list shape.
async fn list_models(State(st): State<AppState>) -> Response {
    let data = openai::catalog(&st.router.snapshot(), st.started);
    Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

async fn get_model(
    State(st): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, RouterError> {
    openai::check_model_name(&id)?;
    let entries = openai::catalog(&st.router.snapshot(), st.started);
    match entries.iter().find(|e| e.id == id) {
        Some(e) => Ok(Json(e).into_response()),
        None => Err(openai::model_not_found(&id, &entries)),
    }
}

async fn get_table(State(st): State<AppState>) -> Json<RoutingTable> {
    Json(st.router.snapshot().table.clone())
}

async fn put_table(State(st): State<AppState>, req: Request) -> Result<Response, RouterError> {
    let table: RoutingTable = read_json(req, &st.options).await?;
    let r = st.router.apply_table(table)?;
    Ok(Json(r).into_response())
}

async fn ready(State(st): State<AppState>) -> Response {
    if st.router.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        RouterError::Unavailable("no routing table with a routable replica yet".into()).into_response()
    }
}

async fn metrics(State(st): State<AppState>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.router.metrics.render()).into_response()
}

/// `GET /v2/health/ready`: the same readiness as `/ready`.
async fn v2_ready(State(st): State<AppState>) -> Response {
    if st.router.is_ready() {
        StatusCode::OK.into_response()
    } else {
        OipError::from(RouterError::Unavailable("no routing table with a routable replica yet".into())).into_response()
    }
}

async fn v2_server_metadata(State(st): State<AppState>) -> Response {
    Json(st.oip.server_metadata()).into_response()
}

async fn v2_model_metadata(
    State(st): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Response, OipError> {
    Ok(Json(st.oip.model_metadata(&name, "").await?).into_response())
}

/// `GET /v2/models/{name}/ready`: 200 when the model can serve, 503 when it cannot yet, 404 for
/// an unknown model (clients read any non-200 as "not ready").
async fn v2_model_ready(
    State(st): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<Response, OipError> {
    let snap = st.router.snapshot();
    let model = oip::resolve(&snap, &name, "")?;
    if st.oip.model_ready(&snap, &model) {
        Ok(StatusCode::OK.into_response())
    } else {
        Err(RouterError::Unavailable(format!("model '{name}' has no routable replica now")).into())
    }
}

/// `POST /v2/models/{name}/infer`: JSON, or the binary tensor extension (inputs and outputs).
async fn v2_infer(
    State(st): State<AppState>,
    axum::extract::Path(name): axum::extract::Path<String>,
    req: Request,
) -> Result<Response, OipError> {
    let id = rid(req.extensions());
    let header_length =
        req.headers().get(oip::HEADER_LENGTH).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let body = read_body(req, &st.options).await?;
    let span = tracing::info_span!("oip_infer", model = %frontdoor::clip(&name, 64), request_id = %id);
    let (body, json_len) = async {
        // The body is checked before the model is looked up: a malformed request is a 400 on
        // any model name.
        let parsed = oip::parse_http(&body, header_length.as_deref())?;
        let binary = parsed.outputs.binary(&name)?;
        let answer = st.oip.infer(&name, "", parsed, &id).await?;
        Ok::<_, OipError>(oip::http_answer(&answer, binary))
    }
    .instrument(span)
    .await?;
    let mut r = Response::new(axum::body::Body::from(body));
    let ctype = if json_len.is_some() { "application/octet-stream" } else { "application/json" };
    r.headers_mut().insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    if let Some(n) = json_len {
        if let Ok(v) = HeaderValue::from_str(&n.to_string()) {
            r.headers_mut().insert(oip::HEADER_LENGTH, v);
        }
    }
    Ok(r)
}

/// Connection timeouts of [`serve`]. Without them a client holds a connection, and its buffers,
/// for ever by sending its headers a byte at a time or by opening connections and staying silent.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// A request's headers must arrive within this time of the connection being ready for the
    /// next request (also bounds a silent new or idle keep-alive connection).
    pub header_read_timeout: Duration,
    /// HTTP/2: ping after this much silence, close when the ping is not answered in as long.
    pub h2_keepalive: Duration,
    /// On shutdown, in-flight requests get this long to finish.
    pub drain: Duration,
    /// After the shutdown signal, keep accepting and answering this long, every HTTP/1 answer
    /// saying `Connection: close`, before the listener closes. In a cluster the Service's
    /// endpoints and the clients' pooled connections move to the other pods meanwhile, so a
    /// rolling restart loses no request; 0 stops accepting at once.
    pub lame_duck: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            // nginx's client_header_timeout; also the keep-alive idle limit, kept above common
            // client pool idle times' lower end so idle-close races stay rare.
            header_read_timeout: Duration::from_secs(60),
            h2_keepalive: Duration::from_secs(20),
            drain: Duration::from_secs(10),
            lame_duck: Duration::ZERO,
        }
    }
}

/// Serve `app` on `listener` (HTTP/1.1 and h2c) with [`ConnLimits`], until `shutdown` resolves
/// and `limits.lame_duck` has passed; then stop accepting and let in-flight requests finish for
/// `limits.drain`. Each request gets
/// the peer address as `ConnectInfo<SocketAddr>` (the rate limiter keys anonymous clients by it).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: AxumRouter,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) {
    use axum::http::header;
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use std::sync::atomic::Ordering;
    use tower::ServiceExt;

    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        // Above the front door's 16 KiB so its JSON 431 answers; still bounded.
        .max_header_list_size(64 * 1024)
        .keep_alive_interval(Some(limits.h2_keepalive))
        .keep_alive_timeout(limits.h2_keepalive);
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Armed when the shutdown signal arrives: the end of the lame-duck period.
    let lame_duck_end = tokio::time::sleep(Duration::from_secs(365 * 86_400));
    tokio::pin!(lame_duck_end);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown, if !draining.load(Ordering::Relaxed) => {
                if limits.lame_duck.is_zero() {
                    break;
                }
                draining.store(true, Ordering::Relaxed);
                lame_duck_end.as_mut().reset(tokio::time::Instant::now() + limits.lame_duck);
                tracing::info!(lame_duck = ?limits.lame_duck, "shutdown: still answering, asking clients to reconnect elsewhere");
                continue;
            }
            _ = &mut lame_duck_end, if draining.load(Ordering::Relaxed) => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let draining = draining.clone();
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            // HTTP/2 has no Connection header; its clients get GOAWAY when the drain starts.
            let close = req.version() <= hyper::Version::HTTP_11 && draining.load(Ordering::Relaxed);
            let answer = app.clone().oneshot(req.map(axum::body::Body::new));
            async move {
                let mut res = answer.await?;
                if close {
                    res.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, std::convert::Infallible>(res)
            }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let first_byte = limits.header_read_timeout;
        tokio::spawn(async move {
            // The protocol sniffing (HTTP/1 vs the h2 preface) reads before hyper's header
            // timer starts: a connection that never sends a byte is closed here.
            match tokio::time::timeout(first_byte, stream.peek(&mut [0u8; 1])).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            // Errors here are the client's (reset, timed out, bad framing): nothing to report.
            let _ = watcher.watch(conn).await;
        });
    }
    if tokio::time::timeout(limits.drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(drain = ?limits.drain, "in-flight requests still running at shutdown; closing them");
    }
}

/// `POST /v1/memory/search`: by a vector, or by an input that the named modality's node embeds.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SearchRequest {
    /// Which vectors to search: a modality name, or `fused` (default with `vector`).
    #[serde(default)]
    modality: Option<String>,
    #[serde(default)]
    input: Option<prism_api::wire::node::EmbedInput>,
    #[serde(default)]
    vector: Option<Vec<f32>>,
    #[serde(default)]
    k: Option<usize>,
}

/// Most hits one search returns.
pub const MAX_SEARCH_K: usize = 100;

async fn memory_search(State(st): State<AppState>, req: Request) -> Result<Response, RouterError> {
    let id = rid(req.extensions());
    let q: SearchRequest = read_json(req, &st.options).await?;
    let memory = st.router.memory().ok_or_else(crate::engine::memory_off)?;
    let k = q.k.unwrap_or(10);
    if k == 0 || k > MAX_SEARCH_K {
        return Err(RouterError::Validation(format!("k must lie in 1..={MAX_SEARCH_K}, got {k}")));
    }
    let snap = st.router.snapshot();
    let (key, vector) = match (q.vector, q.input) {
        (Some(_), Some(_)) => {
            return Err(RouterError::Validation("give either `vector` or `input`, not both".into()));
        }
        (None, None) => return Err(RouterError::Validation("give `vector` or `input` (with `modality`)".into())),
        (Some(v), None) => {
            if v.is_empty() || v.iter().any(|x| !x.is_finite()) {
                return Err(RouterError::Validation("`vector` must be non-empty and finite".into()));
            }
            (q.modality.unwrap_or_else(|| prism_memory::FUSED.to_string()), v)
        }
        (None, Some(input)) => {
            let Some(m) = q.modality else {
                return Err(RouterError::Validation("`input` needs `modality` (which node embeds it)".into()));
            };
            let v = st.router.embed_one(&m, input, &id).await?;
            (m, v)
        }
    };
    let (hits, exact) = memory.search(Some(&snap.pipeline), &key, &vector, k);
    Ok(Json(serde_json::json!({ "key": key, "exact": exact, "hits": hits })).into_response())
}

/// `POST /v1/memory/corrections`: `{"requestId", "rating": 0..1 | "correct": bool, "answer"?}`.
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CorrectionRequest {
    request_id: String,
    #[serde(default)]
    rating: Option<f64>,
    #[serde(default)]
    correct: Option<bool>,
    #[serde(default)]
    answer: Option<serde_json::Value>,
}

async fn memory_correct(State(st): State<AppState>, req: Request) -> Result<Response, RouterError> {
    let c: CorrectionRequest = read_json(req, &st.options).await?;
    let rating = match (c.rating, c.correct) {
        (Some(r), None) => r,
        (None, Some(ok)) => f64::from(u8::from(ok)),
        _ => return Err(RouterError::Validation("give exactly one of `rating` (0..1) or `correct` (bool)".into())),
    };
    if c.request_id.is_empty() || c.request_id.len() > 128 {
        return Err(RouterError::Validation("`requestId` must be 1..128 characters".into()));
    }
    let replicas = st
        .router
        .correct(prism_memory::Correction { request_id: c.request_id.clone(), rating, answer: c.answer, at_ms: 0 })
        .await?;
    let replicas: Vec<serde_json::Value> = replicas
        .into_iter()
        .map(|(r, a)| serde_json::json!({"node": r.node, "revision": r.revision, "accuracy": a}))
        .collect();
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"requestId": c.request_id, "rating": rating, "replicas": replicas})),
    )
        .into_response())
}

async fn memory_training_set(State(st): State<AppState>) -> Result<Response, RouterError> {
    let memory = st.router.memory().ok_or_else(crate::engine::memory_off)?;
    let set = memory.training_set().map_err(crate::engine::memory_error)?;
    Ok(Json(serde_json::json!({ "corrections": set })).into_response())
}

async fn memory_record(
    State(st): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, RouterError> {
    let memory = st.router.memory().ok_or_else(crate::engine::memory_off)?;
    match memory.get(&id).map_err(crate::engine::memory_error)? {
        Some(r) => Ok(Json(r).into_response()),
        None => Err(RouterError::NotFound(format!("no request with id '{id}' in memory"))),
    }
}
