//! The routing table: what the operator (or `prism up`) tells routers about where each
//! modality can be served. JSON on the wire, stored in the pipeline's ConfigMap under
//! [`ROUTING_TABLE_KEY`]. Generations only go forward: a router ignores an older table.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// ConfigMap key holding the routing table JSON.
pub const ROUTING_TABLE_KEY: &str = "routing-table.json";
/// ConfigMap key holding the pipeline spec JSON the router enforces (fusion, degradation, routing).
pub const PIPELINE_SPEC_KEY: &str = "pipeline.json";

/// Where each modality of one pipeline can be served right now.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema, Default)]
pub struct RoutingTable {
    /// Pipeline name.
    pub pipeline: String,
    /// Monotonic generation; bumped on every change.
    pub generation: u64,
    /// Modality name -> replicas that serve it.
    pub modalities: BTreeMap<String, Vec<RouteEndpoint>>,
}

/// One replica of one node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct RouteEndpoint {
    /// Base URL of the node's HTTP API, e.g. `http://10.0.0.7:8080`.
    pub endpoint: String,
    /// ModalityNode name.
    pub node: String,
    /// Model revision this replica serves.
    pub revision: String,
    /// Traffic weight among this modality's replicas (canary split); 0 takes no new traffic.
    pub weight: f64,
    /// Accuracy prior A in [0,1] (updated by corrections in the router).
    pub accuracy: f64,
    /// Whether the replica is ready. Unready replicas are listed so routers can see them come back.
    pub ready: bool,
}

impl RoutingTable {
    /// Ready replicas of a modality.
    pub fn ready(&self, modality: &str) -> impl Iterator<Item = &RouteEndpoint> {
        self.modalities.get(modality).into_iter().flatten().filter(|e| e.ready)
    }

    /// Modalities with no ready replica (sorted, for stable messages).
    pub fn missing_modalities(&self) -> Vec<String> {
        self.modalities.iter().filter(|(_, eps)| !eps.iter().any(|e| e.ready)).map(|(m, _)| m.clone()).collect()
    }

    /// Whether `self` should replace `current`: only strictly newer generations do.
    pub fn supersedes(&self, current: &RoutingTable) -> bool {
        self.generation > current.generation
    }

