//! The state file `prism up` keeps current in its state folder, so that `prism status`,
//! `prism down` and `prism logs` work from another shell.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{process, LogsArgs, StateArgs};

#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct State {
    /// Process id of `prism up` itself.
    pub pid: u32,
    pub pipeline: String,
    pub router_url: Option<String>,
    pub router_log: PathBuf,
    pub routing_table_generation: u64,
    pub missing_modalities: Vec<String>,
    pub nodes: Vec<NodeState>,
    /// The Prometheus the autoscaler reads, when autoscaling is on.
    #[serde(default)]
    pub prometheus_url: Option<String>,
    /// Its pid when `prism up` started it.
    #[serde(default)]
    pub prometheus_pid: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct NodeState {
    pub name: String,
    pub modality: String,
    pub architecture: String,
    /// p95 request latency in ms over the node's replicas since start.
    #[serde(default)]
    pub p95_ms: Option<f64>,
    pub replicas: Vec<ReplicaState>,
    /// Present for nodes the builtin autoscaler scales.
    #[serde(default)]
    pub autoscaler: Option<AutoscalerState>,
    /// Revision serving stable traffic, the canary in flight and past rollouts (as
    /// `status.currentRevision`, `status.canary` and `status.history` in a cluster).
    #[serde(default)]
    pub revision: Option<String>,
    #[serde(default)]
    pub canary: Option<prism_api::node::CanaryStatus>,
    #[serde(default)]
    pub history: Vec<prism_api::node::RevisionRecord>,
}

/// The autoscaler's view of one node, as `status` would show it in a cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct AutoscalerState {
    pub min: i32,
    pub max: i32,
    /// The last decision's replica count and reason.
    pub desired: Option<i32>,
    pub reason: Option<String>,
    pub last_scale: Option<prism_api::node::ScaleEvent>,
    /// Why the last read had no metrics (replicas held), if it had none.
    pub metrics_unavailable: Option<String>,
    /// Why min/max/maxStep limited the last decision, if they did.
    pub scaling_limited: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ReplicaState {
    pub pid: Option<u32>,
    pub url: Option<String>,
    pub ready: bool,
    pub restarts: u32,
    pub log: PathBuf,
    /// Model revision the replica runs.
    #[serde(default)]
    pub revision: String,
}

pub fn path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

impl State {
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        super::write_atomic(&path(dir), &serde_json::to_vec_pretty(self)?)
    }

    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let p = path(dir);
        let text = std::fs::read(&p).with_context(|| {
            format!(
                "no pipeline is running from {} (no {}); start one with `prism up -f <manifest>`",
                dir.display(),
                p.display()
            )
        })?;
        let state: State = serde_json::from_slice(&text).with_context(|| format!("reading {}", p.display()))?;
        if !process::alive(state.pid) {
            anyhow::bail!(
                "the `prism up` that wrote {} (pid {}) is no longer running; remove the file or run `prism up` again",
                p.display(),
                state.pid
            );
        }
        Ok(state)
    }

    /// Human table: one line per replica.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let ready_nodes = self.nodes.iter().filter(|n| n.replicas.iter().any(|r| r.ready)).count();
        out.push_str(&format!(
            "pipeline {}  router {}  nodes ready {}/{}  routing table gen {}{}\n",
            self.pipeline,
            self.router_url.as_deref().unwrap_or("(starting)"),
            ready_nodes,
            self.nodes.len(),
            self.routing_table_generation,
            if self.missing_modalities.is_empty() {
                String::new()
            } else {
                format!("  DEGRADED: missing {}", self.missing_modalities.join(", "))
            }
        ));
        out.push_str(&format!(
            "  {:<14} {:<9} {:<18} {:<8} {:<6} {:<9} {:<9} {}\n",
            "NODE", "MODALITY", "ARCHITECTURE", "REPLICA", "READY", "RESTARTS", "P95", "URL"
        ));
        for n in &self.nodes {
            for (i, r) in n.replicas.iter().enumerate() {
                out.push_str(&format!(
                    "  {:<14} {:<9} {:<18} {:<8} {:<6} {:<9} {:<9} {}\n",
                    n.name,
                    n.modality,
                    n.architecture,
                    i,
                    if r.ready { "yes" } else { "no" },
                    r.restarts,
                    n.p95_ms.map(|p| format!("{p:.1}ms")).unwrap_or_else(|| "-".into()),
                    r.url.as_deref().unwrap_or("-")
                ));
            }
        }
        for n in &self.nodes {
            let Some(rev) = &n.revision else { continue };
            if n.canary.is_none() && n.history.len() <= 1 {
                continue;
            }
            out.push_str(&format!("  rollout {}: revision {rev} stable", n.name));
            if let Some(c) = &n.canary {
                out.push_str(&format!("; canary {} at {}% (step {})", c.revision, c.weight, c.step + 1));
            }
            if let Some(h) = n.history.last() {
                out.push_str(&format!("; last: {} {} ({})", h.revision, h.outcome, h.reason));
            }
            out.push('\n');
        }
        for n in &self.nodes {
            let Some(a) = &n.autoscaler else { continue };
            out.push_str(&format!("  autoscale {}: {} replicas in [{}, {}]", n.name, n.replicas.len(), a.min, a.max));
            if let Some(s) = &a.last_scale {
                out.push_str(&format!("; last scale {} -> {} at {} ({})", s.from, s.to, s.time, s.reason));
            }
            if let Some(why) = &a.metrics_unavailable {
                out.push_str(&format!("; METRICS UNAVAILABLE, holding: {why}"));
            }
            if let Some(why) = &a.scaling_limited {
                out.push_str(&format!("; limited: {why}"));
            }
            out.push('\n');
        }
        out
    }
}

pub fn status(args: &StateArgs) -> anyhow::Result<()> {
    let state = State::load(&args.state_dir)?;
    print!("{}", state.render());
    Ok(())
}

pub fn down(args: &StateArgs) -> anyhow::Result<()> {
    let state = State::load(&args.state_dir)?;
    process::terminate(state.pid);
    for _ in 0..100 {
        if !process::alive(state.pid) {
            println!("stopped pipeline {}", state.pipeline);
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    anyhow::bail!("prism up (pid {}) did not stop within 10 s", state.pid)
}

pub fn logs(args: &LogsArgs) -> anyhow::Result<()> {
    let state = State::load(&args.state.state_dir)?;
    let logs: Vec<PathBuf> = if args.node == "router" {
        vec![state.router_log.clone()]
    } else {
        let node = state.nodes.iter().find(|n| n.name == args.node).with_context(|| {
            let names: Vec<&str> = state.nodes.iter().map(|n| n.name.as_str()).collect();
            format!("no node {:?} in pipeline {}; nodes: {}, or `router`", args.node, state.pipeline, names.join(", "))
        })?;
        node.replicas.iter().map(|r| r.log.clone()).collect()
    };
    for log in logs {
        println!("==> {} <==", log.display());
        println!("{}", process::log_tail(&log, args.tail));
    }
    Ok(())
}
