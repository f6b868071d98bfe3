use prism_api::node::{CanaryStep, RolloutSpec};

use prism_api::routing::traffic_share;

use super::*;

fn spec(revision: &str, rollout: bool) -> ModalityNodeSpec {
    let mut s: ModalityNodeSpec = serde_json::from_value(serde_json::json!({
        "modality": "text",
        "model": {"uri": format!("pvc://models/minilm-{revision}"), "architecture": "bert", "revision": revision},
    }))
    .unwrap();
    if rollout {
        s.rollout = Some(RolloutSpec {
            steps: vec![CanaryStep { weight: 10, pause_seconds: 30 }, CanaryStep { weight: 50, pause_seconds: 30 }],
            analysis: Default::default(),
        });
    }
    s
}

fn good(calls: f64, acc: f64) -> RevisionStats {
    RevisionStats { calls, failures: 0.0, p95_s: Some(0.010), corrections: 20.0, rating_sum: 20.0 * acc }
}

/// Runs decide+apply like a reconcile would.
fn step(
    spec: &ModalityNodeSpec,
    st: &mut ModalityNodeStatus,
    elapsed: Option<f64>,
    stats: Option<(&RevisionStats, &RevisionStats)>,
) -> Transition {
    let t = decide(spec, st, elapsed, stats);
    apply(spec, st, &t, "2026-12-01T00:00:00Z");
    t
}

/// Revision 1 served, then revision 2's canary started: the spec of 2 and the status.
fn canary_of_revision_2() -> (ModalityNodeSpec, ModalityNodeStatus) {
    let mut st = ModalityNodeStatus::default();
    step(&spec("1", true), &mut st, None, None);
    let s2 = spec("2", true);
    step(&s2, &mut st, None, None);
    (s2, st)
}

#[test]
fn first_revision_is_deployed_and_recorded_with_its_model() {
    let s = spec("1", true);
    let mut st = ModalityNodeStatus::default();
    assert_eq!(step(&s, &mut st, None, None), Transition::Deploy);
    assert_eq!(st.current_revision.as_deref(), Some("1"));
    assert_eq!(stable_model(&st), Some(&s.model));
    assert_eq!(decide(&s, &st, None, None), Transition::None, "steady state does nothing");
}

#[test]
fn good_canary_walks_every_step_then_promotes() {
    let mut st = ModalityNodeStatus::default();
    step(&spec("1", true), &mut st, None, None);
    let s2 = spec("2", true);
    assert_eq!(step(&s2, &mut st, None, None), Transition::Start { superseded: None });
    let c = st.canary.clone().unwrap();
    assert_eq!((c.revision.as_str(), c.step, c.weight), ("2", 0, 10));
    assert_eq!(serving_model(&s2, Some(&st)).revision, "1", "stable replicas keep revision 1");
    let (a, b) = (good(500.0, 0.9), good(60.0, 0.9));
    assert!(matches!(step(&s2, &mut st, Some(10.0), Some((&a, &b))), Transition::Hold { .. }), "pause not over");
    assert!(matches!(step(&s2, &mut st, Some(31.0), Some((&a, &b))), Transition::Advance { step: 1, .. }));
    assert_eq!(st.canary.as_ref().unwrap().weight, 50);
    assert!(matches!(step(&s2, &mut st, Some(31.0), Some((&a, &b))), Transition::Promote { .. }));
    assert_eq!(st.current_revision.as_deref(), Some("2"));
    assert!(st.canary.is_none());
    assert_eq!(st.history.last().unwrap().outcome, outcome::PROMOTED);
    assert_eq!(serving_model(&s2, Some(&st)), &s2.model);
}

#[test]
fn worse_accuracy_rolls_back_and_the_revision_is_not_retried() {
    let (s2, mut st) = canary_of_revision_2();
    // Accuracy 0.3 vs 0.9 over 20 corrections each: rolled back before the pause ends.
    let t = step(&s2, &mut st, Some(5.0), Some((&good(500.0, 0.9), &good(60.0, 0.3))));
    let Transition::RollBack { reason } = t else { panic!("{t:?}") };
    assert!(reason.contains("accuracy"), "{reason}");
    assert_eq!(st.current_revision.as_deref(), Some("1"));
    let last = st.history.last().unwrap();
    assert_eq!((last.revision.as_str(), last.outcome.as_str()), ("2", outcome::ROLLED_BACK));
    assert_eq!(last.model.as_ref(), Some(&s2.model), "recorded so it can be inspected");
    assert_eq!(decide(&s2, &st, None, None), Transition::None, "a rolled-back revision is not retried");
    assert!(held_back(&s2, &st).unwrap().contains("rolled back"));
    // A new revision starts a new canary.
    assert_eq!(decide(&spec("3", true), &st, None, None), Transition::Start { superseded: None });
}

#[test]
fn judge_checks_errors_latency_accuracy_and_waits_for_data() {
    let a = RolloutAnalysis::default();
    let stable = good(1000.0, 0.9);
    assert!(matches!(judge(&a, &stable, &good(5.0, 0.9)), Verdict::Wait(_)), "too few calls");
    let failing = RevisionStats { calls: 2.0, failures: 5.0, ..good(0.0, 0.9) };
    assert!(matches!(judge(&a, &stable, &failing), Verdict::Fail(r) if r.contains("error rate")), "fails fast");
    let slow = RevisionStats { p95_s: Some(0.050), ..good(100.0, 0.9) };
    assert!(matches!(judge(&a, &stable, &slow), Verdict::Fail(r) if r.contains("p95")));
    // 2 ms vs 1 ms is within the slack: no flapping on bucket noise.
    let fast_stable = RevisionStats { p95_s: Some(0.001), ..stable.clone() };
    let jitter = RevisionStats { p95_s: Some(0.002), ..good(100.0, 0.9) };
    assert!(matches!(judge(&a, &fast_stable, &jitter), Verdict::Pass(_)));
    // Too few corrections: accuracy is not compared.
    let few = RevisionStats { corrections: 3.0, rating_sum: 0.0, ..good(100.0, 0.9) };
    assert!(matches!(judge(&a, &stable, &few), Verdict::Pass(_)));
}

