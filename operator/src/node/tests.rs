use super::*;
use crate::pod_health::PodProblem;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use prism_api::node::{CanaryStatus, GpuSpec, ModalityNodeSpec, ModalityNodeStatus};

pub fn mk_node(name: &str, modality: &str, uri: &str) -> ModalityNode {
    let spec: ModalityNodeSpec = serde_json::from_value(serde_json::json!({
        "modality": modality,
        "model": {"uri": uri, "architecture": "bert", "revision": "r2"},
        "replicas": {"min": 1, "max": 4},
        "resources": {
            "gpu": {"count": 1},
            "nodeSelector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "runtimeClassName": "nvidia"
        }
    }))
    .unwrap();
    let mut mn = ModalityNode::new(name, spec);
    mn.metadata.namespace = Some("ns".into());
    mn.metadata.uid = Some("uid-1".into());
    mn.metadata.generation = Some(3);
    mn
}

pub fn cfg() -> OperatorConfig {
    OperatorConfig {
        node_image: "prism-node:test".into(),
        node_image_cuda: "prism-node-cuda:test".into(),
        router_image: "prism-router:test".into(),
        train_image: "prism-train:test".into(),
        image_pull_policy: None,
        insecure_registries: vec![],
    }
}

fn pod_spec(o: &NodeObjects) -> &PodSpec {
    o.deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn arg_after<'a>(c: &'a Container, flag: &str) -> &'a str {
    let args = c.args.as_ref().unwrap();
    let i = args.iter().position(|a| a == flag).unwrap_or_else(|| panic!("{flag} missing in {args:?}"));
    &args[i + 1]
}

#[test]
fn deployment_carries_args_gpu_placement_and_owner() {
    let mn = mk_node("text-a", "text", "file:///models/minilm");
    let o = desired_objects(&mn, &cfg(), None).unwrap();
    let ps = pod_spec(&o);
    let c = &ps.containers[0];
    // device auto with a GPU: the CUDA build (the CPU image would hold the GPU and not use it).
    assert_eq!(c.image.as_deref(), Some("prism-node-cuda:test"));
    for (flag, want) in [
        ("--listen", "0.0.0.0:8080"),
        ("--grpc-listen", "0.0.0.0:9090"),
        ("--node-name", "text-a"),
        ("--modality", "text"),
        ("--model-uri", "file:///models/minilm"),
        ("--architecture", "bert"),
        ("--revision", "r2"),
        ("--max-batch", "32"),
        ("--max-wait-ms", "2"),
        ("--max-queue", "512"),
        ("--device", "auto"),
    ] {
        assert_eq!(arg_after(c, flag), want, "{flag}");
    }
    let res = c.resources.as_ref().unwrap();
    assert_eq!(res.limits.as_ref().unwrap()["nvidia.com/gpu"], Quantity("1".into()));
    assert_eq!(res.requests.as_ref().unwrap()["nvidia.com/gpu"], Quantity("1".into()));
    assert_eq!(ps.node_selector.as_ref().unwrap()["nvidia.com/gpu.present"], "true");
    assert_eq!(ps.tolerations.as_ref().unwrap()[0].key.as_deref(), Some("nvidia.com/gpu"));
    assert_eq!(ps.runtime_class_name.as_deref(), Some("nvidia"));
    assert_eq!(c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/ready"));
    assert_eq!(c.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/live"));
    let owner = &o.deployment.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.controller), ("ModalityNode", Some(true)));
    let tl = o.deployment.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    assert_eq!(tl[labels::REVISION], "r2");
    assert_eq!(tl[labels::NODE], "text-a");
    assert_eq!(tl[labels::MANAGED_BY], "prism");
    // The selector must not contain the revision: it is immutable and revisions change.
    let sel = o.deployment.spec.as_ref().unwrap().selector.match_labels.as_ref().unwrap();
    assert!(!sel.contains_key(labels::REVISION));
}

#[test]
fn mig_resource_name_is_used_verbatim() {
    let mut mn = mk_node("v", "vision", "file:///m");
    mn.spec.resources.gpu = GpuSpec { count: 2, resource_name: "nvidia.com/mig-1g.10gb".into() };
    let o = desired_objects(&mn, &cfg(), None).unwrap();
    let lim = pod_spec(&o).containers[0].resources.as_ref().unwrap().limits.clone().unwrap();
    assert_eq!(lim["nvidia.com/mig-1g.10gb"], Quantity("2".into()));
    assert!(!lim.contains_key("nvidia.com/gpu"));
}

