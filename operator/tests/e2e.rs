//! End-to-end tests against the real local control plane (`make cluster-up`; e2e/README.md).
//! Ignored in plain `cargo test`; scripts/test-e2e.sh runs them with KUBECONFIG set:
//!   KUBECONFIG=$(make -s --no-print-directory cluster-kubeconfig) \
//!     cargo test --release -p prism-operator --test e2e -- --ignored --test-threads=1
//! Each test gets its own namespace and its own in-process operator watching only that
//! namespace. Waits poll API objects with a deadline (no fixed sleeps) and dump the
//! namespace's state on timeout. Pod IPs are fake: we only assert on API objects.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use prism_api::condition::{find, types};
use prism_api::routing::{RoutingTable, ROUTING_TABLE_KEY};
use prism_api::{ModalityNode, MultimodalPipeline};
use prism_operator::autoscale;
use prism_operator::controller::{self, RunSettings};
use prism_operator::metrics::Metrics;
use prism_operator::OperatorConfig;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn kubectl(args: &[&str]) -> std::process::Output {
    Command::new(repo().join("e2e/bin/kubectl")).args(args).output().expect("running e2e/bin/kubectl")
}

fn kubectl_ok(args: &[&str]) -> String {
    let out = kubectl(args);
    assert!(out.status.success(), "kubectl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A namespace for one test; deleted when dropped (also after a panic).
struct TestNs {
    name: String,
    client: Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    operator: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for TestNs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        let _ = kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

impl TestNs {
    async fn new(prefix: &str, labels: &[(&str, &str)]) -> Self {
        // The in-process operator's logs, when RUST_LOG asks for them.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        install_crds();
        let client = Client::try_default().await.expect("KUBECONFIG must point at the e2e cluster (make cluster-up)");
        let suffix = format!(
            "{:x}",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() % 0xffffff
        );
        let name = format!("e2e-{prefix}-{suffix}");
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>()}
        }))
        .unwrap();
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.unwrap();
        Self { name, client, stop: None, operator: None }
    }

    /// Starts the operator in-process, watching only this namespace (no Prometheus).
    fn start_operator(&mut self) {
        self.start_operator_with(autoscale::Settings { prometheus: None, match_namespace: true });
    }

    fn start_operator_with(&mut self, autoscaler: autoscale::Settings) {
        let settings = RunSettings {
            cfg: OperatorConfig {
                node_image: "prism-node:e2e".into(),
                node_image_cuda: "prism-node-cuda:e2e".into(),
                router_image: "prism-router:e2e".into(),
                train_image: "prism-train:e2e".into(),
                image_pull_policy: Some("IfNotPresent".into()),
                insecure_registries: vec![],
            },
            namespace: Some(self.name.clone()),
            instance: format!("e2e-{}", self.name),
            concurrency: 4,
            autoscaler,
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let client = self.client.clone();
        self.operator = Some(tokio::spawn(controller::run(
            client,
            settings,
            Metrics::new().unwrap(),
            Arc::new(AtomicBool::new(false)),
            async move {
                let _ = rx.await;
            },
        )));
        self.stop = Some(tx);
    }

    /// The operator with the Prometheus at `url` (canary analysis, adaptation triggers).
    fn start_operator_with_prometheus(&mut self, url: &str) {
        self.start_operator_with(autoscale::Settings {
            prometheus: Some(prism_operator::prom::PromClient::new(url).unwrap()),
            match_namespace: true,
        });
    }

    async fn stop_operator(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.operator.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    fn apply_yaml(&self, yaml: &str) {
        let path = std::env::temp_dir().join(format!("{}-{}.yaml", self.name, rand_suffix()));
        std::fs::write(&path, yaml).unwrap();
        kubectl_ok(&["apply", "-n", &self.name, "-f", path.to_str().unwrap()]);
    }

    fn dump(&self) {
        eprintln!("==== state of namespace {} ====", self.name);
        for args in [
            vec!["get", "mn,mmp,deploy,rs,pods,svc,pdb,cm", "-o", "wide", "-n", &self.name],
            vec!["get", "mn,mmp", "-o", "yaml", "-n", &self.name],
            vec!["get", "events", "-n", &self.name, "--sort-by=.lastTimestamp"],
        ] {
            let out = kubectl(&args);
            eprintln!(
                "$ kubectl {}\n{}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Polls `f` until it returns Some, or dumps state and panics after `timeout`.
    async fn wait<T, F, Fut>(&self, what: &str, timeout: Duration, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let start = Instant::now();
        loop {
            if let Some(v) = f().await {
                return v;
            }
            if start.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting for: {what}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn pipeline(&self, name: &str) -> Option<MultimodalPipeline> {
        self.api::<MultimodalPipeline>().get_opt(name).await.ok().flatten()
    }

    async fn table(&self, pipeline: &str) -> Option<RoutingTable> {
        let cm = self.api::<ConfigMap>().get_opt(&format!("{pipeline}-routing-table")).await.ok().flatten()?;
        serde_json::from_str(cm.data?.get(ROUTING_TABLE_KEY)?).ok()
    }

    async fn wait_condition(&self, pipeline: &str, type_: &str, status: &str, timeout: Duration) -> MultimodalPipeline {
        self.wait(&format!("mmp/{pipeline} condition {type_}={status}"), timeout, || async {
            let p = self.pipeline(pipeline).await?;
            let c = find(&p.status.as_ref()?.conditions, type_)?;
            (format!("{:?}", c.status) == status).then_some(p)
        })
        .await
    }

    async fn wait_node_condition(&self, node: &str, type_: &str, status: &str, timeout: Duration) -> ModalityNode {
        self.wait(&format!("mn/{node} condition {type_}={status}"), timeout, || async {
            let n = self.api::<ModalityNode>().get(node).await.ok()?;
            let c = find(&n.status.as_ref()?.conditions, type_)?;
            (format!("{:?}", c.status) == status).then_some(n)
        })
        .await
    }

    async fn node_pods(&self, node: &str) -> Vec<Pod> {
        self.api::<Pod>()
            .list(&ListParams::default().labels(&format!("prism.dev/node={node}")))
            .await
            .map(|l| l.items)
            .unwrap_or_default()
    }
}

impl TestNs {
    /// Text (2 CPU replicas) + audio (1 GPU replica) nodes and pipeline `mm` over them; returns
    /// the first routing table with every replica ready.
    async fn text_audio_pipeline(&self) -> RoutingTable {
        self.apply_yaml(&small_node("text", "text", false, "  replicas: {min: 2, max: 2}\n"));
        self.apply_yaml(&small_node("audio", "audio", true, ""));
        self.apply_yaml(&pipeline_yaml("mm", &["text", "audio"]));
        self.wait("both modalities ready in the table", T, || async {
            let t = self.table("mm").await?;
            (t.ready("text").count() == 2 && t.ready("audio").count() == 1).then_some(t)
        })
        .await
    }

    /// Marks the audio pod not-ready and waits, on a watch started before the fault, for the
    /// first routing table without a ready audio endpoint. Returns the pod, that table and the
    /// time from the label to the rewrite.
    async fn fail_audio(&self) -> (Pod, RoutingTable, Duration) {
        let mut stream = Box::pin(watcher(
            self.api::<ConfigMap>(),
            watcher::Config::default().fields("metadata.name=mm-routing-table"),
        ));
        while let Some(ev) = stream.next().await {
            if matches!(ev, Ok(watcher::Event::InitDone)) {
                break;
            }
        }
        let audio_pod = self.node_pods("audio").await.remove(0);
        let t0 = Instant::now();
        kubectl_ok(&[
            "-n",
            &self.name,
            "label",
            "pod",
            &audio_pod.name_any(),
            "prism.dev/fault=not-ready",
            "--overwrite",
        ]);
        let rewritten = tokio::time::timeout(T, async {
            while let Some(ev) = stream.next().await {
                if let Ok(watcher::Event::Apply(cm)) = ev {
                    let t: RoutingTable =
                        serde_json::from_str(&cm.data.unwrap_or_default()[ROUTING_TABLE_KEY]).unwrap();
                    if t.ready("audio").count() == 0 {
                        return t;
                    }
                }
            }
            panic!("watch ended");
        })
        .await
        .unwrap_or_else(|_| {
            self.dump();
            panic!("routing table not rewritten within {T:?}")
        });
        (audio_pod, rewritten, t0.elapsed())
    }
}

/// Status field (`conditions[Type]` for a condition) -> the field managers that own it, from
/// `metadata.managedFields`.
fn status_owners(mn: &ModalityNode) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in mn.metadata.managed_fields.iter().flatten() {
        let Some(status) = entry.fields_v1.as_ref().and_then(|f| f.0.get("f:status")).and_then(|s| s.as_object())
        else {
            continue;
        };
        let manager = entry.manager.clone().unwrap_or_default();
        for (key, value) in status {
            let Some(field) = key.strip_prefix("f:") else { continue };
            let mut fields = vec![field.to_string()];
            if field == "conditions" {
                // `k:{"type":"Ready"}`: one entry of the list-map.
                fields = value
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, _)| k.strip_prefix("k:"))
                    .filter_map(|k| serde_json::from_str::<serde_json::Value>(k).ok())
                    .filter_map(|k| k["type"].as_str().map(|t| format!("conditions[{t}]")))
                    .collect();
            }
            for f in fields {
                out.entry(f).or_default().push(manager.clone());
            }
        }
    }
    out
}

fn rand_suffix() -> String {
    format!("{}", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos())
}

fn install_crds() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let crds = repo().join("crds");
        kubectl_ok(&["apply", "--server-side", "--force-conflicts", "-f", crds.to_str().unwrap()]);
        kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/modalitynodes.prism.dev",
            "crd/multimodalpipelines.prism.dev",
        ]);
    });
}

