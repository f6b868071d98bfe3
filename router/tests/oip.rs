//! The Open Inference Protocol v2 on a real router and a real node (all-MiniLM-L6-v2): the REST
//! routes with JSON and binary tensors, their edge cases at the front door, and the gRPC
//! service. tests/clients/test_triton.py drives the same routes with the real tritonclient.

mod common;

use std::time::Duration;

use common::*;
use prism_router::oip_grpc::pb;
use serde_json::{json, Value};

fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client")
}

/// BYTES elements as the binary extension carries them: 4-byte little-endian length, bytes.
fn bytes_tensor(items: &[&str]) -> Vec<u8> {
    items.iter().flat_map(|s| [&(s.len() as u32).to_le_bytes()[..], s.as_bytes()].concat()).collect()
}

/// A binary-extension body: the JSON header, then `data`.
fn binary_body(head: &Value, data: &[u8]) -> (Vec<u8>, String) {
    let mut body = serde_json::to_vec(head).expect("json");
    let n = body.len();
    body.extend_from_slice(data);
    (body, n.to_string())
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let s = r.status().as_u16();
    let text = r.text().await.expect("body");
    (s, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{s}: not JSON ({e}): {text}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oip_rest_and_grpc_on_a_real_node() {
    let node = spawn_node("minilm", "text", "127.0.0.1:0");
    let dir = tempfile::tempdir().expect("tmp");
    let routes = json!({"pipeline": "p", "generation": 1, "modalities": {"text": [endpoint(&node, 1.0)]}});
    let router = router_on(dir.path(), &routes, None, &["--grpc-listen", "127.0.0.1:0", "--max-body-bytes", "65536"]);
    let (c, u) = (client(), router.url.clone());

    // Health and metadata.
    for p in ["/v2/health/live", "/v2/health/ready", "/v2/models/p/ready", "/v2/models/minilm/ready"] {
        assert_eq!(c.get(format!("{u}{p}")).send().await.expect(p).status().as_u16(), 200, "{p}");
    }
    let (s, v) = json_of(c.get(format!("{u}/v2")).send().await.expect("meta")).await;
    assert_eq!((s, v["name"].as_str()), (200, Some("prism-router")));
    assert_eq!(v["extensions"], json!(["binary_tensor_data"]));
    let (s, v) = json_of(c.get(format!("{u}/v2/models/p")).send().await.expect("model")).await;
    assert_eq!(s, 200);
    assert_eq!(v["inputs"], json!([{"name": "text", "datatype": "BYTES", "shape": [-1]}]));
    assert_eq!(v["outputs"], json!([{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]));
    let (s, v) = json_of(c.get(format!("{u}/v2/models/nope")).send().await.expect("404")).await;
    assert_eq!(s, 404);
    assert!(v["error"].as_str().expect("OIP error is a string").contains("p, text, minilm"), "{v}");
    assert_eq!(c.get(format!("{u}/v2/models/nope/ready")).send().await.expect("r").status().as_u16(), 404);

    // JSON in, JSON out; the same vector as /v1/embeddings.
    let texts = ["a dog in the snow", "a cat on a sofa"];
    let req = json!({"id": "r1", "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}]});
    let (s, v) = json_of(c.post(format!("{u}/v2/models/minilm/infer")).json(&req).send().await.expect("infer")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!((v["id"].as_str(), v["model_name"].as_str()), (Some("r1"), Some("minilm")));
    let out = &v["outputs"][0];
    assert_eq!(
        (out["name"].as_str(), out["datatype"].as_str(), &out["shape"]),
        (Some("embedding"), Some("FP32"), &json!([2, 384]))
    );
    let flat = floats(&out["data"]);
    let (_, e) =
        json_of(c.post(format!("{u}/v1/embeddings")).json(&json!({"input": texts})).send().await.expect("e")).await;
    for i in 0..2 {
        assert!(cosine(&flat[i * 384..(i + 1) * 384], &floats(&e["data"][i]["embedding"])) > 0.999_999);
    }

    // Binary in, binary out, through the pipeline model (one modality: the fused vector is it).
    let head = json!({"inputs": [{"name": "text", "shape": [2, 1], "datatype": "BYTES",
        "parameters": {"binary_data_size": bytes_tensor(&texts).len()}}],
        "outputs": [{"name": "embedding", "parameters": {"binary_data": true}}]});
    let (body, hlen) = binary_body(&head, &bytes_tensor(&texts));
    let r = c
        .post(format!("{u}/v2/models/p/infer"))
        .header("content-type", "application/octet-stream")
        .header("inference-header-content-length", &hlen)
        .body(body.clone())
        .send()
        .await
        .expect("binary infer");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    let n: usize = r.headers()["inference-header-content-length"].to_str().expect("h").parse().expect("n");
    let bytes = r.bytes().await.expect("body");
    let head_out: Value = serde_json::from_slice(&bytes[..n]).expect("json head");
    assert_eq!(head_out["outputs"][0]["parameters"]["binary_data_size"], 2 * 384 * 4);
    let vals: Vec<f32> = bytes[n..].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    assert_eq!(vals.len(), 2 * 384);
    for (a, b) in vals.iter().zip(&flat) {
        assert!((a - b).abs() < 1e-5);
    }
    // Without a Content-Type (what tritonclient sends) the binary extension is admitted too.
    let r =
        c.post(format!("{u}/v2/models/p/infer")).header("inference-header-content-length", &hlen).body(body.clone());
    assert_eq!(r.send().await.expect("no ctype").status().as_u16(), 200);

    // The front door: octet-stream only on infer and only with the extension's header.
    let infer = format!("{u}/v2/models/p/infer");
    for (url, ctype, with_header) in [
        (infer.clone(), "application/octet-stream", false),
        (infer.clone(), "text/plain", true),
        (infer.clone(), "multipart/form-data", true),
        (format!("{u}/v1/embeddings"), "application/octet-stream", true),
        (format!("{u}/v1/infer"), "application/octet-stream", true),
    ] {
        let mut r = c.post(&url).header("content-type", ctype).body(body.clone());
        if with_header {
            r = r.header("inference-header-content-length", &hlen);
        }
        let (s, v) = json_of(r.send().await.expect("415")).await;
        assert_eq!(s, 415, "{url} {ctype} {with_header}: {v}");
    }
    // The body limit holds for binary bodies (413, OIP's error shape).
    let huge = vec![b'x'; 70_000];
    let (s, v) = json_of(
        c.post(&infer)
            .header("inference-header-content-length", &hlen)
            .body([&body[..], &huge].concat())
            .send()
            .await
            .expect("413"),
    )
    .await;
    assert_eq!(s, 413, "{v}");
    assert!(v["error"].is_string(), "{v}");

    // Bad tensors: 400 naming the input.
    let bad = |head: Value, data: Vec<u8>| {
        let (body, n) = binary_body(&head, &data);
        c.post(&infer).header("inference-header-content-length", n).body(body).send()
    };
    let cases: Vec<(Value, Vec<u8>, &str)> = vec![
        (
            json!({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a"]}]}),
            vec![],
            "input 'text': shape [3] needs 3 elements",
        ),
        (
            json!({"inputs": [{"name": "text", "shape": [1], "datatype": "INT64", "data": [1]}]}),
            vec![],
            "input 'text': datatype INT64",
        ),
        (
            json!({"inputs": [{"name": "text", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}),
            vec![],
            "input 'text': datatype FP32 is not accepted here",
        ),
        (
            json!({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}),
            vec![],
            "input 'image': is not an input of model 'p'",
        ),
        (json!({"inputs": []}), vec![], "no inputs"),
        (json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES"}]}), vec![], "input 'text': has no data"),
        (
            json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 50}}]}),
            bytes_tensor(&["a"]),
            "input 'text': binary_data_size is 50",
        ),
        (
            json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}]}),
            [bytes_tensor(&["a"]), vec![0]].concat(),
            "belong to no input",
        ),
        (
            json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}]}),
            [&9u32.to_le_bytes()[..], b"a"].concat(),
            "claims 9 bytes",
        ),
        (
            json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 2}}]}),
            vec![0xff, 0xfe],
            "4-byte length",
        ),
        (
            json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5}}]}),
            [&1u32.to_le_bytes()[..], &[0xff]].concat(),
            "not UTF-8",
        ),
        (
            json!({"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}], "outputs": [{"name": "logits"}]}),
            vec![],
            "output 'logits'",
        ),
    ];
    for (head, data, want) in cases {
        let (s, v) = json_of(bad(head.clone(), data).await.expect("bad")).await;
        assert_eq!(s, 400, "{head}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| e.contains(want)), "{head}: want {want:?} in {v}");
    }
    let (s, v) =
        json_of(c.post(&infer).header("inference-header-content-length", "999999").body("{}").send().await.expect("h"))
            .await;
    assert_eq!(s, 400, "{v}");
    let (s, v) =
        json_of(c.post(format!("{u}/v2/models/nope/infer")).json(&json!({"inputs": []})).send().await.expect("nf"))
            .await;
    assert_eq!(s, 404, "{v}");

    // gRPC: raw contents (tritonclient's form) and typed contents give the same vectors.
    let addr = router.grpc_addr();
    let mut g =
        prism_router::oip_grpc::GrpcInferenceServiceClient::connect(format!("http://{addr}")).await.expect("connect");
    assert!(g.server_live(pb::ServerLiveRequest {}).await.expect("live").into_inner().live);
    assert!(g.server_ready(pb::ServerReadyRequest {}).await.expect("ready").into_inner().ready);
    let ready = g.model_ready(pb::ModelReadyRequest { name: "text".into(), version: String::new() }).await.expect("mr");
    assert!(ready.into_inner().ready);
    let md = g
        .model_metadata(pb::ModelMetadataRequest { name: "minilm".into(), version: String::new() })
        .await
        .expect("md")
        .into_inner();
    assert_eq!((md.inputs[0].datatype.as_str(), md.outputs[0].shape.as_slice()), ("BYTES", &[-1, 384][..]));
    let tensor = |contents| pb::model_infer_request::InferInputTensor {
        name: "text".into(),
        datatype: "BYTES".into(),
        shape: vec![2],
        parameters: Default::default(),
        contents,
    };
    let raw = pb::ModelInferRequest {
        model_name: "p".into(),
        id: "g1".into(),
        inputs: vec![tensor(None)],
        raw_input_contents: vec![bytes_tensor(&texts)],
        ..Default::default()
    };
    let a = g.model_infer(raw).await.expect("raw infer").into_inner();
    assert_eq!((a.id.as_str(), a.outputs[0].shape.as_slice()), ("g1", &[2, 384][..]));
    let typed = pb::ModelInferRequest {
        model_name: "minilm".into(),
        inputs: vec![tensor(Some(pb::InferTensorContents {
            bytes_contents: texts.iter().map(|t| t.as_bytes().to_vec()).collect(),
            ..Default::default()
        }))],
        ..Default::default()
    };
    let b = g.model_infer(typed).await.expect("typed infer").into_inner();
    // The pipeline's fused vector (one modality, renormalised) and the node's: the same direction.
    let f32s =
        |b: &[u8]| -> Vec<f32> { b.chunks_exact(4).map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]])).collect() };
    let (av, bv) = (f32s(&a.raw_output_contents[0]), f32s(&b.raw_output_contents[0]));
    assert_eq!((av.len(), bv.len()), (2 * 384, 2 * 384));
    for i in 0..2 {
        let r = i * 384..(i + 1) * 384;
        assert!(cosine(&av[r.clone()], &bv[r.clone()]) > 0.999_999);
        assert!(cosine(&bv[r.clone()], &flat[r]) > 0.999_999);
    }
    let nf =
        g.model_infer(pb::ModelInferRequest { model_name: "nope".into(), ..Default::default() }).await.expect_err("nf");
    assert_eq!(nf.code(), tonic::Code::NotFound);
    let mut wrong = pb::ModelInferRequest { model_name: "p".into(), inputs: vec![tensor(None)], ..Default::default() };
    wrong.inputs[0].datatype = "FP32".into();
    wrong.raw_input_contents = vec![vec![0; 8]];
    let e = g.model_infer(wrong).await.expect_err("bad datatype");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("input 'text'"), "{}", e.message());
}
