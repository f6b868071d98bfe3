//! `ModalityNode`: one served model of one modality, turned by the operator into a GPU
//! Deployment (or by `prism up` into local processes).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::condition::Condition;

/// Well-known modality names. Modality is an open set: any lowercase DNS-label-like name is
/// accepted, and routing/fusion never special-case these four.
pub mod modality {
    pub const TEXT: &str = "text";
    pub const VISION: &str = "vision";
    pub const AUDIO: &str = "audio";
    pub const FUSION: &str = "fusion";
}

/// A Kubernetes resource quantity (`500m`, `2`, `1.5`, `4Gi`, `1e3`), unsigned: the syntax the
/// API server accepts in a Pod's resources, so a typo is refused at apply time, not when the
/// operator's Deployment is rejected later.
pub const QUANTITY_PATTERN: &str = r"^([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$";

/// Whether a model or adapter URI has a `..` path segment, plain or percent-encoded, that would
/// reach outside the volume or folder it names. CEL refuses these at the API server and in
/// `prism validate`; the operator and `prism up` ask again before they use a URI, in case an
/// object got past an older CRD.
pub fn uri_escapes_its_root(uri: &str) -> bool {
    uri.to_ascii_lowercase().contains("%2e") || uri.split('/').any(|segment| segment == "..")
}

