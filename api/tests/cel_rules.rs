//! The CRDs' CEL rules evaluated offline with kube's CEL interpreter: the same rules the API
//! server enforces (operator e2e tests check them there too), and what `prism validate` runs.

use prism_api::manifest::{parse, Manifest};
use prism_api::{ManifestSet, ModalityNode, MultimodalPipeline};

const NODE: &str = r#"
apiVersion: prism.dev/v1alpha1
kind: ModalityNode
metadata: {name: text}
spec:
  modality: text
  model: {uri: "file:///models/minilm", architecture: bert}
  replicas: {min: 1, max: 4}
"#;

const PIPELINE: &str = r#"
apiVersion: prism.dev/v1alpha1
kind: MultimodalPipeline
metadata: {name: search}
spec:
  nodes:
  - {name: text, weight: 1.0, required: true}
  - {name: image, weight: 0.5}
"#;

fn node(yaml: &str) -> ModalityNode {
    match parse(yaml).expect("parses").remove(0) {
        Manifest::Node(n) => n,
        other => panic!("expected a node, got {other:?}"),
    }
}

fn pipeline(yaml: &str) -> MultimodalPipeline {
    match parse(yaml).expect("parses").remove(0) {
        Manifest::Pipeline(p) => p,
        other => panic!("expected a pipeline, got {other:?}"),
    }
}

fn rejected_with(result: Result<(), impl std::fmt::Display>, needle: &str) {
    match result {
        Ok(()) => panic!("expected rejection mentioning {needle:?}, but it was accepted"),
        Err(e) => assert!(e.to_string().contains(needle), "rejection {e} does not mention {needle:?}"),
    }
}

#[test]
fn a_sane_node_and_pipeline_pass() {
    node(NODE).validate_cel().unwrap();
    pipeline(PIPELINE).validate_cel().unwrap();
}

#[test]
fn node_min_above_max_is_rejected() {
    let mut n = node(NODE);
    n.spec.replicas.min = 5;
    rejected_with(n.validate_cel(), "replicas.min must be <= replicas.max");
}

#[test]
fn node_desired_outside_bounds_is_rejected() {
    let mut n = node(NODE);
    n.spec.replicas.desired = Some(9);
    rejected_with(n.validate_cel(), "replicas.desired must lie within");
    n.spec.replicas.desired = Some(3);
    n.validate_cel().unwrap();
}

#[test]
fn sliding_window_needs_a_positive_window() {
    let mut n = node(NODE);
    n.spec.model.attention.kind = "sliding-window".into();
    rejected_with(n.validate_cel(), "attention.window must be > 0");
    n.spec.model.attention.window = Some(0);
    rejected_with(n.validate_cel(), "attention.window must be > 0");
    n.spec.model.attention.window = Some(64);
    n.validate_cel().unwrap();
}

#[test]
fn sliding_window_is_refused_for_architectures_without_a_token_order() {
    let mut n = node(NODE);
    n.spec.model.attention.kind = "sliding-window".into();
    n.spec.model.attention.window = Some(64);
    for arch in ["bert", "whisper-encoder"] {
        n.spec.model.architecture = arch.into();
        n.validate_cel().unwrap();
    }
    for arch in ["vit", "perceiver-fusion"] {
        n.spec.model.architecture = arch.into();
        rejected_with(
            n.validate_cel(),
            "sliding-window attention is served for the architectures bert and whisper-encoder",
        );
    }
    n.spec.model.attention.kind = "full".into();
    n.validate_cel().unwrap();
}

#[test]
fn gpu_utilization_target_must_lie_in_0_exclusive_to_1() {
    for bad in [0.0, -0.5, 1.01] {
        let mut n = node(NODE);
        n.spec.autoscaling.target_gpu_utilization = Some(bad);
        rejected_with(n.validate_cel(), "autoscaling.targetGpuUtilization must lie in (0, 1]");
    }
    for good in [0.01, 0.7, 1.0] {
        let mut n = node(NODE);
        n.spec.autoscaling.target_gpu_utilization = Some(good);
        n.validate_cel().unwrap();
    }
    // Unset is fine, and an integer 1 in YAML reads as 1.0.
    node(NODE).validate_cel().unwrap();
    let yaml = format!("{NODE}  autoscaling: {{targetGpuUtilization: 1}}\n");
    assert_eq!(node(&yaml).spec.autoscaling.target_gpu_utilization, Some(1.0));
    node(&yaml).validate_cel().unwrap();
}

#[test]
fn duplicate_node_names_are_rejected() {
    let mut p = pipeline(PIPELINE);
    p.spec.nodes[1].name = "text".into();
    rejected_with(p.validate_cel(), "node names in a pipeline must be unique");
}

