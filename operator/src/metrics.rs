//! Prometheus metrics of the operator (names fixed by DESIGN.md §5).

use std::time::Instant;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconcile_duration: HistogramVec,
    pub reconcile_errors: IntCounterVec,
    pub routing_table_generation: IntGaugeVec,
    /// Reconciles in flight per controller: a proxy for queue depth.
    pub reconcile_inflight: IntGaugeVec,
    /// The builtin autoscaler's latest decision per node.
    pub autoscaler_desired_replicas: IntGaugeVec,
    /// `spec.replicas.max` of autoscaled nodes, so alerts can compare the two.
    pub autoscaler_max_replicas: IntGaugeVec,
    /// What the operator asks of the API server, by verb and resource (see [`crate::client`]).
    pub kube_requests: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new("prism_operator_reconcile_duration_seconds", "Duration of one reconcile")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
            &["controller"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new("prism_operator_reconcile_errors_total", "Failed reconciles by controller and error kind"),
            &["controller", "error"],
        )?;
        let routing_table_generation = IntGaugeVec::new(
            Opts::new("prism_routing_table_generation", "Generation of the routing table last published"),
            &["namespace", "pipeline"],
        )?;
        let reconcile_inflight = IntGaugeVec::new(
            Opts::new("prism_operator_reconcile_inflight", "Reconciles running now"),
            &["controller"],
        )?;
        let autoscaler_desired_replicas = IntGaugeVec::new(
            Opts::new("prism_autoscaler_desired_replicas", "Replicas the builtin autoscaler last decided on"),
            &["namespace", "node"],
        )?;
        registry.register(Box::new(autoscaler_desired_replicas.clone()))?;
        let autoscaler_max_replicas = IntGaugeVec::new(
            Opts::new("prism_autoscaler_max_replicas", "spec.replicas.max of nodes the builtin autoscaler scales"),
            &["namespace", "node"],
        )?;
        registry.register(Box::new(autoscaler_max_replicas.clone()))?;
        let kube_requests = IntCounterVec::new(
            Opts::new("prism_operator_kube_requests_total", "Requests sent to the Kubernetes API server"),
            &["verb", "resource"],
        )?;
        registry.register(Box::new(kube_requests.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(routing_table_generation.clone()))?;
        registry.register(Box::new(reconcile_inflight.clone()))?;
        Ok(Self {
            registry,
            reconcile_duration,
            reconcile_errors,
            routing_table_generation,
            reconcile_inflight,
            autoscaler_desired_replicas,
            autoscaler_max_replicas,
            kube_requests,
        })
    }

    /// Starts timing a reconcile; the measurement is recorded when the guard drops, so early
    /// `?` returns are measured too.
    pub fn measure(&self, controller: &'static str) -> Measure {
        self.reconcile_inflight.with_label_values(&[controller]).inc();
        Measure { metrics: self.clone(), controller, start: Instant::now() }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let enc = prometheus::TextEncoder::new();
        if let Err(e) = enc.encode_utf8(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }
}

pub struct Measure {
    metrics: Metrics,
    controller: &'static str,
    start: Instant,
}

impl Drop for Measure {
    fn drop(&mut self) {
        self.metrics.reconcile_inflight.with_label_values(&[self.controller]).dec();
        self.metrics
            .reconcile_duration
            .with_label_values(&[self.controller])
            .observe(self.start.elapsed().as_secs_f64());
    }
}
