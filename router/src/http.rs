//! HTTP/JSON front door (axum). Handlers are thin: parse, call the engine, map errors once.
//!
//! Security defaults: bearer-token auth on `/v1/*` and `/admin/*` (tokens from
//! `--auth-token-file`, compared in constant time); probes, `/metrics` and `/openapi.json` stay
//! open so kubelets and Prometheus need no secret. Per-client token-bucket rate limit (client =
//! bearer token, else peer IP), a body-size limit answered with a JSON 413, a body-read
//! deadline answered with a JSON 408, and [`serve`]'s connection timeouts (slowloris).

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
use prism_api::wire::router::{EmbeddingData, EmbeddingsRequest, EmbeddingsResponse, EmbeddingsUsage, InferRequest};
use prism_api::RoutingTable;
use subtle::ConstantTimeEq;

use crate::engine::Router;
use crate::error::{from_json_error, RouterError};
use crate::openapi;

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
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            tokens: Vec::new(),
            max_body_bytes: 16 * 1024 * 1024,
            rate_limit_rps: 0.0,
            rate_limit_burst: 0.0,
            body_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub router: Arc<Router>,
    pub options: Arc<HttpOptions>,
    limiter: Arc<Mutex<HashMap<String, Bucket>>>,
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
    let r = add(r, seen, "get", "/v1/routing-table", get(get_table));
    let r = add(r, seen, "post", "/v1/memory/search", post(memory_search));
    let r = add(r, seen, "post", "/v1/memory/corrections", post(memory_correct));
    let r = add(r, seen, "get", "/v1/memory/corrections", get(memory_training_set));
    let r = add(r, seen, "get", "/v1/memory/records/{id}", get(memory_record));
    add(r, seen, "put", "/admin/routing-table", put(put_table))
}

fn open_routes(seen: &mut Vec<(&'static str, &'static str)>) -> AxumRouter<AppState> {
    let r = AxumRouter::new();
    let r = add(r, seen, "get", "/live", get(|| async { "ok" }));
    let r = add(r, seen, "get", "/ready", get(ready));
    let r = add(r, seen, "get", "/metrics", get(metrics));
    add(r, seen, "get", "/openapi.json", get(|| async { Json(openapi::document()) }))
}

