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
