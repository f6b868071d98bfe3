//! Canary rollouts under `prism up`: the manifest files are watched; when a node's model
//! changes, the operator's rollout state machine ([`prism_operator::rollout`]) runs here with
//! canary processes for the new revision and the router's own `/metrics` as the analysis source
//! (calls, failures and p95 per revision; corrections and their ratings per revision).

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use kube::ResourceExt;
use prism_operator::rollout::{self, RevisionStats, Transition};

use super::{metrics, node_args, replica_log, resolve_model_path, stop_soon, LocalNode, Replica, Supervisor};

/// The manifest files `prism up` was started with, and when they last changed.
pub struct Manifests {
    files: Vec<PathBuf>,
    pipeline: String,
    stamp: Vec<Option<SystemTime>>,
    next_check: Instant,
}

impl Manifests {
    pub fn new(files: &[PathBuf], pipeline: &str) -> Self {
        let mut m =
            Self { files: files.to_vec(), pipeline: pipeline.to_string(), stamp: vec![], next_check: Instant::now() };
        m.stamp = m.stamps();
        m
    }

    fn stamps(&self) -> Vec<Option<SystemTime>> {
        self.files.iter().map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok()).collect()
    }

    /// The manifests when a file changed since the last call (checked once a second), valid.
    fn changed(&mut self) -> Option<prism_api::ManifestSet> {
        if Instant::now() < self.next_check {
            return None;
        }
        self.next_check = Instant::now() + Duration::from_secs(1);
        let now = self.stamps();
        if now == self.stamp {
            return None;
        }
        self.stamp = now;
        let set = match super::load_manifests(&self.files) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("manifests changed but cannot be read ({e:#}); keeping the running spec");
                return None;
            }
        };
        if let Err(errors) = set.validate() {
            for e in &errors {
                eprintln!("invalid: {e}");
            }
            eprintln!("manifests changed but have {} problem(s); keeping the running spec", errors.len());
            return None;
        }
        if !set.pipelines.iter().any(|p| p.name_any() == self.pipeline) {
            eprintln!("manifests changed but no longer hold pipeline {}; keeping the running spec", self.pipeline);
            return None;
        }
        Some(set)
    }
}

