//! In-memory index of ModalityNode pods, linkerd policy-controller style:
//!
//! ```text
//!   Pod (label prism.dev/node=N) --apply/delete--> Index[namespace][N][pod] = PodEndpoint
//!   MultimodalPipeline.spec.nodes[].name = N  --lookup-->  endpoints of N
//! ```
//!
//! One pod watch feeds it; every change returns the `(namespace, node)` keys whose endpoint set
//! really changed, so the caller re-publishes only the routing tables that depend on them.
//! Pods are the source (not EndpointSlices) because the pod Ready condition is the earliest
//! signal: the EndpointSlice controller derives its `ready` bit from the same condition one hop
//! later, and failover must rewrite tables within a second of the event.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use prism_api::labels;

use crate::pod_health::{pod_problem, PodProblem};
use crate::workload::HTTP_PORT;

/// One replica as the routing table sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEndpoint {
    /// `http://IP:8080`, or `https://` for a pod annotated `prism.dev/scheme: https`
    pub endpoint: String,
    pub revision: String,
    pub ready: bool,
}

/// namespace -> node -> pod name -> endpoint; and the same for pods that report a problem.
#[derive(Default, Debug)]
pub struct Index {
    by_ns: HashMap<String, HashMap<String, BTreeMap<String, PodEndpoint>>>,
    /// Kept apart from endpoints: pods without an IP (unschedulable) have problems too, and
    /// only problem changes need the node's status rewritten.
    problems: HashMap<String, HashMap<String, BTreeMap<String, PodProblem>>>,
}

pub type SharedIndex = Arc<RwLock<Index>>;

/// Key of one node's endpoint set.
pub type NodeKey = (String, String);

/// What a pod contributes, or None when it must not be listed (no IP yet, not a node pod).
pub fn pod_endpoint(pod: &Pod) -> Option<(String, PodEndpoint)> {
    let node = pod.labels().get(labels::NODE)?.clone();
    let status = pod.status.as_ref()?;
    let ip = status.pod_ip.as_ref().filter(|ip| !ip.is_empty())?;
    // A terminating pod stops taking traffic at once, before its endpoint is removed.
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let phase_running = status.phase.as_deref() == Some("Running");
    let ready_cond = status
        .conditions
        .as_ref()
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    let host = if ip.contains(':') { format!("[{ip}]") } else { ip.clone() };
    let https = pod.annotations().get(labels::SCHEME).is_some_and(|s| s == "https");
    Some((
        node,
        PodEndpoint {
            endpoint: format!("{}://{host}:{HTTP_PORT}", if https { "https" } else { "http" }),
            revision: pod.labels().get(labels::REVISION).cloned().unwrap_or_default(),
            ready: ready_cond && phase_running && !terminating,
        },
    ))
}

impl Index {
    /// Applies a pod add/update. Returns the node key when that node's endpoints changed.
    pub fn apply(&mut self, pod: &Pod) -> Option<NodeKey> {
        let ns = pod.namespace()?;
        let name = pod.name_any();
        match pod_endpoint(pod) {
            Some((node, ep)) => {
                let pods = self.by_ns.entry(ns.clone()).or_default().entry(node.clone()).or_default();
                if pods.get(&name) == Some(&ep) {
                    return None;
                }
                pods.insert(name, ep);
                Some((ns, node))
            }
            // The pod lost its IP or label: drop whatever it contributed before.
            None => self.delete(&ns, &name),
        }
    }

    /// Removes a pod. Returns the node key when something was removed.
    pub fn delete(&mut self, ns: &str, pod: &str) -> Option<NodeKey> {
        remove_pod(&mut self.by_ns, ns, pod)
    }

