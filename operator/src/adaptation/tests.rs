use super::*;
use crate::node::tests::{cfg, mk_node};
use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
use prism_api::node::ModalityNodeStatus;
use prism_api::pipeline::MultimodalPipelineSpec;

fn adapting(uri: &str, adaptation: serde_json::Value) -> (ModalityNode, AdaptationSpec) {
    let mut mn = mk_node("text", "text", uri);
    let spec: AdaptationSpec = serde_json::from_value(adaptation).unwrap();
    mn.spec.adaptation = Some(spec.clone());
    (mn, spec)
}

fn pipeline(name: &str, nodes: &[&str], memory: bool, auth: bool) -> MultimodalPipeline {
    let nodes: Vec<serde_json::Value> = nodes.iter().map(|n| serde_json::json!({"name": n})).collect();
    let spec: MultimodalPipelineSpec = serde_json::from_value(serde_json::json!({
        "nodes": nodes,
        "memory": {"enabled": memory},
        "auth": {"insecureNoAuth": !auth},
    }))
    .unwrap();
    let mut p = MultimodalPipeline::new(name, spec);
    p.metadata.namespace = Some("ns".into());
    p
}

fn source() -> CorrectionsSource {
    CorrectionsSource { url: "http://mm-router.ns.svc:8080/v1/memory/corrections".into(), token_secret: None }
}

fn arg<'a>(args: &'a [String], flag: &str) -> &'a str {
    let i = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("{flag} missing in {args:?}"));
    &args[i + 1]
}

#[test]
fn indexed_job_runs_torchrun_workers_on_the_nodes_gpus_with_rendezvous_on_worker_0() {
    let (mn, spec) = adapting(
        "hf://sentence-transformers/all-MiniLM-L6-v2",
        serde_json::json!({"workers": 3, "gpusPerWorker": 4, "cpu": "8", "memory": "64Gi",
                           "lora": {"rank": 16, "alpha": 32, "targetModules": ["query", "key", "value"]},
                           "epochs": 2, "slidingWindow": 64, "sharding": "fsdp"}),
    );
    let base = base_model(&mn, &spec);
    let o = objects(&mn, &cfg(), &spec, 2, &base, &source()).unwrap();
    let js = o.job.spec.as_ref().unwrap();
    assert_eq!(o.job.metadata.name.as_deref(), Some("text-train-2"));
    assert_eq!((js.completions, js.parallelism, js.completion_mode.as_deref()), (Some(3), Some(3), Some("Indexed")));
    assert_eq!(js.backoff_limit, Some(3));
    let ps = js.template.spec.as_ref().unwrap();
    assert_eq!(ps.subdomain.as_deref(), Some("text-train-2"), "pods resolve as <job>-<i>.<service>");
    assert_eq!(ps.restart_policy.as_deref(), Some("Never"));
    // GPU pool of the node: its selector, tolerations, runtime class; 4 GPUs per worker.
    assert_eq!(ps.node_selector, mn.spec.resources.node_selector.clone().into());
    assert_eq!(ps.tolerations.as_ref().map(Vec::len), Some(1));
    assert_eq!(ps.runtime_class_name.as_deref(), Some("nvidia"));
    let c = &ps.containers[0];
    assert_eq!(c.image.as_deref(), Some("prism-train:test"));
    assert_eq!(c.command.as_deref(), Some(&["torchrun".to_string()][..]));
    let lim = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(lim["nvidia.com/gpu"].0, "4");
    assert_eq!(lim["memory"].0, "64Gi");
    let args = c.args.as_ref().unwrap();
    assert_eq!(arg(args, "--nnodes"), "3");
    assert_eq!(arg(args, "--nproc_per_node"), "4");
    assert_eq!(arg(args, "--node_rank"), "$(JOB_COMPLETION_INDEX)");
    assert_eq!(arg(args, "--master_addr"), "text-train-2-0.text-train-2");
    assert_eq!(arg(args, "--master_port"), "29500");
    assert_eq!(arg(args, "--lora-r"), "16");
    assert_eq!(arg(args, "--target-modules"), "query,key,value");
    assert_eq!(arg(args, "--sliding-window"), "64");
    assert_eq!(arg(args, "--output"), "/train/out/text/run-2");
    assert_eq!(arg(args, "--checkpoint-dir"), "/train/checkpoints/text/run-2");
    assert_eq!(arg(args, "--model"), "/models");
    assert!(args.contains(&"--fsdp".to_string()) && args.contains(&"--copy-base".to_string()));
    assert!(!args.contains(&"--corrections-token-file".to_string()), "no auth, no token file");
    // The completion index reaches the env var the kubelet expands in the args.
    let env = c.env.as_ref().unwrap();
    let idx = env.iter().find(|e| e.name == "JOB_COMPLETION_INDEX").unwrap();
    let f = idx.value_from.as_ref().unwrap().field_ref.as_ref().unwrap();
    assert_eq!(f.field_path, "metadata.annotations['batch.kubernetes.io/job-completion-index']");
    // hf:// is fetched by prism-node's init container, as for serving pods.
    let init = &ps.init_containers.as_ref().unwrap()[0];
    // The fetch step runs the node's own image (the CUDA build: the node has a GPU).
    assert_eq!(init.image.as_deref(), Some("prism-node-cuda:test"));
    // Training pods never carry prism.dev/node: the endpoint index would route requests to them.
    let pod_labels = js.template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    assert!(!pod_labels.contains_key(labels::NODE));
    assert_eq!(pod_labels[labels::TRAIN_RUN], "text-train-2");

    let ss = o.service.spec.as_ref().unwrap();
    assert_eq!(ss.cluster_ip.as_deref(), Some("None"));
    assert_eq!(ss.publish_not_ready_addresses, Some(true));
    assert_eq!(ss.selector.as_ref().unwrap()[labels::TRAIN_RUN], "text-train-2");
    assert_eq!(o.service.metadata.name, o.job.metadata.name);

    let claim = o.claim.as_ref().unwrap();
    assert_eq!(claim.metadata.name.as_deref(), Some("text-train"));
    assert_eq!(claim.spec.as_ref().unwrap().access_modes.as_deref(), Some(&["ReadWriteMany".to_string()][..]));
    for obj in [&o.job.metadata, &o.service.metadata, &claim.metadata] {
        assert_eq!(obj.owner_references.as_ref().unwrap()[0].uid, "uid-1");
    }
}

