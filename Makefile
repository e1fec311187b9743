# shadowgate: `make test` and `make demo` do all set-up on a fresh machine.
#   .venv with the package and its dev tools  ->  etcd/kube binaries built once into ~/.cache/shadowgate
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=
SCENARIO ?= promote

.PHONY: help setup binaries test test-protocols test-unit lint format crds protos demo clean dev-up dev-down bench-decision

help:
	@echo "make test            set up everything (venv, Go if missing, control plane, PostgreSQL, TimescaleDB), run the suite"
	@echo "make demo            the whole story on one machine: a candidate shadowed and promoted (SCENARIO=rollback: rolled back)"
	@echo "make test-protocols  the router in front of real MLServer, KServe and Triton servers and clients"
	@echo "make e2e             the kind-e2e story on a local node with real pods, no Docker (root): promote, then rollback"
	@echo "make lint            ruff, ruff format --check, mypy, the import contracts (.importlinter) and the stale-CRD check"
	@echo "make format          ruff --fix and ruff format"
	@echo "make crds            regenerate crds/ (and manifests/crds/) from the pydantic types"
	@echo "make protos          regenerate the router's Open Inference Protocol gRPC messages"
	@echo "make setup           only the venv (.venv) with the package and its dev and demo extras"
	@echo "make binaries        only the set-up: the control-plane binaries, PostgreSQL, TimescaleDB (cached)"
	@echo "make test-unit       the tests that need no API server or database"
	@echo "make dev-up|dev-down a local control plane and PostgreSQL for development (shadowgate dev up/down)"
	@echo "make bench-decision|bench-analysis|bench-router|bench-admission|bench-hostile|bench-operator  benchmarks (README: Benchmarks)"
	@echo "make clean           remove the venv and tool caches (not ~/.cache/shadowgate nor Go's caches)"

$(INSTALLED): pyproject.toml
	@$(PYTHON) hack/preflight.py  # Python >= 3.11, its venv module (python3.X-venv on Debian), disk space
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# setuptools' notice on every editable install of a multi-root project, not a problem: left out of the output
	PYTHONWARNINGS='ignore:Editable installation:UserWarning' $(BIN)/pip install --quiet -e '.[dev,demo]'
	@touch $@

setup: $(INSTALLED)

binaries: $(INSTALLED)
	$(BIN)/shadowgate dev build

test: binaries
	$(BIN)/pytest --durations=15 $(PYTEST_ARGS)

# The router in front of real MLServer, KServe and Triton servers with real clients (tests/protocols/); the
# servers' venvs are built once with uv and cached in ~/.cache/shadowgate/model-servers.
test-protocols: $(INSTALLED)
	$(BIN)/python -m tests.support.model_servers install
	$(BIN)/pytest -m protocols tests/protocols $(PYTEST_ARGS)

test-unit: $(INSTALLED)
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	$(BIN)/shadowgate crd --check

crds: $(INSTALLED)
	$(BIN)/shadowgate crd
	cp crds/*.yaml manifests/crds/  # kustomize reads nothing outside manifests/

# The router's copy of the Open Inference Protocol's gRPC messages (tests/unit/test_router_grpc_wire.py checks it is fresh).
protos: $(INSTALLED)
	$(BIN)/python -m grpc_tools.protoc -I router --python_out=router --pyi_out=router router/shadowgate_router/oip/inference.proto

format: $(INSTALLED)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# SCENARIO=promote (shadow a better model, promoted) or SCENARIO=rollback (canary a worse one, rolled back).
demo: binaries
	$(BIN)/shadowgate demo --scenario $(SCENARIO)

# 1,000 simulated rollouts per scenario: false promotions of identical models, samples to promote a better one.
bench-decision: $(INSTALLED)
	$(BIN)/python bench/decision/run.py

dev-up: binaries
	$(BIN)/shadowgate dev up

dev-down: $(INSTALLED)
	$(BIN)/shadowgate dev down

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# Analysis cost with 1M and 10M prediction rows (200k in a 30-day window), plain PostgreSQL and TimescaleDB; ~1 h.
.PHONY: bench-analysis
bench-analysis: $(INSTALLED)
	$(BIN)/python bench/analysis/run.py $(BENCH_ARGS)

# Router latency added at 500 req/s and maximum rate, against nginx with `mirror`; installs nginx and wrk (root).
.PHONY: bench-router
bench-router: $(INSTALLED)
	$(BIN)/python bench/router/run.py $(BENCH_ARGS)

# Invalid ShadowDeployments (tests/admission_cases.py) the API server refuses, with this CRD and the one before issue 12.
.PHONY: bench-admission
bench-admission: binaries
	$(BIN)/python bench/admission/run.py $(BENCH_ARGS)

# End to end on real pods without Docker (root): kubelet, containerd, kube-proxy, CoreDNS and kube-router's
# NetworkPolicy firewall on a local node, images built with buildah, the manifests applied as a user
# would, promote then rollback (hack/node-e2e.sh runs hack/e2e-scenario.sh, the script hack/kind-e2e.sh
# runs on kind). The node's own tests (pods, Services, DNS, NetworkPolicies enforced, teardown leaving
# the machine as it was) run first. Not root, or no
# containerd possible here: one line that says why, and a failure. The images are built (or found in
# the cache) before anything starts, so a missing TimescaleDB source fails at once; its release source
# is ../shared/vendor when there, as in .ci/run, unless SHADOWGATE_TIMESCALEDB_SOURCE names another.
.PHONY: e2e
ifeq ($(SHADOWGATE_TIMESCALEDB_SOURCE),)
ifneq ($(wildcard ../shared/vendor/SHA256SUMS),)
e2e: export SHADOWGATE_TIMESCALEDB_SOURCE := $(abspath ../shared/vendor)
endif
endif
e2e: $(INSTALLED)
	@$(BIN)/shadowgate node preflight
	$(BIN)/shadowgate node build
	$(BIN)/shadowgate node images
	$(BIN)/pytest -m node tests/node $(PYTEST_ARGS)
	hack/node-e2e.sh

# Production's latency through the router while a peer attacks it, and rows lost to a SIGKILL during a 60 s
# database outage (issue 12); about 6 minutes.
.PHONY: bench-hostile
bench-hostile: $(INSTALLED)
	$(BIN)/python bench/hostile/run.py $(BENCH_ARGS)

# One operator with 1,000 ShadowDeployments on the local control plane, baseline and current code: CPU,
# memory, API requests, time to Progressing, weight-change latency; ~25 min.
.PHONY: bench-operator
bench-operator: binaries
	$(BIN)/python bench/operator/run.py $(BENCH_ARGS)