    /// Replaces the whole content (after a watch restart). Returns every key that changed.
    pub fn reset(&mut self, pods: &[Pod]) -> Vec<NodeKey> {
        let before = std::mem::take(&mut self.by_ns);
        for p in pods {
            self.apply(p);
        }
        let mut changed = Vec::new();
        for (ns, nodes) in &before {
            for (node, eps) in nodes {
                if self.by_ns.get(ns).and_then(|n| n.get(node)) != Some(eps) {
                    changed.push((ns.clone(), node.clone()));
                }
            }
        }
        for (ns, nodes) in &self.by_ns {
            for node in nodes.keys() {
                if before.get(ns).and_then(|n| n.get(node)).is_none() {
                    changed.push((ns.clone(), node.clone()));
                }
            }
        }
        changed.sort();
        changed.dedup();
        changed
    }

    /// Records what keeps a pod from serving (pod_health). Returns the node key when that node's
    /// set of problems changed.
    pub fn apply_problem(&mut self, pod: &Pod) -> Option<NodeKey> {
        let ns = pod.namespace()?;
        let name = pod.name_any();
        let Some(node) = pod.labels().get(labels::NODE).cloned() else {
            return self.delete_problem(&ns, &name);
        };
        let new = pod_problem(pod);
        let old = self.problems.get(&ns).and_then(|n| n.get(&node)).and_then(|p| p.get(&name));
        if old == new.as_ref() {
            return None;
        }
        match new {
            Some(p) => {
                self.problems.entry(ns.clone()).or_default().entry(node.clone()).or_default().insert(name, p);
            }
            None => {
                self.delete_problem(&ns, &name);
            }
        }
        Some((ns, node))
    }

    /// Forgets a pod's problem. Returns the node key when it had one.
    pub fn delete_problem(&mut self, ns: &str, pod: &str) -> Option<NodeKey> {
        remove_pod(&mut self.problems, ns, pod)
    }

    /// Replaces every recorded problem (after a watch restart). Returns the keys that changed.
    pub fn reset_problems(&mut self, pods: &[Pod]) -> Vec<NodeKey> {
        let before = std::mem::take(&mut self.problems);
        for p in pods {
            self.apply_problem(p);
        }
        let mut changed: Vec<NodeKey> = Vec::new();
        for (a, b) in [(&before, &self.problems), (&self.problems, &before)] {
            for (ns, nodes) in a {
                for (node, probs) in nodes {
                    if b.get(ns).and_then(|n| n.get(node)) != Some(probs) {
                        changed.push((ns.clone(), node.clone()));
                    }
                }
            }
        }
        changed.sort();
        changed.dedup();
        changed
    }

    /// Problems of one node's pods, ordered by pod name.
    pub fn problems(&self, ns: &str, node: &str) -> Vec<PodProblem> {
        self.problems.get(ns).and_then(|n| n.get(node)).map(|p| p.values().cloned().collect()).unwrap_or_default()
    }

    /// Endpoints of one node, ordered by pod name (stable tables, no churn).
    pub fn endpoints(&self, ns: &str, node: &str) -> Vec<PodEndpoint> {
        self.by_ns.get(ns).and_then(|n| n.get(node)).map(|p| p.values().cloned().collect()).unwrap_or_default()
    }
}