#[test]
fn pods_meet_the_restricted_pod_security_level() {
    for uri in ["file:///m", "pvc://weights/bert", "hf://org/m@main", "oci://r/m:1"] {
        let o = desired_objects(&mk_node("n", "text", uri), &cfg(), None).unwrap();
        let ps = pod_spec(&o);
        let psc = ps.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        for c in ps.containers.iter().chain(ps.init_containers.iter().flatten()) {
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.run_as_non_root, Some(true), "{uri}");
            assert_eq!(sc.read_only_root_filesystem, Some(true));
            assert_eq!(sc.allow_privilege_escalation, Some(false));
            assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(), &vec!["ALL".to_string()]);
        }
        for v in ps.volumes.iter().flatten() {
            assert!(v.host_path.is_none(), "restricted forbids hostPath");
        }
    }
}

#[test]
fn model_uris_map_to_volumes() {
    let o = desired_objects(&mk_node("n", "text", "pvc://weights/bert/v1"), &cfg(), None).unwrap();
    let ps = pod_spec(&o);
    assert_eq!(arg_after(&ps.containers[0], "--model-uri"), "file:///models/bert/v1");
    let v = ps.volumes.as_ref().unwrap().iter().find(|v| v.name == "model").unwrap();
    assert_eq!(v.persistent_volume_claim.as_ref().unwrap().claim_name, "weights");
    assert!(ps.init_containers.is_none());

    let o = desired_objects(&mk_node("n", "text", "hf://org/model@main"), &cfg(), None).unwrap();
    let ps = pod_spec(&o);
    let init = &ps.init_containers.as_ref().unwrap()[0];
    assert_eq!(init.args.as_ref().unwrap()[0], "fetch", "the init container runs `prism-node fetch`");
    assert_eq!(arg_after(init, "--model-uri"), "hf://org/model@main");
    assert_eq!(arg_after(init, "--out"), "/models");
    assert_eq!(arg_after(init, "--architecture"), "bert", "the architecture's files become required");
    assert_eq!(arg_after(&ps.containers[0], "--model-uri"), "file:///models");

    assert!(init.env.is_none(), "hf:// is fetched over HTTPS");

    // oci:// from a registry the operator was told is plain HTTP (an in-cluster registry
    // without TLS): the fetch container gets OCI_INSECURE; other registries keep HTTPS.
    let insecure = OperatorConfig { insecure_registries: vec!["10.96.0.50:5000".into()], ..cfg() };
    let env_of = |uri: &str| {
        let o = desired_objects(&mk_node("n", "text", uri), &insecure, None).unwrap();
        pod_spec(&o).init_containers.as_ref().unwrap()[0].env.clone()
    };
    let env = env_of("oci://10.96.0.50:5000/models/minilm:v1").expect("OCI_INSECURE for the listed registry");
    assert_eq!((env[0].name.as_str(), env[0].value.as_deref()), ("OCI_INSECURE", Some("1")));
    assert!(env_of("oci://ghcr.io/org/minilm:v1").is_none(), "an unlisted registry stays HTTPS");
    assert!(env_of("oci://10.96.0.50:5001/models/minilm:v1").is_none(), "the port is part of the registry");

    assert!(desired_objects(&mk_node("n", "text", "s3://b/k"), &cfg(), None).is_err());
    // Defence in depth behind the CRD's CEL rule: an object that got past an older CRD still
    // cannot mount the claim at a path outside it.
    for escape in ["pvc://weights/../../etc", "file:///models/../etc/shadow", "oci://r/%2e%2e/m:1"] {
        let err = desired_objects(&mk_node("n", "text", escape), &cfg(), None).unwrap_err().to_string();
        assert!(err.contains("`..`"), "{escape}: {err}");
    }
}

