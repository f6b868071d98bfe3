//! Canary rollouts of model revisions: the pure state machine both substrates drive (the
//! operator with a canary Deployment and Prometheus, `prism up` with canary processes and the
//! router's own metrics).
//!
//! ```text
//!   spec.model == stable ........................ nothing to do
//!   spec.model != stable, no spec.rollout ....... Promote at once (plain rolling update)
//!   spec.model was promoted before .............. Promote at once (a rollback to a known revision)
//!   spec.model was rolled back .................. Hold: stable keeps serving until the spec changes
//!   otherwise ................................... Start canary at steps[0]
//!   canary, step paused long enough ............. judge: Fail -> RollBack, Pass -> next step
//!                                                 or Promote after the last, Wait -> hold
//! ```
//!
//! The stable revision's model is kept in `status.history` (the newest `Deployed`/`Promoted`
//! record of `status.currentRevision`), so the stable Deployment can be rebuilt while the spec
//! already names the canary, and `prism rollback` can put any recorded revision back.

use prism_api::condition::{types, Condition, ConditionStatus};
use prism_api::node::{CanaryStatus, ModalityNodeSpec, ModalityNodeStatus, ModelSpec, RevisionRecord, RolloutAnalysis};

/// Outcomes written into `status.history`.
pub mod outcome {
    pub const DEPLOYED: &str = "Deployed";
    pub const PROMOTED: &str = "Promoted";
    pub const ROLLED_BACK: &str = "RolledBack";
    pub const SUPERSEDED: &str = "Superseded";
}

/// Records kept in `status.history` (oldest dropped first).
pub const HISTORY_LIMIT: usize = 20;

/// Absolute slack on p95 latency before the ratio counts: at a few milliseconds, histogram
/// bucket width and scheduling noise alone exceed 1.5x.
pub const LATENCY_SLACK_S: f64 = 0.005;

/// What one revision did, as read from the routers' metrics (calls and failures since the
/// canary started; corrections over the revision's whole life).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RevisionStats {
    pub calls: f64,
    pub failures: f64,
    pub p95_s: Option<f64>,
    pub corrections: f64,
    pub rating_sum: f64,
}

impl RevisionStats {
    pub fn error_rate(&self) -> f64 {
        let total = self.calls + self.failures;
        if total > 0.0 {
            self.failures / total
        } else {
            0.0
        }
    }

    /// Mean correction rating (1 = every corrected answer was right).
    pub fn accuracy(&self) -> Option<f64> {
        (self.corrections > 0.0).then(|| self.rating_sum / self.corrections)
    }
}

/// The analysis of one step.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Pass(String),
    Fail(String),
    /// Not enough data yet.
    Wait(String),
}

/// Compares the canary against stable with the spec's thresholds. Failures are checked before
/// the call count, so a canary that fails every call is rolled back without waiting.
pub fn judge(a: &RolloutAnalysis, stable: &RevisionStats, canary: &RevisionStats) -> Verdict {
    let (se, ce) = (stable.error_rate(), canary.error_rate());
    let canary_total = canary.calls + canary.failures;
    let error_rate_worse = (ce - se > a.max_error_rate_increase).then(|| {
        format!(
            "error rate {:.1}% vs stable {:.1}% (more than +{:.1} points) over {canary_total} calls",
            ce * 100.0,
            se * 100.0,
            a.max_error_rate_increase * 100.0
        )
    });
    // Three failures are enough to judge a failing canary before it has served `minCalls`.
    if let Some(why) = error_rate_worse.clone().filter(|_| canary.failures >= 3.0) {
        return Verdict::Fail(why);
    }
    if let (Some(sa), Some(ca)) = (stable.accuracy(), canary.accuracy()) {
        let min = f64::from(a.min_corrections);
        if stable.corrections >= min && canary.corrections >= min && sa - ca > a.max_accuracy_drop {
            return Verdict::Fail(format!(
                "accuracy from corrections {ca:.3} ({} corrections) vs stable {sa:.3} ({}): dropped more than {}",
                canary.corrections, stable.corrections, a.max_accuracy_drop
            ));
        }
    }
    if canary_total < f64::from(a.min_calls) {
        return Verdict::Wait(format!("canary served {canary_total} of the {} calls analysis needs", a.min_calls));
    }
    if let Some(why) = error_rate_worse {
        return Verdict::Fail(why);
    }
    if let (Some(sp), Some(cp)) = (stable.p95_s, canary.p95_s) {
        if cp + LATENCY_SLACK_S > a.max_latency_ratio * (sp + LATENCY_SLACK_S) {
            return Verdict::Fail(format!(
                "p95 {:.1} ms vs stable {:.1} ms: more than {}x (+{} ms slack)",
                cp * 1000.0,
                sp * 1000.0,
                a.max_latency_ratio,
                LATENCY_SLACK_S * 1000.0
            ));
        }
    }
    let acc = match (stable.accuracy(), canary.accuracy()) {
        (Some(s), Some(c)) => format!(", accuracy {c:.3} vs {s:.3}"),
        _ => String::new(),
    };
    Verdict::Pass(format!("{canary_total} calls, error rate {:.1}% vs {:.1}%{acc}", ce * 100.0, se * 100.0))
}