fn example(name: &str) -> String {
    std::fs::read_to_string(repo().join("examples").join(name)).unwrap()
}

fn small_node(name: &str, modality: &str, gpu: bool, extra: &str) -> String {
    let res = if gpu {
        "  resources:\n    gpu: {count: 1}\n    nodeSelector: {nvidia.com/gpu.present: \"true\"}\n    tolerations:\n    - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}\n"
    } else {
        "  device: cpu\n"
    };
    format!(
        "apiVersion: prism.dev/v1alpha1\nkind: ModalityNode\nmetadata:\n  name: {name}\nspec:\n  modality: {modality}\n  model: {{uri: 'file:///models/{name}', architecture: bert, revision: '1'}}\n{res}{extra}"
    )
}

fn pipeline_yaml(name: &str, nodes: &[&str]) -> String {
    let list: String = nodes.iter().map(|n| format!("  - {{name: {n}}}\n")).collect();
    format!(
        "apiVersion: prism.dev/v1alpha1\nkind: MultimodalPipeline\nmetadata:\n  name: {name}\nspec:\n  nodes:\n{list}"
    )
}

const T: Duration = Duration::from_secs(60);

#[tokio::test]
#[ignore = "needs the e2e control plane (KUBECONFIG)"]
async fn cel_rules_reject_bad_manifests_with_their_message() {
    let ns = TestNs::new("cel", &[]).await;
    let cases: &[(&str, serde_json::Value, &str)] = &[
        (
            "ModalityNode",
            serde_json::json!({"modality": "text", "model": {"uri": "file:///m", "architecture": "bert"}, "replicas": {"min": 3, "max": 2}}),
            "replicas.min must be <= replicas.max",
        ),
        (
            "ModalityNode",
            serde_json::json!({"modality": "Text!", "model": {"uri": "file:///m", "architecture": "bert"}}),
            "spec.modality",
        ),
        (
            "ModalityNode",
            serde_json::json!({"modality": "text", "model": {"uri": "pvc://models/../../../etc/passwd", "architecture": "bert"}}),
            "model.uri must not contain `..` path segments",
        ),
        (
            "ModalityNode",
            serde_json::json!({"modality": "text", "model": {"uri": "pvc://m/x", "architecture": "bert", "adapters": [{"name": "a", "uri": "hf://org/%2e%2e/x", "rank": 8, "alpha": 16.0}]}}),
            "adapters[].uri must not contain `..` path segments",
        ),
        (
            "ModalityNode",
            serde_json::json!({"modality": "text", "model": {"uri": "pvc://m/x", "architecture": "bert", "adapters": [{"name": "tone", "uri": "hf://org/tone-lora", "rank": 8, "alpha": 16.0}]}}),
            "hf:// and oci:// adapters are not downloaded",
        ),
        (
            "ModalityNode",
            serde_json::json!({"modality": "vision", "model": {"uri": "pvc://m/vit", "architecture": "vit", "attention": {"kind": "sliding-window", "window": 64}}}),
            "sliding-window attention is served for the architectures bert and whisper-encoder",
        ),
        (
            "ModalityNode",
            serde_json::json!({"modality": "text", "model": {"uri": "pvc://m/x", "architecture": "bert", "adapters": [{"name": "a", "uri": "pvc://m/a", "rank": 8, "alpha": 16.0}, {"name": "a", "uri": "pvc://m/b", "rank": 8, "alpha": 16.0}]}}),
            "adapter names must be unique within a node",
        ),
        (
            "ModalityNode",
            serde_json::json!({"modality": "text", "model": {"uri": "file:///m", "architecture": "bert"}, "resources": {"cpu": "two"}}),
            "spec.resources.cpu",
        ),
        (
            "ModalityNode",
            serde_json::json!({"modality": "text", "model": {"uri": "file:///m", "architecture": "bert"}, "device": "cpu", "resources": {"gpu": {"count": 1}}}),
            "device cpu holds no GPU",
        ),
        (
            "ModalityNode",
            serde_json::json!({"modality": "text", "model": {"uri": "file:///m", "architecture": "bert"}, "device": "cuda"}),
            "device cuda needs a GPU",
        ),
        (
            "ModalityNode",
            serde_json::json!({"modality": "text", "model": {"uri": "file:///m", "architecture": "bert"}, "adaptation": {"sharding": "fsdp", "gpusPerWorker": 0}}),
            "sharding fsdp shards across GPUs",
        ),
        (
            "ModalityNode",
            serde_json::json!({"modality": "text", "model": {"uri": "file:///m", "architecture": "bert"}, "rollout": {"steps": [{"weight": 50, "pauseSeconds": 10}, {"weight": 20, "pauseSeconds": 10}]}}),
            "rollout.steps weights must increase",
        ),
        (
            "MultimodalPipeline",
            serde_json::json!({"nodes": [{"name": "a"}, {"name": "a"}]}),
            "node names in a pipeline must be unique",
        ),
        (
            "MultimodalPipeline",
            serde_json::json!({"nodes": [{"name": "a"}], "routing": {"failureThreshold": 1.5}}),
            "routing.failureThreshold (delta) must lie strictly between 0 and 1",
        ),
        (
            "MultimodalPipeline",
            serde_json::json!({"nodes": [{"name": "a", "role": "encoder"}], "fusion": {"strategy": "early"}}),
            "fusion.strategy early needs a node with role fusion",
        ),
    ];
    for (i, (kind, spec, want)) in cases.iter().enumerate() {
        let obj = serde_json::json!({"apiVersion": "prism.dev/v1alpha1", "kind": kind, "metadata": {"name": format!("bad-{i}")}, "spec": spec});
        let path = std::env::temp_dir().join(format!("{}-bad-{i}.json", ns.name));
        std::fs::write(&path, obj.to_string()).unwrap();
        let out = kubectl(&["create", "-n", &ns.name, "-f", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{kind} {spec} was accepted");
        assert!(err.contains(want), "{kind} {spec}: expected {want:?} in {err}");
    }
    // And a good one is accepted (the rules are not just rejecting everything).
    ns.apply_yaml(&pipeline_yaml("ok", &["a"]));
}

#[tokio::test]
#[ignore = "needs the e2e control plane (KUBECONFIG)"]
async fn multimodal_example_reconciles_to_ready_on_gpu_nodes() {
    let mut ns = TestNs::new("example", &[]).await;
    ns.start_operator();
    let started = Instant::now();
    ns.apply_yaml(&example("multimodal-pipeline.yaml"));
    let p = ns.wait_condition("multimodal", types::READY, "True", T).await;
    eprintln!("multimodal pipeline Ready after {:?}", started.elapsed());
    // kubectl wait works on the condition too.
    kubectl_ok(&["wait", "-n", &ns.name, "--for=condition=Ready", "mmp/multimodal", "--timeout=30s"]);

    for node in ["text-minilm", "vision-vit", "audio-whisper", "fusion-perceiver"] {
        let d = ns.api::<Deployment>().get(node).await.unwrap();
        let owner = &d.owner_references()[0];
        assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("ModalityNode", node, Some(true)));
        let c = &d.spec.as_ref().unwrap().template.spec.as_ref().unwrap().containers[0];
        assert_eq!(c.resources.as_ref().unwrap().limits.as_ref().unwrap()["nvidia.com/gpu"].0, "1");
        assert_eq!(ns.api::<Service>().get(node).await.unwrap().owner_references()[0].kind, "ModalityNode");
        assert_eq!(ns.api::<PodDisruptionBudget>().get(node).await.unwrap().owner_references()[0].kind, "ModalityNode");
        // The pipeline is Ready from pod readiness; a node's own status follows its Deployment's
        // status (written by kube-controller-manager a moment later), so wait for it.
        ns.wait_node_condition(node, types::READY, "True", T).await;
        for pod in ns.node_pods(node).await {
            let st = pod.status.as_ref().unwrap();
            assert_eq!(st.phase.as_deref(), Some("Running"));
            let host = pod.spec.as_ref().unwrap().node_name.clone().unwrap_or_default();
            assert!(host.starts_with("gpu-node-"), "GPU pod {} landed on {host}", pod.name_any());
        }
    }
    for kind in ["router Deployment", "router Service", "ConfigMap"] {
        let owner = match kind {
            "router Deployment" => {
                ns.api::<Deployment>().get("multimodal-router").await.unwrap().owner_references()[0].clone()
            }
            "router Service" => {
                ns.api::<Service>().get("multimodal-router").await.unwrap().owner_references()[0].clone()
            }
            _ => ns.api::<ConfigMap>().get("multimodal-routing-table").await.unwrap().owner_references()[0].clone(),
        };
        assert_eq!(owner.kind, "MultimodalPipeline", "{kind}");
    }

    // The table lists exactly the ready pods' IPs, per modality.
    let table = ns
        .wait("routing table lists every ready pod", T, || async {
            let t = ns.table("multimodal").await?;
            let mut want = BTreeMap::new();
            for (node, modality) in [
                ("text-minilm", "text"),
                ("vision-vit", "vision"),
                ("audio-whisper", "audio"),
                ("fusion-perceiver", "fusion"),
            ] {
                let mut ips: Vec<String> = ns
                    .node_pods(node)
                    .await
                    .iter()
                    .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
                    .map(|ip| format!("http://{ip}:8080"))
                    .collect();
                ips.sort();
                want.insert(modality.to_string(), ips);
            }
            let mut have = BTreeMap::new();
            for (m, eps) in &t.modalities {
                let mut v: Vec<String> = eps.iter().filter(|e| e.ready).map(|e| e.endpoint.clone()).collect();
                v.sort();
                have.insert(m.clone(), v);
            }
            (have == want && want["text"].len() == 2).then_some(t)
        })
        .await;
    assert!(table.generation >= 1);
    let st = p.status.unwrap();
    assert_eq!(st.url.as_deref(), Some(format!("http://multimodal-router.{}.svc:8080", ns.name).as_str()));
    let p = ns.pipeline("multimodal").await.unwrap();
    assert_eq!(p.status.as_ref().unwrap().nodes_ready.as_deref(), Some("4/4"));
    assert!(p.status.as_ref().unwrap().routing_table_generation >= table.generation);
    ns.stop_operator().await;
}

#[tokio::test]
#[ignore = "needs the e2e control plane (KUBECONFIG)"]
async fn a_node_whose_pod_is_oom_killed_names_the_cause_in_its_conditions() {
    let mut ns = TestNs::new("podcause", &[]).await;
    ns.start_operator();
    ns.apply_yaml(&small_node("text", "text", false, ""));
    ns.wait_node_condition("text", types::READY, "True", T).await;
    let pod = ns.wait("a pod of text", T, || async { ns.node_pods("text").await.into_iter().next() }).await.name_any();
    // e2e/kwok/stages/prism-pod-oom-killed.yaml plays the kubelet after an OOM kill: the pod
    // stays Running, its container waits in CrashLoopBackOff, last terminated OOMKilled (137).
    kubectl_ok(&["-n", &ns.name, "label", "pod", &pod, "prism.dev/fault=oom-killed", "--overwrite"]);
    let n = ns
        .wait("mn/text Ready=False with reason OOMKilled", T, || async {
            let n = ns.api::<ModalityNode>().get("text").await.ok()?;
            let c = find(&n.status.as_ref()?.conditions, types::READY)?;
            (c.reason == "OOMKilled").then_some(n)
        })
        .await;
    let conds = &n.status.as_ref().unwrap().conditions;
    let ready = find(conds, types::READY).unwrap();
    assert!(ready.message.contains(&format!("pod {pod} container node")), "names the pod: {}", ready.message);
    assert!(ready.message.contains("spec.resources.memory"), "says what to change: {}", ready.message);
    let degraded = find(conds, types::DEGRADED).unwrap();
    assert!(degraded.is_true() && degraded.reason == "OOMKilled", "{degraded:?}");
    ns.stop_operator().await;
}

#[tokio::test]
#[ignore = "needs the e2e control plane (KUBECONFIG)"]
async fn failover_rewrites_the_routing_table_and_marks_degraded() {
    let mut ns = TestNs::new("failover", &[]).await;
    ns.start_operator();
    let before = ns.text_audio_pipeline().await;
    ns.wait_condition("mm", types::DEGRADED, "False", T).await;
    let (audio_pod, after, latency) = ns.fail_audio().await;
    let audio_ep = format!("http://{}:8080", audio_pod.status.as_ref().unwrap().pod_ip.as_ref().unwrap());
    eprintln!("failover: label -> routing table rewritten in {latency:?} (includes kwok's reaction to the label)");
    assert!(after.generation > before.generation, "generation bumped");
    assert!(
        after.modalities["audio"].iter().all(|e| !(e.endpoint == audio_ep && e.ready)),
        "unready endpoint not routable"
    );
    assert_eq!(after.ready("text").count(), 2, "other modality untouched");
    let p = ns.wait_condition("mm", types::DEGRADED, "True", T).await;
    let d = find(&p.status.as_ref().unwrap().conditions, types::DEGRADED).unwrap();
    assert!(d.message.contains("audio"), "Degraded names the modality: {}", d.message);
    assert_eq!(p.status.as_ref().unwrap().degraded_modalities, vec!["audio".to_string()]);

    // Recovery restores it, with a still newer generation.
    kubectl_ok(&["-n", &ns.name, "label", "pod", &audio_pod.name_any(), "prism.dev/fault-"]);
    let restored = ns
        .wait("audio endpoint restored", T, || async {
            let t = ns.table("mm").await?;
            (t.ready("audio").count() == 1).then_some(t)
        })
        .await;
    assert!(restored.generation > after.generation);
    ns.wait_condition("mm", types::DEGRADED, "False", T).await;
    ns.stop_operator().await;
}

#[tokio::test]
#[ignore = "needs the e2e control plane (KUBECONFIG)"]
async fn spec_change_rolls_and_manual_edits_are_reverted_and_delete_cascades() {
    let mut ns = TestNs::new("lifecycle", &[]).await;
    ns.start_operator();
    ns.apply_yaml(&small_node("text", "text", false, ""));
    let deploys = ns.api::<Deployment>();
    ns.wait("Deployment text exists", T, || async { deploys.get_opt("text").await.ok().flatten() }).await;

    // Spec change: new revision -> new pod template -> rollout.
    ns.apply_yaml(&small_node("text", "text", false, "").replace("revision: '1'", "revision: '2'"));
    ns.wait("pods of revision 2 ready", T, || async {
        let d = deploys.get("text").await.ok()?;
        let tl = d.spec.as_ref()?.template.metadata.as_ref()?.labels.clone()?;
        let st = d.status?;
        (tl.get("prism.dev/revision").map(String::as_str) == Some("2")
            && st.updated_replicas == Some(1)
            && st.ready_replicas == Some(1)
            && st.replicas == Some(1))
        .then_some(())
    })
    .await;
    // Deployment status can count the new ReplicaSet before its pod is listed: wait for the pod.
    ns.wait("a pod of revision 2", T, || async {
        let pods = ns.node_pods("text").await;
        pods.iter().any(|p| p.labels().get("prism.dev/revision").map(String::as_str) == Some("2")).then_some(())
    })
    .await;

    // A manual edit by another field manager is reverted.
    let patch = serde_json::json!({"spec": {"replicas": 3, "template": {"spec": {"containers": [{"name": "node", "image": "evil:latest"}]}}}});
    deploys.patch("text", &PatchParams::default(), &Patch::Strategic(&patch)).await.unwrap();
    ns.wait("manual edit reverted", T, || async {
        let d = deploys.get("text").await.ok()?;
        let s = d.spec?;
        (s.replicas == Some(1) && s.template.spec?.containers[0].image.as_deref() == Some("prism-node:e2e"))
            .then_some(())
    })
    .await;

    // Deleting the ModalityNode garbage-collects its children (owner references).
    ns.api::<ModalityNode>().delete("text", &DeleteParams::default()).await.unwrap();
    ns.wait("children garbage-collected", T, || async {
        let d = deploys.get_opt("text").await.ok()?;
        let s = ns.api::<Service>().get_opt("text").await.ok()?;
        let p = ns.api::<PodDisruptionBudget>().get_opt("text").await.ok()?;
        (d.is_none() && s.is_none() && p.is_none()).then_some(())
    })
    .await;
    ns.stop_operator().await;
}

#[tokio::test]
#[ignore = "needs the e2e control plane (KUBECONFIG)"]
async fn pipeline_waits_for_a_missing_node_then_becomes_ready() {
    let mut ns = TestNs::new("missing", &[]).await;
    ns.start_operator();
    ns.apply_yaml(&pipeline_yaml("p", &["late-node"]));
    let p = ns.wait_condition("p", types::READY, "False", T).await;
    let c = find(&p.status.as_ref().unwrap().conditions, types::READY).unwrap();
    if c.reason != "NodeNotFound" {
        // The first status may be computed before the router exists; NodeNotFound must win.
        ns.wait("reason NodeNotFound", T, || async {
            let p = ns.pipeline("p").await?;
            (find(&p.status?.conditions, types::READY)?.reason == "NodeNotFound").then_some(())
        })
        .await;
    }
    let p = ns.pipeline("p").await.unwrap();
    let c = find(&p.status.as_ref().unwrap().conditions, types::READY).unwrap();
    assert_eq!(c.reason, "NodeNotFound");
    assert!(c.message.contains("late-node"), "message names the node: {}", c.message);
    // Creating the node triggers the pipeline (watches mapper), no requeue timer needed.
    ns.apply_yaml(&small_node("late-node", "text", false, ""));
    ns.wait_condition("p", types::READY, "True", T).await;
    ns.stop_operator().await;
}

#[tokio::test]
#[ignore = "needs the e2e control plane (KUBECONFIG)"]
async fn kubectl_scale_works_in_external_mode() {
    let mut ns = TestNs::new("scale", &[]).await;
    ns.start_operator();
    ns.apply_yaml(&example("text-pipeline.yaml"));
    ns.wait_condition("text", types::READY, "True", T).await;
    kubectl_ok(&["-n", &ns.name, "scale", "mn/text", "--replicas=3"]);
    ns.wait("3 replicas ready and reported", T, || async {
        let mn = ns.api::<ModalityNode>().get("text").await.ok()?;
        let st = mn.status?;
        (st.replicas == 3 && st.ready_replicas == 3 && st.selector.is_some()).then_some(())
    })
    .await;
    let d = ns.api::<Deployment>().get("text").await.unwrap();
    assert_eq!(d.spec.unwrap().replicas, Some(3));
    let t = ns
        .wait("table has 3 text endpoints", T, || async {
            ns.table("text").await.filter(|t| t.ready("text").count() == 3)
        })
        .await;
    assert_eq!(t.modalities.len(), 1);
    // The scale subresource reads back through status.selector (what HPA uses).
    let scale = kubectl_ok(&[
        "-n",
        &ns.name,
        "get",
        "--raw",
        &format!("/apis/prism.dev/v1alpha1/namespaces/{}/modalitynodes/text/scale", ns.name),
    ]);
    assert!(scale.contains("prism.dev/node=text"), "{scale}");
    ns.stop_operator().await;
}

#[tokio::test]
#[ignore = "needs the e2e control plane (KUBECONFIG)"]
async fn generated_pods_are_admitted_under_restricted_pod_security() {
    let mut ns = TestNs::new("restricted", &[("pod-security.kubernetes.io/enforce", "restricted")]).await;
    ns.start_operator();
    // Control: a pod that violates "restricted" is refused in this namespace, so admission is on.
    let bad = serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "privileged"}, "spec": {"containers": [{"name": "c", "image": "x", "securityContext": {"privileged": true}}]}});
    let err = ns.api::<Pod>().create(&PostParams::default(), &serde_json::from_value(bad).unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("violates PodSecurity"), "{err}");
    // The text node serves HTTPS (spec.tls): its pods mount the Secret and the routers its CA,
    // which restricted admission must accept too.
    ns.apply_yaml(
        &example("multimodal-pipeline.yaml")
            .replace("min: 2, max: 4", "min: 1, max: 4")
            .replace("  modality: text\n", "  modality: text\n  tls: {secretName: text-minilm-tls}\n"),
    );
    ns.wait_condition("multimodal", types::READY, "True", T).await;
    let table = ns.table("multimodal").await.expect("routing table");
    let text: Vec<_> = table.modalities["text"].iter().map(|e| e.endpoint.clone()).collect();
    assert!(!text.is_empty() && text.iter().all(|e| e.starts_with("https://")), "text endpoints {text:?}");
    assert!(table.modalities["vision"].iter().all(|e| e.endpoint.starts_with("http://")));
    let router = ns.api::<Deployment>().get("multimodal-router").await.unwrap();
    let args = router.spec.unwrap().template.spec.unwrap().containers[0].args.clone().unwrap();
    assert!(args.windows(2).any(|w| w[0] == "--node-ca" && w[1] == "/etc/prism-node-ca/text-minilm.crt"), "{args:?}");
    // Deployment status lags the pods the pipeline already routes to, so wait for it rather than
    // reading it once: the point is that every generated pod was admitted and became ready.
    ns.wait("every generated Deployment fully ready", T, || async {
        let list = ns.api::<Deployment>().list(&ListParams::default()).await.ok()?;
        let all_ready = list.iter().all(|d| {
            let want = d.spec.as_ref().and_then(|s| s.replicas);
            want.is_some() && d.status.as_ref().and_then(|s| s.ready_replicas) == want
        });
        (list.items.len() == 5 && all_ready).then_some(())
    })
    .await;
    ns.stop_operator().await;
}

