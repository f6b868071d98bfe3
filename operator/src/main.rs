//! prism-operator: wiring only (flags, logging, leader election, web server, controllers).

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use prism_operator::controller::{self, RunSettings};
use prism_operator::lease::{self, LeaseConfig};
use prism_operator::metrics::Metrics;
use prism_operator::server::{self, Health};
use prism_operator::OperatorConfig;
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(about = "Prism operator: reconciles ModalityNode and MultimodalPipeline")]
struct Args {
    /// Default prism-node image (ModalityNode spec.image overrides it).
    #[arg(long, env = "PRISM_NODE_IMAGE")]
    node_image: Option<String>,
    /// Default image of nodes that compute on a GPU (`device: cuda`, or `auto` with GPUs):
    /// prism-node built with `--features cuda` (node-image/Dockerfile.cuda).
    #[arg(long, env = "PRISM_NODE_IMAGE_CUDA")]
    node_image_cuda: Option<String>,
    /// Default prism-router image (MultimodalPipeline spec.routerImage overrides it).
    #[arg(long, env = "PRISM_ROUTER_IMAGE")]
    router_image: Option<String>,
    /// Default prism-train image of adaptation Jobs (ModalityNode spec.adaptation.image overrides it).
    #[arg(long, env = "PRISM_TRAIN_IMAGE")]
    train_image: Option<String>,
    /// imagePullPolicy of generated pods.
    #[arg(long)]
    image_pull_policy: Option<String>,
    /// A registry (`host` or `host:port`) whose oci:// models the fetch init container pulls
    /// over plain HTTP (an in-cluster registry without TLS). Repeat, or comma-separate.
    #[arg(long = "insecure-registry", env = "PRISM_INSECURE_REGISTRIES", value_delimiter = ',')]
    insecure_registries: Vec<String>,
    /// Watch only this namespace (default: all).
    #[arg(long, env = "PRISM_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of /metrics, /healthz, /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Log as JSON lines.
    #[arg(long, env = "PRISM_LOG_JSON")]
    log_json: bool,
    /// Elect a leader on a Lease (disable only when exactly one replica runs).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the Lease (default: the pod's namespace, else --namespace, else default).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    #[arg(long, default_value = "prism-operator-leader")]
    lease_name: String,
    /// This replica's identity in the Lease (default: hostname + pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    #[arg(long, default_value_t = 15)]
    lease_duration_s: u64,
    /// Prometheus the builtin autoscaler reads (PromQL over HTTP), e.g. http://prometheus:9090.
    /// Without it, builtin-mode nodes hold their replicas and report MetricsUnavailable.
    #[arg(long, env = "PRISM_PROMETHEUS_URL")]
    prometheus_url: Option<String>,
    /// Also match `namespace="<node's namespace>"` in PromQL (Prometheus' Kubernetes discovery
    /// adds that label; turn off when your scrape config does not).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    prometheus_match_namespace: bool,
    /// Concurrent reconciles per controller.
    #[arg(long, default_value_t = 8)]
    concurrency: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,kube=warn"));
    if args.log_json {
        tracing_subscriber::fmt()
            .log_internal_errors(false)
            .json()
            .with_env_filter(filter)
            .with_current_span(true)
            .init();
    } else {
        tracing_subscriber::fmt().log_internal_errors(false).with_env_filter(filter).init();
    }

    let metrics = Metrics::new().context("registering metrics")?;
    let kube_config = kube::Config::infer()
        .await
        .context("reading the Kubernetes client config (KUBECONFIG or in-cluster config)")?;
    let client = prism_operator::client::counting(kube_config, metrics.kube_requests.clone())
        .context("connecting to the Kubernetes API")?;
    controller::check_crds(&client).await.map_err(anyhow::Error::msg)?;

    let mut cfg = OperatorConfig::default();
    if let Some(i) = args.node_image {
        cfg.node_image = i;
    }
    if let Some(i) = args.node_image_cuda {
        cfg.node_image_cuda = i;
    }
    if let Some(i) = args.router_image {
        cfg.router_image = i;
    }
    if let Some(i) = args.train_image {
        cfg.train_image = i;
    }
    cfg.image_pull_policy = args.image_pull_policy;
    cfg.insecure_registries = args.insecure_registries;
    let identity = args.identity.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });

    let ready = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let health = Health { ready: ready.clone(), metrics: metrics.clone() };
    let mut web_stop = stop_rx.clone();
    let web = tokio::spawn(server::serve(args.metrics_addr, health, async move {
        let _ = web_stop.wait_for(|s| *s).await;
    }));

    // Leadership: wait for the lease before starting the controllers (only the leader writes).
    let (lead_tx, mut lead_rx) = tokio::sync::watch::channel(false);
    if args.leader_elect {
        let lcfg = LeaseConfig {
            name: args.lease_name,
            namespace: args.lease_namespace.or(args.namespace.clone()).unwrap_or_else(|| "default".into()),
            identity: identity.clone(),
            duration: Duration::from_secs(args.lease_duration_s),
            renew_every: Duration::from_secs((args.lease_duration_s / 3).max(1)),
        };
        tracing::info!(lease = %lcfg.name, namespace = %lcfg.namespace, %identity, "waiting for leadership");
        // A standby replica is healthy and ready to take over.
        ready.store(true, std::sync::atomic::Ordering::Release);
        tokio::spawn(lease::run(client.clone(), lcfg, lead_tx));
        tokio::select! {
            r = lead_rx.wait_for(|l| *l) => { r.context("lease task ended")?; }
            _ = shutdown_signal() => { let _ = stop_tx.send(true); return Ok(()); }
        }
    } else {
        lead_tx.send_replace(true);
    }

    let prometheus = match &args.prometheus_url {
        Some(u) => Some(prism_operator::prom::PromClient::new(u).context("--prometheus-url")?),
        None => {
            tracing::warn!("no --prometheus-url: builtin autoscaling holds replicas (MetricsUnavailable)");
            None
        }
    };
    let autoscaler =
        prism_operator::autoscale::Settings { prometheus, match_namespace: args.prometheus_match_namespace };
    let settings =
        RunSettings { cfg, namespace: args.namespace, instance: identity, concurrency: args.concurrency, autoscaler };
    let mut lost = lead_rx.clone();
    let leadership_lost = async move {
        let _ = lost.wait_for(|l| !*l).await;
    };
    let lost_flag = Arc::new(AtomicBool::new(false));
    let lost_flag2 = lost_flag.clone();
    controller::run(client, settings, metrics, ready, async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = leadership_lost => { lost_flag2.store(true, std::sync::atomic::Ordering::Release); }
        }
    })
    .await;
    let _ = stop_tx.send(true);
    let _ = web.await;
    if lost_flag.load(std::sync::atomic::Ordering::Acquire) {
        // Exit non-zero so the Deployment restarts us as a standby; never write without the lease.
        anyhow::bail!("lost leadership; exiting");
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            return;
        }
    }
    let _ = ctrl_c.await;
}
