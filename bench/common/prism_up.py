"""Helpers shared by the `prism up` benchmarks (bench/failover, bench/autoscale).

Standard library only:
- PrismUp: start `prism up` on a generated manifest in a temporary state folder, wait for
  `router: URL` and `ready in`, keep its stdout (timestamped), read state.json, stop with SIGTERM;
- Load: N closed-loop client threads sending POST /v1/infer, each result recorded with its time;
- call(): one JSON request; append_result(): a dated run line under its section of bench/RESULTS.md.

Times are time.monotonic() seconds throughout, so events from threads compare directly.
"""
import base64
import datetime
import http.client
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
DEFAULT_PRISM = os.path.join(TARGET, "release", "prism")
MODELS_DIR = os.path.join(ROOT, ".cache", "models")
RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")

now = time.monotonic


def log(msg):
    print(msg, flush=True)


def fail(msg):
    print(f"BENCH FAILED: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def sigterm_exits():
    """SIGTERM to the script unwinds through `finally` blocks (so prism up is always stopped)."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def check_prereqs(prism, models=("all-minilm-l6-v2",)):
    for b in (prism, os.path.join(os.path.dirname(prism), "prism-node"), os.path.join(os.path.dirname(prism), "prism-router")):
        if not os.access(b, os.X_OK):
            fail(f"{b} is missing: run `cargo build --release --workspace --bins` (or `make build`)")
    for m in models:
        if not os.path.isdir(os.path.join(MODELS_DIR, m)):
            fail(f"{os.path.join(MODELS_DIR, m)} is missing: run `make models`")


def b64(path):
    """A file's bytes as base64 text, as /embed and /v1/infer take images and audio."""
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


def call(url, body=None, timeout=10):
    """JSON request with urllib (`body`: an object, or bytes already encoded); returns (status,
    parsed body or text, seconds)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    req.add_header("content-type", "application/json")
    t = now()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw.decode(errors="replace")
    return status, parsed, now() - t


class KeepAlive:
    """One persistent HTTP/1.1 connection (reopened after any error): cheap enough to poll every
    few ms or to drive a closed loop on a 2-core machine without exhausting ephemeral ports."""

    def __init__(self, base_url, timeout, headers=None):
        u = urllib.parse.urlsplit(base_url)
        self.host, self.port, self.timeout = u.hostname, u.port, timeout
        self.headers = dict(headers or {})  # sent with every request (e.g. authorization)
        self.conn = None

    def request(self, method, path, body=None, extra_headers=True):
        """Returns (status, raw body). Raises on connection errors (after closing the connection).
        extra_headers=False leaves out the constructor's headers for this request."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            headers = {"content-type": "application/json"} if body is not None else {}
            if extra_headers:
                headers.update(self.headers)
            self.conn.request(method, path, body=body, headers=headers)
            r = self.conn.getresponse()
            return r.status, r.read()
        except Exception:
            self.close()
            raise

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class PrismUp:
    """`prism up -f MANIFEST --port 0 --state-dir DIR/state --models-dir .cache/models`, as a
    context manager that always stops it (SIGTERM, then SIGKILL and its recorded children)."""

    def __init__(self, prism, manifest_text, name, extra_args=(), ready_timeout=300, echo=True, port=0):
        self.prism = prism
        self.tmp = tempfile.mkdtemp(prefix=f"prism-bench-{name}-")
        self.state_dir = os.path.join(self.tmp, "state")
        self.manifest = os.path.join(self.tmp, "manifest.yaml")
        with open(self.manifest, "w") as f:
            f.write(manifest_text)
        self.extra_args = list(extra_args)
        self.port = port
        self.ready_timeout = ready_timeout
        self.echo = echo
        self.proc = None
        self.url = None
        self.lines = []  # (monotonic time, line) of prism up's stdout+stderr
        self._lock = threading.Lock()
        self._last_state = None
        self.ok = False

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()
        return False

    def start(self):
        args = [self.prism, "up", "-f", self.manifest, "--port", str(self.port), "--state-dir", self.state_dir,
                "--models-dir", MODELS_DIR, *self.extra_args]
        log(f"$ {' '.join(args)}")
        self.out = open(os.path.join(self.tmp, "prism-up.out"), "w")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     cwd=ROOT)
        ready = threading.Event()

        def pump():
            for line in self.proc.stdout:
                t = now()
                with self._lock:
                    self.lines.append((t, line.rstrip("\n")))
                self.out.write(f"{t:.3f} {line}")
                self.out.flush()
                if self.echo:
                    print("  | " + line.rstrip(), flush=True)
                m = re.match(r"router: (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                if self.url and line.startswith("ready in"):
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = now() + self.ready_timeout
        while not ready.wait(0.2):
            if self.proc.poll() is not None:
                fail(f"prism up exited with {self.proc.returncode} before it was ready (log: {self.out.name})")
            if now() > deadline:
                fail(f"prism up was not ready within {self.ready_timeout} s (log: {self.out.name})")
        return self.url

    def lines_since(self, t, pattern):
        """[(time, match)] for stdout lines at or after t matching the regex."""
        rx = re.compile(pattern)
        with self._lock:
            return [(lt, m) for lt, l in self.lines if lt >= t for m in [rx.search(l)] if m]

    def state(self):
        """state.json (rewritten atomically by prism up); the last good read if it is briefly absent."""
        try:
            with open(os.path.join(self.state_dir, "state.json")) as f:
                self._last_state = json.load(f)
        except (OSError, ValueError):
            if self._last_state is None:
                raise
        return self._last_state

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        log("stopping prism up (SIGTERM)")
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log("prism up did not stop within 30 s: SIGKILL, then its recorded replicas and Prometheus")
            self.proc.kill()
            self.proc.wait()
            self._kill_orphans()
        if self.ok:
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            log(f"logs and state kept in {self.tmp}")

    def _kill_orphans(self):
        st = self._last_state or {}
        pids = [r.get("pid") for n in st.get("nodes", []) for r in n.get("replicas", [])]
        pids.append(st.get("prometheus_pid"))
        for pid in filter(None, pids):
            if process_name(pid) in ("prism-node", "prometheus"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass


def process_name(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def kill9(pid, expect):
    """SIGKILL pid after checking it is the process we mean (its /proc comm)."""
    name = process_name(pid)
    if name != expect:
        fail(f"pid {pid} is {name!r}, expected {expect!r}; not killing it")
    os.kill(pid, signal.SIGKILL)


class Load:
    """`clients` closed-loop threads, each sending POST /v1/infer {"inputs": {"text": ...}} over
    its own keep-alive connection as soon as the previous answer arrived. Every request is kept as
    (start, end, outcome, detail): outcome `ok`, `degraded` (200 with a non-null `degraded`) or
    `failed` (non-2xx or an exception)."""

    def __init__(self, url, clients, timeout=30, tag="bench"):
        self.url, self.clients, self.timeout, self.tag = url, clients, timeout, tag
        self.records = []
        self._stop = threading.Event()
        self._threads = []

    def start(self):
        for i in range(self.clients):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self, i):
        c = KeepAlive(self.url, self.timeout)
        n = 0
        while not self._stop.is_set():
            body = json.dumps({"inputs": {"text": f"{self.tag} request {n} from client {i}: a dog runs in the snow"}})
            n += 1
            t0 = now()
            try:
                status, raw = c.request("POST", "/v1/infer", body)
                if 200 <= status < 300:
                    parsed = json.loads(raw)
                    deg = parsed.get("degraded") if isinstance(parsed, dict) else None
                    rec = ("degraded", json.dumps(deg)) if deg is not None else ("ok", "")
                else:
                    rec = ("failed", f"HTTP {status}: {raw[:200]!r}")
            except Exception as e:  # noqa: BLE001 - every client-side error counts as a failed request
                rec = ("failed", f"{type(e).__name__}: {e}")
            self.records.append((t0, now(), *rec))
        c.close()

    def stop(self, join_timeout=None):
        """Stops sending; waits for in-flight requests (at most the request timeout)."""
        self._stop.set()
        for t in self._threads:
            t.join(join_timeout if join_timeout is not None else self.timeout + 5)

    def stop_nowait(self):
        self._stop.set()

    def count(self, t_from=None, t_to=None):
        """{'requests', 'ok', 'degraded', 'failed'} for requests that started in [t_from, t_to)."""
        out = {"requests": 0, "ok": 0, "degraded": 0, "failed": 0}
        for t0, _, outcome, _ in list(self.records):
            if (t_from is None or t0 >= t_from) and (t_to is None or t0 < t_to):
                out["requests"] += 1
                out[outcome] += 1
        return out

    def latencies_ms(self, t_from=None, t_to=None):
        return sorted((t1 - t0) * 1e3 for t0, t1, o, _ in list(self.records)
                      if o != "failed" and (t_from is None or t0 >= t_from) and (t_to is None or t0 < t_to))

    def errors(self, limit=5):
        return [(t0, o, d) for t0, _, o, d in list(self.records) if o != "ok"][:limit]


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def cpu_model():
    """The CPU's model name, from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# The ISA flags that change which kernels run (dot products, matmuls): named on every result line,
# since the CPU under the benchmarks changes between machines.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "neon")


def isa_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in ISA_FLAGS if x in have]
    except OSError:
        pass
    return []


def machine(note=""):
    """Host, CPU model and ISA flags, CPUs, and the note (callers add the load average, which shows
    whether other work shared the CPUs)."""
    extra = f", {note}" if note else ""
    flags = " ".join(isa_flags()) or "no SIMD flags found"
    return f"{platform.node()} {platform.machine()} {cpu_model()} [{flags}] {os.cpu_count()} cpus{extra}"


def append_result(key, title, intro, line, machine_desc, suffix=""):
    """Adds `- DATE (MACHINE): `LINE`SUFFIX` at the end of the `## KEY: ...` section's `### Runs`
    list in bench/RESULTS.md, creating the section (title, intro, `### Runs`) when it is new."""
    entry = f"- {datetime.date.today()} ({machine_desc}): `{line}`{suffix}\n"
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    # By key (`## node: ...`) or, for a section whose title does not start with its key (the
    # sliding-window part of bench-models), by the whole title.
    start = next((i for i, l in enumerate(lines) if l.startswith(f"## {key}:") or l.strip() == f"## {title}"), None)
    if start is None:
        if not text.endswith("\n"):
            text += "\n"
        text += f"\n## {title}\n\n{intro.strip()}\n\n### Runs\n{entry}"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        insert = end
        while insert > start + 1 and not lines[insert - 1].strip():
            insert -= 1
        if not any(l.startswith("### Runs") for l in lines[start:end]):
            entry = f"\n### Runs\n{entry}"
        lines[insert:insert] = [entry]
        text = "".join(lines)
    with open(RESULTS, "w") as f:
        f.write(text)
    log(f"appended to {os.path.relpath(RESULTS, ROOT)} under `## {key}`")


def headline(args, key, title, intro, line, note, load_before, suffix=""):
    """Prints the benchmark's last line (`NAME: key=value ...`) and, unless --no-append, records it
    in bench/RESULTS.md with the machine, `note` and the load average before and after."""
    if not args.no_append:
        load = f"loadavg {load_before:.1f}->{os.getloadavg()[0]:.1f}"
        append_result(key, title, intro, line, machine(f"{note}, {load}"), suffix=suffix)
    print(line, flush=True)
