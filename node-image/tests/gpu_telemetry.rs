//! GPU telemetry on a CPU node: `/metrics` carries no `prism_node_gpu_` line at all (absent, not
//! zero, so the autoscaler ignores the GPU signal rather than reading an idle GPU), the usual
//! series are there, and the node says once, at info, why telemetry is off. The CUDA side is
//! checked on GPU machines by bench/gpu-telemetry.sh.

mod common;

use serde_json::json;

async fn check_cpu_node(device: &str) {
    let dir = common::minilm_dir();
    let log_dir = tempfile::tempdir().expect("tempdir");
    let log = log_dir.path().join("node.log");
    let args: Vec<String> = [
        "--listen",
        "127.0.0.1:0",
        "--node-name",
        "gpu-less",
        "--architecture",
        "bert",
        "--device",
        device,
        "--model-uri",
        &format!("file://{}", dir.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let node = common::spawn_node_logged(&args, &log);
    node.wait_ready().await;

    let c = reqwest::Client::new();
    let r = c.post(format!("{}/embed", node.http)).json(&json!({"inputs": ["a gpu-less node"]})).send().await;
    assert_eq!(r.expect("embed").status(), 200);
    let m = c.get(format!("{}/metrics", node.http)).send().await.expect("metrics").text().await.expect("text");

    let gpu: Vec<&str> = m.lines().filter(|l| l.contains("prism_node_gpu_")).collect();
    assert!(gpu.is_empty(), "--device {device}: GPU series on a CPU node: {gpu:?}");
    for series in [
        r#"prism_node_inflight{modality="text",node="gpu-less"} 0"#,
        r#"prism_node_request_duration_seconds_count{modality="text",node="gpu-less"} 1"#,
        "prism_node_queue_size{",
        "prism_node_batch_size_bucket{",
    ] {
        assert!(m.contains(series), "--device {device}: /metrics lacks {series}:\n{m}");
    }

    // Logged after the model loads and before /ready turns 200, so it is in the file by now.
    let text = std::fs::read_to_string(&log).expect("read log");
    let off: Vec<&str> = text.lines().filter(|l| l.contains("GPU telemetry off")).collect();
    assert_eq!(off.len(), 1, "--device {device}: want one 'GPU telemetry off' line, log:\n{text}");
    assert!(off[0].contains("INFO") && off[0].contains("not CUDA"), "{}", off[0]);
}

#[tokio::test]
async fn a_cpu_node_exports_no_gpu_series_and_says_why_once() {
    check_cpu_node("cpu").await;
    // `auto` resolves to CPU in a build without the `cuda` feature; with it, auto may pick a GPU.
    if !cfg!(feature = "cuda") {
        check_cpu_node("auto").await;
    }
}
