//! The OCI images that `make images` builds (scripts/build-images.py), checked against what the
//! operator renders for its pods and what the chart runs: each image's reference is the
//! operator's default, its config exposes the rendered ports, its user is non-root, and each
//! rendered container starts from the image's own file system with the pod's uid. The node
//! serves its readiness probe on the rendered args, so a flag clash between the image entrypoint
//! and the operator's args, a missing library or a wrong path fails here before any cluster.
//!
//! Needs the archives in `$CARGO_TARGET_DIR/images` (or `PRISM_IMAGES_DIR`), the MiniLM model
//! (`make models`), and root for `chroot` and `unshare --net` (each start runs in a network
//! namespace of its own, so the rendered `0.0.0.0:8080` never touches the machine's ports).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::{Container, PodSpec};
use prism_api::node::{ModalityNode, ModalityNodeSpec};
use prism_api::pipeline::{MultimodalPipeline, MultimodalPipelineSpec};
use prism_api::routing::RoutingTable;
use prism_operator::OperatorConfig;
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("operator/ has a parent").to_path_buf()
}

fn images_dir() -> PathBuf {
    if let Ok(d) = std::env::var("PRISM_IMAGES_DIR") {
        return d.into();
    }
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| repo_root().join("target"));
    target.join("images")
}

/// One image archive: its index annotations, config and (gzipped) layer.
struct Image {
    name: String,
    index_ref: String,
    config: Value,
    layer_gz: Vec<u8>,
}

impl Image {
    fn load(name: &str) -> Image {
        let path = images_dir().join(format!("{name}.tar"));
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; build the images first with `make images`", path.display()));
        let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut ar = tar::Archive::new(&bytes[..]);
        for entry in ar.entries().expect("image archive is a tar") {
            let mut entry = entry.expect("tar entry");
            let p = entry.path().expect("entry path").to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).expect("read tar entry");
            files.insert(p, data);
        }
        let json = |p: &str| -> Value {
            serde_json::from_slice(files.get(p).unwrap_or_else(|| panic!("{name}: {p} missing in the archive")))
                .unwrap_or_else(|e| panic!("{name}: {p}: {e}"))
        };
        let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
        assert!(files.contains_key("oci-layout"), "{name}: not an OCI layout (no oci-layout file)");
        let index = json("index.json");
        let m = &index["manifests"][0];
        let index_ref = m["annotations"]["io.containerd.image.name"].as_str().unwrap_or_default().to_string();
        let manifest = json(&blob(m["digest"].as_str().expect("manifest digest")));
        let config = json(&blob(manifest["config"]["digest"].as_str().expect("config digest")));
        let layers = manifest["layers"].as_array().expect("layers");
        assert_eq!(layers.len(), 1, "{name}: one layer expected");
        let layer_gz = files[&blob(layers[0]["digest"].as_str().expect("layer digest"))].clone();
        // Docker's loader reads manifest.json: same config, same reference.
        let docker = json("manifest.json");
        assert_eq!(docker[0]["RepoTags"][0].as_str(), Some(index_ref.as_str()), "{name}: docker and OCI refs differ");
        Image { name: name.into(), index_ref, config, layer_gz }
    }

    fn cfg(&self) -> &Value {
        &self.config["config"]
    }

    fn strings(&self, key: &str) -> Vec<String> {
        self.cfg()[key]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str().map(String::from)).collect())
            .unwrap_or_default()
    }

    fn unpack(&self, dir: &Path) {
        let gz = flate2::read::GzDecoder::new(&self.layer_gz[..]);
        let mut ar = tar::Archive::new(gz);
        ar.set_preserve_permissions(true);
        ar.unpack(dir).unwrap_or_else(|e| panic!("{}: unpacking the layer: {e}", self.name));
    }

    /// The process a container of this image runs: `command` replaces the entrypoint, `args`
    /// replace Cmd (the Kubernetes rules).
    fn argv(&self, c: &Container) -> Vec<String> {
        let mut argv = c.command.clone().unwrap_or_else(|| self.strings("Entrypoint"));
        argv.extend(c.args.clone().unwrap_or_else(|| self.strings("Cmd")));
        argv
    }

    fn env(&self, c: &Container) -> Vec<String> {
        let mut env = self.strings("Env");
        for e in c.env.iter().flatten() {
            env.push(format!("{}={}", e.name, e.value.clone().unwrap_or_default()));
        }
        env
    }

    fn check_common(&self, pod: &PodSpec, c: &Container) {
        let user = self.cfg()["User"].as_str().unwrap_or_default();
        let uid: u32 = user.split(':').next().unwrap_or_default().parse().unwrap_or_else(|_| {
            panic!("{}: User {user:?} is not numeric, so the kubelet cannot verify runAsNonRoot", self.name)
        });
        assert_ne!(uid, 0, "{}: image runs as root", self.name);
        for p in c.ports.iter().flatten() {
            let key = format!("{}/tcp", p.container_port);
            assert!(self.cfg()["ExposedPorts"].get(&key).is_some(), "{}: container port {key} not exposed", self.name);
        }
        let sc = pod.security_context.as_ref().expect("pod securityContext");
        assert_eq!(sc.run_as_non_root, Some(true));
        assert!(
            self.strings("Env").iter().any(|e| e.starts_with("PATH=") && e.contains("/usr/local/bin")),
            "{}: PATH must find /usr/local/bin (init containers run `prism-node` by name)",
            self.name
        );
    }
}

