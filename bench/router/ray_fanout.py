#!/usr/bin/env python3
"""Peer benchmark: Ray Serve doing the same 3-way fan-out as the Prism router, over the same nodes.

An ingress deployment (one replica) receives `{"inputs": {modality: text, ...}}`, calls
`POST {node}/embed` for every modality present concurrently (asyncio.gather over one aiohttp
session reused across requests), L2-normalises each vector, sums them with equal weights,
normalises the sum and returns `{"vector": [...], "modalities": {...}}` -- the fusion the Prism
router performs. One client in this script sends sequential requests through Serve's HTTP proxy
(bound to 127.0.0.1), exactly like the Rust side (`router/tests/bench_router.rs`):

  * p50 of each single-modality request, and the slowest of those p50s;
  * p50 of the full multi-modality request.

Progress goes to stderr. The LAST line on stdout is one JSON object:
  {"ray_fanout_p50_ms": ..., "ray_slowest_single_p50_ms": ..., "ray_fanout_vs_slowest": ...,
   "ray_version": "...", "requests": N, ...}
(plus informational keys: per-modality p50s and Ray/Serve startup seconds).

Usage:
  python bench/router/ray_fanout.py --node text=http://127.0.0.1:4001 \
      --node caption=http://127.0.0.1:4002 --node audio=http://127.0.0.1:4003 \
      [--text "..."] [--requests 30] [--warmup 10] [--port P] [--timeout-s 600]

Needs `pip install "ray[serve]"` (which brings aiohttp, starlette and numpy). Ray is started as a
private local instance (num_cpus=2, no dashboard, usage stats off, everything on 127.0.0.1) and is
always shut down (serve.shutdown(); ray.shutdown()) before the script exits, on error too.
Exit status: 0 ok, 1 benchmark/node failure, 2 usage or missing dependency, 124 overall timeout.
"""
import argparse
import http.client
import json
import math
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
APP_NAME = "prism_fanout"


class BenchError(Exception):
    """A failure that ends the benchmark with exit status 1 and a message on stderr."""


class OverallTimeout(Exception):
    """Raised from SIGALRM when --timeout-s has elapsed."""


def log(msg):
    print(f"[ray_fanout] {msg}", file=sys.stderr, flush=True)


def pct(xs, p):
    """Same index rule as the Rust bench: sorted[round((n-1)*p)], rounding half away from zero."""
    xs = sorted(xs)
    return xs[int(math.floor((len(xs) - 1) * p + 0.5))]


def l2norm(v):
    return math.sqrt(sum(x * x for x in v))


def fuse(vectors):
    """Equal-weight sum of L2-normalised vectors, L2-normalised (pure Python, for verification)."""
    acc = [0.0] * len(vectors[0])
    for v in vectors:
        n = l2norm(v)
        if not n > 0:
            raise BenchError("zero-norm embedding")
        for i, x in enumerate(v):
            acc[i] += x / n
    n = l2norm(acc)
    return [x / n for x in acc]


# ----------------------------------------------------------------------------- arguments


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--node", action="append", default=[], metavar="NAME=URL",
                    help="modality name and node base URL (repeatable), e.g. text=http://127.0.0.1:4001")
    ap.add_argument("--text", default="the quick brown fox jumps over the lazy dog")
    ap.add_argument("--requests", type=int, default=30, help="measured requests per measurement")
    ap.add_argument("--warmup", type=int, default=10, help="unmeasured requests before each measurement")
    ap.add_argument("--port", type=int, default=0, help="Serve HTTP proxy port (default: a free one)")
    ap.add_argument("--timeout-s", type=float, default=600.0, help="overall bound for the whole run")
    args = ap.parse_args(argv)

    if not args.node:
        ap.error("at least one --node NAME=URL is required")
    if args.requests < 1 or args.requests > 100000:
        ap.error("--requests must be in 1..100000")
    if args.warmup < 0 or args.warmup > 100000:
        ap.error("--warmup must be in 0..100000")
    if not 0 <= args.port <= 65535:
        ap.error("--port must be in 0..65535")
    if not args.timeout_s > 0:
        ap.error("--timeout-s must be > 0")

    nodes = {}
    for spec in args.node:
        name, sep, url = spec.partition("=")
        name, url = name.strip(), url.strip().rstrip("/")
        if not sep or not name or not url:
            ap.error(f"--node {spec!r}: expected NAME=URL")
        if name in nodes:
            ap.error(f"--node {name!r} given twice")
        u = urllib.parse.urlparse(url)
        if u.scheme != "http" or not u.hostname or not u.port:
            ap.error(f"--node {spec!r}: URL must be http://HOST:PORT")
        if u.hostname not in LOOPBACK_HOSTS:
            ap.error(f"--node {spec!r}: only loopback node URLs are allowed (127.0.0.1)")
        nodes[name] = url
    args.nodes = nodes
    return args


