//! `prism`: the command a user types. Wiring only; the work lives in `local/` (the local
//! substrate behind `prism up`) and in the library crates.

mod adapt;
mod local;
mod rollout;
mod train;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "prism",
    version,
    about = "Prism: cluster-aware multimodal inference. Run pipelines locally or validate manifests for a cluster."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a pipeline on this machine: node processes and a router on loopback.
    Up(local::UpArgs),
    /// Show the nodes, replicas and router of the pipeline started by `prism up`.
    Status(local::StateArgs),
    /// Stop the pipeline started by `prism up`.
    Down(local::StateArgs),
    /// Print the log of a node's replicas (or `router`).
    Logs(local::LogsArgs),
    /// Check manifests with the CRDs' rules and cross-object references, without a cluster.
    Validate {
        /// Manifest files (multi-document YAML).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
    },
    /// Train model updates with candle on this machine: runs `prism-node train` (the node binary
    /// next to this one, or on PATH) with the same arguments; see `prism train shared-space --help`.
    #[command(disable_help_flag = true)]
    Train {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<std::ffi::OsString>,
    },
    /// Model revisions of a ModalityNode in the cluster: `history`, or `undo` to a recorded one.
    Rollout {
        #[command(subcommand)]
        what: rollout::RolloutCmd,
    },
    /// Distributed fine-tuning of a ModalityNode in the cluster (spec.adaptation): `start` a run
    /// now, or print the last run's `status`.
    Adapt {
        #[command(subcommand)]
        what: adapt::AdaptCmd,
    },
    /// Print Prism's CustomResourceDefinitions, or `apply` them to the cluster (the upgrade path
    /// Helm lacks: it installs CRDs once and never updates them).
    Crds {
        #[command(subcommand)]
        action: Option<CrdsAction>,
    },
}

#[derive(Subcommand)]
enum CrdsAction {
    /// Server-side apply the CRDs to the cluster in KUBECONFIG and wait until they are Established.
    Apply,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Validate { files } => validate(&files),
        Cmd::Crds { action: None } => {
            for (_, crd) in prism_operator::crds::all() {
                print!("---\n{}", prism_operator::crds::render(&crd)?);
            }
            Ok(())
        }
        Cmd::Crds { action: Some(CrdsAction::Apply) } => runtime()?.block_on(async {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (KUBECONFIG or in-cluster config)")?;
            for name in prism_operator::crds::apply_all(&client).await? {
                println!("customresourcedefinition.apiextensions.k8s.io/{name} applied and established");
            }
            Ok(())
        }),
        Cmd::Up(args) => runtime()?.block_on(local::up(args)),
        Cmd::Status(args) => local::status(&args),
        Cmd::Down(args) => local::down(&args),
        Cmd::Logs(args) => local::logs(&args),
        Cmd::Train { args } => train::run(&args),
        Cmd::Rollout { what } => runtime()?.block_on(rollout::run(what)),
        Cmd::Adapt { what } => runtime()?.block_on(adapt::run(what)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn validate(files: &[PathBuf]) -> anyhow::Result<()> {
    let set = local::load_manifests(files)?;
    match set.validate() {
        Ok(()) => {
            println!("ok: {} ModalityNode(s), {} MultimodalPipeline(s) valid", set.nodes.len(), set.pipelines.len());
            Ok(())
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("invalid: {e}");
            }
            anyhow::bail!("{} problem(s) found", errors.len())
        }
    }
}
