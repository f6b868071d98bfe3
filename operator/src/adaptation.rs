//! Pure core of `spec.adaptation` (issue 14): when a distributed fine-tuning run is due, the
//! standard PyTorch objects that run it (an Indexed Job of `torchrun` workers plus the headless
//! Service their rendezvous resolves through, and a claim for checkpoints and results), progress
//! read back from the Job, and the new model revision a finished run produces. No client here:
//! the controller ([`crate::controller`]) reads the cluster and Prometheus and applies the result.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ObjectFieldSelector, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PersistentVolumeClaimVolumeSource, PodSpec, PodTemplateSpec, Service, ServicePort,
    ServiceSpec, Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use prism_api::condition::{types, Condition, ConditionStatus};
use prism_api::labels;
use prism_api::node::{AdaptationSpec, AdaptationStatus, ModalityNode, ModelSpec, Sharding, ADAPT_REQUEST_ANNOTATION};
use prism_api::pipeline::RouterAuth;
use prism_api::MultimodalPipeline;

use crate::pipeline::{router_name, AUTH_DIR, ROUTER_PORT};
use crate::workload::{
    model_source, owned_meta, pod_resources, restricted_container_sc, restricted_pod_sc, secret_volume, tmp_mount,
    tmp_volume,
};
use crate::{OperatorConfig, Result};

/// Port torchrun's static rendezvous (rank 0's TCPStore) listens on in worker 0.
pub const RENDEZVOUS_PORT: i32 = 29500;
/// Where the training claim is mounted in the workers.
pub const TRAIN_DIR: &str = "/train";
/// The training script inside the `prism-train` image (`train/Dockerfile`).
pub const TRAIN_SCRIPT: &str = "/opt/prism/prism_train.py";
/// Component label value of training objects.
pub const COMPONENT: &str = "adaptation";

/// `status.adaptation.phase` values.
pub mod phase {
    pub const RUNNING: &str = "Running";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const FAILED: &str = "Failed";
    /// A run is due but something outside the run blocks it (a canary, no pipeline, ...).
    pub const WAITING: &str = "Waiting";
}

/// Job and headless Service name of run `run` (also the pods' hostname prefix).
pub fn job_name(node: &str, run: u32) -> String {
    format!("{node}-train-{run}")
}

/// The claim behind `/train`: the spec's, or `<node>-train` created by the operator.
pub fn claim_name(mn: &ModalityNode, spec: &AdaptationSpec) -> String {
    spec.storage.claim_name.clone().unwrap_or_else(|| format!("{}-train", mn.name_any()))
}

/// Folder of run `run`'s result inside the claim; one folder per node, so nodes can share a claim.
fn output_path(node: &str, run: u32) -> String {
    format!("out/{node}/run-{run}")
}

/// Whether `model` is a result of this node's adaptation (a folder under its claim's `out/`).
fn is_output(mn: &ModalityNode, spec: &AdaptationSpec, model: &ModelSpec) -> bool {
    model.uri.starts_with(&format!("pvc://{}/out/{}/", claim_name(mn, spec), mn.name_any()))
}

/// The model a run fine-tunes: the spec's, unless the spec already serves an earlier run's
/// result; then the base that run started from, so adapters never stack.
pub fn base_model(mn: &ModalityNode, spec: &AdaptationSpec) -> ModelSpec {
    let recorded = mn.status.as_ref().and_then(|s| s.adaptation.as_ref()).and_then(|a| a.base_model.clone());
    match recorded {
        Some(base) if is_output(mn, spec, &mn.spec.model) => base,
        _ => mn.spec.model.clone(),
    }
}

