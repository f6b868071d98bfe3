//! Thin adapters: kube-rs Controllers that read the cluster, call the pure core in
//! [`crate::node`] / [`crate::pipeline`], and write the result with server-side apply.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Config as CtrlConfig};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use prism_api::condition::{find, types};
use prism_api::labels;
use prism_api::routing::{RoutingTable, ROUTING_TABLE_KEY};
use prism_api::status_writers::{self, NodeControllerStatus};
use prism_api::{ModalityNode, MultimodalPipeline};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::{info, instrument, warn, Instrument};

use crate::events::publish;
use crate::index::{Index, SharedIndex};
use crate::metrics::Metrics;
use crate::pipeline::ObservedNode;
use crate::{node, now_rfc3339, pipeline, watches, Error, OperatorConfig, Result};

pub const NODE_CONTROLLER: &str = "modalitynode";
pub const PIPELINE_CONTROLLER: &str = "multimodalpipeline";

/// Everything a reconcile needs, and nothing else.
pub struct Context {
    pub client: Client,
    pub cfg: OperatorConfig,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub index: SharedIndex,
    /// False until the pod index has listed every pod once: publishing a table before that
    /// would drop live endpoints and bump the generation for nothing.
    pub index_synced: Arc<AtomicBool>,
    /// Where canary analysis reads the routers' per-revision metrics (the autoscaler's Prometheus).
    pub prometheus: Option<crate::prom::PromClient>,
    pub match_namespace: bool,
    /// The operator's one ModalityNode watch and one watch of its own Deployments: reconciles
    /// read these instead of GETs (see [`Stores`]).
    pub stores: Stores,
    /// The routing table last published per pipeline (namespace, name): this process is the only
    /// writer while it leads (it exits when it loses the lease), so it need not read it back.
    pub published: std::sync::Mutex<BTreeMap<(String, String), RoutingTable>>,
}

/// Reflector stores shared by both controllers and the autoscaler.
#[derive(Clone)]
pub struct Stores {
    pub nodes: Store<ModalityNode>,
    /// Deployments labelled `app.kubernetes.io/managed-by=prism` (node, canary and router).
    pub deployments: Store<Deployment>,
}

impl Stores {
    /// Waits for every store's first list, so a reconcile never mistakes "not listed yet" for
    /// "does not exist". Called once, before the controllers start: a store's readiness wakes
    /// only one waiter at a time (kube's DelayedInit keeps one waker), so reconciles must not
    /// wait on it side by side with the controllers' own runners.
    async fn ready(&self) -> Result<()> {
        self.nodes.wait_until_ready().await.map_err(|_| Error::StoreClosed)?;
        self.deployments.wait_until_ready().await.map_err(|_| Error::StoreClosed)
    }
}

fn cached<K>(store: &Store<K>, ns: &str, name: &str) -> Option<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    store.get(&ObjectRef::new(name).within(ns)).map(|o| (*o).clone())
}

fn ns_of<K: Resource>(o: &K) -> Result<String> {
    o.meta().namespace.clone().ok_or_else(|| Error::NoNamespace(o.meta().name.clone().unwrap_or_default()))
}

fn apply_params() -> PatchParams {
    // force: we are the only owner of these fields; a manual edit (another manager) is reverted.
    PatchParams::apply(labels::FIELD_MANAGER).force()
}

async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let name = obj.meta().name.clone().unwrap_or_default();
    Ok(api.patch(&name, &apply_params(), &Patch::Apply(obj)).await?)
}

// ---------------------------------------------------------------- ModalityNode