#[test]
fn service_and_pdb_select_the_pods() {
    let o = desired_objects(&mk_node("a", "audio", "file:///m"), &cfg(), None).unwrap();
    let ports: Vec<i32> = o.service.spec.as_ref().unwrap().ports.as_ref().unwrap().iter().map(|p| p.port).collect();
    assert_eq!(ports, vec![8080, 9090]);
    assert_eq!(o.service.spec.as_ref().unwrap().selector.as_ref().unwrap(), &selector_labels("a"));
    assert_eq!(
        o.pdb.spec.as_ref().unwrap().selector.as_ref().unwrap().match_labels.as_ref().unwrap(),
        &selector_labels("a")
    );
}

#[test]
fn replicas_follow_mode_and_stay_in_bounds() {
    let mut mn = mk_node("n", "text", "file:///m");
    assert_eq!(desired_replicas(&mn, None), 1, "builtin without a decision runs min");
    mn.status = Some(ModalityNodeStatus { desired_replicas: Some(9), ..Default::default() });
    assert_eq!(desired_replicas(&mn, None), 4, "clamped to max");
    mn.spec.autoscaling.mode = AutoscalingMode::External;
    mn.spec.replicas.desired = Some(3);
    assert_eq!(desired_replicas(&mn, None), 3, "external follows spec.replicas.desired");
    mn.spec.autoscaling.paused = true;
    assert_eq!(desired_replicas(&mn, Some(2)), 2, "paused keeps what runs");
}

proptest::proptest! {
    #[test]
    fn desired_replicas_always_within_min_max(min in 0i32..20, span in 0i32..20, want in -5i32..60, external: bool) {
        let mut mn = mk_node("n", "text", "file:///m");
        mn.spec.replicas.min = min;
        mn.spec.replicas.max = (min + span).max(1);
        if external {
            mn.spec.autoscaling.mode = AutoscalingMode::External;
            mn.spec.replicas.desired = Some(want);
        } else {
            mn.status = Some(ModalityNodeStatus { desired_replicas: Some(want), ..Default::default() });
        }
        let r = desired_replicas(&mn, None);
        proptest::prop_assert!(r >= min && r <= mn.spec.replicas.max);
    }
}

fn deploy_with(desired: i32, ready: i32, updated: i32, gen_seen: bool) -> Deployment {
    let mut d = desired_objects(&mk_node("n", "text", "file:///m"), &cfg(), None).unwrap().deployment;
    d.spec.as_mut().unwrap().replicas = Some(desired);
    d.metadata.generation = Some(2);
    d.status = Some(k8s_openapi::api::apps::v1::DeploymentStatus {
        replicas: Some(updated.max(ready)),
        ready_replicas: Some(ready),
        available_replicas: Some(ready),
        updated_replicas: Some(updated),
        observed_generation: Some(if gen_seen { 2 } else { 1 }),
        ..Default::default()
    });
    d
}

#[test]
fn status_conditions_follow_the_deployment() {
    let mn = mk_node("n", "text", "file:///m");
    let s = status(&mn, Some(&deploy_with(2, 2, 2, true)), &[], None, "T");
    let c = |t| condition::find(&s.conditions, t).unwrap().clone();
    assert!(c(types::READY).is_true());
    assert!(c(types::AVAILABLE).is_true());
    assert!(!c(types::PROGRESSING).is_true());
    assert!(!c(types::DEGRADED).is_true());
    assert_eq!(
        s.selector.as_deref(),
        Some("app.kubernetes.io/instance=n,app.kubernetes.io/name=prism-node,prism.dev/node=n")
    );
    assert_eq!(s.observed_generation, Some(3));

    let s = status(&mn, Some(&deploy_with(2, 1, 2, true)), &[], None, "T");
    let c = |t| condition::find(&s.conditions, t).unwrap().clone();
    assert_eq!(c(types::READY).reason, "ReplicasNotReady");
    assert!(c(types::READY).message.contains("1/2 replicas of Deployment n ready"));
    assert!(c(types::DEGRADED).is_true());

    let s = status(&mn, Some(&deploy_with(2, 2, 1, true)), &[], None, "T");
    assert!(condition::find(&s.conditions, types::PROGRESSING).unwrap().is_true());
    let s = status(&mn, Some(&deploy_with(2, 2, 2, false)), &[], None, "T");
    assert!(condition::find(&s.conditions, types::PROGRESSING).unwrap().is_true(), "new generation not yet seen");
}