/// The model a successful run produced: the base's architecture and attention, the run's folder
/// on the claim (base files + the LoRA adapter, which prism-node merges at load), and a new
/// revision label so the change goes out through `spec.rollout`.
pub fn output_model(mn: &ModalityNode, spec: &AdaptationSpec, base: &ModelSpec, run: u32) -> ModelSpec {
    let suffix = format!("-lora{run}");
    // A revision is a label value: at most 63 characters, ending alphanumeric.
    let keep = 63usize.saturating_sub(suffix.len());
    let stem: String = base.revision.chars().take(keep).collect();
    ModelSpec {
        uri: format!("pvc://{}/{}", claim_name(mn, spec), output_path(&mn.name_any(), run)),
        revision: format!("{}{suffix}", stem.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())),
        adapters: vec![],
        ..base.clone()
    }
}

/// Why a run is due now, or None. `request`: the node's `prism.dev/adapt-request` annotation;
/// `corrections_total`: the node's corrections counter summed over routers (None: unknown).
pub fn due(
    spec: &AdaptationSpec,
    request: Option<&str>,
    last: Option<&AdaptationStatus>,
    corrections_total: Option<f64>,
) -> Option<String> {
    if let Some(r) = request.filter(|r| !r.is_empty()) {
        if last.and_then(|a| a.last_request.as_deref()) != Some(r) {
            return Some(format!("requested ({ADAPT_REQUEST_ANNOTATION}={r})"));
        }
    }
    let every = spec.trigger.every_corrections?;
    let total = corrections_total?;
    // Counters restart with their router: a total below the baseline means it was reset.
    let baseline = last.and_then(|a| a.corrections_at_start).filter(|b| *b <= total).unwrap_or(0.0);
    let new = total - baseline;
    if new >= f64::from(every) {
        let since = match last.map(|a| a.run).filter(|r| *r > 0) {
            Some(r) => format!("since run {r}"),
            None => "so far".to_string(),
        };
        return Some(format!("{new:.0} corrections {since} >= trigger.everyCorrections {every}"));
    }
    None
}

/// Why a due run cannot start yet (the run waits, the node says why), or None.
pub fn blocker(mn: &ModalityNode, base: &ModelSpec) -> Option<String> {
    if let Some(c) = mn.status.as_ref().and_then(|s| s.canary.as_ref()) {
        return Some(format!("the canary of revision {} is still being analysed; the run starts after it", c.revision));
    }
    if base.uri.starts_with("file://") {
        return Some(format!(
            "model.uri {} is a path inside the node image, which training pods cannot read; \
             serve the model from pvc://, hf:// or oci:// to adapt it",
            base.uri
        ));
    }
    let node = mn.name_any();
    if job_name(&node, 999_999).len() > 63 {
        return Some(format!("node name {node} is too long for a Job name (at most 48 characters)"));
    }
    None
}

/// How the workers reach the corrections: the pipeline router's export.
#[derive(Clone, Debug, PartialEq)]
pub struct CorrectionsSource {
    pub url: String,
    /// The router's token Secret (key `tokens`), None when the router runs without auth.
    pub token_secret: Option<String>,
}

/// The pipeline whose router serves the corrections: `spec.pipeline`, else the only one in the
/// namespace that uses the node. `Err` says what to set.
pub fn corrections_source(
    mn: &ModalityNode,
    spec: &AdaptationSpec,
    pipelines: &[MultimodalPipeline],
) -> Result<CorrectionsSource, String> {
    let node = mn.name_any();
    let ns = mn.namespace().unwrap_or_default();
    let pipeline = match &spec.pipeline {
        Some(p) => pipelines
            .iter()
            .find(|x| x.name_any() == *p)
            .ok_or_else(|| format!("adaptation.pipeline {p} does not exist in namespace {ns}"))?,
        None => {
            let using: Vec<&MultimodalPipeline> =
                pipelines.iter().filter(|p| p.spec.nodes.iter().any(|n| n.name == node)).collect();
            match using.as_slice() {
                [one] => *one,
                [] => return Err(format!("no pipeline in namespace {ns} uses node {node}: set adaptation.pipeline")),
                many => {
                    let names: Vec<String> = many.iter().map(|p| p.name_any()).collect();
                    return Err(format!(
                        "pipelines {} all use node {node}: set adaptation.pipeline to the one whose corrections train it",
                        names.join(", ")
                    ));
                }
            }
        }
    };
    if !pipeline.spec.memory.enabled {
        return Err(format!("pipeline {} has memory disabled, so it records no corrections", pipeline.name_any()));
    }
    let name = pipeline.name_any();
    Ok(CorrectionsSource {
        url: format!("http://{}.{ns}.svc:{ROUTER_PORT}/v1/memory/corrections", router_name(&name)),
        token_secret: pipeline.spec.auth.secret_for(&name),
    })
}

