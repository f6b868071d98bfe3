use super::*;
use prism_api::pipeline::MultimodalPipelineSpec;

fn mk_pipeline(nodes: serde_json::Value) -> MultimodalPipeline {
    let spec: MultimodalPipelineSpec = serde_json::from_value(serde_json::json!({ "nodes": nodes })).unwrap();
    let mut p = MultimodalPipeline::new("mm", spec);
    p.metadata.namespace = Some("ns".into());
    p.metadata.uid = Some("uid-p".into());
    p.metadata.generation = Some(1);
    p
}

fn ep(ip: &str, ready: bool) -> PodEndpoint {
    PodEndpoint { endpoint: format!("http://{ip}:8080"), revision: "1".into(), ready }
}

fn observed(entries: &[(&str, &str, Vec<PodEndpoint>)]) -> BTreeMap<String, ObservedNode> {
    entries
        .iter()
        .map(|(n, m, eps)| {
            (
                n.to_string(),
                ObservedNode { modality: m.to_string(), tls_secret: None, endpoints: eps.clone(), canary: None },
            )
        })
        .collect()
}

fn three() -> MultimodalPipeline {
    mk_pipeline(serde_json::json!([
        {"name": "text-a", "weight": 2.0, "accuracy": 0.8, "required": true},
        {"name": "vision-a"},
        {"name": "audio-a"}
    ]))
}

#[test]
fn table_lists_endpoints_per_modality_with_node_fields() {
    let p = three();
    let obs = observed(&[
        ("text-a", "text", vec![ep("10.244.1.2", true), ep("10.244.2.2", false)]),
        ("vision-a", "vision", vec![ep("10.244.1.3", true)]),
        ("audio-a", "audio", vec![]),
    ]);
    let t = routing_table(&p, &obs, None, 0);
    assert_eq!(t.pipeline, "mm");
    assert_eq!(t.generation, 1);
    let text = &t.modalities["text"];
    assert_eq!(text.len(), 2);
    assert_eq!(text[0].endpoint, "http://10.244.1.2:8080");
    assert_eq!((text[0].node.as_str(), text[0].weight, text[0].accuracy), ("text-a", 2.0, 0.8));
    assert_eq!(t.missing_modalities(), vec!["audio".to_string()]);
}

#[test]
fn generation_bumps_only_on_route_changes_and_never_goes_back() {
    let p = three();
    let obs = observed(&[("text-a", "text", vec![ep("10.0.0.1", true)])]);
    let t1 = routing_table(&p, &obs, None, 0);
    let t1b = routing_table(&p, &obs, Some(&t1), 0);
    assert_eq!(t1b.generation, t1.generation, "no change, no bump");
    let obs2 = observed(&[("text-a", "text", vec![ep("10.0.0.1", false)])]);
    let t2 = routing_table(&p, &obs2, Some(&t1), 0);
    assert_eq!(t2.generation, t1.generation + 1);
    // ConfigMap lost or stale (generation 0) while status says 7: continue above 7.
    let t3 = routing_table(&p, &obs2, None, 7);
    assert_eq!(t3.generation, 8);
    let stale = RoutingTable { generation: 3, ..t2.clone() };
    assert_eq!(routing_table(&p, &obs2, Some(&stale), 7).generation, 8);
}

proptest::proptest! {
    /// Whatever the sequence of observations, generations never decrease and change exactly
    /// when the routes change.
    #[test]
    fn generations_are_monotonic(steps in proptest::collection::vec(proptest::collection::vec(proptest::bool::ANY, 0..4), 1..20)) {
        let p = three();
        let mut prev: Option<RoutingTable> = None;
        for readiness in steps {
            let eps: Vec<PodEndpoint> = readiness.iter().enumerate().map(|(i, r)| ep(&format!("10.0.0.{i}"), *r)).collect();
            let obs = observed(&[("text-a", "text", eps)]);
            let floor = prev.as_ref().map(|t| t.generation).unwrap_or(0);
            let t = routing_table(&p, &obs, prev.as_ref(), floor);
            if let Some(old) = &prev {
                proptest::prop_assert!(t.generation >= old.generation);
                proptest::prop_assert_eq!(t.generation != old.generation, !t.same_routes(old));
            }
            // Never route to an unready replica: ready() only yields ready entries.
            proptest::prop_assert!(t.ready("text").all(|e| e.ready));
            prev = Some(t);
        }
    }
}

