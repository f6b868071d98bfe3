//! Prism's control plane: reconcilers for ModalityNode and MultimodalPipeline.
//!
//! Layout (pure core first, adapters last):
//! - [`node`], [`pipeline`]: pure functions (spec + observed state -> desired objects, status);
//!   no client, unit-tested without a cluster and reusable by `prism up`.
//! - [`index`]: linkerd-style in-memory index of node pods (namespace -> node -> pod -> endpoint),
//!   fed by one pod watch; it decides which pipelines must republish their routing table.
//! - [`autoscale`]: the builtin autoscaler (pure decision, Prometheus reader, cluster loop);
//!   `prism up` drives the same decision locally.
//! - [`controller`]: the kube-rs Controllers (thin adapters: read, call the core, apply).
//! - [`lease`], [`metrics`], [`server`]: leader election, Prometheus metrics, health endpoints.

pub mod adaptation;
pub mod autoscale;
pub mod client;
pub mod controller;
pub mod crds;
pub mod events;
pub mod index;
pub mod lease;
pub mod metrics;
pub mod node;
pub mod pipeline;
pub mod plan;
pub mod pod_health;
pub mod prom;
pub mod rollout;
pub mod server;
pub mod watches;
pub mod workload;

/// Errors of the reconcilers. Metric labels use [`Error::metric_label`] (bare variant names only,
/// so the `errors_total` label set stays small).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("serializing {what}: {source}")]
    Serialize {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0} has no namespace (Prism resources are namespaced)")]
    NoNamespace(String),
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("the operator's watch of the cluster stopped (shutting down)")]
    StoreClosed,
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Serialize { .. } => "serialize",
            Error::NoNamespace(_) => "no_namespace",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::StoreClosed => "store_closed",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Settings shared by every reconcile (from command-line flags).
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Image of prism-node when `spec.image` is unset.
    pub node_image: String,
    /// Image of prism-node built with CUDA, for nodes that compute on a GPU (`device: cuda`, or
    /// `auto` with GPUs) when `spec.image` is unset.
    pub node_image_cuda: String,
    /// Image of prism-router when `spec.routerImage` is unset.
    pub router_image: String,
    /// Image of adaptation Jobs (`train/Dockerfile`) when `spec.adaptation.image` is unset.
    pub train_image: String,
    /// imagePullPolicy for generated pods (None = Kubernetes default).
    pub image_pull_policy: Option<String>,
    /// Registries (`host` or `host:port`) whose oci:// models are fetched over plain HTTP, as
    /// containerd's and docker's "insecure registries": an in-cluster registry without TLS.
    pub insecure_registries: Vec<String>,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            node_image: format!("ghcr.io/prism-dev/prism-node:{}", env!("CARGO_PKG_VERSION")),
            node_image_cuda: format!("ghcr.io/prism-dev/prism-node-cuda:{}", env!("CARGO_PKG_VERSION")),
            router_image: format!("ghcr.io/prism-dev/prism-router:{}", env!("CARGO_PKG_VERSION")),
            train_image: format!("ghcr.io/prism-dev/prism-train:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: None,
            insecure_registries: Vec::new(),
        }
    }
}

impl OperatorConfig {
    /// The image a node's pods run: `spec.image`, else the CUDA build for a node that computes
    /// on a GPU, else the CPU build. The CPU image has no CUDA kernels: `device: cuda` on it
    /// crash-loops, and `auto` would hold a GPU while computing on the CPU.
    pub fn node_image_for(&self, spec: &prism_api::node::ModalityNodeSpec) -> String {
        use prism_api::node::Device;
        if let Some(i) = &spec.image {
            return i.clone();
        }
        let gpu = match spec.device {
            Device::Cuda => true,
            Device::Auto => spec.resources.gpu.count > 0,
            Device::Cpu => false,
        };
        if gpu {
            self.node_image_cuda.clone()
        } else {
            self.node_image.clone()
        }
    }
}

/// RFC 3339 "now" for condition timestamps.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