/// Folds the run's Job into its status; returns the phase it reached when the run just ended.
pub fn track(st: &mut AdaptationStatus, job: Option<&Job>, now: &str) -> Option<&'static str> {
    let Some(job) = job else {
        st.phase = phase::FAILED.into();
        st.message = format!("Job {} disappeared before it finished", st.job.as_deref().unwrap_or("?"));
        st.completion_time = Some(now.to_string());
        return Some(phase::FAILED);
    };
    let js = job.status.clone().unwrap_or_default();
    st.active = js.active.unwrap_or(0);
    st.ready = js.ready.unwrap_or(0);
    st.succeeded = js.succeeded.unwrap_or(0);
    st.failed = js.failed.unwrap_or(0);
    let cond = |t: &str| js.conditions.as_ref()?.iter().find(|c| c.type_ == t && c.status == "True").cloned();
    if cond("Complete").is_some() {
        st.phase = phase::SUCCEEDED.into();
        st.message = format!("{} of {} workers finished", st.succeeded, st.workers);
        st.completion_time = Some(now.to_string());
        return Some(phase::SUCCEEDED);
    }
    if let Some(c) = cond("Failed") {
        st.phase = phase::FAILED.into();
        st.message = format!(
            "Job {} failed ({}): {}; inspect `kubectl logs -l {}={}`",
            job.name_any(),
            c.reason.unwrap_or_default(),
            c.message.unwrap_or_default(),
            labels::TRAIN_RUN,
            job.name_any()
        );
        st.completion_time = Some(now.to_string());
        return Some(phase::FAILED);
    }
    st.message = format!(
        "{} of {} workers running ({} ready), {} finished, {} failed",
        st.active, st.workers, st.ready, st.succeeded, st.failed
    );
    None
}

/// The node's `Training` condition (present while `spec.adaptation` is set).
pub fn condition(st: Option<&AdaptationStatus>) -> Condition {
    let Some(a) = st else {
        return Condition::new(
            types::TRAINING,
            ConditionStatus::False,
            "NoRunYet",
            format!(
                "no run yet: one starts on trigger.everyCorrections or `prism adapt NODE` ({ADAPT_REQUEST_ANNOTATION})"
            ),
        );
    };
    let running = a.phase == phase::RUNNING;
    let reason = match a.phase.as_str() {
        phase::RUNNING => "Running",
        phase::SUCCEEDED => "Succeeded",
        phase::FAILED => "Failed",
        _ => "Waiting",
    };
    let msg = if a.run > 0 && a.phase != phase::WAITING {
        format!("run {}: {}", a.run, a.message)
    } else {
        a.message.clone()
    };
    Condition::new(types::TRAINING, ConditionStatus::from_bool(running), reason, msg)
}

/// The objects of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainObjects {
    pub job: Job,
    pub service: Service,
    /// The claim to create when it does not exist (None: `storage.claimName` names one).
    pub claim: Option<PersistentVolumeClaim>,
}

fn train_labels(node: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (labels::NAME.to_string(), "prism-train".to_string()),
        (labels::INSTANCE.to_string(), node.to_string()),
        (labels::COMPONENT.to_string(), COMPONENT.to_string()),
        (labels::MANAGED_BY.to_string(), labels::MANAGED_BY_VALUE.to_string()),
        (labels::ADAPTS.to_string(), node.to_string()),
    ])
}

