//! Pure core of the MultimodalPipeline reconciler: spec + the ModalityNodes it names + the pod
//! index -> routing table, router Deployment / Service / ConfigMap, and status.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec,
    Probe, ProjectedVolumeSource, SecretKeySelector, SecretProjection, Service, ServiceAccount, ServicePort,
    ServiceSpec, Volume, VolumeMount, VolumeProjection, VolumeResourceRequirements,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use prism_api::condition::{self, types, Condition, ConditionStatus};
use prism_api::labels;
use prism_api::pipeline::{MemoryRetain, MultimodalPipeline, MultimodalPipelineStatus, NodeEndpoints, RouterAuth};
use prism_api::routing::{build_table, NodeObservation, RoutingTable, PIPELINE_SPEC_KEY, ROUTING_TABLE_KEY};

use crate::index::PodEndpoint;
use crate::workload::{owned_meta, restricted_container_sc, restricted_pod_sc, secret_volume, tmp_mount, tmp_volume};
use crate::{Error, OperatorConfig, Result};

pub const ROUTER_PORT: i32 = 8080;
pub const CONFIG_DIR: &str = "/etc/prism";
/// Where the router pods mount the embedded memory store's volume.
pub const MEMORY_DIR: &str = "/var/lib/prism/memory";
/// The router's env var for the PostgreSQL memory store's URL (`--memory-url`).
pub const MEMORY_URL_ENV: &str = "PRISM_MEMORY_URL";
/// The key of `memory.store.postgresSecret` that holds that URL.
pub const MEMORY_URL_KEY: &str = "url";
/// Where the router pods mount the token Secret.
pub const AUTH_DIR: &str = "/etc/prism-auth";
/// Where routers find the CA of each HTTPS node (`<node>.crt`).
pub const NODE_CA_DIR: &str = "/etc/prism-node-ca";
pub const COMPONENT: &str = "router";
/// Seconds a stopping router pod keeps answering (its `--shutdown-delay-s`).
pub const ROUTER_SHUTDOWN_DELAY_S: &str = "5";
/// Annotation on the router pod template: a change of the pipeline spec rolls the routers.
/// The routing table is deliberately not hashed: failover must not restart routers.
pub const SPEC_HASH_ANNOTATION: &str = "prism.dev/pipeline-spec-hash";

pub fn router_name(p: &str) -> String {
    format!("{p}-router")
}
pub fn config_map_name(p: &str) -> String {
    format!("{p}-routing-table")
}

/// What the pipeline reconciler knows about one referenced ModalityNode.
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedNode {
    pub modality: String,
    /// `spec.tls.secretName` of an HTTPS node.
    pub tls_secret: Option<String>,
    /// Its pods as indexed, ordered by pod name.
    pub endpoints: Vec<PodEndpoint>,
    /// `status.canary`: the canary revision's pods share its weight of the node's traffic.
    pub canary: Option<prism_api::node::CanaryStatus>,
}

/// Builds the routing table. `observed` maps node name -> node (absent: the ModalityNode does not
/// exist). `previous` is the table currently published: the generation is kept when the routes
/// are unchanged and bumped otherwise, never below `floor` (the generation in status), so a lost
/// ConfigMap never makes routers see a generation go backwards.
pub fn routing_table(
    mmp: &MultimodalPipeline,
    observed: &BTreeMap<String, ObservedNode>,
    previous: Option<&RoutingTable>,
    floor: u64,
) -> RoutingTable {
    // The shape comes from prism-api's build_table, shared with `prism up`, so both substrates
    // route identically.
    let obs: Vec<NodeObservation> = observed
        .iter()
        .map(|(name, o)| NodeObservation {
            node: name.clone(),
            modality: o.modality.clone(),
            revision: String::new(),
            endpoints: o.endpoints.iter().map(|e| (e.endpoint.clone(), e.ready)).collect(),
            // Each pod's own revision (a canary runs a different one than the stable replicas).
            revisions: o.endpoints.iter().map(|e| (e.endpoint.clone(), e.revision.clone())).collect(),
            canary: o.canary.clone(),
        })
        .collect();
    let mut table = build_table(&mmp.name_any(), &mmp.spec, &obs, None);
    let prev_gen = previous.map(|p| p.generation).unwrap_or(0).max(floor);
    table.generation = match previous {
        Some(p) if p.same_routes(&table) && p.generation >= floor => p.generation,
        _ => prev_gen + 1,
    };
    table
}