/// Desired state of a ModalityNode: which model to serve, how many replicas, on what hardware.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "prism.dev",
    version = "v1alpha1",
    kind = "ModalityNode",
    namespaced,
    shortname = "mn",
    category = "prism",
    status = "ModalityNodeStatus",
    derive = "PartialEq",
    doc = "One served model of one modality (text, vision, audio, fusion or any other), run as a GPU Deployment with autoscaling and canary rollouts.",
    scale(
        spec_replicas_path = ".spec.replicas.desired",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Modality", type_ = "string", json_path = ".spec.modality"),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".status.replicas"),
    printcolumn(
        name = "P95",
        type_ = "string",
        json_path = ".status.p95",
        description = "p95 request latency observed by the autoscaler"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    cel
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.replicas.min <= self.replicas.max").message("replicas.min must be <= replicas.max").reason(Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("!has(self.replicas.desired) || (self.replicas.desired >= self.replicas.min && self.replicas.desired <= self.replicas.max)").message("replicas.desired must lie within [replicas.min, replicas.max]").reason(Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("!has(self.device) || self.device != 'cpu' || !has(self.resources) || !has(self.resources.gpu) || self.resources.gpu.count == 0").message("device cpu holds no GPU: set resources.gpu.count to 0, or device to cuda or auto").reason(Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("!has(self.device) || self.device != 'cuda' || (has(self.resources) && has(self.resources.gpu) && self.resources.gpu.count > 0)").message("device cuda needs a GPU: set resources.gpu.count to 1 or more, or device to cpu or auto").reason(Reason::FieldValueRequired))]
pub struct ModalityNodeSpec {
    /// Modality this node serves: `text`, `vision`, `audio`, `fusion`, or any other lowercase name.
    /// A pipeline routes each part of a request to the nodes of its modality.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z]([a-z0-9-]*[a-z0-9])?$"))]
    pub modality: String,
    /// The model to serve.
    pub model: ModelSpec,
    /// Replica bounds and, in `external` autoscaling mode, the desired count.
    #[serde(default)]
    pub replicas: ReplicaSpec,
    /// How replicas are scaled: Prism's own autoscaler (`builtin`) or HPA/KEDA/`kubectl scale` (`external`).
    #[serde(default)]
    pub autoscaling: AutoscalingSpec,
    /// Compute resources, GPU and scheduling constraints of each replica.
    #[serde(default)]
    pub resources: ResourceSpec,
    /// Where the model runs: `auto` picks CUDA when a GPU is visible, else CPU.
    #[serde(default)]
    pub device: Device,
    /// Dynamic batching of concurrent requests inside each replica.
    #[serde(default)]
    pub batching: BatchingSpec,
    /// Canary rollout of a new model revision, with automatic rollback when it is worse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
    /// Container image of the node server; defaults to the operator's `--node-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Serve routers over HTTPS (rustls) with a certificate from a Secret; routers of pipelines
    /// using this node trust the Secret's `ca.crt`. Off: plain HTTP inside the cluster network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<NodeTlsSpec>,
    /// Distributed LoRA fine-tuning of this node's model on its pipeline's corrections: an
    /// Indexed Job of `torchrun` workers (the `prism-train` image). Its result becomes a new
    /// model revision that goes out through `rollout` like any other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptation: Option<AdaptationSpec>,
}

/// Annotation on a ModalityNode that asks for one adaptation run now: any new value starts a
/// run (`prism adapt NODE` writes the time), the way `kubectl rollout restart` stamps one.
pub const ADAPT_REQUEST_ANNOTATION: &str = "prism.dev/adapt-request";

/// A distributed fine-tuning job of the node's model (issue 14): who trains, on what, when.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.sharding) || self.sharding != 'fsdp' || !has(self.gpusPerWorker) || self.gpusPerWorker > 0").message("adaptation.sharding fsdp shards across GPUs: set gpusPerWorker to 1 or more, or sharding to ddp").reason(Reason::FieldValueInvalid))]
pub struct AdaptationSpec {
    /// Pipeline whose router memory holds the corrections (`GET /v1/memory/corrections` on its
    /// router Service). Default: the only pipeline in the namespace that uses this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub pipeline: Option<String>,
    /// Worker pods (torchrun nodes, one per Job index).
    #[serde(default = "default_workers")]
    #[schemars(range(min = 1, max = 64))]
    pub workers: u32,
    /// GPUs per worker pod = training processes per pod (`--nproc_per_node`, NCCL). 0 trains on
    /// CPU with one gloo process per pod.
    #[serde(default = "default_gpus_per_worker")]
    #[schemars(range(min = 0, max = 16))]
    pub gpus_per_worker: u32,
    /// CPU request and limit of each worker pod, as a Kubernetes quantity (e.g. `8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub cpu: Option<String>,
    /// Memory request and limit of each worker pod, as a Kubernetes quantity (e.g. `64Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub memory: Option<String>,
    /// The LoRA adapter to train.
    #[serde(default)]
    pub lora: LoraSpec,
    /// Passes over the corrections.
    #[serde(default = "default_epochs")]
    #[schemars(range(min = 1, max = 1000))]
    pub epochs: u32,
    /// Query/answer pairs per process per step (the in-batch negatives of the contrastive loss).
    #[serde(default = "default_train_batch")]
    #[schemars(range(min = 2, max = 4096))]
    pub batch_size: u32,
    /// AdamW learning rate.
    #[serde(default = "default_learning_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub learning_rate: f64,
    /// `ddp` replicates the model on every GPU; `fsdp` shards parameters, gradients and
    /// optimizer state across them (ZeRO-3 style; GPUs only).
    #[serde(default)]
    pub sharding: Sharding,
    /// Sliding-window attention while training: each token attends to this many tokens (itself and
    /// half on each side), computed band by band (cheaper on long inputs). Serve the adapter with
    /// the same `spec.model.attention` window, or it meets an attention it was not trained for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 65536))]
    pub sliding_window: Option<u32>,
    /// When a run starts on its own (besides the `prism.dev/adapt-request` annotation).
    #[serde(default)]
    pub trigger: AdaptationTrigger,
    /// Where checkpoints and results live: a PersistentVolumeClaim every worker and every
    /// serving replica mounts.
    #[serde(default)]
    pub storage: TrainStorage,
    /// Image with `torchrun` and `/opt/prism/prism_train.py`; defaults to the operator's
    /// `--train-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Pod failures the Job tolerates before the run fails (a restarted run resumes from the
    /// last epoch's checkpoint).
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 100))]
    pub backoff_limit: i32,
    /// Wall-clock limit of a run, in seconds; the Job is failed past it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60))]
    pub active_deadline_seconds: Option<i64>,
}

/// LoRA hyper-parameters.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoraSpec {
    /// Rank of the low-rank update.
    #[serde(default = "default_lora_rank")]
    #[schemars(range(min = 1, max = 1024))]
    pub rank: u32,
    /// Scaling numerator (the update is scaled by alpha / rank).
    #[serde(default = "default_lora_alpha")]
    #[schemars(range(min = 0.0))]
    pub alpha: f64,
    /// Module names to adapt (BERT attention: `query`, `key`, `value`).
    #[serde(default = "default_target_modules")]
    #[schemars(length(min = 1, max = 16))]
    pub target_modules: Vec<String>,
}