#[test]
fn cpu_workers_use_gloo_without_gpu_requests_or_the_gpu_pool_and_mount_the_router_token() {
    let (mn, spec) = adapting(
        "pvc://models/minilm",
        serde_json::json!({"workers": 2, "gpusPerWorker": 0, "storage": {"claimName": "shared"}}),
    );
    let src = CorrectionsSource { token_secret: Some("mm-router-tokens".into()), ..source() };
    let o = objects(&mn, &cfg(), &spec, 1, &mn.spec.model, &src).unwrap();
    assert!(o.claim.is_none(), "an existing claim is used as is");
    let ps = o.job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert!(ps.node_selector.is_none() && ps.tolerations.is_none() && ps.runtime_class_name.is_none());
    let c = &ps.containers[0];
    assert!(c.resources.is_none());
    let args = c.args.as_ref().unwrap();
    assert_eq!(arg(args, "--nproc_per_node"), "1");
    assert_eq!(arg(args, "--model"), "/models/minilm");
    assert_eq!(arg(args, "--corrections-token-file"), "/etc/prism-auth/tokens");
    let vols = ps.volumes.as_ref().unwrap();
    let train = vols.iter().find(|v| v.name == "train").unwrap();
    assert_eq!(train.persistent_volume_claim.as_ref().unwrap().claim_name, "shared");
    let auth = vols.iter().find(|v| v.name == "auth").unwrap();
    assert_eq!(auth.secret.as_ref().unwrap().secret_name.as_deref(), Some("mm-router-tokens"));
}

