# `make run` and `make test` install what is missing (uv, then the locked environment) first.
SHELL := /bin/bash
PYTHON ?= python3
export UV_CACHE_DIR ?= $(HOME)/.cache/uv
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PYTHONUNBUFFERED := 1

BOOTSTRAP := .cache/bootstrap
UV := $(shell command -v uv 2>/dev/null || echo $(BOOTSTRAP)/bin/uv)
VENV := .venv/.installed

.PHONY: run test lint repro metrics plots clean

run: $(VENV)  ## run the whole pipeline on params.yaml and show the metrics
	$(UV) run --frozen --no-sync dvc repro
	$(UV) run --frozen --no-sync dvc metrics show

test: $(VENV)  ## lint, then run the test suite
	$(UV) run --frozen --no-sync ruff check src tests pipeline bench
	$(UV) run --frozen --no-sync pytest

lint: $(VENV)
	$(UV) run --frozen --no-sync ruff check src tests pipeline bench

plots: $(VENV)  ## render dvc plots to dvc_plots/index.html
	$(UV) run --frozen --no-sync dvc plots show

$(BOOTSTRAP)/bin/uv:
	$(PYTHON) -m venv $(BOOTSTRAP)
	$(BOOTSTRAP)/bin/pip install --quiet --disable-pip-version-check uv

$(VENV): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen
	@touch $@

clean:  ## remove pipeline outputs (keeps the DVC cache and the environment)
	rm -rf data/prepared models checkpoints metrics plots dvc_plots
