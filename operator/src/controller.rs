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
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Config as CtrlConfig};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{watcher, Controller, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use prism_api::labels;
use prism_api::routing::{RoutingTable, ROUTING_TABLE_KEY};
use prism_api::status_writers;
use prism_api::{ModalityNode, MultimodalPipeline};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::{debug, info, instrument, warn, Instrument};

use crate::events::publish;
use crate::index::{Index, SharedIndex};
use crate::metrics::Metrics;
use crate::pipeline::ObservedNode;
use crate::plan::{self, Kind, Object, Write};
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
    /// Pipelines (the pipeline controller's own watch): an adaptation run reads its corrections
    /// from a pipeline's router, and the pod index maps a node's pods to the pipelines using it.
    pub pipelines: Store<MultimodalPipeline>,
}

impl Stores {
    /// Waits for every store's first list, so a reconcile never mistakes "not listed yet" for
    /// "does not exist". Called once, before the controllers start: a store's readiness wakes
    /// only one waiter at a time (kube's DelayedInit keeps one waker), so reconciles must not
    /// wait on it side by side with the controllers' own runners.
    async fn ready(&self) -> Result<()> {
        self.nodes.wait_until_ready().await.map_err(|_| Error::StoreClosed)?;
        self.deployments.wait_until_ready().await.map_err(|_| Error::StoreClosed)?;
        self.pipelines.wait_until_ready().await.map_err(|_| Error::StoreClosed)
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

    let obs = observe_node(&mn, &ctx, &ns).await?;
    let plan = plan::node(&mn, &ctx.cfg, &obs, chrono::Utc::now())?;
    if let Some(why) = &plan.invalid_spec {
        warn!(%why, "invalid spec");
    }
    let done = execute(&ctx, &ns, plan.writes).await?;
    publish_all(&ctx, &oref, &plan.events, &done).await;

    let mut node = plan.node;
    if let Some(meta) = done.node_metadata.clone() {
        node.metadata = meta;
    }
    // The Deployment as this pass applied it: its generation says whether it is rolling out.
    let deploy = done.deployments.get(&name).or(obs.deployment.as_ref());
    let problems = ctx.index.read().unwrap_or_else(PoisonError::into_inner).problems(&ns, &name);
    let status = node::status(&node, deploy, &problems, plan.invalid_spec.as_deref(), &now_rfc3339());
    if let Some(events) = plan::node_status_change(mn.status.as_ref(), &status) {
        let api: Api<ModalityNode> = Api::namespaced(ctx.client.clone(), &ns);
        // Our whole struct, nothing else: the autoscaler's fields and conditions stay its own.
        api.patch_status(&name, &apply_params(), &Patch::Apply(&status_writers::apply_body(&status))).await?;
        publish_all(&ctx, &oref, &events, &done).await;
    }
    Ok(plan.requeue.map_or_else(Action::await_change, Action::requeue))
}

/// What the planner needs for one node: the stores first; the API only for a running training
/// Job; Prometheus for a canary's figures and a corrections trigger.
async fn observe_node(mn: &ModalityNode, ctx: &Context, ns: &str) -> Result<plan::NodeObservation> {
    let name = mn.name_any();
    let pipelines = match mn.spec.adaptation {
        Some(_) => ctx
            .stores
            .pipelines
            .state()
            .iter()
            .filter(|p| p.namespace().as_deref() == Some(ns))
            .map(|p| (**p).clone())
            .collect(),
        None => Vec::new(),
    };
    let adaptation_job = match plan::adaptation_job(mn) {
        Some(job) => Api::<Job>::namespaced(ctx.client.clone(), ns).get_opt(job).await?,
        None => None,
    };
    let sel = || crate::prom::node_selector(&name, ctx.match_namespace.then_some(ns));
    let mut corrections_total = None;
    if let (true, Some(prom)) = (plan::wants_corrections_total(mn), &ctx.prometheus) {
        match prom.read_corrections_total(&sel()).await {
            Ok(t) => corrections_total = t,
            Err(e) => warn!(error = %e, "adaptation trigger: Prometheus unavailable"),
        }
    }
    let mut canary_stats = None;
    let status = mn.status.clone().unwrap_or_default();
    if let (Some(c), Some(prom)) = (&status.canary, &ctx.prometheus) {
        let window = crate::rollout::step_elapsed(&status, chrono::Utc::now()).unwrap_or(0.0).ceil() as u64;
        let stable = status.current_revision.clone().unwrap_or_default();
        match (prom.read_revision(&sel(), &stable, window).await, prom.read_revision(&sel(), &c.revision, window).await)
        {
            (Ok(s), Ok(c)) => canary_stats = Some((s, c)),
            (Err(e), _) | (_, Err(e)) => warn!(error = %e, "canary analysis: Prometheus unavailable"),
        }
    }
    Ok(plan::NodeObservation {
        deployment: cached(&ctx.stores.deployments, ns, &name),
        canary_exists: cached(&ctx.stores.deployments, ns, &node::canary_name(&name)).is_some(),
        canary_stats,
        adaptation_job,
        corrections_total,
        pipelines,
    })
}

/// What executing a plan's writes returned that the status is built from.
#[derive(Default)]
struct Executed {
    /// Deployments as the API server returned them from the apply, by name.
    deployments: BTreeMap<String, Deployment>,
    /// The node's metadata after a `SetModel` (a new generation).
    node_metadata: Option<kube::api::ObjectMeta>,
}

/// Makes a plan's writes in order; the first that fails ends the pass.
async fn execute(ctx: &Context, ns: &str, writes: Vec<Write>) -> Result<Executed> {
    let mut done = Executed::default();
    for w in writes {
        debug!(write = ?WriteName(&w), "executing");
        match w {
            Write::Apply(Object::Deployment(d)) => {
                let d = apply(&ctx.client, ns, &d).await?;
                done.deployments.insert(d.name_any(), d);
            }
            Write::Apply(o) => apply_object(&ctx.client, ns, &o).await?,
            Write::CreateClaim(claim) => {
                let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
                match claims.create(&PostParams::default(), &claim).await {
                    Ok(_) => info!(claim = %claim.name_any(), "created claim"),
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Write::Delete { kind, name } => match delete(&ctx.client, ns, kind, &name).await {
                Ok(()) => info!(?kind, %name, "deleted"),
                // The store lags the API: someone (or our last pass) deleted it already.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            },
            Write::Cleanup { kind, name } => {
                if let Err(e) = delete(&ctx.client, ns, kind, &name).await {
                    warn!(error = %e, ?kind, %name, "deleting a finished run's object failed");
                }
            }
            Write::SetModel { node, resource_version, model } => {
                let patch = serde_json::json!({
                    "metadata": {"resourceVersion": resource_version},
                    "spec": {"model": model},
                });
                let api: Api<ModalityNode> = Api::namespaced(ctx.client.clone(), ns);
                let patched = api.patch(&node, &PatchParams::default(), &Patch::Merge(&patch)).await?;
                done.node_metadata = Some(patched.metadata);
            }
        }
    }
    Ok(done)
}

/// A write's kind and name, for logs (the objects themselves are long).
struct WriteName<'a>(&'a Write);

impl std::fmt::Debug for WriteName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Write::Apply(o) => write!(f, "apply {}", o.describe()),
            Write::CreateClaim(c) => write!(f, "create PersistentVolumeClaim/{}", c.name_any()),
            Write::Delete { kind, name } | Write::Cleanup { kind, name } => write!(f, "delete {kind:?}/{name}"),
            Write::SetModel { node, model, .. } => write!(f, "set ModalityNode/{node} spec.model {}", model.revision),
        }
    }
}

