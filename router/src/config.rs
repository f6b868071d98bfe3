//! Files the router reads: the routing table (JSON, `prism_api::RoutingTable`) and the
//! pipeline spec (JSON or YAML: a full `MultimodalPipeline` manifest or a bare spec), with
//! polling hot reload.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prism_api::{MultimodalPipelineSpec, RoutingTable};
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::engine::Router;
use crate::error::RouterError;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{} is not a routing table (JSON {{pipeline, generation, modalities: {{name: [{{endpoint, node, revision, weight, accuracy, ready}}]}}}}): {source}", path.display())]
    Table { path: PathBuf, source: serde_json::Error },
    #[error("{} is not a MultimodalPipeline manifest or spec (JSON or YAML): {message}", path.display())]
    Pipeline { path: PathBuf, message: String },
}

pub fn load_table(path: &Path) -> Result<RoutingTable, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    serde_json::from_slice(&bytes).map_err(|source| ConfigError::Table { path: path.into(), source })
}

/// Parse a pipeline file: `{apiVersion, kind: MultimodalPipeline, metadata: {name}, spec}` or
/// the spec alone. Returns the name when the manifest has one.
pub fn parse_pipeline(text: &str, path: &Path) -> Result<(Option<String>, MultimodalPipelineSpec), ConfigError> {
    let err = |message: String| ConfigError::Pipeline { path: path.into(), message };
    // YAML is a superset of JSON, so one parser reads both.
    let v: serde_json::Value = serde_yaml::from_str(text).map_err(|e| err(e.to_string()))?;
    let (name, spec_v) = match v.get("spec") {
        Some(spec) if v.get("kind").is_some() => {
            let name = v.pointer("/metadata/name").and_then(|n| n.as_str()).map(str::to_string);
            (name, spec.clone())
        }
        _ => (None, v),
    };
    let spec: MultimodalPipelineSpec = serde_json::from_value(spec_v).map_err(|e| err(e.to_string()))?;
    let d = spec.routing.failure_threshold;
    if !(d > 0.0 && d < 1.0) {
        return Err(err(format!("routing.failureThreshold must lie strictly between 0 and 1, got {d}")));
    }
    Ok((name, spec))
}

pub fn load_pipeline(path: &Path) -> Result<(Option<String>, MultimodalPipelineSpec), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    parse_pipeline(&text, path)
}

/// Apply `table` read from `source` (a file, a ConfigMap) if it is newer; older generations are
/// logged and ignored, so sources racing each other can never move the router backwards.
pub fn offer_table(router: &Router, table: RoutingTable, source: &str) {
    match router.apply_table(table) {
        Ok(r) => debug!(generation = r.generation, applied = r.applied, source, "routing table read"),
        Err(RouterError::StaleGeneration { offered, current }) => {
            info!(offered, current, source, "routing table not newer than the one in use; ignored")
        }
        Err(e) => warn!(error = %e, source, "ignoring routing table"),
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Poll `table` and `pipeline` files; apply a table when its file changes and its generation
/// is newer (older ones are logged and ignored: generations never go backwards). Writers
/// should write a temp file and rename it over the old one so a half-written file is never
/// read; a parse error is retried on the next change.
pub async fn watch_files(router: Arc<Router>, table: Option<PathBuf>, pipeline: Option<PathBuf>, every: Duration) {
    let mut table_stamp = table.as_deref().and_then(stamp);
    let mut pipeline_stamp = pipeline.as_deref().and_then(stamp);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Some(p) = &table {
            let s = stamp(p);
            if s.is_some() && s != table_stamp {
                match load_table(p) {
                    Ok(t) => {
                        table_stamp = s;
                        offer_table(&router, t, &p.display().to_string());
                    }
                    Err(e) => warn!(error = %e, "routing table file unreadable; keeping the current table"),
                }
            }
        }
        if let Some(p) = &pipeline {
            let s = stamp(p);
            if s.is_some() && s != pipeline_stamp {
                match load_pipeline(p) {
                    Ok((_, spec)) => {
                        pipeline_stamp = s;
                        router.apply_spec(spec);
                    }
                    Err(e) => warn!(error = %e, "pipeline file unreadable; keeping the current spec"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_manifest_yaml_and_bare_json_spec() {
        let yaml = r#"
apiVersion: prism.dev/v1alpha1
kind: MultimodalPipeline
metadata: {name: search}
spec:
  nodes:
    - {name: minilm, weight: 2, required: true}
  fusion: {strategy: attention, deFusion: true}
  routing: {timeoutMs: 800, retries: 2}
"#;
        let (name, spec) = parse_pipeline(yaml, Path::new("p.yaml")).unwrap();
        assert_eq!(name.as_deref(), Some("search"));
        assert_eq!(spec.nodes[0].weight, 2.0);
        assert!(spec.fusion.de_fusion);
        assert_eq!(spec.routing.timeout_ms, 800);
        let (name, spec) = parse_pipeline(r#"{"nodes":[{"name":"a"}]}"#, Path::new("p.json")).unwrap();
        assert!(name.is_none());
        assert_eq!(spec.routing.retries, 1);
        let bad = parse_pipeline(r#"{"nodes":[{"name":"a"}],"routing":{"failureThreshold":1.5}}"#, Path::new("x"))
            .unwrap_err();
        assert!(bad.to_string().contains("failureThreshold"), "{bad}");
        assert!(parse_pipeline("nodes: 5", Path::new("x")).is_err());
    }
}