#[test]
fn missing_node_gives_node_not_found_naming_it() {
    let p = three();
    let obs =
        observed(&[("text-a", "text", vec![ep("10.0.0.1", true)]), ("vision-a", "vision", vec![ep("10.0.0.2", true)])]);
    let t = routing_table(&p, &obs, None, 0);
    let s = status(&p, &obs, &t, None, "T");
    let ready = condition::find(&s.conditions, types::READY).unwrap();
    assert_eq!(ready.reason, "NodeNotFound");
    assert!(ready.message.contains("audio-a"), "{}", ready.message);
    assert_eq!(s.nodes_ready.as_deref(), Some("2/3"));
}

fn available_router(p: &MultimodalPipeline) -> Deployment {
    let mut d =
        desired_objects(p, &OperatorConfig::default(), &RoutingTable::default(), &BTreeMap::new()).unwrap().deployment;
    d.status = Some(k8s_openapi::api::apps::v1::DeploymentStatus { available_replicas: Some(1), ..Default::default() });
    d
}

#[test]
fn degraded_names_modalities_without_ready_replicas() {
    let p = three();
    let obs = observed(&[
        ("text-a", "text", vec![ep("10.0.0.1", true)]),
        ("vision-a", "vision", vec![ep("10.0.0.2", false)]),
        ("audio-a", "audio", vec![]),
    ]);
    let t = routing_table(&p, &obs, None, 0);
    let s = status(&p, &obs, &t, Some(&available_router(&p)), "T");
    let d = condition::find(&s.conditions, types::DEGRADED).unwrap();
    assert!(d.is_true());
    assert!(d.message.contains("audio, vision"), "{}", d.message);
    assert!(condition::find(&s.conditions, types::READY).unwrap().is_true(), "optional modalities down: still Ready");
    assert_eq!(s.degraded_modalities, vec!["audio".to_string(), "vision".to_string()]);
    assert_eq!(s.endpoints[0].ready, vec!["10.0.0.1:8080".to_string()]);
    assert_eq!(s.endpoints[1].not_ready, 1);
    assert_eq!(s.url.as_deref(), Some("http://mm-router.ns.svc:8080"));

    // The required text node down: not Ready.
    let obs = observed(&[
        ("text-a", "text", vec![]),
        ("vision-a", "vision", vec![ep("10.0.0.2", true)]),
        ("audio-a", "audio", vec![]),
    ]);
    let t = routing_table(&p, &obs, None, 0);
    let s = status(&p, &obs, &t, Some(&available_router(&p)), "T");
    let r = condition::find(&s.conditions, types::READY).unwrap();
    assert_eq!(r.reason, "RequiredNodeUnavailable");
    assert!(r.message.contains("text-a"));
}

#[test]
fn router_objects_mount_the_table_and_pass_args() {
    let p = three();
    let obs = observed(&[("text-a", "text", vec![ep("10.0.0.1", true)])]);
    let t = routing_table(&p, &obs, None, 0);
    let o = desired_objects(&p, &OperatorConfig::default(), &t, &BTreeMap::new()).unwrap();
    let data = o.config_map.data.as_ref().unwrap();
    let parsed: RoutingTable = serde_json::from_str(&data[ROUTING_TABLE_KEY]).unwrap();
    assert_eq!(parsed, t);
    let spec: serde_json::Value = serde_json::from_str(&data[PIPELINE_SPEC_KEY]).unwrap();
    assert_eq!(spec["nodes"][0]["name"], "text-a");
    let ps = o.deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let args = ps.containers[0].args.clone().unwrap();
    assert_eq!(
        args,
        vec![
            "--pipeline",
            "/etc/prism/pipeline.json",
            "--routing-table",
            "/etc/prism/routing-table.json",
            "--routing-configmap",
            "mm-routing-table",
            "--listen",
            "0.0.0.0:8080",
            "--shutdown-delay-s",
            "5",
            "--auth-token-file",
            "/etc/prism-auth/tokens"
        ]
    );
    let vol = ps.volumes.as_ref().unwrap().iter().find(|v| v.name == "config").unwrap();
    assert_eq!(vol.config_map.as_ref().unwrap().name, "mm-routing-table");
    // Auth on by default, from the Secret the user creates (the operator never reads Secrets).
    let auth = ps.volumes.as_ref().unwrap().iter().find(|v| v.name == "auth").unwrap();
    assert_eq!(auth.secret.as_ref().unwrap().secret_name.as_deref(), Some("mm-router-tokens"));
    // The routers' identity reads exactly their ConfigMap.
    assert_eq!(ps.service_account_name.as_deref(), Some("mm-router"));
    let rule = &o.role.rules.as_ref().unwrap()[0];
    assert_eq!(rule.resource_names.as_deref(), Some(&["mm-routing-table".to_string()][..]));
    assert_eq!(rule.verbs, vec!["get", "list", "watch"]);
    assert_eq!(o.role_binding.subjects.as_ref().unwrap()[0].name, "mm-router");
    assert_eq!(o.role_binding.role_ref.name, "mm-router");
    assert_eq!(o.config_map.metadata.owner_references.as_ref().unwrap()[0].kind, "MultimodalPipeline");
    // A failover (new table) must not change the router pod template (no restart).
    let t2 = routing_table(&p, &observed(&[("text-a", "text", vec![])]), Some(&t), 0);
    let o2 = desired_objects(&p, &OperatorConfig::default(), &t2, &BTreeMap::new()).unwrap();
    assert_eq!(o.deployment, o2.deployment);
}

