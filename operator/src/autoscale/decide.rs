//! The autoscaling decision: metrics in, replica count out. Pure (the clock is an argument), so
//! the operator, `prism up` and the unit tests all drive the same code.
//!
//! Knative KPA shape: Prometheus averages each metric over a *stable* window and a short *panic*
//! window. Normally the stable window decides; when the panic window asks for
//! `panicThreshold` x the ready replicas, panic mode scales out at once and refuses to scale
//! down until a full stable window passes without another panic. Scale-down also waits for
//! `scaleDownStabilizationSeconds` (the highest recommendation in that window wins, as in HPA),
//! steps are capped at `maxStep`, and the result stays within `[min, max]`.

use std::collections::VecDeque;

use prism_api::node::{AutoscalingSpec, ReplicaSpec};

/// Within ±10% of the target nothing changes (HPA's default tolerance), so noise never scales.
pub const TOLERANCE: f64 = 0.1;

/// One node's load over one window, as Prometheus reports it.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct WindowLoad {
    /// p95 request latency in ms; `None` when no request finished in the window.
    pub p95_ms: Option<f64>,
    /// Requests in flight, averaged over the window and summed over replicas.
    pub inflight: f64,
    /// GPU utilisation (0..1) averaged over the window and the replicas; `None` when no replica
    /// reports one (CPU nodes export no GPU series) or no target asks for it.
    pub gpu_utilization: Option<f64>,
}

/// The two windows the decision reads.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Load {
    pub stable: WindowLoad,
    pub panic: WindowLoad,
}

/// A metrics read: the load, or why there is none. "None" is never read as zero load.
#[derive(Clone, Debug, PartialEq)]
pub enum Reading {
    Load(Load),
    Unavailable(String),
}

/// What one node's autoscaler remembers between decisions.
#[derive(Clone, Debug, Default)]
pub struct ScalerState {
    /// (time in s, recommendation) within the scale-down stabilization window.
    recommendations: VecDeque<(f64, i32)>,
    /// Panic mode lasts until this time unless triggered again.
    panic_until: Option<f64>,
}

impl ScalerState {
    pub fn in_panic(&self, now: f64) -> bool {
        self.panic_until.is_some_and(|t| now < t)
    }
}

/// The observed replica counts a decision starts from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Replicas {
    /// What runs (or is asked to run) now.
    pub current: i32,
    /// Of those, how many pass readiness: load is spread over these.
    pub ready: i32,
}

/// One decision, with the words a human needs to trust it.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub from: i32,
    pub to: i32,
    /// Why, with the numbers (status.lastScale.reason, the Event's note).
    pub reason: String,
    pub panic: bool,
    /// Set when the read failed or was empty: replicas are held (`MetricsUnavailable`).
    pub metrics_unavailable: Option<String>,
    /// Set when min/max/maxStep cut the recommendation (`ScalingLimited`).
    pub limited: Option<String>,
    /// The stable window's p95, for status (`p95`) and `prism status`.
    pub p95_ms: Option<f64>,
}

impl Decision {
    pub fn changed(&self) -> bool {
        self.from != self.to
    }

    fn hold(r: Replicas, reason: impl Into<String>) -> Self {
        Self {
            from: r.current,
            to: r.current,
            reason: reason.into(),
            panic: false,
            metrics_unavailable: None,
            limited: None,
            p95_ms: None,
        }
    }
}

