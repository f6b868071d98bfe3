//! What every pod Prism generates shares: owner references, the model's way into the container
//! (file, claim, or fetched by an init container), resources, and the restricted pod security
//! level. Node Deployments, router Deployments and training Jobs all build on these.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, KeyToPath, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use prism_api::node::ModelSpec;

use crate::pod_health::FETCH_CONTAINER;
use crate::{Error, Result};

/// Where prism-node serves HTTP (and the routing table points) and gRPC in its pods.
pub const HTTP_PORT: i32 = 8080;
pub const GRPC_PORT: i32 = 9090;

/// Where model weights fetched or mounted for the node live inside the pod.
pub const MODEL_DIR: &str = "/models";

/// Metadata of an object `owner` generates: in its namespace, with `labels`, owned by it (so
/// deleting the owner garbage-collects it).
pub fn owned_meta<K: Resource<DynamicType = ()>>(
    owner: &K,
    name: String,
    labels: BTreeMap<String, String>,
) -> Result<ObjectMeta> {
    Ok(ObjectMeta {
        name: Some(name),
        namespace: owner.meta().namespace.clone(),
        labels: Some(labels),
        owner_references: Some(vec![owner_ref(owner)?]),
        ..Default::default()
    })
}

/// Controller owner reference, so deleting the ModalityNode garbage-collects its children
/// and `.owns()` maps child events back to it.
pub fn owner_ref<K: Resource<DynamicType = ()>>(obj: &K) -> Result<OwnerReference> {
    obj.controller_owner_ref(&()).ok_or_else(|| Error::InvalidSpec("object has no uid yet".into()))
}

/// How the model reaches the container: the URI passed to prism-node, plus volumes and an
/// optional init container.
pub struct ModelSource {
    pub uri: String,
    pub volumes: Vec<Volume>,
    pub mounts: Vec<VolumeMount>,
    pub init: Option<Container>,
}

/// `file://` is a path inside the image (hostPath is forbidden by the restricted pod security
/// level, so we never mount node paths). `pvc://claim/path` mounts the claim read-only.
/// `hf://` and `oci://` are fetched by an init container (`prism-node fetch`, same image) into
/// an emptyDir, so the serving container starts from local files and its root stays read-only.
/// Shared by the node's Deployments and its training Job (`image`: the prism-node image that
/// runs `fetch`).
pub fn model_source(
    model: &ModelSpec,
    image: &str,
    sc: &SecurityContext,
    insecure_registries: &[String],
) -> Result<ModelSource> {
    let uri = model.uri.as_str();
    if prism_api::node::uri_escapes_its_root(uri) {
        return Err(Error::InvalidSpec(format!("model.uri {uri}: `..` path segments may not leave the model volume")));
    }
    let model_mount = |read_only: bool| VolumeMount {
        name: "model".into(),
        mount_path: MODEL_DIR.into(),
        read_only: Some(read_only),
        ..Default::default()
    };
    if uri.starts_with("file://") {
        return Ok(ModelSource { uri: uri.to_string(), volumes: vec![], mounts: vec![], init: None });
    }
    if let Some(rest) = uri.strip_prefix("pvc://") {
        let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
        if claim.is_empty() {
            return Err(Error::InvalidSpec(format!("model.uri {uri}: expected pvc://CLAIM/PATH")));
        }
        return Ok(ModelSource {
            uri: format!("file://{MODEL_DIR}/{path}").trim_end_matches('/').to_string(),
            volumes: vec![Volume {
                name: "model".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim.to_string(),
                    read_only: Some(true),
                }),
                ..Default::default()
            }],
            mounts: vec![model_mount(true)],
            init: None,
        });
    }
    if uri.starts_with("hf://") || uri.starts_with("oci://") {
        let init = Container {
            name: FETCH_CONTAINER.into(),
            image: Some(image.to_string()),
            command: Some(vec!["prism-node".into()]),
            // --architecture makes the files that architecture reads required, so a repository
            // without them fails here with a clear 404 instead of crash-looping the server.
            args: Some(vec![
                "fetch".into(),
                "--model-uri".into(),
                uri.to_string(),
                "--out".into(),
                MODEL_DIR.into(),
                "--architecture".into(),
                model.architecture.clone(),
            ]),
            volume_mounts: Some(vec![model_mount(false), tmp_mount()]),
            security_context: Some(sc.clone()),
            env: plain_http_registry(uri, insecure_registries)
                .then(|| vec![EnvVar { name: "OCI_INSECURE".into(), value: Some("1".into()), ..Default::default() }]),
            // The fetch error's last line reaches the ModalityNode's conditions (pod_health).
            termination_message_policy: Some("FallbackToLogsOnError".into()),
            ..Default::default()
        };
        return Ok(ModelSource {
            uri: format!("file://{MODEL_DIR}"),
            volumes: vec![Volume {
                name: "model".into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Default::default()
            }],
            mounts: vec![model_mount(true)],
            init: Some(init),
        });
    }
    Err(Error::InvalidSpec(format!("model.uri {uri}: scheme must be file://, pvc://, hf:// or oci://")))
}

