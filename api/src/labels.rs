//! Label and annotation keys put on every generated object (DESIGN.md §5). One place, so the
//! operator, the local substrate and the chart agree.

pub const NAME: &str = "app.kubernetes.io/name";
pub const INSTANCE: &str = "app.kubernetes.io/instance";
pub const COMPONENT: &str = "app.kubernetes.io/component";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "prism";
pub const NODE: &str = "prism.dev/node";
pub const PIPELINE: &str = "prism.dev/pipeline";
pub const REVISION: &str = "prism.dev/revision";
/// Pod label of a canary's pods (value `canary`); the canary Deployment selects on it.
pub const TRACK: &str = "prism.dev/track";
pub const TRACK_CANARY: &str = "canary";
/// Pod annotation: the scheme routers use to reach this pod (`https` for nodes with `spec.tls`).
pub const SCHEME: &str = "prism.dev/scheme";
/// Field manager used for every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "prism-operator";
/// Label of a node's training objects (Job, Service, pods): the ModalityNode they adapt. Not
/// `prism.dev/node`: the endpoint index routes traffic to pods that carry that one.
pub const ADAPTS: &str = "prism.dev/adapts";
/// Pod label of a training run's workers (value: the Job name); its headless Service selects it.
pub const TRAIN_RUN: &str = "prism.dev/train-run";