/// Sum of a Prometheus text series over every label set in `text`.
fn series_sum(text: &str, metric: &str) -> f64 {
    let prefix = format!("{metric}{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // fold from +0.0: an empty f64 sum is -0.0, which prints as "-0.0%".
        .fold(0.0, |a, b| a + b)
}

/// One revision's figures from a router's `/metrics` text.
pub fn revision_stats(text: &str, node: &str, revision: &str) -> RevisionStats {
    // The lines of this node's revision, selected once for every series below.
    let (node, revision) = (format!("node=\"{node}\""), format!("revision=\"{revision}\""));
    let mine: String =
        text.lines().filter(|l| l.contains(&node) && l.contains(&revision)).map(|l| format!("{l}\n")).collect();
    RevisionStats {
        calls: series_sum(&mine, "prism_router_upstream_duration_seconds_count"),
        failures: series_sum(&mine, "prism_router_upstream_failures_total"),
        p95_s: metrics::histogram_quantile(&mine, "prism_router_upstream_duration_seconds", 0.95),
        corrections: series_sum(&mine, "prism_router_corrections_total"),
        rating_sum: series_sum(&mine, "prism_router_correction_rating_sum"),
    }
}

impl Supervisor {
    /// Picks up manifest changes and moves every node's rollout one step.
    pub(super) async fn rollout(&mut self) {
        if let Some(set) = self.manifests.changed() {
            for n in &mut self.nodes {
                if let Some(new) = set.node(&n.name()) {
                    if new.spec.model != n.spec.spec.model {
                        println!(
                            "node {}: model changed to revision {} ({})",
                            n.name(),
                            new.spec.model.revision,
                            new.spec.model.uri
                        );
                    }
                    n.spec = new.clone();
                }
            }
        }
        let mut router_text: Option<String> = None;
        for i in 0..self.nodes.len() {
            let canary_rev = self.nodes[i].status.canary.as_ref().map(|c| c.revision.clone());
            let stats = match canary_rev {
                Some(canary) => {
                    if router_text.is_none() {
                        router_text = self.router_metrics().await;
                    }
                    router_text.as_deref().map(|t| {
                        let n = &self.nodes[i];
                        (revision_stats(t, &n.name(), &n.stable_revision()), revision_stats(t, &n.name(), &canary))
                    })
                }
                None => None,
            };
            let n = &mut self.nodes[i];
            let elapsed = n.status.canary.as_ref().map(|_| n.step_started.elapsed().as_secs_f64());
            let t = rollout::decide(&n.spec.spec, &n.status, elapsed, stats.as_ref().map(|(s, c)| (s, c)));
            if let Err(e) = self.act(i, t) {
                eprintln!("rollout of node {}: {e:#}", self.nodes[i].name());
            }
        }
        // Replicas of a replaced revision go once every new stable replica is ready.
        for n in &mut self.nodes {
            if !n.retiring.is_empty() && n.replicas.iter().all(|r| r.ready) {
                for r in std::mem::take(&mut n.retiring) {
                    stop_soon(r);
                }
            }
        }
    }

    async fn router_metrics(&self) -> Option<String> {
        let url = self.router_url.as_ref()?;
        let res = self.http.get(format!("{url}/metrics")).timeout(Duration::from_secs(1)).send().await.ok()?;
        res.error_for_status().ok()?.text().await.ok()
    }

    fn act(&mut self, i: usize, t: Transition) -> anyhow::Result<()> {
        let models_dir = self.models_dir.clone();
        let n: &mut LocalNode = &mut self.nodes[i];
        let name = n.name();
        if let Transition::Hold { reason } = &t {
            if n.hold_reason.as_ref() != Some(reason) && !reason.starts_with("step ") {
                println!("rollout {name}: waiting: {reason}");
            }
            n.hold_reason = Some(reason.clone());
        }
        // The replicas each transition needs, before the status records it.
        match &t {
            Transition::Start { .. } => {
                let model = &n.spec.spec.model;
                let path = resolve_model_path(&model.uri, &models_dir)?;
                if !path.exists() {
                    anyhow::bail!("model folder {} of revision {} does not exist", path.display(), model.revision);
                }
                for r in std::mem::take(&mut n.canary) {
                    stop_soon(r);
                }
                n.canary_args = node_args(&n.spec, &path, &models_dir)?;
                let log = n.logs_dir.join(format!("{name}-canary-{}.log", model.revision));
                let _ = std::fs::remove_file(&log);
                n.canary.push(Replica::new(log, &model.revision));
                n.step_started = Instant::now();
            }
            Transition::Advance { .. } => n.step_started = Instant::now(),
            Transition::Promote { .. } => {
                let model = &n.spec.spec.model;
                let path = resolve_model_path(&model.uri, &models_dir)?;
                n.args = node_args(&n.spec, &path, &models_dir)?;
                let count = n.replicas.len().max(1);
                n.retiring.append(&mut n.replicas);
                // The canary's replicas become stable; more start with the new arguments.
                n.replicas = std::mem::take(&mut n.canary);
                while n.replicas.len() < count {
                    let i = n.replicas.len();
                    n.replicas.push(Replica::new(replica_log(&n.logs_dir, &name, i), &model.revision));
                }
            }
            Transition::RollBack { .. } => {
                for r in std::mem::take(&mut n.canary) {
                    stop_soon(r);
                }
            }
            Transition::None | Transition::Deploy | Transition::Hold { .. } => {}
        }
        if let Some(event) = rollout::apply(&n.spec.spec, &mut n.status, &t, &prism_operator::now_rfc3339()) {
            println!("rollout {name}: {event}");
        }
        if let Some(why) = rollout::held_back(&n.spec.spec, &n.status) {
            if n.hold_reason.as_deref() != Some(why.as_str()) {
                println!("rollout {name}: {why}");
                n.hold_reason = Some(why);
            }
        }
        self.start_due_replicas()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"prism_router_upstream_duration_seconds_bucket{modality="text",node="t",revision="2",le="0.004"} 8
prism_router_upstream_duration_seconds_bucket{modality="text",node="t",revision="2",le="0.008"} 10
prism_router_upstream_duration_seconds_bucket{modality="text",node="t",revision="2",le="+Inf"} 10
prism_router_upstream_duration_seconds_count{modality="text",node="t",revision="2"} 10
prism_router_upstream_duration_seconds_count{modality="text",node="t",revision="1"} 90
prism_router_upstream_failures_total{modality="text",node="t",revision="2"} 2
prism_router_corrections_total{node="t",revision="2"} 4
prism_router_correction_rating_sum{node="t",revision="2"} 1
"#;

    #[test]
    fn stats_are_read_per_revision() {
        let s = revision_stats(TEXT, "t", "2");
        assert_eq!((s.calls, s.failures, s.corrections, s.rating_sum), (10.0, 2.0, 4.0, 1.0));
        assert!(s.p95_s.is_some_and(|p| p > 0.004 && p <= 0.008), "{:?}", s.p95_s);
        let stable = revision_stats(TEXT, "t", "1");
        assert_eq!((stable.calls, stable.corrections, stable.p95_s), (90.0, 0.0, None));
        assert_eq!(revision_stats(TEXT, "other", "2").calls, 0.0);
    }
}