fn pod_uid(pod: &PodSpec) -> i64 {
    pod.security_context.as_ref().and_then(|s| s.run_as_user).expect("rendered pods set runAsUser")
}

/// Runs `argv` chrooted into `rootfs` as `uid`, with only `env`, inside a fresh network namespace
/// (loopback up), then runs `probe` (a shell snippet) in the same namespace while it serves.
/// Returns (probe exit status, probe output, server log).
fn run_in_image(rootfs: &Path, uid: i64, env: &[String], argv: &[String], probe: &str) -> (bool, String, String) {
    let log = rootfs.join("tmp/server.log");
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let cmd = format!(
        "ip link set lo up && c=$(command -v chroot) && env -i {env} \"$c\" --userspec={uid}:{uid} {root} {argv} >{log} 2>&1 & pid=$!; \
         {probe}; rc=$?; kill $pid 2>/dev/null; wait $pid 2>/dev/null; exit $rc",
        env = env.iter().map(|e| quote(e)).collect::<Vec<_>>().join(" "),
        root = quote(&rootfs.to_string_lossy()),
        argv = argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "),
        log = quote(&log.to_string_lossy()),
    );
    let out = Command::new("unshare").args(["--net", "--", "sh", "-c", &cmd]).output().expect("run unshare");
    let server_log = std::fs::read_to_string(&log).unwrap_or_default();
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        server_log,
    )
}

fn minilm() -> PathBuf {
    let m = repo_root().join(".cache/models/all-minilm-l6-v2");
    assert!(m.join("model.safetensors").is_file(), "{} missing: run `make models`", m.display());
    m
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read model dir") {
        let e = e.expect("dir entry");
        if e.file_type().expect("file type").is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).expect("copy model file");
        }
    }
}

fn node(uri: &str) -> ModalityNode {
    let spec: ModalityNodeSpec = serde_json::from_value(serde_json::json!({
        "modality": "text",
        "model": {"uri": uri, "architecture": "bert", "revision": "r1"},
        "replicas": {"min": 1, "max": 2}
    }))
    .expect("node spec");
    let mut mn = ModalityNode::new("text-a", spec);
    mn.metadata.namespace = Some("default".into());
    mn.metadata.uid = Some("uid-1".into());
    mn
}

