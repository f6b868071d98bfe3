//! The planners decide everything a reconcile does; these tests read their plans directly.

use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
use prism_api::node::{CanaryStep, RolloutSpec};
use prism_api::pipeline::MultimodalPipelineSpec;

use super::*;
use crate::node::tests::{cfg, mk_node};

fn now() -> DateTime<Utc> {
    "2026-12-07T10:00:00Z".parse().unwrap()
}

/// What a write touches, `verb Kind/name`, so a test reads the order at a glance.
fn names(writes: &[Write]) -> Vec<String> {
    writes
        .iter()
        .map(|w| match w {
            Write::Apply(o) => format!("apply {}", o.describe()),
            Write::CreateClaim(c) => format!("create PersistentVolumeClaim/{}", c.name_any()),
            Write::Delete { kind, name } => format!("delete {kind:?}/{name}"),
            Write::Cleanup { kind, name } => format!("cleanup {kind:?}/{name}"),
            Write::SetModel { node, model, .. } => format!("set ModalityNode/{node} model {}", model.revision),
        })
        .collect()
}

fn reasons(events: &[Event]) -> Vec<&str> {
    events.iter().map(|e| e.reason.as_str()).collect()
}

fn deployed(mn: &ModalityNode, generation: i64) -> Deployment {
    let mut d = node::desired_objects(mn, &cfg(), None).unwrap().deployment;
    d.metadata.generation = Some(generation);
    d
}

/// A node that has been served once: its first revision recorded as stable.
fn served(uri: &str) -> (ModalityNode, NodeObservation) {
    let mn = mk_node("text", "text", uri);
    let first = node(&mn, &cfg(), &NodeObservation::default(), now()).unwrap();
    let obs = NodeObservation { deployment: Some(deployed(&first.node, 4)), ..Default::default() };
    (first.node, obs)
}

#[test]
fn a_new_node_applies_its_deployment_service_and_budget_and_says_created() {
    let mn = mk_node("text", "text", "pvc://models/minilm");
    let plan = node(&mn, &cfg(), &NodeObservation::default(), now()).unwrap();
    assert_eq!(names(&plan.writes), ["apply Deployment/text", "apply Service/text", "apply PodDisruptionBudget/text"]);
    assert_eq!(reasons(&plan.events), ["Created"]);
    assert_eq!(plan.events[0].if_changed, None, "a creation is always news");
    let st = plan.node.status.as_ref().unwrap();
    assert_eq!(st.current_revision.as_deref(), Some("r2"), "the first revision is recorded as stable");
    assert_eq!(plan.requeue, Some(Duration::from_secs(300)));
}

#[test]
fn an_existing_node_says_updated_only_if_the_apply_changes_the_deployment_and_drops_a_stale_canary() {
    let (mn, mut obs) = served("pvc://models/minilm");
    obs.canary_exists = true;
    let plan = node(&mn, &cfg(), &obs, now()).unwrap();
    assert_eq!(
        names(&plan.writes),
        [
            "delete Deployment/text-canary",
            "apply Deployment/text",
            "apply Service/text",
            "apply PodDisruptionBudget/text"
        ]
    );
    assert_eq!(reasons(&plan.events), ["Updated"]);
    assert_eq!(plan.events[0].if_changed, Some(GenerationOf { deployment: "text".into(), before: Some(4) }));
}

#[test]
fn a_new_revision_with_a_rollout_starts_a_canary_beside_the_stable_deployment() {
    let (mut mn, obs) = served("pvc://models/minilm");
    mn.spec.rollout =
        Some(RolloutSpec { steps: vec![CanaryStep { weight: 10, pause_seconds: 30 }], analysis: Default::default() });
    mn.spec.model.revision = "r3".into();
    let plan = node(&mn, &cfg(), &obs, now()).unwrap();
    assert_eq!(
        names(&plan.writes),
        [
            "apply Deployment/text-canary",
            "apply Deployment/text",
            "apply Service/text",
            "apply PodDisruptionBudget/text"
        ]
    );
    assert_eq!(reasons(&plan.events), ["CanaryStarted", "Updated"]);
    let st = plan.node.status.as_ref().unwrap();
    assert_eq!(st.canary.as_ref().map(|c| (c.revision.as_str(), c.weight)), Some(("r3", 10)));
    assert_eq!(st.current_revision.as_deref(), Some("r2"), "stable keeps serving during the canary");
    assert_eq!(plan.requeue, Some(Duration::from_secs(5)), "pauses end on time");
}