/// Whether an oci:// model's registry is one the operator was told serves plain HTTP.
fn plain_http_registry(uri: &str, insecure_registries: &[String]) -> bool {
    let Some(rest) = uri.strip_prefix("oci://") else { return false };
    let host = rest.split('/').next().unwrap_or_default();
    insecure_registries.iter().any(|r| r.eq_ignore_ascii_case(host))
}

/// Requests == limits for cpu, memory and `gpus` x `gpu_resource` (None when nothing is set).
/// Extended resources (GPUs) must have request == limit; setting both for everything also gives
/// GPU pods the Guaranteed QoS class when cpu/memory are set. Serving and training pods share it.
pub fn pod_resources(
    cpu: Option<&str>,
    memory: Option<&str>,
    gpu_resource: &str,
    gpus: u32,
) -> Option<ResourceRequirements> {
    let mut res: BTreeMap<String, Quantity> = BTreeMap::new();
    if let Some(cpu) = cpu {
        res.insert("cpu".into(), Quantity(cpu.to_string()));
    }
    if let Some(mem) = memory {
        res.insert("memory".into(), Quantity(mem.to_string()));
    }
    if gpus > 0 {
        res.insert(gpu_resource.to_string(), Quantity(gpus.to_string()));
    }
    (!res.is_empty()).then(|| ResourceRequirements {
        requests: Some(res.clone()),
        limits: Some(res),
        ..Default::default()
    })
}

/// A writable /tmp on an emptyDir (the root filesystem is read-only): mount and volume.
pub fn tmp_mount() -> VolumeMount {
    VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..Default::default() }
}

pub fn tmp_volume() -> Volume {
    Volume { name: "tmp".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() }
}

/// A Secret mounted read-only at `mount_path`, its files readable by the pods' fixed non-root
/// group only; `keys` limits it to those keys (empty: every key).
pub fn secret_volume(name: &str, secret: String, keys: &[&str], mount_path: &str) -> (Volume, VolumeMount) {
    let items = keys.iter().map(|k| KeyToPath { key: (*k).into(), path: (*k).into(), mode: None }).collect::<Vec<_>>();
    let volume = Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            items: (!items.is_empty()).then_some(items),
            default_mode: Some(0o440),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mount =
        VolumeMount { name: name.into(), mount_path: mount_path.into(), read_only: Some(true), ..Default::default() };
    (volume, mount)
}

/// Restricted pod security level (non-root, read-only root, no capabilities, no escalation,
/// seccomp RuntimeDefault): generated pods are admitted in `enforce=restricted` namespaces.
pub fn restricted_container_sc() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
        ..Default::default()
    }
}

pub fn restricted_pod_sc() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        // A fixed non-root uid: images need not declare USER for runAsNonRoot to be verifiable.
        run_as_user: Some(65532),
        run_as_group: Some(65532),
        fs_group: Some(65532),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
        ..Default::default()
    }
}