fn train_meta(mn: &ModalityNode, name: String, extra: &[(&str, &str)]) -> Result<ObjectMeta> {
    let mut l = train_labels(&mn.name_any());
    for (k, v) in extra {
        l.insert((*k).to_string(), (*v).to_string());
    }
    owned_meta(mn, name, l)
}

/// The `torchrun` command line of every worker: static rendezvous on worker 0 through the
/// headless Service (`<job>-0.<service>`), node rank = the Job completion index.
pub fn torchrun_args(
    spec: &AdaptationSpec,
    job: &str,
    model_dir: &str,
    node: &str,
    run: u32,
    source: &CorrectionsSource,
) -> Vec<String> {
    let procs = spec.gpus_per_worker.max(1);
    let mut a: Vec<String> = [
        "--nnodes".to_string(),
        spec.workers.to_string(),
        "--nproc_per_node".into(),
        procs.to_string(),
        // Expanded by the kubelet from the env var below (the Job's completion index).
        "--node_rank".into(),
        "$(JOB_COMPLETION_INDEX)".into(),
        "--master_addr".into(),
        format!("{job}-0.{job}"),
        "--master_port".into(),
        RENDEZVOUS_PORT.to_string(),
        TRAIN_SCRIPT.into(),
        "--model".into(),
        model_dir.into(),
        "--corrections".into(),
        source.url.clone(),
        "--output".into(),
        format!("{TRAIN_DIR}/{}", output_path(node, run)),
        "--checkpoint-dir".into(),
        format!("{TRAIN_DIR}/checkpoints/{node}/run-{run}"),
        // The result must not point into the worker's own model volume.
        "--copy-base".into(),
        "--epochs".into(),
        spec.epochs.to_string(),
        "--batch-size".into(),
        spec.batch_size.to_string(),
        "--lr".into(),
        spec.learning_rate.to_string(),
        "--lora-r".into(),
        spec.lora.rank.to_string(),
        "--lora-alpha".into(),
        spec.lora.alpha.to_string(),
        "--target-modules".into(),
        spec.lora.target_modules.join(","),
    ]
    .into();
    if source.token_secret.is_some() {
        a.extend(["--corrections-token-file".into(), format!("{AUTH_DIR}/{}", RouterAuth::TOKENS_KEY)]);
    }
    if let Some(w) = spec.sliding_window {
        a.extend(["--sliding-window".into(), w.to_string()]);
    }
    if spec.sharding == Sharding::Fsdp {
        a.push("--fsdp".into());
    }
    a
}

/// Job, headless Service and claim of run `run`, fine-tuning `base`.
pub fn objects(
    mn: &ModalityNode,
    cfg: &OperatorConfig,
    spec: &AdaptationSpec,
    run: u32,
    base: &ModelSpec,
    source: &CorrectionsSource,
) -> Result<TrainObjects> {
    let job = job_name(&mn.name_any(), run);
    let claim = claim_name(mn, spec);
    let pod = Worker { mn, cfg, spec, run, job: &job, claim: &claim }.pod(base, source)?;
    Ok(TrainObjects {
        job: run_job(mn, spec, &job, pod)?,
        service: rendezvous_service(mn, &job)?,
        claim: run_claim(mn, spec, claim)?,
    })
}

/// One run's worker, as every index of the Job runs it.
struct Worker<'a> {
    mn: &'a ModalityNode,
    cfg: &'a OperatorConfig,
    spec: &'a AdaptationSpec,
    run: u32,
    job: &'a str,
    claim: &'a str,
}