#[test]
fn runs_are_due_on_request_and_every_n_corrections_counted_since_the_last_run() {
    let spec: AdaptationSpec =
        serde_json::from_value(serde_json::json!({"trigger": {"everyCorrections": 100}})).unwrap();
    assert_eq!(due(&spec, None, None, None), None, "Prometheus unknown: no automatic run");
    assert_eq!(due(&spec, None, None, Some(99.0)), None);
    assert!(due(&spec, None, None, Some(100.0)).unwrap().contains("100 corrections so far"));
    let last = AdaptationStatus { run: 1, corrections_at_start: Some(150.0), ..Default::default() };
    assert_eq!(due(&spec, None, Some(&last), Some(249.0)), None, "only 99 since run 1");
    assert!(due(&spec, None, Some(&last), Some(250.0)).unwrap().contains("since run 1"));
    // A router restart resets its counter: counted from zero again, not negative.
    assert_eq!(due(&spec, None, Some(&last), Some(40.0)), None);
    assert!(due(&spec, None, Some(&last), Some(120.0)).is_some());
    // A request is acted upon once.
    let manual: AdaptationSpec = serde_json::from_value(serde_json::json!({})).unwrap();
    assert_eq!(due(&manual, None, None, Some(1e9)), None, "no trigger: only on request");
    assert!(due(&manual, Some("2026-12-01T18:00:00Z"), None, None).unwrap().contains("requested"));
    let acted = AdaptationStatus { last_request: Some("2026-12-01T18:00:00Z".into()), ..Default::default() };
    assert_eq!(due(&manual, Some("2026-12-01T18:00:00Z"), Some(&acted), None), None);
    assert!(due(&manual, Some("2026-12-01T19:00:00Z"), Some(&acted), None).is_some());
}

