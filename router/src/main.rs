//! `prism-router`: wiring only (flags -> engine + front doors + reload tasks).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use prism_router::http::HttpOptions;
use prism_router::{config, engine, http, EngineOptions, Router};
use tracing::info;

/// Prism router: routes each modality of a request to the best healthy replica, fuses the
/// answers, and degrades gracefully when a modality is down.
#[derive(Parser, Debug)]
#[command(name = "prism-router", version)]
struct Args {
    /// HTTP listen address; port 0 picks a free port (the chosen one is printed as `listening on http://ADDR`).
    #[arg(long, default_value = "127.0.0.1:8080", env = "PRISM_ROUTER_LISTEN")]
    listen: SocketAddr,
    /// gRPC listen address (prism.v1.Router/Infer and the Open Inference Protocol's
    /// inference.GRPCInferenceService); off when not given. Prints `grpc listening on ADDR`.
    #[arg(long, env = "PRISM_ROUTER_GRPC_LISTEN")]
    grpc_listen: Option<SocketAddr>,
    /// Pipeline spec: a MultimodalPipeline manifest or its bare spec, JSON or YAML. Re-read when it changes.
    #[arg(long, env = "PRISM_ROUTER_PIPELINE")]
    pipeline: Option<PathBuf>,
    /// Pipeline name when the pipeline manifest does not name one; otherwise the first routing
    /// table names it (`default` when there is no table source at all).
    #[arg(long)]
    pipeline_name: Option<String>,
    /// Routing table JSON ({pipeline, generation, modalities}); polled and applied when its generation grows.
    #[arg(long, env = "PRISM_ROUTER_ROUTING_TABLE")]
    routing_table: Option<PathBuf>,
    /// Watch the routing table and pipeline spec in this ConfigMap ([NAMESPACE/]NAME; default
    /// namespace: the pod's) through the Kubernetes API. Used in clusters: a mounted ConfigMap
    /// file lags up to a minute. Combines with --routing-table (newest generation wins).
    #[arg(long, env = "PRISM_ROUTER_ROUTING_CONFIGMAP")]
    routing_configmap: Option<String>,
    /// How often the routing-table and pipeline files are checked for changes.
    #[arg(long, default_value_t = 250)]
    reload_interval_ms: u64,
    /// File with accepted bearer tokens, one per line (blank lines and `#` comments ignored).
    #[arg(long, env = "PRISM_ROUTER_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// Serve /v1 and /admin without auth on a non-loopback address (loopback never needs this).
    #[arg(long)]
    insecure_no_auth: bool,
    /// A request's headers must arrive within this many seconds (closes silent and slowloris
    /// connections, idle keep-alive ones included).
    #[arg(long, default_value_t = 60.0)]
    header_timeout_s: f64,
    /// After SIGTERM, keep answering this many seconds (each answer saying `Connection: close`)
    /// before closing the listener, while the Service's endpoints and clients' pooled
    /// connections move to other replicas; then drain in-flight requests. The operator sets 5
    /// for router pods; 0 stops accepting at once.
    #[arg(long, default_value_t = 0.0)]
    shutdown_delay_s: f64,
    /// A request's body must arrive within this many seconds (408 after it).
    #[arg(long, default_value_t = 30.0)]
    body_timeout_s: f64,
    /// Largest request body in bytes (413 above it, before any node is called). At most
    /// --node-max-body-bytes: the router must not accept what its nodes would refuse.
    #[arg(long, default_value_t = prism_api::wire::frontdoor::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Largest body the nodes accept (their --max-body-bytes; 8 MiB by default). A node request
    /// over it is answered 413 without being sent, so it never counts against a replica.
    #[arg(long, default_value_t = prism_api::wire::frontdoor::DEFAULT_MAX_BODY_BYTES)]
    node_max_body_bytes: usize,
    /// An origin (`https://app.example.com`) whose web pages may call this router from a
    /// browser; repeat for several. CORS is off without it: no page on another origin can read
    /// an answer, and non-JSON POSTs (which browsers send without asking) get 415.
    #[arg(long = "cors-allow-origin", env = "PRISM_ROUTER_CORS_ALLOW_ORIGIN", value_delimiter = ',')]
    cors_allow_origin: Vec<String>,
    /// Requests per second per client (bearer token, else peer IP); 0 = unlimited.
    #[arg(long, default_value_t = 0.0)]
    rate_limit_rps: f64,
    /// Burst size of the per-client rate limit (defaults to 2 x rps).
    #[arg(long)]
    rate_limit_burst: Option<f64>,
    /// Interval of active /ready probes of every replica; 0 = passive health only.
    #[arg(long, default_value_t = 500)]
    probe_interval_ms: u64,
    /// Whole answers kept per pipeline for `degradation.onMissingRequired: cached` (the nearest
    /// one above `cache.minSimilarity` answers when a required modality is down); 0 = off.
    /// Only pipelines with that policy remember answers. With memory on (--memory-path or
    /// --memory-url) the memory log is the cache instead (every logged whole answer, kept as long
    /// as the memory retention keeps it) and any value but 0 just turns it on.
    #[arg(long, default_value_t = 10_000)]
    answer_cache_entries: usize,
    /// Memory log (SQLite file, created if missing): every answered request is recorded before
    /// its answer is sent (`recorded: true`), searchable at /v1/memory/search, correctable at
    /// /v1/memory/corrections. Off when not given.
    #[arg(long, env = "PRISM_ROUTER_MEMORY_PATH")]
    memory_path: Option<PathBuf>,
    /// Memory log in PostgreSQL (postgres://USER:PASSWORD@HOST:PORT/DB; tables created if
    /// missing), shared by several routers: each one searches what all of them recorded. Instead
    /// of --memory-path. Prefer the env var: a flag's value shows in `ps`.
    #[arg(long, env = "PRISM_MEMORY_URL", hide_env_values = true, conflicts_with = "memory_path")]
    memory_url: Option<String>,
    /// PEM CA certificate(s) to trust for `https://` node endpoints (nodes started with
    /// --tls-cert/--tls-key). Repeat for nodes with different CAs.
    #[arg(long, env = "PRISM_ROUTER_NODE_CA", value_delimiter = ',')]
    node_ca: Vec<PathBuf>,
    /// Log format: text or json.
    #[arg(long, default_value = "text")]
    log_format: String,
}

