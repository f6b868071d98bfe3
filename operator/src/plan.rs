//! What one reconcile decided, as data: the writes to make in order, the Events to record once
//! they are made, the resource as the pass leaves it, and when to look again. The planners here
//! are pure: they read an observation that [`crate::controller`] gathered from its stores and
//! Prometheus, never a client, so every decision is tested without an API server
//! (`plan/tests.rs`). The controller executes a plan and decides nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::events::EventType;
use kube::ResourceExt;
use prism_api::condition::{find, types};
use prism_api::node::{AdaptationStatus, ModalityNodeStatus, ModelSpec, ADAPT_REQUEST_ANNOTATION};
use prism_api::pipeline::MultimodalPipelineStatus;
use prism_api::routing::RoutingTable;
use prism_api::status_writers::NodeControllerStatus;
use prism_api::{ModalityNode, MultimodalPipeline};

use crate::adaptation::{self as adapt, phase};
use crate::pipeline::ObservedNode;
use crate::rollout::{self, RevisionStats, Transition};
use crate::{node, pipeline, Error, OperatorConfig, Result};

/// An object the operator owns, applied whole with server-side apply.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Deployment(Deployment),
    Service(Service),
    PodDisruptionBudget(PodDisruptionBudget),
    Job(Job),
    ConfigMap(ConfigMap),
    ServiceAccount(ServiceAccount),
    Role(Role),
    RoleBinding(RoleBinding),
    Claim(PersistentVolumeClaim),
}

impl Object {
    /// `Kind/name`, for logs.
    pub fn describe(&self) -> String {
        let (kind, name) = match self {
            Object::Deployment(o) => ("Deployment", o.name_any()),
            Object::Service(o) => ("Service", o.name_any()),
            Object::PodDisruptionBudget(o) => ("PodDisruptionBudget", o.name_any()),
            Object::Job(o) => ("Job", o.name_any()),
            Object::ConfigMap(o) => ("ConfigMap", o.name_any()),
            Object::ServiceAccount(o) => ("ServiceAccount", o.name_any()),
            Object::Role(o) => ("Role", o.name_any()),
            Object::RoleBinding(o) => ("RoleBinding", o.name_any()),
            Object::Claim(o) => ("PersistentVolumeClaim", o.name_any()),
        };
        format!("{kind}/{name}")
    }
}

/// Kinds the operator deletes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Deployment,
    Job,
    Service,
}

/// One write, in the order the plan lists them. The first one that fails ends the pass (the
/// error policy retries it); what came before it is idempotent.
// A plan holds a handful of writes, built once per pass: boxing the objects would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// Server-side apply as `prism-operator`, with force: a manual edit is reverted.
    Apply(Object),
    /// Created once, never re-applied (most of a claim's spec is immutable): AlreadyExists is done.
    CreateClaim(PersistentVolumeClaim),
    /// Deleted; NotFound is done (the store lags the API).
    Delete { kind: Kind, name: String },
    /// Deleted if it can be; a failure is logged, not returned (a finished run's leftovers).
    Cleanup { kind: Kind, name: String },
    /// `spec.model` of a ModalityNode, guarded by `resourceVersion`: a concurrent edit of the node
    /// wins and the pass is retried.
    SetModel { node: String, resource_version: Option<String>, model: ModelSpec },
}

/// An Event for `kubectl describe`, recorded after the writes succeeded.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub type_: EventType,
    pub reason: String,
    pub action: &'static str,
    pub note: String,
    /// Recorded only when applying this Deployment changed its generation (a spec change, or a
    /// manual edit reverted); None: always.
    pub if_changed: Option<GenerationOf>,
}

/// A Deployment and the generation it had before the pass.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationOf {
    pub deployment: String,
    pub before: Option<i64>,
}

impl Event {
    fn new(type_: EventType, reason: &str, action: &'static str, note: String) -> Self {
        Event { type_, reason: reason.into(), action, note, if_changed: None }
    }
}

