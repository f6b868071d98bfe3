//! The local substrate behind `prism up`: the same ModalityNode/MultimodalPipeline manifests a
//! cluster takes, run as processes on loopback. Each replica is a `prism-node` process; a
//! `prism-router` fronts them. A supervisor loop plays the parts of kubelet and operator:
//! it restarts replicas that die (with backoff), probes `/ready`, and rewrites the router's
//! routing table through its admin API the moment readiness changes — with the same
//! `build_table` the operator uses. Nodes with builtin autoscaling are scaled by the operator's
//! own decision code, reading a Prometheus that `prism up` starts and points at the replicas.

mod metrics;
mod process;
mod prometheus;
mod rollout;
mod state;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use kube::ResourceExt;
use prism_api::node::ScaleEvent;
use prism_api::routing::{build_table, NodeObservation, RoutingTable};
use prism_api::{ManifestSet, ModalityNode, MultimodalPipeline};
use prism_operator::autoscale::{self, Decision, Replicas, ScalerState};
use prism_operator::prom::{node_selector, PromClient};

use process::{probe, Proc};
use prometheus::LocalPrometheus;
pub use state::{down, logs, status};
use state::{AutoscalerState, NodeState, ReplicaState, State};

#[derive(Args, Clone, Debug)]
pub struct StateArgs {
    /// Folder holding the running pipeline's state, logs and routing table.
    #[arg(long, env = "PRISM_STATE_DIR", default_value = ".prism")]
    pub state_dir: PathBuf,
}

#[derive(Args, Clone, Debug)]
pub struct LogsArgs {
    /// Node name, or `router`.
    pub node: String,
    /// Lines per log.
    #[arg(long, default_value_t = 50)]
    pub tail: usize,
    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Args, Clone, Debug)]
pub struct UpArgs {
    /// Manifest files holding the pipeline and its ModalityNodes (repeatable).
    #[arg(short = 'f', long = "filename", required = true)]
    pub files: Vec<PathBuf>,
    /// Which pipeline to run when the manifests hold several.
    #[arg(long)]
    pub pipeline: Option<String>,
    /// Router port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Where `pvc://<claim>/<path>` model URIs point locally: `<models-dir>/<path>`.
    #[arg(long, env = "PRISM_MODELS_DIR", default_value = ".cache/models")]
    pub models_dir: PathBuf,
    /// The prism-node binary (default: next to this `prism`, then PATH).
    #[arg(long, env = "PRISM_NODE_BIN")]
    pub node_bin: Option<PathBuf>,
    /// The prism-router binary (default: next to this `prism`, then PATH).
    #[arg(long, env = "PRISM_ROUTER_BIN")]
    pub router_bin: Option<PathBuf>,
    /// Metrics for builtin autoscaling: `auto` starts a local Prometheus when a node autoscales
    /// (and the binary is found), `off` disables autoscaling, or the URL of a running Prometheus.
    #[arg(long, env = "PRISM_PROMETHEUS", default_value = "auto")]
    pub prometheus: String,
    /// The prometheus binary `--prometheus auto` starts.
    #[arg(long, env = "PRISM_PROMETHEUS_BIN", default_value = "prometheus")]
    pub prometheus_bin: PathBuf,
    /// Seconds to wait for every node to load its model and become ready.
    #[arg(long, default_value_t = 180)]
    pub ready_timeout: u64,
    #[command(flatten)]
    pub state: StateArgs,
}

/// Reads and merges manifest files.
pub fn load_manifests(files: &[PathBuf]) -> anyhow::Result<ManifestSet> {
    let mut set = ManifestSet::default();
    for f in files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        set.add_yaml(&text).with_context(|| format!("in {}", f.display()))?;
    }
    Ok(set)
}

/// Local path of a model URI: `file:///abs`, `file://rel` (relative to the working folder),
/// or `pvc://claim/sub/path` -> `<models_dir>/sub/path` (the claim is the cluster's models PVC).
pub fn resolve_model_path(uri: &str, models_dir: &Path) -> anyhow::Result<PathBuf> {
    if prism_api::node::uri_escapes_its_root(uri) {
        bail!("model uri {uri:?}: `..` path segments (plain or percent-encoded) are refused");
    }
    if let Some(p) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(p));
    }
    if let Some(rest) = uri.strip_prefix("pvc://") {
        let sub = rest.split_once('/').map(|(_, p)| p).unwrap_or("");
        if sub.is_empty() {
            bail!("model uri {uri:?}: expected pvc://<claim>/<path>");
        }
        return Ok(models_dir.join(sub));
    }
    bail!("model uri {uri:?}: `prism up` reads file:// and pvc:// models (hf:// and oci:// need a cluster with an init container); fetch weights with `make models`")
}