impl Default for LoraSpec {
    fn default() -> Self {
        Self { rank: default_lora_rank(), alpha: default_lora_alpha(), target_modules: default_target_modules() }
    }
}

/// Parameter sharding across training processes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Sharding {
    #[default]
    Ddp,
    Fsdp,
}

/// Automatic start of a run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AdaptationTrigger {
    /// Start a run once this many corrections for this node arrived since the last run
    /// (`prism_router_corrections_total` in the operator's Prometheus). Unset: only on request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub every_corrections: Option<u32>,
}

/// The claim behind `/train` in the workers (`checkpoints/`, `out/`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainStorage {
    /// An existing claim to use; unset: the operator creates `<node>-train`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_name: Option<String>,
    /// Size of the claim the operator creates, as a Kubernetes quantity (e.g. `20Gi`).
    #[serde(default = "default_train_storage_size")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub size: String,
    /// StorageClass of the claim the operator creates (unset: the cluster default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Access mode of the claim the operator creates. Workers on several machines and serving
    /// replicas all mount it, so the default is `ReadWriteMany`.
    #[serde(default = "default_train_access_mode")]
    pub access_mode: String,
}

impl Default for TrainStorage {
    fn default() -> Self {
        Self {
            claim_name: None,
            size: default_train_storage_size(),
            storage_class_name: None,
            access_mode: default_train_access_mode(),
        }
    }
}

fn default_workers() -> u32 {
    1
}
fn default_gpus_per_worker() -> u32 {
    1
}
fn default_epochs() -> u32 {
    3
}
fn default_train_batch() -> u32 {
    16
}
fn default_learning_rate() -> f64 {
    1e-4
}
fn default_backoff_limit() -> i32 {
    3
}
fn default_lora_rank() -> u32 {
    8
}
fn default_lora_alpha() -> f64 {
    16.0
}
fn default_target_modules() -> Vec<String> {
    vec!["query".into(), "value".into()]
}
fn default_train_storage_size() -> String {
    "20Gi".into()
}
fn default_train_access_mode() -> String {
    "ReadWriteMany".into()
}

/// TLS of a node's HTTP endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeTlsSpec {
    /// A Secret in the node's namespace with `tls.crt`, `tls.key` and `ca.crt` (the layout of
    /// cert-manager's Certificate and of `kubernetes.io/tls` Secrets with a CA added). The
    /// certificate must name the pod IPs or be issued for them; routers verify it against `ca.crt`.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

/// Which model a node serves and how to load it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.uri.contains('/../') && !self.uri.endsWith('/..') && !self.uri.contains('%2e') && !self.uri.contains('%2E')").message("model.uri must not contain `..` path segments (plain or percent-encoded): it must stay inside its volume").reason(Reason::FieldValueForbidden))]
#[x_kube(validation = Rule::new("!has(self.adapters) || self.adapters.all(a, self.adapters.exists_one(b, b.name == a.name))").message("adapter names must be unique within a node").reason(Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("!has(self.attention) || self.attention.kind != 'sliding-window' || self.architecture in ['bert', 'whisper-encoder']").message("sliding-window attention is served for the architectures bert and whisper-encoder (tokens in a 1-D order); use attention.kind full").reason(Reason::FieldValueInvalid))]
#[x_kube(validation = Rule::new("!has(self.audioWindow) || self.architecture == 'whisper-encoder'").message("audioWindow applies to the whisper-encoder architecture only").reason(Reason::FieldValueInvalid))]
pub struct ModelSpec {
    /// Where the weights are: `file:///path`, `pvc://claim/path`, `hf://org/name@revision` or `oci://registry/repo:tag`.
    // maxLength bounds what the API server estimates its CEL rules to cost.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^(file|pvc|hf|oci)://.+"))]
    pub uri: String,
    /// Model architecture: `bert`, `vit`, `clip-vision`, `whisper-encoder`, `perceiver-fusion`, `mot-fusion`, ...
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$"))]
    pub architecture: String,
    /// Revision label of these weights; a change starts a (canary) rollout.
    #[serde(default = "default_revision")]
    #[schemars(length(min = 1, max = 63))]
    pub revision: String,
    /// LoRA adapters applied on top of the base weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub adapters: Vec<AdapterSpec>,
    /// Attention pattern of the transformer core.
    #[serde(default)]
    pub attention: AttentionSpec,
    /// Audio encoders: `full` (the default: whisper's padded 30 s window, 1500 frames, as it was
    /// trained) or `clip` (only the clip's own frames: a 2 s clip costs 100 encoder frames).
    /// Heads and fusion nodes must be trained on the setting they are served with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(clip|full)$"))]
    pub audio_window: Option<String>,
}

