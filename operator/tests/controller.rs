//! Controller-level tests: `reconcile_node` against a recording stand-in for the API server (a
//! tower service behind a real kube `Client`, as controller-rs tests do with tower-test). They
//! check what the real-apiserver e2e tests cannot see cheaply: the exact requests, their field
//! managers and patch bodies, and that reads come from the shared stores, not GETs.

use std::sync::{Arc, Mutex};

use http::{Request, Response};
use k8s_openapi::api::apps::v1::Deployment;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, store::Writer};
use kube::runtime::watcher;
use kube::Client;
use prism_api::ModalityNode;
use prism_operator::controller::{reconcile_node, Context, Stores};
use prism_operator::index::SharedIndex;
use prism_operator::metrics::Metrics;
use prism_operator::OperatorConfig;
use serde_json::{json, Value};

/// One request the operator sent.
#[derive(Clone, Debug)]
struct Sent {
    method: String,
    /// Path and query, e.g. `/apis/apps/v1/namespaces/ns/deployments/text?fieldManager=...`.
    uri: String,
    body: Value,
}

impl Sent {
    fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }
    fn query(&self, key: &str) -> Option<&str> {
        let q = self.uri.split_once('?')?.1;
        q.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }
}

/// The API server stand-in: records every request and answers as a server-side apply would
/// (the applied object back, with a generation), keeping the node so a status patch can return it.
fn api(node: Value, sent: Arc<Mutex<Vec<Sent>>>) -> Client {
    let node = Arc::new(Mutex::new(node));
    let svc = tower::service_fn(move |req: Request<Body>| {
        let (sent, node) = (sent.clone(), node.clone());
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.map_err(|e| e.to_string())?;
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let uri = parts.uri.path_and_query().map(|p| p.to_string()).unwrap_or_default();
            sent.lock().unwrap().push(Sent { method: parts.method.to_string(), uri: uri.clone(), body: body.clone() });
            let answer = if uri.contains("/modalitynodes/") && uri.contains("/status") {
                let mut n = node.lock().unwrap();
                n["status"] = body["status"].clone();
                n.clone()
            } else if parts.method == http::Method::GET {
                // Reads must come from the stores: anything else is a 404 the test then sees.
                let status = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404});
                return Ok::<_, String>(
                    Response::builder().status(404).body(Body::from(status.to_string().into_bytes())).unwrap(),
                );
            } else {
                let mut o = body;
                o["metadata"]["generation"] = json!(1);
                o["metadata"]["uid"] = json!("uid-child");
                o
            };
            Ok(Response::builder().status(200).body(Body::from(answer.to_string().into_bytes())).unwrap())
        }
    });
    Client::new(svc, "ns")
}

fn node() -> ModalityNode {
    serde_json::from_value(json!({
        "apiVersion": "prism.dev/v1alpha1", "kind": "ModalityNode",
        "metadata": {"name": "text", "namespace": "ns", "uid": "uid-1", "generation": 2},
        "spec": {"modality": "text", "model": {"uri": "file:///models/m", "architecture": "bert", "revision": "1"},
                 "replicas": {"min": 2, "max": 4}, "device": "cpu"}
    }))
    .unwrap()
}

fn context(client: Client) -> (Arc<Context>, Writer<ModalityNode>, Writer<Deployment>) {
    let (nodes, node_writer) = reflector::store();
    let (deployments, deploy_writer) = reflector::store();
    let (pipelines, _) = reflector::store();
    let ctx = Context {
        client: client.clone(),
        cfg: OperatorConfig::default(),
        recorder: Recorder::new(client, Reporter { controller: "prism-operator".into(), instance: None }),
        metrics: Metrics::new().unwrap(),
        index: SharedIndex::default(),
        index_synced: Default::default(),
        prometheus: None,
        match_namespace: false,
        stores: Stores { nodes, deployments, pipelines },
        published: Default::default(),
    };
    (Arc::new(ctx), node_writer, deploy_writer)
}