pub(crate) fn sibling_or_path(explicit: &Option<PathBuf>, name: &str) -> PathBuf {
    if let Some(p) = explicit {
        return p.clone();
    }
    if let Ok(me) = std::env::current_exe() {
        let sib = me.with_file_name(name);
        if sib.exists() {
            return sib;
        }
    }
    PathBuf::from(name)
}

/// One replica as the supervisor tracks it.
struct Replica {
    proc: Option<Proc>,
    url: Option<String>,
    ready: bool,
    restarts: u32,
    restart_at: Option<Instant>,
    log: PathBuf,
    /// Model revision this replica runs.
    revision: String,
}

impl Replica {
    fn new(log: PathBuf, revision: &str) -> Self {
        Self {
            proc: None,
            url: None,
            ready: false,
            restarts: 0,
            restart_at: Some(Instant::now()),
            log,
            revision: revision.to_string(),
        }
    }
}

struct LocalNode {
    /// The node as the manifests say now (reloaded when a file changes).
    spec: ModalityNode,
    /// Arguments of the stable replicas (the stable revision's model).
    args: Vec<String>,
    replicas: Vec<Replica>,
    /// Replicas of the canary revision, and their arguments.
    canary: Vec<Replica>,
    canary_args: Vec<String>,
    /// Replicas of a replaced revision, serving until every new stable replica is ready.
    retiring: Vec<Replica>,
    /// current revision, canary and history, as `status` holds them in a cluster.
    status: prism_api::node::ModalityNodeStatus,
    step_started: Instant,
    /// Last hold reason printed (printed again only when it changes).
    hold_reason: Option<String>,
    logs_dir: PathBuf,
    scaler: ScalerState,
    next_decision: Instant,
    last_decision: Option<Decision>,
    last_scale: Option<ScaleEvent>,
}

impl LocalNode {
    fn name(&self) -> String {
        self.spec.name_any()
    }

    fn stable_revision(&self) -> String {
        self.status.current_revision.clone().unwrap_or_else(|| self.spec.spec.model.revision.clone())
    }

    /// Every replica list with the arguments its dead replicas restart with (none: retiring
    /// replicas are not restarted).
    fn lists_mut(&mut self) -> [(&mut Vec<Replica>, Option<&Vec<String>>); 3] {
        let LocalNode { replicas, canary, retiring, args, canary_args, .. } = self;
        [(replicas, Some(args)), (canary, Some(canary_args)), (retiring, None)]
    }

    fn all_replicas(&self) -> impl Iterator<Item = &Replica> {
        self.replicas.iter().chain(&self.canary).chain(&self.retiring)
    }

    /// Grows or shrinks to `n` replicas. New ones start on the next supervisor pass; removed ones
    /// leave the routing table on this pass and are stopped a moment later, once the router has
    /// the table without them, so no request is sent to a stopping replica.
    fn scale_to(&mut self, n: usize) {
        let name = self.name();
        let revision = self.stable_revision();
        while self.replicas.len() < n {
            let i = self.replicas.len();
            self.replicas.push(Replica::new(replica_log(&self.logs_dir, &name, i), &revision));
        }
        while self.replicas.len() > n {
            let Some(r) = self.replicas.pop() else { break };
            stop_soon(r);
        }
    }

    fn observation(&self) -> NodeObservation {
        let stable = self.stable_revision();
        NodeObservation {
            node: self.name(),
            modality: self.spec.spec.modality.clone(),
            revision: stable.clone(),
            endpoints: self.all_replicas().filter_map(|r| r.url.clone().map(|u| (u, r.ready))).collect(),
            revisions: self
                .all_replicas()
                .filter(|r| r.revision != stable)
                .filter_map(|r| Some((r.url.clone()?, r.revision.clone())))
                .collect(),
            canary: self.status.canary.clone(),
        }
    }
}

/// Stops a replica that has just left the routing table, a moment later: once the router has
/// the table without it, so no request is sent to a stopping replica.
fn stop_soon(mut r: Replica) {
    if let Some(mut p) = r.proc.take() {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            p.stop(Duration::from_secs(5)).await;
        });
    }
}