fn default_revision() -> String {
    "1".to_string()
}

/// A LoRA adapter (low-rank update W + alpha/rank * B A) loaded on top of the base model.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!self.uri.contains('/../') && !self.uri.endsWith('/..') && !self.uri.contains('%2e') && !self.uri.contains('%2E')").message("adapters[].uri must not contain `..` path segments (plain or percent-encoded): it must stay inside its volume").reason(Reason::FieldValueForbidden))]
#[x_kube(validation = Rule::new("self.uri.startsWith('file://') || self.uri.startsWith('pvc://')").message("adapters[].uri must be file:// (a path in the node image) or pvc://CLAIM/PATH: hf:// and oci:// adapters are not downloaded; copy the file into a claim").reason(Reason::FieldValueForbidden))]
pub struct AdapterSpec {
    /// Adapter name, unique within the node (lower-case letters, digits, `.`, `_`, `-`).
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$"))]
    pub name: String,
    /// The adapter: a safetensors file of lora_A/lora_B pairs or a PEFT output folder, at
    /// `file:///path` (in the node image) or `pvc://claim/path`.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^(file|pvc|hf|oci)://.+"))]
    pub uri: String,
    /// Rank r of the low-rank matrices.
    #[schemars(range(min = 1, max = 1024))]
    pub rank: u32,
    /// Scaling alpha; the update is multiplied by alpha / rank.
    #[schemars(range(min = 0.0))]
    pub alpha: f64,
}

impl AdapterSpec {
    /// prism-node's `--adapter` value for this adapter found at `path`:
    /// `name=NAME,rank=R,alpha=A,path=PATH` (path last: it may hold commas; the name cannot).
    pub fn server_arg(&self, path: &str) -> String {
        format!("name={},rank={},alpha={},path={path}", self.name, self.rank, self.alpha)
    }
}

/// Attention pattern: `full`, or `sliding-window` with a window size in tokens. prism-node serves
/// the window (`--attention-window`) on `bert` (CPU devices) and `whisper-encoder`, computing
/// only the band; a short audio clip then skips the silent rest of whisper's 30 s window.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.kind != 'sliding-window' || (has(self.window) && self.window > 0)").message("attention.window must be > 0 when attention.kind is sliding-window").reason(Reason::FieldValueRequired))]
pub struct AttentionSpec {
    /// `full` (every token attends to every token) or `sliding-window`.
    #[serde(default = "default_attention_kind")]
    #[schemars(regex(pattern = r"^(full|sliding-window)$"))]
    pub kind: String,
    /// Tokens each token attends to (sliding-window only): itself and `window / 2` on each side,
    /// as Longformer counts it and the adaptation job's `slidingWindow` does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 65536))]
    pub window: Option<u32>,
}

impl AttentionSpec {
    /// The window prism-node serves (`--attention-window`), or `None` for full attention.
    pub fn served_window(&self) -> Option<u32> {
        (self.kind == "sliding-window").then_some(self.window).flatten()
    }
}

fn default_attention_kind() -> String {
    "full".to_string()
}

impl Default for AttentionSpec {
    fn default() -> Self {
        Self { kind: default_attention_kind(), window: None }
    }
}

/// Replica bounds. `desired` is what the scale subresource reads and writes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaSpec {
    /// Fewest replicas, also while idle. 0 allows scale to zero.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 1000))]
    pub min: i32,
    /// Most replicas the autoscaler may run.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1000))]
    pub max: i32,
    /// Replica count set by `kubectl scale`, HPA or KEDA (external mode); ignored by the builtin autoscaler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub desired: Option<i32>,
}