// ---------------------------------------------------------------- ModalityNode

/// What the node controller read for one node: its stores, the pod index and Prometheus.
#[derive(Clone, Debug, Default)]
pub struct NodeObservation {
    /// The stable Deployment (None: not created yet).
    pub deployment: Option<Deployment>,
    pub canary_exists: bool,
    /// (stable, canary) figures of a running canary; None without a canary or without Prometheus.
    pub canary_stats: Option<(RevisionStats, RevisionStats)>,
    /// The running adaptation Job ([`adaptation_job`] names it); None when it does not exist.
    pub adaptation_job: Option<Job>,
    /// The node's corrections counter summed over routers, when [`wants_corrections_total`].
    pub corrections_total: Option<f64>,
    /// The pipelines of the node's namespace: an adaptation run reads its corrections from one.
    pub pipelines: Vec<MultimodalPipeline>,
}

/// The running adaptation Job the planner needs to see, if any.
pub fn adaptation_job(mn: &ModalityNode) -> Option<&str> {
    let a = mn.status.as_ref()?.adaptation.as_ref()?;
    (mn.spec.adaptation.is_some() && a.phase == phase::RUNNING).then_some(a.job.as_deref()).flatten()
}

/// Whether a corrections trigger could start a run now (so Prometheus is worth asking).
pub fn wants_corrections_total(mn: &ModalityNode) -> bool {
    let Some(spec) = &mn.spec.adaptation else { return false };
    let running = mn.status.as_ref().and_then(|s| s.adaptation.as_ref()).is_some_and(|a| a.phase == phase::RUNNING);
    spec.trigger.every_corrections.is_some() && !running
}

/// The node controller's plan for one pass.
#[derive(Clone, Debug)]
pub struct NodePlan {
    pub writes: Vec<Write>,
    pub events: Vec<Event>,
    /// The node as this pass leaves it: rollout and adaptation status moved on, and `spec.model`
    /// replaced when a training run just finished. Its status is built from it once the writes
    /// are done (see [`node::status`]).
    pub node: ModalityNode,
    /// Why the spec cannot be turned into objects (nothing of the node's own is applied).
    pub invalid_spec: Option<String>,
    /// When to look again without a change; None: only on a change.
    pub requeue: Option<Duration>,
}

/// Plans one pass over a ModalityNode: the rollout step, the adaptation step, then the node's
/// Deployment, canary, Service and PodDisruptionBudget.
pub fn node(mn: &ModalityNode, cfg: &OperatorConfig, obs: &NodeObservation, now: DateTime<Utc>) -> Result<NodePlan> {
    let now_s = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let name = mn.name_any();
    let mut plan =
        NodePlan { writes: Vec::new(), events: Vec::new(), node: mn.clone(), invalid_spec: None, requeue: None };

    // The rollout first: it decides which model the stable Deployment runs and whether a canary
    // Deployment exists.
    let (status, event) = rollout_step(mn, obs.canary_stats.as_ref(), now, &now_s);
    plan.node.status = Some(status);
    plan.events.extend(event);
    adaptation_step(&mut plan, cfg, obs, &now_s)?;
    let mn = &plan.node;

    let current = obs.deployment.as_ref().and_then(|d| d.spec.as_ref()).and_then(|s| s.replicas);
    let built = node::desired_objects(mn, cfg, current).and_then(|objs| {
        let stable_replicas = objs.deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        Ok((node::canary_deployment(mn, cfg, stable_replicas)?, objs))
    });
    let (canary, objs) = match built {
        Ok(b) => b,
        // Nothing of the node's own is applied: what runs keeps running, and Ready/Degraded say
        // why. Retrying cannot help; the next edit of the node wakes us.
        Err(Error::InvalidSpec(why)) => {
            plan.invalid_spec = Some(why);
            return Ok(plan);
        }
        Err(e) => return Err(e),
    };
    match canary {
        Some(c) => plan.writes.push(Write::Apply(Object::Deployment(c))),
        None if obs.canary_exists => {
            plan.writes.push(Write::Delete { kind: Kind::Deployment, name: node::canary_name(&name) })
        }
        None => {}
    }
    plan.events.push(match &obs.deployment {
        None => Event::new(
            EventType::Normal,
            "Created",
            "Create",
            format!("created Deployment, Service and PodDisruptionBudget {name}"),
        ),
        Some(old) => Event {
            if_changed: Some(GenerationOf { deployment: name.clone(), before: old.metadata.generation }),
            ..Event::new(
                EventType::Normal,
                "Updated",
                "Update",
                format!(
                    "applied Deployment {name} (revision {}, {} replicas)",
                    mn.spec.model.revision,
                    node::desired_replicas(mn, current)
                ),
            )
        },
    });
    plan.writes.extend([
        Write::Apply(Object::Deployment(objs.deployment)),
        Write::Apply(Object::Service(objs.service)),
        Write::Apply(Object::PodDisruptionBudget(objs.pdb)),
    ]);
    plan.requeue = Some(node_requeue(&plan.node));
    Ok(plan)
}

