# make run:  set up .venv, then run the whole default pipeline (dvc repro)
# make test: set up .venv, then run the tests
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU build from this machine's disk; on a CUDA machine pass e.g. TORCH='torch==2.13.0'
# from a CUDA index. Never leave it unpinned: an unpinned torch is a multi-GB CUDA build.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.setup-done

export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE ?= 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup run test lint compile run-local clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

run: setup
	dvc repro
	@echo
	@echo "model:   artifacts/model (diffusers pipeline; StableDiffusionPipeline.from_pretrained)"
	@echo "grid:    artifacts/eval/grid.png   report: artifacts/eval/report.html"
	@echo "metrics: metrics/eval/metrics.json, metrics/train/train_metrics.json (commit them with dvc.lock)"
	@echo "publish: artifacts/publish/receipt.json -> artifacts/registry/"
	@dvc metrics show

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

compile: setup
	t2i pipeline compile

run-local: setup
	t2i pipeline run-local

clean:
	rm -rf artifacts data/shards data/latents
