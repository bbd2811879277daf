# Two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
MODEL_REPOSITORY ?= models
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
# Extra server flags, e.g. RUN_FLAGS="--port-file /tmp/ports.json --device cpu"
RUN_FLAGS ?=
# torch==2.13.0 comes from a CPU wheel on this machine's disk; an unpinned torch pulls CUDA builds.
PIP_INSTALL := $(BIN)/pip install --disable-pip-version-check -q

.PHONY: help venv install install-dev models run test test-fast test-unit test-integration lint format proto proto-check clean bench-env bench bench-quick evaluate

help:
	@echo "make run     install, build the bundled model repository if missing, start the server"
	@echo "make test    install everything and run the whole test suite"
	@echo "make test-fast  the unit tests that train and export nothing (under a minute)"
	@echo "make lint    ruff (lint + format check) and mypy --strict"
	@echo "make proto   regenerate service/gen and client/mcdropout_client/_gen from proto/"

$(PY):
	$(PYTHON) -m venv $(VENV)

# The server and the client distribution (client/: the `mcdropout` command, the examples,
# evaluation and tests use it), in one pip run so that they resolve together.
$(VENV)/.installed-run: pyproject.toml client/pyproject.toml | $(PY)
	$(PIP_INSTALL) -e '.[export]' -e ./client
	touch $@

$(VENV)/.installed-dev: pyproject.toml client/pyproject.toml | $(PY)
	$(PIP_INSTALL) -e '.[export,dev,eval]' -e ./client
	touch $@ $(VENV)/.installed-run

install: $(VENV)/.installed-run
install-dev: $(VENV)/.installed-dev

# Trains and exports the two example models (seeded) when the repository has none.
models: $(VENV)/.installed-run
	@if [ -z "$$(ls -d $(MODEL_REPOSITORY)/*/ 2>/dev/null)" ]; then \
		$(PY) -m export.examples --repository $(MODEL_REPOSITORY); \
	else echo "model repository $(MODEL_REPOSITORY) present: $$(ls -d $(MODEL_REPOSITORY)/*/ | xargs -n1 basename | tr '\n' ' ')"; fi

run: models
	$(PY) -m service --model-repository $(MODEL_REPOSITORY) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) $(RUN_FLAGS)

test: $(VENV)/.installed-dev deploy-tools kserve-env
	$(PY) -m pytest tests

# The kserve SDK (0.21) for tests/integration/test_kserve.py, in its own venv: it pins many
# packages the project's environment does not share. Without it that test skips, saying so.
KSERVE_VENV ?= .venv-kserve
$(KSERVE_VENV)/.installed: tests/compat/kserve-requirements.txt
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install --disable-pip-version-check -q -r tests/compat/kserve-requirements.txt
	touch $@

.PHONY: kserve-env
kserve-env: $(KSERVE_VENV)/.installed

# The unit tests that neither train nor export a model (marker "export" left out).
test-fast: $(VENV)/.installed-dev
	$(PY) -m pytest tests/unit -m "not export" -q

test-unit: $(VENV)/.installed-dev
	$(PY) -m pytest tests/unit

test-integration: $(VENV)/.installed-dev
	$(PY) -m pytest tests/integration

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: $(VENV)/.installed-dev
	$(PY) -m tools.protogen

proto-check: $(VENV)/.installed-dev
	$(PY) -m tools.protogen --check

# ---- Evaluation (evaluation/, results in docs/evaluation.md and docs/evaluation/*.png):
# Gal & Ghahramani's Boston protocol, digits calibration and OOD, convergence with T, all
# through a running server. About 5 minutes on 2 idle cores.
evaluate: $(VENV)/.installed-dev
	$(PY) -m evaluation

# ---- Benchmarks (bench/, results in docs/benchmarks.md)
MLSERVER_VENV ?= .venv-mlserver

# MLServer 1.7.1 for bench/service.py, in its own venv (it pins protobuf < 7 and fastapi < 0.116).
$(MLSERVER_VENV)/.installed: bench/mlserver/requirements.txt
	$(PYTHON) -m venv $(MLSERVER_VENV)
	$(MLSERVER_VENV)/bin/pip install --disable-pip-version-check -q -r bench/mlserver/requirements.txt
	touch $@

bench-env: $(MLSERVER_VENV)/.installed

# Engine (in process), realistic models (MobileNetV3-Small, EfficientNet-B0, a small BERT
# against PyTorch and deterministic passes) and service (gRPC, against a naive server and
# MLServer) benchmarks; writes docs/benchmarks.md and prints one JSON line of headline ratios.
bench: $(VENV)/.installed-dev bench-env
	$(PY) -m bench.run --real-repository $(REAL_REPOSITORY)

# A representative subset in about 5 minutes (once bench-env exists); it also writes
# docs/benchmarks.md, marked as the quick subset: commit only the full run's.
# REAL_REPOSITORY keeps the realistic models' exports (bench/real.py) for the next run.
REAL_REPOSITORY ?= build/bench-real-models
bench-quick: $(VENV)/.installed-dev bench-env
	$(PY) -m bench.run --quick --real-repository $(REAL_REPOSITORY)