fn read_tokens(path: &PathBuf) -> anyhow::Result<Vec<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading --auth-token-file {}", path.display()))?;
    let tokens: Vec<String> =
        text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(str::to_string).collect();
    if tokens.is_empty() {
        bail!("--auth-token-file {} holds no token (one per line)", path.display());
    }
    Ok(tokens)
}

/// Prune memory records older than the pipeline's `memory.retention`, and beyond its
/// `memory.maxRecords` newest, every 10 minutes.
async fn retention_loop(router: std::sync::Arc<prism_router::Router>, memory: std::sync::Arc<prism_memory::Memory>) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tick.tick().await;
        if let Some(max) = router.snapshot().spec.memory.max_records {
            match memory.prune_to_count(max) {
                Ok(0) => {}
                Ok(n) => info!(pruned = n, max_records = max, "memory retention by size"),
                Err(e) => tracing::warn!(error = %e, "memory retention by size failed"),
            }
        }
        let retention = router.snapshot().spec.memory.retention.clone();
        let Some(keep) = parse_retention(&retention) else {
            tracing::warn!(%retention, "memory.retention is not N(s|m|h|d); nothing pruned");
            continue;
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let cutoff = now.saturating_sub(keep).as_millis() as i64;
        match memory.prune_before(cutoff) {
            Ok(0) => {}
            Ok(n) => info!(pruned = n, %retention, "memory retention"),
            Err(e) => tracing::warn!(error = %e, "memory retention failed"),
        }
    }
}

/// `30d`, `12h`, `90m`, `45s` (the CRD's pattern).
fn parse_retention(s: &str) -> Option<Duration> {
    let (num, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    Some(Duration::from_secs(n.checked_mul(secs)?))
}

/// SIGTERM (the kubelet stopping the pod) or Ctrl-C: stop accepting, drain in-flight requests.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    info!("shutting down: draining in-flight requests");
}