/// Runs the built binary as a child process (killed on drop).
struct OperatorProc {
    child: std::process::Child,
    log: PathBuf,
}

impl OperatorProc {
    fn start(ns: &str, identity: &str, port: u16) -> Self {
        let log = std::env::temp_dir().join(format!("{ns}-{identity}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_prism-operator"))
            .args(["--namespace", ns, "--lease-namespace", ns, "--identity", identity, "--lease-duration-s", "3"])
            .args([
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
                "--node-image",
                "prism-node:e2e",
                "--router-image",
                "prism-router:e2e",
            ])
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Self { child, log }
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OperatorProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("==== {} ====\n{}", self.log.display(), self.log());
        }
    }
}

#[tokio::test]
#[ignore = "needs the e2e control plane (KUBECONFIG)"]
async fn two_replicas_only_the_leader_reconciles_and_the_standby_takes_over() {
    let ns = TestNs::new("leader", &[]).await;
    let a = OperatorProc::start(&ns.name, "replica-a", 18181);
    let leases = ns.api::<k8s_openapi::api::coordination::v1::Lease>();
    let holder = || async { leases.get_opt("prism-operator-leader").await.ok().flatten()?.spec?.holder_identity };
    ns.wait("replica-a holds the lease", T, || async { holder().await.filter(|h| h == "replica-a") }).await;
    let b = OperatorProc::start(&ns.name, "replica-b", 18182);
    // /metrics answers on both; readiness of the standby is true (it can take over).
    ns.wait("standby waiting for leadership", T, || async { b.log().contains("waiting for leadership").then_some(()) })
        .await;
    ns.apply_yaml(&small_node("n1", "text", false, ""));
    ns.wait("leader reconciled n1", T, || async { ns.api::<Deployment>().get_opt("n1").await.ok().flatten() }).await;
    assert_eq!(holder().await.as_deref(), Some("replica-a"));
    assert!(!b.log().contains("controllers running"), "standby must not run controllers:\n{}", b.log());

    // Kill the leader: the standby takes the lease after it expires and reconciles.
    drop(a);
    let t0 = Instant::now();
    ns.wait("replica-b takes the lease", T, || async { holder().await.filter(|h| h == "replica-b") }).await;
    eprintln!("leader failover: lease taken over {:?} after the leader was killed", t0.elapsed());
    ns.apply_yaml(&small_node("n2", "text", false, ""));
    ns.wait("new leader reconciled n2", T, || async { ns.api::<Deployment>().get_opt("n2").await.ok().flatten() })
        .await;
    // Nothing duplicated across the handover: one Deployment per node.
    let deploys = ns.api::<Deployment>().list(&ListParams::default()).await.unwrap();
    let mut names: Vec<String> = deploys.iter().map(|d| d.name_any()).collect();
    names.sort();
    assert_eq!(names, vec!["n1".to_string(), "n2".to_string()]);
    drop(b);
}