fn one() -> i32 {
    1
}

impl Default for ReplicaSpec {
    fn default() -> Self {
        Self { min: 1, max: 1, desired: None }
    }
}

/// Autoscaling policy (Knative KPA style: a stable and a panic window).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.targetGpuUtilization) || (double(self.targetGpuUtilization) > 0.0 && double(self.targetGpuUtilization) <= 1.0)").message("autoscaling.targetGpuUtilization must lie in (0, 1]").reason(Reason::FieldValueInvalid))]
pub struct AutoscalingSpec {
    /// `builtin`: Prism's autoscaler decides from Prometheus metrics. `external`: the scale subresource (HPA, KEDA, kubectl scale) decides.
    #[serde(default)]
    pub mode: AutoscalingMode,
    /// Target p95 request latency per replica, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_latency_p95_ms: Option<u32>,
    /// Target concurrent requests per replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_inflight: Option<u32>,
    /// Target GPU utilisation per replica, as a fraction in (0, 1] (e.g. 0.7). The autoscaler
    /// averages `prism_node_gpu_utilization_ratio` over the node's pods and asks for
    /// ceil(ready x observed / target) replicas, like the latency target. Only CUDA replicas
    /// export that metric: on CPU nodes, or while no GPU sample exists, this signal is ignored
    /// and the other targets decide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub target_gpu_utilization: Option<f64>,
    /// How often metrics are read, in seconds.
    #[serde(default = "default_interval")]
    #[schemars(range(min = 1, max = 3600))]
    pub interval_seconds: u32,
    /// Window over which the stable (normal) scaling decision averages, in seconds.
    #[serde(default = "default_stable_window")]
    #[schemars(range(min = 1, max = 3600))]
    pub stable_window_seconds: u32,
    /// Short window that reacts to bursts, in seconds.
    #[serde(default = "default_panic_window")]
    #[schemars(range(min = 1, max = 3600))]
    pub panic_window_seconds: u32,
    /// Enter panic mode when the panic-window load exceeds this multiple of the target.
    #[serde(default = "default_panic_threshold")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub panic_threshold: f64,
    /// Scale down only to the highest recommendation seen in this window, in seconds.
    #[serde(default = "default_scale_down_stabilization")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: u32,
    /// Most replicas added or removed in one decision.
    #[serde(default = "default_max_step")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_step: i32,
    /// Freeze the replica count; the node reports `ReconciliationPaused`.
    #[serde(default)]
    pub paused: bool,
}

fn default_interval() -> u32 {
    15
}
fn default_stable_window() -> u32 {
    60
}
fn default_panic_window() -> u32 {
    6
}
fn default_panic_threshold() -> f64 {
    2.0
}
fn default_scale_down_stabilization() -> u32 {
    300
}
fn default_max_step() -> i32 {
    4
}

impl Default for AutoscalingSpec {
    fn default() -> Self {
        Self {
            mode: AutoscalingMode::default(),
            target_latency_p95_ms: None,
            target_inflight: None,
            target_gpu_utilization: None,
            interval_seconds: default_interval(),
            stable_window_seconds: default_stable_window(),
            panic_window_seconds: default_panic_window(),
            panic_threshold: default_panic_threshold(),
            scale_down_stabilization_seconds: default_scale_down_stabilization(),
            max_step: default_max_step(),
            paused: false,
        }
    }
}

/// Who decides the replica count.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum AutoscalingMode {
    #[default]
    Builtin,
    External,
}

/// Compute resources and placement of each replica.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ResourceSpec {
    /// GPUs per replica.
    #[serde(default)]
    pub gpu: GpuSpec,
    /// CPU request and limit, as a Kubernetes quantity (e.g. `2`, `500m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub cpu: Option<String>,
    /// Memory request and limit, as a Kubernetes quantity (e.g. `4Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = QUANTITY_PATTERN))]
    pub memory: Option<String>,
    /// Node labels a replica's node must carry.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the replicas tolerate (GPU nodes are usually tainted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// RuntimeClass of the pods (e.g. `nvidia`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_class_name: Option<String>,
}