/// Names referenced by the pipeline that have no ModalityNode (sorted).
pub fn missing_nodes(mmp: &MultimodalPipeline, observed: &BTreeMap<String, ObservedNode>) -> Vec<String> {
    let mut v: Vec<String> =
        mmp.spec.nodes.iter().filter(|n| !observed.contains_key(&n.name)).map(|n| n.name.clone()).collect();
    v.sort();
    v
}

#[derive(Clone, Debug, PartialEq)]
pub struct PipelineObjects {
    pub deployment: Deployment,
    pub service: Service,
    pub config_map: ConfigMap,
    /// The routers' identity: it may read its own routing ConfigMap and nothing else.
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
    /// The embedded memory store's volume, with `memory.enabled` and `store.kind: embedded`;
    /// owned by the pipeline only with `memory.retain: Delete`.
    pub memory_claim: Option<PersistentVolumeClaim>,
}

pub fn memory_claim_name(p: &str) -> String {
    format!("{p}-memory")
}

fn labels_for(mmp: &MultimodalPipeline) -> BTreeMap<String, String> {
    let mut l = selector_labels(&mmp.name_any());
    l.insert(labels::COMPONENT.to_string(), COMPONENT.to_string());
    l.insert(labels::MANAGED_BY.to_string(), labels::MANAGED_BY_VALUE.to_string());
    l
}

pub fn selector_labels(p: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME.to_string(), "prism-router".to_string()),
        (labels::INSTANCE.to_string(), p.to_string()),
        (labels::PIPELINE.to_string(), p.to_string()),
    ])
}