#[test]
fn an_invalid_spec_applies_nothing_and_waits_for_an_edit() {
    let mut mn = mk_node("text", "text", "pvc://models/minilm");
    mn.spec.model.uri = "ftp://models/m".into();
    let plan = node(&mn, &cfg(), &NodeObservation::default(), now()).unwrap();
    assert!(plan.writes.is_empty(), "{:?}", names(&plan.writes));
    assert!(plan.invalid_spec.as_deref().is_some_and(|w| w.contains("ftp://models/m")), "{:?}", plan.invalid_spec);
    assert_eq!(plan.requeue, None);
}

fn adapting(mn: &mut ModalityNode) {
    mn.spec.adaptation = Some(serde_json::from_value(serde_json::json!({"workers": 2})).unwrap());
    mn.metadata.annotations = Some([(ADAPT_REQUEST_ANNOTATION.to_string(), "first".to_string())].into());
}

fn pipeline_using(node: &str, memory: bool) -> MultimodalPipeline {
    let spec: MultimodalPipelineSpec = serde_json::from_value(serde_json::json!({
        "nodes": [{"name": node}], "memory": {"enabled": memory}, "auth": {"insecureNoAuth": true},
    }))
    .unwrap();
    let mut p = MultimodalPipeline::new("mm", spec);
    p.metadata.namespace = Some("ns".into());
    p.metadata.uid = Some("uid-p".into());
    p
}

#[test]
fn a_requested_run_without_a_pipeline_to_learn_from_waits_and_says_so_once() {
    let (mut mn, obs) = served("pvc://models/minilm");
    adapting(&mut mn);
    let plan = node(&mn, &cfg(), &obs, now()).unwrap();
    assert!(!names(&plan.writes).iter().any(|w| w.contains("Job/")), "{:?}", names(&plan.writes));
    assert_eq!(reasons(&plan.events), ["TrainingWaiting", "Updated"]);
    let a = plan.node.status.as_ref().unwrap().adaptation.clone().unwrap();
    assert_eq!(a.phase, phase::WAITING);
    assert!(a.message.contains("no pipeline"), "{}", a.message);

    let again = node(&plan.node, &cfg(), &obs, now()).unwrap();
    assert_eq!(reasons(&again.events), ["Updated"], "the same wait is not announced twice");
}

#[test]
fn a_due_run_creates_its_service_and_job_and_clears_the_previous_runs_objects() {
    let (mut mn, mut obs) = served("pvc://models/minilm");
    adapting(&mut mn);
    obs.pipelines = vec![pipeline_using("text", true)];
    // Run 1 finished earlier; its Job stayed for `kubectl logs`.
    mn.status.as_mut().unwrap().adaptation = Some(AdaptationStatus {
        phase: phase::SUCCEEDED.into(),
        run: 1,
        job: Some("text-train-1".into()),
        ..Default::default()
    });
    let plan = node(&mn, &cfg(), &obs, now()).unwrap();
    let w = names(&plan.writes);
    assert_eq!(
        w[..5],
        [
            "create PersistentVolumeClaim/text-train",
            "apply Service/text-train-2",
            "apply Job/text-train-2",
            "cleanup Job/text-train-1",
            "cleanup Service/text-train-1"
        ],
        "{w:?}"
    );
    assert_eq!(reasons(&plan.events), ["TrainingStarted", "Updated"]);
    let a = plan.node.status.as_ref().unwrap().adaptation.clone().unwrap();
    assert_eq!((a.phase.as_str(), a.run, a.job.as_deref()), (phase::RUNNING, 2, Some("text-train-2")));
    assert_eq!(plan.requeue, Some(Duration::from_secs(15)), "a running Job is followed");
}