#[test]
fn all_zero_weights_are_rejected() {
    let mut p = pipeline(PIPELINE);
    for n in &mut p.spec.nodes {
        n.weight = 0.0;
    }
    rejected_with(p.validate_cel(), "at least one node must have weight > 0");
}

#[test]
fn failure_threshold_must_be_strictly_between_0_and_1() {
    for bad in [0.0, 1.0, 1.5] {
        let mut p = pipeline(PIPELINE);
        p.spec.routing.failure_threshold = bad;
        rejected_with(p.validate_cel(), "failureThreshold (delta) must lie strictly between 0 and 1");
    }
    let mut p = pipeline(PIPELINE);
    p.spec.routing.failure_threshold = 0.3;
    p.validate_cel().unwrap();
}

#[test]
fn early_fusion_requires_a_fusion_node() {
    let yaml = PIPELINE.replace("spec:\n", "spec:\n  fusion: {strategy: early}\n");
    rejected_with(pipeline(&yaml).validate_cel(), "fusion.strategy early needs a node with role fusion");
    let with_fusion = yaml.replace(
        "  - {name: image, weight: 0.5}",
        "  - {name: image, weight: 0.5}\n  - {name: fuse, role: fusion, weight: 1.0}",
    );
    pipeline(&with_fusion).validate_cel().unwrap();
}

#[test]
fn postgres_store_needs_a_secret() {
    let yaml = PIPELINE.replace("spec:\n", "spec:\n  memory: {enabled: true, store: {kind: postgres}}\n");
    rejected_with(pipeline(&yaml).validate_cel(), "postgresSecret is required");
}

#[test]
fn embedded_memory_takes_one_router() {
    let yaml = PIPELINE.replace("spec:\n", "spec:\n  routerReplicas: 2\n  memory: {enabled: true}\n");
    rejected_with(pipeline(&yaml).validate_cel(), "routerReplicas must be 1");
    pipeline(&yaml.replace("routerReplicas: 2", "routerReplicas: 1")).validate_cel().unwrap();
    pipeline(&yaml.replace("memory: {enabled: true}", "memory: {enabled: false}")).validate_cel().unwrap();
    let shared =
        yaml.replace("memory: {enabled: true}", "memory: {enabled: true, store: {kind: postgres, postgresSecret: pg}}");
    pipeline(&shared).validate_cel().unwrap();
}

#[test]
fn manifest_set_checks_references_and_roles() {
    let mut set = ManifestSet::default();
    set.add_yaml(&format!("{NODE}\n---\n{PIPELINE}")).unwrap();
    let errs = set.validate().unwrap_err();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].to_string().contains("ModalityNode \"image\" is not defined"), "{}", errs[0]);
}

#[test]
fn schema_errors_name_the_document_and_object() {
    let bad = NODE.replace("architecture: bert", "architecture: 7, extra: 1");
    let err = parse(&format!("---\n{PIPELINE}\n---\n{bad}")).unwrap_err().to_string();
    assert!(err.starts_with("ModalityNode text (document 2): 2 schema error(s)"), "{err}");
    assert!(err.contains("spec.model.architecture: expected string, got number"), "{err}");
    assert!(err.contains("spec.model.extra: unknown field"), "{err}");
    let other = parse("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n").unwrap_err().to_string();
    assert!(other.contains("unsupported apiVersion/kind v1/ConfigMap"), "{other}");
}

#[test]
fn defaults_fill_in_what_users_leave_out() {
    let p = pipeline(PIPELINE);
    assert_eq!(p.spec.routing.failure_threshold, 0.5);
    assert_eq!(p.spec.degradation.cache.min_similarity, 0.9);
    let n = node(NODE);
    assert_eq!(n.spec.batching.max_batch, 32);
    assert_eq!(n.spec.resources.gpu.resource_name, "nvidia.com/gpu");
    assert_eq!(n.spec.initial_replicas(), 1);
}

#[test]
fn uris_with_dot_dot_segments_are_refused_in_model_and_adapters() {
    for bad in [
        "pvc://models/../../../etc/passwd",
        "pvc://../etc",
        "file:///models/..",
        "hf://org/../other",
        "oci://registry/repo/%2e%2e/x",
        "oci://registry/repo/%2E%2E/x",
    ] {
        assert!(prism_api::node::uri_escapes_its_root(bad), "{bad}");
        let mut n = node(NODE);
        n.spec.model.uri = bad.into();
        rejected_with(n.validate_cel(), "model.uri must not contain `..` path segments");
        let mut n = node(NODE);
        n.spec.model.adapters.push(adapter("a", bad));
        rejected_with(n.validate_cel(), "adapters[].uri must not contain `..` path segments");
    }
    // Dots inside a name are not a path segment.
    for good in ["pvc://models/all-minilm..v2/x", "hf://org/name@v1.2", "file:///models/.hidden/m"] {
        assert!(!prism_api::node::uri_escapes_its_root(good), "{good}");
        let mut n = node(NODE);
        n.spec.model.uri = good.into();
        if !good.starts_with("hf://") {
            n.spec.model.adapters.push(adapter("a", good));
        }
        n.validate_cel().unwrap();
    }
}