fn node_requeue(mn: &ModalityNode) -> Duration {
    let status = mn.status.as_ref();
    if status.is_some_and(|s| s.canary.is_some()) {
        // Pauses end and analysis runs on time, not only when something changes.
        return Duration::from_secs(5);
    }
    if let Some(spec) = &mn.spec.adaptation {
        let running = status.and_then(|s| s.adaptation.as_ref()).is_some_and(|a| a.phase == phase::RUNNING);
        // The Job's own events wake us too (`.owns`); this bounds a missed one. A corrections
        // trigger is polled from Prometheus.
        if running || spec.trigger.every_corrections.is_some() {
            return Duration::from_secs(15);
        }
    }
    Duration::from_secs(300)
}

/// Moves the rollout one step (see [`crate::rollout`]). Without canary figures (no Prometheus,
/// or it failed) a canary waits at the end of its first pause (`metrics unavailable`), is never
/// promoted blind, and is rolled back at its progress deadline.
fn rollout_step(
    mn: &ModalityNode,
    stats: Option<&(RevisionStats, RevisionStats)>,
    now: DateTime<Utc>,
    now_s: &str,
) -> (ModalityNodeStatus, Option<Event>) {
    let mut status = mn.status.clone().unwrap_or_default();
    let t = rollout::decide(&mn.spec, &status, rollout::step_elapsed(&status, now), stats.map(|(s, c)| (s, c)));
    let note = rollout::apply(&mn.spec, &mut status, &t, now_s);
    let (type_, reason) = match t {
        Transition::Start { .. } => (EventType::Normal, "CanaryStarted"),
        Transition::Advance { .. } => (EventType::Normal, "CanaryAdvanced"),
        Transition::Promote { .. } => (EventType::Normal, "Promoted"),
        Transition::RollBack { .. } => (EventType::Warning, "RolledBack"),
        Transition::Deploy | Transition::None | Transition::Hold { .. } => return (status, None),
    };
    (status, note.map(|note| Event::new(type_, reason, "Rollout", note)))
}

