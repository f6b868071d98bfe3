//! Pure core of the ModalityNode reconciler: spec (+ observed Deployment) -> desired
//! Deployment / Service / PodDisruptionBudget, and -> status with conditions.
//! No client here: everything is data in, data out, so it is unit-tested without a cluster
//! and the same functions can drive `prism up`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, HTTPGetAction, PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec,
    Probe, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use prism_api::condition::{self, types, Condition, ConditionStatus};
use prism_api::labels;
use prism_api::node::{AutoscalingMode, ModalityNode, ModelSpec};
use prism_api::status_writers::NodeControllerStatus;

use crate::pod_health::PodProblem;
use crate::workload::{
    model_source, owned_meta, pod_resources, restricted_container_sc, restricted_pod_sc, secret_volume, tmp_mount,
    tmp_volume,
};
pub use crate::workload::{GRPC_PORT, HTTP_PORT, MODEL_DIR};
use crate::{Error, OperatorConfig, Result};

/// Component label value of node workloads.
pub const COMPONENT: &str = "modality-node";
/// Seconds a stopping node pod keeps answering (its `--shutdown-delay-s`): it must outlast the
/// path from its deletion to every router (kubelet, API server, operator, routing ConfigMap,
/// router watch). 5 s, as routers; drain (10 s at most) follows, within the default 30 s grace.
pub const NODE_SHUTDOWN_DELAY_S: &str = "5";

/// The objects one ModalityNode owns.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeObjects {
    pub deployment: Deployment,
    pub service: Service,
    pub pdb: PodDisruptionBudget,
}

/// Labels that select a node's pods. Stable across revisions because a Deployment's selector
/// is immutable; the revision label goes on the pod template only.
pub fn selector_labels(node: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME.to_string(), "prism-node".to_string()),
        (labels::INSTANCE.to_string(), node.to_string()),
        (labels::NODE.to_string(), node.to_string()),
    ])
}

/// `status.selector` for the scale subresource (HPA/KEDA read it).
pub fn selector_string(node: &str) -> String {
    selector_labels(node).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

fn object_labels(mn: &ModalityNode) -> BTreeMap<String, String> {
    let mut l = selector_labels(&mn.name_any());
    l.insert(labels::COMPONENT.to_string(), COMPONENT.to_string());
    l.insert(labels::MANAGED_BY.to_string(), labels::MANAGED_BY_VALUE.to_string());
    l.insert(labels::REVISION.to_string(), mn.spec.model.revision.clone());
    l
}

fn meta(mn: &ModalityNode, name: String) -> Result<ObjectMeta> {
    owned_meta(mn, name, object_labels(mn))
}

/// Replica count the Deployment should run.
///
/// `external`: follow `spec.replicas.desired` (written by `kubectl scale`, HPA, KEDA through the
/// scale subresource), falling back to `min`. `builtin`: follow the autoscaler's choice in
/// `status.desiredReplicas` (issue 9), else `min`. Paused: keep what is running. Always
/// clamped to [min, max] because the scale subresource bypasses the spec's CEL rules.
pub fn desired_replicas(mn: &ModalityNode, current: Option<i32>) -> i32 {
    let r = &mn.spec.replicas;
    let (lo, hi) = (r.min.max(0), r.max.max(r.min.max(0)));
    if mn.spec.autoscaling.paused {
        if let Some(c) = current {
            return c;
        }
    }
    let want = match mn.spec.autoscaling.mode {
        AutoscalingMode::External => r.desired.unwrap_or(lo),
        AutoscalingMode::Builtin => mn.status.as_ref().and_then(|s| s.desired_replicas).unwrap_or(lo),
    };
    want.clamp(lo, hi)
}

/// Where the serving container finds `model.adapters`: a path per adapter (spec order), plus
/// the volumes and mounts that bring them. `file://` is a path in the image; `pvc://claim/p`
/// is read through the model's own mount when the model comes from the same claim, else the
/// claim is mounted read-only at `/adapters/<claim>`. `hf://` and `oci://` adapters are not
/// fetched: refused with the reason (the fetch init container downloads models only).
pub(crate) struct AdapterSources {
    pub paths: Vec<String>,
    pub volumes: Vec<Volume>,
    pub mounts: Vec<VolumeMount>,
}

pub const ADAPTERS_DIR: &str = "/adapters";

pub(crate) fn adapter_sources(model: &ModelSpec) -> Result<AdapterSources> {
    let model_claim = model.uri.strip_prefix("pvc://").map(|r| r.split_once('/').map_or(r, |(c, _)| c));
    let mut out = AdapterSources { paths: Vec::new(), volumes: Vec::new(), mounts: Vec::new() };
    for a in &model.adapters {
        let uri = a.uri.as_str();
        if prism_api::node::uri_escapes_its_root(uri) {
            return Err(Error::InvalidSpec(format!(
                "adapters[{}].uri {uri}: `..` path segments may not leave its volume",
                a.name
            )));
        }
        if let Some(p) = uri.strip_prefix("file://") {
            out.paths.push(p.to_string());
            continue;
        }
        if let Some(rest) = uri.strip_prefix("pvc://") {
            let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
            if claim.is_empty() || path.is_empty() {
                return Err(Error::InvalidSpec(format!("adapters[{}].uri {uri}: expected pvc://CLAIM/PATH", a.name)));
            }
            if Some(claim) == model_claim {
                out.paths.push(format!("{MODEL_DIR}/{path}"));
                continue;
            }
            let mount_path = format!("{ADAPTERS_DIR}/{claim}");
            if !out.mounts.iter().any(|m| m.mount_path == mount_path) {
                // Claim names may be longer than a volume name may be.
                let volume = format!("adapters-{}", out.volumes.len());
                out.volumes.push(Volume {
                    name: volume.clone(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: claim.to_string(),
                        read_only: Some(true),
                    }),
                    ..Default::default()
                });
                out.mounts.push(VolumeMount { name: volume, mount_path, read_only: Some(true), ..Default::default() });
            }
            out.paths.push(format!("{ADAPTERS_DIR}/{claim}/{path}"));
            continue;
        }
        return Err(Error::InvalidSpec(format!(
            "adapters[{}].uri {uri}: adapters are read from file:// (in the image) or pvc:// (a claim); \
             hf:// and oci:// adapters are not downloaded: copy the file into the model's claim",
            a.name
        )));
    }
    Ok(out)
}

