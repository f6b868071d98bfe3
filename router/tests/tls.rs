//! Router -> node over TLS: a node serving HTTPS with a certificate from a test CA, a router
//! that trusts that CA (`--node-ca`), and what happens without it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl (scripts/install-deps.sh)");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA and a node certificate for 127.0.0.1 signed by it.
fn make_pki(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&["-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=prism test CA"]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend_from_slice(&ec);
    csr.extend_from_slice(&["-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=prism-node"]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "node.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "node.crt",
            "-days",
            "1",
            "-extfile",
            "ext",
        ],
    );
}

async fn wait_https_ready(client: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = client.get(format!("{url}/ready")).send().await {
            if r.status().is_success() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{url} not ready over TLS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn router_calls_a_tls_node_only_when_it_trusts_the_ca() {
    let dir = tempfile::tempdir().expect("tmp");
    make_pki(dir.path());
    let (crt, key, ca) = (dir.path().join("node.crt"), dir.path().join("node.key"), dir.path().join("ca.crt"));
    let node = spawn_node_with(
        "minilm-tls",
        &[
            "--node-name",
            "minilm-tls",
            "--architecture",
            "bert",
            "--tls-cert",
            crt.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        &model_dir(),
    );
    assert!(node.url.starts_with("https://127.0.0.1:"), "{}", node.url);
    let ca_pem = std::fs::read(&ca).unwrap();
    let trusting = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem).unwrap())
        .build()
        .unwrap();
    wait_https_ready(&trusting, &node.url).await;

    // Plain HTTP to the TLS port gets no answer.
    let plain = reqwest::Client::new();
    let http_url = node.url.replace("https://", "http://");
    let r = plain.get(format!("{http_url}/ready")).timeout(Duration::from_secs(5)).send().await;
    assert!(r.map(|r| !r.status().is_success()).unwrap_or(true), "plain HTTP must not be served");

    let routes = json!({"pipeline": "tls", "generation": 1, "modalities": {"text": [endpoint(&node, 1.0)]}});
    // As the operator passes it: one --node-ca per HTTPS node, here an unrelated CA first.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    openssl(
        &other,
        &["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "ca.key"]
            .into_iter()
            .chain(["-out", "ca.crt", "-days", "1", "-subj", "/CN=another node's CA"])
            .collect::<Vec<_>>(),
    );
    let other_ca = other.join("ca.crt");
    let router = router_on(
        dir.path(),
        &routes,
        None,
        &["--node-ca", other_ca.to_str().unwrap(), "--node-ca", ca.to_str().unwrap()],
    );
    let r = plain
        .post(format!("{}/v1/infer", router.url))
        .json(&json!({"inputs": {"text": "over TLS"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["modalities"]["text"]["embedding"].as_array().unwrap().len(), 384);

    // A router that does not trust the CA refuses the node: 503 naming the modality.
    let other = tempfile::tempdir().expect("tmp");
    write_json(&other.path().join("table.json"), &routes);
    let untrusting = spawn_router(&["--routing-table", other.path().join("table.json").to_str().unwrap()]);
    let r = plain
        .post(format!("{}/v1/infer", untrusting.url))
        .json(&json!({"inputs": {"text": "x"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].as_str().unwrap().contains("text"), "{v}");
}

#[test]
fn bad_tls_files_stop_the_node_with_the_reason() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("junk.pem"), "not a certificate").unwrap();
    let junk = dir.path().join("junk.pem");
    for (cert, key, want) in
        [(dir.path().join("missing.crt"), junk.clone(), "--tls-cert"), (junk.clone(), junk.clone(), "--tls-cert")]
    {
        let out = Command::new(node_bin())
            .args(["--listen", "127.0.0.1:0", "--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()])
            .arg("--model-uri")
            .arg(model_dir())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{err}");
    }
    let out = Command::new(node_bin())
        .args(["--listen", "127.0.0.1:0", "--tls-cert", junk.to_str().unwrap()])
        .arg("--model-uri")
        .arg(model_dir())
        .output()
        .unwrap();
    assert!(!out.status.success(), "--tls-cert without --tls-key is refused");
}