impl Worker<'_> {
    /// `torchrun` on the train image with the base model (fetched or mounted as the serving pods
    /// get it), the run's claim, shared memory, and the router token that reads corrections.
    fn pod(&self, base: &ModelSpec, source: &CorrectionsSource) -> Result<PodSpec> {
        let Worker { mn, cfg, spec, run, job, claim } = *self;
        let node = mn.name_any();
        let claim = claim.to_string();
        let job = job.to_string();
        let sc = restricted_container_sc();
        let node_image = cfg.node_image_for(&mn.spec);
        // The same fetch/mount the serving pods use, so whatever the node can load, training reads.
        let model = model_source(base, &node_image, &sc, &cfg.insecure_registries)?;
        let model_dir = model.uri.strip_prefix("file://").unwrap_or(&model.uri).to_string();

        let mut mounts = model.mounts.clone();
        mounts.push(tmp_mount());
        mounts.push(VolumeMount { name: "train".into(), mount_path: TRAIN_DIR.into(), ..Default::default() });
        // NCCL and the DataLoader use shared memory; the runtime's default /dev/shm is 64 MiB.
        mounts.push(VolumeMount { name: "dshm".into(), mount_path: "/dev/shm".into(), ..Default::default() });
        let mut volumes = model.volumes.clone();
        volumes.push(tmp_volume());
        volumes.push(Volume {
            name: "train".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: None,
            }),
            ..Default::default()
        });
        volumes.push(Volume {
            name: "dshm".into(),
            empty_dir: Some(EmptyDirVolumeSource { medium: Some("Memory".into()), size_limit: None }),
            ..Default::default()
        });
        if let Some(secret) = &source.token_secret {
            let (volume, mount) = secret_volume("auth", secret.clone(), &[RouterAuth::TOKENS_KEY], AUTH_DIR);
            volumes.push(volume);
            mounts.push(mount);
        }

        let gpus = spec.gpus_per_worker;
        let resources =
            pod_resources(spec.cpu.as_deref(), spec.memory.as_deref(), &mn.spec.resources.gpu.resource_name, gpus);

        let env = vec![
            EnvVar {
                name: "JOB_COMPLETION_INDEX".into(),
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.annotations['batch.kubernetes.io/job-completion-index']".into(),
                        api_version: None,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
            // Read-only root: caches of torch/transformers go to the /tmp emptyDir.
            EnvVar { name: "HOME".into(), value: Some("/tmp".into()), ..Default::default() },
            EnvVar { name: "PYTHONUNBUFFERED".into(), value: Some("1".into()), ..Default::default() },
        ];
        let container = Container {
            name: "train".into(),
            image: Some(spec.image.clone().unwrap_or_else(|| cfg.train_image.clone())),
            image_pull_policy: cfg.image_pull_policy.clone(),
            command: Some(vec!["torchrun".into()]),
            args: Some(torchrun_args(spec, &job, &model_dir, &node, run, source)),
            ports: Some(vec![ContainerPort {
                name: Some("rendezvous".into()),
                container_port: RENDEZVOUS_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            env: Some(env),
            resources,
            security_context: Some(sc),
            volume_mounts: Some(mounts),
            ..Default::default()
        };
        // GPU workers run where the node's GPUs are (its nodeSelector, tolerations, runtime class);
        // CPU workers go wherever the scheduler likes.
        let on_gpus = gpus > 0;
        let r = &mn.spec.resources;
        let pod_spec = PodSpec {
            containers: vec![container],
            init_containers: model.init.map(|c| vec![c]),
            volumes: Some(volumes),
            restart_policy: Some("Never".into()),
            // With the headless Service of the same name, worker i resolves as `<job>-i.<job>`.
            subdomain: Some(job.clone()),
            node_selector: (on_gpus && !r.node_selector.is_empty()).then(|| r.node_selector.clone()),
            tolerations: (on_gpus && !r.tolerations.is_empty()).then(|| r.tolerations.clone()),
            runtime_class_name: if on_gpus { r.runtime_class_name.clone() } else { None },
            security_context: Some(restricted_pod_sc()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            ..Default::default()
        };
        Ok(pod_spec)
    }
}

/// The Indexed Job of `spec.workers` completions running `pod`.
fn run_job(mn: &ModalityNode, spec: &AdaptationSpec, job: &str, pod_spec: PodSpec) -> Result<Job> {
    let node = mn.name_any();
    let job = job.to_string();
    let run_label = [(labels::TRAIN_RUN, job.as_str())];
    Ok(Job {
        metadata: train_meta(mn, job.clone(), &run_label)?,
        spec: Some(JobSpec {
            completions: Some(spec.workers as i32),
            parallelism: Some(spec.workers as i32),
            completion_mode: Some("Indexed".into()),
            backoff_limit: Some(spec.backoff_limit),
            active_deadline_seconds: spec.active_deadline_seconds,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some({
                        let mut l = train_labels(&node);
                        l.insert(labels::TRAIN_RUN.into(), job.clone());
                        l
                    }),
                    ..Default::default()
                }),
                spec: Some(pod_spec),
            },
            ..Default::default()
        }),
        status: None,
    })
}

