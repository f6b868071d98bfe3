//! `MultimodalPipeline`: a request graph over ModalityNodes, with routing, fusion,
//! degradation and memory policy. The operator turns it into a router Deployment plus a
//! routing-table ConfigMap; `prism up` into a local router process.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;

/// Desired state of a MultimodalPipeline.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "prism.dev",
    version = "v1alpha1",
    kind = "MultimodalPipeline",
    namespaced,
    shortname = "mmp",
    category = "prism",
    status = "MultimodalPipelineStatus",
    derive = "PartialEq",
    doc = "A multimodal request graph: which ModalityNodes answer which part of a request, how their answers are fused, and how the pipeline degrades when a modality is down.",
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(
        name = "Nodes",
        type_ = "string",
        json_path = ".status.nodesReady",
        description = "nodes with at least one ready replica / nodes"
    ),
    printcolumn(name = "Degraded", type_ = "string", json_path = ".status.conditions[?(@.type==\"Degraded\")].status"),
    printcolumn(name = "URL", type_ = "string", json_path = ".status.url", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    cel
)]
#[serde(rename_all = "camelCase")]
// Reason Invalid, not Duplicate: the apiserver renders Duplicate as a bare "Duplicate value" and drops the message.
#[x_kube(validation = Rule::new("self.nodes.all(n, self.nodes.exists_one(m, m.name == n.name))").message("node names in a pipeline must be unique").reason(Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("self.nodes.exists(n, double(n.weight) > 0.0)").message("at least one node must have weight > 0").reason(Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("!has(self.fusion) || self.fusion.strategy != 'early' || self.nodes.exists(n, n.role == 'fusion')").message("fusion.strategy early needs a node with role fusion").reason(Reason::FieldValueRequired))]
#[x_kube(validation = Rule::new("!has(self.memory) || !has(self.memory.enabled) || !self.memory.enabled || (has(self.memory.store) && has(self.memory.store.kind) && self.memory.store.kind == 'postgres') || !has(self.routerReplicas) || self.routerReplicas <= 1").message("memory.store.kind embedded is one file on one volume: routerReplicas must be 1 (several routers share memory through kind postgres)").reason(Reason::FieldValueInvalid))]
pub struct MultimodalPipelineSpec {
    /// The ModalityNodes this pipeline routes to (same namespace), each with its role and weight.
    #[schemars(length(min = 1, max = 32))]
    pub nodes: Vec<PipelineNode>,
    /// Replica choice per modality: R(x) = argmax(alpha*A - beta*L) over replicas with P_fail < failureThreshold.
    #[serde(default)]
    pub routing: RoutingPolicy,
    /// How per-modality embeddings become one answer.
    #[serde(default)]
    pub fusion: FusionSpec,
    /// What to answer when a modality has no healthy replica.
    #[serde(default)]
    pub degradation: DegradationSpec,
    /// The memory loop: request log, retrieval and corrections.
    #[serde(default)]
    pub memory: MemorySpec,
    /// Router replicas (the router is stateless).
    #[serde(default = "default_router_replicas")]
    #[schemars(range(min = 1, max = 100))]
    pub router_replicas: i32,
    /// Container image of the router; defaults to the operator's `--router-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_image: Option<String>,
    /// Bearer-token auth of the router's API (on unless `insecureNoAuth`).
    #[serde(default)]
    pub auth: RouterAuth,
}

/// Bearer-token auth of the router. The tokens live in a Secret the user creates (the
/// operator never reads Secrets; the router pods mount it):
/// `kubectl create secret generic <pipeline>-router-tokens --from-literal=tokens=$(openssl rand -hex 32)`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct RouterAuth {
    /// Secret with the accepted tokens, one per line, under the key `tokens`; default
    /// `<pipeline>-router-tokens`. Router pods wait in ContainerCreating until it exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Accept anonymous requests (only behind a gateway that authenticates).
    #[serde(default)]
    pub insecure_no_auth: bool,
}

impl RouterAuth {
    pub const TOKENS_KEY: &'static str = "tokens";

    /// The Secret the router mounts, or None when auth is off.
    pub fn secret_for(&self, pipeline: &str) -> Option<String> {
        (!self.insecure_no_auth)
            .then(|| self.secret_name.clone().unwrap_or_else(|| format!("{pipeline}-router-tokens")))
    }
}

fn default_router_replicas() -> i32 {
    1
}

