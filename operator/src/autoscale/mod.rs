//! Prism's builtin autoscaler: one pure decision ([`decide`]) fed by Prometheus
//! ([`prometheus`]), with two thin adapters — [`run`] here for the cluster (writes
//! `status.desiredReplicas`, which the node controller applies to the Deployment) and the local
//! substrate of `prism up` (starts and stops node processes).

pub mod decide;
pub mod prometheus;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use kube::runtime::events::{EventType, Recorder};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource, ResourceExt};
use prism_api::condition::{self, types, Condition, ConditionStatus};
use prism_api::node::{AutoscalingMode, ModalityNodeSpec, ScaleEvent};
use prism_api::status_writers::{self, AutoscalerStatus};
use prism_api::{ModalityNode, ModalityNodeStatus};
use tracing::{info, warn};

use crate::prom::{node_selector, PromClient};
pub use decide::{decide, Decision, Load, Reading, Replicas, ScalerState, WindowLoad};

use crate::events::publish;
use crate::metrics::Metrics;

/// Field manager of the autoscaler's status writes (distinct from the node controller's, so
/// neither overwrites the other's fields).
pub use prism_api::status_writers::AUTOSCALER_FIELD_MANAGER as FIELD_MANAGER;

/// Whether the builtin autoscaler has anything to decide for this spec.
pub fn is_autoscaled(spec: &ModalityNodeSpec) -> bool {
    let a = &spec.autoscaling;
    a.mode == AutoscalingMode::Builtin
        && spec.replicas.max > spec.replicas.min
        && (a.target_inflight.is_some() || a.target_latency_p95_ms.is_some() || a.target_gpu_utilization.is_some())
}

/// The conditions a decision implies (MetricsUnavailable, ScalingLimited).
pub fn conditions(d: &Decision) -> Vec<Condition> {
    vec![
        match &d.metrics_unavailable {
            Some(why) => Condition::new(
                types::METRICS_UNAVAILABLE,
                ConditionStatus::True,
                "PrometheusQueryFailed",
                format!("replicas held at {}: {why}", d.from),
            ),
            None => Condition::new(types::METRICS_UNAVAILABLE, ConditionStatus::False, "MetricsRead", ""),
        },
        match &d.limited {
            Some(why) => Condition::new(types::SCALING_LIMITED, ConditionStatus::True, "ReplicaLimit", why.clone()),
            None => Condition::new(types::SCALING_LIMITED, ConditionStatus::False, "WithinLimits", ""),
        },
    ]
}

/// `12ms` style, as the P95 printer column shows it.
pub fn format_p95(ms: f64) -> String {
    if ms >= 10.0 {
        format!("{ms:.0}ms")
    } else {
        format!("{ms:.1}ms")
    }
}

/// The autoscaler's status after decision `d` (its whole server-side apply body), or `None`
/// when nothing in it changed, so a quiet node costs no API write.
pub fn status_patch(
    old: &ModalityNodeStatus,
    d: &Decision,
    now: &str,
    generation: Option<i64>,
) -> Option<AutoscalerStatus> {
    let observed = AutoscalerStatus::observed(old);
    let last_scale = if d.changed() {
        Some(ScaleEvent { time: now.to_string(), from: d.from, to: d.to, reason: d.reason.clone() })
    } else {
        observed.last_scale.clone()
    };
    let next = AutoscalerStatus {
        desired_replicas: Some(d.to),
        p95: d.p95_ms.map(format_p95).or_else(|| observed.p95.clone()),
        last_scale,
        conditions: condition::merge(&old.conditions, conditions(d), now, generation),
    };
    // A generation bump alone restamps conditions: not worth a write.
    let unstamped = |s: &AutoscalerStatus| {
        s.conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status, c.reason.clone(), c.message.clone()))
            .collect::<Vec<_>>()
    };
    let same = next.desired_replicas == observed.desired_replicas
        && next.p95 == observed.p95
        && next.last_scale == observed.last_scale
        && unstamped(&next) == unstamped(&observed);
    (!same).then_some(next)
}

/// Settings of the cluster autoscaler loop (operator flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// None: builtin-mode nodes report MetricsUnavailable and keep their replicas.
    pub prometheus: Option<PromClient>,
    /// Match `namespace="<ns>"` too (Prometheus' Kubernetes discovery adds that label).
    pub match_namespace: bool,
}