fn seconds(flag: &str, v: f64) -> anyhow::Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
        bail!("{flag} must be a number of seconds in (0, 86400], got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args.log_format);
    let tokens = checked_tokens(&args)?;
    let router = build_router(&args)?;
    attach_memory(&args, &router)?;
    start_background_tasks(&args, &router, &tokens).await?;
    serve_http(&args, router, tokens).await
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // log_internal_errors(false): when the log can't be written (disk full), tracing would
    // eprintln! the error, and eprintln! panics when stderr fails, dropping the request's
    // connection. A full disk must cost log lines, not requests (tests/chaos disk-full).
    if format == "json" {
        tracing_subscriber::fmt()
            .log_internal_errors(false)
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    } else {
        tracing_subscriber::fmt()
            .log_internal_errors(false)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
}

/// Refuses flag combinations that would misbehave later; returns the bearer tokens.
fn checked_tokens(args: &Args) -> anyhow::Result<Vec<String>> {
    if args.max_body_bytes > args.node_max_body_bytes {
        bail!(
            "--max-body-bytes {} is over --node-max-body-bytes {}: the router would accept bodies its nodes refuse \
             (they close the connection, which reads as a replica failure); lower it or raise both",
            args.max_body_bytes,
            args.node_max_body_bytes
        );
    }
    for o in &args.cors_allow_origin {
        http::parse_cors_origin(o).map_err(anyhow::Error::msg)?;
    }
    let tokens = match &args.auth_token_file {
        Some(p) => read_tokens(p)?,
        None => Vec::new(),
    };
    // Auth is on by default: refuse to expose an open router beyond this machine by accident.
    if tokens.is_empty() && !args.listen.ip().is_loopback() && !args.insecure_no_auth {
        bail!(
            "refusing to serve without auth on {}: pass --auth-token-file FILE (bearer tokens, one per line), \
             or --insecure-no-auth to accept anonymous requests, or listen on 127.0.0.1",
            args.listen
        );
    }
    Ok(tokens)
}

/// The router with its pipeline spec, first routing table and the CAs of HTTPS nodes.
fn build_router(args: &Args) -> anyhow::Result<Arc<Router>> {
    let (name, spec) = match &args.pipeline {
        Some(p) => config::load_pipeline(p)?,
        None => (None, engine::default_spec()),
    };
    let table = match &args.routing_table {
        Some(p) => Some(config::load_table(p)?),
        None => None,
    };
    let probe = (args.probe_interval_ms > 0).then(|| Duration::from_millis(args.probe_interval_ms));
    // An empty name is taken from the first table applied (a table for another pipeline is
    // refused once the name is known).
    let has_table_source = args.routing_table.is_some() || args.routing_configmap.is_some();
    let name = name.or(args.pipeline_name.clone()).unwrap_or_else(|| {
        if has_table_source {
            String::new()
        } else {
            "default".to_string()
        }
    });
    let mut node_ca_pem: Option<Vec<u8>> = None;
    for p in &args.node_ca {
        let pem = std::fs::read(p).with_context(|| format!("reading --node-ca {}", p.display()))?;
        let bundle = node_ca_pem.get_or_insert_with(Vec::new);
        bundle.extend_from_slice(&pem);
        bundle.push(b'\n');
    }
    Ok(Router::new(
        name,
        spec,
        table,
        EngineOptions { probe_interval: probe, node_ca_pem, node_max_body_bytes: args.node_max_body_bytes },
    )?)
}

/// The request log (embedded SQLite or PostgreSQL) and the answer cache of
/// `onMissingRequired: cached`.
fn attach_memory(args: &Args, router: &Arc<Router>) -> anyhow::Result<()> {
    // The index's vector precision is the pipeline's `memory.vectors`; the store keeps f32
    // answers either way, so a change takes effect at the next start by rebuilding the index.
    let precision = match router.snapshot().spec.memory.vectors {
        prism_api::pipeline::VectorPrecision::F32 => prism_memory::Precision::F32,
        prism_api::pipeline::VectorPrecision::Bf16 => prism_memory::Precision::Bf16,
    };
    let memory = match (&args.memory_path, &args.memory_url) {
        (Some(_), Some(_)) => {
            // clap refuses the pair already; this guards a future change of the flags.
            bail!("--memory-path (embedded SQLite) and --memory-url / PRISM_MEMORY_URL (PostgreSQL) exclude each other: give one")
        }
        (Some(path), None) => {
            // A file-size limit (RLIMIT_FSIZE) must fail the memory write, not kill the router: with
            // a handler installed, the kernel's SIGXFSZ becomes an EFBIG the store reports as a
            // failed write (answers then say recorded: false).
            const SIGXFSZ: i32 = 25;
            if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(SIGXFSZ)) {
                tokio::spawn(async move { while s.recv().await.is_some() {} });
            }
            Some(prism_memory::Memory::open_with(path, precision)?)
        }
        // The error names host and database, never the password.
        (None, Some(url)) => Some(prism_memory::Memory::open_postgres_with(url, precision)?),
        (None, None) => None,
    };
    if let Some(memory) = &memory {
        info!(location = %memory.location(), index_vectors = %precision, "memory log on");
        router.set_memory(memory.clone())?;
        tokio::spawn(retention_loop(router.clone(), memory.clone()));
    }
    // With memory on, the request log itself is the answer cache (every whole answer is in it:
    // durable, and shared by the routers of one database); otherwise the last answers in this
    // process's RAM.
    if args.answer_cache_entries > 0 {
        match memory {
            Some(memory) => router.set_answer_cache(memory),
            None => router.set_answer_cache(Arc::new(prism_memory::RecentAnswers::new(args.answer_cache_entries))),
        }
    }
    Ok(())
}