async fn apply_object(client: &Client, ns: &str, o: &Object) -> Result<()> {
    match o {
        Object::Deployment(x) => apply(client, ns, x).await.map(drop),
        Object::Service(x) => apply(client, ns, x).await.map(drop),
        Object::PodDisruptionBudget(x) => apply(client, ns, x).await.map(drop),
        Object::Job(x) => apply(client, ns, x).await.map(drop),
        Object::ConfigMap(x) => apply(client, ns, x).await.map(drop),
        Object::ServiceAccount(x) => apply(client, ns, x).await.map(drop),
        Object::Role(x) => apply(client, ns, x).await.map(drop),
        Object::RoleBinding(x) => apply(client, ns, x).await.map(drop),
        Object::Claim(x) => apply(client, ns, x).await.map(drop),
    }
}

async fn delete(client: &Client, ns: &str, kind: Kind, name: &str) -> kube::Result<()> {
    // Background: a Job's pods go with it (a Job's default is to orphan them).
    let dp = kube::api::DeleteParams::background();
    match kind {
        Kind::Deployment => Api::<Deployment>::namespaced(client.clone(), ns).delete(name, &dp).await.map(drop),
        Kind::Job => Api::<Job>::namespaced(client.clone(), ns).delete(name, &dp).await.map(drop),
        Kind::Service => Api::<Service>::namespaced(client.clone(), ns).delete(name, &dp).await.map(drop),
    }
}