# ----------------------------------------------------------------------------- direct node calls


def node_get(url, timeout):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def node_embed(url, text, timeout):
    req = urllib.request.Request(url + "/embed", data=json.dumps({"inputs": [text]}).encode(),
                                 method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise BenchError(f"POST {url}/embed -> {e.code}: {e.read()[:300]!r}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise BenchError(f"POST {url}/embed failed: {e}") from None
    try:
        vec = [float(x) for x in body["embeddings"][0]]
    except (KeyError, IndexError, TypeError, ValueError):
        raise BenchError(f"POST {url}/embed: unexpected response {str(body)[:300]}") from None
    if not vec or not all(math.isfinite(x) for x in vec):
        raise BenchError(f"POST {url}/embed: empty or non-finite embedding")
    return vec


def check_nodes(nodes, text):
    """Every node ready and answering /embed; returns the direct embeddings for verification."""
    direct = {}
    for name, url in nodes.items():
        try:
            status, _ = node_get(url + "/ready", timeout=5)
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, OSError) as e:
            raise BenchError(f"node {name} at {url}: GET /ready failed: {e}") from None
        if status != 200:
            raise BenchError(f"node {name} at {url}: GET /ready -> {status}")
        direct[name] = node_embed(url, text, timeout=30)
        log(f"node {name} at {url}: ready, dim={len(direct[name])}")
    return direct


# ----------------------------------------------------------------------------- Serve app


def build_app(serve, nodes, call_timeout_s):
    """The ingress deployment, bound to the node URLs. Imports of aiohttp/numpy/starlette happen
    inside the replica process."""

    @serve.deployment(
        name="Fanout",
        num_replicas=1,
        max_ongoing_requests=64,
        ray_actor_options={"num_cpus": 0},  # don't reserve one of the two cores; nodes need them
    )
    class Fanout:
        def __init__(self, nodes, call_timeout_s):
            self.nodes = dict(nodes)
            self.call_timeout_s = float(call_timeout_s)
            self.session = None  # created lazily inside the replica's event loop, then reused

        def _session(self):
            import aiohttp

            if self.session is None or self.session.closed:
                self.session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.call_timeout_s),
                    connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=60),
                )
            return self.session

        async def _embed(self, session, modality, text):
            import numpy as np

            url = self.nodes[modality] + "/embed"
            t0 = time.perf_counter()
            async with session.post(url, json={"inputs": [text]}) as r:
                raw = await r.read()
                if r.status != 200:
                    raise RuntimeError(f"{modality}: POST {url} -> {r.status}: {raw[:300]!r}")
            ms = (time.perf_counter() - t0) * 1000.0
            body = json.loads(raw)
            vec = np.asarray(body["embeddings"][0], dtype=np.float64)
            norm = float(np.linalg.norm(vec))
            if vec.size == 0 or not np.isfinite(vec).all() or not norm > 0:
                raise RuntimeError(f"{modality}: POST {url} returned an empty/non-finite/zero vector")
            return vec / norm, {"node": body.get("node"), "dim": int(vec.size), "ms": round(ms, 3)}

        async def __call__(self, request):
            import asyncio

            import numpy as np
            from starlette.responses import JSONResponse

            try:
                payload = await request.json()
            except Exception:  # noqa: BLE001 - any parse failure is the client's
                return JSONResponse({"error": "body must be JSON"}, status_code=400)
            inputs = payload.get("inputs") if isinstance(payload, dict) else None
            if not isinstance(inputs, dict) or not inputs:
                return JSONResponse({"error": "inputs must be a non-empty object"}, status_code=400)
            unknown = sorted(set(inputs) - set(self.nodes))
            if unknown:
                return JSONResponse({"error": f"unknown modalities {unknown}"}, status_code=400)
            if not all(isinstance(v, str) for v in inputs.values()):
                return JSONResponse({"error": "inputs values must be strings"}, status_code=400)

            session = self._session()
            mods = list(inputs)
            results = await asyncio.gather(
                *(self._embed(session, m, inputs[m]) for m in mods), return_exceptions=True)
            errors = [f"{m}: {r!r}" for m, r in zip(mods, results) if isinstance(r, BaseException)]
            if errors:
                return JSONResponse({"error": "node call failed", "details": errors}, status_code=502)
            dims = {r[0].size for r in results}
            if len(dims) != 1:
                return JSONResponse({"error": f"dimension mismatch {sorted(dims)}"}, status_code=502)
            acc = np.zeros(dims.pop(), dtype=np.float64)
            for vec, _ in results:
                acc += 1.0 * vec  # equal weights
            acc /= np.linalg.norm(acc)
            return JSONResponse({"vector": acc.tolist(),
                                 "modalities": {m: r[1] for m, r in zip(mods, results)}})

    return Fanout.bind(nodes, call_timeout_s)


