#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh machine (idempotent, quick when done).
set -euo pipefail
need_apt=()
command -v prometheus >/dev/null || need_apt+=(prometheus)
command -v openssl >/dev/null || need_apt+=(openssl)
command -v curl >/dev/null || need_apt+=(curl)
# espeak-ng: the spoken digit names of the paired data set (scripts/make-digits-pairs.py).
command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
# postgresql: the memory store's PostgreSQL tests (memory/tests/postgres.rs) run initdb + postgres
# from /usr/lib/postgresql/*/bin (Debian keeps them off PATH).
compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || command -v postgres >/dev/null || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "apt: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
python3 -c 'import numpy, safetensors, tokenizers, sklearn' 2>/dev/null || {
  echo "pip: installing numpy safetensors tokenizers scikit-learn"
  # tokenizers: ids for tests/fixtures/reference/minilm.py; scikit-learn: the digits data set that
  # scripts/make-vision-model.py fits the vit-digits model on.
  python3 -m pip install -q numpy safetensors tokenizers scikit-learn
}
