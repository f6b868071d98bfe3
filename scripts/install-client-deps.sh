#!/usr/bin/env bash
# Creates .cache/venv-clients with the client packages users already have, at pinned versions, so
# tests/clients/ proves compatibility with the real clients instead of hand-written JSON:
#   openai (the official Python package: embeddings with its default base64 encoding, models.list)
#   tritonclient[http,grpc] (Triton's client: the Open Inference Protocol v2 over HTTP, with the
#     binary tensor extension, and gRPC), with the numpy / grpcio / protobuf / geventhttpclient it
#     pulls pinned too, since they decide what goes on the wire
#   kserve (KServe's InferenceRESTClient, protocol v2; ~60 packages with its server side)
#   pytest (runs tests/clients/)
# Idempotent: a no-op (about a second) once the pinned versions are there.
#   bash scripts/install-client-deps.sh
#   .cache/venv-clients/bin/python -m pytest -q tests/clients
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${PRISM_CLIENTS_VENV:-$ROOT/.cache/venv-clients}"
PY="$VENV/bin/python"
# Pinned: a new client release that changes what it sends must be a deliberate bump here.
PINS=(openai==3.60.0 pytest==9.2.0 "tritonclient[http,grpc]==2.73.0" numpy==2.4.6 grpcio==1.85.3 protobuf==6.33.6
      geventhttpclient==2.6.1 kserve==0.21.0 httpx==0.29.0)
CHECK='import importlib.metadata as m, sys
# "name[extras]==version" -> {name: version}
want = {p.split("==")[0].split("[")[0]: p.split("==")[1] for p in sys.argv[1:]}
got = {k: m.version(k) for k in want}
assert got == want, got
print(", ".join(f"{k} {v}" for k, v in got.items()))'

if [ -x "$PY" ] && versions=$("$PY" -c "$CHECK" "${PINS[@]}" 2>/dev/null); then
  echo "client deps: ready in $VENV ($versions)"
  exit 0
fi
if [ ! -x "$PY" ]; then
  echo "client deps: creating venv $VENV"
  python3 -m venv "$VENV"
fi
echo "client deps: pip install ${PINS[*]}"
"$PY" -m pip install -q "${PINS[@]}"
versions=$("$PY" -c "$CHECK" "${PINS[@]}")
echo "client deps: ready in $VENV ($versions)"