/// Removes `pod` from a namespace -> node -> pod map, dropping emptied nodes. Returns the node
/// key it was under.
fn remove_pod<T>(
    map: &mut HashMap<String, HashMap<String, BTreeMap<String, T>>>,
    ns: &str,
    pod: &str,
) -> Option<NodeKey> {
    let nodes = map.get_mut(ns)?;
    let node = nodes.iter().find(|(_, pods)| pods.contains_key(pod)).map(|(n, _)| n.clone())?;
    if let Some(pods) = nodes.get_mut(&node) {
        pods.remove(pod);
        if pods.is_empty() {
            nodes.remove(&node);
        }
    }
    Some((ns.to_string(), node))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use kube::api::ObjectMeta;

    pub fn mk_pod(ns: &str, name: &str, node: &str, ip: &str, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                labels: Some(BTreeMap::from([
                    (labels::NODE.to_string(), node.to_string()),
                    (labels::REVISION.to_string(), "7".to_string()),
                ])),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(ip.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn apply_reports_only_real_changes() {
        let mut idx = Index::default();
        let p = mk_pod("ns", "t-1", "text", "10.244.1.5", true);
        assert_eq!(idx.apply(&p), Some(("ns".into(), "text".into())));
        assert_eq!(idx.apply(&p), None, "same pod again is no change");
        let eps = idx.endpoints("ns", "text");
        assert_eq!(
            eps,
            vec![PodEndpoint { endpoint: "http://10.244.1.5:8080".into(), revision: "7".into(), ready: true }]
        );
        let unready = mk_pod("ns", "t-1", "text", "10.244.1.5", false);
        assert!(idx.apply(&unready).is_some());
        assert!(!idx.endpoints("ns", "text")[0].ready);
    }

    #[test]
    fn pods_without_ip_or_terminating_are_not_routable() {
        let mut idx = Index::default();
        let mut p = mk_pod("ns", "t-1", "text", "", true);
        assert_eq!(idx.apply(&p), None);
        p = mk_pod("ns", "t-1", "text", "10.0.0.1", true);
        idx.apply(&p);
        p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Default::default()));
        assert!(idx.apply(&p).is_some());
        assert!(!idx.endpoints("ns", "text")[0].ready);
    }

    #[test]
    fn problems_are_indexed_per_node_and_report_only_changes() {
        use k8s_openapi::api::core::v1::{ContainerState, ContainerStateWaiting, ContainerStatus};
        let mut idx = Index::default();
        let mut p = mk_pod("ns", "t-1", "text", "", false);
        assert_eq!(idx.apply_problem(&p), None, "a pod without a problem changes nothing");
        if let Some(st) = p.status.as_mut() {
            st.container_statuses = Some(vec![ContainerStatus {
                name: "node".into(),
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting { reason: Some("ImagePullBackOff".into()), message: None }),
                    ..Default::default()
                }),
                ..Default::default()
            }]);
        }
        // No IP yet: not routable, but its problem is known.
        assert_eq!(idx.apply(&p), None);
        assert_eq!(idx.apply_problem(&p), Some(("ns".into(), "text".into())));
        assert_eq!(idx.apply_problem(&p), None);
        assert_eq!(idx.problems("ns", "text")[0].reason, "ImagePullBackOff");
        assert_eq!(idx.reset_problems(&[p.clone()]), Vec::<NodeKey>::new(), "same content after a relist");
        assert_eq!(idx.delete_problem("ns", "t-1"), Some(("ns".into(), "text".into())));
        assert!(idx.problems("ns", "text").is_empty());
        assert_eq!(idx.reset_problems(&[p]), vec![("ns".to_string(), "text".to_string())]);
    }

    #[test]
    fn delete_and_reset_report_changed_nodes() {
        let mut idx = Index::default();
        idx.apply(&mk_pod("ns", "t-1", "text", "10.0.0.1", true));
        idx.apply(&mk_pod("ns", "a-1", "audio", "10.0.0.2", true));
        assert_eq!(idx.delete("ns", "t-1"), Some(("ns".into(), "text".into())));
        assert_eq!(idx.delete("ns", "t-1"), None);
        assert!(idx.endpoints("ns", "text").is_empty());
        // After a relist: audio unchanged, vision new.
        let changed = idx
            .reset(&[mk_pod("ns", "a-1", "audio", "10.0.0.2", true), mk_pod("ns", "v-1", "vision", "10.0.0.3", true)]);
        assert_eq!(changed, vec![("ns".to_string(), "vision".to_string())]);
    }

    #[test]
    fn ipv6_endpoints_are_bracketed() {
        let (_, ep) = pod_endpoint(&mk_pod("ns", "p", "n", "fd00::1", true)).unwrap();
        assert_eq!(ep.endpoint, "http://[fd00::1]:8080");
    }
}
