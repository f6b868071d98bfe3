//! In a cluster: the routing table and pipeline spec watched from the pipeline's ConfigMap
//! through the API server. A mounted ConfigMap file reaches the pod only at the kubelet's next
//! sync (up to a minute plus its cache TTL); a watch sees the operator's write within
//! milliseconds, which is what makes failover rewrites take effect at once.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use prism_api::routing::{PIPELINE_SPEC_KEY, ROUTING_TABLE_KEY};
use prism_api::RoutingTable;
use thiserror::Error;
use tracing::{info, warn};

use crate::config::{offer_table, parse_pipeline};
use crate::engine::Router;

#[derive(Debug, Error)]
pub enum ClusterError {
    #[error("--routing-configmap '{0}' is not NAME or NAMESPACE/NAME")]
    BadName(String),
    #[error("cannot reach the Kubernetes API (in-cluster service account or KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
}

/// Where the routing ConfigMap lives: `NAMESPACE/NAME`, or `NAME` in the client's default
/// namespace (the pod's own namespace in a cluster).
pub fn parse_ref(s: &str, default_ns: &str) -> Result<(String, String), ClusterError> {
    let bad = || ClusterError::BadName(s.to_string());
    let (ns, name) = match s.split_once('/') {
        Some((ns, name)) => (ns, name),
        None => (default_ns, s),
    };
    let valid = |v: &str| {
        !v.is_empty()
            && v.len() <= 253
            && v.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    };
    if !valid(ns) || !valid(name) {
        return Err(bad());
    }
    Ok((ns.to_string(), name.to_string()))
}

/// A client from the in-cluster service account, else KUBECONFIG / ~/.kube/config.
pub async fn client() -> Result<Client, ClusterError> {
    Client::try_default().await.map_err(ClusterError::Client)
}

/// Watch one ConfigMap (a field-selected watch, so the router's Role can be limited to that
/// name) and offer every version of its table and spec to the router. Runs forever; API errors
/// are retried with backoff while the router keeps serving the table it has.
pub async fn watch_configmap(router: Arc<Router>, client: Client, namespace: String, name: String) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let source = format!("configmap {namespace}/{name}");
    let mut last_spec: Option<String> = None;
    let mut stream = watcher(api, cfg).default_backoff().applied_objects().boxed();
    info!(%source, "watching the routing table");
    while let Some(event) = stream.next().await {
        let cm = match event {
            Ok(cm) => cm,
            Err(e) => {
                warn!(error = %e, %source, "routing ConfigMap watch failed; retrying, keeping the current table");
                continue;
            }
        };
        let data = cm.data.unwrap_or_default();
        if let Some(text) = data.get(ROUTING_TABLE_KEY) {
            match serde_json::from_str::<RoutingTable>(text) {
                Ok(table) => offer_table(&router, table, &source),
                Err(e) => warn!(error = %e, %source, "{ROUTING_TABLE_KEY} is not a routing table; ignored"),
            }
        }
        if let Some(text) = data.get(PIPELINE_SPEC_KEY) {
            if last_spec.as_deref() != Some(text.as_str()) {
                match parse_pipeline(text, std::path::Path::new(&source)) {
                    Ok((_, spec)) => {
                        router.apply_spec(spec);
                        last_spec = Some(text.clone());
                    }
                    Err(e) => warn!(error = %e, %source, "{PIPELINE_SPEC_KEY} is not a pipeline spec; ignored"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configmap_refs() {
        assert_eq!(parse_ref("mm-routing-table", "prod").unwrap(), ("prod".into(), "mm-routing-table".into()));
        assert_eq!(parse_ref("ml/mm-routing-table", "prod").unwrap(), ("ml".into(), "mm-routing-table".into()));
        for bad in ["", "/x", "ns/", "a/b/c", "Upper", "ns/../x", "a b"] {
            assert!(parse_ref(bad, "default").is_err(), "{bad}");
        }
    }
}