/// What the rollout does at this moment.
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    None,
    /// First revision of the node.
    Deploy,
    /// Begin (or, after a superseded canary, restart) a canary of `spec.model`.
    Start {
        superseded: Option<String>,
    },
    /// Move the canary to `step`.
    Advance {
        step: u32,
        reason: String,
    },
    /// `spec.model` becomes stable (canary passed, or no canary was needed).
    Promote {
        reason: String,
    },
    /// The canary is removed; stable keeps serving; the spec's revision is not retried.
    RollBack {
        reason: String,
    },
    /// The canary waits (more data, or its pause is not over).
    Hold {
        reason: String,
    },
}

/// The model serving stable traffic: the newest `Deployed`/`Promoted` record of
/// `status.currentRevision`.
pub fn stable_model(status: &ModalityNodeStatus) -> Option<&ModelSpec> {
    let current = status.current_revision.as_deref()?;
    status
        .history
        .iter()
        .rev()
        .find(|r| r.revision == current && (r.outcome == outcome::DEPLOYED || r.outcome == outcome::PROMOTED))
        .and_then(|r| r.model.as_ref())
}

fn latest_record<'a>(status: &'a ModalityNodeStatus, model: &ModelSpec) -> Option<&'a RevisionRecord> {
    status.history.iter().rev().find(|r| r.revision == model.revision && r.model.as_ref() == Some(model))
}

/// The model the stable replicas must run: the recorded stable one during a rollout, the
/// spec's otherwise (first deploy, or no history yet).
pub fn serving_model<'a>(spec: &'a ModalityNodeSpec, status: Option<&'a ModalityNodeStatus>) -> &'a ModelSpec {
    status.and_then(stable_model).unwrap_or(&spec.model)
}

