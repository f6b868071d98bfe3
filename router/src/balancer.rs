//! Replica choice and passive health: pure data, no I/O, no clocks.
//!
//! Every function takes `now_ms` (milliseconds on a monotonic clock the caller owns), so the
//! property tests can drive time and the HTTP layer can share one `Balancer` behind a mutex.
//!
//! Per modality the router picks R = argmax_i(alpha*A_i - beta*L_i) over replicas that are
//! ready, have weight > 0, are not ejected and have P_fail < delta, where
//! - L_i = EWMA latency (ms) x (1 + in-flight): the expected wait if we add one more request;
//! - P_fail = 1 - (1 - p_err)(1 - p_heartbeat): p_err from time-decayed failure/success counts,
//!   p_heartbeat from the age of the last successful health probe;
//! - among near-ties (within 1% of alpha and 25% + 1 ms of the best unloaded latency) power-of-two-choices by weight,
//!   the lower in-flight wins, so equal replicas share load instead of herding on one.
//!
//! Outlier ejection: `consecutiveErrors` failures in a row eject a replica for
//! `baseEjectionMs * 2^k` (k = earlier ejections), never more than `maxEjectedPercent` of a
//! modality's replicas at once.

use std::collections::{BTreeMap, BTreeSet};

use prism_api::pipeline::RoutingPolicy;
use prism_api::RouteEndpoint;
use rand::Rng;

/// Time constant of the decaying success/failure counts: a failure weighs half after ~7 s.
pub const DECAY_TAU_MS: f64 = 10_000.0;
/// Smoothing of the latency EWMA (weight of the newest sample).
pub const EWMA_ALPHA: f64 = 0.3;
/// Pseudo-successes added to P_fail's denominator so one early failure does not exclude a fresh replica.
pub const PRIOR_SUCCESSES: f64 = 2.0;
/// Longest ejection, whatever the backoff says (5 minutes), so a replica is always retried eventually.
pub const MAX_EJECTION_MS: f64 = 300_000.0;

/// What the balancer knows about one replica.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaStats {
    pub endpoint: RouteEndpoint,
    /// Latency EWMA in ms; `None` until the first success.
    pub ewma_ms: Option<f64>,
    pub inflight: u32,
    pub consecutive_errors: u32,
    /// Decaying counts, as of `counts_at_ms`.
    pub failures: f64,
    pub successes: f64,
    pub counts_at_ms: f64,
    /// Ejected until this time (ms); `None` when not ejected.
    pub ejected_until_ms: Option<f64>,
    /// Ejections so far (drives the exponential backoff; decays on success).
    pub ejections: u32,
    /// Last successful heartbeat (health probe or served request).
    pub last_heartbeat_ms: f64,
    /// The model revision this replica reports in its answers (corrections are recorded against
    /// it); until the first answer, the routing table's.
    pub served_revision: Option<String>,
}

impl ReplicaStats {
    pub fn new(endpoint: RouteEndpoint, now_ms: f64) -> Self {
        Self {
            endpoint,
            ewma_ms: None,
            inflight: 0,
            consecutive_errors: 0,
            failures: 0.0,
            successes: 0.0,
            counts_at_ms: now_ms,
            ejected_until_ms: None,
            ejections: 0,
            last_heartbeat_ms: now_ms,
            served_revision: None,
        }
    }

    fn decay_to(&mut self, now_ms: f64) {
        let dt = (now_ms - self.counts_at_ms).max(0.0);
        let k = (-dt / DECAY_TAU_MS).exp();
        self.failures *= k;
        self.successes *= k;
        self.counts_at_ms = self.counts_at_ms.max(now_ms);
    }

    pub fn is_ejected(&self, now_ms: f64) -> bool {
        self.ejected_until_ms.is_some_and(|t| now_ms < t)
    }

    /// No call or probe of this replica has been answered or failed yet.
    pub fn never_heard_from(&self) -> bool {
        self.successes == 0.0 && self.failures == 0.0
    }

    /// Estimated failure probability at `now_ms`.
    pub fn p_fail(&self, now_ms: f64, heartbeat_interval_ms: Option<f64>) -> f64 {
        let dt = (now_ms - self.counts_at_ms).max(0.0);
        let k = (-dt / DECAY_TAU_MS).exp();
        let (f, s) = (self.failures * k, self.successes * k);
        let p_err = f / (f + s + PRIOR_SUCCESSES);
        // Heartbeat age only counts when someone probes: missing 3 probes starts to raise
        // P_fail, missing 10 makes it certain.
        let p_hb = match heartbeat_interval_ms {
            Some(iv) if iv > 0.0 => {
                let age = (now_ms - self.last_heartbeat_ms).max(0.0);
                ((age - 3.0 * iv) / (7.0 * iv)).clamp(0.0, 1.0)
            }
            _ => 0.0,
        };
        1.0 - (1.0 - p_err) * (1.0 - p_hb)
    }