# ---- GPU (CUDA): tests/gpu skip without a usable CUDA device; bench/gpu.py writes the section
# between <!-- gpu:begin --> and <!-- gpu:end --> of docs/benchmarks.md (bench.run keeps it).
# GPU_REPOSITORY: benchmark models exported beforehand (python -m bench.gpu --prepare DIR);
# GPU_TEST_MODELS: test models exported beforehand (python -m tests.gpu.bundle DIR).
GPU_REPOSITORY ?=
GPU_BENCH_FLAGS ?=
.PHONY: test-gpu bench-gpu

# Without a usable CUDA device: one line saying why, exit 0 (pytest alone would exit 5, "no
# tests collected"). With one, every test runs and a failure fails the target.
test-gpu: $(VENV)/.installed-dev
	@reason="$$($(PY) -c 'from tests.gpu.cuda import skip_reason; print(skip_reason() or "")')" \
		|| { echo "test-gpu: cannot tell whether CUDA is usable (error above)"; exit 1; }; \
	if [ -n "$$reason" ]; then echo "no CUDA: tests/gpu skipped ($$reason)"; \
	else $(PY) -m pytest tests/gpu -v -rs; fi

# GPU_REAL_REPOSITORY: the realistic models (ResNet-50, ViT-B/16, BERT-base in fp32 and fp16,
# about 1.5 GB), exported on the GPU host on the first run and reused after
# (`python -m bench.gpu --prepare-real DIR` exports them alone).
GPU_REAL_REPOSITORY ?= build/bench-gpu-real-models
# About 9 minutes on one H100 with 16 cores once the realistic models are exported (--budget-s
# bounds the measuring; --json keeps the raw results and the headline).
bench-gpu: $(VENV)/.installed-dev
	$(PY) -m bench.gpu $(if $(GPU_REPOSITORY),--repository $(GPU_REPOSITORY)) \
		--real-repository $(GPU_REAL_REPOSITORY) $(GPU_BENCH_FLAGS)

clean:
	rm -rf $(VENV) $(MLSERVER_VENV) $(KSERVE_VENV) .mypy_cache .ruff_cache .pytest_cache

# ---- Deploy and monitor: Dockerfile, deploy/, docker-compose.yml (README "Deploy and monitor")
IMAGE ?= mcdropout:latest
# 1: the image carries the CUDA 13 / cuDNN 9 libraries; 0: a CPU-only image.
CUDA ?= 1
# Another base image (it must have Python 3.11 and venv), e.g. the local one of container-test.
BASE ?=
# A CA bundle for pip inside a buildah build, where HTTPS goes through an intercepting proxy.
BUILD_CA_BUNDLE ?=
# The local buildah/podman store of the container scripts (vfs; deploy/container/env.sh).
MCD_CONTAINER_STORE ?= /var/tmp/mcdropout-containers
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends
CONTAINER_TOOLS := buildah podman runc debootstrap

.PHONY: deploy-tools container-tools image test-deploy container-test

# prometheus and promtool for tests/deploy (the Debian package). Does nothing when present;
# installs them as root; otherwise says that their tests will skip (CI sets MCD_REQUIRE_TOOLS=1,
# which turns such a skip into a failure).
deploy-tools:
	@if command -v prometheus >/dev/null && command -v promtool >/dev/null; then \
		echo "prometheus $$(prometheus --version 2>&1 | head -n1 | cut -d' ' -f3) present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && $(APT_INSTALL) prometheus; \
	else echo "warning: prometheus/promtool missing (apt-get install prometheus as root):" \
		"the Prometheus tests of tests/deploy will skip"; fi

# Building and running the image without a Docker engine (needs root).
container-tools:
	@if command -v buildah >/dev/null && command -v podman >/dev/null && command -v runc >/dev/null \
		&& command -v debootstrap >/dev/null; then echo "$(CONTAINER_TOOLS) present"; \
	else apt-get update -q && $(APT_INSTALL) $(CONTAINER_TOOLS) fuse-overlayfs slirp4netns uidmap \
		containernetworking-plugins; fi

# The image, with docker when an engine answers, else with buildah; bakes in models/.
image: models
	IMAGE='$(IMAGE)' CUDA='$(CUDA)' BASE='$(BASE)' BUILD_CA_BUNDLE='$(BUILD_CA_BUNDLE)' \
		MCD_CONTAINER_STORE='$(MCD_CONTAINER_STORE)' deploy/build-image.sh

test-deploy: $(VENV)/.installed-dev
	$(PY) -m pytest tests/deploy

# Builds the CPU image from a local Debian base (debootstrap, buildah), runs it with podman:
# health check, Predict, metrics, a mounted repository, SIGTERM during a burst.
container-test: container-tools models $(VENV)/.installed-dev
	MCD_CONTAINER_TEST=1 MCD_CONTAINER_STORE='$(MCD_CONTAINER_STORE)' \
		$(PY) -m pytest tests/deploy/test_container.py -v