/// Seconds since the current canary step began; None without a canary. A start time that does
/// not parse counts as now.
pub fn step_elapsed(status: &ModalityNodeStatus, now: chrono::DateTime<chrono::Utc>) -> Option<f64> {
    status.canary.as_ref().map(|c| {
        chrono::DateTime::parse_from_rfc3339(&c.step_started)
            .map(|t| (now - t.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 1000.0)
            .unwrap_or(0.0)
    })
}

/// Decides the transition. `elapsed_s`: seconds since the current canary step began (None when
/// no canary). `stats`: (stable, canary) figures, None when they could not be read.
pub fn decide(
    spec: &ModalityNodeSpec,
    status: &ModalityNodeStatus,
    elapsed_s: Option<f64>,
    stats: Option<(&RevisionStats, &RevisionStats)>,
) -> Transition {
    let Some(stable) = stable_model(status) else { return Transition::Deploy };
    let want = &spec.model;
    if want == stable {
        return match &status.canary {
            Some(c) => Transition::RollBack { reason: format!("spec returned to stable revision {}", c.revision) },
            None => Transition::None,
        };
    }
    let Some(rollout) = &spec.rollout else {
        return Transition::Promote { reason: "no spec.rollout: replaced without a canary".into() };
    };
    if let Some(c) = &status.canary {
        if c.revision != want.revision {
            return Transition::Start { superseded: Some(c.revision.clone()) };
        }
        let step = c.step as usize;
        let Some(s) = rollout.steps.get(step) else {
            return Transition::Promote { reason: "rollout steps were shortened past the current one".into() };
        };
        let elapsed = elapsed_s.unwrap_or(0.0);
        if elapsed < f64::from(s.pause_seconds) {
            // Failures do not wait for the pause: a broken canary leaves as soon as it is seen.
            if let Some((st, ca)) = stats {
                if let Verdict::Fail(why) = judge(&rollout.analysis, st, ca) {
                    return Transition::RollBack { reason: why };
                }
            }
            return Transition::Hold {
                reason: format!(
                    "step {}/{} at {}%: {:.0}s of {}s",
                    step + 1,
                    rollout.steps.len(),
                    s.weight,
                    elapsed,
                    s.pause_seconds
                ),
            };
        }
        // Undecided past the deadline: a canary nobody can judge is not left half-deployed.
        let deadline = f64::from(s.pause_seconds) + f64::from(rollout.analysis.progress_deadline_seconds);
        let undecided = |why: String| {
            if elapsed >= deadline {
                Transition::RollBack {
                    reason: format!(
                        "no verdict {elapsed:.0}s into step {} (pause {}s + progressDeadlineSeconds {}): {why}",
                        step + 1,
                        s.pause_seconds,
                        rollout.analysis.progress_deadline_seconds
                    ),
                }
            } else {
                Transition::Hold { reason: why }
            }
        };
        let Some((st, ca)) = stats else {
            return undecided("metrics of the canary are unavailable".into());
        };
        return match judge(&rollout.analysis, st, ca) {
            Verdict::Fail(why) => Transition::RollBack { reason: why },
            Verdict::Wait(why) => undecided(why),
            Verdict::Pass(why) if step + 1 >= rollout.steps.len() => {
                Transition::Promote { reason: format!("canary passed every step: {why}") }
            }
            Verdict::Pass(why) => Transition::Advance { step: step as u32 + 1, reason: why },
        };
    }
    match latest_record(status, want) {
        Some(r) if r.outcome == outcome::ROLLED_BACK => Transition::None,
        Some(r) if r.outcome == outcome::PROMOTED || r.outcome == outcome::DEPLOYED => Transition::Promote {
            reason: format!("revision {} served before: restored without a canary", want.revision),
        },
        _ => Transition::Start { superseded: None },
    }
}

/// Why a rolled-back spec is not being served, for a condition (None when it is).
pub fn held_back(spec: &ModalityNodeSpec, status: &ModalityNodeStatus) -> Option<String> {
    let stable = stable_model(status)?;
    if &spec.model == stable || status.canary.is_some() {
        return None;
    }
    let r = latest_record(status, &spec.model).filter(|r| r.outcome == outcome::ROLLED_BACK)?;
    Some(format!(
        "revision {} was rolled back ({}); revision {} keeps serving. Set spec.model.revision to a new value to try again, or run `prism rollback` to return the spec to a recorded revision",
        r.revision,
        r.reason,
        status.current_revision.as_deref().unwrap_or("?")
    ))
}

/// The rollout's conditions: Progressing while a canary takes part of the traffic, Degraded
/// while the spec names a revision that was rolled back.
pub fn conditions(spec: &ModalityNodeSpec, status: &ModalityNodeStatus) -> Vec<Condition> {
    let mut out = Vec::new();
    if let Some(c) = &status.canary {
        out.push(Condition::new(
            types::PROGRESSING,
            ConditionStatus::True,
            "CanaryInProgress",
            format!(
                "canary of revision {} takes {}% of traffic (step {}); revision {} serves the rest",
                c.revision,
                c.weight,
                c.step + 1,
                status.current_revision.as_deref().unwrap_or("?")
            ),
        ));
    }
    if let Some(why) = held_back(spec, status) {
        out.push(Condition::new(types::DEGRADED, ConditionStatus::True, "RolledBack", why));
    }
    out
}

/// The recorded revision `prism rollout undo` puts back into the spec: `to` when given (any
/// revision of the history that was served: Deployed or Promoted); else the stable revision when
/// the spec names another one (a canary in flight or a rolled-back revision), else the newest
/// served revision before the current one.
pub fn rollback_target<'a>(
    spec: &ModalityNodeSpec,
    status: &'a ModalityNodeStatus,
    to: Option<&str>,
) -> Result<&'a RevisionRecord, String> {
    let served =
        |r: &&RevisionRecord| (r.outcome == outcome::DEPLOYED || r.outcome == outcome::PROMOTED) && r.model.is_some();
    let current = status.current_revision.as_deref();
    let spec_is_stable = stable_model(status) == Some(&spec.model);
    let found = match to {
        Some(rev) => status.history.iter().rev().filter(served).find(|r| r.revision == rev),
        None if !spec_is_stable => {
            status.history.iter().rev().filter(served).find(|r| Some(r.revision.as_str()) == current)
        }
        None => status.history.iter().rev().filter(served).find(|r| Some(r.revision.as_str()) != current),
    };
    found.ok_or_else(|| {
        let known: Vec<&str> = status.history.iter().filter(served).map(|r| r.revision.as_str()).collect();
        match to {
            Some(rev) => {
                format!("revision {rev} was never served (served revisions in status.history: {})", known.join(", "))
            }
            None => format!("no earlier served revision in status.history (served: {})", known.join(", ")),
        }
    })
}