/// prism-node's arguments for `n`, its model at `model_path` and its adapters' URIs mapped as
/// model URIs are (file:// as is, pvc://claim/p under `models_dir`).
fn node_args(n: &ModalityNode, model_path: &Path, models_dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut adapters = Vec::new();
    for a in &n.spec.model.adapters {
        let path = resolve_model_path(&a.uri, models_dir).with_context(|| format!("adapter {:?}", a.name))?;
        if !path.exists() {
            bail!("node {}: adapter {:?}: {} does not exist (from {})", n.name_any(), a.name, path.display(), a.uri);
        }
        adapters.push(path.display().to_string());
    }
    Ok(n.spec.server_args(&n.name_any(), "127.0.0.1:0", None, &model_path.display().to_string(), &adapters))
}

fn pick_pipeline(set: &ManifestSet, wanted: Option<&str>) -> anyhow::Result<MultimodalPipeline> {
    match (wanted, set.pipelines.as_slice()) {
        (_, []) => bail!("the manifests hold no MultimodalPipeline; add one (see examples/)"),
        (None, [one]) => Ok(one.clone()),
        (None, many) => {
            let names: Vec<String> = many.iter().map(|p| p.name_any()).collect();
            bail!("the manifests hold several pipelines ({}); choose one with --pipeline", names.join(", "))
        }
        (Some(w), all) => all
            .iter()
            .find(|p| p.name_any() == w)
            .cloned()
            .with_context(|| format!("no pipeline named {w:?} in the manifests")),
    }
}

/// Backoff before restarting a replica that died, like kubelet's CrashLoopBackOff (capped low
/// because a local pipeline should heal quickly).
fn restart_delay(restarts: u32) -> Duration {
    Duration::from_millis((500u64 << restarts.min(4)).min(8000))
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let set = load_manifests(&args.files)?;
    if let Err(errors) = set.validate() {
        for e in &errors {
            eprintln!("invalid: {e}");
        }
        bail!("the manifests have {} problem(s); nothing was started", errors.len());
    }
    let pipeline = pick_pipeline(&set, args.pipeline.as_deref())?;
    let pname = pipeline.name_any();
    let dir = args.state.state_dir.clone();
    if let Ok(existing) = State::load(&dir) {
        bail!(
            "pipeline {} is already running from {} (pid {}); stop it with `prism down`",
            existing.pipeline,
            dir.display(),
            existing.pid
        );
    }
    let logs_dir = dir.join("logs");
    std::fs::create_dir_all(&logs_dir).with_context(|| format!("creating {}", logs_dir.display()))?;
    let node_bin = sibling_or_path(&args.node_bin, "prism-node");
    let router_bin = sibling_or_path(&args.router_bin, "prism-router");
    let http = reqwest::Client::builder().no_proxy().build()?;

    let nodes = local_nodes(&set, &pipeline, &args.models_dir, &logs_dir)?;
    println!("prism up: pipeline {pname} with {} node(s)", nodes.len());
    print_local_notes(&nodes);
    let autoscaled: Vec<String> =
        nodes.iter().filter(|n| autoscale::is_autoscaled(&n.spec.spec)).map(LocalNode::name).collect();
    let prom = metrics_source(&args, &dir, &http, &autoscaled).await?;
    let mut sup = Supervisor {
        nodes,
        manifests: rollout::Manifests::new(&args.files, &pname),
        models_dir: args.models_dir.clone(),
        http: http.clone(),
        node_bin,
        spec: pipeline.spec.clone(),
        table: None,
        router_url: None,
        pipeline: pname.clone(),
        p95_ms: Default::default(),
        last_scrape: Instant::now(),
        prom,
        started,
    };
    sup.start_due_replicas()?;
    let deadline = Instant::now() + Duration::from_secs(args.ready_timeout);
    sup.wait_until_ready(deadline, args.ready_timeout).await?;

    // Router, with the first routing table and the pipeline spec as files.
    let table = sup.current_table();
    let table_path = dir.join("routing-table.json");
    let spec_path = dir.join("pipeline.json");
    write_atomic(&table_path, &serde_json::to_vec_pretty(&table)?)?;
    write_atomic(&spec_path, &serde_json::to_vec_pretty(&pipeline)?)?;
    sup.table = Some(table);
    let router_log = logs_dir.join("router.log");
    let _ = std::fs::remove_file(&router_log);
    let router = LocalRouter {
        bin: router_bin,
        args: router_args(&pipeline, &dir, &spec_path, &table_path, args.port),
        log: router_log,
    };
    let (proc, router_url) = match router.start(&http, deadline).await {
        Ok(started) => started,
        Err(e) => {
            sup.stop_all().await;
            sup.stop_prometheus().await;
            return Err(e);
        }
    };
    sup.router_url = Some(router_url.clone());
    let state = sup.state(&router.log);
    state.save(&dir)?;
    println!("router: {router_url}");
    println!("ready in {:.1}s. Try:\n  curl -s {router_url}/v1/infer -H 'content-type: application/json' -d '{{\"inputs\": {{\"text\": \"a dog playing in the snow\"}}}}'\n  prism status | prism logs NODE | prism down (or Ctrl-C)", started.elapsed().as_secs_f64());
    print!("{}", state.render());

    let mut proc = supervise(&mut sup, &router, proc, state, &dir, &table_path).await?;
    println!("stopping pipeline {pname}...");
    proc.stop(Duration::from_secs(3)).await;
    sup.stop_all().await;
    sup.stop_prometheus().await;
    let _ = std::fs::remove_file(state::path(&dir));
    println!("stopped");
    Ok(())
}