#[test]
fn nodes_that_compute_on_a_gpu_get_the_cuda_image() {
    let image = |device: &str, gpus: u32, image: Option<&str>| {
        let mut mn = mk_node("n", "text", "file:///m");
        mn.spec.device = serde_json::from_value(serde_json::json!(device)).unwrap();
        mn.spec.resources.gpu.count = gpus;
        mn.spec.image = image.map(String::from);
        let o = desired_objects(&mn, &cfg(), None).unwrap();
        pod_spec(&o).containers[0].image.clone().unwrap()
    };
    assert_eq!(image("cuda", 1, None), "prism-node-cuda:test");
    assert_eq!(image("auto", 1, None), "prism-node-cuda:test");
    assert_eq!(image("auto", 0, None), "prism-node:test");
    assert_eq!(image("cpu", 0, None), "prism-node:test");
    assert_eq!(image("cuda", 1, Some("mine:1")), "mine:1", "spec.image always wins");
}

#[test]
fn status_names_what_keeps_pods_from_serving() {
    let mn = mk_node("n", "text", "file:///m");
    let problems = vec![
        PodProblem {
            pod: "n-7d-a".into(),
            container: "node".into(),
            reason: "CrashLoopBackOff".into(),
            message: "container node keeps exiting (4 restarts) (last exit code 1); log: Error: no config.json".into(),
        },
        PodProblem { pod: "n-7d-b".into(), container: "node".into(), reason: "OOMKilled".into(), message: "m".into() },
    ];
    let s = status(&mn, Some(&deploy_with(2, 0, 2, true)), &problems, None, "T");
    let ready = condition::find(&s.conditions, types::READY).unwrap();
    assert_eq!(ready.reason, "CrashLoopBackOff");
    assert!(ready.message.contains("pod n-7d-a container node"), "{}", ready.message);
    assert!(ready.message.contains("log: Error: no config.json"), "{}", ready.message);
    assert!(ready.message.ends_with("(and 1 more pods)"), "{}", ready.message);
    let degraded = condition::find(&s.conditions, types::DEGRADED).unwrap();
    assert!(degraded.is_true());
    assert_eq!(degraded.reason, "CrashLoopBackOff");
    // All replicas ready: a stale problem (a pod on its way out) does not degrade the node.
    let s = status(&mn, Some(&deploy_with(2, 2, 2, true)), &problems[..1], None, "T");
    assert!(condition::find(&s.conditions, types::READY).unwrap().is_true());
    assert!(!condition::find(&s.conditions, types::DEGRADED).unwrap().is_true());
}

/// What the API server holds after our apply: the write half read back as the whole status.
fn stored(st: &NodeControllerStatus, mut other: ModalityNodeStatus) -> ModalityNodeStatus {
    let ours: ModalityNodeStatus = serde_json::from_value(serde_json::to_value(st).unwrap()).unwrap();
    other.conditions.extend(ours.conditions.iter().cloned());
    ModalityNodeStatus {
        desired_replicas: other.desired_replicas,
        p95: other.p95,
        conditions: other.conditions,
        ..ours
    }
}

#[test]
fn status_applies_only_its_own_conditions_and_keeps_transition_times() {
    let mut mn = mk_node("n", "text", "file:///m");
    let first = status(&mn, Some(&deploy_with(1, 1, 1, true)), &[], None, "T1");
    let autoscaler = ModalityNodeStatus {
        desired_replicas: Some(1),
        conditions: vec![Condition::new(types::METRICS_UNAVAILABLE, ConditionStatus::True, "PrometheusDown", "")],
        ..Default::default()
    };
    mn.status = Some(stored(&first, autoscaler));
    let second = status(&mn, Some(&deploy_with(1, 1, 1, true)), &[], None, "T2");
    let ready = condition::find(&second.conditions, types::READY).unwrap();
    assert_eq!(ready.last_transition_time.as_deref(), Some("T1"));
    assert!(condition::find(&second.conditions, types::METRICS_UNAVAILABLE).is_none(), "the autoscaler's own");
    assert_eq!(NodeControllerStatus::observed(mn.status.as_ref().unwrap()), second, "nothing to write");
    assert!(serde_json::to_value(&second).unwrap().get("desiredReplicas").is_none());
}