fn job_with(active: i32, succeeded: i32, failed: i32, cond: Option<(&str, &str, &str)>) -> Job {
    Job {
        metadata: ObjectMeta { name: Some("text-train-1".into()), ..Default::default() },
        status: Some(JobStatus {
            active: Some(active),
            ready: Some(active),
            succeeded: Some(succeeded),
            failed: Some(failed),
            conditions: cond.map(|(t, r, m)| {
                vec![JobCondition {
                    type_: t.into(),
                    status: "True".into(),
                    reason: Some(r.into()),
                    message: Some(m.into()),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn progress_comes_from_the_job_and_its_end_is_reported_once() {
    let mut st = AdaptationStatus {
        phase: phase::RUNNING.into(),
        run: 1,
        job: Some("text-train-1".into()),
        workers: 2,
        ..Default::default()
    };
    assert_eq!(track(&mut st, Some(&job_with(2, 0, 0, None)), "t1"), None);
    assert_eq!((st.active, st.ready, st.succeeded), (2, 2, 0));
    assert!(st.message.starts_with("2 of 2 workers running"), "{}", st.message);
    let c = condition(Some(&st));
    assert_eq!((c.status, c.reason.as_str()), (ConditionStatus::True, "Running"));

    let mut failed = st.clone();
    let end = track(&mut failed, Some(&job_with(0, 0, 4, Some(("Failed", "BackoffLimitExceeded", "too many")))), "t2");
    assert_eq!(end, Some(phase::FAILED));
    assert!(failed.message.contains("BackoffLimitExceeded") && failed.message.contains("kubectl logs"));
    assert_eq!(condition(Some(&failed)).reason, "Failed");

    assert_eq!(track(&mut st, Some(&job_with(0, 2, 0, Some(("Complete", "", "")))), "t3"), Some(phase::SUCCEEDED));
    assert_eq!((st.phase.as_str(), st.succeeded, st.completion_time.as_deref()), ("Succeeded", 2, Some("t3")));

    let mut gone = AdaptationStatus { phase: phase::RUNNING.into(), job: Some("x".into()), ..Default::default() };
    assert_eq!(track(&mut gone, None, "t4"), Some(phase::FAILED));
    assert!(gone.message.contains("disappeared"));
}

#[test]
fn a_finished_run_becomes_a_new_revision_and_the_next_run_starts_from_the_same_base() {
    let (mut mn, spec) = adapting("pvc://models/minilm", serde_json::json!({}));
    let base = base_model(&mn, &spec);
    assert_eq!(base, mn.spec.model);
    let out = output_model(&mn, &spec, &base, 1);
    assert_eq!(out.uri, "pvc://text-train/out/text/run-1");
    assert_eq!(out.revision, "r2-lora1");
    assert_eq!(out.architecture, "bert");
    // Once the node serves run 1's output, run 2 trains from the recorded base again.
    mn.spec.model = out;
    mn.status = Some(ModalityNodeStatus {
        adaptation: Some(AdaptationStatus { base_model: Some(base.clone()), ..Default::default() }),
        ..Default::default()
    });
    assert_eq!(base_model(&mn, &spec), base);
    let out2 = output_model(&mn, &spec, &base_model(&mn, &spec), 2);
    assert_eq!(out2.revision, "r2-lora2", "no stacked suffixes");
    // A model the user set by hand is the new base.
    mn.spec.model.uri = "hf://org/other".into();
    assert_eq!(base_model(&mn, &spec).uri, "hf://org/other");
    // Revisions stay valid label values.
    let mut long = base.clone();
    long.revision = "x".repeat(63);
    assert_eq!(output_model(&mn, &spec, &long, 12).revision.len(), 63);
}

#[test]
fn runs_wait_with_a_reason_for_a_canary_an_unreadable_model_or_an_unknown_pipeline() {
    let (mut mn, spec) = adapting("file:///models/minilm", serde_json::json!({}));
    assert!(blocker(&mn, &mn.spec.model).unwrap().contains("pvc://, hf:// or oci://"));
    mn.spec.model.uri = "pvc://models/minilm".into();
    assert_eq!(blocker(&mn, &mn.spec.model), None);
    mn.status = Some(ModalityNodeStatus {
        canary: Some(prism_api::node::CanaryStatus {
            revision: "r3".into(),
            step: 0,
            weight: 10,
            step_started: "t".into(),
        }),
        ..Default::default()
    });
    assert!(blocker(&mn, &mn.spec.model).unwrap().contains("canary of revision r3"));

    let none: Vec<MultimodalPipeline> = vec![];
    assert!(corrections_source(&mn, &spec, &none).unwrap_err().contains("no pipeline"));
    let two = vec![pipeline("a", &["text"], true, false), pipeline("b", &["text"], true, false)];
    assert!(corrections_source(&mn, &spec, &two).unwrap_err().contains("a, b all use node text"));
    let one = vec![pipeline("mm", &["text", "vision"], true, true), pipeline("other", &["vision"], true, false)];
    let s = corrections_source(&mn, &spec, &one).unwrap();
    assert_eq!(s.url, "http://mm-router.ns.svc:8080/v1/memory/corrections");
    assert_eq!(s.token_secret.as_deref(), Some("mm-router-tokens"));
    let off = vec![pipeline("mm", &["text"], false, false)];
    assert!(corrections_source(&mn, &spec, &off).unwrap_err().contains("memory disabled"));
    let named: AdaptationSpec = serde_json::from_value(serde_json::json!({"pipeline": "b"})).unwrap();
    assert_eq!(corrections_source(&mn, &named, &two).unwrap().url, "http://b-router.ns.svc:8080/v1/memory/corrections");
    let missing: AdaptationSpec = serde_json::from_value(serde_json::json!({"pipeline": "zz"})).unwrap();
    assert!(corrections_source(&mn, &missing, &two).unwrap_err().contains("zz does not exist"));
}

#[test]
fn a_started_run_numbers_itself_and_keeps_the_trigger_baselines() {
    let (_, spec) = adapting("pvc://m/x", serde_json::json!({"workers": 2}));
    let base: ModelSpec =
        serde_json::from_value(serde_json::json!({"uri": "pvc://m/x", "architecture": "bert"})).unwrap();
    let req = |trigger: &str, request, total, base: &ModelSpec| RunStart {
        trigger: trigger.into(),
        request,
        corrections_total: total,
        base: base.clone(),
    };
    let first = started(None, &spec, "text", req("requested", Some("r1"), None, &base), "t0");
    assert_eq!((first.run, first.job.as_deref(), first.workers), (1, Some("text-train-1"), 2));
    assert_eq!(first.last_request.as_deref(), Some("r1"));
    let second = started(Some(&first), &spec, "text", req("n corrections", None, Some(500.0), &base), "t1");
    assert_eq!((second.run, second.corrections_at_start), (2, Some(500.0)));
    assert_eq!(second.last_request.as_deref(), Some("r1"), "the acted-upon request is remembered");
}