/// Where a TLS node's certificate is mounted, and the files prism-node reads from it.
pub const TLS_DIR: &str = "/etc/prism/tls";

fn http_probe(path: &str, period: i32, failure: i32, tls: bool) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            // The kubelet does not verify certificates, so HTTPS probes need no CA.
            scheme: tls.then(|| "HTTPS".to_string()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failure),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

/// Desired children of a ModalityNode. `current_replicas` is the replica count of the existing
/// Deployment (used only while autoscaling is paused). During a canary the Deployment keeps the
/// stable revision's model (from `status.history`); [`canary_deployment`] runs the spec's.
pub fn desired_objects(mn: &ModalityNode, cfg: &OperatorConfig, current_replicas: Option<i32>) -> Result<NodeObjects> {
    let serving = crate::rollout::serving_model(&mn.spec, mn.status.as_ref());
    if serving != &mn.spec.model {
        let mut stable = mn.clone();
        stable.spec.model = serving.clone();
        return build_objects(&stable, cfg, desired_replicas(mn, current_replicas), false);
    }
    build_objects(mn, cfg, desired_replicas(mn, current_replicas), false)
}

/// Name of a node's canary Deployment.
pub fn canary_name(node: &str) -> String {
    format!("{node}-canary")
}

/// The canary Deployment while `status.canary` names the spec's revision: the spec's model,
/// `weight`% of the stable replica count (at least one), pods labelled `prism.dev/track: canary`
/// and their own revision, so the pod index routes the canary's share to them.
pub fn canary_deployment(mn: &ModalityNode, cfg: &OperatorConfig, stable_replicas: i32) -> Result<Option<Deployment>> {
    let Some(c) = mn.status.as_ref().and_then(|s| s.canary.as_ref()) else { return Ok(None) };
    if c.revision != mn.spec.model.revision {
        return Ok(None);
    }
    let replicas = ((f64::from(stable_replicas) * f64::from(c.weight) / 100.0).round() as i32).max(1);
    Ok(Some(build_objects(mn, cfg, replicas, true)?.deployment))
}

fn build_objects(mn: &ModalityNode, cfg: &OperatorConfig, replicas: i32, canary: bool) -> Result<NodeObjects> {
    let (pod_spec, tls) = node_pod(mn, cfg)?;
    Ok(NodeObjects {
        deployment: node_deployment(mn, pod_spec, tls, replicas, canary)?,
        service: node_service(mn)?,
        pdb: node_pdb(mn)?,
    })
}

