//! Standard Kubernetes-style conditions (`type`, `status`, `reason`, `message`,
//! `lastTransitionTime`, `observedGeneration`), with the merge rule that keeps the
//! transition time unless the status really changed, so a re-reconcile never fakes a transition.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition types Prism sets. Kept as constants (not an enum) so that readers accept
/// conditions written by newer versions.
pub mod types {
    pub const READY: &str = "Ready";
    pub const AVAILABLE: &str = "Available";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
    pub const SCALING_LIMITED: &str = "ScalingLimited";
    pub const METRICS_UNAVAILABLE: &str = "MetricsUnavailable";
    pub const RECONCILIATION_PAUSED: &str = "ReconciliationPaused";
    /// A ModalityNode's distributed fine-tuning run (`spec.adaptation`) is in progress.
    pub const TRAINING: &str = "Training";
}

/// Status of a condition: `True`, `False` or `Unknown`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, Default)]
pub enum ConditionStatus {
    True,
    False,
    #[default]
    Unknown,
}

impl ConditionStatus {
    pub fn from_bool(b: bool) -> Self {
        if b {
            Self::True
        } else {
            Self::False
        }
    }
}

/// One observation about the resource, in the shape `kubectl wait --for=condition=X` understands.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`, `Available`, `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// One CamelCase word a program can match on.
    pub reason: String,
    /// What happened and, when it is bad, what to do about it.
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time at which `status` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Condition {
    pub fn new(type_: &str, status: ConditionStatus, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_: type_.to_string(),
            status,
            reason: reason.to_string(),
            message: message.into(),
            last_transition_time: None,
            observed_generation: None,
        }
    }

    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Merges freshly computed conditions into the previous set.
///
/// `lastTransitionTime` is carried over from the old condition when the status is unchanged
/// and set to `now` otherwise; `observedGeneration` is stamped on every condition. Conditions
/// present only in `old` are dropped: the new set is authoritative. The output is sorted by
/// type so the written status does not churn between reconciles.
pub fn merge(old: &[Condition], new: Vec<Condition>, now: &str, generation: Option<i64>) -> Vec<Condition> {
    let mut out: Vec<Condition> = new
        .into_iter()
        .map(|mut c| {
            c.observed_generation = generation;
            c.last_transition_time = match find(old, &c.type_) {
                Some(prev) if prev.status == c.status => {
                    prev.last_transition_time.clone().or_else(|| Some(now.to_string()))
                }
                _ => Some(now.to_string()),
            };
            c
        })
        .collect();
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// Combines what several sources report (one builder per source: the Deployment, the rollout,
/// the adaptation run ...) into one condition per type, in the style of stackable operator-rs:
/// the more alarming status wins (False for Ready and Available, True for every other type,
/// where True means something is going on), and between equals the source listed first wins.
/// List the most specific source first.
pub fn combine(sources: impl IntoIterator<Item = Vec<Condition>>) -> Vec<Condition> {
    let alarm = |c: &Condition| {
        let good_when_true = c.type_ == types::READY || c.type_ == types::AVAILABLE;
        match (c.status, good_when_true) {
            (ConditionStatus::Unknown, _) => 1,
            (ConditionStatus::True, true) | (ConditionStatus::False, false) => 0,
            _ => 2,
        }
    };
    let mut out: Vec<Condition> = Vec::new();
    for c in sources.into_iter().flatten() {
        match out.iter_mut().find(|o| o.type_ == c.type_) {
            Some(o) if alarm(&c) > alarm(o) => *o = c,
            Some(_) => {}
            None => out.push(c),
        }
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_keeps_transition_time_when_status_is_unchanged() {
        let mut old = Condition::new(types::READY, ConditionStatus::True, "Ready", "");
        old.last_transition_time = Some("2026-01-01T00:00:00Z".into());
        let new = vec![Condition::new(types::READY, ConditionStatus::True, "Ready", "still")];
        let merged = merge(&[old], new, "2026-02-02T00:00:00Z", Some(3));
        assert_eq!(merged[0].last_transition_time.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(merged[0].observed_generation, Some(3));
    }

    #[test]
    fn merge_stamps_transition_time_when_status_flips() {
        let mut old = Condition::new(types::READY, ConditionStatus::True, "Ready", "");
        old.last_transition_time = Some("2026-01-01T00:00:00Z".into());
        let new = vec![
            Condition::new(types::READY, ConditionStatus::False, "NoReplicas", "0/2 ready"),
            Condition::new(types::DEGRADED, ConditionStatus::True, "MissingModality", "audio"),
        ];
        let merged = merge(&[old], new, "2026-02-02T00:00:00Z", None);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].type_, "Degraded");
        let ready = find(&merged, "Ready").unwrap();
        assert_eq!(ready.last_transition_time.as_deref(), Some("2026-02-02T00:00:00Z"));
    }

    #[test]
    fn combine_keeps_the_most_alarming_report_of_each_type_and_the_first_source_on_ties() {
        let c = |t: &str, s: ConditionStatus, r: &str| Condition::new(t, s, r, "");
        use ConditionStatus::{False, True};
        let rollout = vec![c(types::PROGRESSING, True, "CanaryInProgress"), c(types::DEGRADED, True, "RolledBack")];
        let deployment = vec![
            c(types::PROGRESSING, True, "RollingOut"),
            c(types::DEGRADED, False, "AsExpected"),
            c(types::READY, True, "ReplicasReady"),
            c(types::AVAILABLE, True, "ReplicasAvailable"),
        ];
        let other = vec![c(types::READY, False, "PodsFailing"), c(types::DEGRADED, True, "ReplicaFailure")];
        let out = combine([rollout, deployment, other]);
        let reason = |t| find(&out, t).map(|c| c.reason.as_str());
        assert_eq!(reason(types::PROGRESSING), Some("CanaryInProgress"), "a tie goes to the first source");
        assert_eq!(reason(types::DEGRADED), Some("RolledBack"));
        assert_eq!(reason(types::READY), Some("PodsFailing"), "Ready=False outranks Ready=True");
        assert_eq!(reason(types::AVAILABLE), Some("ReplicasAvailable"));
        let types: Vec<&str> = out.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, ["Available", "Degraded", "Progressing", "Ready"], "one per type, sorted");
    }
}
