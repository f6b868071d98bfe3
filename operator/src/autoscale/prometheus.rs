//! Reading a node's load from Prometheus over its HTTP API (instant PromQL queries).
//!
//! Prometheus does the window averaging (`avg_over_time`, `rate`), so the autoscaler keeps no
//! sample history of its own and a restarted operator decides from the same numbers.

use std::time::Duration;

use prism_api::node::AutoscalingSpec;
use serde::Deserialize;

use super::decide::{Load, Reading, WindowLoad};

#[derive(Debug, thiserror::Error)]
pub enum PromError {
    #[error("prometheus at {url} unreachable: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("prometheus at {url} answered HTTP {status}: {body}")]
    Status { url: String, status: u16, body: String },
    #[error("prometheus at {url} answered something that is not a query result: {detail}")]
    Malformed { url: String, detail: String },
}

#[derive(Deserialize)]
struct QueryResponse {
    status: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    data: Option<QueryData>,
}

#[derive(Deserialize)]
struct QueryData {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<Sample>,
}

#[derive(Deserialize)]
struct Sample {
    /// `[unix time, "value"]`; the value is a string so that NaN and ±Inf survive JSON.
    value: (f64, String),
}

/// A Prometheus HTTP API client for the autoscaler's few queries.
#[derive(Clone, Debug)]
pub struct PromClient {
    base: String,
    http: reqwest::Client,
}

impl PromClient {
    pub fn new(base: &str) -> Result<Self, PromError> {
        let base = base.trim_end_matches('/').to_string();
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(3))
            .build()
            .map_err(|source| PromError::Unreachable { url: base.clone(), source })?;
        Ok(Self { base, http })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// The values of an instant-vector query (empty when no series matched).
    pub async fn query(&self, promql: &str) -> Result<Vec<f64>, PromError> {
        let url = format!("{}/api/v1/query", self.base);
        let res = self
            .http
            .get(&url)
            .query(&[("query", promql)])
            .send()
            .await
            .map_err(|source| PromError::Unreachable { url: self.base.clone(), source })?;
        let status = res.status();
        let body = res.text().await.map_err(|source| PromError::Unreachable { url: self.base.clone(), source })?;
        if !status.is_success() {
            return Err(PromError::Status { url: self.base.clone(), status: status.as_u16(), body: truncate(&body) });
        }
        let parsed: QueryResponse = serde_json::from_str(&body)
            .map_err(|e| PromError::Malformed { url: self.base.clone(), detail: e.to_string() })?;
        if parsed.status != "success" {
            let detail = parsed.error.unwrap_or_else(|| format!("status {}", parsed.status));
            return Err(PromError::Malformed { url: self.base.clone(), detail });
        }
        let data =
            parsed.data.ok_or_else(|| PromError::Malformed { url: self.base.clone(), detail: "no data".into() })?;
        if data.result_type != "vector" {
            let detail = format!("expected a vector, got {}", data.result_type);
            return Err(PromError::Malformed { url: self.base.clone(), detail });
        }
        data.result
            .into_iter()
            .map(|s| {
                s.value.1.parse::<f64>().map_err(|e| PromError::Malformed {
                    url: self.base.clone(),
                    detail: format!("value {:?}: {e}", s.value.1),
                })
            })
            .collect()
    }

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

impl PromClient {
    /// One revision's figures for the canary analysis: calls and failures over the last
    /// `window_s` seconds (the current step), p95 over the same window, corrections over the
    /// revision's life. `selector`: [`node_selector`].
    pub async fn read_revision(
        &self,
        selector: &str,
        revision: &str,
        window_s: u64,
    ) -> Result<crate::rollout::RevisionStats, PromError> {
        let rev = revision.replace('\\', "\\\\").replace('"', "\\\"");
        let sel = format!("{selector},revision=\"{rev}\"");
        let w = window_s.max(15);
        let first = |v: Vec<f64>| v.first().copied().filter(|x| x.is_finite());
        let calls = first(
            self.query(&format!("sum(increase(prism_router_upstream_duration_seconds_count{{{sel}}}[{w}s]))")).await?,
        );
        let failures =
            first(self.query(&format!("sum(increase(prism_router_upstream_failures_total{{{sel}}}[{w}s]))")).await?);
        let p95 = first(
            self.query(&format!(
                "histogram_quantile(0.95, sum by (le) (rate(prism_router_upstream_duration_seconds_bucket{{{sel}}}[{w}s])))"
            ))
            .await?,
        );
        let corrections = first(self.query(&format!("sum(prism_router_corrections_total{{{sel}}})")).await?);
        let rating_sum = first(self.query(&format!("sum(prism_router_correction_rating_sum{{{sel}}})")).await?);
        Ok(crate::rollout::RevisionStats {
            calls: calls.unwrap_or(0.0),
            failures: failures.unwrap_or(0.0),
            p95_s: p95,
            corrections: corrections.unwrap_or(0.0),
            rating_sum: rating_sum.unwrap_or(0.0),
        })
    }
}

impl PromClient {
    /// Corrections recorded for a node, summed over every router (None: no series yet). The
    /// baseline of `adaptation.trigger.everyCorrections`.
    pub async fn read_corrections_total(&self, selector: &str) -> Result<Option<f64>, PromError> {
        let v = self.query(&format!("sum(prism_router_corrections_total{{{selector}}})")).await?;
        Ok(v.first().copied().filter(|x| x.is_finite()))
    }
}

fn truncate(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Mean GPU utilisation (0..1) of a node over a window: averaged over time per device series,
/// then over the node's pods and their devices.
pub fn gpu_utilization_query(selector: &str, seconds: u32) -> String {
    format!("avg(avg_over_time(prism_node_gpu_utilization_ratio{{{selector}}}[{seconds}s]))")
}

/// PromQL label-matcher body for a node (label values escaped as PromQL strings).
pub fn node_selector(node: &str, namespace: Option<&str>) -> String {
    let esc = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
    match namespace {
        Some(ns) => format!("node=\"{}\",namespace=\"{}\"", esc(node), esc(ns)),
        None => format!("node=\"{}\"", esc(node)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_escape_label_values() {
        assert_eq!(node_selector("text", None), r#"node="text""#);
        assert_eq!(node_selector("a\"b", Some("ns")), r#"node="a\"b",namespace="ns""#);
    }

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