/// Replicas one window's load asks for, with the metric that asked for the most, in words.
/// `None` when the spec names no target (nothing to scale on).
fn recommend(spec: &AutoscalingSpec, load: &WindowLoad, r: Replicas, window_s: u32) -> Option<(i32, String)> {
    // Within tolerance nothing changes; ratios are per *ready* replica (they carry the load).
    let (current, ready_f) = (r.current, f64::from(r.ready.max(1)));
    let mut best: Option<(i32, String)> = None;
    let mut consider = |n: i32, why: String| {
        if best.as_ref().is_none_or(|(b, _)| n > *b) {
            best = Some((n, why));
        }
    };
    if let Some(t) = spec.target_inflight {
        let per_replica = load.inflight / ready_f;
        let ratio = per_replica / f64::from(t);
        let n = if (ratio - 1.0).abs() <= TOLERANCE { current } else { (load.inflight / f64::from(t)).ceil() as i32 };
        consider(n, format!("in-flight {:.1} per replica vs target {t} over {window_s}s", per_replica));
    }
    if let Some(t) = spec.target_latency_p95_ms {
        match load.p95_ms {
            Some(p) => {
                let ratio = p / f64::from(t);
                let n = if (ratio - 1.0).abs() <= TOLERANCE { current } else { (ready_f * ratio).ceil() as i32 };
                consider(n, format!("p95 {p:.0}ms vs target {t}ms over {window_s}s"));
            }
            // No request finished: no latency pressure (in-flight covers stuck requests).
            None => consider(0, format!("no requests finished in {window_s}s")),
        }
    }
    // Absent (CPU replicas, or no sample yet) is ignored rather than read as an idle GPU, which
    // would otherwise pull a latency- or load-driven count down.
    if let (Some(t), Some(u)) = (spec.target_gpu_utilization.filter(|t| *t > 0.0), load.gpu_utilization) {
        let ratio = u / t;
        let n = if (ratio - 1.0).abs() <= TOLERANCE { current } else { (ready_f * ratio).ceil() as i32 };
        consider(n, format!("GPU utilization {:.0}% vs target {:.0}% over {window_s}s", u * 100.0, t * 100.0));
    }
    best
}

