"""Pieces every chaos scenario uses: closed-loop clients, polling, checked signals."""
import json
import os
import threading
import time
import urllib.error
import urllib.request

from prism_up import KeepAlive, fail, now, process_name


class Clients:
    """Closed-loop clients on POST /v1/infer; keeps (start, end, outcome, id, recorded)."""

    def __init__(self, url, n, tag):
        self.url, self.n, self.tag = url, n, tag
        self.records = []
        self.stop_ev = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(n)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def run(self, i):
        c = KeepAlive(self.url, 10)
        k = 0
        while not self.stop_ev.is_set() and k < 100_000:
            k += 1
            body = json.dumps({"inputs": {"text": f"{self.tag} client {i} request {k}: a dog runs in the snow"}})
            t0 = now()
            try:
                status, raw = c.request("POST", "/v1/infer", body)
                v = json.loads(raw) if 200 <= status < 300 else {}
                if 200 <= status < 300:
                    outcome = "degraded" if v.get("degraded") else "ok"
                else:
                    outcome = "failed"
                self.records.append((t0, now(), outcome, v.get("id"), v.get("recorded")))
            except Exception:  # noqa: BLE001 - any client-side error is a failed request
                c.close()
                c = KeepAlive(self.url, 10)
                self.records.append((t0, now(), "failed", None, None))
                time.sleep(0.02)  # a refused connection returns at once: do not spin
        c.close()

    def stop(self):
        self.stop_ev.set()
        for t in self.threads:
            t.join(15)

    def counts(self):
        out = {"requests": len(self.records), "failed": 0, "degraded": 0, "unrecorded": 0}
        for r in self.records:
            if r[2] in ("failed", "degraded"):
                out[r[2]] += 1
            if r[4] is False:
                out["unrecorded"] += 1
        return out

    def acked(self):
        return [r[3] for r in self.records if r[4] is True and r[3]]


def get(url, timeout=5):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def wait_until(cond, timeout):
    t0 = now()
    while now() - t0 < timeout:
        if cond():
            return (now() - t0) * 1000
        time.sleep(0.02)
    return None


def signal_checked(pid, sig, expect):
    if process_name(pid) != expect:
        fail(f"pid {pid} is {process_name(pid)!r}, expected {expect!r}; not signalling it")
    os.kill(pid, sig)