    /// Expected latency L_i in ms if one more request is sent now.
    pub fn expected_latency(&self, default_ewma_ms: f64) -> f64 {
        self.ewma_ms.unwrap_or(default_ewma_ms) * (1.0 + self.inflight as f64)
    }
}

/// Why a replica was passed over (for logs and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exclusion {
    Unready,
    ZeroWeight,
    Ejected,
    FailureProbability,
    AlreadyTried,
}

/// The result of one failed call, as the balancer sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct FailureOutcome {
    /// The replica was ejected by this failure.
    pub ejected: bool,
    /// Consecutive errors reached the threshold but the ejection cap held the replica in.
    pub ejection_capped: bool,
}

/// All replicas of all modalities of one pipeline.
#[derive(Clone, Debug, Default)]
pub struct Balancer {
    /// modality -> endpoint URL -> stats. BTreeMap: deterministic iteration for tests and logs.
    pub modalities: BTreeMap<String, BTreeMap<String, ReplicaStats>>,
    /// Interval of active health probes, when they run (feeds the heartbeat term of P_fail).
    pub heartbeat_interval_ms: Option<f64>,
    /// User corrections per (node, revision): (sum of ratings, count). Keyed by revision, not
    /// endpoint, so a bad model revision loses traffic on every replica and a restarted pod
    /// keeps its record.
    pub feedback: BTreeMap<(String, String), (f64, u64)>,
}

/// How many corrections the routing table's accuracy counts for: A_i moves halfway to the
/// observed mean rating after this many.
pub const FEEDBACK_PRIOR: f64 = 10.0;

impl Balancer {
    /// Fold `count` corrections with ratings summing to `rating_sum` into a revision's record.
    pub fn add_feedback(&mut self, node: &str, revision: &str, rating_sum: f64, count: u64) {
        let e = self.feedback.entry((node.to_string(), revision.to_string())).or_default();
        e.0 += rating_sum;
        e.1 += count;
    }

    /// A_i: the table's accuracy (the prior, worth [`FEEDBACK_PRIOR`] ratings) blended with the
    /// corrections of that revision.
    pub fn accuracy_of(&self, node: &str, revision: &str, prior: f64) -> f64 {
        match self.feedback.get(&(node.to_string(), revision.to_string())) {
            Some((sum, n)) if *n > 0 => (prior * FEEDBACK_PRIOR + sum) / (FEEDBACK_PRIOR + *n as f64),
            _ => prior,
        }
    }

    /// Apply a routing table: keep the stats of replicas that remain (same modality and
    /// endpoint), add new ones, drop the rest. In-flight counts of kept replicas survive so a
    /// reload mid-traffic does not forget the load.
    pub fn apply_table(&mut self, modalities: &BTreeMap<String, Vec<RouteEndpoint>>, now_ms: f64) {
        let mut next: BTreeMap<String, BTreeMap<String, ReplicaStats>> = BTreeMap::new();
        for (m, eps) in modalities {
            let old = self.modalities.remove(m).unwrap_or_default();
            let mut map = BTreeMap::new();
            for ep in eps {
                let stats = match old.get(&ep.endpoint) {
                    // Probes only go to ready replicas, so a replica never heard from starts its
                    // heartbeat age when it turns ready: one listed unready for a few seconds (a
                    // rolling update's new pod) would otherwise count as missed probes and be
                    // passed over until its first probe, while it may be the only replica left.
                    // One with a history (stopped, then back) still waits for a probe.
                    Some(s) if ep.ready && !s.endpoint.ready && s.never_heard_from() => {
                        ReplicaStats { endpoint: ep.clone(), last_heartbeat_ms: now_ms, ..s.clone() }
                    }
                    Some(s) => ReplicaStats { endpoint: ep.clone(), ..s.clone() },
                    None => ReplicaStats::new(ep.clone(), now_ms),
                };
                map.insert(ep.endpoint.clone(), stats);
            }
            next.insert(m.clone(), map);
        }
        self.modalities = next;
    }

    fn stats_mut(&mut self, modality: &str, endpoint: &str) -> Option<&mut ReplicaStats> {
        self.modalities.get_mut(modality)?.get_mut(endpoint)
    }

    pub fn stats(&self, modality: &str, endpoint: &str) -> Option<&ReplicaStats> {
        self.modalities.get(modality)?.get(endpoint)
    }

