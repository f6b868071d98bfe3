//! Reading a node's load from Prometheus over its HTTP API (instant PromQL queries).
//!
//! Prometheus does the window averaging (`avg_over_time`, `rate`), so the autoscaler keeps no
//! sample history of its own and a restarted operator decides from the same numbers.

use prism_api::node::AutoscalingSpec;

use super::decide::{Load, Reading, WindowLoad};
use crate::prom::PromClient;

/// The autoscaler's queries: a node's load over its stable and panic windows.
impl PromClient {
    /// Both windows of one node's load. `selector` is the label matcher body, e.g.
    /// `node="text",namespace="prod"`. An unreachable Prometheus or a node it has no series for
    /// reads as [`Reading::Unavailable`], never as zero load.
    pub async fn read_load(&self, selector: &str, spec: &AutoscalingSpec) -> Reading {
        // The GPU query runs only for nodes that target it: most nodes are CPU and would pay for it.
        let gpu = spec.target_gpu_utilization.is_some();
        let stable = self.window(selector, spec.stable_window_seconds, gpu).await;
        let panic = self.window(selector, spec.panic_window_seconds, gpu).await;
        match (stable, panic) {
            (Ok(stable), Ok(panic)) => Reading::Load(Load { stable, panic }),
            (Err(why), _) | (_, Err(why)) => Reading::Unavailable(why),
        }
    }

    async fn window(&self, selector: &str, seconds: u32, gpu: bool) -> Result<WindowLoad, String> {
        let inflight_q = format!("sum(avg_over_time(prism_node_inflight{{{selector}}}[{seconds}s]))");
        // `sum()` over nothing is an empty vector, so a missing series stays distinguishable from 0.
        let inflight = match self.query(&inflight_q).await.map_err(|e| e.to_string())?.first() {
            Some(v) if v.is_finite() => *v,
            _ => {
                return Err(format!(
                    "no prism_node_inflight series for {{{selector}}} in the last {seconds}s (is Prometheus scraping the node?)"
                ))
            }
        };
        let p95_q = format!(
            "histogram_quantile(0.95, sum by (le) (rate(prism_node_request_duration_seconds_bucket{{{selector}}}[{seconds}s])))"
        );
        // NaN: no request finished in the window (rate 0), which is real idleness, not an outage.
        let p95_ms = self.query(&p95_q).await.map_err(|e| e.to_string())?.first().copied().filter(|v| v.is_finite());
        let gpu_utilization = if gpu {
            // Empty (CPU replicas export no GPU series) reads as None: the signal is ignored.
            self.query(&gpu_utilization_query(selector, seconds))
                .await
                .map_err(|e| e.to_string())?
                .first()
                .copied()
                .filter(|v| v.is_finite())
        } else {
            None
        };
        Ok(WindowLoad { p95_ms: p95_ms.map(|s| s * 1000.0), inflight, gpu_utilization })
    }
}

/// Mean GPU utilisation (0..1) of a node over a window: averaged over time per device series,
/// then over the node's pods and their devices.
pub fn gpu_utilization_query(selector: &str, seconds: u32) -> String {
    format!("avg(avg_over_time(prism_node_gpu_utilization_ratio{{{selector}}}[{seconds}s]))")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prom::node_selector;

    #[test]
    fn the_gpu_query_averages_over_time_then_over_pods() {
        assert_eq!(
            gpu_utilization_query(&node_selector("img", Some("prod")), 60),
            r#"avg(avg_over_time(prism_node_gpu_utilization_ratio{node="img",namespace="prod"}[60s]))"#
        );
    }

    #[tokio::test]
    async fn an_unreachable_prometheus_reads_as_unavailable_not_zero() {
        // Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
        let c = PromClient::new("http://127.0.0.1:9").unwrap();
        match c.read_load(&node_selector("text", None), &AutoscalingSpec::default()).await {
            Reading::Unavailable(why) => assert!(why.contains("unreachable"), "{why}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
}