#[test]
fn node_image_serves_its_readiness_probe_with_the_operators_pod_spec() {
    let img = Image::load("prism-node");
    let cfg = OperatorConfig::default();
    assert_eq!(img.index_ref, cfg.node_image, "make images must build the reference the operator defaults to");

    // pvc:// renders a mount at /models and --model-uri file:///models/<path>.
    let objs =
        prism_operator::node::desired_objects(&node("pvc://models/all-minilm-l6-v2"), &cfg, None).expect("render");
    let pod = objs.deployment.spec.and_then(|s| s.template.spec).expect("pod spec");
    let c = pod.containers.iter().find(|c| c.name == "node").expect("node container").clone();
    img.check_common(&pod, &c);
    let argv = img.argv(&c);
    let http = c.ports.iter().flatten().find(|p| p.name.as_deref() == Some("http")).expect("http port").container_port;
    let ready_path =
        c.readiness_probe.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.clone()).expect("probe");
    let live_path =
        c.liveness_probe.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.clone()).expect("probe");

    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = dir.path().join("rootfs");
    img.unpack(&rootfs);
    copy_dir(&minilm(), &rootfs.join("models/all-minilm-l6-v2"));
    let probe = format!(
        "for i in $(seq 1 600); do kill -0 $pid || break; curl -fs -o /dev/null http://127.0.0.1:{http}{ready_path} && break; sleep 0.1; done; \
         curl -fsS http://127.0.0.1:{http}{ready_path} && curl -fsS http://127.0.0.1:{http}{live_path} && \
         curl -fsS -H 'content-type: application/json' -d '{{\"inputs\":[\"a pod started from the image\"]}}' \
           http://127.0.0.1:{http}/embed | head -c 120"
    );
    let (ok, out, log) = run_in_image(&rootfs, pod_uid(&pod), &img.env(&c), &argv, &probe);
    assert!(ok, "prism-node from the image did not serve {ready_path} on the rendered args {argv:?}\nprobe: {out}\nnode log:\n{log}");
    assert!(out.contains("\"embeddings\""), "no embedding from the image's node: {out}\nnode log:\n{log}");
}

#[test]
fn node_image_runs_the_fetch_init_container_by_name() {
    let img = Image::load("prism-node");
    let objs = prism_operator::node::desired_objects(
        &node("oci://registry.example/models/minilm:v1"),
        &OperatorConfig::default(),
        None,
    )
    .expect("render");
    let pod = objs.deployment.spec.and_then(|s| s.template.spec).expect("pod spec");
    let init =
        pod.init_containers.iter().flatten().find(|c| c.name == "fetch-model").expect("fetch init container").clone();
    assert_eq!(init.image.as_deref(), Some(img.index_ref.as_str()), "the fetch step uses the node image");
    let mut argv = img.argv(&init);
    // Only the parse and the binary's start are checked here (no registry in this test): the
    // rendered subcommand with --help.
    argv.truncate(2);
    argv.push("--help".into());
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = dir.path().join("rootfs");
    img.unpack(&rootfs);
    let (ok, out, log) = run_in_image(&rootfs, pod_uid(&pod), &img.env(&init), &argv, "wait $pid");
    assert!(ok, "{out}");
    assert!(log.contains("--model-uri"), "`{}` from the image printed no usage:\n{log}", argv.join(" "));
}