    /// Same content apart from the generation (used to avoid bumping on no-op rewrites).
    pub fn same_routes(&self, other: &RoutingTable) -> bool {
        self.pipeline == other.pipeline && self.modalities == other.modalities
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(node: &str, ready: bool) -> RouteEndpoint {
        RouteEndpoint {
            endpoint: format!("http://127.0.0.1:1/{node}"),
            node: node.into(),
            revision: "1".into(),
            weight: 1.0,
            accuracy: 0.9,
            ready,
        }
    }

    #[test]
    fn missing_lists_modalities_without_ready_replicas() {
        let mut t = RoutingTable { pipeline: "p".into(), generation: 1, ..Default::default() };
        t.modalities.insert("text".into(), vec![ep("t", true), ep("t", false)]);
        t.modalities.insert("audio".into(), vec![ep("a", false)]);
        t.modalities.insert("vision".into(), vec![]);
        assert_eq!(t.missing_modalities(), vec!["audio".to_string(), "vision".to_string()]);
        assert_eq!(t.ready("text").count(), 1);
        assert_eq!(t.ready("nope").count(), 0);
    }

    #[test]
    fn only_newer_generations_supersede() {
        let old = RoutingTable { pipeline: "p".into(), generation: 5, ..Default::default() };
        let same = RoutingTable { generation: 5, ..old.clone() };
        let newer = RoutingTable { generation: 6, ..old.clone() };
        assert!(!same.supersedes(&old));
        assert!(newer.supersedes(&old));
        assert!(!old.supersedes(&newer));
    }

    #[test]
    fn json_shape_matches_design() {
        let mut t = RoutingTable { pipeline: "p".into(), generation: 2, ..Default::default() };
        t.modalities.insert("text".into(), vec![ep("t", true)]);
        let v = serde_json::to_value(&t).unwrap();
        let e = &v["modalities"]["text"][0];
        for k in ["endpoint", "node", "revision", "weight", "accuracy", "ready"] {
            assert!(e.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["generation"], 2);
    }
}

/// What one ModalityNode looks like right now, as seen by whichever substrate runs it
/// (EndpointSlices in a cluster, child processes under `prism up`).
#[derive(Clone, Debug, PartialEq)]
pub struct NodeObservation {
    /// ModalityNode name.
    pub node: String,
    pub modality: String,
    /// Revision of the node's stable replicas.
    pub revision: String,
    /// `(base URL, ready)` per replica.
    pub endpoints: Vec<(String, bool)>,
    /// Base URL -> revision for replicas that serve another revision than `revision` (a canary,
    /// or pods of a rolling update).
    pub revisions: BTreeMap<String, String>,
    /// The canary in flight: its revision's replicas share `weight`% of the node's traffic.
    pub canary: Option<crate::node::CanaryStatus>,
}

/// Routing-table weight multiplier of one replica of `revision` while `canary` is in flight: the
/// canary revision's replicas share `weight`% of the node's traffic and the others the rest,
/// scaled so the node's weights still sum to its replica count (its share against other nodes
/// of the modality does not change during a rollout).
pub fn traffic_share(
    canary: Option<&crate::node::CanaryStatus>,
    revision: &str,
    replicas_of_revision: usize,
    replicas: usize,
) -> f64 {
    let per = replicas as f64 / replicas_of_revision.max(1) as f64;
    match canary {
        None => 1.0,
        Some(c) if c.revision == revision => f64::from(c.weight.min(100)) / 100.0 * per,
        Some(c) => f64::from(100 - c.weight.min(100)) / 100.0 * per,
    }
}

/// Builds a pipeline's routing table from observed nodes: the one pure function both the
/// operator and the local substrate use, so they route identically.
///
/// The generation is `previous + 1` when routes changed and unchanged otherwise, so a
/// re-reconcile does not make every router reload. Nodes of the pipeline that were not
/// observed contribute nothing; a modality whose replicas are all unready stays listed (with
/// `ready: false`), so [`RoutingTable::missing_modalities`] reports it.
pub fn build_table(
    pipeline: &str,
    spec: &crate::pipeline::MultimodalPipelineSpec,
    observed: &[NodeObservation],
    previous: Option<&RoutingTable>,
) -> RoutingTable {
    let mut modalities: BTreeMap<String, Vec<RouteEndpoint>> = BTreeMap::new();
    for pn in &spec.nodes {
        let Some(obs) = observed.iter().find(|o| o.node == pn.name) else { continue };
        let entry = modalities.entry(obs.modality.clone()).or_default();
        let mut eps: Vec<&(String, bool)> = obs.endpoints.iter().collect();
        eps.sort();
        let revision_of = |e: &str| obs.revisions.get(e).unwrap_or(&obs.revision).clone();
        for (endpoint, ready) in &eps {
            let revision = revision_of(endpoint);
            let same = eps.iter().filter(|(e, _)| revision_of(e) == revision).count();
            let share = traffic_share(obs.canary.as_ref(), &revision, same, eps.len());
            entry.push(RouteEndpoint {
                endpoint: endpoint.clone(),
                node: obs.node.clone(),
                revision,
                weight: pn.weight.max(0.0) * share,
                accuracy: pn.accuracy,
                ready: *ready,
            });
        }
    }
    let mut table = RoutingTable { pipeline: pipeline.to_string(), generation: 1, modalities };
    if let Some(prev) = previous {
        table.generation = if table.same_routes(prev) { prev.generation } else { prev.generation + 1 };
    }
    table
}

#[cfg(test)]
mod build_tests {
    use super::*;
    use crate::pipeline::MultimodalPipelineSpec;

    fn spec() -> MultimodalPipelineSpec {
        serde_json::from_value(serde_json::json!({
            "nodes": [{"name": "t", "weight": 2.0}, {"name": "a", "weight": 1.0, "accuracy": 0.7}]
        }))
        .unwrap()
    }

    fn obs(node: &str, modality: &str, eps: &[(&str, bool)]) -> NodeObservation {
        NodeObservation {
            node: node.into(),
            modality: modality.into(),
            revision: "r1".into(),
            endpoints: eps.iter().map(|(e, r)| (e.to_string(), *r)).collect(),
            revisions: BTreeMap::new(),
            canary: None,
        }
    }

    #[test]
    fn canary_replicas_share_its_weight_of_the_node() {
        let mut o = obs(
            "t",
            "text",
            &[("http://127.0.0.1:1", true), ("http://127.0.0.1:2", true), ("http://127.0.0.1:3", true)],
        );
        o.revisions.insert("http://127.0.0.1:3".into(), "r2".into());
        o.canary =
            Some(crate::node::CanaryStatus { revision: "r2".into(), step: 0, weight: 20, step_started: String::new() });
        let t = build_table("p", &spec(), &[o], None);
        let eps = &t.modalities["text"];
        let total: f64 = eps.iter().map(|e| e.weight).sum();
        assert!((total - 6.0).abs() < 1e-9, "node weight 2 x 3 replicas kept: {total}");
        let canary: f64 = eps.iter().filter(|e| e.revision == "r2").map(|e| e.weight).sum();
        assert!((canary / total - 0.2).abs() < 1e-9);
        assert_eq!(eps.iter().filter(|e| e.revision == "r1").count(), 2);
    }

    #[test]
    fn generation_bumps_only_when_routes_change() {
        let o =
            vec![obs("t", "text", &[("http://127.0.0.1:1", true)]), obs("a", "audio", &[("http://127.0.0.1:2", true)])];
        let t1 = build_table("p", &spec(), &o, None);
        assert_eq!(t1.generation, 1);
        assert_eq!(t1.modalities["audio"][0].accuracy, 0.7);
        assert_eq!(t1.modalities["text"][0].weight, 2.0);
        let t2 = build_table("p", &spec(), &o, Some(&t1));
        assert_eq!(t2.generation, 1, "same routes must not bump");
        let mut o2 = o.clone();
        o2[1].endpoints[0].1 = false;
        let t3 = build_table("p", &spec(), &o2, Some(&t2));
        assert_eq!(t3.generation, 2);
        assert_eq!(t3.missing_modalities(), vec!["audio".to_string()]);
    }

    #[test]
    fn nodes_outside_the_pipeline_are_ignored() {
        let o = vec![
            obs("t", "text", &[("http://127.0.0.1:1", true)]),
            obs("x", "vision", &[("http://127.0.0.1:3", true)]),
        ];
        let t = build_table("p", &spec(), &o, None);
        assert!(!t.modalities.contains_key("vision"));
    }
}