/// A node reference inside a pipeline.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipelineNode {
    /// Name of a ModalityNode in the pipeline's namespace.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"))]
    pub name: String,
    /// `encoder` turns one modality into an embedding; `fusion` combines embeddings (early fusion).
    #[serde(default)]
    pub role: NodeRole,
    /// Relative weight of this node's embedding in weighted fusion (renormalised over the modalities present).
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub weight: f64,
    /// When true, a request whose modality for this node is missing cannot be answered partially.
    #[serde(default)]
    pub required: bool,
    /// Prior accuracy estimate A in [0,1] before corrections have been seen.
    #[serde(default = "default_accuracy")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub accuracy: f64,
}

fn default_weight() -> f64 {
    1.0
}
fn default_accuracy() -> f64 {
    0.9
}

/// Role of a node in the request graph.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    #[default]
    Encoder,
    Fusion,
}

/// Replica selection and passive health checking.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("double(self.failureThreshold) > 0.0 && double(self.failureThreshold) < 1.0").message("routing.failureThreshold (delta) must lie strictly between 0 and 1").reason(Reason::FieldValueInvalid))]
pub struct RoutingPolicy {
    /// Weight of accuracy A in the routing score.
    #[serde(default = "default_alpha")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub alpha: f64,
    /// Weight of expected latency L (ms) in the routing score.
    #[serde(default = "default_beta")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub beta: f64,
    /// delta: replicas whose failure probability P_fail is at or above this are not routed to.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: f64,
    /// Consecutive errors or timeouts that eject a replica.
    #[serde(default = "default_consecutive_errors")]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_errors: u32,
    /// First ejection length in milliseconds; doubles on each repeat ejection.
    #[serde(default = "default_base_ejection_ms")]
    #[schemars(range(min = 1, max = 3600000))]
    pub base_ejection_ms: u64,
    /// Never eject more than this percent of a modality's replicas.
    #[serde(default = "default_max_ejected_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejected_percent: u32,
    /// Per-request deadline in milliseconds, propagated to nodes.
    #[serde(default = "default_timeout_ms")]
    #[schemars(range(min = 1, max = 600000))]
    pub timeout_ms: u64,
    /// Retries per modality call (to another replica), bounded by a retry budget.
    #[serde(default = "default_retries")]
    #[schemars(range(min = 0, max = 5))]
    pub retries: u32,
}

fn default_alpha() -> f64 {
    1.0
}
fn default_beta() -> f64 {
    0.01
}
fn default_failure_threshold() -> f64 {
    0.5
}
fn default_consecutive_errors() -> u32 {
    3
}
fn default_base_ejection_ms() -> u64 {
    5000
}
fn default_max_ejected_percent() -> u32 {
    50
}
fn default_timeout_ms() -> u64 {
    5000
}
fn default_retries() -> u32 {
    1
}

impl Default for RoutingPolicy {
    fn default() -> Self {
        Self {
            alpha: default_alpha(),
            beta: default_beta(),
            failure_threshold: default_failure_threshold(),
            consecutive_errors: default_consecutive_errors(),
            base_ejection_ms: default_base_ejection_ms(),
            max_ejected_percent: default_max_ejected_percent(),
            timeout_ms: default_timeout_ms(),
            retries: default_retries(),
        }
    }
}

/// Fusion of per-modality embeddings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct FusionSpec {
    /// `weighted` (weights renormalised over present modalities), `attention` (softmax of agreement scores),
    /// `late` (no combined vector; per-modality answers only) or `early` (embeddings sent to a fusion node;
    /// with that node down the answer is degraded: weighted fusion when the modality vectors share one
    /// size, otherwise the per-modality vectors unfused).
    #[serde(default)]
    pub strategy: FusionStrategy,
    /// Return each modality's contribution to the fused vector (de-fusion). With `early`, a
    /// modality's share is how far leaving it out moves the fused vector (the leave-one-out fusions
    /// ride in the same fusion-node call).
    #[serde(default)]
    pub de_fusion: bool,
}

/// Fusion strategy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum FusionStrategy {
    #[default]
    Weighted,
    Attention,
    Late,
    Early,
}

/// Graceful degradation policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DegradationSpec {
    /// When an optional modality is down: answer with the rest (`partial`) or fail.
    #[serde(default)]
    pub on_missing_optional: MissingOptional,
    /// When a required modality is down: `fail` (HTTP 503) or answer from memory (`cached`).
    #[serde(default)]
    pub on_missing_required: MissingRequired,
    /// Cached answers: the nearest past answer must be at least this similar.
    #[serde(default)]
    pub cache: CacheSpec,
}

impl Default for DegradationSpec {
    fn default() -> Self {
        Self {
            on_missing_optional: MissingOptional::Partial,
            on_missing_required: MissingRequired::Fail,
            cache: CacheSpec::default(),
        }
    }
}

/// Policy for a missing optional modality.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum MissingOptional {
    #[default]
    Partial,
    Fail,
}