fn record(
    status: &mut ModalityNodeStatus,
    revision: &str,
    outcome: &str,
    reason: &str,
    model: Option<ModelSpec>,
    now: &str,
) {
    status.history.push(RevisionRecord {
        revision: revision.to_string(),
        outcome: outcome.to_string(),
        model,
        reason: reason.to_string(),
        time: now.to_string(),
    });
    let extra = status.history.len().saturating_sub(HISTORY_LIMIT);
    status.history.drain(..extra);
}

/// Applies a transition to the status (current revision, canary, history). Returns a one-line
/// description for an Event, or None when nothing changed.
pub fn apply(spec: &ModalityNodeSpec, status: &mut ModalityNodeStatus, t: &Transition, now: &str) -> Option<String> {
    let want = &spec.model;
    let first_step = |s: &ModalityNodeSpec| s.rollout.as_ref().and_then(|r| r.steps.first()).map_or(100, |s| s.weight);
    match t {
        Transition::None | Transition::Hold { .. } => None,
        Transition::Deploy => {
            status.current_revision = Some(want.revision.clone());
            status.canary = None;
            record(status, &want.revision, outcome::DEPLOYED, "first revision", Some(want.clone()), now);
            Some(format!("revision {} deployed", want.revision))
        }
        Transition::Start { superseded } => {
            if let Some(old) = superseded {
                let model = status.history.iter().rev().find(|r| &r.revision == old).and_then(|r| r.model.clone());
                record(
                    status,
                    old,
                    outcome::SUPERSEDED,
                    &format!("replaced by revision {}", want.revision),
                    model,
                    now,
                );
            }
            status.canary = Some(CanaryStatus {
                revision: want.revision.clone(),
                step: 0,
                weight: first_step(spec),
                step_started: now.into(),
            });
            Some(format!(
                "canary of revision {} started at {}% (stable: {})",
                want.revision,
                first_step(spec),
                status.current_revision.as_deref().unwrap_or("?")
            ))
        }
        Transition::Advance { step, reason } => {
            let weight = spec.rollout.as_ref().and_then(|r| r.steps.get(*step as usize)).map_or(100, |s| s.weight);
            let c = status.canary.as_mut()?;
            c.step = *step;
            c.weight = weight;
            c.step_started = now.into();
            Some(format!("canary of revision {} advanced to {weight}% ({reason})", want.revision))
        }
        Transition::Promote { reason } => {
            let from = status.current_revision.replace(want.revision.clone());
            status.canary = None;
            record(status, &want.revision, outcome::PROMOTED, reason, Some(want.clone()), now);
            Some(format!("revision {} promoted over {} ({reason})", want.revision, from.as_deref().unwrap_or("?")))
        }
        Transition::RollBack { reason } => {
            let c = status.canary.take()?;
            let model = (c.revision == want.revision).then(|| want.clone());
            record(status, &c.revision, outcome::ROLLED_BACK, reason, model, now);
            Some(format!(
                "canary of revision {} rolled back: {reason}; revision {} keeps serving",
                c.revision,
                status.current_revision.as_deref().unwrap_or("?")
            ))
        }
    }
}

#[cfg(test)]
mod tests;