#[instrument(skip_all, fields(namespace = mn.namespace().unwrap_or_default(), node = %mn.name_any()))]
pub async fn reconcile_node(mn: Arc<ModalityNode>, ctx: Arc<Context>) -> Result<Action> {
    let _m = ctx.metrics.measure(NODE_CONTROLLER);
    let ns = ns_of(mn.as_ref())?;
    let name = mn.name_any();
    let oref = mn.object_ref(&());

    // The rollout first: it decides which model the stable Deployment runs and whether a
    // canary Deployment exists.
    let (mn, transition) = step_rollout(&mn, &ctx, &ns).await;
    if let Some((type_, reason, note)) = transition {
        info!(%reason, %note, "rollout");
        publish(&ctx.recorder, &oref, type_, reason, "Rollout", note).await;
    }
    let mn = Arc::new(step_adaptation(mn, &ctx, &ns, &oref).await?);

    let deploy_api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = cached(&ctx.stores.deployments, &ns, &name);
    let current = existing.as_ref().and_then(|d| d.spec.as_ref()).and_then(|s| s.replicas);
    let planned = node::desired_objects(&mn, &ctx.cfg, current).and_then(|objs| {
        let stable_replicas = objs.deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        Ok((node::canary_deployment(&mn, &ctx.cfg, stable_replicas)?, objs))
    });
    let (canary, objs) = match planned {
        Ok(p) => p,
        Err(Error::InvalidSpec(why)) => {
            // Nothing is applied: what runs keeps running, and Ready/Degraded say why. Retrying
            // cannot help; the next edit of the node wakes us.
            warn!(%why, "invalid spec");
            let problems = pod_problems(&ctx, &ns, &name);
            let status = node::status(&mn, existing.as_ref(), &problems, Some(&why), &now_rfc3339());
            write_node_status(&ctx, &mn, &status, &oref).await?;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(e),
    };
    match canary {
        Some(canary) => {
            apply(&ctx.client, &ns, &canary).await?;
        }
        None => {
            let canary = node::canary_name(&name);
            if cached(&ctx.stores.deployments, &ns, &canary).is_some() {
                match deploy_api.delete(&canary, &Default::default()).await {
                    Ok(_) => info!(deployment = %canary, "deleted canary Deployment"),
                    // The store lags the API: someone (or our last pass) deleted it already.
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }

    let deploy = apply(&ctx.client, &ns, &objs.deployment).await?;
    apply(&ctx.client, &ns, &objs.service).await?;
    apply(&ctx.client, &ns, &objs.pdb).await?;
    match &existing {
        None => {
            info!("created Deployment, Service, PodDisruptionBudget");
            publish(
                &ctx.recorder,
                &oref,
                EventType::Normal,
                "Created",
                "Create",
                format!("created Deployment, Service and PodDisruptionBudget {name}"),
            )
            .await;
        }
        Some(old) if old.metadata.generation != deploy.metadata.generation => {
            // A generation bump after our apply is either a spec change or a manual edit reverted.
            info!(generation = ?deploy.metadata.generation, "updated Deployment");
            publish(
                &ctx.recorder,
                &oref,
                EventType::Normal,
                "Updated",
                "Update",
                format!(
                    "applied Deployment {name} (revision {}, {} replicas)",
                    mn.spec.model.revision,
                    node::desired_replicas(&mn, current)
                ),
            )
            .await;
        }
        _ => {}
    }

    let problems = pod_problems(&ctx, &ns, &name);
    let status = node::status(&mn, Some(&deploy), &problems, None, &now_rfc3339());
    write_node_status(&ctx, &mn, &status, &oref).await?;
    if mn.status.as_ref().is_some_and(|s| s.canary.is_some()) {
        // Pauses end and analysis runs on time, not only when something changes.
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    if let Some(spec) = &mn.spec.adaptation {
        let running = status.adaptation.as_ref().is_some_and(|a| a.phase == crate::adaptation::phase::RUNNING);
        // The Job's own events wake us too (`.owns`); this bounds a missed one. A corrections
        // trigger is polled from Prometheus.
        if running || spec.trigger.every_corrections.is_some() {
            return Ok(Action::requeue(Duration::from_secs(15)));
        }
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// What the pod index knows about the node's pods that cannot run.
fn pod_problems(ctx: &Context, ns: &str, name: &str) -> Vec<crate::pod_health::PodProblem> {
    ctx.index.read().unwrap_or_else(PoisonError::into_inner).problems(ns, name)
}

/// Applies the node controller's status when it differs from what the node shows, and records
/// an Event when Ready flips.
async fn write_node_status(
    ctx: &Context,
    mn: &ModalityNode,
    status: &NodeControllerStatus,
    oref: &k8s_openapi::api::core::v1::ObjectReference,
) -> Result<()> {
    let observed = mn.status.as_ref().map(NodeControllerStatus::observed);
    if observed.as_ref() == Some(status) {
        return Ok(());
    }
    let was_ready = observed.as_ref().and_then(|s| find(&s.conditions, types::READY)).map(|c| c.is_true());
    let api: Api<ModalityNode> = Api::namespaced(ctx.client.clone(), &ns_of(mn)?);
    // Our whole struct, nothing else: the autoscaler's fields and conditions stay its own.
    api.patch_status(&mn.name_any(), &apply_params(), &Patch::Apply(&status_writers::apply_body(status))).await?;
    if let Some(c) = find(&status.conditions, types::READY).filter(|c| was_ready != Some(c.is_true())) {
        let t = if c.is_true() { EventType::Normal } else { EventType::Warning };
        publish(&ctx.recorder, oref, t, &c.reason, "UpdateStatus", c.message.clone()).await;
    }
    Ok(())
}

/// Moves `spec.adaptation` one step (see [`crate::adaptation`]): follows a running Job, writes
/// a finished run's model into `spec.model` (the rollout takes it from there), or starts a run
/// that is due. Returns the node with `status.adaptation` updated.
async fn step_adaptation(
    mut mn: ModalityNode,
    ctx: &Context,
    ns: &str,
    oref: &k8s_openapi::api::core::v1::ObjectReference,
) -> Result<ModalityNode> {
    use crate::adaptation::{self as adapt, phase};
    let Some(spec) = mn.spec.adaptation.clone() else { return Ok(mn) };
    let name = mn.name_any();
    let now = now_rfc3339();
    let mut ad = mn.status.as_ref().and_then(|s| s.adaptation.clone());
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);

    if let Some(a) = ad.as_mut().filter(|a| a.phase == phase::RUNNING) {
        let job = match &a.job {
            Some(j) => jobs.get_opt(j).await?,
            None => None,
        };
        match adapt::track(a, job.as_ref(), &now) {
            Some(phase::SUCCEEDED) => {
                let base = a.base_model.clone().unwrap_or_else(|| mn.spec.model.clone());
                let model = adapt::output_model(&mn, &spec, &base, a.run);
                // Guarded by resourceVersion: a concurrent edit of the node wins, we retry.
                let patch = serde_json::json!({
                    "metadata": {"resourceVersion": mn.resource_version()},
                    "spec": {"model": model},
                });
                let api: Api<ModalityNode> = Api::namespaced(ctx.client.clone(), ns);
                let patched = api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                let how = if mn.spec.rollout.is_some() { "as a canary (spec.rollout)" } else { "to every replica" };
                a.output_revision = Some(model.revision.clone());
                a.message = format!("{}; revision {} written to spec.model", a.message, model.revision);
                let note =
                    format!("run {} finished: revision {} ({}) goes out {how}", a.run, model.revision, model.uri);
                info!(%note, "adaptation");
                publish(&ctx.recorder, oref, EventType::Normal, "TrainingSucceeded", "Adapt", note).await;
                mn.metadata = patched.metadata;
                mn.spec.model = model;
            }
            Some(_) => {
                warn!(message = %a.message, "adaptation run failed");
                publish(&ctx.recorder, oref, EventType::Warning, "TrainingFailed", "Adapt", a.message.clone()).await;
            }
            None => {}
        }
    }

    if ad.as_ref().is_none_or(|a| a.phase != phase::RUNNING) {
        let request = mn.annotations().get(prism_api::node::ADAPT_REQUEST_ANNOTATION).cloned();
        let mut total = None;
        if let (Some(_), Some(prom)) = (spec.trigger.every_corrections, &ctx.prometheus) {
            let sel = crate::prom::node_selector(&name, ctx.match_namespace.then_some(ns));
            match prom.read_corrections_total(&sel).await {
                Ok(t) => total = t,
                Err(e) => warn!(error = %e, "adaptation trigger: Prometheus unavailable"),
            }
        }
        if let Some(trigger) = adapt::due(&spec, request.as_deref(), ad.as_ref(), total) {
            let base = adapt::base_model(&mn, &spec);
            let source = match adapt::blocker(&mn, &base) {
                Some(why) => Err(why),
                None => {
                    let pipelines = Api::<MultimodalPipeline>::namespaced(ctx.client.clone(), ns)
                        .list(&ListParams::default())
                        .await?
                        .items;
                    adapt::corrections_source(&mn, &spec, &pipelines)
                }
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
                    let next = adapt::started(ad.as_ref(), &spec, &name, start, &now);
                    let objs = adapt::objects(&mn, &ctx.cfg, &spec, next.run, &base, &source)?;
                    if let Some(claim) = &objs.claim {
                        // Created once, never re-applied: most of a claim's spec is immutable.
                        let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
                        if claims.get_opt(&claim.name_any()).await?.is_none() {
                            claims.create(&PostParams::default(), claim).await?;
                            info!(claim = %claim.name_any(), "created training claim");
                        }
                    }
                    apply(&ctx.client, ns, &objs.service).await?;
                    apply(&ctx.client, ns, &objs.job).await?;
                    // The previous run's objects stayed for `kubectl logs` until now.
                    if let Some(prev) = ad.as_ref().and_then(|a| a.job.clone()) {
                        delete_run(ctx, ns, &prev).await;
                    }
                    let note = format!(
                        "run {}: Job {} with {} workers x {} GPUs ({})",
                        next.run,
                        objs.job.name_any(),
                        spec.workers,
                        spec.gpus_per_worker,
                        next.trigger
                    );
                    info!(%note, "adaptation");
                    publish(&ctx.recorder, oref, EventType::Normal, "TrainingStarted", "Adapt", note).await;
                    ad = Some(next);
                }
                Err(why) => {
                    let a = ad.get_or_insert_with(Default::default);
                    if a.phase != phase::WAITING || a.message != why {
                        publish(&ctx.recorder, oref, EventType::Warning, "TrainingWaiting", "Adapt", why.clone()).await;
                    }
                    a.phase = phase::WAITING.into();
                    a.trigger = trigger;
                    a.message = why;
                }
            }
        }
    }
    mn.status.get_or_insert_with(Default::default).adaptation = ad;
    Ok(mn)
}

/// Deletes a finished run's Job (and its pods) and headless Service; failures are logged only.
async fn delete_run(ctx: &Context, ns: &str, job: &str) {
    let dp = kube::api::DeleteParams::background();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    if let Err(e) = jobs.delete(job, &dp).await {
        warn!(error = %e, job, "deleting the previous training Job failed");
    }
    if let Err(e) = services.delete(job, &dp).await {
        warn!(error = %e, service = job, "deleting the previous training Service failed");
    }
}

/// Moves the node's rollout one step (see [`crate::rollout`]): returns the node with its status
/// updated (currentRevision, canary, history) and the Event to record, if any. The canary's
/// figures come from Prometheus when the operator has one; without it a canary waits at the end
/// of its first pause (`metrics unavailable`), is never promoted blind, and is rolled back at
/// its progress deadline.
async fn step_rollout(
    mn: &ModalityNode,
    ctx: &Context,
    ns: &str,
) -> (ModalityNode, Option<(EventType, &'static str, String)>) {
    use crate::rollout::{self, Transition};
    let mut out = mn.clone();
    let mut status = mn.status.clone().unwrap_or_default();
    let now = chrono::Utc::now();
    let elapsed = status.canary.as_ref().map(|c| {
        chrono::DateTime::parse_from_rfc3339(&c.step_started)
            .map(|t| (now - t.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 1000.0)
            .unwrap_or(0.0)
    });
    let mut stats = None;
    if let (Some(c), Some(prom)) = (&status.canary, &ctx.prometheus) {
        let sel = crate::prom::node_selector(&mn.name_any(), ctx.match_namespace.then_some(ns));
        let window = elapsed.unwrap_or(0.0).ceil() as u64;
        let stable = status.current_revision.clone().unwrap_or_default();
        match (prom.read_revision(&sel, &stable, window).await, prom.read_revision(&sel, &c.revision, window).await) {
            (Ok(s), Ok(c)) => stats = Some((s, c)),
            (Err(e), _) | (_, Err(e)) => warn!(error = %e, "canary analysis: Prometheus unavailable"),
        }
    }
    let t = rollout::decide(&mn.spec, &status, elapsed, stats.as_ref().map(|(s, c)| (s, c)));
    let note = rollout::apply(&mn.spec, &mut status, &t, &now_rfc3339());
    out.status = Some(status);
    let event = note.and_then(|note| {
        let (type_, reason) = match t {
            Transition::Deploy => return None,
            Transition::Start { .. } => (EventType::Normal, "CanaryStarted"),
            Transition::Advance { .. } => (EventType::Normal, "CanaryAdvanced"),
            Transition::Promote { .. } => (EventType::Normal, "Promoted"),
            Transition::RollBack { .. } => (EventType::Warning, "RolledBack"),
            Transition::None | Transition::Hold { .. } => return None,
        };
        Some((type_, reason, note))
    });
    (out, event)
}

// ---------------------------------------------------------------- MultimodalPipeline

#[instrument(skip_all, fields(namespace = mmp.namespace().unwrap_or_default(), pipeline = %mmp.name_any()))]
pub async fn reconcile_pipeline(mmp: Arc<MultimodalPipeline>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.index_synced.load(Ordering::Acquire) {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let _m = ctx.metrics.measure(PIPELINE_CONTROLLER);
    let ns = ns_of(mmp.as_ref())?;
    let name = mmp.name_any();
    let oref = mmp.object_ref(&());

    let mut observed = BTreeMap::new();
    for n in &mmp.spec.nodes {
        if let Some(mn) = cached(&ctx.stores.nodes, &ns, &n.name) {
            let endpoints = ctx.index.read().unwrap_or_else(PoisonError::into_inner).endpoints(&ns, &n.name);
            observed.insert(
                n.name.clone(),
                ObservedNode {
                    modality: mn.spec.modality.clone(),
                    tls_secret: mn.spec.tls.as_ref().map(|t| t.secret_name.clone()),
                    canary: mn.status.as_ref().and_then(|s| s.canary.clone()),
                    endpoints,
                },
            );
        }
    }

    let key = (ns.clone(), name.clone());
    let remembered = ctx.published.lock().unwrap_or_else(PoisonError::into_inner).get(&key).cloned();
    let previous: Option<RoutingTable> = match remembered {
        Some(t) => Some(t),
        // First pass of this process: what the previous leader published.
        None => Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
            .get_opt(&pipeline::config_map_name(&name))
            .await?
            .and_then(|cm| cm.data)
            .and_then(|d| d.get(ROUTING_TABLE_KEY).cloned())
            .and_then(|s| serde_json::from_str(&s).ok()),
    };
    let floor = mmp.status.as_ref().map(|s| s.routing_table_generation).unwrap_or(0);
    let table = pipeline::routing_table(&mmp, &observed, previous.as_ref(), floor);
    let node_cas = observed.iter().filter_map(|(n, o)| Some((n.clone(), o.tls_secret.clone()?))).collect();
    let objs = pipeline::desired_objects(&mmp, &ctx.cfg, &table, &node_cas)?;

    // The table first: failover latency is measured to this write.
    apply(&ctx.client, &ns, &objs.config_map).await?;
    ctx.published.lock().unwrap_or_else(PoisonError::into_inner).insert(key, table.clone());
    apply(&ctx.client, &ns, &objs.service_account).await?;
    apply(&ctx.client, &ns, &objs.role).await?;
    apply(&ctx.client, &ns, &objs.role_binding).await?;
    if let Some(claim) = &objs.memory_claim {
        apply(&ctx.client, &ns, claim).await?;
    }
    let router = apply(&ctx.client, &ns, &objs.deployment).await?;
    apply(&ctx.client, &ns, &objs.service).await?;
    ctx.metrics.routing_table_generation.with_label_values(&[&ns, &name]).set(table.generation as i64);
    if previous.as_ref().map(|p| p.generation) != Some(table.generation) {
        let ready: usize = table.modalities.values().map(|v| v.iter().filter(|e| e.ready).count()).sum();
        info!(generation = table.generation, ready_endpoints = ready, "published routing table");
        publish(
            &ctx.recorder,
            &oref,
            EventType::Normal,
            "RoutingTableUpdated",
            "PublishRoutingTable",
            format!(
                "ConfigMap {} generation {} with {ready} ready endpoints",
                pipeline::config_map_name(&name),
                table.generation
            ),
        )
        .await;
    }

    let status = pipeline::status(&mmp, &observed, &table, Some(&router), &now_rfc3339());
    if mmp.status.as_ref() != Some(&status) {
        let old = mmp.status.clone().unwrap_or_default();
        let api: Api<MultimodalPipeline> = Api::namespaced(ctx.client.clone(), &ns);
        let body =
            serde_json::json!({"apiVersion": "prism.dev/v1alpha1", "kind": "MultimodalPipeline", "status": status});
        api.patch_status(&name, &apply_params(), &Patch::Apply(&body)).await?;
        for t in [types::READY, types::DEGRADED] {
            let before = find(&old.conditions, t).map(|c| (c.status, c.reason.clone()));
            if let Some(c) = find(&status.conditions, t) {
                if before != Some((c.status, c.reason.clone())) {
                    let bad = (t == types::READY) != c.is_true();
                    publish(
                        &ctx.recorder,
                        &oref,
                        if bad { EventType::Warning } else { EventType::Normal },
                        &c.reason,
                        "UpdateStatus",
                        c.message.clone(),
                    )
                    .await;
                }
            }
        }
    }
    Ok(Action::requeue(Duration::from_secs(300)))
}

fn error_policy<K: Resource<DynamicType = ()>>(
    controller: &'static str,
) -> impl Fn(Arc<K>, &Error, Arc<Context>) -> Action {
    move |obj, err, ctx| {
        warn!(controller, name = %obj.meta().name.clone().unwrap_or_default(), error = %err, "reconcile failed");
        ctx.metrics.reconcile_errors.with_label_values(&[controller, err.metric_label()]).inc();
        let oref = obj.object_ref(&());
        let note = err.to_string();
        let ctx2 = ctx.clone();
        tokio::spawn(
            async move { publish(&ctx2.recorder, &oref, EventType::Warning, "ReconcileFailed", "Reconcile", note).await }
                .in_current_span(),
        );
        Action::requeue(Duration::from_secs(5))
    }
}

// ---------------------------------------------------------------- wiring

/// Where the controllers look and who they say they are.
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub cfg: OperatorConfig,
    /// Watch one namespace only (tests, namespaced installs); None = all namespaces.
    pub namespace: Option<String>,
    pub instance: String,
    pub concurrency: u16,
    /// The builtin autoscaler (runs only on the leader, like the controllers).
    pub autoscaler: crate::autoscale::Settings,
}

fn api_for<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Fails with an actionable message when the CRDs are not installed.
pub async fn check_crds(client: &Client) -> std::result::Result<(), String> {
    let lp = ListParams::default().limit(1);
    for (kind, res) in [
        ("ModalityNode", Api::<ModalityNode>::all(client.clone()).list(&lp).await.map(|_| ())),
        ("MultimodalPipeline", Api::<MultimodalPipeline>::all(client.clone()).list(&lp).await.map(|_| ())),
    ] {
        if let Err(e) = res {
            return Err(format!(
                "cannot list {kind} ({e}); are the Prism CRDs installed? run `kubectl apply -f crds/`"
            ));
        }
    }
    Ok(())
}

/// Pipelines in `ns` that reference ModalityNode `node`.
fn pipelines_using(store: &Store<MultimodalPipeline>, ns: &str, node: &str) -> Vec<ObjectRef<MultimodalPipeline>> {
    store
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(ns) && p.spec.nodes.iter().any(|n| n.name == node))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Feeds the pod index from one watch and asks for the affected pipelines to be reconciled.
/// Pods whose problems (pod_health) changed get their ModalityNode reconciled through `node_tx`,
/// so its conditions name the cause.
async fn run_index(
    pods: Api<Pod>,
    index: SharedIndex,
    synced: Arc<AtomicBool>,
    store: Store<MultimodalPipeline>,
    mut tx: mpsc::Sender<ObjectRef<MultimodalPipeline>>,
    mut node_tx: mpsc::Sender<ObjectRef<ModalityNode>>,
) {
    let wc = watcher::Config::default().labels(labels::NODE);
    let mut stream = std::pin::pin!(watcher(pods, wc).default_backoff());
    let mut init: Vec<Pod> = Vec::new();
    while let Some(ev) = stream.next().await {
        let (changed, problems_changed) = match ev {
            Ok(watcher::Event::Apply(p)) => with_index(&index, |i| {
                (i.apply(&p).into_iter().collect::<Vec<_>>(), i.apply_problem(&p).into_iter().collect())
            }),
            Ok(watcher::Event::Delete(p)) => {
                let ns = p.namespace().unwrap_or_default();
                with_index(&index, |i| {
                    (
                        i.delete(&ns, &p.name_any()).into_iter().collect(),
                        i.delete_problem(&ns, &p.name_any()).into_iter().collect(),
                    )
                })
            }
            Ok(watcher::Event::Init) => {
                init.clear();
                (vec![], vec![])
            }
            Ok(watcher::Event::InitApply(p)) => {
                init.push(p);
                (vec![], vec![])
            }
            Ok(watcher::Event::InitDone) => {
                let pods = std::mem::take(&mut init);
                let changed = with_index(&index, |i| (i.reset(&pods), i.reset_problems(&pods)));
                synced.store(true, Ordering::Release);
                changed
            }
            Err(e) => {
                warn!(error = %e, "pod watch failed; retrying with backoff");
                (vec![], vec![])
            }
        };
        for (ns, node) in problems_changed {
            if node_tx.send(ObjectRef::new(&node).within(&ns)).await.is_err() {
                return;
            }
        }
        for (ns, node) in changed {
            for r in pipelines_using(&store, &ns, &node) {
                if tx.send(r).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn with_index<T>(index: &SharedIndex, f: impl FnOnce(&mut Index) -> T) -> T {
    f(&mut index.write().unwrap_or_else(PoisonError::into_inner))
}

/// Runs both controllers until `shutdown` resolves.
pub async fn run(
    client: Client,
    settings: RunSettings,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let reporter = Reporter { controller: labels::FIELD_MANAGER.into(), instance: Some(settings.instance.clone()) };
    let ns = &settings.namespace;
    let managed = watcher::Config::default().labels(&format!("{}={}", labels::MANAGED_BY, labels::MANAGED_BY_VALUE));

    // One watch per kind that several consumers need: ModalityNodes feed the node controller,
    // the pipeline controller and the autoscaler; our Deployments and Services feed both
    // controllers' `owns`. The stores answer reconciles' reads.
    let (nodes_store, [nodes_for_nodes, nodes_for_pipelines], nodes_watch) =
        watches::shared(api_for::<ModalityNode>(&client, ns), watcher::Config::default());
    let (deploy_store, [deploys_for_nodes, deploys_for_pipelines], deploy_watch) =
        watches::shared(api_for::<Deployment>(&client, ns), managed.clone());
    let (_, [svcs_for_nodes, svcs_for_pipelines], svc_watch) =
        watches::shared(api_for::<Service>(&client, ns), managed.clone());
    let shared_watches = [tokio::spawn(nodes_watch), tokio::spawn(deploy_watch), tokio::spawn(svc_watch)];
    let ctx = Arc::new(Context {
        client: client.clone(),
        cfg: settings.cfg.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        metrics,
        index: SharedIndex::default(),
        index_synced: Arc::new(AtomicBool::new(false)),
        prometheus: settings.autoscaler.prometheus.clone(),
        match_namespace: settings.autoscaler.match_namespace,
        stores: Stores { nodes: nodes_store.clone(), deployments: deploy_store },
        published: Default::default(),
    });
    tokio::pin!(shutdown);
    // Reconciles read the stores: the controllers start once both hold a first list.
    let listed = tokio::select! {
        r = ctx.stores.ready() => r.is_ok(),
        _ = &mut shutdown => false,
    };
    if !listed {
        shared_watches.iter().for_each(|w| w.abort());
        return;
    }
    let ctrl_cfg = CtrlConfig::default().concurrency(settings.concurrency);
    let (shutdown_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut rx1 = shutdown_tx.subscribe();
    let mut rx2 = shutdown_tx.subscribe();

    let (node_tx, node_rx) = mpsc::channel(1024);
    let nodes = Controller::for_stream(nodes_for_nodes, nodes_store.clone())
        .owns_stream(deploys_for_nodes)
        .owns_stream(svcs_for_nodes)
        .owns(api_for::<PodDisruptionBudget>(&client, ns), managed.clone())
        // Adaptation runs: a Job that finishes moves its node on at once.
        .owns(api_for::<Job>(&client, ns), managed.clone())
        // A pod that cannot run (image pull, crash loop, OOM) changes the node's conditions.
        .reconcile_on(node_rx)
        .with_config(ctrl_cfg.clone())
        .graceful_shutdown_on(async move {
            let _ = rx1.recv().await;
        })
        .run(reconcile_node, error_policy::<ModalityNode>(NODE_CONTROLLER), ctx.clone())
        .for_each(|_| futures::future::ready(()));

    let pipelines = Controller::new(api_for::<MultimodalPipeline>(&client, ns), watcher::Config::default());
    let store = pipelines.store();
    let (tx, rx) = mpsc::channel(1024);
    let index_task = tokio::spawn(run_index(
        api_for::<Pod>(&client, ns),
        ctx.index.clone(),
        ctx.index_synced.clone(),
        store.clone(),
        tx,
        node_tx,
    ));
    let store2 = store.clone();
    let pipelines = pipelines
        .owns_stream(deploys_for_pipelines)
        .owns_stream(svcs_for_pipelines)
        .owns(api_for::<ConfigMap>(&client, ns), managed.clone())
        // A pipeline waiting for a missing ModalityNode (NodeNotFound) is retried when it appears;
        // a node's modality change also changes the table.
        .watches_stream(nodes_for_pipelines, move |mn| {
            pipelines_using(&store2, &mn.namespace().unwrap_or_default(), &mn.name_any())
        })
        .reconcile_on(rx)
        .with_config(ctrl_cfg)
        .graceful_shutdown_on(async move {
            let _ = rx2.recv().await;
        })
        .run(reconcile_pipeline, error_policy::<MultimodalPipeline>(PIPELINE_CONTROLLER), ctx.clone())
        .for_each(|_| futures::future::ready(()));

    let mut rx3 = shutdown_tx.subscribe();
    let autoscaler = tokio::spawn(crate::autoscale::run(
        nodes_store,
        client.clone(),
        settings.autoscaler.clone(),
        ctx.metrics.clone(),
        Recorder::new(
            client.clone(),
            Reporter { controller: crate::autoscale::FIELD_MANAGER.into(), instance: Some(settings.instance.clone()) },
        ),
        async move {
            let _ = rx3.recv().await;
        },
    ));

    ready.store(true, Ordering::Release);
    info!(namespace = ?ns, "controllers running");
    let both = futures::future::join(nodes, pipelines);
    tokio::pin!(both);
    tokio::select! {
        _ = &mut both => {}
        _ = &mut shutdown => {
            info!("shutting down: finishing in-flight reconciles");
            let _ = shutdown_tx.send(());
            both.await;
        }
    }
    index_task.abort();
    autoscaler.abort();
    for w in shared_watches {
        w.abort();
    }
}