#[tokio::test]
#[ignore = "needs the e2e control plane (KUBECONFIG)"]
async fn metrics_and_health_endpoints_answer() {
    let ns = TestNs::new("metrics", &[]).await;
    let p = OperatorProc::start(&ns.name, "solo", 18183);
    ns.apply_yaml(&small_node("m", "text", false, ""));
    ns.apply_yaml(&pipeline_yaml("mp", &["m"]));
    ns.wait_condition("mp", types::READY, "True", T).await;
    let get = |path: &str| {
        let out = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", &format!("http://127.0.0.1:18183{path}")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(get("/healthz").ends_with("200"));
    assert!(get("/readyz").ends_with("200"));
    let m = get("/metrics");
    for name in [
        "prism_operator_reconcile_duration_seconds_bucket{controller=\"modalitynode\"",
        "prism_routing_table_generation{namespace=",
        "prism_operator_reconcile_inflight",
    ] {
        assert!(m.contains(name), "{name} missing in:\n{m}");
    }
    // What the operator asked of the API server: its status writes are counted, and it never
    // GETs a ModalityNode (reconciles read the shared watch's store).
    let requests: Vec<&str> = m.lines().filter(|l| l.starts_with("prism_operator_kube_requests_total{")).collect();
    let counted = |verb: &str, resource: &str| {
        requests
            .iter()
            .any(|l| l.contains(&format!("verb=\"{verb}\"")) && l.contains(&format!("resource=\"{resource}\"")))
    };
    assert!(counted("patch", "modalitynodes/status"), "{requests:#?}");
    assert!(counted("watch", "modalitynodes"), "{requests:#?}");
    assert!(!counted("get", "modalitynodes"), "a GET of a ModalityNode: {requests:#?}");
    drop(p);
}

/// A local process killed on drop: the test's stand-ins for pods and its Prometheus.
struct Local(std::process::Child);

impl Drop for Local {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `cmd` with its output in `log` and returns once `log` holds `needle` (the address line).
fn spawn_until(mut cmd: Command, log: &std::path::Path, needle: &str, timeout: Duration) -> (Local, String) {
    let f = std::fs::File::create(log).unwrap();
    let child = cmd.stdout(f.try_clone().unwrap()).stderr(f).spawn().expect("spawning a local helper process");
    let p = Local(child);
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return (p, line.to_string());
        }
        assert!(start.elapsed() < timeout, "{needle:?} not in {} after {timeout:?}:\n{text}", log.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Spawns a prism-node or prism-router and returns it with the URL of its `listening on` line.
fn spawn_server(cmd: Command, log: &std::path::Path, timeout: Duration) -> (Local, String) {
    let (p, line) = spawn_until(cmd, log, "listening on http://", timeout);
    let url = line.split("listening on ").nth(1).and_then(|l| l.split_whitespace().next()).unwrap_or_default();
    (p, url.to_string())
}

/// A real Prometheus scraping `target` (a local stand-in for the pods) every second, with the
/// `namespace` label Prometheus' Kubernetes discovery would add. Returns it and its URL.
/// A real prism-router with memory for pipeline `mm`, in front of local prism-nodes of node `text`
/// given as (url, revision, weight): it stands in for the router pods, whose IPs are fake.
fn spawn_memory_router(
    tmp: &std::path::Path,
    target: &std::path::Path,
    nodes: &[(&str, &str, f64)],
) -> (Local, String) {
    let eps: Vec<serde_json::Value> = nodes
        .iter()
        .map(|(url, rev, w)| {
            serde_json::json!({"endpoint": url, "node": "text", "revision": rev, "weight": w, "accuracy": 0.9, "ready": true})
        })
        .collect();
    let table = serde_json::json!({"pipeline": "mm", "generation": 1, "modalities": {"text": eps}});
    std::fs::write(tmp.join("table.json"), table.to_string()).unwrap();
    let spec = serde_json::json!({"apiVersion": "prism.dev/v1alpha1", "kind": "MultimodalPipeline",
        "metadata": {"name": "mm"}, "spec": {"nodes": [{"name": "text"}], "memory": {"enabled": true}}});
    std::fs::write(tmp.join("pipeline.json"), spec.to_string()).unwrap();
    let mut r = Command::new(target.join("release/prism-router"));
    r.args(["--listen", "127.0.0.1:0"]).arg("--pipeline").arg(tmp.join("pipeline.json"));
    r.arg("--routing-table").arg(tmp.join("table.json")).arg("--memory-path").arg(tmp.join("memory.db"));
    spawn_server(r, &tmp.join("router.log"), Duration::from_secs(30))
}

/// POSTs `body` as JSON and returns the JSON answer (panics on transport or decode errors: tests).
async fn post_json(http: &reqwest::Client, url: String, body: serde_json::Value) -> serde_json::Value {
    http.post(url).json(&body).send().await.unwrap().json().await.unwrap()
}

fn start_prometheus(tmp: &std::path::Path, target: &str, namespace: &str) -> (Local, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(
        tmp.join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n- job_name: stand-in\n  static_configs:\n  - targets: ['{}']\n    labels: {{namespace: {namespace}}}\n",
            target.trim_start_matches("http://"),
        ),
    )
    .unwrap();
    let mut prom = Command::new("prometheus");
    prom.arg(format!("--config.file={}", tmp.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", tmp.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let (p, _) = spawn_until(prom, &tmp.join("prometheus.log"), "Server is ready", Duration::from_secs(30));
    (p, format!("http://127.0.0.1:{port}"))
}

#[tokio::test]
#[ignore = "needs the e2e control plane (KUBECONFIG), the text model and a prometheus binary"]
async fn builtin_autoscaler_scales_the_deployment_from_prometheus_and_holds_during_an_outage() {
    let mut ns = TestNs::new("autoscale", &[]).await;
    let tmp = std::env::temp_dir().join(format!("{}-autoscale", ns.name));
    std::fs::create_dir_all(&tmp).unwrap();
    // Simulated pod IPs are fake, so a local prism-node stands in for the Deployment's pods: the
    // real model, its real /metrics, scraped on loopback and labelled with the namespace as
    // Prometheus' Kubernetes discovery would label the pods.
    let model = repo().join(".cache/models/all-minilm-l6-v2");
    assert!(model.is_dir(), "run `make models` first");
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| repo().join("target"));
    let mut node = Command::new(target.join("release/prism-node"));
    node.args(["--listen", "127.0.0.1:0", "--node-name", "text", "--modality", "text", "--architecture", "bert"]);
    node.arg("--model-uri").arg(&model);
    let (_node, node_url) = spawn_server(node, &tmp.join("node.log"), Duration::from_secs(120));
    let (prom, prom_url) = start_prometheus(&tmp, &node_url, &ns.name);

    ns.start_operator_with_prometheus(&prom_url);
    let scaling = "  replicas: {min: 1, max: 3}\n  autoscaling: {targetInflight: 1, intervalSeconds: 1, stableWindowSeconds: 10, panicWindowSeconds: 3, scaleDownStabilizationSeconds: 5}\n";
    ns.apply_yaml(&small_node("text", "text", false, scaling));
    ns.wait_node_condition("text", types::READY, "True", T).await;

    // Load on the stand-in: 6 clients in a closed loop against a target of 1 in flight.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for w in 0..6 {
        let (stop, url) = (stop.clone(), format!("{node_url}/embed"));
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::builder().no_proxy().build().unwrap();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && i < 100_000 {
                i += 1;
                let body = serde_json::json!({"inputs": [format!("client {w} sentence {i} about a dog in the snow")]});
                let _ = http.post(&url).json(&body).timeout(Duration::from_secs(10)).send().await;
            }
        }));
    }
    let took = Instant::now();
    ns.wait("the Deployment scaled to 3 by the autoscaler", T, || async {
        let d = ns.api::<Deployment>().get("text").await.ok()?;
        (d.spec?.replicas == Some(3)).then_some(())
    })
    .await;
    eprintln!("Deployment scaled 1 -> 3 in {:.1}s after the load step", took.elapsed().as_secs_f64());
    let st = ns.api::<ModalityNode>().get("text").await.unwrap().status.unwrap();
    assert_eq!(st.desired_replicas, Some(3));
    let last = st.last_scale.expect("lastScale written");
    assert_eq!((last.from, last.to), (1, 3));
    assert!(last.reason.contains("in-flight"), "{}", last.reason);
    // The P95 column follows once the stable window holds finished requests.
    ns.wait("status.p95 filled from Prometheus", T, || async {
        ns.api::<ModalityNode>().get("text").await.ok()?.status?.p95.filter(|p| p.ends_with("ms"))
    })
    .await;
    // Six closed-loop clients against a target of 1 in flight ask for more than max 3 once the
    // window fills; the decision that first reached 3 may have asked for exactly 3 (its window
    // held fewer in flight), so wait for a later interval rather than read the status once.
    ns.wait("ScalingLimited=True naming replicas.max", T, || async {
        let st = ns.api::<ModalityNode>().get("text").await.ok()?.status?;
        let c = find(&st.conditions, types::SCALING_LIMITED)?.clone();
        (c.is_true() && c.message.contains("replicas.max 3")).then_some(())
    })
    .await;
    let events = kubectl_ok(&["-n", &ns.name, "get", "events", "--field-selector", "reason=Scaled", "-o", "name"]);
    assert!(!events.trim().is_empty(), "a Scaled event was recorded");

    // One owner per status field, as the API server records it (issue 26): each writer applies
    // its own struct, and a condition type belongs to whoever reports it.
    let owners = status_owners(&ns.api::<ModalityNode>().get("text").await.unwrap());
    let owner = |f: &str| owners.get(f).map(|m| m.iter().map(String::as_str).collect::<Vec<_>>());
    for f in ["desiredReplicas", "p95", "lastScale", "conditions[MetricsUnavailable]", "conditions[ScalingLimited]"] {
        assert_eq!(owner(f), Some(vec![autoscale::FIELD_MANAGER]), "{f}: {owners:?}");
    }
    for f in ["replicas", "readyReplicas", "selector", "currentRevision", "observedGeneration", "conditions[Ready]"] {
        assert_eq!(owner(f), Some(vec![prism_api::labels::FIELD_MANAGER]), "{f}: {owners:?}");
    }
    assert!(owners.values().all(|m| m.len() == 1), "a status field with two owners: {owners:?}");

    // Outage: load stops and Prometheus dies. Idle would scale in after 5 s; blind must hold.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        let _ = c.await;
    }
    drop(prom);
    ns.wait_node_condition("text", types::METRICS_UNAVAILABLE, "True", T).await;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(8) {
        let d = ns.api::<Deployment>().get("text").await.unwrap();
        assert_eq!(d.spec.unwrap().replicas, Some(3), "replicas held during the metrics outage");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let warn =
        kubectl_ok(&["-n", &ns.name, "get", "events", "--field-selector", "reason=MetricsUnavailable", "-o", "name"]);
    assert!(!warn.trim().is_empty(), "a MetricsUnavailable event was recorded");
    ns.stop_operator().await;
    let _ = std::fs::remove_dir_all(&tmp);
}

