//! `prism-node`: serves one model over HTTP (and optionally gRPC). Wiring only; logic is in the lib.
//!
//! `prism-node [SERVE FLAGS]` serves (the form the operator and `prism up` use); `prism-node fetch
//! --model-uri hf://...|oci://... --out DIR` downloads a model folder (the operator's init container);
//! `prism-node train ...` trains model updates (`prism train` runs it).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

mod train_command;

use anyhow::{bail, Context as _};
use clap::{CommandFactory as _, Parser};
use prism_node::backend::{self, DeviceChoice, LoadSpec};
use prism_node::fetch::{self, FetchOptions, ModelUri};
use prism_node::grpc::NodeService;
use prism_node::http::{self, AppState, NodeIdentity};
use prism_node::infer::{Infer, InferConfig};
use prism_node::metrics::Metrics;

/// Without a subcommand the flags are the server's: `prism-node --listen ... --model-uri ...`.
#[derive(Parser, Debug)]
#[command(
    name = "prism-node",
    about = "Prism node: serves one embedding model over HTTP and gRPC",
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Args,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Download an hf:// or oci:// model into a folder to serve (the operator's init container).
    /// Tokens come from the environment: HF_TOKEN (Hugging Face), OCI_TOKEN (registry Bearer token).
    Fetch(FetchArgs),
    /// Train model updates with candle on this machine (`prism train` runs this; see
    /// `prism-node train shared-space --help`).
    Train {
        #[command(subcommand)]
        what: train_command::TrainCmd,
    },
}

#[derive(clap::Args, Debug)]
struct FetchArgs {
    /// hf://ORG/NAME[@REVISION] (revision `main` by default) or
    /// oci://HOST[:PORT]/REPOSITORY[:TAG|@sha256:DIGEST] (an `oras push`ed artifact).
    #[arg(long)]
    model_uri: String,
    /// Folder to write the files into; created if missing.
    #[arg(long)]
    out: std::path::PathBuf,
    /// Architecture that will serve the folder: the files it needs (e.g. tokenizer.json for bert)
    /// become required, not optional.
    #[arg(long, env = "PRISM_ARCHITECTURE")]
    architecture: Option<String>,
    /// After the download, load the model once on the CPU as the server would (needs --architecture).
    #[arg(long)]
    verify_load: bool,
    /// Hugging Face endpoint (a mirror or proxy of the Hub).
    #[arg(long, env = "HF_ENDPOINT", default_value = fetch::HF_DEFAULT_ENDPOINT)]
    hf_endpoint: String,
    /// Plain http to the registry (loopback registries always use http).
    #[arg(long, env = "OCI_INSECURE", value_parser = clap::builder::BoolishValueParser::new())]
    insecure_http: bool,
    /// Tries per request on connection errors, 408, 429 and 5xx.
    #[arg(long, default_value_t = 3)]
    attempts: u32,
    /// Wait before the second try, in milliseconds; doubled for each further one.
    #[arg(long, default_value_t = 1000)]
    retry_backoff_ms: u64,
}