/// FNV-1a: stable across Rust versions (unlike `DefaultHasher`), so an operator upgrade does
/// not roll every router.
fn fnv1a(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// `node_cas` maps each referenced node with `spec.tls` to its Secret: routers trust its `ca.crt`.
pub fn desired_objects(
    mmp: &MultimodalPipeline,
    cfg: &OperatorConfig,
    table: &RoutingTable,
    node_cas: &BTreeMap<String, String>,
) -> Result<PipelineObjects> {
    let name = mmp.name_any();
    let spec_json =
        serde_json::to_string_pretty(&mmp.spec).map_err(|source| Error::Serialize { what: "pipeline spec", source })?;
    let table_json =
        serde_json::to_string_pretty(table).map_err(|source| Error::Serialize { what: "routing table", source })?;
    let config_map = ConfigMap {
        metadata: meta(mmp, config_map_name(&name))?,
        data: Some(BTreeMap::from([
            (ROUTING_TABLE_KEY.to_string(), table_json),
            (PIPELINE_SPEC_KEY.to_string(), spec_json.clone()),
        ])),
        ..Default::default()
    };
    let mut pod = RouterPod::new(&name);
    pod.add_auth(mmp.spec.auth.secret_for(&name));
    pod.add_node_cas(node_cas);
    let memory_claim = pod.add_memory(mmp)?;
    let (service_account, role, role_binding) = router_rbac(mmp)?;
    Ok(PipelineObjects {
        deployment: router_deployment(mmp, cfg, pod, &spec_json, memory_claim.is_some())?,
        service: router_service(mmp)?,
        config_map,
        service_account,
        role,
        role_binding,
        memory_claim,
    })
}

/// Metadata of every object of the pipeline: its labels, owned by it.
fn meta(mmp: &MultimodalPipeline, name: String) -> Result<ObjectMeta> {
    owned_meta(mmp, name, labels_for(mmp))
}

/// The router container's arguments and what its pod mounts, built up feature by feature.
struct RouterPod {
    args: Vec<String>,
    mounts: Vec<VolumeMount>,
    volumes: Vec<Volume>,
    env: Vec<EnvVar>,
}

impl RouterPod {
    /// The routing table and pipeline spec from the ConfigMap, plus a writable /tmp.
    fn new(name: &str) -> Self {
        // The mounted file gives a starting table even when the API is unreachable; the watch
        // brings rewrites within milliseconds instead of the kubelet's next sync (up to a minute).
        let args = vec![
            "--pipeline".to_string(),
            format!("{CONFIG_DIR}/{PIPELINE_SPEC_KEY}"),
            "--routing-table".into(),
            format!("{CONFIG_DIR}/{ROUTING_TABLE_KEY}"),
            "--routing-configmap".into(),
            config_map_name(name),
            "--listen".into(),
            format!("0.0.0.0:{ROUTER_PORT}"),
            // A rolling restart replaces a router only after its successor is Ready; the old one
            // keeps answering while kube-proxy and the clients' pooled connections move over
            // (well inside the pod's 30 s termination grace, with the 10 s drain after it).
            "--shutdown-delay-s".into(),
            ROUTER_SHUTDOWN_DELAY_S.into(),
        ];
        let mounts = vec![
            VolumeMount {
                name: "config".into(),
                mount_path: CONFIG_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            tmp_mount(),
        ];
        let volumes = vec![
            Volume {
                name: "config".into(),
                config_map: Some(ConfigMapVolumeSource { name: config_map_name(name), ..Default::default() }),
                ..Default::default()
            },
            tmp_volume(),
        ];
        Self { args, mounts, volumes, env: Vec::new() }
    }

    /// Bearer tokens from the pipeline's Secret (only its tokens key), or no auth when the
    /// pipeline says `insecureNoAuth`.
    fn add_auth(&mut self, secret: Option<String>) {
        let Some(secret) = secret else {
            self.args.push("--insecure-no-auth".into());
            return;
        };
        let key = RouterAuth::TOKENS_KEY;
        self.args.extend(["--auth-token-file".into(), format!("{AUTH_DIR}/{key}")]);
        let (volume, mount) = secret_volume("auth", secret, &[key], AUTH_DIR);
        self.volumes.push(volume);
        self.mounts.push(mount);
    }

    /// HTTPS nodes: each one's CA from its own Secret (only the `ca.crt` key is projected, never
    /// the node's private key), all passed as --node-ca.
    fn add_node_cas(&mut self, node_cas: &BTreeMap<String, String>) {
        if node_cas.is_empty() {
            return;
        }
        self.mounts.push(VolumeMount {
            name: "node-ca".into(),
            mount_path: NODE_CA_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
        let mut sources = Vec::new();
        for (node, secret) in node_cas {
            self.args.extend(["--node-ca".into(), format!("{NODE_CA_DIR}/{node}.crt")]);
            sources.push(VolumeProjection {
                secret: Some(SecretProjection {
                    name: secret.clone(),
                    items: Some(vec![KeyToPath { key: "ca.crt".into(), path: format!("{node}.crt"), mode: None }]),
                    optional: Some(false),
                }),
                ..Default::default()
            });
        }
        self.volumes.push(Volume {
            name: "node-ca".into(),
            projected: Some(ProjectedVolumeSource { sources: Some(sources), default_mode: Some(0o444) }),
            ..Default::default()
        });
    }

    /// Memory. Postgres: the routers (any number of them) share one database; its URL (with the
    /// password) reaches the container only as an env var from the user's Secret, never in the
    /// Deployment's args or the operator's logs. Embedded: one SQLite file on a claim the
    /// operator creates (returned). Unlike the pipeline's other objects the claim is owned by
    /// the pipeline only with `retain: Delete`: by default it outlives the pipeline, and its
    /// fixed name lets a pipeline of the same name reuse it.
    fn add_memory(&mut self, mmp: &MultimodalPipeline) -> Result<Option<PersistentVolumeClaim>> {
        let memory = &mmp.spec.memory;
        if !memory.enabled {
            return Ok(None);
        }
        if memory.store.kind == "postgres" {
            if let Some(secret) = &memory.store.postgres_secret {
                self.env.push(EnvVar {
                    name: MEMORY_URL_ENV.into(),
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: secret.clone(),
                            key: MEMORY_URL_KEY.into(),
                            optional: Some(false),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                });
            }
        }
        if memory.store.kind != "embedded" {
            return Ok(None);
        }
        let name = mmp.name_any();
        self.args.extend(["--memory-path".into(), format!("{MEMORY_DIR}/memory.db")]);
        self.mounts.push(VolumeMount { name: "memory".into(), mount_path: MEMORY_DIR.into(), ..Default::default() });
        self.volumes.push(Volume {
            name: "memory".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: memory_claim_name(&name),
                read_only: Some(false),
            }),
            ..Default::default()
        });
        // Server-side apply drops an owner reference this manager applied before, so switching
        // a live pipeline to `Retain` disowns the claim (and to `Delete` adopts it).
        let mut metadata = meta(mmp, memory_claim_name(&name))?;
        if memory.retain == MemoryRetain::Retain {
            metadata.owner_references = None;
        }
        Ok(Some(PersistentVolumeClaim {
            metadata,
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: memory.store.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([("storage".to_string(), Quantity(memory.store.size.clone()))])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: None,
        }))
    }
}

/// The router Deployment. Its pods restart when the spec changes (a hash of it is a pod
/// annotation); with an embedded memory claim the old pod goes first.
fn router_deployment(
    mmp: &MultimodalPipeline,
    cfg: &OperatorConfig,
    pod: RouterPod,
    spec_json: &str,
    embedded_memory: bool,
) -> Result<Deployment> {
    let name = mmp.name_any();
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(5),
        timeout_seconds: Some(2),
        ..Default::default()
    };
    let container = Container {
        name: "router".into(),
        image: Some(mmp.spec.router_image.clone().unwrap_or_else(|| cfg.router_image.clone())),
        image_pull_policy: cfg.image_pull_policy.clone(),
        args: Some(pod.args),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: ROUTER_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(probe("/ready")),
        liveness_probe: Some(probe("/live")),
        security_context: Some(restricted_container_sc()),
        volume_mounts: Some(pod.mounts),
        env: (!pod.env.is_empty()).then_some(pod.env),
        ..Default::default()
    };
    Ok(Deployment {
        metadata: meta(mmp, router_name(&name))?,
        spec: Some(DeploymentSpec {
            replicas: Some(mmp.spec.router_replicas),
            // A ReadWriteOnce claim and a SQLite file take one writer: the old pod goes first.
            strategy: embedded_memory
                .then(|| DeploymentStrategy { type_: Some("Recreate".into()), ..Default::default() }),
            selector: LabelSelector { match_labels: Some(selector_labels(&name)), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels_for(mmp)),
                    annotations: Some(BTreeMap::from([(
                        SPEC_HASH_ANNOTATION.to_string(),
                        fnv1a(spec_json.as_bytes()),
                    )])),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(pod.volumes),
                    service_account_name: Some(router_name(&name)),
                    automount_service_account_token: Some(true),
                    security_context: Some(restricted_pod_sc()),
                    enable_service_links: Some(false),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

fn router_service(mmp: &MultimodalPipeline) -> Result<Service> {
    let name = mmp.name_any();
    Ok(Service {
        metadata: meta(mmp, router_name(&name))?,
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(&name)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: ROUTER_PORT,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    })
}

/// The routers' identity: a ServiceAccount that may get/list/watch its pipeline's ConfigMap and
/// nothing else. The API server authorizes a watch with `fieldSelector=metadata.name=X` against
/// resourceNames [X].
fn router_rbac(mmp: &MultimodalPipeline) -> Result<(ServiceAccount, Role, RoleBinding)> {
    let name = mmp.name_any();
    let service_account = ServiceAccount { metadata: meta(mmp, router_name(&name))?, ..Default::default() };
    let role = Role {
        metadata: meta(mmp, router_name(&name))?,
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["configmaps".into()]),
            resource_names: Some(vec![config_map_name(&name)]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..Default::default()
        }]),
    };
    let role_binding = RoleBinding {
        metadata: meta(mmp, router_name(&name))?,
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: router_name(&name),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: router_name(&name),
            namespace: mmp.namespace(),
            ..Default::default()
        }]),
    };
    Ok((service_account, role, role_binding))
}