#[test]
fn a_canary_and_a_rolled_back_spec_outrank_what_the_deployment_says() {
    let mut mn = mk_node("n", "text", "file:///m");
    let mut st = ModalityNodeStatus { current_revision: Some("1".into()), ..Default::default() };
    st.canary = Some(CanaryStatus { revision: "2".into(), step: 0, weight: 10, step_started: "T0".into() });
    mn.status = Some(st);
    let s = status(&mn, Some(&deploy_with(2, 1, 1, true)), &[], None, "T1");
    let p = condition::find(&s.conditions, types::PROGRESSING).unwrap();
    assert_eq!(p.reason, "CanaryInProgress", "{}", p.message);
    assert!(p.message.contains("revision 2 takes 10%"), "{}", p.message);
    assert_eq!(s.canary.as_ref().map(|c| c.weight), Some(10), "the rollout's fields are carried in our apply");
}

#[test]
fn tls_nodes_serve_https_with_their_secret_and_are_routed_as_https() {
    let mut mn = mk_node("text-a", "text", "file:///models/minilm");
    mn.spec.tls = Some(prism_api::node::NodeTlsSpec { secret_name: "text-a-tls".into() });
    let o = desired_objects(&mn, &cfg(), None).unwrap();
    let ps = pod_spec(&o);
    let c = &ps.containers[0];
    assert_eq!(arg_after(c, "--tls-cert"), "/etc/prism/tls/tls.crt");
    assert_eq!(arg_after(c, "--tls-key"), "/etc/prism/tls/tls.key");
    let vol = ps.volumes.as_ref().unwrap().iter().find(|v| v.name == "tls").expect("tls volume");
    assert_eq!(vol.secret.as_ref().unwrap().secret_name.as_deref(), Some("text-a-tls"));
    let mount = c.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "tls").unwrap();
    assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/etc/prism/tls", Some(true)));
    // The kubelet probes over HTTPS, or a TLS-only server would never turn ready.
    for p in [&c.readiness_probe, &c.liveness_probe] {
        assert_eq!(p.as_ref().unwrap().http_get.as_ref().unwrap().scheme.as_deref(), Some("HTTPS"));
    }
    // The pod says how to reach it; the index turns that into an https:// endpoint.
    let template = &o.deployment.spec.as_ref().unwrap().template;
    let mut pod = k8s_openapi::api::core::v1::Pod {
        metadata: template.metadata.clone().unwrap(),
        spec: template.spec.clone(),
        status: Some(k8s_openapi::api::core::v1::PodStatus {
            pod_ip: Some("10.1.2.3".into()),
            phase: Some("Running".into()),
            ..Default::default()
        }),
    };
    pod.metadata.namespace = Some("ns".into());
    let (_, ep) = crate::index::pod_endpoint(&pod).unwrap();
    assert_eq!(ep.endpoint, "https://10.1.2.3:8080");

    // Without tls: plain HTTP everywhere, no TLS volume.
    let plain = desired_objects(&mk_node("text-b", "text", "file:///models/minilm"), &cfg(), None).unwrap();
    let c = &pod_spec(&plain).containers[0];
    assert!(!c.args.as_ref().unwrap().iter().any(|a| a.starts_with("--tls")));
    assert_eq!(c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().scheme, None);
}