#[tokio::test]
#[ignore = "needs the e2e control plane (KUBECONFIG)"]
async fn operator_killed_mid_reconcile_restarts_without_duplicates_or_rollouts() {
    let ns = TestNs::new("restart", &[]).await;
    let nodes: Vec<String> = (0..12).map(|i| format!("n{i}")).collect();
    let names: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let manifests: String = nodes.iter().map(|n| format!("---\n{}", small_node(n, "text", false, ""))).collect();
    let a = OperatorProc::start(&ns.name, "first", 18184);
    ns.wait("first operator leads", T, || async { a.log().contains("controllers running").then_some(()) }).await;
    ns.apply_yaml(&format!("{manifests}---\n{}", pipeline_yaml("p", &names)));
    // Kill -9 while the first objects are being written: some nodes have children, some not.
    ns.wait("reconcile under way", T, || async {
        let n = ns.api::<Deployment>().list(&ListParams::default()).await.ok()?.items.len();
        (n >= 1).then_some(())
    })
    .await;
    drop(a);
    let partial = ns.api::<Deployment>().list(&ListParams::default()).await.unwrap().items.len();
    eprintln!("killed the operator with {partial} of 13 Deployments written");
    // A fresh process (new identity) takes over once the lease expires and finishes the job.
    let b = OperatorProc::start(&ns.name, "second", 18185);
    ns.wait_condition("p", types::READY, "True", Duration::from_secs(90)).await;
    // Exactly one of each child, each created once and never rolled: generation 1, one ReplicaSet.
    let deploys = ns.api::<Deployment>().list(&ListParams::default()).await.unwrap();
    let mut got: Vec<String> = deploys.iter().map(|d| d.name_any()).collect();
    got.sort();
    let mut want: Vec<String> = nodes.iter().cloned().chain(["p-router".to_string()]).collect();
    want.sort();
    assert_eq!(got, want, "one Deployment per node plus the router");
    for d in &deploys {
        assert_eq!(d.metadata.generation, Some(1), "Deployment {} was re-rolled by the restart", d.name_any());
    }
    let rs = ns.api::<k8s_openapi::api::apps::v1::ReplicaSet>().list(&ListParams::default()).await.unwrap();
    assert_eq!(rs.items.len(), deploys.items.len(), "one ReplicaSet per Deployment (no rollout)");
    let svcs = ns.api::<Service>().list(&ListParams::default()).await.unwrap();
    assert_eq!(svcs.items.len(), 13, "one Service per node plus the router's");
    let pdbs = ns.api::<PodDisruptionBudget>().list(&ListParams::default()).await.unwrap();
    assert_eq!(pdbs.items.len(), 12);
    let cms =
        ns.api::<ConfigMap>().list(&ListParams::default().labels("app.kubernetes.io/managed-by=prism")).await.unwrap();
    assert_eq!(cms.items.len(), 1, "one routing-table ConfigMap");
    let t = ns.table("p").await.expect("routing table");
    assert_eq!(t.ready("text").count(), 12, "every node's pod in the table once");
    drop(b);
}