/// Decides the replica count for one node at time `now` (seconds, any monotonic origin).
pub fn decide(
    spec: &AutoscalingSpec,
    bounds: &ReplicaSpec,
    state: &mut ScalerState,
    now: f64,
    replicas: Replicas,
    reading: &Reading,
) -> Decision {
    if spec.paused {
        return Decision::hold(replicas, "autoscaling is paused (spec.autoscaling.paused)");
    }
    let load = match reading {
        Reading::Unavailable(why) => {
            let mut d = Decision::hold(replicas, format!("holding {} replicas: {why}", replicas.current));
            d.metrics_unavailable = Some(why.clone());
            return d;
        }
        Reading::Load(l) => l,
    };
    if replicas.ready == 0 && replicas.current > 0 {
        let mut d = Decision::hold(replicas, "waiting for a ready replica before reading load per replica");
        d.p95_ms = load.stable.p95_ms;
        return d;
    }
    let Some((stable_n, stable_why)) = recommend(spec, &load.stable, replicas, spec.stable_window_seconds) else {
        return if spec.target_gpu_utilization.is_some_and(|t| t > 0.0) {
            // Only a GPU target, and no replica reports GPU utilisation: nothing to scale on.
            Decision::hold(
                replicas,
                format!(
                    "holding {} replicas: targetGpuUtilization is set but no replica reports prism_node_gpu_utilization_ratio (CPU replicas?)",
                    replicas.current
                ),
            )
        } else {
            Decision::hold(replicas, "no target set (targetLatencyP95Ms, targetInflight or targetGpuUtilization)")
        };
    };
    let (panic_n, panic_why) =
        recommend(spec, &load.panic, replicas, spec.panic_window_seconds).unwrap_or((stable_n, String::new()));

    // Panic: the short window asks for panicThreshold x what is ready.
    if f64::from(panic_n) >= spec.panic_threshold * f64::from(replicas.ready.max(1)) && panic_n > replicas.current {
        state.panic_until = Some(now + f64::from(spec.stable_window_seconds));
    }
    let panic = state.in_panic(now);
    let (mut want, mut why) = if panic {
        // In panic the count only grows, driven by whichever window asks for more.
        let (n, w) = if panic_n >= stable_n { (panic_n, panic_why) } else { (stable_n, stable_why) };
        (n.max(replicas.current), format!("panic: {w}"))
    } else {
        (stable_n, stable_why)
    };

    // Replicas still starting carry no load yet: shrinking now would undo the last scale-out.
    if want < replicas.current && replicas.ready < replicas.current {
        want = replicas.current;
        why = format!("{why}; {} of {} replicas still starting", replicas.current - replicas.ready, replicas.current);
    }

    // Scale-down stabilization: the highest recommendation of the window wins.
    let window = f64::from(spec.scale_down_stabilization_seconds);
    state.recommendations.push_back((now, want));
    while state.recommendations.front().is_some_and(|(t, _)| *t < now - window) {
        state.recommendations.pop_front();
    }
    if want < replicas.current {
        let highest = state.recommendations.iter().map(|(_, n)| *n).max().unwrap_or(want);
        if highest > want {
            why = format!("{why}; scale-down stabilized at {highest} over {}s", spec.scale_down_stabilization_seconds);
            want = highest.min(replicas.current);
        }
    }

    // Limits: step, then [min, max] (the latter always wins, also over a manual edit).
    let (lo, hi) = (bounds.min.max(0), bounds.max.max(bounds.min.max(0)));
    let step = spec.max_step.max(1);
    let mut to = want.clamp(replicas.current - step, replicas.current + step);
    let mut limited = (to != want).then(|| format!("wanted {want} replicas, limited by maxStep {step}"));
    if to > hi || to < lo || want > hi {
        let clamped = to.clamp(lo, hi);
        if want > hi {
            limited = Some(format!("wanted {want} replicas, limited by replicas.max {hi}"));
        } else if to < lo && want < lo {
            // Below min is the normal idle state, not a limit worth a condition.
        } else if clamped != to {
            limited = Some(format!("wanted {want} replicas, kept within [{lo}, {hi}]"));
        }
        to = clamped;
    }
    let reason = if to == replicas.current { format!("holding {to} replicas: {why}") } else { why };
    Decision {
        from: replicas.current,
        to,
        reason,
        panic,
        metrics_unavailable: None,
        limited,
        p95_ms: load.stable.p95_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec() -> AutoscalingSpec {
        AutoscalingSpec {
            target_inflight: Some(2),
            interval_seconds: 1,
            stable_window_seconds: 10,
            panic_window_seconds: 2,
            scale_down_stabilization_seconds: 5,
            max_step: 4,
            ..Default::default()
        }
    }
    fn bounds(min: i32, max: i32) -> ReplicaSpec {
        ReplicaSpec { min, max, desired: None }
    }
    fn load(stable_inflight: f64, panic_inflight: f64) -> Reading {
        Reading::Load(Load {
            stable: WindowLoad { p95_ms: Some(10.0), inflight: stable_inflight, gpu_utilization: None },
            panic: WindowLoad { p95_ms: Some(10.0), inflight: panic_inflight, gpu_utilization: None },
        })
    }
    fn at(current: i32, ready: i32) -> Replicas {
        Replicas { current, ready }
    }
    /// Both windows with the same in-flight count and GPU utilisation (`None`: a CPU node).
    fn gpu_load(inflight: f64, util: Option<f64>) -> Reading {
        let w = WindowLoad { p95_ms: Some(10.0), inflight, gpu_utilization: util };
        Reading::Load(Load { stable: w, panic: w })
    }
    fn gpu_spec(target: f64) -> AutoscalingSpec {
        AutoscalingSpec { target_gpu_utilization: Some(target), ..spec() }
    }

    #[test]
    fn a_load_step_scales_out_in_one_decision_through_the_panic_window() {
        let mut st = ScalerState::default();
        // 8 in flight against a target of 2 per replica: the panic window sees it first.
        let d = decide(&spec(), &bounds(1, 6), &mut st, 0.0, at(1, 1), &load(1.0, 8.0));
        assert_eq!((d.from, d.to), (1, 4), "{d:?}");
        assert!(d.panic && d.reason.starts_with("panic: in-flight 8.0"), "{}", d.reason);
        assert!(d.limited.is_none());
    }

    #[test]
    fn steady_load_at_target_never_changes_the_count() {
        let mut st = ScalerState::default();
        for i in 0..600 {
            // 3 replicas, 6-6.5 in flight: within tolerance of 2 per replica.
            let jitter = if i % 2 == 0 { 6.0 } else { 6.5 };
            let d = decide(&spec(), &bounds(1, 6), &mut st, f64::from(i), at(3, 3), &load(jitter, jitter));
            assert!(!d.changed(), "step {i}: {d:?}");
        }
    }

    #[test]
    fn an_outage_holds_and_says_why() {
        let mut st = ScalerState::default();
        let r = Reading::Unavailable("prometheus at http://127.0.0.1:9 unreachable".into());
        let d = decide(&spec(), &bounds(1, 6), &mut st, 0.0, at(5, 5), &r);
        assert_eq!((d.from, d.to), (5, 5));
        assert!(d.metrics_unavailable.as_deref().unwrap().contains("unreachable"));
        assert!(d.reason.contains("holding 5"), "{}", d.reason);
    }

    #[test]
    fn scale_down_waits_for_the_stabilization_window() {
        let mut st = ScalerState::default();
        let b = bounds(1, 6);
        assert_eq!(decide(&spec(), &b, &mut st, 0.0, at(4, 4), &load(8.0, 8.0)).to, 4);
        // Load drops to nothing: the 5 s window still holds the recommendation of 4.
        for t in 1..=5 {
            let d = decide(&spec(), &b, &mut st, f64::from(t), at(4, 4), &load(0.0, 0.0));
            assert_eq!(d.to, 4, "t={t}: {d:?}");
        }
        let d = decide(&spec(), &b, &mut st, 6.0, at(4, 4), &load(0.0, 0.0));
        assert_eq!(d.to, 1, "{d:?}");
    }

    #[test]
    fn panic_mode_refuses_to_scale_down_until_a_stable_window_passes() {
        let mut st = ScalerState::default();
        let mut s = spec();
        s.scale_down_stabilization_seconds = 0;
        let b = bounds(1, 6);
        assert!(decide(&s, &b, &mut st, 0.0, at(1, 1), &load(0.0, 8.0)).panic);
        let d = decide(&s, &b, &mut st, 5.0, at(4, 4), &load(0.0, 0.0));
        assert_eq!(d.to, 4, "still panicking: {d:?}");
        let d = decide(&s, &b, &mut st, 11.0, at(4, 4), &load(0.0, 0.0));
        assert!(!d.panic);
        assert_eq!(d.to, 1);
    }

    #[test]
    fn max_step_and_max_bound_limit_and_say_so() {
        let mut st = ScalerState::default();
        let mut s = spec();
        s.max_step = 2;
        let d = decide(&s, &bounds(1, 10), &mut st, 0.0, at(1, 1), &load(20.0, 20.0));
        assert_eq!(d.to, 3);
        assert!(d.limited.as_deref().unwrap().contains("maxStep 2"), "{d:?}");
        let d = decide(&spec(), &bounds(1, 3), &mut ScalerState::default(), 0.0, at(3, 3), &load(20.0, 20.0));
        assert_eq!(d.to, 3);
        assert!(d.limited.as_deref().unwrap().contains("replicas.max 3"), "{d:?}");
    }

    #[test]
    fn latency_target_scales_by_the_ratio() {
        let mut s = spec();
        s.target_inflight = None;
        s.target_latency_p95_ms = Some(100);
        let slow = Reading::Load(Load {
            stable: WindowLoad { p95_ms: Some(250.0), inflight: 1.0, gpu_utilization: None },
            panic: WindowLoad { p95_ms: Some(250.0), inflight: 1.0, gpu_utilization: None },
        });
        let d = decide(&s, &bounds(1, 10), &mut ScalerState::default(), 0.0, at(2, 2), &slow);
        assert_eq!(d.to, 5, "{d:?}");
        assert!(d.reason.contains("p95 250ms vs target 100ms"), "{}", d.reason);
    }

    #[test]
    fn paused_no_target_and_no_ready_replica_hold() {
        let mut s = spec();
        s.paused = true;
        assert!(!decide(&s, &bounds(1, 6), &mut ScalerState::default(), 0.0, at(2, 2), &load(9.0, 9.0)).changed());
        let mut s = spec();
        s.target_inflight = None;
        let d = decide(&s, &bounds(1, 6), &mut ScalerState::default(), 0.0, at(2, 2), &load(9.0, 9.0));
        assert!(!d.changed() && d.reason.contains("no target"));
        let d = decide(&spec(), &bounds(1, 6), &mut ScalerState::default(), 0.0, at(2, 0), &load(9.0, 9.0));
        assert!(!d.changed() && d.reason.contains("waiting for a ready replica"));
    }

    #[test]
    fn gpu_target_scales_out_by_the_ratio_and_names_the_signal() {
        let mut s = gpu_spec(0.6);
        s.target_inflight = None;
        // 2 ready replicas at 90% against 60%: ceil(2 x 1.5) = 3.
        let d = decide(&s, &bounds(1, 10), &mut ScalerState::default(), 0.0, at(2, 2), &gpu_load(1.0, Some(0.9)));
        assert_eq!((d.from, d.to), (2, 3), "{d:?}");
        assert!(d.reason.contains("GPU utilization 90% vs target 60%"), "{}", d.reason);
    }

    #[test]
    fn gpu_wins_when_it_asks_for_more_than_the_load_signal() {
        // In-flight sits at its target (6 over 3 = 2 per replica); the GPU is saturated.
        let d = decide(
            &gpu_spec(0.5),
            &bounds(1, 10),
            &mut ScalerState::default(),
            0.0,
            at(3, 3),
            &gpu_load(6.0, Some(1.0)),
        );
        assert_eq!(d.to, 6, "{d:?}");
        assert!(d.reason.contains("GPU utilization 100%"), "{}", d.reason);
        // And the load signal wins (and is named) when it asks for more.
        let d = decide(
            &gpu_spec(0.5),
            &bounds(1, 10),
            &mut ScalerState::default(),
            0.0,
            at(3, 3),
            &gpu_load(18.0, Some(0.5)),
        );
        assert_eq!(d.to, 7, "maxStep 4 caps 9: {d:?}");
        assert!(d.reason.contains("in-flight"), "{}", d.reason);
    }

    #[test]
    fn an_absent_gpu_metric_is_ignored_not_read_as_idle() {
        // CPU node with a GPU target: in-flight at target decides, nothing scales down.
        let mut st = ScalerState::default();
        for t in 0..20 {
            let d = decide(&gpu_spec(0.7), &bounds(1, 10), &mut st, f64::from(t), at(3, 3), &gpu_load(6.0, None));
            assert!(!d.changed() && d.metrics_unavailable.is_none(), "t={t}: {d:?}");
            assert!(!d.reason.contains("GPU"), "{}", d.reason);
        }
        // Only a GPU target and no GPU series: hold and say why, without claiming an outage.
        let mut s = gpu_spec(0.7);
        s.target_inflight = None;
        let d = decide(&s, &bounds(1, 10), &mut ScalerState::default(), 0.0, at(3, 3), &gpu_load(30.0, None));
        assert!(!d.changed() && d.metrics_unavailable.is_none(), "{d:?}");
        assert!(d.reason.contains("no replica reports prism_node_gpu_utilization_ratio"), "{}", d.reason);
    }

    #[test]
    fn gpu_signal_keeps_the_scale_down_rules() {
        let b = bounds(1, 10);
        // Load gone but the GPU still busy at target: the GPU holds the count.
        let mut st = ScalerState::default();
        for t in 0..20 {
            let d = decide(&gpu_spec(0.6), &b, &mut st, f64::from(t), at(4, 4), &gpu_load(0.0, Some(0.62)));
            assert_eq!(d.to, 4, "t={t}: {d:?}");
        }
        // Load and GPU both idle: scale-down still waits out the 5 s stabilization window.
        let mut st = ScalerState::default();
        assert_eq!(decide(&gpu_spec(0.6), &b, &mut st, 0.0, at(4, 4), &gpu_load(8.0, Some(0.6))).to, 4);
        for t in 1..=5 {
            let d = decide(&gpu_spec(0.6), &b, &mut st, f64::from(t), at(4, 4), &gpu_load(0.0, Some(0.05)));
            assert_eq!(d.to, 4, "t={t}: {d:?}");
        }
        let d = decide(&gpu_spec(0.6), &b, &mut st, 6.0, at(4, 4), &gpu_load(0.0, Some(0.05)));
        assert_eq!(d.to, 1, "{d:?}");
        // A GPU metric that disappears mid-way (replicas moved to CPU) does not stop a scale-down.
        let d = decide(&gpu_spec(0.6), &b, &mut ScalerState::default(), 0.0, at(4, 4), &gpu_load(0.0, None));
        assert_eq!(d.to, 1, "{d:?}");
    }

    proptest! {
        #[test]
        fn the_result_is_always_within_min_and_max(
            min in 0i32..5, span in 0i32..10, current in 0i32..20, ready_frac in 0.0f64..1.0,
            inflight in 0.0f64..200.0, panic_inflight in 0.0f64..200.0, step in 1i32..6, outage: bool,
        ) {
            let mut s = spec();
            s.max_step = step;
            let b = bounds(min, (min + span).max(1));
            let ready = (f64::from(current) * ready_frac).round() as i32;
            let r = if outage { Reading::Unavailable("down".into()) } else { load(inflight, panic_inflight) };
            let d = decide(&s, &b, &mut ScalerState::default(), 0.0, at(current, ready), &r);
            if outage {
                prop_assert_eq!(d.to, current);
            } else if d.changed() {
                prop_assert!(d.to >= b.min && d.to <= b.max, "{:?}", d);
            }
        }
    }
}
