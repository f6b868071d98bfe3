"""Shared setup of tests/clients/: a real prism-node (all-MiniLM-L6-v2) and a real prism-router
(HTTP and gRPC) on loopback, nothing mocked, started once per test module.

PRISM_BIN_DIR overrides where prism-router and prism-node are looked up (default target/release,
or $CARGO_TARGET_DIR/release).
"""
import json
import math
import os
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / ".cache/models/all-minilm-l6-v2"
PIPELINE = "clients"
NODE = "minilm"


def bin_dir():
    if os.environ.get("PRISM_BIN_DIR"):
        return Path(os.environ["PRISM_BIN_DIR"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "release"


def start(args, timeout=180):
    """Start a Prism server, return (process, url, banner) once it printed `listening on URL`;
    banner holds the lines before it (`grpc listening on ADDR`)."""
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                         env={**os.environ, "RUST_LOG": "warn"})
    found = {"banner": []}

    def read():
        for line in p.stdout:
            if line.startswith("listening on "):
                found["url"] = line.split()[-1]
                return
            found["banner"].append(line.strip())

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    if "url" not in found:
        p.kill()
        raise RuntimeError(f"{args[0]} did not start: exit {p.poll()}")
    return p, found["url"], found["banner"]


def wait_ready(url, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url + "/ready", timeout=2).status == 200:
                return
        except (urllib.error.URLError, ConnectionError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}/ready not 200 within {timeout}s")


@pytest.fixture(scope="module")
def stack():
    """{"router": http URL, "grpc": host:port, "node": the node's URL}."""
    assert MODEL_DIR.is_dir(), f"{MODEL_DIR} missing: run `make models`"
    bins = bin_dir()
    for b in ("prism-router", "prism-node"):
        assert (bins / b).is_file(), f"{bins / b} missing: cargo build --release -p prism-router -p prism-node --bins"
    procs = []
    try:
        node, node_url, _ = start([str(bins / "prism-node"), "--listen", "127.0.0.1:0", "--node-name", NODE,
                                   "--architecture", "bert", "--model-uri", str(MODEL_DIR)])
        procs.append(node)
        wait_ready(node_url)
        tmp = tempfile.mkdtemp()
        table = Path(tmp) / "table.json"
        table.write_text(json.dumps({"pipeline": PIPELINE, "generation": 1, "modalities": {"text": [
            {"endpoint": node_url, "node": NODE, "revision": "r1", "weight": 1.0, "accuracy": 0.9, "ready": True}]}}))
        router, router_url, banner = start([str(bins / "prism-router"), "--listen", "127.0.0.1:0",
                                            "--grpc-listen", "127.0.0.1:0", "--routing-table", str(table)], timeout=30)
        procs.append(router)
        wait_ready(router_url, timeout=30)
        grpc = next(line.split()[-1] for line in banner if line.startswith("grpc listening on "))
        yield {"router": router_url, "node": node_url, "grpc": grpc}
    finally:
        for p in procs:
            p.kill()
            p.wait()


def norm(v):
    return math.sqrt(sum(x * x for x in v))


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (norm(a) * norm(b))


def node_embed(stack, texts):
    req = urllib.request.Request(stack["node"] + "/embed", data=json.dumps({"inputs": texts}).encode(),
                                 headers={"content-type": "application/json"})
    return json.load(urllib.request.urlopen(req))
