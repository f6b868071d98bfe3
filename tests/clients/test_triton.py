"""The real `tritonclient` package (HTTP and gRPC) against a real prism-router and prism-node
(all-MiniLM-L6-v2): the Open Inference Protocol v2 as Triton/KServe users call it, nothing
mocked, nothing hand-written on the wire.

Setup (once):  bash scripts/install-client-deps.sh && make models
               cargo build --release -p prism-router -p prism-node --bins
Run:           .cache/venv-clients/bin/python -m pytest -q tests/clients/test_triton.py
"""
import json
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import NODE, PIPELINE, cosine

TEXTS = ["a red bicycle leaning on a wall", "a cat asleep on a sofa", " "]


@pytest.fixture(scope="module")
def http(stack):
    return httpclient.InferenceServerClient(url=stack["router"].removeprefix("http://"))


@pytest.fixture(scope="module")
def grpc(stack):
    return grpcclient.InferenceServerClient(url=stack["grpc"])


def openai_embeddings(stack, texts, model=PIPELINE):
    req = urllib.request.Request(stack["router"] + "/v1/embeddings",
                                 data=json.dumps({"input": texts, "model": model}).encode(),
                                 headers={"content-type": "application/json"})
    return [d["embedding"] for d in json.load(urllib.request.urlopen(req))["data"]]


def text_input(mod, texts, binary=True):
    i = mod.InferInput("text", [len(texts)], "BYTES")
    arr = np.array([t.encode() for t in texts], dtype=np.object_)
    if mod is httpclient:
        i.set_data_from_numpy(arr, binary_data=binary)
    else:
        i.set_data_from_numpy(arr)
    return i


def test_server_live_ready_and_metadata(http, grpc):
    assert http.is_server_live() and http.is_server_ready()
    assert grpc.is_server_live() and grpc.is_server_ready()
    meta = http.get_server_metadata()
    assert meta["name"] == "prism-router" and "binary_tensor_data" in meta["extensions"], meta
    gmeta = grpc.get_server_metadata(as_json=True)
    assert gmeta["name"] == "prism-router" and gmeta["version"] == meta["version"]


