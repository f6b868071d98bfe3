//! Reading a quantile out of the nodes' Prometheus histograms, for `prism up`'s status table.

use std::collections::BTreeMap;

/// The `q` quantile (e.g. 0.95) of histogram `metric` in Prometheus text exposition, summed over
/// every label set (so several replicas' texts can be concatenated), interpolated linearly
/// inside the bucket as PromQL's `histogram_quantile` does. `None` when nothing was observed.
pub fn histogram_quantile(text: &str, metric: &str, q: f64) -> Option<f64> {
    let prefix = format!("{metric}_bucket{{");
    let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with(&prefix)) {
        let le = line.split("le=\"").nth(1)?.split('"').next()?;
        let le: f64 = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
        let count: f64 = line.rsplit(' ').next()?.parse().ok()?;
        buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += count;
    }
    let mut sorted: Vec<(f64, f64)> = buckets.into_values().collect();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = sorted.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for (le, cum) in sorted {
        if cum >= rank {
            if le.is_infinite() {
                return Some(lower);
            }
            let in_bucket = cum - below;
            let frac = if in_bucket > 0.0 { (rank - below) / in_bucket } else { 1.0 };
            return Some(lower + (le - lower) * frac);
        }
        lower = le;
        below = cum;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE prism_node_request_duration_seconds histogram
prism_node_request_duration_seconds_bucket{modality="text",node="a",le="0.01"} 50
prism_node_request_duration_seconds_bucket{modality="text",node="a",le="0.02"} 90
prism_node_request_duration_seconds_bucket{modality="text",node="a",le="0.04"} 100
prism_node_request_duration_seconds_bucket{modality="text",node="a",le="+Inf"} 100
prism_node_request_duration_seconds_sum{modality="text",node="a"} 1.2
"#;

    #[test]
    fn interpolates_inside_the_bucket() {
        // rank 95 of 100 lies halfway through the (0.02, 0.04] bucket (90 -> 100).
        let p95 = histogram_quantile(TEXT, "prism_node_request_duration_seconds", 0.95).unwrap();
        assert!((p95 - 0.03).abs() < 1e-9, "{p95}");
        let p50 = histogram_quantile(TEXT, "prism_node_request_duration_seconds", 0.5).unwrap();
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
    }

    #[test]
    fn sums_replicas_and_handles_empty() {
        let two = format!("{TEXT}{}", TEXT.replace("node=\"a\"", "node=\"b\""));
        let p95 = histogram_quantile(&two, "prism_node_request_duration_seconds", 0.95).unwrap();
        assert!((p95 - 0.03).abs() < 1e-9);
        assert_eq!(histogram_quantile("", "prism_node_request_duration_seconds", 0.95), None);
        let zero = TEXT.replace(" 50\n", " 0\n").replace(" 90\n", " 0\n").replace(" 100\n", " 0\n");
        assert_eq!(histogram_quantile(&zero, "prism_node_request_duration_seconds", 0.95), None);
    }
}