# ----------------------------------------------------------------------------- client


class Client:
    """One keep-alive HTTP/1.1 connection to the Serve proxy, sequential requests."""

    def __init__(self, port, timeout):
        self.port, self.timeout = port, timeout
        self.conn = None

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _once(self, path, body, method):
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
        headers = {"content-type": "application/json"} if body is not None else {}
        data = json.dumps(body).encode() if body is not None else None
        t0 = time.perf_counter()
        self.conn.request(method, path, body=data, headers=headers)
        r = self.conn.getresponse()
        raw = r.read()
        return r.status, raw, (time.perf_counter() - t0) * 1000.0

    def call(self, path, body=None, method="POST"):
        """(status, raw body, ms); one reconnect if the kept-alive connection was dropped."""
        try:
            return self._once(path, body, method)
        except (http.client.RemoteDisconnected, http.client.BadStatusLine,
                BrokenPipeError, ConnectionResetError):
            self.close()
            return self._once(path, body, method)
        except Exception:
            self.close()
            raise


def infer(client, inputs):
    status, raw, ms = client.call("/", {"inputs": inputs})
    if status != 200:
        raise BenchError(f"Serve request {sorted(inputs)} -> {status}: {raw[:600].decode(errors='replace')}")
    return raw, ms


def measure(client, inputs, warmup, requests, label):
    for _ in range(warmup):
        infer(client, inputs)
    lat = [infer(client, inputs)[1] for _ in range(requests)]
    p50 = pct(lat, 0.5)
    log(f"{label}: p50={p50:.2f} ms p90={pct(lat, 0.9):.2f} ms min={min(lat):.2f} ms "
        f"({warmup} warmup + {requests} measured)")
    return p50


def verify(client, text, nodes, direct):
    raw, _ = infer(client, {m: text for m in nodes})
    body = json.loads(raw)
    vec = body.get("vector")
    if not isinstance(vec, list) or not vec:
        raise BenchError(f"fused response has no vector: {raw[:300]!r}")
    if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in vec):
        raise BenchError("fused vector has non-finite values")
    norm = l2norm(vec)
    if abs(norm - 1.0) > 1e-3:
        raise BenchError(f"fused vector norm is {norm}, expected 1")
    if set(body.get("modalities", {})) != set(nodes):
        raise BenchError(f"fused response modalities {sorted(body.get('modalities', {}))} != {sorted(nodes)}")
    expected = fuse([direct[m] for m in nodes])
    if len(expected) != len(vec):
        raise BenchError(f"fused dim {len(vec)} != node dim {len(expected)}")
    cos = sum(a * b for a, b in zip(expected, vec))
    if cos < 0.9999:
        raise BenchError(f"fused vector differs from the locally fused node embeddings (cos={cos:.6f})")
    log(f"verified fused vector: dim={len(vec)} norm={norm:.6f} cos(local fusion)={cos:.6f}")


# ----------------------------------------------------------------------------- main


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def wait_proxy(client, deadline):
    while True:
        try:
            status, _, _ = client.call("/-/healthz", None, method="GET")
            if status == 200:
                return
        except OSError:
            client.close()
        if time.monotonic() > deadline:
            raise BenchError("Serve HTTP proxy did not become healthy")
        time.sleep(0.2)