def test_models_are_the_pipeline_its_modality_and_its_node(http, grpc):
    for name in [PIPELINE, "text", NODE]:
        assert http.is_model_ready(name) and grpc.is_model_ready(name), name
        m = http.get_model_metadata(name)
        assert m["name"] == name
        assert m["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}], m
        assert m["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}], m
        g = grpc.get_model_metadata(name, as_json=True)
        assert g["inputs"][0]["datatype"] == "BYTES" and g["outputs"][0]["shape"] == ["-1", "384"], g
    assert not http.is_model_ready("no-such-model")


@pytest.mark.parametrize("model", [NODE, PIPELINE])
def test_http_infer_text_matches_the_openai_route(http, stack, model):
    # The package's defaults: binary tensor data both ways.
    r = http.infer(model, [text_input(httpclient, TEXTS)], request_id="req-1")
    out = r.as_numpy("embedding")
    assert out.dtype == np.float32 and out.shape == (3, 384)
    assert r.get_response()["id"] == "req-1"
    ref = openai_embeddings(stack, TEXTS, model="text")
    for got, want in zip(out, ref):
        assert cosine(list(got), want) > 0.999999


@pytest.mark.parametrize("model", [NODE, PIPELINE])
def test_grpc_infer_text_matches_the_openai_route(grpc, stack, model):
    r = grpc.infer(model, [text_input(grpcclient, TEXTS)], request_id="req-2")
    out = r.as_numpy("embedding")
    assert out.shape == (3, 384)
    assert r.get_response().id == "req-2"
    for got, want in zip(out, openai_embeddings(stack, TEXTS, model="text")):
        assert cosine(list(got), want) > 0.999999


def test_binary_and_json_outputs_and_inputs_carry_the_same_vectors(http):
    binary = http.infer(NODE, [text_input(httpclient, TEXTS)],
                        outputs=[httpclient.InferRequestedOutput("embedding", binary_data=True)])
    as_json = http.infer(NODE, [text_input(httpclient, TEXTS)],
                         outputs=[httpclient.InferRequestedOutput("embedding", binary_data=False)])
    assert as_json.get_response()["outputs"][0]["data"][:3] == pytest.approx(
        list(binary.as_numpy("embedding")[0][:3]), abs=1e-6)
    # JSON inputs: the package sends no Content-Type, and the front door takes only JSON, so the
    # caller says it is JSON (a body without the binary extension header is held to the JSON rule).
    json_in = http.infer(NODE, [text_input(httpclient, TEXTS, binary=False)],
                         headers={"Content-Type": "application/json"})
    assert np.abs(json_in.as_numpy("embedding") - binary.as_numpy("embedding")).max() < 1e-6


def test_unknown_model_is_a_404_naming_the_models(http, grpc):
    with pytest.raises(InferenceServerException) as e:
        http.infer("gpt-4", [text_input(httpclient, ["x"])])
    assert e.value.status() == "404"
    assert f"{PIPELINE}, text, {NODE}" in e.value.message(), e.value.message()
    with pytest.raises(InferenceServerException) as e:
        grpc.infer("gpt-4", [text_input(grpcclient, ["x"])])
    assert e.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException):
        http.get_model_metadata("gpt-4")


def test_wrong_datatype_and_wrong_input_are_400s_naming_the_input(http, grpc):
    for mod, client in [(httpclient, http), (grpcclient, grpc)]:
        bad = mod.InferInput("text", [1, 2], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 2), dtype=np.float32))
        with pytest.raises(InferenceServerException) as e:
            client.infer(NODE, [bad])
        assert "input 'text'" in e.value.message() and "FP32" in e.value.message(), e.value.message()
        assert e.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")
        other = mod.InferInput("image", [1], "BYTES")
        other.set_data_from_numpy(np.array([b"x"], dtype=np.object_))
        with pytest.raises(InferenceServerException) as e:
            client.infer(NODE, [other])
        assert "input 'image'" in e.value.message() and "inputs: text" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        http.infer(NODE, [text_input(httpclient, ["x"])],
                   outputs=[httpclient.InferRequestedOutput("logits")])
    assert "'logits'" in e.value.message() and e.value.status() == "400"


KSERVE_SCRIPT = r"""
import asyncio, json, sys
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

url, model, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

async def run():
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    try:
        as_json = InferInput("text", [len(texts)], "BYTES", data=texts)
        binary = InferInput("text", [len(texts)], "BYTES")
        binary.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary_data=True)
        out = []
        for i in (as_json, binary):
            r = await client.infer(url, InferRequest(model_name=model, infer_inputs=[i]), model_name=model)
            out.append(r.outputs[0].as_numpy().tolist())
        return out
    finally:
        await client.close()

print(json.dumps(asyncio.run(run())))
"""


def test_kserve_python_client_json_and_binary(stack):
    """KServe's own client (`kserve.InferenceRESTClient`, protocol v2), which sends
    `application/json`, or `application/octet-stream` with the binary extension. In a process of
    its own: kserve and tritonclient.grpc both register `inference.*` in protobuf's global
    descriptor pool, and the second import fails with "duplicate symbol"."""
    import subprocess
    import sys

    texts = TEXTS[:2]
    out = subprocess.run([sys.executable, "-c", KSERVE_SCRIPT, stack["router"], NODE, json.dumps(texts)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    as_json, binary = json.loads(out.stdout)
    ref = openai_embeddings(stack, texts, model="text")
    for x, y, want in zip(as_json, binary, ref):
        assert len(x) == len(y) == 384
        assert cosine(x, want) > 0.999999 and cosine(y, want) > 0.999999
