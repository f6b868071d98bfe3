//! The request engine: routing-table state, replica calls with retries, parallel fan-out,
//! fusion and degradation. Transport-neutral: the HTTP and gRPC front doors both call
//! [`Router::infer`] and [`Router::embeddings_call`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use prism_api::pipeline::{FusionStrategy, MissingRequired, NodeRole};
use prism_api::wire::node::{EmbedInput, EmbedRequest, EmbedResponse, InputItem, ScoredLabel};
use prism_api::wire::router::{
    Degraded, InferRequest, InferResponse, ModalityResult, ReloadResponse, ReplicaRef, RouterTimings, EMBEDDINGS_CALL,
};
use prism_api::wire::ErrorBody;
use prism_api::{MultimodalPipelineSpec, RouteEndpoint, RoutingTable};
use tracing::{debug, info, warn, Instrument};

use crate::balancer::Balancer;
use crate::error::RouterError;
use crate::fusion;
use crate::memory::{AnswerCache, RequestLog};
use crate::metrics::Metrics;
use crate::plan::{self, Decision, ModalityConfig};
use prism_memory::{logged_inputs, MemoryError, Record};

/// Everything a request reads, swapped atomically on reload so a request sees one consistent
/// table + spec even if a reload lands mid-flight.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub pipeline: String,
    pub table: RoutingTable,
    pub spec: MultimodalPipelineSpec,
    pub configs: BTreeMap<String, ModalityConfig>,
}

impl Snapshot {
    pub fn new(pipeline: String, table: RoutingTable, spec: MultimodalPipelineSpec) -> Self {
        let configs = plan::modality_configs(&spec, &table);
        Self { pipeline, table, spec, configs }
    }
}

/// An empty pipeline spec (all defaults): routing works from a table alone.
pub fn default_spec() -> MultimodalPipelineSpec {
    MultimodalPipelineSpec {
        nodes: Vec::new(),
        routing: Default::default(),
        fusion: Default::default(),
        degradation: Default::default(),
        memory: Default::default(),
        router_replicas: 1,
        router_image: None,
        auth: Default::default(),
    }
}

/// Retries are bounded per call (`routing.retries`) and overall by a token bucket: each
/// request earns 0.2 retries, plus 10 per second, at most 100 banked. An outage then costs at
/// most ~20% extra load instead of multiplying it (Finagle/Envoy retry budgets).
#[derive(Debug)]
struct RetryBudget {
    tokens: f64,
    at: Instant,
}

impl RetryBudget {
    const CAP: f64 = 100.0;
    const PER_REQUEST: f64 = 0.2;
    const PER_SECOND: f64 = 10.0;

    fn refill(&mut self) {
        let now = Instant::now();
        let dt = now.duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * Self::PER_SECOND).min(Self::CAP);
        self.at = now;
    }
    fn deposit(&mut self) {
        self.refill();
        self.tokens = (self.tokens + Self::PER_REQUEST).min(Self::CAP);
    }
    fn withdraw(&mut self) -> bool {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Why a modality call produced no vector.
#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    /// The node said the input is bad (its 4xx). The client's fault: no retry, no ejection.
    Rejected(String),
    /// No eligible replica, or every attempt failed.
    Unavailable(String),
    /// The node request would exceed the nodes' body limit: the client's fault, never sent.
    TooLarge { bytes: usize, limit: usize },
}

/// What the fusion node made of one request (early fusion).
struct EarlyFused {
    vector: Vec<f32>,
    replica: ReplicaRef,
    /// De-fusion: each modality's leave-one-out share, when asked for.
    shares: Option<BTreeMap<String, f64>>,
    /// The fusion node's own classification of the fused vector, when it has a head.
    labels: Option<Vec<ScoredLabel>>,
}

/// A successful modality call.
#[derive(Debug, Clone)]
pub struct Served {
    pub response: EmbedResponse,
    pub replica: ReplicaRef,
    pub attempts: u32,
    pub latency_ms: f64,
}

enum SendError {
    Rejected(String),
    Failed(String),
    TooLarge { bytes: usize, limit: usize },
}

/// Decrements in-flight if a call future is dropped (client went away) before it finished.
struct InflightGuard<'a> {
    router: &'a Router,
    modality: &'a str,
    endpoint: String,
    armed: bool,
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.router.with_balancer(|b| b.on_cancel(self.modality, &self.endpoint));
        }
    }
}

/// Options of the engine that do not come from the pipeline spec.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Interval of active `/ready` probes of every replica (None: passive health only).
    pub probe_interval: Option<Duration>,
    /// PEM CA certificates trusted for `https://` node endpoints, besides the system roots.
    pub node_ca_pem: Option<Vec<u8>>,
    /// Largest body a node accepts (`prism-node --max-body-bytes`). A node request over it is
    /// refused with a 413 before it is sent: a node answers such a body by closing the connection
    /// mid-upload, which the router would otherwise count as a replica failure.
    pub node_max_body_bytes: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            probe_interval: Some(Duration::from_millis(500)),
            node_ca_pem: None,
            node_max_body_bytes: prism_api::wire::frontdoor::DEFAULT_MAX_BODY_BYTES,
        }
    }
}