    /// Why `stats` may not take this request (None: eligible).
    pub fn exclusion(
        &self,
        stats: &ReplicaStats,
        policy: &RoutingPolicy,
        tried: &BTreeSet<String>,
        now_ms: f64,
    ) -> Option<Exclusion> {
        if !stats.endpoint.ready {
            Some(Exclusion::Unready)
        } else if stats.endpoint.weight <= 0.0 || stats.endpoint.weight.is_nan() {
            Some(Exclusion::ZeroWeight)
        } else if stats.is_ejected(now_ms) {
            Some(Exclusion::Ejected)
        } else if tried.contains(&stats.endpoint.endpoint) {
            Some(Exclusion::AlreadyTried)
        } else if stats.p_fail(now_ms, self.heartbeat_interval_ms) >= policy.failure_threshold {
            Some(Exclusion::FailureProbability)
        } else {
            None
        }
    }

    /// Whether any replica of `modality` could take a request now.
    pub fn has_candidate(&self, modality: &str, policy: &RoutingPolicy, now_ms: f64) -> bool {
        let none = BTreeSet::new();
        self.modalities
            .get(modality)
            .is_some_and(|reps| reps.values().any(|s| self.exclusion(s, policy, &none, now_ms).is_none()))
    }

    /// Whether a replica other than those in `tried` could take a retry now.
    pub fn has_alternative(
        &self,
        modality: &str,
        policy: &RoutingPolicy,
        tried: &BTreeSet<String>,
        now_ms: f64,
    ) -> bool {
        self.modalities
            .get(modality)
            .is_some_and(|reps| reps.values().any(|s| self.exclusion(s, policy, tried, now_ms).is_none()))
    }

    /// Pick a replica for one call (see the module doc). `tried` holds endpoints already used
    /// by this request, so a retry goes elsewhere. Returns the endpoint, or None when no
    /// replica is eligible.
    pub fn choose<R: Rng + ?Sized>(
        &self,
        modality: &str,
        policy: &RoutingPolicy,
        tried: &BTreeSet<String>,
        now_ms: f64,
        rng: &mut R,
    ) -> Option<RouteEndpoint> {
        let reps = self.modalities.get(modality)?;
        let eligible: Vec<&ReplicaStats> =
            reps.values().filter(|s| self.exclusion(s, policy, tried, now_ms).is_none()).collect();
        if eligible.is_empty() {
            return None;
        }
        let eligible = split_revisions(eligible, rng);
        // Replicas without samples yet are assumed as fast as the known ones, so a new replica
        // gets traffic (and samples) instead of being starved or flooded.
        let known: Vec<f64> = eligible.iter().filter_map(|s| s.ewma_ms).collect();
        let default_ewma = if known.is_empty() { 1.0 } else { known.iter().sum::<f64>() / known.len() as f64 };
        let scored: Vec<(f64, f64, &ReplicaStats)> = eligible
            .iter()
            .map(|s| {
                let l = s.expected_latency(default_ewma);
                let revision = s.served_revision.as_deref().unwrap_or(&s.endpoint.revision);
                let a = self.accuracy_of(&s.endpoint.node, revision, s.endpoint.accuracy);
                (policy.alpha * a - policy.beta * l, l, *s)
            })
            .collect();
        let (best, best_ewma) = scored.iter().fold((f64::NEG_INFINITY, 0.0), |acc, (sc, _, s)| {
            if *sc > acc.0 {
                (*sc, s.ewma_ms.unwrap_or(default_ewma))
            } else {
                acc
            }
        });
        // Near-tie: within 1% of accuracy and 25% (+1 ms) of the best replica's unloaded
        // latency, in score units: below that resolution the estimates are noise. Scaling by
        // the unloaded EWMA (not L) keeps one extra in-flight request distinguishable, so
        // in-flight counts stay even under load.
        let tol = 0.01 * policy.alpha.abs() + policy.beta.abs() * (1.0 + 0.25 * best_ewma);
        let ties: Vec<&ReplicaStats> =
            scored.iter().filter(|(sc, _, _)| *sc >= best - tol).map(|(_, _, s)| *s).collect();
        let pick = match ties.len() {
            0 => return None,
            1 => ties[0],
            _ => {
                let a = weighted_pick(&ties, rng);
                let b = weighted_pick(&ties, rng);
                let (a, b) = (ties[a], ties[b]);
                let la = a.expected_latency(default_ewma);
                let lb = b.expected_latency(default_ewma);
                if (b.inflight, lb) < (a.inflight, la) || (b.inflight == a.inflight && lb < la) {
                    b
                } else {
                    a
                }
            }
        };
        Some(pick.endpoint.clone())
    }