/// The serving pod: prism-node with the model (and adapters) mounted or fetched, resources,
/// probes, TLS when `spec.tls` is set, restricted security. Returns whether it serves HTTPS.
fn node_pod(mn: &ModalityNode, cfg: &OperatorConfig) -> Result<(PodSpec, bool)> {
    let name = mn.name_any();
    let spec = &mn.spec;
    let image = cfg.node_image_for(spec);
    let sc = restricted_container_sc();
    let model = model_source(&spec.model, &image, &sc, &cfg.insecure_registries)?;

    let r = &spec.resources;
    let resources = pod_resources(r.cpu.as_deref(), r.memory.as_deref(), &r.gpu.resource_name, r.gpu.count);

    let adapters = adapter_sources(&spec.model)?;
    let mut args = spec.server_args(
        &name,
        &format!("0.0.0.0:{HTTP_PORT}"),
        Some(&format!("0.0.0.0:{GRPC_PORT}")),
        &model.uri,
        &adapters.paths,
    );
    // A replaced or deleted pod keeps answering while routers' tables catch up (a promoted
    // canary and the rolled stable pod go at once).
    args.extend(["--shutdown-delay-s".into(), NODE_SHUTDOWN_DELAY_S.into()]);

    let mut mounts = model.mounts.clone();
    mounts.extend(adapters.mounts);
    mounts.push(tmp_mount());
    let mut volumes = model.volumes.clone();
    volumes.extend(adapters.volumes);
    volumes.push(tmp_volume());
    let tls = spec.tls.is_some();
    if let Some(t) = &spec.tls {
        args.extend([
            "--tls-cert".into(),
            format!("{TLS_DIR}/tls.crt"),
            "--tls-key".into(),
            format!("{TLS_DIR}/tls.key"),
        ]);
        let (volume, mount) = secret_volume("tls", t.secret_name.clone(), &[], TLS_DIR);
        volumes.push(volume);
        mounts.push(mount);
    }

    let container = Container {
        name: "node".into(),
        image: Some(image),
        image_pull_policy: cfg.image_pull_policy.clone(),
        args: Some(args),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: HTTP_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("grpc".into()),
                container_port: GRPC_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        env: Some(vec![EnvVar { name: "PRISM_NODE_NAME".into(), value: Some(name.clone()), ..Default::default() }]),
        resources,
        // /ready turns true only after the model is loaded and warmed, so the pod leaves the
        // routing table until then; /live fails only when the process is wedged.
        readiness_probe: Some(http_probe("/ready", 2, 1, tls)),
        liveness_probe: Some(Probe { initial_delay_seconds: Some(10), ..http_probe("/live", 10, 3, tls) }),
        security_context: Some(sc),
        volume_mounts: Some(mounts),
        // A crash's last log line reaches the ModalityNode's conditions (pod_health).
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };

    let pod_spec = PodSpec {
        containers: vec![container],
        init_containers: model.init.map(|c| vec![c]),
        volumes: Some(volumes),
        node_selector: (!spec.resources.node_selector.is_empty()).then(|| spec.resources.node_selector.clone()),
        tolerations: (!spec.resources.tolerations.is_empty()).then(|| spec.resources.tolerations.clone()),
        runtime_class_name: spec.resources.runtime_class_name.clone(),
        security_context: Some(restricted_pod_sc()),
        // Pods talk to nothing in the API: no token mounted.
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        ..Default::default()
    };

    Ok((pod_spec, tls))
}

/// The stable Deployment, or the canary's (its own name, and a track label on its pods and
/// selector so the two never adopt each other's pods).
fn node_deployment(mn: &ModalityNode, pod_spec: PodSpec, tls: bool, replicas: i32, canary: bool) -> Result<Deployment> {
    let name = mn.name_any();
    let mut pod_labels = object_labels(mn);
    let mut deploy_selector = selector_labels(&name);
    let deploy_name = if canary {
        for l in [&mut pod_labels, &mut deploy_selector] {
            l.insert(labels::TRACK.to_string(), labels::TRACK_CANARY.to_string());
        }
        canary_name(&name)
    } else {
        name.clone()
    };
    let mut deploy_meta = meta(mn, deploy_name)?;
    if canary {
        // Not a child the node controller's `.owns()` maps by the stable name; the component
        // label still selects it for the watch.
        deploy_meta
            .labels
            .get_or_insert_with(Default::default)
            .insert(labels::TRACK.into(), labels::TRACK_CANARY.into());
    }
    Ok(Deployment {
        metadata: deploy_meta,
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector { match_labels: Some(deploy_selector), ..Default::default() },
            // Surge, never drop below the desired count: GPU capacity may allow only one extra.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    // How routers reach the pod; the operator's pod index reads it back.
                    annotations: tls.then(|| BTreeMap::from([(labels::SCHEME.to_string(), "https".to_string())])),
                    ..Default::default()
                }),
                spec: Some(pod_spec),
            },
            ..Default::default()
        }),
        status: None,
    })
}