#[test]
fn a_finished_run_writes_its_model_first_and_the_next_pass_rolls_it_out() {
    let (mut mn, mut obs) = served("pvc://models/minilm");
    adapting(&mut mn);
    mn.metadata.resource_version = Some("41".into());
    mn.status.as_mut().unwrap().adaptation = Some(AdaptationStatus {
        phase: phase::RUNNING.into(),
        run: 1,
        job: Some("text-train-1".into()),
        workers: 2,
        last_request: Some("first".into()),
        ..Default::default()
    });
    assert_eq!(adaptation_job(&mn), Some("text-train-1"), "the controller fetches the running Job");
    let job = Job {
        status: Some(JobStatus {
            succeeded: Some(2),
            conditions: Some(vec![JobCondition {
                type_: "Complete".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    obs.adaptation_job = Some(job);
    let plan = node(&mn, &cfg(), &obs, now()).unwrap();
    let Write::SetModel { resource_version, model, .. } = &plan.writes[0] else {
        panic!("the model is written first: {:?}", names(&plan.writes))
    };
    assert_eq!(resource_version.as_deref(), Some("41"), "a concurrent edit of the node wins");
    assert_ne!(model.revision, "r2");
    assert_eq!(&plan.node.spec.model, model);
    assert_eq!(reasons(&plan.events)[0], "TrainingSucceeded");
    // The rollout step ran before the model changed: this pass still serves the stable revision,
    // and the node's spec change wakes the next pass, which (no spec.rollout) replaces it.
    let serving = |p: &NodePlan| {
        p.writes.iter().find_map(|w| match w {
            Write::Apply(Object::Deployment(d)) if d.name_any() == "text" => {
                let t = d.spec.as_ref()?.template.metadata.as_ref()?.labels.as_ref()?;
                t.get(prism_api::labels::REVISION).cloned()
            }
            _ => None,
        })
    };
    assert_eq!(serving(&plan).as_deref(), Some("r2"));
    let next = node(&plan.node, &cfg(), &obs, now()).unwrap();
    assert_eq!(reasons(&next.events), ["Promoted", "Updated"]);
    assert_eq!(serving(&next), Some(model.revision.clone()), "every replica runs the trained revision");
}

#[test]
fn a_corrections_trigger_asks_prometheus_only_while_no_run_is_going() {
    let mut mn = mk_node("text", "text", "pvc://models/minilm");
    assert!(!wants_corrections_total(&mn));
    mn.spec.adaptation =
        Some(serde_json::from_value(serde_json::json!({"trigger": {"everyCorrections": 100}})).unwrap());
    assert!(wants_corrections_total(&mn));
    mn.status = Some(ModalityNodeStatus {
        adaptation: Some(AdaptationStatus { phase: phase::RUNNING.into(), ..Default::default() }),
        ..Default::default()
    });
    assert!(!wants_corrections_total(&mn));
}

#[test]
fn a_node_status_write_happens_only_on_a_change_and_a_ready_flip_is_an_event() {
    let mn = mk_node("text", "text", "pvc://models/minilm");
    let plan = node(&mn, &cfg(), &NodeObservation::default(), now()).unwrap();
    let status = node::status(&plan.node, None, &[], None, "2026-12-07T10:00:00Z");
    let events = node_status_change(None, &status).expect("a first status is written");
    let ready = find(&status.conditions, types::READY).unwrap();
    assert_eq!(reasons(&events), [ready.reason.as_str()], "Ready appeared: one Event");
    assert_eq!(events[0].type_, EventType::Warning, "no Deployment yet, so not ready");
    let stored: ModalityNodeStatus =
        serde_json::from_value(serde_json::to_value(&status).unwrap()).expect("the written status reads back");
    assert_eq!(node_status_change(Some(&stored), &status), None, "nothing new, nothing written");
}

fn table_after(previous: Option<&RoutingTable>) -> PipelinePlan {
    let p = pipeline_using("text", false);
    pipeline(&p, &cfg(), &BTreeMap::new(), previous).unwrap()
}

#[test]
fn a_pipeline_publishes_its_table_first_and_announces_only_a_new_generation() {
    let first = table_after(None);
    let w = names(&first.writes);
    assert_eq!(w[0], "apply ConfigMap/mm-routing-table", "failover latency is measured to this write: {w:?}");
    assert_eq!(w.last().map(String::as_str), Some("apply Service/mm-router"));
    assert_eq!(reasons(&first.events), ["RoutingTableUpdated"]);
    let again = table_after(Some(&first.table));
    assert_eq!(again.table.generation, first.table.generation, "same inputs, same table");
    assert!(again.events.is_empty(), "{:?}", reasons(&again.events));
}