    /// The revision a replica reported in an answer.
    pub fn note_revision(&mut self, modality: &str, endpoint: &str, revision: &str) {
        if let Some(s) = self.stats_mut(modality, endpoint) {
            if s.served_revision.as_deref() != Some(revision) {
                s.served_revision = Some(revision.to_string());
            }
        }
    }

    /// A call is about to be sent.
    pub fn on_start(&mut self, modality: &str, endpoint: &str) {
        if let Some(s) = self.stats_mut(modality, endpoint) {
            s.inflight = s.inflight.saturating_add(1);
        }
    }

    /// A call succeeded after `latency_ms`.
    pub fn on_success(&mut self, modality: &str, endpoint: &str, latency_ms: f64, now_ms: f64) {
        if let Some(s) = self.stats_mut(modality, endpoint) {
            s.inflight = s.inflight.saturating_sub(1);
            s.decay_to(now_ms);
            s.successes += 1.0;
            s.consecutive_errors = 0;
            s.last_heartbeat_ms = now_ms;
            let lat = latency_ms.max(0.0);
            s.ewma_ms = Some(match s.ewma_ms {
                Some(e) => (1.0 - EWMA_ALPHA) * e + EWMA_ALPHA * lat,
                None => lat,
            });
            // A replica that serves well after its ejection ended earns back its backoff.
            if s.ejected_until_ms.is_some_and(|t| now_ms >= t) {
                s.ejected_until_ms = None;
                s.ejections = s.ejections.saturating_sub(1);
            }
        }
    }

    /// A call ended without an answer the replica is responsible for? Use `on_cancel` instead.
    pub fn on_cancel(&mut self, modality: &str, endpoint: &str) {
        if let Some(s) = self.stats_mut(modality, endpoint) {
            s.inflight = s.inflight.saturating_sub(1);
        }
    }

    /// A call failed (connection error, timeout, 5xx). `was_call` is false for health-probe
    /// failures, which carry no in-flight slot.
    pub fn on_failure(
        &mut self,
        modality: &str,
        endpoint: &str,
        policy: &RoutingPolicy,
        now_ms: f64,
        was_call: bool,
    ) -> FailureOutcome {
        let cap = self.ejection_cap(modality, policy);
        let ejected_now = self.ejected_count(modality, now_ms);
        let Some(s) = self.stats_mut(modality, endpoint) else {
            return FailureOutcome { ejected: false, ejection_capped: false };
        };
        if was_call {
            s.inflight = s.inflight.saturating_sub(1);
        }
        s.decay_to(now_ms);
        s.failures += 1.0;
        s.consecutive_errors = s.consecutive_errors.saturating_add(1);
        let mut out = FailureOutcome { ejected: false, ejection_capped: false };
        if s.consecutive_errors >= policy.consecutive_errors.max(1) && !s.is_ejected(now_ms) {
            if ejected_now < cap {
                let backoff = (policy.base_ejection_ms as f64) * 2f64.powi(s.ejections.min(20) as i32);
                s.ejected_until_ms = Some(now_ms + backoff.min(MAX_EJECTION_MS));
                s.ejections = s.ejections.saturating_add(1);
                s.consecutive_errors = 0;
                out.ejected = true;
            } else {
                out.ejection_capped = true;
            }
        }
        out
    }

    /// A health probe answered ready: a heartbeat, and one success for P_fail so a replica
    /// that came back is routable again within a few probes. It does not clear consecutive
    /// errors: a replica whose /ready works but whose /embed fails must still be ejected.
    pub fn on_heartbeat(&mut self, modality: &str, endpoint: &str, now_ms: f64) {
        if let Some(s) = self.stats_mut(modality, endpoint) {
            s.decay_to(now_ms);
            s.successes += 1.0;
            s.last_heartbeat_ms = now_ms;
        }
    }

    /// Most replicas of `modality` that may be ejected at once: floor(n * maxEjectedPercent / 100).
    pub fn ejection_cap(&self, modality: &str, policy: &RoutingPolicy) -> usize {
        let n = self.modalities.get(modality).map_or(0, |m| m.len());
        n * (policy.max_ejected_percent.min(100) as usize) / 100
    }

    pub fn ejected_count(&self, modality: &str, now_ms: f64) -> usize {
        self.modalities.get(modality).map_or(0, |m| m.values().filter(|s| s.is_ejected(now_ms)).count())
    }
}

