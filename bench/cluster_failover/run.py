#!/usr/bin/env python3
"""`make bench-cluster-failover`: kill -9 one of two prism-node containers on REAL pods under load.

Runs e2e/real-node/test_text_pipeline.py (real-node cluster of e2e/real-node/up.sh: kubelet +
containerd + runc inside netns prism-e2e-real; prism-operator; the text pipeline of
examples/real-cluster/text-pipeline.yaml with 2 replicas reading the model from a PVC) with a
longer load window, then appends its result line to bench/RESULTS.md under `## cluster-failover`.

Figures (all from one run, times from the SIGKILL of the node container's host PID):
  rewrite_ms        the router's GET /v1/routing-table (polled every 5 ms through the Service)
                    stops listing the pod ready: the operator saw the Pod turn NotReady and rewrote
                    the routing ConfigMap, which the router watches;
  endpointslice_ms  the `text` Service's EndpointSlice (API watch) marks the pod not ready;
  failed_requests   non-200 or client errors among `requests` (closed-loop clients through the
                    router's ClusterIP Service, from inside the netns);
  eject_ms          the router's own passive ejection (its `replica ejected` log line);
  rejoin_s          the restarted container back as ready in the EndpointSlice;
  operator_restart_failed / router_restart_failed / restart_requests
                    then, under the same load, `kubectl rollout restart` of the operator and of
                    the router Deployment: failed requests in each window (the test fails on any
                    for the operator, and on any after the router's rollout);
  autoscale_decided_s / autoscale_ready_s
                    builtin autoscaling on metrics a real Prometheus scraped from the pods: 4
                    clients on a 1..2 node with targetInflight 1; seconds from the load's start
                    until the operator set the Deployment to 2, and until the second pod was Ready.

Options after `--` go to the test (e.g. --clients 8 --warm-s 10 --after-s 20); --no-append skips
RESULTS.md. Needs root, the release binaries, target/images/*.tar and .cache/models.
"""
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "bench", "common"))
import prism_up as pu  # noqa: E402

TEST = os.path.join(ROOT, "e2e", "real-node", "test_text_pipeline.py")
RESULT = os.path.join(ROOT, ".cache", "e2e-real", "result.json")
KEY = "cluster-failover"
TITLE = "cluster-failover: kill -9 one of two text node containers on real pods (kubelet + containerd)"
INTRO = """\
`make bench-cluster-failover` (bench/cluster_failover/run.py, the same code as `make e2e-real`):
a one-node cluster with a real kubelet, containerd 2.4 and runc (e2e/real-node/up.sh, inside a
network namespace; kube-proxy nftables), prism-operator as a Deployment from its image (the
chart via `helm template`), the text pipeline of
examples/real-cluster/text-pipeline.yaml (2 replicas of all-MiniLM-L6-v2, 500m CPU each, model
from a hostPath PV through the PVC `models`). Closed-loop clients send POST /v1/embeddings
through the router's ClusterIP Service; after a warm period one node container's process gets
SIGKILL (host PID from `ctr -n k8s.io tasks ls`). `rewrite_ms`: kill -> the router's table (GET
/v1/routing-table, polled every 5 ms) no longer lists the pod ready (operator: Pod watch ->
routing ConfigMap -> router's watch). `endpointslice_ms`: kill -> the Service's EndpointSlice
marks it not ready (API watch). Both wait for the kubelet to notice the exit (PLEG relist, 1 s).
`eject_ms`: the router's passive ejection on the failed calls, before either. `rejoin_s`: the
restarted container ready again in the EndpointSlice. Failed = non-200 or client error, whole run.
`operator_restart_failed`, `router_restart_failed`: requests that failed, under the same load,
during `kubectl rollout restart` of the operator and then of the router Deployment (the old
router answers through its 5 s shutdown delay, telling clients to reconnect)."""


def main():
    argv = sys.argv[1:]
    append = "--no-append" not in argv
    argv = [a for a in argv if a not in ("--no-append", "--")]
    defaults = {"--clients": "4", "--warm-s": "10", "--after-s": "20"}
    for k, v in defaults.items():
        if not any(a == k or a.startswith(k + "=") for a in argv):
            argv += [k, v]
    # Only the failover phase is measured here; make e2e-real runs the broken-node checks.
    if "--skip-bad-inputs" not in argv:
        argv.append("--skip-bad-inputs")
    if os.path.exists(RESULT):
        os.remove(RESULT)
    load_before = os.getloadavg()[0]
    t = time.time()
    rc = subprocess.run([sys.executable, TEST, *argv]).returncode
    if not os.path.exists(RESULT):
        pu.fail(f"the test wrote no result (rc {rc}); see .cache/e2e-real/")
    with open(RESULT) as f:
        r = json.load(f)
    note = (f"{pu.cpu_model()} [{' '.join(pu.isa_flags())}], operator {r['operator']}, clients={r['clients']}, warm {r['warm_s']:g} s + {r['after_s']:g} s, "
            f"kube-proxy {r['proxy_mode']}, loadavg {load_before:.1f}->{os.getloadavg()[0]:.1f}")
    suffix = (f" pod Ready again {r['rejoin_pod_s']:.1f} s, router table {r['rejoin_table_s']:.1f} s;"
              f" cosine vs prism up {r['cos_min']:.6f}; whole run {time.time() - t:.0f} s")
    if append:
        pu.append_result(KEY, TITLE, INTRO, r["line"], pu.machine(note), suffix=suffix)
    print(r["line"], flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