def run(args, ray, serve, real_stdout):
    t_start = time.monotonic()
    nodes, text = args.nodes, args.text
    direct = check_nodes(nodes, text)

    port = args.port or free_port()
    log(f"starting Ray {ray.__version__} (num_cpus=2, no dashboard) ...")
    t0 = time.monotonic()
    ray.init(
        address="local",  # always a private instance, never an existing cluster
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=128 * 1024 * 1024,
        log_to_driver=False,
        configure_logging=True,
        logging_level="WARNING",
        _node_ip_address="127.0.0.1",
    )
    t_ray = time.monotonic() - t0
    log(f"Ray up in {t_ray:.1f} s; starting Serve on 127.0.0.1:{port} ...")
    t1 = time.monotonic()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(serve, nodes, call_timeout_s=30.0), name=APP_NAME, route_prefix="/")
    client = Client(port, timeout=60)
    try:
        wait_proxy(client, time.monotonic() + 120)
        t_serve = time.monotonic() - t1
        log(f"Serve app ready in {t_serve:.1f} s (Ray + Serve startup {t_ray + t_serve:.1f} s)")

        verify(client, text, nodes, direct)

        singles = {}
        for m in nodes:
            singles[m] = measure(client, {m: text}, args.warmup, args.requests, f"single {m}")
        slowest_mod = max(singles, key=singles.get)
        fan = measure(client, {m: text for m in nodes}, args.warmup, args.requests,
                      f"fan-out {'+'.join(nodes)}")
    finally:
        client.close()

    ratio = fan / singles[slowest_mod]
    log(f"fan-out p50 {fan:.2f} ms vs slowest single ({slowest_mod}) p50 {singles[slowest_mod]:.2f} ms "
        f"-> {ratio:.2f}x; total {time.monotonic() - t_start:.1f} s")
    result = {
        "ray_fanout_p50_ms": round(fan, 3),
        "ray_slowest_single_p50_ms": round(singles[slowest_mod], 3),
        "ray_fanout_vs_slowest": round(ratio, 3),
        "ray_version": ray.__version__,
        "requests": args.requests,
        "ray_single_p50_ms": {m: round(v, 3) for m, v in singles.items()},
        "ray_startup_s": round(t_ray + t_serve, 1),
    }
    real_stdout.write(json.dumps(result) + "\n")
    real_stdout.flush()


def shutdown(ray, serve):
    """serve.shutdown(); ray.shutdown() -- each attempted, each bounded."""
    signal.signal(signal.SIGALRM, _raise_timeout)
    steps = [("serve.shutdown", serve.shutdown)] if ray.is_initialized() else []
    for label, fn in steps + [("ray.shutdown", ray.shutdown)]:
        signal.alarm(60)
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - keep going to ray.shutdown
            log(f"{label} failed: {e!r}")
        finally:
            signal.alarm(0)
    if steps:
        log("Ray shut down")


def _raise_timeout(signum, frame):
    raise OverallTimeout()


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)

    # Nothing leaves the machine: no usage-stats reporting, and Ray's node address is the loopback
    # one (on Linux Ray otherwise advertises the host's routable IP, even for
    # _node_ip_address="127.0.0.1"; this switch is the one Ray uses on macOS/Windows to stay on
    # 127.0.0.1). Both must be set before `import ray`; Ray's subprocesses inherit them.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        from ray import serve
        import aiohttp  # noqa: F401 - needed inside the replica
        import numpy  # noqa: F401
        import starlette  # noqa: F401
    except ImportError as e:
        print(f"ray_fanout: cannot import Ray Serve ({e}); install it with: pip install \"ray[serve]\"",
              file=sys.stderr, flush=True)
        return 2

    # Keep stdout for the final JSON line only: Ray, its subprocesses and Serve log to fd 1 in
    # places, so point fd 1 at stderr for the run and write the result to a saved copy.
    sys.stdout.flush()
    real_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    def on_term(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGALRM, _raise_timeout)
    signal.alarm(max(1, int(math.ceil(args.timeout_s))))
    rc = 0
    try:
        run(args, ray, serve, real_stdout)
    except OverallTimeout:
        log(f"FAILED: overall timeout of {args.timeout_s:g} s reached")
        rc = 124
    except BenchError as e:
        log(f"FAILED: {e}")
        rc = 1
    except (KeyboardInterrupt, SystemExit) as e:
        log(f"interrupted ({e!r})")
        rc = 130 if isinstance(e, KeyboardInterrupt) else (e.code if isinstance(e.code, int) else 1)
    except Exception as e:  # noqa: BLE001 - report anything else loudly, then clean up
        log(f"FAILED: {type(e).__name__}: {e}")
        rc = 1
    finally:
        signal.alarm(0)
        shutdown(ray, serve)  # also when ray.init was interrupted half-way
        real_stdout.flush()
    return rc


if __name__ == "__main__":
    sys.exit(main())