/// Index into `ties`, sampled by route weight (canary split).
/// Canary split: when one node has eligible replicas of several revisions (a canary in flight,
/// or a rolling update), first draw ONE revision per node with probability proportional to the
/// summed weights of its replicas, then score only that revision's replicas. The revision's
/// traffic share is then exactly what the operator wrote into the weights, whatever the
/// latency/accuracy scores say (the rollout analysis judges the canary; the scores must not
/// starve or flood it). A revision with no eligible replica takes no draw, so a failing canary
/// falls back to stable at once.
fn split_revisions<'a, R: Rng + ?Sized>(eligible: Vec<&'a ReplicaStats>, rng: &mut R) -> Vec<&'a ReplicaStats> {
    let mut per_node: BTreeMap<&str, BTreeMap<&str, f64>> = BTreeMap::new();
    for s in &eligible {
        *per_node.entry(&s.endpoint.node).or_default().entry(&s.endpoint.revision).or_default() +=
            s.endpoint.weight.max(0.0);
    }
    let mut chosen: BTreeMap<&str, &str> = BTreeMap::new();
    for (node, revs) in &per_node {
        if revs.len() < 2 {
            continue;
        }
        let total: f64 = revs.values().sum();
        let mut x = if total > 0.0 && total.is_finite() { rng.random_range(0.0..total) } else { 0.0 };
        let mut pick = revs.keys().next().copied().unwrap_or_default();
        for (rev, w) in revs {
            pick = rev;
            x -= w;
            if x < 0.0 {
                break;
            }
        }
        chosen.insert(node, pick);
    }
    if chosen.is_empty() {
        return eligible;
    }
    eligible
        .into_iter()
        .filter(|s| chosen.get(s.endpoint.node.as_str()).is_none_or(|r| *r == s.endpoint.revision))
        .collect()
}