#[derive(clap::Args, Debug)]
struct Args {
    /// HTTP address; port 0 picks a free port (printed as `listening on http://ADDR`).
    #[arg(long, env = "PRISM_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// gRPC address (prism.v1.Node + grpc.health.v1); printed as `grpc listening on ADDR`.
    #[arg(long, env = "PRISM_GRPC_LISTEN")]
    grpc_listen: Option<SocketAddr>,
    /// After SIGTERM, keep serving this many seconds before draining: a pod being replaced is
    /// still in routers' tables until they see it go, and a closed port there fails calls.
    #[arg(long, env = "PRISM_SHUTDOWN_DELAY_S", default_value_t = 0.0)]
    shutdown_delay_s: f64,
    /// Name reported in answers and in the `node` metrics label (the ModalityNode name).
    #[arg(long, env = "PRISM_NODE_NAME", default_value = "node")]
    node_name: String,
    /// Modality served; defaults to the architecture's. A mismatch is a startup error.
    #[arg(long, env = "PRISM_MODALITY")]
    modality: Option<String>,
    /// Model folder: file:///path or a plain path (HF layout). Required.
    // An Option only so that `fetch` parses without it; `main` reports it missing when serving.
    #[arg(long, env = "PRISM_MODEL_URI")]
    model_uri: Option<String>,
    /// Architecture from the registry (e.g. bert).
    #[arg(long, env = "PRISM_ARCHITECTURE", default_value = "bert")]
    architecture: String,
    /// Model revision reported in answers (spec.model.revision).
    #[arg(long, env = "PRISM_REVISION", default_value = "unversioned")]
    revision: String,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key); the router trusts its CA
    /// with --node-ca. Plain HTTP when not given.
    #[arg(long, env = "PRISM_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "PRISM_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[arg(long, env = "PRISM_DEVICE", value_enum, default_value = "auto")]
    device: DeviceChoice,
    /// Most inputs per forward pass.
    #[arg(long, env = "PRISM_MAX_BATCH", default_value_t = 32)]
    max_batch: usize,
    /// Most cost per forward pass: tokens of text, frames computed of audio, one per image. One
    /// input over it still runs, alone.
    #[arg(long, env = "PRISM_MAX_BATCH_TOKENS", default_value_t = 16384)]
    max_batch_tokens: usize,
    /// How long an idle model waits to fill a batch, in milliseconds.
    #[arg(long, env = "PRISM_MAX_WAIT_MS", default_value_t = 2)]
    max_wait_ms: u64,
    /// Most requests waiting in the queue before answering 429 / RESOURCE_EXHAUSTED.
    #[arg(long, env = "PRISM_MAX_QUEUE", default_value_t = 256)]
    max_queue: usize,
    /// Most inputs in one request.
    #[arg(long, env = "PRISM_MAX_INPUTS", default_value_t = 256)]
    max_inputs: usize,
    /// Deadline of requests that carry none, in milliseconds.
    #[arg(long, env = "PRISM_DEFAULT_DEADLINE_MS", default_value_t = 30_000)]
    default_deadline_ms: u64,
    /// Largest accepted HTTP body.
    #[arg(long, env = "PRISM_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    max_body_bytes: usize,
    /// A LoRA adapter merged into the weights at start (`spec.model.adapters`), as
    /// `name=NAME,rank=R,alpha=A,path=FILE` (a safetensors file of lora_A/lora_B pairs, or a
    /// PEFT output folder). Repeat for several: merged in the order given. A rank that differs
    /// from the file's, or an adapter that matches no weight of the model, is a startup error.
    #[arg(long = "adapter", value_name = "name=NAME,rank=R,alpha=A,path=FILE")]
    adapters: Vec<backend::NamedAdapter>,
    /// Truncation limit for token-based models (default: the model's, 256 for BERT).
    #[arg(long, env = "PRISM_MAX_INPUT_TOKENS")]
    max_input_tokens: Option<usize>,
    /// Sliding-window attention (`spec.model.attention`): each token attends to this many tokens,
    /// itself and half of them on each side, computed band by band (bert on CPU,
    /// whisper-encoder). Other architectures refuse it at start. Unset: full attention.
    #[arg(long, env = "PRISM_ATTENTION_WINDOW", value_parser = clap::value_parser!(u32).range(1..))]
    attention_window: Option<u32>,
    /// Audio models: `full` computes whisper's padded 30 s window as it was trained; `clip`
    /// encodes only the clip's own frames (a 2 s clip costs 100 encoder frames, not 1500). Heads
    /// and fusion nodes must be trained on the setting they are served with.
    #[arg(long, env = "PRISM_AUDIO_WINDOW", value_enum, default_value_t = backend::AudioWindow::Full)]
    audio_window: backend::AudioWindow,
    /// CPU threads for the forward pass (default: all cores, or RAYON_NUM_THREADS). On small CPU
    /// pods one thread per replica, with more replicas, beats one replica with several threads.
    #[arg(long, env = "PRISM_THREADS")]
    threads: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Train { what }) = cli.command {
        return train_command::run(what);
    }
    if let Some(Command::Fetch(f)) = cli.command {
        // Plain `error: ...` lines and exit code 1: this runs as an init container whose log is
        // read by people (kubectl logs -c fetch-model).
        if let Err(e) = run_fetch(f) {
            eprintln!("prism-node fetch: error: {e:#}");
            std::process::exit(1);
        }
        return Ok(());
    }
    let args = cli.serve;
    if args.model_uri.is_none() {
        Cli::command()
            .error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "the following required argument was not provided: --model-uri <MODEL_URI>",
            )
            .exit();
    }
    if let Some(n) = args.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        // candle (and rayon) read this once, on first use; set it before any thread exists.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // Logs go to stderr: stdout carries only the `listening on` lines a parent process reads.
    tracing_subscriber::fmt()
        .log_internal_errors(false)
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal; in pods and test logs they are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    if args.max_batch == 0 || args.max_batch_tokens == 0 || args.max_queue == 0 || args.max_inputs == 0 {
        bail!("--max-batch, --max-batch-tokens, --max-queue and --max-inputs must be at least 1");
    }
    if !(args.shutdown_delay_s.is_finite() && (0.0..=3600.0).contains(&args.shutdown_delay_s)) {
        bail!("--shutdown-delay-s must be between 0 and 3600 seconds, got {}", args.shutdown_delay_s);
    }
    let arch = backend::lookup(&args.architecture)?;
    let modality = args.modality.clone().unwrap_or_else(|| arch.modality.to_string());
    if modality != arch.modality {
        bail!(
            "--modality {modality} does not match --architecture {} (which serves {}); fix one of the two",
            arch.name,
            arch.modality
        );
    }
    let dir = backend::resolve_model_uri(args.model_uri.as_deref().unwrap_or_default())?;

    let metrics = Metrics::new(&args.node_name, &modality).context("registering metrics")?;
    let state = AppState {
        infer: Arc::new(OnceLock::new()),
        metrics: metrics.clone(),
        id: Arc::new(NodeIdentity {
            node: args.node_name.clone(),
            modality: modality.clone(),
            architecture: arch.name.to_string(),
            revision: args.revision.clone(),
        }),
        max_body_bytes: args.max_body_bytes,
    };

    // Bind first so /live answers (and the port is known) while the model loads.
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding --listen {}", args.listen))?;
    let addr = listener.local_addr()?;
    let grpc_listener = match args.grpc_listen {
        Some(a) => Some(tokio::net::TcpListener::bind(a).await.with_context(|| format!("binding --grpc-listen {a}"))?),
        None => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => Some(tls_acceptor(c, k)?),
        _ => None,
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}://{addr}", if tls.is_some() { "https" } else { "http" })?;
        if let Some(l) = &grpc_listener {
            writeln!(out, "grpc listening on {}", l.local_addr()?)?;
        }
        out.flush()?;
    }

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_not_serving::<prism_node::pb::node_server::NodeServer<NodeService>>().await;
    health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;

    let delay = std::time::Duration::from_secs_f64(args.shutdown_delay_s);
    let http_app = http::router(state.clone());
    let http_task = tokio::spawn(async move {
        match tls {
            Some(acceptor) => {
                serve_tls(listener, http_app, acceptor, shutdown_signal(delay)).await;
                Ok(())
            }
            None => axum::serve(listener, http_app).with_graceful_shutdown(shutdown_signal(delay)).await,
        }
    });
    let grpc_task = grpc_listener.map(|l| {
        let svc = NodeService::server(state.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(svc)
                .serve_with_incoming_shutdown(tokio_stream_from(l), shutdown_signal(delay))
                .await
        })
    });

    // Load + warm up. A failure exits the process: a pod that can never become ready should crash
    // visibly (CrashLoopBackOff with this message) rather than sit unready.
    let spec = LoadSpec {
        dir: dir.clone(),
        device: args.device,
        max_input_tokens: args.max_input_tokens,
        adapters: args.adapters.clone(),
        attention_window: args.attention_window.map(|w| w as usize),
        audio_window: args.audio_window,
    };
    let started = std::time::Instant::now();
    let model = tokio::task::spawn_blocking(move || arch.load_model(&spec))
        .await
        .context("model loader panicked")?
        .with_context(|| format!("loading {} model from {}", arch.name, dir.display()))?;
    let config = InferConfig {
        max_batch: args.max_batch,
        max_batch_tokens: args.max_batch_tokens,
        max_wait: Duration::from_millis(args.max_wait_ms),
        max_queue: args.max_queue,
        max_inputs: args.max_inputs,
        default_deadline: Duration::from_millis(args.default_deadline_ms),
    };
    let info = model.info.clone();
    let infer = Infer::start(model, config, metrics).await.context("warming up the model")?;
    // After the load, so it follows the device the model actually got (`auto` may mean CPU).
    let _gpu_telemetry = prism_node::gpu::start(&state.metrics, &info.device);
    let _ = state.infer.set(infer);
    health_reporter.set_serving::<prism_node::pb::node_server::NodeServer<NodeService>>().await;
    health_reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
    tracing::info!(
        node = %args.node_name, architecture = arch.name, device = %info.device, dim = info.dim,
        load_ms = started.elapsed().as_millis() as u64, "model loaded and warmed; ready"
    );

    http_task.await.context("http server task")?.context("http server")?;
    if let Some(t) = grpc_task {
        t.await.context("grpc server task")?.context("grpc server")?;
    }
    Ok(())
}