/// GPU request of a replica.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuSpec {
    /// Number of GPUs (or MIG slices) per replica; 0 runs on CPU.
    #[serde(default)]
    #[schemars(range(min = 0, max = 64))]
    pub count: u32,
    /// Extended resource name: `nvidia.com/gpu`, or a MIG profile such as `nvidia.com/mig-1g.10gb`.
    #[serde(default = "default_gpu_resource")]
    #[schemars(regex(pattern = r"^[a-z0-9.-]+/[a-zA-Z0-9._-]+$"))]
    pub resource_name: String,
}

/// The extended resource name the NVIDIA device plugin advertises.
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";

fn default_gpu_resource() -> String {
    DEFAULT_GPU_RESOURCE.to_string()
}

impl Default for GpuSpec {
    fn default() -> Self {
        Self { count: 0, resource_name: default_gpu_resource() }
    }
}

/// Compute device for the model.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    #[default]
    Auto,
    Cuda,
    Cpu,
}

/// Dynamic batching inside a replica.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchingSpec {
    /// Most inputs in one forward pass.
    #[serde(default = "default_max_batch")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_batch: u32,
    /// Most cost in one forward pass: tokens of text, frames computed of audio, one per image
    /// (as Hugging Face TEI's `max-batch-tokens`). A batch of long inputs is cut by this before
    /// `maxBatch`; one input over the budget still runs, alone.
    #[serde(default = "default_max_batch_tokens")]
    #[schemars(range(min = 1, max = 10000000))]
    pub max_batch_tokens: u32,
    /// Longest a request waits for companions before its batch runs, in milliseconds.
    #[serde(default = "default_max_wait_ms")]
    #[schemars(range(min = 0, max = 10000))]
    pub max_wait_ms: u32,
    /// Most requests queued per replica before new ones are refused (HTTP 429).
    #[serde(default = "default_max_queue")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_queue: u32,
}

fn default_max_batch() -> u32 {
    32
}
fn default_max_batch_tokens() -> u32 {
    16384
}
fn default_max_wait_ms() -> u32 {
    2
}
fn default_max_queue() -> u32 {
    512
}

impl Default for BatchingSpec {
    fn default() -> Self {
        Self {
            max_batch: default_max_batch(),
            max_batch_tokens: default_max_batch_tokens(),
            max_wait_ms: default_max_wait_ms(),
            max_queue: default_max_queue(),
        }
    }
}

/// Canary rollout of a new revision: traffic steps and the analysis that promotes or rolls back.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
// CEL has no indexed all(): the rule is unrolled over the (at most 10) steps.
#[x_kube(validation = Rule::new("(size(self.steps) <= 1 || self.steps[0].weight < self.steps[1].weight) && (size(self.steps) <= 2 || self.steps[1].weight < self.steps[2].weight) && (size(self.steps) <= 3 || self.steps[2].weight < self.steps[3].weight) && (size(self.steps) <= 4 || self.steps[3].weight < self.steps[4].weight) && (size(self.steps) <= 5 || self.steps[4].weight < self.steps[5].weight) && (size(self.steps) <= 6 || self.steps[5].weight < self.steps[6].weight) && (size(self.steps) <= 7 || self.steps[6].weight < self.steps[7].weight) && (size(self.steps) <= 8 || self.steps[7].weight < self.steps[8].weight) && (size(self.steps) <= 9 || self.steps[8].weight < self.steps[9].weight)").message("rollout.steps weights must increase from step to step (e.g. 10, 50, 100)").reason(Reason::FieldValueInvalid))]
pub struct RolloutSpec {
    /// Traffic steps for the canary, e.g. 10% for 60 s, then 50% for 60 s, then promote.
    #[schemars(length(min = 1, max = 10))]
    pub steps: Vec<CanaryStep>,
    /// When the canary counts as worse than the stable revision.
    #[serde(default)]
    pub analysis: RolloutAnalysis,
}

/// One canary traffic step.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStep {
    /// Percent of the modality's traffic sent to the canary.
    #[schemars(range(min = 1, max = 100))]
    pub weight: u32,
    /// How long to hold this step before analysing, in seconds.
    #[schemars(range(min = 1, max = 86400))]
    pub pause_seconds: u32,
}