fn weighted_pick<R: Rng + ?Sized>(ties: &[&ReplicaStats], rng: &mut R) -> usize {
    let total: f64 = ties.iter().map(|s| s.endpoint.weight.max(0.0)).sum();
    // Also catches NaN: a NaN total is neither > 0 nor finite.
    if total.is_nan() || total <= 0.0 || !total.is_finite() {
        return rng.random_range(0..ties.len());
    }
    let mut x = rng.random_range(0.0..total);
    for (i, s) in ties.iter().enumerate() {
        x -= s.endpoint.weight.max(0.0);
        if x < 0.0 {
            return i;
        }
    }
    ties.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn ep(i: usize, ready: bool, weight: f64, accuracy: f64) -> RouteEndpoint {
        RouteEndpoint {
            endpoint: format!("http://127.0.0.1:{}", 10_000 + i),
            node: format!("n{i}"),
            revision: "r1".into(),
            weight,
            accuracy,
            ready,
        }
    }

    fn balancer(eps: Vec<RouteEndpoint>) -> Balancer {
        let mut b = Balancer::default();
        let mut t = BTreeMap::new();
        t.insert("text".to_string(), eps);
        b.apply_table(&t, 0.0);
        b
    }

    #[derive(Debug, Clone)]
    struct Rep {
        ready: bool,
        weight: f64,
        accuracy: f64,
        failures: u32,
        ewma: f64,
        inflight: u32,
    }

    fn rep() -> impl Strategy<Value = Rep> {
        (any::<bool>(), prop_oneof![Just(0.0), 0.1f64..10.0], 0.0f64..1.0, 0u32..6, 0.1f64..500.0, 0u32..20).prop_map(
            |(ready, weight, accuracy, failures, ewma, inflight)| Rep {
                ready,
                weight,
                accuracy,
                failures,
                ewma,
                inflight,
            },
        )
    }

    proptest! {
        /// Whatever the state, the choice is ready, weighted, not ejected, not tried, and
        /// under the failure threshold; and a choice exists whenever such a replica exists.
        #[test]
        fn never_routes_to_unready_or_ejected(reps in prop::collection::vec(rep(), 1..12), seed in any::<u64>(), pct in 0u32..=100, now in 0f64..100_000.0) {
            let policy = RoutingPolicy { max_ejected_percent: pct, consecutive_errors: 2, ..Default::default() };
            let eps: Vec<_> = reps.iter().enumerate().map(|(i, r)| ep(i, r.ready, r.weight, r.accuracy)).collect();
            let mut b = balancer(eps.clone());
            for (i, r) in reps.iter().enumerate() {
                for _ in 0..r.failures { b.on_failure("text", &eps[i].endpoint, &policy, now, false); }
                let s = b.modalities.get_mut("text").unwrap().get_mut(&eps[i].endpoint).unwrap();
                s.ewma_ms = Some(r.ewma);
                s.inflight = r.inflight;
            }
            let mut rng = StdRng::seed_from_u64(seed);
            let tried = BTreeSet::new();
            let eligible: Vec<_> = b.modalities["text"].values().filter(|s| b.exclusion(s, &policy, &tried, now).is_none()).map(|s| s.endpoint.endpoint.clone()).collect();
            for _ in 0..20 {
                match b.choose("text", &policy, &tried, now, &mut rng) {
                    Some(e) => {
                        let s = b.stats("text", &e.endpoint).unwrap();
                        prop_assert!(s.endpoint.ready);
                        prop_assert!(s.endpoint.weight > 0.0);
                        prop_assert!(!s.is_ejected(now));
                        prop_assert!(s.p_fail(now, None) < policy.failure_threshold);
                        prop_assert!(eligible.contains(&e.endpoint));
                    }
                    None => prop_assert!(eligible.is_empty()),
                }
            }
        }

        /// However failures arrive, no more than floor(n * pct / 100) replicas are ejected at once.
        #[test]
        fn ejection_cap_respected(n in 1usize..10, pct in 0u32..=100, events in prop::collection::vec((0usize..10, 0f64..2000.0), 0..200)) {
            let policy = RoutingPolicy { max_ejected_percent: pct, consecutive_errors: 1, base_ejection_ms: 1000, ..Default::default() };
            let eps: Vec<_> = (0..n).map(|i| ep(i, true, 1.0, 0.9)).collect();
            let mut b = balancer(eps.clone());
            let cap = n * pct as usize / 100;
            let mut now = 0.0;
            for (i, dt) in events {
                now += dt;
                b.on_failure("text", &eps[i % n].endpoint, &policy, now, false);
                prop_assert!(b.ejected_count("text", now) <= cap, "ejected {} > cap {}", b.ejected_count("text", now), cap);
            }
        }

        /// Retries never go back to a replica this request already tried.
        #[test]
        fn retry_avoids_tried(n in 2usize..8, seed in any::<u64>()) {
            let eps: Vec<_> = (0..n).map(|i| ep(i, true, 1.0, 0.9)).collect();
            let b = balancer(eps);
            let policy = RoutingPolicy::default();
            let mut rng = StdRng::seed_from_u64(seed);
            let mut tried = BTreeSet::new();
            for _ in 0..n {
                let e = b.choose("text", &policy, &tried, 0.0, &mut rng).unwrap();
                prop_assert!(tried.insert(e.endpoint));
            }
            prop_assert!(b.choose("text", &policy, &tried, 0.0, &mut rng).is_none());
        }
    }

    /// Equal replicas with requests that never finish: in-flight stays within one of even.
    #[test]
    fn load_spreads_across_equal_replicas() {
        for n in [2usize, 3, 5, 8] {
            let eps: Vec<_> = (0..n).map(|i| ep(i, true, 1.0, 0.9)).collect();
            let mut b = balancer(eps);
            for s in b.modalities.get_mut("text").unwrap().values_mut() {
                s.ewma_ms = Some(10.0);
            }
            let policy = RoutingPolicy::default();
            let mut rng = StdRng::seed_from_u64(n as u64);
            for _ in 0..(n * 50) {
                let e = b.choose("text", &policy, &BTreeSet::new(), 0.0, &mut rng).unwrap();
                b.on_start("text", &e.endpoint);
            }
            let inf: Vec<u32> = b.modalities["text"].values().map(|s| s.inflight).collect();
            let (lo, hi) = (*inf.iter().min().unwrap(), *inf.iter().max().unwrap());
            assert!(hi - lo <= 2, "n={n} in-flight {inf:?}");
        }
    }

    /// Equal replicas with requests that finish at once: each one gets a fair share.
    #[test]
    fn load_spreads_when_requests_complete() {
        let n = 4;
        let eps: Vec<_> = (0..n).map(|i| ep(i, true, 1.0, 0.9)).collect();
        let mut b = balancer(eps);
        let policy = RoutingPolicy::default();
        let mut rng = StdRng::seed_from_u64(7);
        let mut counts: BTreeMap<String, u32> = BTreeMap::new();
        for i in 0..4000 {
            let e = b.choose("text", &policy, &BTreeSet::new(), i as f64, &mut rng).unwrap();
            b.on_start("text", &e.endpoint);
            b.on_success("text", &e.endpoint, 5.0, i as f64);
            *counts.entry(e.endpoint).or_default() += 1;
        }
        for (e, c) in &counts {
            assert!((700..=1300).contains(c), "{e} got {c} of 4000: {counts:?}");
        }
        assert_eq!(counts.len(), n);
    }

    #[test]
    fn slow_replica_loses_to_fast_one() {
        let eps: Vec<_> = (0..2).map(|i| ep(i, true, 1.0, 0.9)).collect();
        let mut b = balancer(eps.clone());
        let policy = RoutingPolicy { beta: 0.01, ..Default::default() };
        b.on_start("text", &eps[0].endpoint);
        b.on_success("text", &eps[0].endpoint, 200.0, 0.0);
        b.on_start("text", &eps[1].endpoint);
        b.on_success("text", &eps[1].endpoint, 5.0, 0.0);
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..100 {
            assert_eq!(b.choose("text", &policy, &BTreeSet::new(), 1.0, &mut rng).unwrap().endpoint, eps[1].endpoint);
        }
    }

    #[test]
    fn accuracy_wins_when_alpha_dominates() {
        let eps = vec![ep(0, true, 1.0, 0.5), ep(1, true, 1.0, 0.95)];
        let b = balancer(eps.clone());
        let mut rng = StdRng::seed_from_u64(1);
        let e = b.choose("text", &RoutingPolicy::default(), &BTreeSet::new(), 0.0, &mut rng).unwrap();
        assert_eq!(e.endpoint, eps[1].endpoint);
    }

    #[test]
    fn canary_revision_gets_its_weight_share_whatever_the_scores() {
        // Two stable replicas (weight 0.45 each) and one canary (0.1) of node n: the canary must
        // get ~10% of calls even though it is the slowest, and every call when stable is gone.
        let mk = |i: usize, rev: &str, w: f64| RouteEndpoint {
            endpoint: format!("http://127.0.0.1:{}", 9000 + i),
            node: "n".into(),
            revision: rev.into(),
            weight: w,
            accuracy: 0.9,
            ready: true,
        };
        let eps = vec![mk(0, "r1", 0.45), mk(1, "r1", 0.45), mk(2, "r2", 0.1)];
        let mut b = balancer(eps.clone());
        b.on_success("text", &eps[0].endpoint, 5.0, 0.0);
        b.on_success("text", &eps[1].endpoint, 5.0, 0.0);
        b.on_success("text", &eps[2].endpoint, 50.0, 0.0);
        let policy = RoutingPolicy::default();
        let mut rng = StdRng::seed_from_u64(7);
        let none = BTreeSet::new();
        let n = 4000;
        let canary =
            (0..n).filter(|_| b.choose("text", &policy, &none, 1.0, &mut rng).unwrap().revision == "r2").count();
        let share = canary as f64 / n as f64;
        assert!((share - 0.1).abs() < 0.02, "canary share {share}");
        let tried: BTreeSet<String> = [eps[0].endpoint.clone(), eps[1].endpoint.clone()].into();
        assert_eq!(b.choose("text", &policy, &tried, 1.0, &mut rng).unwrap().revision, "r2");
    }

    #[test]
    fn corrections_move_accuracy_per_revision_and_steer_traffic() {
        // Equal table accuracy: n1 wins on nothing yet. Bad ratings for n0's revision flip it.
        let eps = vec![ep(0, true, 1.0, 0.9), ep(1, true, 1.0, 0.9)];
        let mut b = balancer(eps.clone());
        assert_eq!(b.accuracy_of("n0", "r1", 0.9), 0.9, "no corrections: the table's value");
        b.add_feedback("n0", "r1", 0.0, 10);
        assert!((b.accuracy_of("n0", "r1", 0.9) - 0.45).abs() < 1e-12, "halfway after FEEDBACK_PRIOR ratings");
        assert_eq!(b.accuracy_of("n0", "r2", 0.9), 0.9, "another revision keeps its own record");
        let policy = RoutingPolicy { alpha: 10.0, ..Default::default() };
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..50 {
            let e = b.choose("text", &policy, &BTreeSet::new(), 0.0, &mut rng).unwrap();
            assert_eq!(e.endpoint, eps[1].endpoint);
        }
        // A new table (failover, rollout) keeps the corrections.
        let mut t = BTreeMap::new();
        t.insert("text".to_string(), eps);
        b.apply_table(&t, 1.0);
        assert!(b.accuracy_of("n0", "r1", 0.9) < 0.5);
    }

    #[test]
    fn ejection_backs_off_exponentially_and_expires() {
        let eps = vec![ep(0, true, 1.0, 0.9), ep(1, true, 1.0, 0.9)];
        let mut b = balancer(eps.clone());
        let policy = RoutingPolicy {
            consecutive_errors: 2,
            base_ejection_ms: 1000,
            max_ejected_percent: 50,
            ..Default::default()
        };
        let e0 = &eps[0].endpoint;
        assert!(!b.on_failure("text", e0, &policy, 0.0, false).ejected);
        assert!(b.on_failure("text", e0, &policy, 0.0, false).ejected);
        assert_eq!(b.stats("text", e0).unwrap().ejected_until_ms, Some(1000.0));
        // Second ejection after the first expired: twice as long.
        b.on_failure("text", e0, &policy, 1500.0, false);
        assert!(b.on_failure("text", e0, &policy, 1500.0, false).ejected);
        assert_eq!(b.stats("text", e0).unwrap().ejected_until_ms, Some(3500.0));
        // The other replica cannot be ejected as well: cap is floor(2 * 50%) = 1.
        let e1 = &eps[1].endpoint;
        b.on_failure("text", e1, &policy, 1600.0, false);
        assert!(b.on_failure("text", e1, &policy, 1600.0, false).ejection_capped);
    }

    #[test]
    fn failures_decay_and_heartbeats_restore() {
        let eps = vec![ep(0, true, 1.0, 0.9)];
        let mut b = balancer(eps.clone());
        b.heartbeat_interval_ms = Some(500.0);
        let policy = RoutingPolicy { max_ejected_percent: 0, ..Default::default() };
        let e = &eps[0].endpoint;
        for _ in 0..5 {
            b.on_failure("text", e, &policy, 0.0, false);
        }
        assert!(!b.has_candidate("text", &policy, 0.0), "5 failures and no success must exclude it");
        // Heartbeats stopped for 10 intervals: excluded regardless of counts.
        assert!(b.stats("text", e).unwrap().p_fail(5_000.0, Some(500.0)) >= 0.99);
        for i in 0..4 {
            b.on_heartbeat("text", e, 5_000.0 + 500.0 * i as f64);
        }
        assert!(
            b.has_candidate("text", &policy, 6_500.0),
            "p_fail={}",
            b.stats("text", e).unwrap().p_fail(6_500.0, Some(500.0))
        );
    }

    #[test]
    fn a_replica_that_turns_ready_is_eligible_before_its_first_probe() {
        // A rolling update: the new pod is listed unready for 4 s (never probed meanwhile), then
        // ready while the old one goes. It is the only replica left and must take calls at once,
        // not after its first probe (with 500 ms probes, 4 s unprobed read as 8 missed ones).
        let mut b = balancer(vec![ep(0, true, 1.0, 0.9), ep(1, false, 1.0, 0.9)]);
        b.heartbeat_interval_ms = Some(500.0);
        let policy = RoutingPolicy::default();
        let mut t = BTreeMap::new();
        t.insert("text".to_string(), vec![ep(0, false, 1.0, 0.9), ep(1, true, 1.0, 0.9)]);
        b.apply_table(&t, 4_000.0);
        let new = ep(1, true, 1.0, 0.9).endpoint;
        let chosen = b.choose("text", &policy, &BTreeSet::new(), 4_000.0, &mut StdRng::seed_from_u64(1));
        assert_eq!(chosen.map(|e| e.endpoint), Some(new.clone()));
        // A replica that stays ready keeps its heartbeat age: unanswered probes still count.
        b.apply_table(&t, 9_000.0);
        assert!(!b.has_candidate("text", &policy, 9_000.0), "5 s without a heartbeat while ready");
        // One heard from before (stopped, listed unready, then ready again) waits for a probe.
        b.on_heartbeat("text", &new, 9_000.0);
        let mut t2 = BTreeMap::new();
        t2.insert("text".to_string(), vec![ep(1, false, 1.0, 0.9)]);
        b.apply_table(&t2, 10_000.0);
        b.apply_table(&t, 14_000.0);
        assert!(!b.has_candidate("text", &policy, 14_000.0), "5 s unprobed after answering before");
    }

    #[test]
    fn table_reload_keeps_stats_of_kept_replicas() {
        let eps = vec![ep(0, true, 1.0, 0.9), ep(1, true, 1.0, 0.9)];
        let mut b = balancer(eps.clone());
        b.on_start("text", &eps[0].endpoint);
        let mut t = BTreeMap::new();
        t.insert("text".to_string(), vec![eps[0].clone(), ep(2, true, 1.0, 0.9)]);
        b.apply_table(&t, 10.0);
        assert_eq!(b.stats("text", &eps[0].endpoint).unwrap().inflight, 1);
        assert!(b.stats("text", &eps[1].endpoint).is_none());
        assert!(b.stats("text", &ep(2, true, 1.0, 0.9).endpoint).is_some());
    }
}