#[test]
fn router_image_starts_with_the_operators_pod_spec() {
    let img = Image::load("prism-router");
    let cfg = OperatorConfig::default();
    assert_eq!(img.index_ref, cfg.router_image, "make images must build the reference the operator defaults to");
    let spec: MultimodalPipelineSpec =
        serde_json::from_value(serde_json::json!({"nodes": [{"name": "text-a", "required": true}]})).expect("pipeline");
    let mut p = MultimodalPipeline::new("docs", spec);
    p.metadata.namespace = Some("default".into());
    p.metadata.uid = Some("uid-p".into());
    let objs = prism_operator::pipeline::desired_objects(&p, &cfg, &RoutingTable::default(), &BTreeMap::new())
        .expect("render");
    let pod = objs.deployment.spec.and_then(|s| s.template.spec).expect("pod spec");
    let c = pod.containers.iter().find(|c| c.name == "router").expect("router container").clone();
    img.check_common(&pod, &c);

    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = dir.path().join("rootfs");
    img.unpack(&rootfs);
    // The ConfigMap's files where the pod mounts them.
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "config")
        .map(|m| m.mount_path.clone())
        .expect("config mount");
    for (k, v) in objs.config_map.data.iter().flatten() {
        let f = rootfs.join(mount.trim_start_matches('/')).join(k);
        std::fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
        std::fs::write(&f, v).expect("write config file");
    }
    // The tokens Secret the pod mounts (the pipeline's spec.auth): one token.
    let argv = img.argv(&c);
    if let Some(i) = argv.iter().position(|a| a == "--auth-token-file") {
        let f = rootfs.join(argv[i + 1].trim_start_matches('/'));
        std::fs::create_dir_all(f.parent().expect("parent")).expect("mkdir");
        std::fs::write(&f, "image-test-token\n").expect("write tokens");
    }
    // What the kubelet gives every pod: a service account and the API's address. Nothing listens
    // there inside the test's network namespace, as when the API server is briefly down: the
    // router must serve from its mounted table anyway.
    let sa = rootfs.join("var/run/secrets/kubernetes.io/serviceaccount");
    std::fs::create_dir_all(&sa).expect("mkdir");
    std::fs::write(sa.join("token"), "image-test").expect("token");
    std::fs::write(sa.join("namespace"), "default").expect("namespace");
    let ca = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=test-ca",
        ])
        .args(["-days", "1", "-keyout", "/dev/null", "-out"])
        .arg(sa.join("ca.crt"))
        .output()
        .expect("openssl");
    assert!(ca.status.success(), "openssl: {}", String::from_utf8_lossy(&ca.stderr));
    let mut env = img.env(&c);
    env.extend(["KUBERNETES_SERVICE_HOST=127.0.0.1".to_string(), "KUBERNETES_SERVICE_PORT=1".to_string()]);
    let port = c.ports.iter().flatten().next().expect("router port").container_port;
    let live = c.liveness_probe.as_ref().and_then(|p| p.http_get.as_ref()).and_then(|h| h.path.clone()).expect("probe");
    let probe = format!(
        "for i in $(seq 1 100); do kill -0 $pid || break; curl -fs -o /dev/null http://127.0.0.1:{port}{live} && break; sleep 0.1; done; \
         curl -fsS http://127.0.0.1:{port}{live}"
    );
    let (ok, out, log) = run_in_image(&rootfs, pod_uid(&pod), &env, &argv, &probe);
    assert!(ok, "prism-router from the image did not answer {live} on the rendered args {argv:?}\nprobe: {out}\nrouter log:\n{log}");
}

#[test]
fn operator_image_matches_the_chart() {
    let img = Image::load("prism-operator");
    let values: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("charts/prism/values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml parses");
    let repo = values["image"]["repository"].as_str().expect("image.repository");
    let chart: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo_root().join("charts/prism/Chart.yaml")).expect("Chart.yaml"),
    )
    .expect("Chart.yaml parses");
    let app_version = chart["appVersion"].as_str().expect("appVersion");
    assert_eq!(img.index_ref, format!("{repo}:{app_version}"), "the chart's default image is what make images builds");
    let port = values["metricsPort"].as_u64().expect("metricsPort");
    assert!(img.cfg()["ExposedPorts"].get(format!("{port}/tcp")).is_some(), "metricsPort {port} not exposed");
    assert_eq!(img.strings("Entrypoint"), vec!["/usr/local/bin/prism-operator".to_string()]);

    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = dir.path().join("rootfs");
    img.unpack(&rootfs);
    for f in std::fs::read_dir(repo_root().join("crds")).expect("crds/") {
        let f = f.expect("entry");
        let shipped = std::fs::read(rootfs.join("crds").join(f.file_name()));
        assert_eq!(
            shipped.ok(),
            Some(std::fs::read(f.path()).expect("crd")),
            "/crds/{:?} differs from crds/",
            f.file_name()
        );
    }
    // The chart runs the entrypoint with flags only; --help proves the binary and its libraries.
    let argv = vec!["/usr/local/bin/prism-operator".to_string(), "--help".into()];
    let (ok, out, log) = run_in_image(&rootfs, 65532, &img.strings("Env"), &argv, "wait $pid");
    assert!(ok, "{out}");
    assert!(log.contains("--metrics-addr"), "prism-operator from the image printed no usage:\n{log}");
}