/// Records a plan's Events; one tied to a Deployment's generation only when the apply changed it.
async fn publish_all(ctx: &Context, oref: &ObjectReference, events: &[plan::Event], done: &Executed) {
    for e in events {
        if let Some(g) = &e.if_changed {
            let after = done.deployments.get(&g.deployment).map(|d| d.metadata.generation);
            if after.is_none_or(|a| a == g.before) {
                continue;
            }
        }
        info!(reason = %e.reason, note = %e.note, "event");
        publish(&ctx.recorder, oref, e.type_, &e.reason, e.action, e.note.clone()).await;
    }
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

    let plan = plan::pipeline(&mmp, &ctx.cfg, &observed, previous.as_ref())?;
    let done = execute(&ctx, &ns, plan.writes).await?;
    let generation = plan.table.generation;
    ctx.published.lock().unwrap_or_else(PoisonError::into_inner).insert(key, plan.table.clone());
    ctx.metrics.routing_table_generation.with_label_values(&[&ns, &name]).set(generation as i64);
    publish_all(&ctx, &oref, &plan.events, &done).await;

    let router = done.deployments.get(&pipeline::router_name(&name));
    let status = pipeline::status(&mmp, &observed, &plan.table, router, &now_rfc3339());
    if let Some(events) = plan::pipeline_status_change(mmp.status.as_ref(), &status) {
        let api: Api<MultimodalPipeline> = Api::namespaced(ctx.client.clone(), &ns);
        let body =
            serde_json::json!({"apiVersion": "prism.dev/v1alpha1", "kind": "MultimodalPipeline", "status": status});
        api.patch_status(&name, &apply_params(), &Patch::Apply(&body)).await?;
        publish_all(&ctx, &oref, &events, &done).await;
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
    let (pipeline_store, [pipelines_for_pipelines], pipeline_watch) =
        watches::shared(api_for::<MultimodalPipeline>(&client, ns), watcher::Config::default());
    let shared_watches =
        [tokio::spawn(nodes_watch), tokio::spawn(deploy_watch), tokio::spawn(svc_watch), tokio::spawn(pipeline_watch)];
    let ctx = Arc::new(Context {
        client: client.clone(),
        cfg: settings.cfg.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        metrics,
        index: SharedIndex::default(),
        index_synced: Arc::new(AtomicBool::new(false)),
        prometheus: settings.autoscaler.prometheus.clone(),
        match_namespace: settings.autoscaler.match_namespace,
        stores: Stores { nodes: nodes_store.clone(), deployments: deploy_store, pipelines: pipeline_store.clone() },
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

    let store = pipeline_store;
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
    let pipelines = Controller::for_stream(pipelines_for_pipelines, store.clone())
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