/// Thresholds that roll a canary back.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutAnalysis {
    /// Roll back when the canary's error rate exceeds the stable one by more than this (0..1).
    #[serde(default = "default_max_error_rate_increase")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_rate_increase: f64,
    /// Roll back when canary p95 latency exceeds stable p95 by more than this factor.
    #[serde(default = "default_max_latency_ratio")]
    #[schemars(range(min = 1.0))]
    pub max_latency_ratio: f64,
    /// Roll back when the canary's accuracy (from corrections) is lower than stable's by more than this.
    #[serde(default = "default_max_accuracy_drop")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_accuracy_drop: f64,
    /// Calls the canary must have served in a step before it is judged; until then the step
    /// waits (a canary nobody calls is neither promoted nor rolled back).
    #[serde(default = "default_min_calls")]
    #[schemars(range(min = 1, max = 1000000))]
    pub min_calls: u32,
    /// Corrections each revision needs before accuracy is compared (fewer: that check is skipped).
    #[serde(default = "default_min_corrections")]
    #[schemars(range(min = 1, max = 1000000))]
    pub min_corrections: u32,
    /// Seconds a step may stay undecided after its pause (too few calls, e.g. a canary that never
    /// became ready, or metrics unavailable) before the canary is rolled back: stable is the
    /// revision known to work.
    #[serde(default = "default_progress_deadline_seconds")]
    #[schemars(range(min = 1, max = 604800))]
    pub progress_deadline_seconds: u32,
}

fn default_max_error_rate_increase() -> f64 {
    0.01
}
fn default_max_latency_ratio() -> f64 {
    1.5
}
fn default_max_accuracy_drop() -> f64 {
    0.02
}
fn default_min_calls() -> u32 {
    20
}
fn default_min_corrections() -> u32 {
    10
}
fn default_progress_deadline_seconds() -> u32 {
    600
}

impl Default for RolloutAnalysis {
    fn default() -> Self {
        Self {
            max_error_rate_increase: default_max_error_rate_increase(),
            max_latency_ratio: default_max_latency_ratio(),
            max_accuracy_drop: default_max_accuracy_drop(),
            min_calls: default_min_calls(),
            min_corrections: default_min_corrections(),
            progress_deadline_seconds: default_progress_deadline_seconds(),
        }
    }
}

/// Observed state of a ModalityNode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ModalityNodeStatus {
    /// `metadata.generation` last acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Replicas currently running (all revisions).
    #[serde(default)]
    pub replicas: i32,
    /// Replicas that pass their readiness probe.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Replica count the autoscaler (or the scale subresource) asks for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    /// Label selector of the node's pods, for the scale subresource (HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Model revision serving stable traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<String>,
    /// Revision being rolled out as a canary, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStatus>,
    /// Past revisions, newest last, with how each rollout ended (the operator keeps the last 20;
    /// the bound also keeps the API server's cost estimate of the model's CEL rules in budget).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub history: Vec<RevisionRecord>,
    /// p95 latency the autoscaler last read, for humans (e.g. `12ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p95: Option<String>,
    /// The autoscaler's last change of the replica count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale: Option<ScaleEvent>,
    /// The last distributed fine-tuning run (`spec.adaptation`) and its progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptation: Option<AdaptationStatus>,
    /// Ready, Available, Progressing, Degraded, ScalingLimited, MetricsUnavailable.
    // A map keyed by type: the node controller and the autoscaler each server-side apply only
    // their own conditions, so neither can overwrite the other's with a stale copy.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A canary in flight.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CanaryStatus {
    pub revision: String,
    /// Index into `spec.rollout.steps`.
    pub step: u32,
    /// Percent of traffic the canary gets now.
    pub weight: u32,
    /// RFC 3339 time the current step began.
    pub step_started: String,
}

/// How one revision's rollout ended.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionRecord {
    pub revision: String,
    /// `Deployed` (the first revision), `Promoted`, `RolledBack` or `Superseded`.
    pub outcome: String,
    /// The model of that revision: what `prism rollback --to-revision` puts back into the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSpec>,
    /// Why, in words (e.g. the failed analysis check).
    #[serde(default)]
    pub reason: String,
    /// RFC 3339 time of the outcome.
    pub time: String,
}