#[test]
fn router_auth_secret_is_configurable_and_can_be_turned_off() {
    let args_of = |auth: serde_json::Value| {
        let mut p = three();
        p.spec.auth = serde_json::from_value(auth).unwrap();
        let t = routing_table(&p, &BTreeMap::new(), None, 0);
        let o = desired_objects(&p, &OperatorConfig::default(), &t, &BTreeMap::new()).unwrap();
        let ps = o.deployment.spec.unwrap().template.spec.unwrap();
        let secret = ps.volumes.unwrap().into_iter().find_map(|v| v.secret).and_then(|s| s.secret_name);
        (ps.containers[0].args.clone().unwrap(), secret)
    };
    let (args, secret) = args_of(serde_json::json!({"secretName": "team-tokens"}));
    assert_eq!(secret.as_deref(), Some("team-tokens"));
    assert!(args.contains(&"--auth-token-file".to_string()));
    let (args, secret) = args_of(serde_json::json!({"insecureNoAuth": true}));
    assert_eq!(secret, None);
    assert!(args.contains(&"--insecure-no-auth".to_string()) && !args.contains(&"--auth-token-file".to_string()));
}

#[test]
fn embedded_memory_gets_a_claim_a_path_and_one_writer_at_a_time() {
    let mut p = three();
    let t = routing_table(&p, &BTreeMap::new(), None, 0);
    let o = desired_objects(&p, &OperatorConfig::default(), &t, &BTreeMap::new()).unwrap();
    assert!(o.memory_claim.is_none(), "memory off: no claim");
    assert!(!o.deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0]
        .args
        .as_ref()
        .unwrap()
        .contains(&"--memory-path".to_string()));

    p.spec.memory = serde_json::from_value(
        serde_json::json!({"enabled": true, "store": {"size": "5Gi", "storageClassName": "fast"}}),
    )
    .unwrap();
    let o = desired_objects(&p, &OperatorConfig::default(), &t, &BTreeMap::new()).unwrap();
    let claim = o.memory_claim.expect("claim");
    assert_eq!(claim.metadata.name.as_deref(), Some("mm-memory"));
    let cs = claim.spec.unwrap();
    assert_eq!(cs.storage_class_name.as_deref(), Some("fast"));
    assert_eq!(cs.resources.unwrap().requests.unwrap()["storage"].0, "5Gi");
    let d = o.deployment.spec.unwrap();
    assert_eq!(d.strategy.unwrap().type_.as_deref(), Some("Recreate"));
    let ps = d.template.spec.unwrap();
    let args = ps.containers[0].args.clone().unwrap();
    let at = args.iter().position(|a| a == "--memory-path").unwrap();
    assert_eq!(args[at + 1], "/var/lib/prism/memory/memory.db");
    let vol = ps.volumes.unwrap().into_iter().find(|v| v.name == "memory").unwrap();
    assert_eq!(vol.persistent_volume_claim.unwrap().claim_name, "mm-memory");
}

#[test]
fn the_memory_claim_outlives_the_pipeline_unless_retain_is_delete() {
    let claim_for = |memory: serde_json::Value| {
        let mut p = three();
        p.spec.memory = serde_json::from_value(memory).unwrap();
        let t = routing_table(&p, &BTreeMap::new(), None, 0);
        desired_objects(&p, &OperatorConfig::default(), &t, &BTreeMap::new()).unwrap().memory_claim.expect("claim")
    };
    // Default (Retain): no owner reference, so the garbage collector leaves it; the name is the
    // pipeline's, so a pipeline of the same name mounts it again.
    let kept = claim_for(serde_json::json!({"enabled": true}));
    assert_eq!(kept.metadata.owner_references, None, "Retain: not owned");
    assert_eq!(kept.metadata.name.as_deref(), Some("mm-memory"));
    let kept = claim_for(serde_json::json!({"enabled": true, "retain": "Retain"}));
    assert_eq!(kept.metadata.owner_references, None);
    // The applied body has no ownerReferences at all: server-side apply then drops one this
    // manager set while the policy was Delete.
    assert!(serde_json::to_value(&kept).unwrap()["metadata"].get("ownerReferences").is_none());

    let owned = claim_for(serde_json::json!({"enabled": true, "retain": "Delete"}));
    let refs = owned.metadata.owner_references.expect("Delete: owned");
    assert_eq!(refs.len(), 1);
    assert_eq!(
        (refs[0].kind.as_str(), refs[0].name.as_str(), refs[0].uid.as_str(), refs[0].controller),
        ("MultimodalPipeline", "mm", "uid-p", Some(true))
    );
    // Anything else is refused when the spec is read (the CRD's enum says the same).
    assert!(serde_json::from_value::<prism_api::pipeline::MemorySpec>(serde_json::json!({"retain": "delete"})).is_err());
}