/// The whole HTTP app. Serve it with `into_make_service_with_connect_info::<SocketAddr>()` so
/// the rate limiter can key anonymous clients by IP.
pub fn app(router: Arc<Router>, options: HttpOptions) -> AxumRouter {
    let state = AppState { router, options: Arc::new(options), limiter: Arc::new(Mutex::new(HashMap::new())) };
    let mut seen = Vec::new();
    let api = api_routes(&mut seen).layer(middleware::from_fn_with_state(state.clone(), guard));
    open_routes(&mut seen)
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
        .layer(middleware::from_fn(request_id))
        .with_state(state)
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
    let bearer = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let mut client = None;
    if !st.options.tokens.is_empty() {
        let Some(b) = bearer else { return RouterError::Unauthorized.into_response() };
        // Check every token (no early exit) so timing does not reveal which one is close.
        let mut hit = None;
        for (i, t) in st.options.tokens.iter().enumerate() {
            if bool::from(t.as_bytes().ct_eq(b.as_bytes())) {
                hit = Some(i);
            }
        }
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

/// Read the body up to `limit` bytes within `timeout`; over the limit is a JSON 413 (axum's own
/// is plain text), too slow a JSON 408.
async fn read_body(req: Request, opts: &HttpOptions) -> Result<Bytes, RouterError> {
    let (limit, timeout) = (opts.max_body_bytes, opts.body_timeout);
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(req.into_body(), limit))
        .await
        .map_err(|_| RouterError::BodyTimeout { secs: timeout.as_secs() })?;
    read.map_err(|e| {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(c) = cur {
            if c.is::<http_body_util::LengthLimitError>() {
                return RouterError::PayloadTooLarge { limit };
            }
            cur = c.source();
        }
        RouterError::InvalidJson(format!("could not read the request body: {e}"))
    })
}

fn rid(headers: &axum::http::Extensions) -> String {
    headers.get::<RequestId>().map(|r| r.0.clone()).unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

async fn infer(State(st): State<AppState>, req: Request) -> Result<Response, RouterError> {
    let id = rid(req.extensions());
    let body = read_body(req, &st.options).await?;
    let parsed: InferRequest = serde_json::from_slice(&body).map_err(from_json_error)?;
    let resp = st.router.infer(parsed, &id).await?;
    Ok(Json(resp).into_response())
}

async fn embeddings(State(st): State<AppState>, req: Request) -> Result<Response, RouterError> {
    let id = rid(req.extensions());
    let body = read_body(req, &st.options).await?;
    let parsed: EmbeddingsRequest = serde_json::from_slice(&body).map_err(from_json_error)?;
    if let Some(f) = parsed.encoding_format.as_deref() {
        if f != "float" {
            return Err(RouterError::Validation(format!("encoding_format '{f}' is not supported; use 'float'")));
        }
    }
    let texts = parsed.input.into_vec();
    if texts.is_empty() {
        return Err(RouterError::Validation("`input` is an empty list".into()));
    }
    if texts.len() > MAX_EMBEDDINGS_INPUTS {
        return Err(RouterError::Validation(format!(
            "`input` has {} items; at most {MAX_EMBEDDINGS_INPUTS}",
            texts.len()
        )));
    }
    // `model` picks a modality when it names one (e.g. "caption"); otherwise `text` serves.
    let snap = st.router.snapshot();
    let modality = parsed.model.as_deref().filter(|m| snap.configs.contains_key(*m)).unwrap_or("text").to_string();
    let words: u64 = texts.iter().map(|t| t.split_whitespace().count() as u64).sum();
    let (served, snap) = st.router.embed_texts(&modality, texts, &id).await?;
    if let Some(d) = parsed.dimensions {
        let got = served.response.embeddings.first().map_or(0, |v| v.len());
        if d != got {
            return Err(RouterError::Validation(format!("dimensions={d} requested but this model emits {got}")));
        }
    }
    let data = served
        .response
        .embeddings
        .into_iter()
        .enumerate()
        .map(|(index, embedding)| EmbeddingData { object: "embedding".into(), index, embedding })
        .collect();
    let resp = EmbeddingsResponse {
        object: "list".into(),
        data,
        model: parsed.model.unwrap_or_else(|| snap.pipeline.clone()),
        usage: EmbeddingsUsage { prompt_tokens: words, total_tokens: words },
    };
    let mut r = Json(resp).into_response();
    let h: &mut HeaderMap = r.headers_mut();
    for (k, v) in [("x-prism-node", &served.replica.node), ("x-prism-revision", &served.replica.revision)] {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(k, v);
        }
    }
    Ok(r)
}

async fn get_table(State(st): State<AppState>) -> Json<RoutingTable> {
    Json(st.router.snapshot().table.clone())
}

async fn put_table(State(st): State<AppState>, req: Request) -> Result<Response, RouterError> {
    let body = read_body(req, &st.options).await?;
    let table: RoutingTable = serde_json::from_slice(&body).map_err(from_json_error)?;
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
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            // nginx's client_header_timeout; also the keep-alive idle limit, kept above common
            // client pool idle times' lower end so idle-close races stay rare.
            header_read_timeout: Duration::from_secs(60),
            h2_keepalive: Duration::from_secs(20),
            drain: Duration::from_secs(10),
        }
    }
}

/// Serve `app` on `listener` (HTTP/1.1 and h2c) with [`ConnLimits`], until `shutdown` resolves;
/// then stop accepting and let in-flight requests finish for `limits.drain`. Each request gets
/// the peer address as `ConnectInfo<SocketAddr>` (the rate limiter keys anonymous clients by it).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: AxumRouter,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use tower::ServiceExt;

    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.h2_keepalive))
        .keep_alive_timeout(limits.h2_keepalive);
    let builder = Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
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
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer));
            app.clone().oneshot(req.map(axum::body::Body::new))
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
    let body = read_body(req, &st.options).await?;
    let q: SearchRequest = serde_json::from_slice(&body).map_err(from_json_error)?;
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
    let body = read_body(req, &st.options).await?;
    let c: CorrectionRequest = serde_json::from_slice(&body).map_err(from_json_error)?;
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
