//! Prometheus series of a node. Names follow DESIGN §5 (`prism_node_*`); every series carries
//! `node` and `modality` so one Prometheus can scrape many nodes. Durations share one bucket series.

use prometheus::{Encoder as _, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// 0.5 ms .. ~16 s, doubling: covers batch-1 CPU text (ms) to long audio windows (s).
fn duration_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0005, 2.0, 16).unwrap_or_else(|_| vec![0.001, 0.01, 0.1, 1.0, 10.0])
}

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    labels: [String; 2],
    pub request_duration: HistogramVec,
    pub queue_duration: HistogramVec,
    pub preprocess_duration: HistogramVec,
    pub inference_duration: HistogramVec,
    pub batch_size: HistogramVec,
    pub inflight: IntGaugeVec,
    pub queue_size: IntGaugeVec,
    pub failures: IntCounterVec,
}

impl Metrics {
    pub fn new(node: &str, modality: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let l = &["node", "modality"];
        let hist = |name: &str, help: &str, buckets: Vec<f64>| -> Result<HistogramVec, prometheus::Error> {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), l)?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let request_duration = hist(
            "prism_node_request_duration_seconds",
            "Time from receipt to answer of successful embed requests",
            duration_buckets(),
        )?;
        let queue_duration = hist(
            "prism_node_queue_duration_seconds",
            "Time a request waited in the batching queue",
            duration_buckets(),
        )?;
        let preprocess_duration =
            hist("prism_node_preprocess_duration_seconds", "Tokenising/decoding time per request", duration_buckets())?;
        let inference_duration =
            hist("prism_node_inference_duration_seconds", "Forward-pass time per batch", duration_buckets())?;
        let batch_size = hist(
            "prism_node_batch_size",
            "Inputs per forward-pass batch",
            vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
        )?;
        let inflight = IntGaugeVec::new(Opts::new("prism_node_inflight", "Requests received and not yet answered"), l)?;
        registry.register(Box::new(inflight.clone()))?;
        let queue_size =
            IntGaugeVec::new(Opts::new("prism_node_queue_size", "Requests waiting in the batching queue"), l)?;
        registry.register(Box::new(queue_size.clone()))?;
        let failures = IntCounterVec::new(
            Opts::new(
                "prism_node_request_failures_total",
                "Failed requests by err: validation, payload_too_large, headers_too_large, unsupported_media_type, overloaded, timeout, unavailable, inference, dropped",
            ),
            &["node", "modality", "err"],
        )?;
        registry.register(Box::new(failures.clone()))?;
        let m = Self {
            registry,
            labels: [node.to_string(), modality.to_string()],
            request_duration,
            queue_duration,
            preprocess_duration,
            inference_duration,
            batch_size,
            inflight,
            queue_size,
            failures,
        };
        // Create the labelled children up front so a scrape sees zeros rather than no series
        // (the autoscaler treats an empty result as "metrics unavailable").
        for h in [&m.request_duration, &m.queue_duration, &m.preprocess_duration, &m.inference_duration, &m.batch_size]
        {
            h.with_label_values(&m.label_values());
        }
        m.inflight.with_label_values(&m.label_values());
        m.queue_size.with_label_values(&m.label_values());
        Ok(m)
    }

    /// The registry `/metrics` renders; optional series (GPU telemetry) register here when enabled.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn label_values(&self) -> [&str; 2] {
        [self.labels[0].as_str(), self.labels[1].as_str()]
    }

    pub fn observe(&self, h: &HistogramVec, v: f64) {
        h.with_label_values(&self.label_values()).observe(v);
    }

    pub fn fail(&self, err: &str) {
        self.failures.with_label_values(&[self.labels[0].as_str(), self.labels[1].as_str(), err]).inc();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            return format!("# encoding metrics failed: {e}\n");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