/// Health probes, reloads of the table and spec (files or the ConfigMap), and the gRPC server.
async fn start_background_tasks(args: &Args, router: &Arc<Router>, tokens: &[String]) -> anyhow::Result<()> {
    tokio::spawn(router.clone().probe_loop());
    if args.routing_table.is_some() || args.pipeline.is_some() {
        tokio::spawn(config::watch_files(
            router.clone(),
            args.routing_table.clone(),
            args.pipeline.clone(),
            Duration::from_millis(args.reload_interval_ms.max(10)),
        ));
    }
    if let Some(cm) = &args.routing_configmap {
        let client = prism_router::cluster::client().await?;
        let (ns, name) = prism_router::cluster::parse_ref(cm, client.default_namespace())?;
        tokio::spawn(prism_router::cluster::watch_configmap(router.clone(), client, ns, name));
    }
    if let Some(addr) = args.grpc_listen {
        let (bound, fut) = prism_router::grpc::serve(router.clone(), addr, tokens.to_vec()).await?;
        println!("grpc listening on {bound}");
        tokio::spawn(async move {
            if let Err(e) = fut.await {
                tracing::error!(error = %e, "gRPC server stopped");
            }
        });
    }
    Ok(())
}

/// Serves the HTTP API until SIGTERM/Ctrl-C, then drains.
async fn serve_http(args: &Args, router: Arc<Router>, tokens: Vec<String>) -> anyhow::Result<()> {
    let opts = HttpOptions {
        tokens,
        max_body_bytes: args.max_body_bytes,
        rate_limit_rps: args.rate_limit_rps,
        rate_limit_burst: args.rate_limit_burst.unwrap_or(args.rate_limit_rps * 2.0),
        body_timeout: seconds("--body-timeout-s", args.body_timeout_s)?,
        cors_allow_origins: args.cors_allow_origin.clone(),
    };
    let limits = http::ConnLimits {
        header_read_timeout: seconds("--header-timeout-s", args.header_timeout_s)?,
        lame_duck: if args.shutdown_delay_s == 0.0 {
            Duration::ZERO
        } else {
            seconds("--shutdown-delay-s", args.shutdown_delay_s)?
        },
        ..Default::default()
    };
    let app = http::app(router.clone(), opts);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.listen))?;
    let local = listener.local_addr()?;
    // Printed on stdout, flushed: `prism up` and the tests read the port from it.
    println!("listening on http://{local}");
    info!(addr = %local, pipeline = %router.snapshot().pipeline, "router listening");
    http::serve(listener, app, limits, shutdown_signal()).await;
    info!("router stopped");
    Ok(())
}