#[test]
fn routers_trust_the_ca_of_each_https_node_and_nothing_else_of_its_secret() {
    let p = three();
    let t = routing_table(&p, &BTreeMap::new(), None, 0);
    let cas = BTreeMap::from([
        ("audio-a".to_string(), "audio-tls".to_string()),
        ("text-a".to_string(), "text-tls".to_string()),
    ]);
    let o = desired_objects(&p, &OperatorConfig::default(), &t, &cas).unwrap();
    let ps = o.deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let args = ps.containers[0].args.clone().unwrap();
    let cas_passed: Vec<&str> =
        args.iter().enumerate().filter(|(_, a)| *a == "--node-ca").map(|(i, _)| args[i + 1].as_str()).collect();
    assert_eq!(cas_passed, vec!["/etc/prism-node-ca/audio-a.crt", "/etc/prism-node-ca/text-a.crt"]);
    let vol = ps.volumes.as_ref().unwrap().iter().find(|v| v.name == "node-ca").expect("node-ca volume");
    let sources = vol.projected.as_ref().unwrap().sources.as_ref().unwrap();
    for (src, (node, secret)) in sources.iter().zip(&cas) {
        let s = src.secret.as_ref().unwrap();
        assert_eq!(&s.name, secret);
        // Only ca.crt is projected: the router never sees a node's private key.
        let items = s.items.as_ref().unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!((items[0].key.as_str(), items[0].path.clone()), ("ca.crt", format!("{node}.crt")));
    }
    // No HTTPS node: no CA volume, no flag.
    let o = desired_objects(&p, &OperatorConfig::default(), &t, &BTreeMap::new()).unwrap();
    let ps = o.deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert!(!ps.containers[0].args.as_ref().unwrap().contains(&"--node-ca".to_string()));
    assert!(!ps.volumes.as_ref().unwrap().iter().any(|v| v.name == "node-ca"));
}

#[test]
fn postgres_memory_gets_the_url_from_the_secret_and_no_claim_and_may_scale_out() {
    let mut p = three();
    p.spec.router_replicas = 3;
    p.spec.memory = serde_json::from_value(
        serde_json::json!({"enabled": true, "store": {"kind": "postgres", "postgresSecret": "memory-db"}}),
    )
    .unwrap();
    let t = routing_table(&p, &BTreeMap::new(), None, 0);
    let o = desired_objects(&p, &OperatorConfig::default(), &t, &BTreeMap::new()).unwrap();
    assert!(o.memory_claim.is_none(), "postgres: no claim");
    let d = o.deployment.spec.unwrap();
    assert_eq!(d.replicas, Some(3), "several routers share the database");
    assert!(d.strategy.is_none(), "rolling updates: no single-writer file to protect");
    let ps = d.template.spec.unwrap();
    let c = &ps.containers[0];
    let args = c.args.clone().unwrap();
    assert!(!args.iter().any(|a| a.starts_with("--memory")), "the URL is not an arg: {args:?}");
    assert!(ps.volumes.unwrap_or_default().iter().all(|v| v.name != "memory"));
    let env = c.env.clone().unwrap();
    let url = env.iter().find(|e| e.name == "PRISM_MEMORY_URL").expect("PRISM_MEMORY_URL");
    assert_eq!(url.value, None, "never inline: only a reference to the Secret");
    let r = url.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
    assert_eq!((r.name.as_str(), r.key.as_str(), r.optional), ("memory-db", "url", Some(false)));

    // Memory off: no env at all.
    p.spec.memory.enabled = false;
    let o = desired_objects(&p, &OperatorConfig::default(), &t, &BTreeMap::new()).unwrap();
    assert!(o.deployment.spec.unwrap().template.spec.unwrap().containers[0].env.is_none());
}