fn node_service(mn: &ModalityNode) -> Result<Service> {
    let name = mn.name_any();
    Ok(Service {
        metadata: meta(mn, name.clone())?,
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(&name)),
            ports: Some(vec![
                ServicePort {
                    name: Some("http".into()),
                    port: HTTP_PORT,
                    target_port: Some(IntOrString::String("http".into())),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                },
                ServicePort {
                    name: Some("grpc".into()),
                    port: GRPC_PORT,
                    target_port: Some(IntOrString::String("grpc".into())),
                    protocol: Some("TCP".into()),
                    app_protocol: Some("kubernetes.io/h2c".into()),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    })
}

fn node_pdb(mn: &ModalityNode) -> Result<PodDisruptionBudget> {
    let name = mn.name_any();
    Ok(PodDisruptionBudget {
        metadata: meta(mn, name.clone())?,
        spec: Some(PodDisruptionBudgetSpec {
            // One voluntary eviction at a time keeps a modality served during node drains.
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector { match_labels: Some(selector_labels(&name)), ..Default::default() }),
            ..Default::default()
        }),
        status: None,
    })
}

/// ` (and N more pods)` when several pods have problems.
fn more_pods(problems: &[PodProblem]) -> String {
    match problems.len() {
        0 | 1 => String::new(),
        n => format!(" (and {} more pods)", n - 1),
    }
}

/// The node controller's status (its whole server-side apply body, see
/// [`prism_api::status_writers`]) from the observed Deployment (None: not created yet) and what
/// its pods report (`problems`, from the pod index). Conditions come from one builder per
/// source: the rollout, the Deployment, the adaptation run.
pub fn status(
    mn: &ModalityNode,
    deploy: Option<&Deployment>,
    problems: &[PodProblem],
    spec_error: Option<&str>,
    now: &str,
) -> NodeControllerStatus {
    let name = mn.name_any();
    let old = mn.status.clone().unwrap_or_default();
    let ds = deploy.and_then(|d| d.status.clone()).unwrap_or_default();
    let serving_rev = &crate::rollout::serving_model(&mn.spec, Some(&old)).revision;
    // The rollout first: a canary or a rolled-back spec says so where users look first.
    let mut sources = vec![
        spec_conditions(spec_error, deploy.is_some()),
        crate::rollout::conditions(&mn.spec, &old),
        deployment_conditions(&name, deploy, problems, serving_rev),
    ];
    if mn.spec.adaptation.is_some() {
        sources.push(vec![crate::adaptation::condition(old.adaptation.as_ref())]);
    }
    let conditions = condition::merge(&old.conditions, condition::combine(sources), now, mn.metadata.generation);
    NodeControllerStatus {
        observed_generation: mn.metadata.generation,
        replicas: ds.replicas.unwrap_or(0),
        ready_replicas: ds.ready_replicas.unwrap_or(0),
        selector: Some(selector_string(&name)),
        current_revision: old.current_revision.clone().or_else(|| Some(mn.spec.model.revision.clone())),
        canary: old.canary,
        history: old.history,
        adaptation: old.adaptation,
        conditions,
    }
}

/// A spec the operator cannot turn into objects (the API server's CEL rules let it through: an
/// object stored under an older CRD, or a check only the operator can make): nothing is applied,
/// and Ready and Degraded say why.
fn spec_conditions(spec_error: Option<&str>, deployed: bool) -> Vec<Condition> {
    let Some(why) = spec_error else { return Vec::new() };
    let what_runs = if deployed { "the Deployment keeps running the last valid spec" } else { "nothing was created" };
    let msg = format!("{why}; {what_runs}. Fix the spec (`kubectl edit mn`)");
    vec![
        Condition::new(types::READY, ConditionStatus::False, "InvalidSpec", msg.clone()),
        Condition::new(types::DEGRADED, ConditionStatus::True, "InvalidSpec", msg),
    ]
}

/// Progressing, Available, Ready and Degraded as the node's Deployment and its pods show them:
/// a pod that cannot run names the cause in Ready and Degraded.
fn deployment_conditions(
    name: &str,
    deploy: Option<&Deployment>,
    problems: &[PodProblem],
    serving_rev: &str,
) -> Vec<Condition> {
    let desired = deploy.and_then(|d| d.spec.as_ref()).and_then(|s| s.replicas).unwrap_or(0);
    let ds = deploy.and_then(|d| d.status.clone()).unwrap_or_default();
    let replicas = ds.replicas.unwrap_or(0);
    let ready = ds.ready_replicas.unwrap_or(0);
    let updated = ds.updated_replicas.unwrap_or(0);
    let available = ds.available_replicas.unwrap_or(0);
    let deploy_gen_seen = match deploy {
        Some(d) => ds.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0),
        None => false,
    };
    let dcond = |t: &str| ds.conditions.as_ref().and_then(|cs| cs.iter().find(|c| c.type_ == t).cloned());
    let replica_failure = dcond("ReplicaFailure").filter(|c| c.status == "True");
    let deadline_exceeded = dcond("Progressing").filter(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded"));

    let mut conds = Vec::new();
    let rolling = deploy.is_none() || !deploy_gen_seen || updated < desired || replicas > updated;
    conds.push(if rolling {
        Condition::new(
            types::PROGRESSING,
            ConditionStatus::True,
            "RollingOut",
            format!("Deployment {name}: {updated}/{desired} replicas on revision {serving_rev}"),
        )
    } else {
        Condition::new(
            types::PROGRESSING,
            ConditionStatus::False,
            "RolloutComplete",
            format!("Deployment {name} runs revision {serving_rev}"),
        )
    });
    let avail_ok = available > 0 || desired == 0;
    conds.push(Condition::new(
        types::AVAILABLE,
        ConditionStatus::from_bool(avail_ok),
        if avail_ok { "ReplicasAvailable" } else { "NoReplicaAvailable" },
        format!("{available} of {desired} replicas of Deployment {name} available"),
    ));
    let ready_ok = deploy.is_some() && ready >= desired && deploy_gen_seen;
    conds.push(if ready_ok && desired == 0 {
        Condition::new(
            types::READY,
            ConditionStatus::True,
            "ScaledToZero",
            format!("Deployment {name} is scaled to zero"),
        )
    } else if ready_ok {
        Condition::new(
            types::READY,
            ConditionStatus::True,
            "ReplicasReady",
            format!("{ready}/{desired} replicas ready"),
        )
    } else if let Some(p) = problems.first() {
        Condition::new(
            types::READY,
            ConditionStatus::False,
            &p.reason,
            format!("{ready}/{desired} replicas ready; {}{}", p.describe(), more_pods(problems)),
        )
    } else {
        Condition::new(
            types::READY,
            ConditionStatus::False,
            if deploy.is_none() { "DeploymentMissing" } else { "ReplicasNotReady" },
            format!(
                "{ready}/{desired} replicas of Deployment {name} ready; inspect `kubectl describe pods -l {}`",
                selector_string(name)
            ),
        )
    });
    let degraded = if let Some(f) = replica_failure {
        Some(("ReplicaFailure", format!("Deployment {name} cannot create pods: {}", f.message.unwrap_or_default())))
    } else if let Some(p) = problems.first().filter(|_| ready < desired) {
        Some((p.reason.as_str(), format!("{}{}", p.describe(), more_pods(problems))))
    } else if let Some(p) = deadline_exceeded {
        Some(("ProgressDeadlineExceeded", format!("Deployment {name}: {}", p.message.unwrap_or_default())))
    } else if !rolling && ready < desired {
        Some(("ReplicasUnavailable", format!("only {ready}/{desired} replicas of Deployment {name} ready")))
    } else {
        None
    };
    conds.push(match degraded {
        Some((reason, msg)) => Condition::new(types::DEGRADED, ConditionStatus::True, reason, msg),
        None => Condition::new(types::DEGRADED, ConditionStatus::False, "AsExpected", ""),
    });
    conds
}

#[cfg(test)]
pub(crate) mod tests;