/// Progress of `spec.adaptation`, read from its Job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AdaptationStatus {
    /// `Running`, `Succeeded`, `Failed`, or `Waiting` (a run is due but cannot start yet).
    pub phase: String,
    /// Number of the last run (1, 2, ...); its Job and headless Service are `<node>-train-<run>`.
    #[serde(default)]
    pub run: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Worker pods of the run (Job completions).
    #[serde(default)]
    pub workers: u32,
    /// Worker pods running, ready, finished and failed, from the Job's status.
    #[serde(default)]
    pub active: i32,
    #[serde(default)]
    pub ready: i32,
    #[serde(default)]
    pub succeeded: i32,
    #[serde(default)]
    pub failed: i32,
    /// Why the run started (e.g. `520 corrections since run 2 >= 500`).
    #[serde(default)]
    pub trigger: String,
    /// What is happening, in words (the Job's failure reason when it failed).
    #[serde(default)]
    pub message: String,
    /// RFC 3339 times the run started and ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// `prism_router_corrections_total` for this node when the last run started: the baseline
    /// of `trigger.everyCorrections`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrections_at_start: Option<f64>,
    /// The `prism.dev/adapt-request` value already acted upon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_request: Option<String>,
    /// The model runs fine-tune from (the spec's model before any adaptation), so a second run
    /// does not stack adapters on the first one's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<ModelSpec>,
    /// The revision the last successful run produced (written to `spec.model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_revision: Option<String>,
}

/// One autoscaling decision.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaleEvent {
    /// RFC 3339 time of the decision.
    pub time: String,
    pub from: i32,
    pub to: i32,
    /// Why, with the numbers (e.g. `p95 182ms > target 100ms over 60s window`).
    pub reason: String,
}

impl Device {
    /// The `--device` value of `prism-node`.
    pub fn as_arg(self) -> &'static str {
        match self {
            Device::Auto => "auto",
            Device::Cuda => "cuda",
            Device::Cpu => "cpu",
        }
    }
}

impl ModalityNodeSpec {
    /// Command-line flags of the `prism-node` process serving this spec. One place for both
    /// substrates (the operator's container args and `prism up`'s child processes), so a new
    /// spec field reaches the server the same way everywhere.
    ///
    /// `adapter_paths[i]` is where the process finds `model.adapters[i]` (the substrate maps
    /// its URI); each becomes one `--adapter`, in spec order.
    pub fn server_args(
        &self,
        name: &str,
        listen: &str,
        grpc_listen: Option<&str>,
        model_path: &str,
        adapter_paths: &[String],
    ) -> Vec<String> {
        let mut args = vec!["--listen".to_string(), listen.to_string()];
        if let Some(g) = grpc_listen {
            args.extend(["--grpc-listen".to_string(), g.to_string()]);
        }
        let flags: [(&str, String); 10] = [
            ("--node-name", name.to_string()),
            ("--modality", self.modality.clone()),
            ("--model-uri", model_path.to_string()),
            ("--architecture", self.model.architecture.clone()),
            ("--revision", self.model.revision.clone()),
            ("--max-batch", self.batching.max_batch.to_string()),
            ("--max-batch-tokens", self.batching.max_batch_tokens.to_string()),
            ("--max-wait-ms", self.batching.max_wait_ms.to_string()),
            ("--max-queue", self.batching.max_queue.to_string()),
            ("--device", self.device.as_arg().to_string()),
        ];
        for (flag, value) in flags {
            args.push(flag.to_string());
            args.push(value);
        }
        for (adapter, path) in self.model.adapters.iter().zip(adapter_paths) {
            args.push("--adapter".to_string());
            args.push(adapter.server_arg(path));
        }
        if let Some(window) = self.model.attention.served_window() {
            args.extend(["--attention-window".to_string(), window.to_string()]);
        }
        if let Some(frames) = &self.model.audio_window {
            args.extend(["--audio-window".to_string(), frames.clone()]);
        }
        args
    }

    /// Replica count to run when nothing else has decided yet: `desired` if set, else `min`
    /// (but never 0 for a node nobody scaled to zero on purpose), clamped to [min, max].
    pub fn initial_replicas(&self) -> i32 {
        let want = self.replicas.desired.unwrap_or(self.replicas.min.max(1));
        want.clamp(self.replicas.min, self.replicas.max.max(self.replicas.min))
    }
}
