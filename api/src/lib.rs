//! Prism's shared vocabulary: the two custom resources (`ModalityNode`, `MultimodalPipeline`),
//! their status and conditions, the routing table that the operator writes and routers read,
//! and the wire types spoken between router, nodes and clients.
//!
//! Nothing here talks to a cluster or runs a model: every other crate depends on this one,
//! so it stays small and dependency-light (kube's derive only, no client).

// kube's derive takes repeated `printcolumn(...)` / `validation` attributes by design.
#![allow(clippy::duplicated_attributes)]

pub mod condition;
pub mod labels;
pub mod manifest;
pub mod node;
pub mod pipeline;
pub mod routing;
pub mod status_writers;
pub mod wire;

pub use condition::{Condition, ConditionStatus};
pub use manifest::{Manifest, ManifestError, ManifestSet};
pub use node::{ModalityNode, ModalityNodeSpec, ModalityNodeStatus};
pub use pipeline::{MultimodalPipeline, MultimodalPipelineSpec, MultimodalPipelineStatus};
pub use routing::{build_table, NodeObservation, RouteEndpoint, RoutingTable};

/// API group of every Prism resource.
pub const GROUP: &str = "prism.dev";
/// The one served (and stored) version.
pub const VERSION: &str = "v1alpha1";