#[test]
fn no_rollout_or_known_revision_replaces_directly() {
    let mut st = ModalityNodeStatus::default();
    step(&spec("1", false), &mut st, None, None);
    assert!(matches!(step(&spec("2", false), &mut st, None, None), Transition::Promote { .. }));
    assert_eq!(st.current_revision.as_deref(), Some("2"));
    // Back to 1 (what `prism rollback` does): served before, so no canary even with a rollout.
    assert!(
        matches!(step(&spec("1", true), &mut st, None, None), Transition::Promote { reason } if reason.contains("served before"))
    );
    assert_eq!(st.current_revision.as_deref(), Some("1"));
}

#[test]
fn spec_change_mid_canary_supersedes_and_revert_rolls_back() {
    let mut st = ModalityNodeStatus::default();
    step(&spec("1", true), &mut st, None, None);
    step(&spec("2", true), &mut st, None, None);
    assert_eq!(step(&spec("3", true), &mut st, None, None), Transition::Start { superseded: Some("2".into()) });
    assert_eq!(st.canary.as_ref().unwrap().revision, "3");
    assert_eq!(st.history.last().unwrap().outcome, outcome::SUPERSEDED);
    assert!(matches!(step(&spec("1", true), &mut st, None, None), Transition::RollBack { .. }));
    assert!(st.canary.is_none());
    assert_eq!(decide(&spec("1", true), &st, None, None), Transition::None);
}

#[test]
fn traffic_shares_keep_the_node_total() {
    let c = CanaryStatus { revision: "2".into(), step: 0, weight: 10, step_started: String::new() };
    // 3 replicas: 2 stable, 1 canary. Canary 10% of the node, the node still sums to 3.
    let stable = traffic_share(Some(&c), "1", 2, 3);
    let canary = traffic_share(Some(&c), "2", 1, 3);
    assert!((2.0 * stable + canary - 3.0).abs() < 1e-12);
    assert!((canary / 3.0 - 0.1).abs() < 1e-12);
    assert_eq!(traffic_share(None, "1", 3, 3), 1.0);
}

#[test]
fn history_is_bounded() {
    let mut st = ModalityNodeStatus::default();
    for i in 0..(HISTORY_LIMIT + 5) {
        step(&spec(&i.to_string(), false), &mut st, None, None);
    }
    assert_eq!(st.history.len(), HISTORY_LIMIT);
    assert_eq!(st.current_revision.as_deref(), Some((HISTORY_LIMIT + 4).to_string().as_str()));
}

#[test]
fn rollback_target_is_the_previous_served_revision_or_the_named_one() {
    let mut st = ModalityNodeStatus::default();
    step(&spec("1", true), &mut st, None, None);
    step(&spec("2", false), &mut st, None, None); // promoted directly
    step(&spec("3", true), &mut st, None, None); // canary...
    step(&spec("3", true), &mut st, Some(1.0), Some((&good(500.0, 0.9), &good(60.0, 0.1)))); // ...rolled back
                                                                                             // The spec still names rolled-back 3: undo returns it to the stable revision 2.
    assert_eq!(rollback_target(&spec("3", true), &st, None).unwrap().revision, "2");
    // The spec names stable 2: undo goes to the served revision before it.
    assert_eq!(rollback_target(&spec("2", true), &st, None).unwrap().revision, "1");
    let to2 = rollback_target(&spec("3", true), &st, Some("2")).unwrap();
    assert_eq!(to2.model.as_ref().unwrap().uri, "pvc://models/minilm-2");
    let err = rollback_target(&spec("3", true), &st, Some("3")).unwrap_err();
    assert!(err.contains("never served") && err.contains("1, 2"), "{err}");
}

#[test]
fn a_canary_nobody_can_judge_is_rolled_back_at_its_progress_deadline() {
    let (s2, mut st) = canary_of_revision_2();
    assert_eq!(s2.rollout.as_ref().unwrap().analysis.progress_deadline_seconds, 600, "default");
    // The canary never became ready: it serves no calls, so the step waits for minCalls...
    let (stable, idle) = (good(500.0, 0.9), good(0.0, 0.9));
    let t = step(&s2, &mut st, Some(30.0 + 599.0), Some((&stable, &idle)));
    assert!(matches!(&t, Transition::Hold { reason } if reason.contains("calls")), "{t:?}");
    // ... until the pause (30 s) plus the deadline (600 s) have passed.
    let t = step(&s2, &mut st, Some(30.0 + 600.0), Some((&stable, &idle)));
    let Transition::RollBack { reason } = t else { panic!("{t:?}") };
    assert!(reason.contains("no verdict 630s into step 1") && reason.contains("calls"), "{reason}");
    assert_eq!(st.current_revision.as_deref(), Some("1"));
    assert_eq!(st.history.last().unwrap().outcome, outcome::ROLLED_BACK);
    // Metrics that stay unavailable end the same way.
    let s3 = spec("3", true);
    step(&s3, &mut st, None, None);
    assert!(matches!(step(&s3, &mut st, Some(100.0), None), Transition::Hold { .. }));
    let t = step(&s3, &mut st, Some(700.0), None);
    assert!(matches!(&t, Transition::RollBack { reason } if reason.contains("unavailable")), "{t:?}");
}
