//! The operator's Prometheus client (instant PromQL queries over the HTTP API) and the queries
//! the controllers ask: a revision's figures for canary analysis, a node's corrections for the
//! adaptation trigger. The autoscaler's load queries live with it in `autoscale/prometheus.rs`.

use std::time::Duration;

use serde::Deserialize;

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
}