/// The headless Service through which workers find worker 0 (the rendezvous).
fn rendezvous_service(mn: &ModalityNode, job: &str) -> Result<Service> {
    let job = job.to_string();
    let run_label = [(labels::TRAIN_RUN, job.as_str())];
    Ok(Service {
        metadata: train_meta(mn, job.clone(), &run_label)?,
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            // Workers must resolve worker 0 before any of them is ready.
            publish_not_ready_addresses: Some(true),
            selector: Some(BTreeMap::from([(labels::TRAIN_RUN.to_string(), job.clone())])),
            ports: Some(vec![ServicePort {
                name: Some("rendezvous".into()),
                port: RENDEZVOUS_PORT,
                target_port: Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(RENDEZVOUS_PORT)),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    })
}

/// The run's claim for checkpoints and results, unless the spec names an existing one.
fn run_claim(mn: &ModalityNode, spec: &AdaptationSpec, claim: String) -> Result<Option<PersistentVolumeClaim>> {
    Ok(match &spec.storage.claim_name {
        Some(_) => None,
        None => Some(PersistentVolumeClaim {
            metadata: train_meta(mn, claim, &[])?,
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec![spec.storage.access_mode.clone()]),
                storage_class_name: spec.storage.storage_class_name.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([("storage".to_string(), Quantity(spec.storage.size.clone()))])),
                    limits: None,
                }),
                ..Default::default()
            }),
            status: None,
        }),
    })
}

/// What a run starts from: why, the request and counter it acts on, the model it fine-tunes.
pub struct RunStart<'a> {
    pub trigger: String,
    pub request: Option<&'a str>,
    pub corrections_total: Option<f64>,
    pub base: ModelSpec,
}

/// The status of a run that starts now.
pub fn started(
    previous: Option<&AdaptationStatus>,
    spec: &AdaptationSpec,
    node: &str,
    start: RunStart<'_>,
    now: &str,
) -> AdaptationStatus {
    let RunStart { trigger, request, corrections_total, base } = start;
    let run = previous.map(|p| p.run).unwrap_or(0) + 1;
    AdaptationStatus {
        phase: phase::RUNNING.into(),
        run,
        job: Some(job_name(node, run)),
        workers: spec.workers,
        message: format!("created Job {} ({} workers)", job_name(node, run), spec.workers),
        trigger,
        start_time: Some(now.to_string()),
        // Kept as they were when the run was not the one acting on them.
        corrections_at_start: corrections_total.or_else(|| previous.and_then(|p| p.corrections_at_start)),
        last_request: request.map(str::to_string).or_else(|| previous.and_then(|p| p.last_request.clone())),
        base_model: Some(base),
        output_revision: previous.and_then(|p| p.output_revision.clone()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