#[tokio::test]
#[ignore = "needs the e2e control plane (KUBECONFIG) and target/release/prism-router"]
async fn router_follows_its_configmap_through_the_api_with_only_its_own_service_account() {
    let mut ns = TestNs::new("routerwatch", &[]).await;
    ns.start_operator();
    let before = ns.text_audio_pipeline().await;
    ns.wait("the routers' RoleBinding", T, || async {
        ns.api::<k8s_openapi::api::rbac::v1::RoleBinding>().get_opt("mm-router").await.ok().flatten()
    })
    .await;

    // The routers' identity may read its own ConfigMap and nothing else.
    let sa = format!("system:serviceaccount:{}:mm-router", ns.name);
    let can = |what: &[&str]| {
        let mut args = vec!["auth", "can-i"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["-n", &ns.name, "--as", &sa]);
        String::from_utf8_lossy(&kubectl(&args).stdout).trim().to_string()
    };
    assert_eq!(can(&["watch", "configmaps/mm-routing-table"]), "yes");
    assert_eq!(can(&["get", "configmaps/mm-routing-table"]), "yes");
    assert_eq!(can(&["get", "configmaps/other"]), "no");
    assert_eq!(can(&["list", "configmaps"]), "no", "an unnamed list would expose every ConfigMap");
    assert_eq!(can(&["get", "secrets"]), "no");
    assert_eq!(can(&["patch", "configmaps/mm-routing-table"]), "no");

    // Run the real router binary as that ServiceAccount (a TokenRequest token), with no table
    // file: everything it knows comes from the watch. No probes: the pod IPs are fake.
    let tmp = std::env::temp_dir().join(format!("{}-routerwatch", ns.name));
    std::fs::create_dir_all(&tmp).unwrap();
    let token = kubectl_ok(&["-n", &ns.name, "create", "token", "mm-router", "--duration=10m"]);
    let raw = kubectl_ok(&["config", "view", "--raw", "--minify", "-o", "json"]);
    let mut cfg: serde_json::Value = serde_json::from_str(&raw).unwrap();
    cfg["users"] = serde_json::json!([{"name": "mm-router", "user": {"token": token.trim()}}]);
    cfg["contexts"][0]["context"]["user"] = "mm-router".into();
    cfg["contexts"][0]["context"]["namespace"] = ns.name.clone().into();
    let kubeconfig = tmp.join("kubeconfig.json");
    std::fs::write(&kubeconfig, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| repo().join("target"));
    let mut cmd = Command::new(target.join("release/prism-router"));
    cmd.args(["--listen", "127.0.0.1:0", "--routing-configmap", "mm-routing-table", "--probe-interval-ms", "0"])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info");
    let (_router, url) = spawn_server(cmd, &tmp.join("router.log"), Duration::from_secs(30));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let router_table = || async {
        let r = http.get(format!("{url}/v1/routing-table")).send().await.ok()?;
        r.json::<RoutingTable>().await.ok()
    };
    let got = ns
        .wait("the router has the operator's table from the watch", T, || async {
            router_table().await.filter(|t| t.generation >= before.generation)
        })
        .await;
    assert_eq!(got.ready("audio").count(), 1);

    // A failover rewrite reaches the router from the watch, not from a kubelet file sync.
    let (_, rewritten, _) = ns.fail_audio().await;
    let t_cm = Instant::now();
    let seen = ns
        .wait("the router applies the rewrite", Duration::from_secs(10), || async {
            router_table().await.filter(|t| t.generation >= rewritten.generation)
        })
        .await;
    let lag = t_cm.elapsed();
    eprintln!("router: ConfigMap write -> router table in {lag:?} (a mounted file lags up to ~60 s)");
    assert_eq!(seen.ready("audio").count(), 0, "the router no longer routes to the failed pod");
    assert!(lag < Duration::from_secs(5), "the watch delivered the rewrite in {lag:?}");

    // Generations never go backwards: an older table written by hand is ignored.
    let mut stale = before.clone();
    stale.generation = 1;
    let patch = serde_json::json!({"data": {ROUTING_TABLE_KEY: serde_json::to_string(&stale).unwrap()}});
    ns.api::<ConfigMap>().patch("mm-routing-table", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = router_table().await.expect("router answers");
    assert!(after.generation >= rewritten.generation, "stale generation {} applied", after.generation);
    ns.stop_operator().await;
}

#[tokio::test]
#[ignore = "needs the e2e control plane (KUBECONFIG)"]
async fn embedded_memory_gets_a_claim_that_outlives_the_pipeline_unless_told_and_the_api_refuses_two_routers_on_it() {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    let mut ns = TestNs::new("memory", &[]).await;
    ns.start_operator();
    ns.apply_yaml(&small_node("text", "text", false, ""));
    let mem = "  memory: {enabled: true, store: {size: 2Gi}}\n";
    ns.apply_yaml(&format!("{}{mem}", pipeline_yaml("mm", &["text"])));
    let claims = ns.api::<PersistentVolumeClaim>();
    let claim = ns.wait("the memory claim", T, || async { claims.get_opt("mm-memory").await.ok().flatten() }).await;
    assert!(claim.owner_references().is_empty(), "Retain (default): not owned: {:?}", claim.owner_references());
    let size = claim.spec.as_ref().unwrap().resources.as_ref().unwrap().requests.as_ref().unwrap()["storage"].0.clone();
    assert_eq!(size, "2Gi");
    let d = ns
        .wait("the router Deployment", T, || async { ns.api::<Deployment>().get_opt("mm-router").await.ok().flatten() })
        .await;
    let spec = d.spec.unwrap();
    assert_eq!(spec.strategy.unwrap().type_.as_deref(), Some("Recreate"));
    let args = spec.template.spec.unwrap().containers[0].args.clone().unwrap();
    assert!(args.windows(2).any(|w| w[0] == "--memory-path" && w[1] == "/var/lib/prism/memory/memory.db"), "{args:?}");

    // Two routers cannot share one SQLite file: the API server says why.
    let path = std::env::temp_dir().join(format!("{}-two.yaml", ns.name));
    std::fs::write(&path, format!("{}  routerReplicas: 2\n{mem}", pipeline_yaml("mm", &["text"]))).unwrap();
    let out = kubectl(&["apply", "-n", &ns.name, "-f", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("routerReplicas must be 1"), "{err}");

    // Deleting the pipeline: the garbage collector takes its router, not its memory.
    ns.api::<MultimodalPipeline>().delete("mm", &DeleteParams::default()).await.unwrap();
    ns.wait("the router garbage-collected", T, || async {
        let d = ns.api::<Deployment>().get_opt("mm-router").await.ok()?;
        let p = ns.pipeline("mm").await;
        (d.is_none() && p.is_none()).then_some(())
    })
    .await;
    let kept = claims.get("mm-memory").await.expect("the claim outlives its pipeline");
    assert_eq!((kept.uid(), kept.metadata.deletion_timestamp.clone()), (claim.uid(), None));

    // A pipeline of the same name mounts the same claim again; switching it to Delete adopts
    // the claim, and back to Retain disowns it (server-side apply drops the reference).
    ns.apply_yaml(&format!("{}{mem}", pipeline_yaml("mm", &["text"])));
    ns.wait("the router again, on the kept claim", T, || async {
        let d = ns.api::<Deployment>().get_opt("mm-router").await.ok()??;
        let vols = d.spec?.template.spec?.volumes?;
        vols.iter()
            .any(|v| v.persistent_volume_claim.as_ref().is_some_and(|c| c.claim_name == "mm-memory"))
            .then_some(())
    })
    .await;
    assert_eq!(claims.get("mm-memory").await.unwrap().uid(), claim.uid(), "reused, not re-created");
    // `Kind/name` of each owner of a claim that exists.
    let owners = |name: &'static str| {
        let claims = claims.clone();
        async move {
            let c = claims.get_opt(name).await.ok()??;
            Some(c.owner_references().iter().map(|o| format!("{}/{}", o.kind, o.name)).collect::<Vec<_>>())
        }
    };
    let delete = "  memory: {enabled: true, store: {size: 2Gi}, retain: Delete}\n";
    ns.apply_yaml(&format!("{}{delete}", pipeline_yaml("mm", &["text"])));
    ns.wait("mm-memory adopted", T, || async {
        (owners("mm-memory").await? == ["MultimodalPipeline/mm"]).then_some(())
    })
    .await;
    ns.apply_yaml(&format!("{}{mem}", pipeline_yaml("mm", &["text"])));
    ns.wait("mm-memory disowned", T, || async { owners("mm-memory").await?.is_empty().then_some(()) }).await;

    // `retain: Delete` from the start: the claim is owned, and goes with its pipeline.
    ns.apply_yaml(&format!("{}{delete}", pipeline_yaml("mm2", &["text"])));
    ns.wait("mm2-memory owned by the pipeline", T, || async {
        (owners("mm2-memory").await? == ["MultimodalPipeline/mm2"]).then_some(())
    })
    .await;
    ns.api::<MultimodalPipeline>().delete("mm2", &DeleteParams::default()).await.unwrap();
    ns.wait("mm2-memory garbage-collected", T, || async {
        claims.get_opt("mm2-memory").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(claims.get_opt("mm-memory").await.unwrap().is_some(), "the other pipeline's claim stays");
    ns.stop_operator().await;
}

#[tokio::test]
#[ignore = "needs the e2e control plane (KUBECONFIG), the text model, a prometheus binary and target/release/prism"]
async fn a_worse_canary_is_rolled_back_from_prometheus_and_prism_rollout_undo_restores_the_spec() {
    use serde_json::Value;
    let mut ns = TestNs::new("canary", &[]).await;
    let tmp = std::env::temp_dir().join(format!("{}-canary", ns.name));
    std::fs::create_dir_all(&tmp).unwrap();
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| repo().join("target"));
    // Simulated pod IPs are fake, so local processes stand in for the pods' traffic: a real
    // prism-router (with memory) in front of two real prism-nodes, one per revision of node
    // `text` - revision 2 is the same encoder with a random projection head, deliberately worse.
    let model = repo().join(".cache/models/all-minilm-l6-v2");
    assert!(model.is_dir(), "run `make models` first");
    let bad = tmp.join("minilm-random-head");
    std::fs::create_dir_all(&bad).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::os::unix::fs::symlink(model.join(f), bad.join(f)).unwrap();
    }
    let script = "import sys, numpy as np\nfrom safetensors.numpy import save_file\nr = np.random.default_rng(7)\nsave_file({'projection.0.weight': r.standard_normal((384, 384)).astype(np.float32), 'projection.0.bias': np.zeros(384, dtype=np.float32)}, sys.argv[1])\n";
    let st = Command::new("python3").args(["-c", script]).arg(bad.join("projection.safetensors")).status().unwrap();
    assert!(st.success(), "writing the random head needs numpy + safetensors");
    let node = |rev: &str, dir: &std::path::Path| {
        let mut c = Command::new(target.join("release/prism-node"));
        c.args(["--listen", "127.0.0.1:0", "--node-name", "text", "--modality", "text", "--architecture", "bert"]);
        c.args(["--revision", rev]).arg("--model-uri").arg(dir);
        spawn_server(c, &tmp.join(format!("node-{rev}.log")), Duration::from_secs(120))
    };
    let (_n1, url1) = node("1", &model);
    let (_n2, url2) = node("2", &bad);
    let (_router, router) = spawn_memory_router(&tmp, &target, &[(&url1, "1", 0.5), (&url2, "2", 0.5)]);
    let (_prom, prom_url) = start_prometheus(&tmp, &router, &ns.name);
    ns.start_operator_with_prometheus(&prom_url);

    // Revision 1 deployed, then revision 2 as a canary with half the traffic.
    let rollout = "  replicas: {min: 2, max: 2}\n  rollout:\n    steps: [{weight: 50, pauseSeconds: 600}]\n    analysis: {minCorrections: 10, maxAccuracyDrop: 0.1}\n";
    ns.apply_yaml(&small_node("text", "text", false, rollout));
    ns.apply_yaml(&pipeline_yaml("mm", &["text"]));
    let nodes = ns.api::<ModalityNode>();
    ns.wait("revision 1 deployed", T, || async {
        let st = nodes.get("text").await.ok()?.status?;
        (st.current_revision.as_deref() == Some("1") && st.history.len() == 1).then_some(())
    })
    .await;
    ns.apply_yaml(&small_node("text", "text", false, rollout).replace("revision: '1'", "revision: '2'"));
    let canary = ns
        .wait("canary Deployment text-canary", T, || async {
            ns.api::<Deployment>().get_opt("text-canary").await.ok().flatten()
        })
        .await;
    let labels = canary.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    assert_eq!(labels.get("prism.dev/revision").map(String::as_str), Some("2"));
    let stable = ns.api::<Deployment>().get("text").await.unwrap();
    let args = stable.spec.unwrap().template.spec.unwrap().containers[0].args.clone().unwrap();
    assert!(args.windows(2).any(|w| w == ["--revision", "1"]), "stable keeps revision 1: {args:?}");
    // The pipeline's table gives the canary's pods half of the node's weight.
    ns.wait("table with the canary's share", T, || async {
        let t = ns.table("mm").await?;
        let eps = t.modalities.get("text")?;
        let total: f64 = eps.iter().map(|e| e.weight).sum();
        let canary: f64 = eps.iter().filter(|e| e.revision == "2").map(|e| e.weight).sum();
        (eps.iter().any(|e| e.revision == "2") && (canary / total - 0.5).abs() < 1e-9).then_some(())
    })
    .await;

    // The user's traffic and corrections through the real router: revision 2 answers wrong.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let texts = ["a dog in the snow", "the car engine overheated", "fresh bread from the oven", "rain tomorrow"];
    let started = Instant::now();
    let mut i = 0;
    let rolled_back = loop {
        let st = nodes.get("text").await.unwrap().status.unwrap();
        if st.history.last().is_some_and(|h| h.revision == "2") {
            break st;
        }
        assert!(started.elapsed() < Duration::from_secs(90), "no verdict after 90 s: {st:?}");
        let text = texts[i % texts.len()];
        i += 1;
        let truth = post_json(&http, format!("{url1}/embed"), serde_json::json!({"inputs": [text]})).await;
        let ans = post_json(&http, format!("{router}/v1/infer"), serde_json::json!({"inputs": {"text": text}})).await;
        let a: Vec<f64> =
            ans["modalities"]["text"]["embedding"].as_array().unwrap().iter().filter_map(Value::as_f64).collect();
        let t: Vec<f64> = truth["embeddings"][0].as_array().unwrap().iter().filter_map(Value::as_f64).collect();
        let right = a.iter().zip(&t).map(|(x, y)| x * y).sum::<f64>() > 0.99;
        http.post(format!("{router}/v1/memory/corrections"))
            .json(&serde_json::json!({"requestId": ans["id"], "correct": right}))
            .send()
            .await
            .unwrap();
    };
    let last = rolled_back.history.last().unwrap();
    assert_eq!(last.outcome, "RolledBack", "{last:?}");
    assert!(last.reason.contains("accuracy"), "{}", last.reason);
    assert!(rolled_back.canary.is_none());
    assert_eq!(rolled_back.current_revision.as_deref(), Some("1"));
    eprintln!("canary rolled back {:.1}s after traffic started: {}", started.elapsed().as_secs_f64(), last.reason);
    ns.wait("canary Deployment deleted", T, || async {
        ns.api::<Deployment>().get_opt("text-canary").await.ok()?.is_none().then_some(())
    })
    .await;
    let n = ns.wait_node_condition("text", types::DEGRADED, "True", T).await;
    let d = find(&n.status.as_ref().unwrap().conditions, types::DEGRADED).unwrap();
    assert_eq!(d.reason, "RolledBack", "{}", d.message);
    let ev = kubectl_ok(&["-n", &ns.name, "get", "events", "--field-selector", "reason=RolledBack", "-o", "name"]);
    assert!(!ev.trim().is_empty(), "a RolledBack event was recorded");

    // `prism rollout undo` puts revision 1's model back into the spec; history shows it all.
    let prism = |args: &[&str]| {
        let out = Command::new(target.join("release/prism")).args(args).args(["-n", &ns.name]).output().unwrap();
        assert!(out.status.success(), "prism {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let undo = prism(&["rollout", "undo", "text"]);
    assert!(undo.contains("rolled back to revision 1"), "{undo}");
    assert_eq!(nodes.get("text").await.unwrap().spec.model.revision, "1");
    ns.wait_node_condition("text", types::DEGRADED, "False", T).await;
    let history = prism(&["rollout", "history", "text"]);
    assert!(history.contains("RolledBack") && history.contains("Deployed"), "{history}");
    ns.stop_operator().await;
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A PersistentVolume pre-bound to one claim (no provisioner runs here), deleted on drop.
struct BoundVolume(String);

impl BoundVolume {
    fn new(ns: &str, claim: &str) -> Self {
        let name = format!("{ns}-{claim}");
        let pv = serde_json::json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
            "spec": {"capacity": {"storage": "20Gi"}, "accessModes": ["ReadWriteMany"],
                     "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "",
                     // Nothing mounts it: kwok plays the kubelets.
                     "hostPath": {"path": "/nonexistent/prism-e2e"},
                     "claimRef": {"namespace": ns, "name": claim}}});
        let path = std::env::temp_dir().join(format!("{name}-pv.json"));
        std::fs::write(&path, pv.to_string()).unwrap();
        kubectl_ok(&["apply", "-f", path.to_str().unwrap()]);
        Self(name)
    }
}

impl Drop for BoundVolume {
    fn drop(&mut self) {
        let _ = kubectl(&["delete", "pv", &self.0, "--wait=false"]);
    }
}

#[tokio::test]
#[ignore = "needs the e2e control plane (KUBECONFIG) and target/release/prism"]
async fn an_adaptation_run_is_an_indexed_torchrun_job_on_gpu_nodes_and_its_result_goes_out_as_a_canary() {
    use k8s_openapi::api::batch::v1::Job;
    let mut ns = TestNs::new("adapt", &[]).await;
    let _pv = BoundVolume::new(&ns.name, "text-train");
    ns.start_operator();
    kubectl_ok(&["-n", &ns.name, "create", "secret", "generic", "mm-router-tokens", "--from-literal=tokens=t0k3n"]);
    let extra = "  rollout:\n    steps: [{weight: 50, pauseSeconds: 3600}]\n  adaptation:\n    workers: 2\n    gpusPerWorker: 2\n    memory: 32Gi\n    lora: {rank: 16, alpha: 32}\n";
    ns.apply_yaml(&small_node("text", "text", true, extra).replace("file:///models/text", "hf://org/minilm"));
    ns.apply_yaml(&format!("{}  memory: {{enabled: true}}\n", pipeline_yaml("mm", &["text"])));

    // Before any run, the node says how to start one.
    let mn = ns.wait_node_condition("text", types::TRAINING, "False", T).await;
    let c = find(&mn.status.as_ref().unwrap().conditions, types::TRAINING).unwrap();
    assert_eq!(c.reason, "NoRunYet", "{c:?}");

    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| repo().join("target"));
    let prism = |args: &[&str]| {
        let out = Command::new(target.join("release/prism")).args(args).args(["-n", &ns.name]).output().unwrap();
        assert!(out.status.success(), "prism {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(prism(&["adapt", "status", "text"]).contains("no run yet"));
    let start = prism(&["adapt", "start", "text"]);
    assert!(start.contains("asked for an adaptation run"), "{start}");
    let job =
        ns.wait("the training Job", T, || async { ns.api::<Job>().get_opt("text-train-1").await.ok().flatten() }).await;
    let js = job.spec.as_ref().unwrap();
    assert_eq!((js.completion_mode.as_deref(), js.completions, js.parallelism), (Some("Indexed"), Some(2), Some(2)));
    let svc = ns.api::<Service>().get("text-train-1").await.unwrap();
    let ss = svc.spec.as_ref().unwrap();
    assert_eq!(ss.cluster_ip.as_deref(), Some("None"), "headless: workers resolve each other by hostname");
    assert_eq!(ss.publish_not_ready_addresses, Some(true));

    // The real scheduler places both workers on GPU nodes with their GPUs; the Job controller
    // gives them their completion index, which torchrun takes as its node rank.
    let pods = ns
        .wait("2 scheduled training pods", T, || async {
            let l =
                ns.api::<Pod>().list(&ListParams::default().labels("prism.dev/train-run=text-train-1")).await.ok()?;
            (l.items.len() == 2 && l.items.iter().all(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()).is_some()))
                .then_some(l.items)
        })
        .await;
    let mut indexes = vec![];
    for p in &pods {
        let s = p.spec.as_ref().unwrap();
        assert!(s.node_name.as_deref().unwrap().starts_with("gpu-node-"), "{:?}", s.node_name);
        assert_eq!(s.subdomain.as_deref(), Some("text-train-1"));
        let c = &s.containers[0];
        let lim = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(lim["nvidia.com/gpu"].0, "2");
        let args = c.args.as_ref().unwrap();
        assert!(args.windows(2).any(|w| w[0] == "--master_addr" && w[1] == "text-train-1-0.text-train-1"), "{args:?}");
        assert!(args.windows(2).any(|w| w[0] == "--corrections" && w[1].contains("mm-router.")), "{args:?}");
        assert!(!p.labels().contains_key("prism.dev/node"), "training pods must never be routed to");
        indexes.push(p.annotations()["batch.kubernetes.io/job-completion-index"].clone());
        assert_eq!(s.hostname.as_deref(), Some(format!("text-train-1-{}", indexes.last().unwrap()).as_str()));
    }
    indexes.sort();
    assert_eq!(indexes, ["0", "1"]);

    // kwok completes the workers; the Job succeeds; the node records it and its result becomes
    // the new revision, which goes out as a canary.
    let mn = ns
        .wait("the run recorded as Succeeded", T, || async {
            let mn = ns.api::<ModalityNode>().get("text").await.ok()?;
            let a = mn.status.as_ref()?.adaptation.as_ref()?;
            (a.phase == "Succeeded").then_some(mn)
        })
        .await;
    let a = mn.status.as_ref().unwrap().adaptation.clone().unwrap();
    assert_eq!((a.run, a.workers, a.succeeded), (1, 2, 2), "{a:?}");
    assert!(a.trigger.contains("requested (prism.dev/adapt-request="), "{}", a.trigger);
    let status = prism(&["adapt", "status", "text"]);
    assert!(
        status.contains("run 1: Succeeded") && status.contains("2 succeeded") && status.contains("revision 1-lora1"),
        "{status}"
    );
    assert_eq!(mn.spec.model.uri, "pvc://text-train/out/text/run-1");
    assert_eq!(mn.spec.model.revision, "1-lora1");
    assert_eq!(a.base_model.as_ref().unwrap().uri, "hf://org/minilm");
    let canary = ns
        .wait("the canary Deployment of the adapted revision", T, || async {
            ns.api::<Deployment>().get_opt("text-canary").await.ok().flatten()
        })
        .await;
    let ps = canary.spec.unwrap().template.spec.unwrap();
    let model_vol = ps.volumes.unwrap().into_iter().find(|v| v.name == "model").unwrap();
    assert_eq!(model_vol.persistent_volume_claim.unwrap().claim_name, "text-train");
    let stable = ns.api::<Deployment>().get("text").await.unwrap();
    let args = stable.spec.unwrap().template.spec.unwrap().containers[0].args.clone().unwrap();
    assert!(args.windows(2).any(|w| w[0] == "--revision" && w[1] == "1"), "stable keeps serving revision 1");
    // Events are recorded once the writes they describe are made, so the canary Deployment can
    // be seen a moment before its CanaryStarted Event.
    for reason in ["TrainingStarted", "TrainingSucceeded", "CanaryStarted"] {
        ns.wait(&format!("a {reason} event"), T, || async {
            let selector = format!("reason={reason}");
            let ev = kubectl_ok(&["-n", &ns.name, "get", "events", "--field-selector", &selector, "-o", "name"]);
            (!ev.trim().is_empty()).then_some(())
        })
        .await;
    }

    // A second request waits for the canary instead of training under it.
    kubectl_ok(&["-n", &ns.name, "annotate", "--overwrite", "mn", "text", "prism.dev/adapt-request=second"]);
    let mn = ns
        .wait("the second run waiting for the canary", T, || async {
            let mn = ns.api::<ModalityNode>().get("text").await.ok()?;
            let c = find(&mn.status.as_ref()?.conditions, types::TRAINING)?.clone();
            (c.reason == "Waiting").then_some(mn)
        })
        .await;
    let c = find(&mn.status.as_ref().unwrap().conditions, types::TRAINING).unwrap();
    assert!(c.message.contains("canary of revision 1-lora1"), "{}", c.message);
    assert!(ns.api::<Job>().get_opt("text-train-2").await.unwrap().is_none());
    ns.stop_operator().await;
}

#[tokio::test]
#[ignore = "needs the e2e control plane (KUBECONFIG), the text model, a prometheus binary and target/release/prism-{node,router}"]
async fn every_n_corrections_counted_in_prometheus_start_a_run_and_the_next_run_counts_from_there() {
    use k8s_openapi::api::batch::v1::Job;
    let mut ns = TestNs::new("adapt-trigger", &[]).await;
    let _pv = BoundVolume::new(&ns.name, "text-train");
    let tmp = std::env::temp_dir().join(format!("{}-trigger", ns.name));
    std::fs::create_dir_all(&tmp).unwrap();
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| repo().join("target"));
    // Pod IPs are fake: a real prism-node and router with memory stand in for the node's pods and
    // the pipeline's router; the real Prometheus scrapes the router's corrections counter.
    let model = repo().join(".cache/models/all-minilm-l6-v2");
    assert!(model.is_dir(), "run `make models` first");
    let mut c = Command::new(target.join("release/prism-node"));
    c.args(["--listen", "127.0.0.1:0", "--node-name", "text", "--modality", "text", "--architecture", "bert"]);
    c.args(["--revision", "1"]).arg("--model-uri").arg(&model);
    let (_node, node_url) = spawn_server(c, &tmp.join("node.log"), Duration::from_secs(120));
    let (_router, router) = spawn_memory_router(&tmp, &target, &[(&node_url, "1", 1.0)]);
    let (_prom, prom_url) = start_prometheus(&tmp, &router, &ns.name);
    ns.start_operator_with_prometheus(&prom_url);
    kubectl_ok(&["-n", &ns.name, "create", "secret", "generic", "mm-router-tokens", "--from-literal=tokens=t0k3n"]);
    let extra = "  adaptation:\n    workers: 2\n    gpusPerWorker: 1\n    trigger: {everyCorrections: 4}\n";
    ns.apply_yaml(&small_node("text", "text", true, extra).replace("file:///models/text", "hf://org/minilm"));
    ns.apply_yaml(&format!("{}  memory: {{enabled: true}}\n", pipeline_yaml("mm", &["text"])));

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let correct = |n: usize| {
        let (http, router) = (http.clone(), router.clone());
        async move {
            for i in 0..n {
                let question = serde_json::json!({"inputs": {"text": format!("where is parcel {i}?")}});
                let ans = post_json(&http, format!("{router}/v1/infer"), question).await;
                let ok = http
                    .post(format!("{router}/v1/memory/corrections"))
                    .json(&serde_json::json!({"requestId": ans["id"], "rating": 0.0,
                                              "answer": {"text": format!("at depot {i}")}}))
                    .send()
                    .await
                    .unwrap();
                assert!(ok.status().is_success(), "correction refused: {}", ok.status());
            }
        }
    };
    let jobs = ns.api::<Job>();
    let nodes = ns.api::<ModalityNode>();
    correct(4).await;
    let started = Instant::now();
    ns.wait("run 1 started by 4 corrections", T, || async { jobs.get_opt("text-train-1").await.ok().flatten() }).await;
    eprintln!("run 1 started {:.1}s after the 4th correction", started.elapsed().as_secs_f64());
    let a = ns
        .wait("run 1 finished", T, || async {
            let a = nodes.get("text").await.ok()?.status?.adaptation?;
            (a.phase == "Succeeded").then_some(a)
        })
        .await;
    assert!(a.trigger.contains("4 corrections so far >= trigger.everyCorrections 4"), "{}", a.trigger);
    assert_eq!(a.corrections_at_start, Some(4.0), "the baseline of the next run");
    assert_eq!(nodes.get("text").await.unwrap().spec.model.revision, "1-lora1");

    // Four more: run 2, counted from run 1's baseline; run 1's Job and Service are cleaned up.
    correct(4).await;
    // The Job is created before the node's status names it: wait for the status.
    let a = ns
        .wait("run 2 started by 4 more corrections", T, || async {
            let a = nodes.get("text").await.ok()?.status?.adaptation?;
            (a.run == 2).then_some(a)
        })
        .await;
    assert!(jobs.get_opt("text-train-2").await.unwrap().is_some());
    assert!(a.trigger.contains("4 corrections since run 1"), "{}", a.trigger);
    assert_eq!(a.base_model.as_ref().unwrap().uri, "hf://org/minilm", "run 2 trains from the base, not run 1's output");
    ns.wait("run 1's Job and Service deleted", T, || async {
        let gone = jobs.get_opt("text-train-1").await.ok()?.is_none()
            && ns.api::<Service>().get_opt("text-train-1").await.ok()?.is_none();
        gone.then_some(())
    })
    .await;
    ns.stop_operator().await;
    let _ = std::fs::remove_dir_all(&tmp);
}