/// Moves `spec.adaptation` one step (see [`crate::adaptation`]): follows a running Job, writes a
/// finished run's model into `spec.model` (the rollout takes it from there), or starts a run
/// that is due. Updates `plan.node` (its `status.adaptation`, and `spec.model` after a run).
fn adaptation_step(plan: &mut NodePlan, cfg: &OperatorConfig, obs: &NodeObservation, now: &str) -> Result<()> {
    let mn = &mut plan.node;
    let Some(spec) = mn.spec.adaptation.clone() else { return Ok(()) };
    let name = mn.name_any();
    let mut ad = mn.status.as_ref().and_then(|s| s.adaptation.clone());

    if let Some(a) = ad.as_mut().filter(|a| a.phase == phase::RUNNING) {
        match adapt::track(a, obs.adaptation_job.as_ref(), now) {
            Some(phase::SUCCEEDED) => {
                let base = a.base_model.clone().unwrap_or_else(|| mn.spec.model.clone());
                let model = adapt::output_model(mn, &spec, &base, a.run);
                let how = if mn.spec.rollout.is_some() { "as a canary (spec.rollout)" } else { "to every replica" };
                a.output_revision = Some(model.revision.clone());
                a.message = format!("{}; revision {} written to spec.model", a.message, model.revision);
                let note =
                    format!("run {} finished: revision {} ({}) goes out {how}", a.run, model.revision, model.uri);
                plan.events.push(Event::new(EventType::Normal, "TrainingSucceeded", "Adapt", note));
                plan.writes.push(Write::SetModel {
                    node: name.clone(),
                    resource_version: mn.resource_version(),
                    model: model.clone(),
                });
                mn.spec.model = model;
            }
            Some(_) => {
                plan.events.push(Event::new(EventType::Warning, "TrainingFailed", "Adapt", a.message.clone()));
            }
            None => {}
        }
    }

    if ad.as_ref().is_none_or(|a| a.phase != phase::RUNNING) {
        let request = mn.annotations().get(ADAPT_REQUEST_ANNOTATION).cloned();
        let total = obs.corrections_total;
        if let Some(trigger) = adapt::due(&spec, request.as_deref(), ad.as_ref(), total) {
            let base = adapt::base_model(mn, &spec);
            let source = match adapt::blocker(mn, &base) {
                Some(why) => Err(why),
                None => adapt::corrections_source(mn, &spec, &obs.pipelines),
            };
            match source {
                Ok(source) => {
                    // The run's number and status come from one place; written only once it exists.
                    let start = adapt::RunStart {
                        trigger,
                        request: request.as_deref(),
                        corrections_total: total,
                        base: base.clone(),
                    };
                    let next = adapt::started(ad.as_ref(), &spec, &name, start, now);
                    let objs = adapt::objects(mn, cfg, &spec, next.run, &base, &source)?;
                    let note = format!(
                        "run {}: Job {} with {} workers x {} GPUs ({})",
                        next.run,
                        objs.job.name_any(),
                        spec.workers,
                        spec.gpus_per_worker,
                        next.trigger
                    );
                    plan.writes.extend(objs.claim.map(Write::CreateClaim));
                    plan.writes.push(Write::Apply(Object::Service(objs.service)));
                    plan.writes.push(Write::Apply(Object::Job(objs.job)));
                    // The previous run's objects stayed for `kubectl logs` until now.
                    if let Some(prev) = ad.as_ref().and_then(|a| a.job.clone()) {
                        plan.writes.push(Write::Cleanup { kind: Kind::Job, name: prev.clone() });
                        plan.writes.push(Write::Cleanup { kind: Kind::Service, name: prev });
                    }
                    plan.events.push(Event::new(EventType::Normal, "TrainingStarted", "Adapt", note));
                    ad = Some(next);
                }
                Err(why) => {
                    let a: &mut AdaptationStatus = ad.get_or_insert_with(Default::default);
                    if a.phase != phase::WAITING || a.message != why {
                        plan.events.push(Event::new(EventType::Warning, "TrainingWaiting", "Adapt", why.clone()));
                    }
                    a.phase = phase::WAITING.into();
                    a.trigger = trigger;
                    a.message = why;
                }
            }
        }
    }
    mn.status.get_or_insert_with(Default::default).adaptation = ad;
    Ok(())
}