fn run_fetch(f: FetchArgs) -> anyhow::Result<()> {
    let uri = ModelUri::parse(&f.model_uri)?;
    let arch = f.architecture.as_deref().map(backend::lookup).transpose()?;
    if f.verify_load && arch.is_none() {
        bail!("--verify-load needs --architecture");
    }
    let opts = FetchOptions {
        hf_endpoint: f.hf_endpoint,
        insecure_http: f.insecure_http,
        architecture: arch,
        attempts: f.attempts,
        backoff: Duration::from_millis(f.retry_backoff_ms),
        ..FetchOptions::new(&f.out)
    }
    .with_env_tokens();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    rt.block_on(fetch::fetch(&uri, &opts))?;
    if let Some(a) = arch.filter(|_| f.verify_load) {
        let started = std::time::Instant::now();
        let spec = LoadSpec::new(f.out.clone(), DeviceChoice::Cpu);
        let model = a.load_model(&spec).with_context(|| format!("loading the fetched folder as {}", a.name))?;
        eprintln!(
            "verified: {} loads as {} (dim {}) in {:.1}s",
            f.out.display(),
            a.name,
            model.info.dim,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// A TLS acceptor from PEM files, with a clear error for each way they can be wrong.
fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading --tls-cert {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("--tls-cert {} is not a PEM certificate chain", cert.display()))?;
    if certs.is_empty() {
        bail!("--tls-cert {} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("--tls-key {} holds no PEM private key", key.display()))?;
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("--tls-cert and --tls-key do not match")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}

/// HTTPS: TLS handshake (bounded, so a silent client cannot hold a task), then HTTP/1.1 or h2.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    acceptor: tokio_rustls::TlsAcceptor,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower::ServiceExt;
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(std::time::Duration::from_secs(60));
    let builder = std::sync::Arc::new(builder);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let (acceptor, app, builder, watcher) = (acceptor.clone(), app.clone(), builder.clone(), graceful.watcher());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => return,
            };
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                app.clone().oneshot(req.map(axum::body::Body::new))
            });
            let _ = watcher.watch(builder.serve_connection_with_upgrades(TokioIo::new(tls), svc)).await;
        });
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), graceful.shutdown()).await;
}

fn tokio_stream_from(
    l: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(l, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            // Small embedding requests: do not let Nagle delay answers.
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    })
}

/// SIGTERM or Ctrl-C, then `delay` more seconds of serving (see `--shutdown-delay-s`).
async fn shutdown_signal(delay: std::time::Duration) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    if !delay.is_zero() {
        tracing::info!(seconds = delay.as_secs_f64(), "stopping: serving on until routers drop this replica");
        tokio::time::sleep(delay).await;
    }
}