/// One local node per node of the pipeline, each with its model folder checked and its first
/// revision recorded as deployed (the rollout takes it from there).
fn local_nodes(
    set: &ManifestSet,
    pipeline: &MultimodalPipeline,
    models_dir: &Path,
    logs_dir: &Path,
) -> anyhow::Result<Vec<LocalNode>> {
    let mut nodes = Vec::new();
    for pn in &pipeline.spec.nodes {
        let n = set.node(&pn.name).context("validated above")?.clone();
        let model_path = resolve_model_path(&n.spec.model.uri, models_dir)?;
        if !model_path.exists() {
            bail!(
                "node {}: model folder {} does not exist (from {}); run `make models` or fix model.uri",
                pn.name,
                model_path.display(),
                n.spec.model.uri
            );
        }
        let count = n.spec.initial_replicas().max(1) as usize;
        let revision = n.spec.model.revision.clone();
        let replicas = (0..count).map(|i| Replica::new(replica_log(logs_dir, &pn.name, i), &revision)).collect();
        let args = node_args(&n, &model_path, models_dir)?;
        let mut status = prism_api::node::ModalityNodeStatus::default();
        prism_operator::rollout::apply(
            &n.spec,
            &mut status,
            &prism_operator::rollout::Transition::Deploy,
            &prism_operator::now_rfc3339(),
        );
        nodes.push(LocalNode {
            spec: n,
            args,
            replicas,
            canary: Vec::new(),
            canary_args: Vec::new(),
            retiring: Vec::new(),
            status,
            step_started: Instant::now(),
            hold_reason: None,
            logs_dir: logs_dir.to_path_buf(),
            scaler: ScalerState::default(),
            next_decision: Instant::now(),
            last_decision: None,
            last_scale: None,
        });
    }
    for n in &nodes {
        for r in &n.replicas {
            let _ = std::fs::remove_file(&r.log);
        }
    }
    Ok(nodes)
}

/// What a cluster would do that `prism up` does differently, said once at start.
fn print_local_notes(nodes: &[LocalNode]) {
    for n in nodes.iter().filter(|n| n.spec.spec.tls.is_some()) {
        // The certificate lives in a cluster Secret; on loopback there is no network to protect.
        println!(
            "note: node {}: spec.tls applies in a cluster; prism up serves it over plain HTTP on loopback",
            n.name()
        );
    }
    for n in nodes.iter().filter(|n| n.spec.spec.adaptation.is_some()) {
        // Adaptation runs as a cluster Job; locally the same script runs under torchrun by hand.
        println!(
            "note: node {}: spec.adaptation runs as a Job in a cluster; locally run train/prism_train.py under torchrun (docs/distributed-training.md)",
            n.name()
        );
    }
}

/// The router's command line. memory.enabled: the request log lives with the rest of the local
/// state (or at memory.store.path), and survives `prism down` / `prism up`.
fn router_args(pipeline: &MultimodalPipeline, dir: &Path, spec: &Path, table: &Path, port: u16) -> Vec<String> {
    let mut args = vec![
        "--pipeline".to_string(),
        spec.display().to_string(),
        "--routing-table".into(),
        table.display().to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
    ];
    let memory = &pipeline.spec.memory;
    let shared_url = std::env::var("PRISM_MEMORY_URL").ok().filter(|u| !u.is_empty());
    if memory.enabled && memory.store.kind == "postgres" && shared_url.is_some() {
        // The router reads PRISM_MEMORY_URL from the environment it inherits (never from its
        // arguments, which `ps` shows with the password).
        println!("memory: PostgreSQL from PRISM_MEMORY_URL (store.kind postgres)");
    } else if memory.enabled {
        if memory.store.kind == "postgres" {
            println!("note: memory.store.kind postgres needs PRISM_MEMORY_URL locally (the cluster reads postgresSecret); using the embedded file");
        }
        let path = memory.store.path.clone().map_or_else(|| dir.join("memory.db"), PathBuf::from);
        args.extend(["--memory-path".into(), path.display().to_string()]);
    }
    args
}

