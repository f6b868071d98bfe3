//! Prometheus series of the router (names from DESIGN §5; keep them stable: the autoscaler,
//! dashboards and `prism up` read them).

use prometheus::{
    CounterVec, Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};

/// One geometric bucket series for every duration (TEI style), 0.5 ms .. ~33 s.
fn buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0005, 2.0, 17).unwrap_or_default()
}

pub struct Metrics {
    pub registry: Registry,
    /// `outcome`: ok | degraded | cached | <error kind> (a fixed, small set: RouterError::kind).
    pub request_duration: HistogramVec,
    pub degraded_total: IntCounterVec,
    pub ejections_total: IntCounterVec,
    pub table_generation: GaugeVec,
    pub upstream_duration: HistogramVec,
    pub upstream_failures: IntCounterVec,
    pub retries_total: CounterVec,
    /// Answers served but not recorded in the memory log (its write failed).
    pub memory_write_errors_total: IntCounter,
    /// User corrections per model revision, and the sum of their ratings: a revision's
    /// correction-derived accuracy is `rating_sum / corrections` (the canary analysis reads it).
    pub corrections_total: IntCounterVec,
    pub correction_rating_sum: CounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let request_duration = HistogramVec::new(
            HistogramOpts::new("prism_router_request_duration_seconds", "Router request duration by outcome")
                .buckets(buckets()),
            &["pipeline", "outcome"],
        )?;
        let degraded_total = IntCounterVec::new(
            Opts::new(
                "prism_router_degraded_total",
                "Answers served without a requested modality, per missing modality",
            ),
            &["pipeline", "missing"],
        )?;
        let ejections_total = IntCounterVec::new(
            Opts::new("prism_router_ejections_total", "Passive outlier ejections of a replica"),
            &["node"],
        )?;
        let table_generation = GaugeVec::new(
            Opts::new("prism_routing_table_generation", "Generation of the routing table in force"),
            &["pipeline"],
        )?;
        let upstream_duration = HistogramVec::new(
            HistogramOpts::new("prism_router_upstream_duration_seconds", "Duration of successful node calls")
                .buckets(buckets()),
            &["modality", "node", "revision"],
        )?;
        let upstream_failures = IntCounterVec::new(
            Opts::new("prism_router_upstream_failures_total", "Failed node calls (connect, timeout, 5xx)"),
            &["modality", "node", "revision"],
        )?;
        let retries_total = CounterVec::new(
            Opts::new("prism_router_retries_total", "Node calls retried on another replica"),
            &["modality"],
        )?;
        let memory_write_errors_total = IntCounter::new(
            "prism_router_memory_write_errors_total",
            "Answers served with recorded=false: the memory log write failed (disk full, I/O error)",
        )?;
        let corrections_total = IntCounterVec::new(
            Opts::new("prism_router_corrections_total", "User corrections of answers, per node and model revision"),
            &["node", "revision"],
        )?;
        let correction_rating_sum = CounterVec::new(
            Opts::new(
                "prism_router_correction_rating_sum",
                "Sum of correction ratings (1 right, 0 wrong) per node and model revision",
            ),
            &["node", "revision"],
        )?;
        registry.register(Box::new(corrections_total.clone()))?;
        registry.register(Box::new(correction_rating_sum.clone()))?;
        registry.register(Box::new(memory_write_errors_total.clone()))?;
        registry.register(Box::new(request_duration.clone()))?;
        registry.register(Box::new(degraded_total.clone()))?;
        registry.register(Box::new(ejections_total.clone()))?;
        registry.register(Box::new(table_generation.clone()))?;
        registry.register(Box::new(upstream_duration.clone()))?;
        registry.register(Box::new(upstream_failures.clone()))?;
        registry.register(Box::new(retries_total.clone()))?;
        Ok(Self {
            registry,
            request_duration,
            degraded_total,
            ejections_total,
            table_generation,
            upstream_duration,
            upstream_failures,
            retries_total,
            memory_write_errors_total,
            corrections_total,
            correction_rating_sum,
        })
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if enc.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