pub struct Router {
    snapshot: RwLock<Arc<Snapshot>>,
    balancer: Mutex<Balancer>,
    retry_budget: Mutex<RetryBudget>,
    clock: Instant,
    client: reqwest::Client,
    pub metrics: Arc<Metrics>,
    memory: RwLock<Option<Arc<dyn RequestLog>>>,
    cache: RwLock<Option<Arc<dyn AnswerCache>>>,
    pub options: EngineOptions,
}

impl Router {
    pub fn new(
        pipeline: String,
        spec: MultimodalPipelineSpec,
        table: Option<RoutingTable>,
        options: EngineOptions,
    ) -> Result<Arc<Self>, RouterError> {
        let metrics = Arc::new(Metrics::new().map_err(|e| RouterError::Internal(format!("metrics: {e}")))?);
        let mut builder = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2));
        if let Some(pem) = &options.node_ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| RouterError::Validation(format!("--node-ca is not PEM certificates: {e}")))?;
            if certs.is_empty() {
                return Err(RouterError::Validation("--node-ca holds no certificate".into()));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let client = builder.build().map_err(|e| RouterError::Internal(format!("http client: {e}")))?;
        let table = table.unwrap_or_else(|| RoutingTable { pipeline: pipeline.clone(), ..Default::default() });
        let pipeline = if table.pipeline.is_empty() { pipeline } else { table.pipeline.clone() };
        let mut balancer = Balancer {
            heartbeat_interval_ms: options.probe_interval.map(|d| d.as_secs_f64() * 1000.0),
            ..Default::default()
        };
        balancer.apply_table(&table.modalities, 0.0);
        metrics.table_generation.with_label_values(&[&pipeline]).set(table.generation as f64);
        Ok(Arc::new(Self {
            snapshot: RwLock::new(Arc::new(Snapshot::new(pipeline, table, spec))),
            balancer: Mutex::new(balancer),
            retry_budget: Mutex::new(RetryBudget { tokens: RetryBudget::CAP / 2.0, at: Instant::now() }),
            clock: Instant::now(),
            client,
            metrics,
            memory: RwLock::new(None),
            cache: RwLock::new(None),
            options,
        }))
    }

    /// Log every answered request to `memory` (acknowledged only once durable) and start the
    /// accuracy estimates from the corrections it already holds.
    pub fn set_memory(&self, memory: Arc<dyn RequestLog>) -> Result<(), MemoryError> {
        let feedback = memory.feedback()?;
        self.with_balancer(|b| {
            for f in &feedback {
                b.add_feedback(&f.node, &f.revision, f.rating_sum, f.count);
            }
        });
        if let Ok(mut m) = self.memory.write() {
            *m = Some(memory);
        }
        Ok(())
    }

    pub fn memory(&self) -> Option<Arc<dyn RequestLog>> {
        self.memory.read().ok().and_then(|m| m.clone())
    }

    /// A correction of a past request: stored durably, then folded into the accuracy estimate
    /// A_i of every replica revision that served it. Returns those revisions with their new A_i.
    pub async fn correct(
        &self,
        correction: prism_memory::Correction,
    ) -> Result<Vec<(prism_api::wire::router::ReplicaRef, f64)>, RouterError> {
        let memory = self.memory().ok_or_else(memory_off)?;
        let rating = correction.rating;
        let replicas = memory.correct(correction).await.map_err(memory_error)?;
        let snap = self.snapshot();
        Ok(self.with_balancer(|b| {
            replicas
                .into_iter()
                .map(|r| {
                    b.add_feedback(&r.node, &r.revision, rating, 1);
                    self.metrics.corrections_total.with_label_values(&[&r.node, &r.revision]).inc();
                    self.metrics.correction_rating_sum.with_label_values(&[&r.node, &r.revision]).inc_by(rating);
                    let prior = snap
                        .table
                        .modalities
                        .values()
                        .flatten()
                        .find(|e| e.endpoint == r.endpoint)
                        .map_or(1.0, |e| e.accuracy);
                    let a = b.accuracy_of(&r.node, &r.revision, prior);
                    (r, a)
                })
                .collect()
        }))
    }

    pub fn set_answer_cache(&self, cache: Arc<dyn AnswerCache>) {
        if let Ok(mut c) = self.cache.write() {
            *c = Some(cache);
        }
    }

    fn now_ms(&self) -> f64 {
        self.clock.elapsed().as_secs_f64() * 1000.0
    }

    /// Poisoning only happens if a thread panicked while holding the lock; the balancer's
    /// data is still consistent (every mutation is a few field writes), so keep serving.
    fn with_balancer<T>(&self, f: impl FnOnce(&mut Balancer) -> T) -> T {
        let mut g = self.balancer.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replace the routing table if `table` is strictly newer. An equal generation with the
    /// same routes is a no-op (file re-read, duplicate push); anything else older is a conflict.
    pub fn apply_table(&self, table: RoutingTable) -> Result<ReloadResponse, RouterError> {
        let mut guard = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
        let cur = guard.clone();
        if !cur.table.pipeline.is_empty() && !table.pipeline.is_empty() && table.pipeline != cur.table.pipeline {
            return Err(RouterError::Validation(format!(
                "routing table is for pipeline '{}' but this router serves '{}'",
                table.pipeline, cur.table.pipeline
            )));
        }
        if !table.supersedes(&cur.table) {
            if table.generation == cur.table.generation && table.same_routes(&cur.table) {
                return Ok(ReloadResponse { applied: false, generation: cur.table.generation });
            }
            return Err(RouterError::StaleGeneration { offered: table.generation, current: cur.table.generation });
        }
        let now = self.now_ms();
        self.with_balancer(|b| b.apply_table(&table.modalities, now));
        let pipeline = if table.pipeline.is_empty() { cur.pipeline.clone() } else { table.pipeline.clone() };
        let generation = table.generation;
        self.metrics.table_generation.with_label_values(&[&pipeline]).set(generation as f64);
        let mut next = Snapshot::new(pipeline.clone(), table, cur.spec.clone());
        // A modality that vanished from the table (its node scaled to zero or deleted) stays
        // known, so its requests degrade (partial / 503 naming it) instead of turning into
        // "unknown modality" 422s.
        for (m, c) in &cur.configs {
            next.configs.entry(m.clone()).or_insert_with(|| c.clone());
        }
        *guard = Arc::new(next);
        info!(pipeline = %pipeline, generation, "routing table applied");
        Ok(ReloadResponse { applied: true, generation })
    }

    /// Replace the pipeline spec (fusion, degradation, routing policy).
    pub fn apply_spec(&self, spec: MultimodalPipelineSpec) {
        let mut guard = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
        let cur = guard.clone();
        let mut next = Snapshot::new(cur.pipeline.clone(), cur.table.clone(), spec);
        for (m, c) in &cur.configs {
            next.configs.entry(m.clone()).or_insert_with(|| c.clone());
        }
        *guard = Arc::new(next);
        info!(pipeline = %cur.pipeline, "pipeline spec applied");
    }

    /// Whether `modality` has a replica the balancer would route to now (the Open Inference
    /// Protocol's per-model readiness).
    pub fn modality_ready(&self, modality: &str) -> bool {
        let snap = self.snapshot();
        let now = self.now_ms();
        snap.table.generation > 0 && self.with_balancer(|b| b.has_candidate(modality, &snap.spec.routing, now))
    }

    /// Ready = a routing table is loaded and at least one modality has a routable replica.
    pub fn is_ready(&self) -> bool {
        let snap = self.snapshot();
        let now = self.now_ms();
        snap.table.generation > 0
            && self.with_balancer(|b| snap.table.modalities.keys().any(|m| b.has_candidate(m, &snap.spec.routing, now)))
    }

    async fn send(
        &self,
        ep: &RouteEndpoint,
        inputs: &[EmbedInput],
        timeout: Duration,
    ) -> Result<EmbedResponse, SendError> {
        let url = format!("{}/embed", ep.endpoint.trim_end_matches('/'));
        let body = EmbedRequest { inputs: inputs.to_vec(), deadline_ms: Some(timeout.as_millis().max(1) as u64) };
        let body =
            serde_json::to_vec(&body).map_err(|e| SendError::Failed(format!("encoding the node request: {e}")))?;
        let limit = self.options.node_max_body_bytes;
        if body.len() > limit {
            return Err(SendError::TooLarge { bytes: body.len(), limit });
        }
        let resp = self
            .client
            .post(&url)
            .timeout(timeout)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| {
                SendError::Failed(if e.is_timeout() {
                    format!("timed out after {} ms", timeout.as_millis())
                } else {
                    format!("{url}: {}", error_chain(&e))
                })
            })?;
        let status = resp.status();
        let bytes =
            resp.bytes().await.map_err(|e| SendError::Failed(format!("{url}: reading body: {}", error_chain(&e))))?;
        if status.is_success() {
            let r: EmbedResponse = serde_json::from_slice(&bytes)
                .map_err(|e| SendError::Failed(format!("{url}: unparseable answer: {e}")))?;
            if r.embeddings.len() != inputs.len() {
                return Err(SendError::Failed(format!(
                    "{url}: {} embeddings for {} inputs",
                    r.embeddings.len(),
                    inputs.len()
                )));
            }
            return Ok(r);
        }
        let msg = serde_json::from_slice::<ErrorBody>(&bytes)
            .map(|b| b.error.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(300).collect());
        // 408/429 are the node's trouble (deadline, overload): another replica may do better.
        if status.is_client_error() && status.as_u16() != 408 && status.as_u16() != 429 {
            Err(SendError::Rejected(msg))
        } else {
            Err(SendError::Failed(format!("{url}: HTTP {status}: {msg}")))
        }
    }

    /// Call one modality: choose a replica, send, and on failure retry on another replica
    /// while attempts, the retry budget and the deadline allow.
    pub async fn call_modality(
        &self,
        snap: &Snapshot,
        modality: &str,
        inputs: &[EmbedInput],
        deadline: Instant,
    ) -> Result<Served, CallError> {
        let policy = &snap.spec.routing;
        let max_attempts = 1 + policy.retries;
        let mut tried = BTreeSet::new();
        let mut last_err: Option<String> = None;
        for attempt in 0..max_attempts {
            if attempt > 0 {
                let ok = self.retry_budget.lock().map(|mut b| b.withdraw()).unwrap_or(false);
                if !ok {
                    last_err = Some(format!("{}; retry budget exhausted", last_err.unwrap_or_default()));
                    break;
                }
                self.metrics.retries_total.with_label_values(&[modality]).inc();
            }
            let now = self.now_ms();
            let attempts_left = max_attempts - attempt;
            let chosen = self.with_balancer(|b| {
                let mut rng = rand::rng();
                let ep = b.choose(modality, policy, &tried, now, &mut rng);
                let mut others = false;
                if let Some(e) = &ep {
                    b.on_start(modality, &e.endpoint);
                    if attempts_left > 1 {
                        let mut t = tried.clone();
                        t.insert(e.endpoint.clone());
                        others = b.has_alternative(modality, policy, &t, now);
                    }
                }
                ep.map(|e| (e, others))
            });
            let Some((ep, retry_possible)) = chosen else {
                if last_err.is_none() {
                    last_err = Some("no healthy replica (unready, ejected or failing)".into());
                }
                break;
            };
            let mut guard = InflightGuard { router: self, modality, endpoint: ep.endpoint.clone(), armed: true };
            tried.insert(ep.endpoint.clone());
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(CallError::Unavailable(format!("deadline exceeded ({})", last_err.unwrap_or_default())));
            }
            // Per-try timeout: when a retry could go to another replica, this try gets its share
            // of what is left, so a replica that hangs (partitioned, stopped) costs a fraction of
            // the deadline and the retry still has time (Envoy's per_try_timeout). A lone
            // replica gets all of it.
            let budget = if retry_possible { remaining / attempts_left } else { remaining };
            let t0 = Instant::now();
            let res = self.send(&ep, inputs, budget).await;
            let latency_ms = t0.elapsed().as_secs_f64() * 1000.0;
            guard.armed = false;
            let now = self.now_ms();
            match res {
                Ok(response) => {
                    self.with_balancer(|b| {
                        b.on_success(modality, &ep.endpoint, latency_ms, now);
                        if !response.revision.is_empty() {
                            b.note_revision(modality, &ep.endpoint, &response.revision);
                        }
                    });
                    let revision =
                        if response.revision.is_empty() { ep.revision.clone() } else { response.revision.clone() };
                    self.metrics
                        .upstream_duration
                        .with_label_values(&[modality, &ep.node, &revision])
                        .observe(latency_ms / 1000.0);
                    let replica = ReplicaRef { node: ep.node.clone(), endpoint: ep.endpoint.clone(), revision };
                    return Ok(Served { response, replica, attempts: attempt + 1, latency_ms });
                }
                Err(SendError::Rejected(msg)) => {
                    // The replica is healthy: it answered, just not with a vector.
                    self.with_balancer(|b| b.on_success(modality, &ep.endpoint, latency_ms, now));
                    return Err(CallError::Rejected(msg));
                }
                Err(SendError::TooLarge { bytes, limit }) => {
                    // Nothing was sent: the replica's record is untouched (not a success, not a
                    // failure), and no other replica would accept it either.
                    self.with_balancer(|b| b.on_cancel(modality, &ep.endpoint));
                    return Err(CallError::TooLarge { bytes, limit });
                }
                Err(SendError::Failed(msg)) => {
                    let out = self.with_balancer(|b| b.on_failure(modality, &ep.endpoint, policy, now, true));
                    self.metrics.upstream_failures.with_label_values(&[modality, &ep.node, &ep.revision]).inc();
                    if out.ejected {
                        self.metrics.ejections_total.with_label_values(&[&ep.node]).inc();
                        warn!(modality, endpoint = %ep.endpoint, node = %ep.node, "replica ejected after consecutive errors");
                    }
                    debug!(modality, endpoint = %ep.endpoint, attempt, error = %msg, "node call failed");
                    last_err = Some(msg);
                }
            }
        }
        Err(CallError::Unavailable(last_err.unwrap_or_else(|| "no healthy replica".into())))
    }

    /// `POST /v1/infer`: fan out to every present modality in parallel, fuse, degrade.
    pub async fn infer(&self, req: InferRequest, request_id: &str) -> Result<InferResponse, RouterError> {
        let snap = self.snapshot();
        let span = tracing::info_span!("infer", pipeline = %snap.pipeline, request_id = %request_id);
        let t0 = Instant::now();
        let res = self.infer_inner(&snap, req, request_id, t0).instrument(span).await;
        let outcome = match &res {
            Ok(r) if r.degraded.as_ref().is_some_and(|d| d.cached) => "cached",
            Ok(r) if r.degraded.is_some() => "degraded",
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        self.metrics.request_duration.with_label_values(&[&snap.pipeline, outcome]).observe(t0.elapsed().as_secs_f64());
        res
    }

    async fn infer_inner(
        &self,
        snap: &Snapshot,
        req: InferRequest,
        request_id: &str,
        t0: Instant,
    ) -> Result<InferResponse, RouterError> {
        plan::validate_modalities(req.inputs.keys(), &snap.configs)?;
        if let Ok(mut b) = self.retry_budget.lock() {
            b.deposit();
        }
        let policy = &snap.spec.routing;
        let timeout_ms = req.timeout_ms.map_or(policy.timeout_ms, |t| t.min(policy.timeout_ms)).max(1);
        let deadline = t0 + Duration::from_millis(timeout_ms);
        let route_ms = ms(t0.elapsed());

        let t_fan = Instant::now();
        let (served, missing) = self.fan_out(snap, &req.inputs, deadline).await?;
        let fanout_ms = ms(t_fan.elapsed());

        let mut degraded = match self.degrade(snap, &served, missing, deadline, timeout_ms)? {
            Degrade::Proceed(d) => d,
            Degrade::Cached { missing, reason, vectors } => {
                return self.cached_answer(snap, &vectors, missing, reason, request_id);
            }
        };

        let t_fuse = Instant::now();
        let de_fusion = req.de_fusion.unwrap_or(snap.spec.fusion.de_fusion);
        let fused = self.fuse(snap, &served, de_fusion, deadline, &mut degraded).await?;
        let fuse_ms = ms(t_fuse.elapsed());

        let modalities: BTreeMap<String, ModalityResult> = served
            .into_iter()
            .map(|(m, s)| {
                let weight = fused.weights.get(&m).copied().unwrap_or(0.0);
                let embedding = s.response.embeddings.into_iter().next().unwrap_or_default();
                let labels = s.response.labels.and_then(|l| l.into_iter().next());
                (
                    m,
                    ModalityResult {
                        embedding,
                        replica: s.replica,
                        weight,
                        attempts: s.attempts,
                        latency_ms: s.latency_ms,
                        labels,
                    },
                )
            })
            .collect();
        let per_modality_labels: BTreeMap<String, Vec<ScoredLabel>> =
            modalities.iter().filter_map(|(m, r)| Some((m.clone(), r.labels.clone()?))).collect();
        let labels = fused.labels.or_else(|| fusion::mix_labels(&per_modality_labels, &fused.weights));
        self.count_degraded(snap, degraded.as_ref());
        let mut resp = InferResponse {
            id: request_id.to_string(),
            pipeline: snap.pipeline.clone(),
            generation: snap.table.generation,
            strategy: strategy_name(fused.strategy).to_string(),
            embedding: fused.embedding,
            modalities,
            contributions: if de_fusion { fused.contributions } else { None },
            fusion_replica: fused.replica,
            labels,
            timings: RouterTimings { route_ms, fanout_ms, fuse_ms, memory_ms: None, total_ms: ms(t0.elapsed()) },
            degraded,
            recorded: None,
        };
        self.record(snap, &req.inputs, &mut resp, request_id, t0).await;
        Ok(resp)
    }

    /// Calls every modality at once, each with its own retries, under one shared deadline.
    /// Returns what answered and, for what did not, why; a node that refuses the input (4xx)
    /// fails the whole request, since retrying elsewhere would be refused too.
    async fn fan_out(
        &self,
        snap: &Snapshot,
        inputs: &BTreeMap<String, EmbedInput>,
        deadline: Instant,
    ) -> Result<(BTreeMap<String, Served>, BTreeMap<String, String>), RouterError> {
        let calls = inputs.iter().map(|(m, input)| {
            let inputs = std::slice::from_ref(input);
            async move { (m.clone(), self.call_modality(snap, m, inputs, deadline).await) }
        });
        let mut served = BTreeMap::new();
        let mut missing = BTreeMap::new();
        for (m, r) in futures::future::join_all(calls).await {
            match r {
                Ok(s) => {
                    served.insert(m, s);
                }
                Err(CallError::Rejected(message)) => {
                    return Err(RouterError::UpstreamRejected { modality: m, message })
                }
                Err(CallError::TooLarge { bytes, limit }) => {
                    return Err(RouterError::UpstreamTooLarge { modality: m, bytes, limit })
                }
                Err(CallError::Unavailable(why)) => {
                    missing.insert(m, why);
                }
            }
        }
        Ok((served, missing))
    }

    /// What the pipeline's degradation policy makes of the modalities that did not answer.
    fn degrade(
        &self,
        snap: &Snapshot,
        served: &BTreeMap<String, Served>,
        missing: BTreeMap<String, String>,
        deadline: Instant,
        timeout_ms: u64,
    ) -> Result<Degrade, RouterError> {
        let served_names: BTreeSet<String> = served.keys().cloned().collect();
        match plan::decide(&snap.spec, &snap.configs, &served_names, &missing) {
            Decision::Whole => Ok(Degrade::Proceed(None)),
            Decision::Partial { missing, reason } => {
                Ok(Degrade::Proceed(Some(Degraded { missing, reason, cached: false })))
            }
            Decision::Fail(msg) => {
                if Instant::now() >= deadline && !missing.is_empty() && served.is_empty() {
                    return Err(RouterError::Timeout(timeout_ms));
                }
                Err(RouterError::Unavailable(msg))
            }
            Decision::Cached { missing, reason } => {
                Ok(Degrade::Cached { missing, reason, vectors: first_vectors(served) })
            }
        }
    }

    /// The nearest past answer, when a required modality is missing and the pipeline says
    /// `onMissingRequired: cached`.
    fn cached_answer(
        &self,
        snap: &Snapshot,
        vectors: &BTreeMap<String, Vec<f32>>,
        missing: Vec<String>,
        reason: String,
        request_id: &str,
    ) -> Result<InferResponse, RouterError> {
        let cache = self.cache.read().ok().and_then(|c| c.clone());
        let Some(cache) = cache else {
            return Err(RouterError::Unavailable(format!(
                "{reason}; degradation.onMissingRequired is cached but this router has no answer cache (memory is off and --answer-cache-entries is 0)"
            )));
        };
        let min = snap.spec.degradation.cache.min_similarity;
        match cache.nearest(&snap.pipeline, vectors, min) {
            Some((mut past, similarity)) => {
                let answered = past.id.clone();
                past.id = request_id.to_string();
                let reason =
                    format!("{reason}; served the cached answer of request {answered} (similarity {similarity:.4})");
                past.degraded = Some(Degraded { missing, reason, cached: true });
                self.count_degraded(snap, past.degraded.as_ref());
                Ok(past)
            }
            None => Err(RouterError::Unavailable(format!("{reason}; no cached answer with similarity >= {min}"))),
        }
    }

    /// Fuses the answered modalities with the pipeline's strategy. Early fusion whose fusion
    /// node is down falls back (weighted, or late when the vector sizes differ) and says so in
    /// `degraded`: a degraded answer beats none.
    async fn fuse(
        &self,
        snap: &Snapshot,
        served: &BTreeMap<String, Served>,
        de_fusion: bool,
        deadline: Instant,
        degraded: &mut Option<Degraded>,
    ) -> Result<Fused, RouterError> {
        let vectors = first_vectors(served);
        let prior: BTreeMap<String, f64> =
            vectors.keys().map(|m| (m.clone(), snap.configs.get(m).map_or(1.0, |c| c.weight))).collect();
        let present: Vec<&String> = vectors.keys().collect();
        let strategy = snap.spec.fusion.strategy;
        let late = || Fused::late(&present, &prior);
        Ok(match strategy {
            FusionStrategy::Late => late(),
            FusionStrategy::Weighted => Fused::from(strategy, fusion::weighted(&vectors, &prior)?),
            FusionStrategy::Attention => Fused::from(strategy, fusion::attention(&vectors, &prior)?),
            FusionStrategy::Early => match self.early_fuse(snap, &vectors, de_fusion, deadline).await {
                Ok(early) => Fused {
                    strategy,
                    embedding: Some(early.vector),
                    weights: fusion::renormalise(&present, &prior),
                    contributions: early.shares,
                    replica: Some(early.replica),
                    labels: early.labels,
                },
                Err((fusion_modality, why)) => {
                    let (fused, said) = match fusion::weighted(&vectors, &prior) {
                        Ok(f) => (Fused::from(FusionStrategy::Weighted, f), "fell back to weighted fusion".to_string()),
                        Err(fusion::FusionError::DimensionMismatch { .. }) => {
                            let sizes: Vec<String> = vectors.iter().map(|(m, v)| format!("{m} {}", v.len())).collect();
                            let said = format!(
                                "the modality vectors differ in size ({}), so the answer carries them unfused (late)",
                                sizes.join(", ")
                            );
                            (late(), said)
                        }
                        Err(e) => return Err(e.into()),
                    };
                    let d = degraded.get_or_insert(Degraded { missing: vec![], reason: String::new(), cached: false });
                    d.missing.push(fusion_modality.clone());
                    d.missing.sort();
                    let extra = format!("fusion node '{fusion_modality}' unavailable ({why}); {said}");
                    d.reason = if d.reason.is_empty() { extra } else { format!("{}; {extra}", d.reason) };
                    fused
                }
            },
        })
    }

    /// Logs the answer to memory (when on) and remembers it for cached degradation (when the
    /// pipeline may serve cached answers). The answer is served even when the log write fails;
    /// `recorded: false` says so.
    async fn record(
        &self,
        snap: &Snapshot,
        inputs: &BTreeMap<String, EmbedInput>,
        resp: &mut InferResponse,
        request_id: &str,
        t0: Instant,
    ) {
        if let Some(memory) = self.memory() {
            let t_log = Instant::now();
            let record = Record {
                id: resp.id.clone(),
                pipeline: snap.pipeline.clone(),
                at_ms: unix_ms(),
                inputs: logged_inputs(inputs, snap.spec.memory.inputs),
                response: resp.clone(),
            };
            resp.recorded = Some(self.log_to_memory(memory.as_ref(), vec![record], request_id).await);
            resp.timings.memory_ms = Some(ms(t_log.elapsed()));
            resp.timings.total_ms = ms(t0.elapsed());
        }
        // Only pipelines that may serve cached answers pay for remembering them.
        if snap.spec.degradation.on_missing_required == MissingRequired::Cached && resp.degraded.is_none() {
            if let Some(cache) = self.cache.read().ok().and_then(|c| c.clone()) {
                cache.remember(&snap.pipeline, resp);
            }
        }
    }

    fn count_degraded(&self, snap: &Snapshot, d: Option<&Degraded>) {
        if let Some(d) = d {
            for m in &d.missing {
                self.metrics.degraded_total.with_label_values(&[&snap.pipeline, m]).inc();
            }
        }
    }

    /// Early fusion: send the per-modality vectors to the pipeline's fusion node. With
    /// `de_fusion`, the same call also fuses every subset that leaves one modality out (one
    /// batch, one round trip), and each modality's share is how far its absence moves the fused
    /// vector ([`fusion::leave_one_out_shares`]): the fusion model's own view of who mattered,
    /// whatever the vector sizes.
    async fn early_fuse(
        &self,
        snap: &Snapshot,
        vectors: &BTreeMap<String, Vec<f32>>,
        de_fusion: bool,
        deadline: Instant,
    ) -> Result<EarlyFused, (String, String)> {
        let Some(fm) = snap.configs.iter().find(|(_, c)| c.role == NodeRole::Fusion).map(|(m, _)| m.clone()) else {
            return Err(("fusion".into(), "no fusion-role node in the routing table".into()));
        };
        let item =
            |v: BTreeMap<String, Vec<f32>>| EmbedInput::Item(InputItem { embeddings: Some(v), ..Default::default() });
        let mut inputs = vec![item(vectors.clone())];
        let left_out: Vec<&String> = if de_fusion && vectors.len() > 1 { vectors.keys().collect() } else { Vec::new() };
        for m in &left_out {
            inputs.push(item(vectors.iter().filter(|(k, _)| k != m).map(|(k, v)| (k.clone(), v.clone())).collect()));
        }
        match self.call_modality(snap, &fm, &inputs, deadline).await {
            Ok(s) => {
                let labels = s.response.labels.and_then(|l| l.into_iter().next());
                let mut out = s.response.embeddings.into_iter();
                let Some(vector) = out.next() else { return Err((fm, "empty answer".into())) };
                let shares = if !de_fusion {
                    None
                } else if left_out.is_empty() {
                    vectors.keys().next().map(|m| BTreeMap::from([(m.clone(), 1.0)]))
                } else {
                    let without: BTreeMap<String, Vec<f32>> = left_out.into_iter().cloned().zip(out).collect();
                    if without.len() + 1 == inputs.len() {
                        fusion::leave_one_out_shares(&vector, &without)
                    } else {
                        None
                    }
                };
                Ok(EarlyFused { vector, replica: s.replica, shares, labels })
            }
            Err(CallError::Rejected(m)) | Err(CallError::Unavailable(m)) => Err((fm, m)),
            Err(CallError::TooLarge { bytes, limit }) => {
                Err((fm, format!("fusion request of {bytes} bytes over the nodes' limit of {limit}")))
            }
        }
    }

    /// Durably log `records` (one group commit when they arrive together); false, counted and
    /// logged, when any write failed. The answer is served either way.
    async fn log_to_memory(&self, memory: &dyn RequestLog, records: Vec<Record>, request_id: &str) -> bool {
        let results = futures::future::join_all(records.into_iter().map(|r| memory.record(r))).await;
        let failed = results.into_iter().filter_map(Result::err).collect::<Vec<_>>();
        if let Some(e) = failed.first() {
            warn!(error = %e, request_id, failed = failed.len(), "request not recorded in memory");
            self.metrics.memory_write_errors_total.inc();
        }
        failed.is_empty()
    }

    /// An embeddings call (`POST /v1/embeddings`, or an Open Inference Protocol request to a
    /// modality model): `inputs` through the modality's best replica. With memory on, each
    /// input is logged with its vector before the answer goes out, as one record of strategy
    /// [`EMBEDDINGS_CALL`] (id `request_id` for one input, `request_id.i` in a batch), so
    /// memory search finds what was embedded. The third value is `Some(recorded)` with memory
    /// on.
    pub async fn embeddings_call(
        &self,
        modality: &str,
        inputs: Vec<EmbedInput>,
        request_id: &str,
    ) -> Result<(Served, Arc<Snapshot>, Option<bool>), RouterError> {
        let (served, snap) = self.embed_inputs(modality, &inputs, request_id).await?;
        let Some(memory) = self.memory() else { return Ok((served, snap, None)) };
        let at_ms = unix_ms();
        let single = inputs.len() == 1;
        let records = inputs
            .into_iter()
            .zip(&served.response.embeddings)
            .enumerate()
            .map(|(i, (input, vector))| {
                let id = if single { request_id.to_string() } else { format!("{request_id}.{i}") };
                let result = ModalityResult {
                    embedding: vector.clone(),
                    replica: served.replica.clone(),
                    weight: 1.0,
                    attempts: served.attempts,
                    latency_ms: served.latency_ms,
                    labels: served.response.labels.as_ref().and_then(|l| l.get(i).cloned()),
                };
                Record {
                    id: id.clone(),
                    pipeline: snap.pipeline.clone(),
                    at_ms,
                    inputs: logged_inputs(&BTreeMap::from([(modality.to_string(), input)]), snap.spec.memory.inputs),
                    response: InferResponse {
                        id,
                        pipeline: snap.pipeline.clone(),
                        generation: snap.table.generation,
                        strategy: EMBEDDINGS_CALL.to_string(),
                        embedding: None,
                        modalities: BTreeMap::from([(modality.to_string(), result)]),
                        contributions: None,
                        fusion_replica: None,
                        labels: None,
                        timings: RouterTimings { total_ms: served.latency_ms, ..Default::default() },
                        degraded: None,
                        recorded: None,
                    },
                }
            })
            .collect();
        let recorded = self.log_to_memory(memory.as_ref(), records, request_id).await;
        Ok((served, snap, Some(recorded)))
    }

    /// One input embedded by `modality`'s node (memory search by text, image or audio).
    pub async fn embed_one(
        &self,
        modality: &str,
        input: EmbedInput,
        request_id: &str,
    ) -> Result<Vec<f32>, RouterError> {
        let (served, _) = self.embed_inputs(modality, std::slice::from_ref(&input), request_id).await?;
        served
            .response
            .embeddings
            .into_iter()
            .next()
            .ok_or_else(|| RouterError::Unavailable(format!("modality '{modality}' returned no embedding")))
    }

    /// Inputs of one modality through its best replica, with the pipeline's deadline and retries.
    pub async fn embed_inputs(
        &self,
        modality: &str,
        inputs: &[EmbedInput],
        request_id: &str,
    ) -> Result<(Served, Arc<Snapshot>), RouterError> {
        let snap = self.snapshot();
        let span = tracing::info_span!("embeddings", pipeline = %snap.pipeline, request_id = %request_id);
        let t0 = Instant::now();
        let res = async {
            plan::validate_modalities([&modality.to_string()], &snap.configs)?;
            if let Ok(mut b) = self.retry_budget.lock() {
                b.deposit();
            }
            let deadline = t0 + Duration::from_millis(snap.spec.routing.timeout_ms.max(1));
            match self.call_modality(&snap, modality, inputs, deadline).await {
                Ok(s) => Ok(s),
                Err(CallError::Rejected(message)) => {
                    Err(RouterError::UpstreamRejected { modality: modality.into(), message })
                }
                Err(CallError::TooLarge { bytes, limit }) => {
                    Err(RouterError::UpstreamTooLarge { modality: modality.into(), bytes, limit })
                }
                Err(CallError::Unavailable(why)) => {
                    Err(RouterError::Unavailable(format!("modality '{modality}' has no healthy replica ({why})")))
                }
            }
        }
        .instrument(span)
        .await;
        let outcome = match &res {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        self.metrics.request_duration.with_label_values(&[&snap.pipeline, outcome]).observe(t0.elapsed().as_secs_f64());
        res.map(|s| (s, snap))
    }

    /// Active health: probe every replica's `/ready`; a success is a heartbeat, a failure
    /// counts like a failed call (so a dead replica is noticed without traffic).
    pub async fn probe_once(&self) {
        let snap = self.snapshot();
        let mut probes = Vec::new();
        for (m, eps) in &snap.table.modalities {
            for ep in eps.iter().filter(|e| e.ready) {
                let url = format!("{}/ready", ep.endpoint.trim_end_matches('/'));
                let client = self.client.clone();
                let (m, ep) = (m.clone(), ep.clone());
                probes.push(async move {
                    let ok = client
                        .get(&url)
                        .timeout(Duration::from_millis(1000))
                        .send()
                        .await
                        .map(|r| r.status().is_success())
                        .unwrap_or(false);
                    (m, ep, ok)
                });
            }
        }
        for (m, ep, ok) in futures::future::join_all(probes).await {
            let now = self.now_ms();
            if ok {
                self.with_balancer(|b| b.on_heartbeat(&m, &ep.endpoint, now));
            } else {
                let out = self.with_balancer(|b| b.on_failure(&m, &ep.endpoint, &snap.spec.routing, now, false));
                if out.ejected {
                    self.metrics.ejections_total.with_label_values(&[&ep.node]).inc();
                    warn!(modality = %m, endpoint = %ep.endpoint, "replica ejected: health probes failing");
                }
            }
        }
    }

    /// Run `probe_once` forever at the configured interval (spawned by the binary).
    pub async fn probe_loop(self: Arc<Self>) {
        let Some(iv) = self.options.probe_interval else { return };
        let mut tick = tokio::time::interval(iv);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.probe_once().await;
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What the degradation policy says after the fan-out.
enum Degrade {
    /// Fuse what answered (`Some`: a partial answer, and why).
    Proceed(Option<Degraded>),
    /// Serve the nearest cached answer to the vectors that did answer.
    Cached { missing: Vec<String>, reason: String, vectors: BTreeMap<String, Vec<f32>> },
}

/// The fusion step's result.
struct Fused {
    /// The strategy that produced it (early fusion may fall back).
    strategy: FusionStrategy,
    embedding: Option<Vec<f32>>,
    weights: BTreeMap<String, f64>,
    contributions: Option<BTreeMap<String, f64>>,
    /// The fusion node's replica (early fusion).
    replica: Option<ReplicaRef>,
    /// The fusion node's labels for the fused vector (early fusion with a classification head);
    /// otherwise the answer mixes the modalities' labels.
    labels: Option<Vec<ScoredLabel>>,
}

impl Fused {
    fn from(strategy: FusionStrategy, f: fusion::Fused) -> Self {
        Self {
            strategy,
            embedding: Some(f.vector),
            weights: f.weights,
            contributions: Some(f.contributions),
            replica: None,
            labels: None,
        }
    }

    /// Late fusion: the modality vectors unfused, the prior weights renormalised over them.
    fn late(present: &[&String], prior: &BTreeMap<String, f64>) -> Self {
        Self {
            strategy: FusionStrategy::Late,
            embedding: None,
            weights: fusion::renormalise(present, prior),
            contributions: None,
            replica: None,
            labels: None,
        }
    }
}

/// Each answered modality's (first) vector.
fn first_vectors(served: &BTreeMap<String, Served>) -> BTreeMap<String, Vec<f32>> {
    served.iter().filter_map(|(m, s)| s.response.embeddings.first().map(|v| (m.clone(), v.clone()))).collect()
}

pub fn strategy_name(s: FusionStrategy) -> &'static str {
    match s {
        FusionStrategy::Weighted => "weighted",
        FusionStrategy::Attention => "attention",
        FusionStrategy::Late => "late",
        FusionStrategy::Early => "early",
    }
}

/// reqwest's Display hides the cause ("error sending request"); the chain says "connection refused".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

pub(crate) fn memory_off() -> RouterError {
    RouterError::NotFound(
        "memory is not enabled on this router (start prism-router with --memory-path FILE or --memory-url postgres://...; memory.enabled in the pipeline)"
            .into(),
    )
}

pub(crate) fn memory_error(e: MemoryError) -> RouterError {
    match e {
        MemoryError::UnknownRequest(_) => RouterError::NotFound(e.to_string()),
        MemoryError::Invalid(m) => RouterError::Validation(m),
        other => RouterError::Unavailable(other.to_string()),
    }
}