/// How the local router is started (and restarted).
struct LocalRouter {
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
}

impl LocalRouter {
    /// Starts the router and waits until it answers /ready; returns the process and its URL.
    async fn start(&self, http: &reqwest::Client, deadline: Instant) -> anyhow::Result<(Proc, String)> {
        let mut router = Proc::spawn(&self.bin, &self.args, &self.log)?;
        loop {
            if let Some(why) = router.exited() {
                bail!("the router exited during start ({why}); last log lines:\n{}", router.log_tail(20));
            }
            if let Some(u) = router.bound_url() {
                if probe(http, &u, "/ready").await {
                    return Ok((router, u));
                }
            }
            if Instant::now() > deadline {
                router.stop(Duration::from_secs(2)).await;
                bail!("the router did not become ready; last log lines:\n{}", router.log_tail(20));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Supervises until Ctrl-C or SIGTERM (`prism down`): restarts what exits, autoscales, rolls
/// out, publishes routing tables and keeps the state file current. Returns the router process.
async fn supervise(
    sup: &mut Supervisor,
    router: &LocalRouter,
    mut proc: Proc,
    mut state: State,
    dir: &Path,
    table_path: &Path,
) -> anyhow::Result<Proc> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            _ = tick.tick() => {}
        }
        if let Some(why) = proc.exited() {
            eprintln!("router exited ({why}); restarting");
            proc = Proc::spawn(&router.bin, &router.args, &router.log)?;
        }
        sup.reap_and_restart()?;
        sup.observe().await;
        sup.autoscale().await;
        sup.rollout().await;
        if sup.last_scrape.elapsed() >= Duration::from_secs(2) {
            sup.scrape_p95().await;
        }
        let before = sup.table.as_ref().map(|t| t.generation).unwrap_or(0);
        sup.publish_table(table_path).await;
        let after = sup.table.as_ref().map(|t| t.generation).unwrap_or(0);
        if after != before {
            let missing = sup.table.as_ref().map(|t| t.missing_modalities()).unwrap_or_default();
            println!(
                "routing table gen {before} -> {after} ({})",
                if missing.is_empty() {
                    "all modalities served".to_string()
                } else {
                    format!("degraded: no ready replica for {}", missing.join(", "))
                }
            );
        }
        let new_state = sup.state(&router.log);
        if serde_json::to_value(&new_state).ok() != serde_json::to_value(&state).ok() {
            state = new_state;
            state.save(dir)?;
        }
    }
    Ok(proc)
}

struct Supervisor {
    nodes: Vec<LocalNode>,
    /// The manifest files, watched for model changes (which roll out as canaries).
    manifests: rollout::Manifests,
    models_dir: PathBuf,
    http: reqwest::Client,
    node_bin: PathBuf,
    spec: prism_api::MultimodalPipelineSpec,
    table: Option<RoutingTable>,
    router_url: Option<String>,
    pipeline: String,
    /// p95 request latency per node in ms, from the replicas' own histograms (since start).
    p95_ms: std::collections::BTreeMap<String, f64>,
    last_scrape: Instant,
    /// Where the autoscaler reads load (None: autoscaling off).
    prom: Option<MetricsSource>,
    started: Instant,
}

/// The Prometheus behind local autoscaling: one `prism up` started, or one the user runs.
enum MetricsSource {
    Local(Box<LocalPrometheus>, PromClient),
    External(PromClient),
}

impl MetricsSource {
    fn client(&self) -> &PromClient {
        match self {
            MetricsSource::Local(_, c) | MetricsSource::External(c) => c,
        }
    }
}

fn replica_log(dir: &Path, node: &str, i: usize) -> PathBuf {
    dir.join(format!("{node}-{i}.log"))
}

/// Chooses the metrics source for `--prometheus`, explaining what autoscaling will do.
async fn metrics_source(
    args: &UpArgs,
    dir: &Path,
    http: &reqwest::Client,
    autoscaled: &[String],
) -> anyhow::Result<Option<MetricsSource>> {
    if autoscaled.is_empty() || args.prometheus == "off" {
        if !autoscaled.is_empty() {
            println!("autoscaling off (--prometheus off): {} keep their initial replicas", autoscaled.join(", "));
        }
        return Ok(None);
    }
    if args.prometheus.starts_with("http://") || args.prometheus.starts_with("https://") {
        println!("autoscaling {} from {}", autoscaled.join(", "), args.prometheus);
        return Ok(Some(MetricsSource::External(PromClient::new(&args.prometheus)?)));
    }
    if args.prometheus != "auto" {
        bail!("--prometheus {:?}: expected auto, off or an http(s):// URL", args.prometheus);
    }
    match LocalPrometheus::start(&args.prometheus_bin, &dir.join("prometheus"), http).await {
        Ok(p) => {
            println!("autoscaling {} from a local Prometheus at {}", autoscaled.join(", "), p.url);
            let client = PromClient::new(&p.url)?;
            Ok(Some(MetricsSource::Local(Box::new(p), client)))
        }
        Err(e) => {
            println!(
                "autoscaling off: could not start {} ({e:#}); install it (apt install prometheus) or pass --prometheus URL",
                args.prometheus_bin.display()
            );
            Ok(None)
        }
    }
}

impl Supervisor {
    /// Waits for every replica to load its model, printing each as it becomes ready. A replica
    /// that crashes during start, or the deadline, stops everything with the reason.
    async fn wait_until_ready(&mut self, deadline: Instant, timeout_s: u64) -> anyhow::Result<()> {
        let mut reported = std::collections::BTreeSet::new();
        loop {
            self.observe().await;
            for n in &self.nodes {
                for (i, r) in n.replicas.iter().enumerate() {
                    if r.ready && reported.insert((n.name(), i)) {
                        println!(
                            "  ready  {:<12} {:<8} replica {i} at {} ({:.1}s)",
                            n.name(),
                            n.spec.spec.modality,
                            r.url.as_deref().unwrap_or("?"),
                            self.started.elapsed().as_secs_f64()
                        );
                    }
                }
            }
            if self.nodes.iter().all(|n| n.replicas.iter().all(|r| r.ready)) {
                return Ok(());
            }
            if let Some(msg) = self.crashed_during_start() {
                self.stop_all().await;
                self.stop_prometheus().await;
                bail!("{msg}");
            }
            if Instant::now() > deadline {
                let waiting: Vec<String> =
                    self.nodes.iter().filter(|n| n.replicas.iter().any(|r| !r.ready)).map(|n| n.name()).collect();
                self.stop_all().await;
                self.stop_prometheus().await;
                bail!("nodes {} were not ready within {timeout_s}s; see `.prism/logs/`", waiting.join(", "));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn start_due_replicas(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        for n in &mut self.nodes {
            for (list, args) in n.lists_mut() {
                let Some(args) = args else { continue };
                for r in list.iter_mut() {
                    if r.proc.is_none() && r.restart_at.is_some_and(|t| t <= now) {
                        r.proc = Some(Proc::spawn(&self.node_bin, args, &r.log)?);
                        r.restart_at = None;
                        r.url = None;
                    }
                }
            }
        }
        Ok(())
    }

    /// Notices dead replicas (marks them unready at once, so the next table drops them) and
    /// starts the ones whose backoff has passed.
    fn reap_and_restart(&mut self) -> anyhow::Result<()> {
        for n in &mut self.nodes {
            let name = n.spec.name_any();
            for (list, args) in n.lists_mut() {
                for (i, r) in list.iter_mut().enumerate() {
                    let Some(p) = r.proc.as_mut() else { continue };
                    if let Some(why) = p.exited() {
                        r.proc = None;
                        r.ready = false;
                        if args.is_none() {
                            continue;
                        }
                        let delay = restart_delay(r.restarts);
                        println!(
                            "node {name} replica {i} (revision {}) {why}; restarting in {:.1}s",
                            r.revision,
                            delay.as_secs_f64()
                        );
                        r.restarts += 1;
                        r.restart_at = Some(Instant::now() + delay);
                    }
                }
            }
        }
        self.start_due_replicas()
    }

    /// During start-up a replica that exits is a configuration problem, not a crash to retry.
    fn crashed_during_start(&mut self) -> Option<String> {
        for n in &mut self.nodes {
            for (i, r) in n.replicas.iter_mut().enumerate() {
                if let Some(p) = r.proc.as_mut() {
                    if let Some(why) = p.exited() {
                        return Some(format!(
                            "node {} replica {i} failed to start ({why}); last log lines:\n{}",
                            n.spec.name_any(),
                            p.log_tail(20)
                        ));
                    }
                }
            }
        }
        None
    }

    /// Learns bound URLs and probes readiness of every running replica, concurrently.
    async fn observe(&mut self) {
        let mut probes = Vec::new();
        for (ni, n) in self.nodes.iter_mut().enumerate() {
            for (li, (list, _)) in n.lists_mut().into_iter().enumerate() {
                for (ri, r) in list.iter_mut().enumerate() {
                    match &r.proc {
                        None => r.ready = false,
                        Some(p) => {
                            if r.url.is_none() {
                                r.url = p.bound_url();
                            }
                            if let Some(u) = r.url.clone() {
                                let http = self.http.clone();
                                probes.push(async move { (ni, li, ri, probe(&http, &u, "/ready").await) });
                            }
                        }
                    }
                }
            }
        }
        for (ni, li, ri, ok) in futures::future::join_all(probes).await {
            let Some(n) = self.nodes.get_mut(ni) else { continue };
            let mut lists = n.lists_mut();
            if let Some(r) = lists.get_mut(li).and_then(|(list, _)| list.get_mut(ri)) {
                r.ready = ok && r.proc.is_some();
            }
        }
    }

    fn current_table(&self) -> RoutingTable {
        let obs: Vec<NodeObservation> = self.nodes.iter().map(LocalNode::observation).collect();
        build_table(&self.pipeline, &self.spec, &obs, self.table.as_ref())
    }

    /// Rebuilds the table; when routes changed, writes the file and pushes it to the router.
    async fn publish_table(&mut self, path: &Path) {
        let table = self.current_table();
        if self.table.as_ref().is_some_and(|t| t.generation == table.generation) {
            return;
        }
        if let Ok(bytes) = serde_json::to_vec_pretty(&table) {
            if let Err(e) = write_atomic(path, &bytes) {
                eprintln!("writing {}: {e}", path.display());
            }
        }
        if let Some(url) = &self.router_url {
            let res = self
                .http
                .put(format!("{url}/admin/routing-table"))
                .json(&table)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            match res {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => eprintln!("router refused routing table gen {}: HTTP {}", table.generation, r.status()),
                Err(e) => eprintln!("pushing routing table gen {} to the router: {e}", table.generation),
            }
        }
        self.table = Some(table);
    }

    fn state(&self, router_log: &Path) -> State {
        State {
            pid: std::process::id(),
            pipeline: self.pipeline.clone(),
            router_url: self.router_url.clone(),
            router_log: router_log.to_path_buf(),
            routing_table_generation: self.table.as_ref().map(|t| t.generation).unwrap_or(0),
            missing_modalities: self.table.as_ref().map(|t| t.missing_modalities()).unwrap_or_default(),
            prometheus_url: self.prom.as_ref().map(|p| p.client().url().to_string()),
            prometheus_pid: match &self.prom {
                Some(MetricsSource::Local(p, _)) => p.pid(),
                _ => None,
            },
            nodes: self
                .nodes
                .iter()
                .map(|n| NodeState {
                    name: n.name(),
                    modality: n.spec.spec.modality.clone(),
                    architecture: n.spec.spec.model.architecture.clone(),
                    p95_ms: self.p95_ms.get(&n.name()).copied(),
                    autoscaler: (self.prom.is_some() && autoscale::is_autoscaled(&n.spec.spec)).then(|| {
                        let d = n.last_decision.as_ref();
                        AutoscalerState {
                            min: n.spec.spec.replicas.min,
                            max: n.spec.spec.replicas.max,
                            desired: d.map(|d| d.to),
                            reason: d.map(|d| d.reason.clone()),
                            last_scale: n.last_scale.clone(),
                            metrics_unavailable: d.and_then(|d| d.metrics_unavailable.clone()),
                            scaling_limited: d.and_then(|d| d.limited.clone()),
                        }
                    }),
                    replicas: n
                        .all_replicas()
                        .map(|r| ReplicaState {
                            pid: r.proc.as_ref().and_then(Proc::pid),
                            url: r.url.clone(),
                            ready: r.ready,
                            restarts: r.restarts,
                            log: r.log.clone(),
                            revision: r.revision.clone(),
                        })
                        .collect(),
                    revision: n.status.current_revision.clone(),
                    canary: n.status.canary.clone(),
                    history: n.status.history.clone(),
                })
                .collect(),
        }
    }

    /// Reads every ready replica's `/metrics` and keeps each node's p95 for the status table.
    async fn scrape_p95(&mut self) {
        self.last_scrape = Instant::now();
        for n in &self.nodes {
            let mut text = String::new();
            for r in n.all_replicas().filter(|r| r.ready) {
                let Some(url) = &r.url else { continue };
                let res = self.http.get(format!("{url}/metrics")).timeout(Duration::from_millis(500)).send().await;
                if let Ok(body) = res.and_then(|r| r.error_for_status()) {
                    text.push_str(&body.text().await.unwrap_or_default());
                }
            }
            if let Some(s) = metrics::histogram_quantile(&text, "prism_node_request_duration_seconds", 0.95) {
                self.p95_ms.insert(n.name(), s * 1000.0);
            }
        }
    }

    async fn stop_prometheus(&mut self) {
        if let Some(MetricsSource::Local(p, _)) = self.prom.as_mut() {
            p.stop().await;
        }
    }

    /// Runs each autoscaled node's decision when its interval is due and applies it: new
    /// replicas start like any other (and join the table once ready); removed ones leave the
    /// table first and are stopped after the router has the new table.
    async fn autoscale(&mut self) {
        let Some(src) = self.prom.as_mut() else { return };
        if let MetricsSource::Local(p, _) = src {
            p.supervise();
            let targets: Vec<String> = self
                .nodes
                .iter()
                .flat_map(|n| n.all_replicas())
                .filter_map(|r| r.url.as_deref().map(|u| u.trim_start_matches("http://").to_string()))
                .collect();
            p.set_targets(&targets);
        }
        let client = src.client().clone();
        let now = self.started.elapsed().as_secs_f64();
        for n in &mut self.nodes {
            if !autoscale::is_autoscaled(&n.spec.spec) || Instant::now() < n.next_decision {
                continue;
            }
            let a = &n.spec.spec.autoscaling;
            n.next_decision = Instant::now() + Duration::from_secs(a.interval_seconds.max(1).into());
            let name = n.spec.name_any();
            let reading = client.read_load(&node_selector(&name, None), a).await;
            let current = n.replicas.len() as i32;
            let ready = n.replicas.iter().filter(|r| r.ready).count() as i32;
            let d =
                autoscale::decide(a, &n.spec.spec.replicas, &mut n.scaler, now, Replicas { current, ready }, &reading);
            let was_unavailable = n.last_decision.as_ref().is_some_and(|l| l.metrics_unavailable.is_some());
            match (&d.metrics_unavailable, was_unavailable) {
                (Some(why), false) => {
                    println!("autoscale {name}: metrics unavailable, holding {current} replicas: {why}")
                }
                (None, true) => println!("autoscale {name}: metrics back"),
                _ => {}
            }
            if d.changed() {
                println!("autoscale {name}: {} -> {} replicas ({})", d.from, d.to, d.reason);
                n.last_scale = Some(ScaleEvent {
                    time: prism_operator::now_rfc3339(),
                    from: d.from,
                    to: d.to,
                    reason: d.reason.clone(),
                });
                n.scale_to(d.to as usize);
            }
            n.last_decision = Some(d);
        }
    }

    async fn stop_all(&mut self) {
        for n in &mut self.nodes {
            for (list, _) in n.lists_mut() {
                for r in list.iter_mut() {
                    if let Some(p) = r.proc.as_mut() {
                        p.stop(Duration::from_secs(3)).await;
                    }
                    r.proc = None;
                }
            }
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_uris_map_to_local_folders() {
        let m = Path::new("/models");
        assert_eq!(
            resolve_model_path("pvc://models/all-minilm-l6-v2", m).unwrap(),
            PathBuf::from("/models/all-minilm-l6-v2")
        );
        assert_eq!(resolve_model_path("file:///opt/m", m).unwrap(), PathBuf::from("/opt/m"));
        assert!(resolve_model_path("pvc://models/../etc", m).is_err());
        assert!(resolve_model_path("file:///models/../etc", m).unwrap_err().to_string().contains("`..`"));
        assert!(resolve_model_path("pvc://models/%2e%2e/etc", m).is_err());
        assert!(resolve_model_path("pvc://models", m).is_err());
        let err = resolve_model_path("hf://org/name@main", m).unwrap_err().to_string();
        assert!(err.contains("file:// and pvc://"), "{err}");
    }

    #[test]
    fn restart_backoff_grows_and_is_capped() {
        assert_eq!(restart_delay(0), Duration::from_millis(500));
        assert!(restart_delay(2) > restart_delay(1));
        assert_eq!(restart_delay(10), Duration::from_millis(8000));
    }
}