#[tokio::test]
async fn a_new_node_is_applied_as_prism_operator_with_only_its_own_status_fields_and_no_reads() {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let n = node();
    let (ctx, _nodes, _deploys) = context(api(serde_json::to_value(&n).unwrap(), sent.clone()));
    reconcile_node(Arc::new(n), ctx).await.expect("reconcile");
    let sent = sent.lock().unwrap().clone();
    let calls: Vec<String> = sent.iter().map(|s| format!("{} {}", s.method, s.path())).collect();
    assert!(sent.iter().all(|s| s.method != "GET"), "reads come from the stores: {calls:#?}");
    let patch = |suffix: &str| {
        sent.iter()
            .find(|s| s.method == "PATCH" && s.path().ends_with(suffix))
            .unwrap_or_else(|| panic!("no PATCH of {suffix}: {calls:#?}"))
    };
    for child in ["/deployments/text", "/services/text", "/poddisruptionbudgets/text"] {
        let p = patch(child);
        assert_eq!(p.query("fieldManager"), Some("prism-operator"), "{child}");
        assert_eq!(p.query("force"), Some("true"), "{child}: manual edits are reverted");
        assert_eq!(p.body["metadata"]["ownerReferences"][0]["uid"], "uid-1", "{child} is owned by the node");
    }
    assert_eq!(patch("/deployments/text").body["spec"]["replicas"], 2, "replicas.min");
    let status = patch("/modalitynodes/text/status");
    assert_eq!(status.query("fieldManager"), Some("prism-operator"));
    let st = status.body["status"].as_object().expect("a status body");
    for theirs in ["desiredReplicas", "p95", "lastScale"] {
        assert!(!st.contains_key(theirs), "{theirs} belongs to the autoscaler: {st:?}");
    }
    let types: Vec<&str> = st["conditions"].as_array().unwrap().iter().filter_map(|c| c["type"].as_str()).collect();
    assert_eq!(types, ["Available", "Degraded", "Progressing", "Ready"]);
    assert_eq!(st["observedGeneration"], 2);
    let created = sent.iter().find(|s| s.method == "POST" && s.path().ends_with("/events")).expect("an Event");
    assert_eq!(created.body["reason"], "Created", "{:?}", created.body);
    // The status is written after the children: its conditions describe what was just applied.
    let at = |suffix: &str| calls.iter().position(|c| c.ends_with(suffix)).unwrap();
    assert!(at("/status") > at("/deployments/text") && at("/status") > at("/poddisruptionbudgets/text"), "{calls:#?}");
}

#[tokio::test]
async fn a_node_whose_status_and_children_are_current_costs_no_status_write_and_no_event() {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let first = node();
    let (ctx, _nodes, mut deploys) = context(api(serde_json::to_value(&first).unwrap(), sent.clone()));
    reconcile_node(Arc::new(first.clone()), ctx.clone()).await.expect("first reconcile");
    // What the API server now holds: the status just written and the applied Deployment
    // (generation 1), as the watches would deliver them.
    let written = sent.lock().unwrap().iter().rev().find(|s| s.path().ends_with("/status")).unwrap().body.clone();
    let mut current = first;
    current.status = Some(serde_json::from_value(written["status"].clone()).unwrap());
    let deployment =
        sent.lock().unwrap().iter().find(|s| s.path().ends_with("/deployments/text")).unwrap().body.clone();
    let mut deployment: Deployment = serde_json::from_value(deployment).unwrap();
    deployment.metadata.generation = Some(1);
    deploys.apply_watcher_event(&watcher::Event::Apply(deployment));
    sent.lock().unwrap().clear();

    reconcile_node(Arc::new(current), ctx).await.expect("second reconcile");
    let sent = sent.lock().unwrap().clone();
    let calls: Vec<String> = sent.iter().map(|s| format!("{} {}", s.method, s.path())).collect();
    assert!(!calls.iter().any(|c| c.ends_with("/status")), "nothing changed, nothing written: {calls:#?}");
    assert!(!calls.iter().any(|c| c.starts_with("POST") && c.ends_with("/events")), "no event: {calls:#?}");
    assert!(sent.iter().all(|s| s.method != "GET"), "{calls:#?}");
}

#[tokio::test]
async fn a_spec_that_cannot_be_built_applies_nothing_says_why_and_waits_for_an_edit() {
    let sent = Arc::new(Mutex::new(Vec::new()));
    let mut n = node();
    // CEL refuses this at the API server; an object stored under an older CRD may still carry it.
    n.spec.model.uri = "ftp://models/m".into();
    let (ctx, _nodes, _deploys) = context(api(serde_json::to_value(&n).unwrap(), sent.clone()));
    let action = reconcile_node(Arc::new(n), ctx).await.expect("an invalid spec is a status, not an error");
    assert_eq!(action, kube::runtime::controller::Action::await_change(), "retrying cannot help");
    let sent = sent.lock().unwrap().clone();
    let calls: Vec<String> = sent.iter().map(|s| format!("{} {}", s.method, s.path())).collect();
    assert!(!calls.iter().any(|c| c.contains("/deployments/") || c.contains("/services/")), "{calls:#?}");
    let status = sent.iter().find(|s| s.path().ends_with("/status")).expect("a status write");
    let ready = status.body["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("False"), Some("InvalidSpec")));
    assert!(ready["message"].as_str().unwrap().contains("ftp://models/m"), "{ready}");
    let event = sent.iter().find(|s| s.method == "POST" && s.path().ends_with("/events")).expect("an Event");
    assert_eq!((event.body["type"].as_str(), event.body["reason"].as_str()), (Some("Warning"), Some("InvalidSpec")));
}
