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
UI_PORT ?= 5000

.PHONY: run test lint repro metrics plots clean retrain serve ui bench bench-quality

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

bench: $(VENV)  ## the four CPU benchmarks, each against a reference in the same run (docs/benchmarks.md)
	$(UV) run --frozen --no-sync python bench/views.py
	$(UV) run --frozen --no-sync python bench/train_step.py
	$(UV) run --frozen --no-sync python bench/inference.py
	$(UV) run --frozen --no-sync python bench/pipeline.py

bench-quality: $(VENV)  ## the README's CIFAR recipe against lightly's (installs the bench group)
	$(UV) sync --frozen --group bench
	$(UV) run --frozen --no-sync python bench/quality.py

ui: $(VENV)  ## MLflow UI on the project's store (mlflow.db, mlartifacts/): http://127.0.0.1:$(UI_PORT)
	$(UV) run --frozen --no-sync mlflow ui --backend-store-uri sqlite:///mlflow.db \
		--artifacts-destination ./mlartifacts --host 127.0.0.1 --port $(UI_PORT)

retrain: $(VENV)  ## run the Prefect flow once and print its summary (ARGS="--set train.epochs=30")
	$(UV) run --frozen --no-sync python -m pipeline.retrain $(ARGS)

serve: $(VENV)  ## serve the flow on params.yaml's cron; a local Prefect server + UI on :4200
	$(UV) run --frozen --no-sync python -m pipeline.retrain serve $(ARGS)

$(BOOTSTRAP)/bin/uv:
	$(PYTHON) -m venv $(BOOTSTRAP)
	$(BOOTSTRAP)/bin/pip install --quiet --disable-pip-version-check uv

$(VENV): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --compile-bytecode
	@touch $@

clean:  ## remove pipeline outputs (keeps the DVC cache and the environment)
	rm -rf data/prepared models checkpoints metrics plots dvc_plots