/// Pipeline status from the table just published, the missing nodes and the router Deployment.
pub fn status(
    mmp: &MultimodalPipeline,
    observed: &BTreeMap<String, ObservedNode>,
    table: &RoutingTable,
    router: Option<&Deployment>,
    now: &str,
) -> MultimodalPipelineStatus {
    let name = mmp.name_any();
    let ns = mmp.namespace().unwrap_or_default();
    let generation = mmp.metadata.generation;
    let missing = missing_nodes(mmp, observed);
    let degraded_modalities = table.missing_modalities();

    let mut endpoints = Vec::new();
    let mut nodes_ready = 0;
    let mut down_required = Vec::new();
    for n in &mmp.spec.nodes {
        let Some(obs) = observed.get(&n.name) else { continue };
        let ready: Vec<String> = obs
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .map(|e| e.endpoint.trim_start_matches("http://").to_string())
            .collect();
        let not_ready = obs.endpoints.iter().filter(|e| !e.ready).count() as u32;
        if !ready.is_empty() {
            nodes_ready += 1;
        } else if n.required {
            down_required.push(n.name.clone());
        }
        endpoints.push(NodeEndpoints { node: n.name.clone(), modality: obs.modality.clone(), ready, not_ready });
    }

    let router_avail = router.and_then(|d| d.status.as_ref()).and_then(|s| s.available_replicas).unwrap_or(0);
    let router_name = router_name(&name);
    let ready = if !missing.is_empty() {
        Condition::new(
            types::READY,
            ConditionStatus::False,
            "NodeNotFound",
            format!(
                "ModalityNode {} not found in namespace {ns}; create it (kubectl apply) or remove it from spec.nodes",
                missing.join(", ")
            ),
        )
    } else if !down_required.is_empty() {
        Condition::new(
            types::READY,
            ConditionStatus::False,
            "RequiredNodeUnavailable",
            format!(
                "required ModalityNode {} has no ready replica; see `kubectl describe mn {}`",
                down_required.join(", "),
                down_required[0]
            ),
        )
    } else if router_avail == 0 {
        Condition::new(
            types::READY,
            ConditionStatus::False,
            "RouterUnavailable",
            match mmp.spec.auth.secret_for(&mmp.name_any()) {
                // The most common first-install stall: the token Secret does not exist yet.
                Some(secret) => format!(
                    "no replica of Deployment {router_name} is available yet; its pods mount Secret {secret} \
                     (key `tokens`); create it if missing: kubectl create secret generic {secret} \
                     --from-literal=tokens=$(openssl rand -hex 32)"
                ),
                None => format!("no replica of Deployment {router_name} is available yet"),
            },
        )
    } else if nodes_ready == 0 {
        Condition::new(
            types::READY,
            ConditionStatus::False,
            "NoReadyNode",
            "no node of the pipeline has a ready replica",
        )
    } else {
        Condition::new(
            types::READY,
            ConditionStatus::True,
            "PipelineReady",
            format!("router {router_name} available; routing table generation {}", table.generation),
        )
    };
    let degraded = if degraded_modalities.is_empty() && missing.is_empty() {
        Condition::new(
            types::DEGRADED,
            ConditionStatus::False,
            "AllModalitiesServed",
            "every modality has a ready replica",
        )
    } else {
        let mut parts = Vec::new();
        if !degraded_modalities.is_empty() {
            parts.push(format!("modalities without a ready replica: {}", degraded_modalities.join(", ")));
        }
        if !missing.is_empty() {
            parts.push(format!("missing ModalityNode: {}", missing.join(", ")));
        }
        Condition::new(
            types::DEGRADED,
            ConditionStatus::True,
            if missing.is_empty() { "ModalityUnavailable" } else { "NodeNotFound" },
            parts.join("; "),
        )
    };
    let old = mmp.status.clone().unwrap_or_default();
    MultimodalPipelineStatus {
        observed_generation: generation,
        conditions: condition::merge(&old.conditions, vec![ready, degraded], now, generation),
        routing_table_generation: table.generation.max(old.routing_table_generation),
        endpoints,
        nodes_ready: Some(format!("{nodes_ready}/{}", mmp.spec.nodes.len())),
        degraded_modalities,
        url: Some(format!("http://{router_name}.{ns}.svc:{ROUTER_PORT}")),
    }
}

#[cfg(test)]
mod tests;
