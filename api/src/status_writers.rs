//! The two halves of [`ModalityNodeStatus`], one per field manager. Each writer server-side
//! applies its whole struct, so the API server records one owner per field: a field a writer
//! leaves out of its apply (say `canary` once a canary ends) is deleted, and a writer can never
//! overwrite the other's fields with a stale copy it read earlier. `conditions` is a list-map
//! keyed by `type`, so each writer owns the condition types it applies.
//!
//! [`ModalityNodeStatus`] stays the read side (and the CRD schema); the test below checks that
//! the two halves cover its fields exactly once.

use serde::Serialize;

use crate::condition::{types, Condition};
use crate::node::{AdaptationStatus, CanaryStatus, ModalityNodeStatus, RevisionRecord, ScaleEvent};

/// Field manager of the builtin autoscaler's status writes (the node controller's is
/// [`crate::labels::FIELD_MANAGER`]).
pub const AUTOSCALER_FIELD_MANAGER: &str = "prism-autoscaler";

/// What the node controller writes: the Deployment it observed, the rollout and the adaptation.
#[derive(Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeControllerStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    pub replicas: i32,
    pub ready_replicas: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryStatus>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<RevisionRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adaptation: Option<AdaptationStatus>,
    pub conditions: Vec<Condition>,
}

impl NodeControllerStatus {
    /// Condition types the node controller can write.
    pub const CONDITION_TYPES: [&'static str; 5] =
        [types::AVAILABLE, types::DEGRADED, types::PROGRESSING, types::READY, types::TRAINING];

    /// This writer's part of an observed status: equal to a freshly computed one when applying
    /// it would change nothing.
    pub fn observed(st: &ModalityNodeStatus) -> Self {
        Self {
            observed_generation: st.observed_generation,
            replicas: st.replicas,
            ready_replicas: st.ready_replicas,
            selector: st.selector.clone(),
            current_revision: st.current_revision.clone(),
            canary: st.canary.clone(),
            history: st.history.clone(),
            adaptation: st.adaptation.clone(),
            conditions: own_conditions(&st.conditions, &Self::CONDITION_TYPES),
        }
    }
}

/// What the builtin autoscaler writes: its decision and the conditions that explain it.
#[derive(Serialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalerStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p95: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_scale: Option<ScaleEvent>,
    pub conditions: Vec<Condition>,
}

impl AutoscalerStatus {
    /// Condition types the autoscaler can write.
    pub const CONDITION_TYPES: [&'static str; 2] = [types::METRICS_UNAVAILABLE, types::SCALING_LIMITED];

    /// This writer's part of an observed status.
    pub fn observed(st: &ModalityNodeStatus) -> Self {
        Self {
            desired_replicas: st.desired_replicas,
            p95: st.p95.clone(),
            last_scale: st.last_scale.clone(),
            conditions: own_conditions(&st.conditions, &Self::CONDITION_TYPES),
        }
    }
}

fn own_conditions(all: &[Condition], types: &[&str]) -> Vec<Condition> {
    let mut own: Vec<Condition> = all.iter().filter(|c| types.contains(&c.type_.as_str())).cloned().collect();
    own.sort_by(|a, b| a.type_.cmp(&b.type_));
    own
}

/// The SSA body of a status write to a ModalityNode.
pub fn apply_body<S: Serialize>(status: &S) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": format!("{}/{}", crate::GROUP, crate::VERSION),
        "kind": "ModalityNode",
        "status": status,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::condition::ConditionStatus;

    fn keys(v: serde_json::Value) -> BTreeSet<String> {
        v.as_object().expect("an object").keys().cloned().collect()
    }

    fn full_status() -> ModalityNodeStatus {
        let cond = |t: &str| Condition::new(t, ConditionStatus::True, "Because", "");
        let rev = RevisionRecord {
            revision: "r1".into(),
            outcome: "Deployed".into(),
            time: "t".into(),
            reason: String::new(),
            model: None,
        };
        ModalityNodeStatus {
            observed_generation: Some(2),
            replicas: 1,
            ready_replicas: 1,
            desired_replicas: Some(1),
            selector: Some("s".into()),
            current_revision: Some("r1".into()),
            canary: Some(CanaryStatus { revision: "r2".into(), step: 0, weight: 10, step_started: "t".into() }),
            history: vec![rev],
            p95: Some("9ms".into()),
            last_scale: Some(ScaleEvent { time: "t".into(), from: 1, to: 2, reason: "load".into() }),
            adaptation: Some(AdaptationStatus::default()),
            conditions: NodeControllerStatus::CONDITION_TYPES
                .iter()
                .chain(AutoscalerStatus::CONDITION_TYPES.iter())
                .map(|t| cond(t))
                .collect(),
        }
    }

    #[test]
    fn every_status_field_and_condition_type_has_exactly_one_writer() {
        let st = full_status();
        let all = keys(serde_json::to_value(&st).unwrap());
        let ctrl = keys(serde_json::to_value(NodeControllerStatus::observed(&st)).unwrap());
        let auto = keys(serde_json::to_value(AutoscalerStatus::observed(&st)).unwrap());
        let shared: BTreeSet<_> = ctrl.intersection(&auto).cloned().collect();
        assert_eq!(shared, BTreeSet::from(["conditions".to_string()]), "only the list-map is shared");
        assert_eq!(&ctrl | &auto, all, "a status field nobody writes, or one the read side lacks");
        // The CRD schema is the read side: a field added there needs a writer here.
        let schema = serde_json::to_value(schemars::schema_for!(ModalityNodeStatus)).unwrap();
        assert_eq!(keys(schema["properties"].clone()), all);
        for t in NodeControllerStatus::CONDITION_TYPES {
            assert!(!AutoscalerStatus::CONDITION_TYPES.contains(&t), "{t} has two writers");
        }
    }

    #[test]
    fn a_writers_view_keeps_only_its_own_conditions_sorted() {
        let st = full_status();
        let auto = AutoscalerStatus::observed(&st);
        let types: Vec<&str> = auto.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, [types::METRICS_UNAVAILABLE, types::SCALING_LIMITED]);
        assert_eq!(NodeControllerStatus::observed(&st).conditions.len(), 5);
    }

    #[test]
    fn an_ended_canary_is_left_out_of_the_apply_so_the_api_server_drops_it() {
        let mut st = NodeControllerStatus::observed(&full_status());
        st.canary = None;
        let body = apply_body(&st);
        assert_eq!(body["apiVersion"], "prism.dev/v1alpha1");
        assert!(body["status"].get("canary").is_none());
        assert!(body["status"].get("desiredReplicas").is_none(), "the autoscaler's field stays out");
    }
}