#[test]
fn adapters_reach_the_server_in_spec_order_through_the_claims_that_hold_them() {
    let mut mn = mk_node("n", "text", "pvc://weights/bert/v1");
    mn.spec.model.adapters = serde_json::from_value(serde_json::json!([
        {"name": "tone", "uri": "pvc://weights/adapters/tone.safetensors", "rank": 8, "alpha": 16.0},
        {"name": "legal", "uri": "pvc://team-adapters/legal/v2", "rank": 4, "alpha": 4.0},
        {"name": "baked", "uri": "file:///opt/adapters/baked.safetensors", "rank": 2, "alpha": 0.5},
    ]))
    .unwrap();
    let o = desired_objects(&mn, &cfg(), None).unwrap();
    let ps = pod_spec(&o);
    let c = &ps.containers[0];
    let args = c.args.as_ref().unwrap();
    let given: Vec<&str> =
        args.iter().zip(args.iter().skip(1)).filter(|(f, _)| *f == "--adapter").map(|(_, v)| v.as_str()).collect();
    assert_eq!(
        given,
        vec![
            // Same claim as the model: read through the model's mount.
            "name=tone,rank=8,alpha=16,path=/models/adapters/tone.safetensors",
            // Another claim: mounted read-only on its own.
            "name=legal,rank=4,alpha=4,path=/adapters/team-adapters/legal/v2",
            "name=baked,rank=2,alpha=0.5,path=/opt/adapters/baked.safetensors",
        ]
    );
    let vol = ps.volumes.as_ref().unwrap().iter().find(|v| v.name == "adapters-0").expect("adapter claim volume");
    let claim = vol.persistent_volume_claim.as_ref().unwrap();
    assert_eq!((claim.claim_name.as_str(), claim.read_only), ("team-adapters", Some(true)));
    let m = c.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "adapters-0").unwrap();
    assert_eq!((m.mount_path.as_str(), m.read_only), ("/adapters/team-adapters", Some(true)));
    // The model's claim is not mounted twice.
    let weights = ps
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .filter(|v| v.persistent_volume_claim.as_ref().is_some_and(|p| p.claim_name == "weights"));
    assert_eq!(weights.count(), 1);

    mn.spec.model.adapters[0].uri = "hf://org/tone-lora".into();
    match desired_objects(&mn, &cfg(), None) {
        Err(Error::InvalidSpec(m)) => assert!(m.contains("adapters[tone]") && m.contains("hf://"), "{m}"),
        other => panic!("an hf:// adapter must be refused with its reason, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_sliding_window_reaches_the_server_and_full_attention_adds_no_flag() {
    let flag = |mn: &ModalityNode| {
        let o = desired_objects(mn, &cfg(), None).unwrap();
        let args = pod_spec(&o).containers[0].args.clone().unwrap();
        args.iter().position(|a| a == "--attention-window").map(|i| args[i + 1].clone())
    };
    let mut mn = mk_node("n", "audio", "file:///models/whisper");
    mn.spec.model.architecture = "whisper-encoder".into();
    assert_eq!(flag(&mn), None);
    mn.spec.model.attention =
        serde_json::from_value(serde_json::json!({"kind": "sliding-window", "window": 128})).unwrap();
    assert_eq!(flag(&mn).as_deref(), Some("128"));
    // A window left over from an earlier sliding-window spec is not served under `full`.
    mn.spec.model.attention.kind = "full".into();
    assert_eq!(flag(&mn), None);
}

#[test]
fn the_audio_window_reaches_the_server_only_when_set() {
    let frames = |mn: &ModalityNode| {
        let o = desired_objects(mn, &cfg(), None).unwrap();
        let args = pod_spec(&o).containers[0].args.clone().unwrap();
        args.iter().position(|a| a == "--audio-window").map(|i| args[i + 1].clone())
    };
    let mut mn = mk_node("n", "audio", "file:///models/whisper");
    mn.spec.model.architecture = "whisper-encoder".into();
    assert_eq!(frames(&mn), None, "unset: the node's default (full)");
    mn.spec.model.audio_window = Some("clip".into());
    assert_eq!(frames(&mn).as_deref(), Some("clip"));
}

#[test]
fn a_spec_the_operator_cannot_build_says_so_in_ready_and_degraded_and_what_keeps_running() {
    let mut mn = mk_node("n", "text", "ftp://models/m");
    let why = match desired_objects(&mn, &cfg(), None) {
        Err(Error::InvalidSpec(why)) => why,
        other => panic!("expected InvalidSpec, got {other:?}"),
    };
    let running = status(&mn, Some(&deploy_with(2, 2, 2, true)), &[], Some(&why), "T");
    let ready = condition::find(&running.conditions, types::READY).unwrap();
    assert_eq!((ready.status, ready.reason.as_str()), (ConditionStatus::False, "InvalidSpec"));
    assert!(ready.message.contains("scheme must be") && ready.message.contains("keeps running"), "{}", ready.message);
    let degraded = condition::find(&running.conditions, types::DEGRADED).unwrap();
    assert_eq!((degraded.status, degraded.reason.as_str()), (ConditionStatus::True, "InvalidSpec"));
    mn.metadata.generation = Some(4);
    let never_ran = status(&mn, None, &[], Some(&why), "T");
    let ready = condition::find(&never_ran.conditions, types::READY).unwrap();
    assert!(ready.message.contains("nothing was created"), "{}", ready.message);
    assert_eq!(never_ran.observed_generation, Some(4), "the refused generation is the one observed");
}