/// Runs the cluster autoscaler until `shutdown` resolves: every node's `interval`, read
/// Prometheus, decide, write status (+ Event, + `prism_autoscaler_desired_replicas`).
/// `reader` is the operator's one ModalityNode store (shared with the controllers).
pub async fn run(
    reader: Store<ModalityNode>,
    client: Client,
    settings: Settings,
    metrics: Metrics,
    recorder: Recorder,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut scalers: HashMap<(String, String), (ScalerState, Instant)> = HashMap::new();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
        }
        let nodes = reader.state();
        // Forget nodes that are gone or no longer autoscaled: their state must not carry over to
        // a namesake, and their gauges must not keep an at-max alert firing.
        let live: HashSet<(String, String)> = nodes
            .iter()
            .filter(|mn| is_autoscaled(&mn.spec))
            .map(|mn| (mn.namespace().unwrap_or_default(), mn.name_any()))
            .collect();
        scalers.retain(|key, _| {
            let keep = live.contains(key);
            if !keep {
                let labels = [key.0.as_str(), key.1.as_str()];
                let _ = metrics.autoscaler_desired_replicas.remove_label_values(&labels);
                let _ = metrics.autoscaler_max_replicas.remove_label_values(&labels);
            }
            keep
        });
        for mn in nodes {
            if mn.meta().deletion_timestamp.is_some() || !is_autoscaled(&mn.spec) {
                continue;
            }
            let (ns, name) = (mn.namespace().unwrap_or_default(), mn.name_any());
            let interval = Duration::from_secs(mn.spec.autoscaling.interval_seconds.max(1).into());
            let entry = scalers.entry((ns.clone(), name.clone())).or_insert_with(|| (ScalerState::default(), started));
            if entry.1 > Instant::now() {
                continue;
            }
            entry.1 = Instant::now() + interval;
            let reading = match &settings.prometheus {
                Some(p) => {
                    let sel = node_selector(&name, settings.match_namespace.then_some(ns.as_str()));
                    p.read_load(&sel, &mn.spec.autoscaling).await
                }
                None => Reading::Unavailable(
                    "the operator runs without --prometheus-url; set it, or use autoscaling.mode: external".into(),
                ),
            };
            let old = mn.status.clone().unwrap_or_default();
            let current = crate::node::desired_replicas(&mn, None);
            let replicas = Replicas { current, ready: old.ready_replicas.min(current) };
            let d = decide(
                &mn.spec.autoscaling,
                &mn.spec.replicas,
                &mut entry.0,
                started.elapsed().as_secs_f64(),
                replicas,
                &reading,
            );
            metrics.autoscaler_desired_replicas.with_label_values(&[&ns, &name]).set(i64::from(d.to));
            metrics.autoscaler_max_replicas.with_label_values(&[&ns, &name]).set(i64::from(mn.spec.replicas.max));
            let Some(st) = status_patch(&old, &d, &crate::now_rfc3339(), mn.metadata.generation) else { continue };
            let nodes: Api<ModalityNode> = Api::namespaced(client.clone(), &ns);
            let body = status_writers::apply_body(&st);
            let params = PatchParams::apply(FIELD_MANAGER).force();
            if let Err(e) = nodes.patch_status(&name, &params, &Patch::Apply(&body)).await {
                warn!(namespace = %ns, node = %name, error = %e, "writing the autoscaler's status failed");
                continue;
            }
            let oref = mn.object_ref(&());
            if d.changed() {
                info!(namespace = %ns, node = %name, from = d.from, to = d.to, reason = %d.reason, "scaled");
                let note = format!("scaled from {} to {} replicas: {}", d.from, d.to, d.reason);
                publish(&recorder, &oref, EventType::Normal, "Scaled", "Scale", note).await;
            }
            let was = |t| condition::find(&old.conditions, t).map(Condition::is_true).unwrap_or(false);
            if let Some(why) = d.metrics_unavailable.as_ref().filter(|_| !was(types::METRICS_UNAVAILABLE)) {
                let note = format!("holding {} replicas: {why}", d.from);
                publish(&recorder, &oref, EventType::Warning, "MetricsUnavailable", "Scale", note).await;
            }
            if let Some(why) = d.limited.as_ref().filter(|_| !was(types::SCALING_LIMITED)) {
                publish(&recorder, &oref, EventType::Normal, "ScalingLimited", "Scale", why.clone()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(from: i32, to: i32) -> Decision {
        Decision {
            from,
            to,
            reason: "in-flight 4.0 per replica vs target 2 over 60s".into(),
            panic: false,
            metrics_unavailable: None,
            limited: None,
            p95_ms: Some(12.4),
        }
    }

    #[test]
    fn a_scale_writes_desired_last_scale_and_p95() {
        let st = status_patch(&ModalityNodeStatus::default(), &decision(1, 3), "2026-12-01T00:00:00Z", Some(2))
            .expect("a change is written");
        let body = serde_json::to_value(&st).unwrap();
        assert_eq!(body["desiredReplicas"], 3);
        assert_eq!(body["lastScale"]["from"], 1);
        assert_eq!(body["lastScale"]["to"], 3);
        assert_eq!(body["p95"], "12ms");
        assert!(!condition::find(&st.conditions, types::METRICS_UNAVAILABLE).unwrap().is_true());
    }

    #[test]
    fn a_quiet_node_costs_no_write_and_other_conditions_survive() {
        let mut old = ModalityNodeStatus::default();
        let first = status_patch(&old, &decision(2, 2), "t0", Some(1)).unwrap();
        old.desired_replicas = Some(2);
        old.p95 = Some("12ms".into());
        old.conditions = first.conditions.clone();
        old.conditions.push(Condition::new(types::READY, ConditionStatus::True, "ReplicasReady", "2/2"));
        assert_eq!(status_patch(&old, &decision(2, 2), "t1", Some(1)), None);
        let mut out = decision(2, 2);
        out.metrics_unavailable = Some("prometheus down".into());
        let st = status_patch(&old, &out, "t2", Some(1)).expect("condition flip is written");
        assert!(condition::find(&st.conditions, types::METRICS_UNAVAILABLE).unwrap().is_true());
        let body = serde_json::to_value(&st).unwrap();
        assert!(
            condition::find(&st.conditions, types::READY).is_none(),
            "only the autoscaler's own conditions are applied"
        );
        assert!(body.get("lastScale").is_none(), "no scale happened");
        assert!(body.get("replicas").is_none(), "the node controller's fields stay out");
    }
}