/// Policy for a missing required modality.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum MissingRequired {
    #[default]
    Fail,
    Cached,
}

/// Cached-answer settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheSpec {
    /// Minimum cosine similarity between the request and a past request to reuse its answer.
    #[serde(default = "default_min_similarity")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_similarity: f64,
}

fn default_min_similarity() -> f64 {
    0.9
}

impl Default for CacheSpec {
    fn default() -> Self {
        Self { min_similarity: default_min_similarity() }
    }
}

/// Memory loop settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemorySpec {
    /// Log requests, index embeddings and accept corrections.
    #[serde(default)]
    pub enabled: bool,
    /// Keep records this long (e.g. `30d`, `12h`).
    #[serde(default = "default_retention")]
    #[schemars(regex(pattern = r"^[0-9]+(s|m|h|d)$"))]
    pub retention: String,
    /// Retention by size: keep at most this many records (the newest); unset keeps all within
    /// `retention`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_records: Option<u64>,
    /// Store inputs verbatim (`full`) or only their SHA-256 (`hash`).
    #[serde(default)]
    pub inputs: InputLogging,
    /// Where records live.
    #[serde(default)]
    pub store: MemoryStore,
    /// The embedded store's claim (`<pipeline>-memory`) when the pipeline is deleted.
    /// `Retain` (default): the claim outlives the pipeline; delete it by hand with
    /// `kubectl delete pvc <name>`. A pipeline of the same name created again reuses it.
    /// `Delete`: the claim is owned by the pipeline and deleted with it.
    #[serde(default)]
    pub retain: MemoryRetain,
    /// How the router's search index holds vectors in RAM: `f32` (default) or `bf16` (half the
    /// memory per vector, recall within a thousandth on `make bench-memory`). The store keeps
    /// the answers' f32 vectors either way; changing it rebuilds the index at the router's
    /// restart.
    #[serde(default)]
    pub vectors: VectorPrecision,
}

fn default_retention() -> String {
    "30d".to_string()
}

impl Default for MemorySpec {
    fn default() -> Self {
        Self {
            enabled: false,
            retention: default_retention(),
            max_records: None,
            inputs: InputLogging::default(),
            store: MemoryStore::default(),
            retain: MemoryRetain::default(),
            vectors: VectorPrecision::default(),
        }
    }
}

/// Reclaim policy of the embedded memory store's claim (like a PersistentVolume's).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum MemoryRetain {
    #[default]
    Retain,
    Delete,
}

/// Element type of the memory search index's vectors.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum VectorPrecision {
    #[default]
    F32,
    Bf16,
}

/// Privacy setting for logged inputs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum InputLogging {
    #[default]
    Hash,
    Full,
}

/// Memory store backend.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.kind != 'postgres' || has(self.postgresSecret)").message("memory.store.postgresSecret is required when kind is postgres").reason(Reason::FieldValueRequired))]
pub struct MemoryStore {
    /// `embedded` (a single crash-safe file) or `postgres` (shared by several routers).
    #[serde(default = "default_store_kind")]
    #[schemars(regex(pattern = r"^(embedded|postgres)$"))]
    pub kind: String,
    /// File path of the embedded store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Secret with a `url` key holding the PostgreSQL connection string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres_secret: Option<String>,
    /// Size of the PersistentVolumeClaim the operator creates for the embedded store.
    #[serde(default = "default_store_size")]
    #[schemars(regex(pattern = r"^[0-9]+(Mi|Gi|Ti)$"))]
    pub size: String,
    /// StorageClass of that claim (the cluster default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

fn default_store_size() -> String {
    "10Gi".to_string()
}

fn default_store_kind() -> String {
    "embedded".to_string()
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            kind: default_store_kind(),
            path: None,
            postgres_secret: None,
            size: default_store_size(),
            storage_class_name: None,
        }
    }
}

/// Observed state of a MultimodalPipeline.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct MultimodalPipelineStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready and Degraded (its message names the modalities with no ready replica).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// Generation of the routing table last written; routers never apply an older one.
    #[serde(default)]
    pub routing_table_generation: u64,
    /// Ready endpoints per node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<NodeEndpoints>,
    /// `ready/total` nodes, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_ready: Option<String>,
    /// Modalities that have no ready replica right now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub degraded_modalities: Vec<String>,
    /// In-cluster URL of the router.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// Endpoints of one node as the router sees them.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeEndpoints {
    pub node: String,
    pub modality: String,
    /// Ready endpoints (`ip:port`).
    #[serde(default)]
    pub ready: Vec<String>,
    /// Endpoints that exist but are not ready.
    #[serde(default)]
    pub not_ready: u32,
}