#[test]
fn adapters_come_from_the_image_or_a_claim() {
    for uri in ["hf://org/tone-lora", "oci://registry/adapters/tone:1"] {
        let mut n = node(NODE);
        n.spec.model.adapters.push(adapter("a", uri));
        rejected_with(n.validate_cel(), "hf:// and oci:// adapters are not downloaded");
    }
    let mut n = node(NODE);
    n.spec.model.adapters = vec![adapter("a", "pvc://m/a.safetensors"), adapter("b", "file:///opt/b.safetensors")];
    n.validate_cel().unwrap();
}

fn adapter(name: &str, uri: &str) -> prism_api::node::AdapterSpec {
    prism_api::node::AdapterSpec { name: name.into(), uri: uri.into(), rank: 8, alpha: 16.0 }
}

#[test]
fn adapter_names_must_be_unique() {
    let mut n = node(NODE);
    n.spec.model.adapters = vec![adapter("a", "pvc://m/a"), adapter("b", "pvc://m/b")];
    n.validate_cel().unwrap();
    n.spec.model.adapters.push(adapter("a", "pvc://m/c"));
    rejected_with(n.validate_cel(), "adapter names must be unique");
}

#[test]
fn resources_are_kubernetes_quantities() {
    for good in ["500m", "2", "1.5", "4Gi", "512Mi", "1e3", "100k", ".5"] {
        let yaml = format!("{NODE}  resources: {{cpu: '{good}', memory: '{good}'}}\n");
        parse(&yaml).unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    for bad in ["two", "-1", "4GB", "1 Gi", "", "4gi", "0x10"] {
        let yaml = format!("{NODE}  resources: {{cpu: '{bad}'}}\n");
        let err = parse(&yaml).expect_err(bad).to_string();
        assert!(err.contains("spec.resources.cpu") && err.contains("does not match"), "{bad}: {err}");
        let yaml = format!("{NODE}  adaptation: {{memory: '{bad}', storage: {{size: 20Gi}}}}\n");
        let err = parse(&yaml).expect_err(bad).to_string();
        assert!(err.contains("spec.adaptation.memory"), "{bad}: {err}");
    }
    let yaml = format!("{NODE}  adaptation: {{storage: {{size: lots}}}}\n");
    assert!(parse(&yaml).unwrap_err().to_string().contains("spec.adaptation.storage.size"));
}

#[test]
fn device_and_gpu_count_must_agree() {
    let with = |device: &str, gpus: u32| {
        let mut n = node(NODE);
        n.spec.device = serde_json::from_value(serde_json::json!(device)).unwrap();
        n.spec.resources.gpu.count = gpus;
        n
    };
    rejected_with(with("cpu", 1).validate_cel(), "device cpu holds no GPU");
    rejected_with(with("cuda", 0).validate_cel(), "device cuda needs a GPU");
    for (device, gpus) in [("cpu", 0), ("cuda", 1), ("cuda", 4), ("auto", 0), ("auto", 2)] {
        with(device, gpus).validate_cel().unwrap_or_else(|e| panic!("{device} x{gpus}: {e}"));
    }
}

#[test]
fn fsdp_needs_gpus() {
    let yaml = format!("{NODE}  adaptation: {{sharding: fsdp, gpusPerWorker: 0}}\n");
    rejected_with(node(&yaml).validate_cel(), "sharding fsdp shards across GPUs");
    node(&yaml.replace("gpusPerWorker: 0", "gpusPerWorker: 2")).validate_cel().unwrap();
    node(&yaml.replace("fsdp", "ddp")).validate_cel().unwrap();
}

#[test]
fn rollout_steps_must_increase() {
    let steps = |weights: &[u32]| {
        let list: Vec<String> = weights.iter().map(|w| format!("{{weight: {w}, pauseSeconds: 30}}")).collect();
        node(&format!("{NODE}  rollout: {{steps: [{}]}}\n", list.join(", ")))
    };
    for bad in [&[50, 10][..], &[10, 10], &[10, 50, 40], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 9]] {
        rejected_with(steps(bad).validate_cel(), "rollout.steps weights must increase");
    }
    for good in [&[100][..], &[10, 50], &[10, 50, 100], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]] {
        steps(good).validate_cel().unwrap_or_else(|e| panic!("{good:?}: {e}"));
    }
}