/// The Events a status write records: Ready flipping, either way. None: the node already shows
/// this status, so nothing is written.
pub fn node_status_change(observed: Option<&ModalityNodeStatus>, new: &NodeControllerStatus) -> Option<Vec<Event>> {
    let observed = observed.map(NodeControllerStatus::observed);
    if observed.as_ref() == Some(new) {
        return None;
    }
    let was_ready = observed.as_ref().and_then(|s| find(&s.conditions, types::READY)).map(|c| c.is_true());
    let flipped = find(&new.conditions, types::READY).filter(|c| was_ready != Some(c.is_true()));
    Some(
        flipped
            .map(|c| {
                let t = if c.is_true() { EventType::Normal } else { EventType::Warning };
                Event::new(t, &c.reason, "UpdateStatus", c.message.clone())
            })
            .into_iter()
            .collect(),
    )
}

// ---------------------------------------------------------------- MultimodalPipeline

/// The pipeline controller's plan for one pass.
#[derive(Clone, Debug)]
pub struct PipelinePlan {
    /// The routing ConfigMap first: failover latency is measured to that write.
    pub writes: Vec<Write>,
    pub events: Vec<Event>,
    /// The table the ConfigMap carries.
    pub table: RoutingTable,
}

/// Plans one pass over a pipeline from its observed nodes and the table published last (None:
/// never, as far as this process knows).
pub fn pipeline(
    mmp: &MultimodalPipeline,
    cfg: &OperatorConfig,
    observed: &BTreeMap<String, ObservedNode>,
    previous: Option<&RoutingTable>,
) -> Result<PipelinePlan> {
    let name = mmp.name_any();
    let floor = mmp.status.as_ref().map(|s| s.routing_table_generation).unwrap_or(0);
    let table = pipeline::routing_table(mmp, observed, previous, floor);
    let node_cas = observed.iter().filter_map(|(n, o)| Some((n.clone(), o.tls_secret.clone()?))).collect();
    let objs = pipeline::desired_objects(mmp, cfg, &table, &node_cas)?;
    let mut writes = vec![
        Write::Apply(Object::ConfigMap(objs.config_map)),
        Write::Apply(Object::ServiceAccount(objs.service_account)),
        Write::Apply(Object::Role(objs.role)),
        Write::Apply(Object::RoleBinding(objs.role_binding)),
    ];
    writes.extend(objs.memory_claim.map(|c| Write::Apply(Object::Claim(c))));
    writes.push(Write::Apply(Object::Deployment(objs.deployment)));
    writes.push(Write::Apply(Object::Service(objs.service)));
    let mut events = Vec::new();
    if previous.map(|p| p.generation) != Some(table.generation) {
        let ready: usize = table.modalities.values().map(|v| v.iter().filter(|e| e.ready).count()).sum();
        events.push(Event::new(
            EventType::Normal,
            "RoutingTableUpdated",
            "PublishRoutingTable",
            format!(
                "ConfigMap {} generation {} with {ready} ready endpoints",
                pipeline::config_map_name(&name),
                table.generation
            ),
        ));
    }
    Ok(PipelinePlan { writes, events, table })
}

/// The Events a pipeline status write records (Ready or Degraded changing status or reason).
/// None: the pipeline already shows this status.
pub fn pipeline_status_change(
    observed: Option<&MultimodalPipelineStatus>,
    new: &MultimodalPipelineStatus,
) -> Option<Vec<Event>> {
    if observed == Some(new) {
        return None;
    }
    let old = observed.cloned().unwrap_or_default();
    let mut events = Vec::new();
    for t in [types::READY, types::DEGRADED] {
        let before = find(&old.conditions, t).map(|c| (c.status, c.reason.clone()));
        if let Some(c) = find(&new.conditions, t).filter(|c| before != Some((c.status, c.reason.clone()))) {
            let bad = (t == types::READY) != c.is_true();
            let type_ = if bad { EventType::Warning } else { EventType::Normal };
            events.push(Event::new(type_, &c.reason, "UpdateStatus", c.message.clone()));
        }
    }
    Some(events)
}

#[cfg(test)]
mod tests;
