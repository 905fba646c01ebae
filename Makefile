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

.PHONY: run test test-services postgres remote push pull lint repro metrics plots clean retrain serve ui bench \
	bench-quality

run: $(VENV)  ## run the whole pipeline on params.yaml and show the metrics
	$(UV) run --frozen --no-sync dvc repro
	$(UV) run --frozen --no-sync dvc metrics show

test: $(VENV)  ## lint, then run the test suite
	$(UV) run --frozen --no-sync ruff check src tests pipeline bench
	$(UV) run --frozen --no-sync pytest

# PostgreSQL, an S3 server (moto), MLflow and Prefect servers, each started by the tests on
# 127.0.0.1 (tests/test_services.py); installs Debian's postgresql first if it is missing.
test-services: $(VENV) postgres  ## the tests against real servers (not part of `make test`)
	$(UV) run --frozen --no-sync pytest -m services

postgres:  ## install Debian's PostgreSQL server if initdb is missing (needs root or sudo)
	@if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; \
	then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
			postgresql; \
	fi

remote: $(VENV)  ## make DVC_REMOTE_URL (s3://BUCKET/PATH) the default DVC remote; S3_ENDPOINT for MinIO
	@test -n "$(DVC_REMOTE_URL)" || { echo "make remote: set DVC_REMOTE_URL=s3://BUCKET/PATH" >&2; exit 2; }
	$(UV) run --frozen --no-sync dvc remote add --default --force storage $(DVC_REMOTE_URL)
	$(if $(S3_ENDPOINT),$(UV) run --frozen --no-sync dvc remote modify storage endpointurl $(S3_ENDPOINT))

# `contrastive remote check` first: a remote without credentials, a missing bucket or an endpoint
# that does not answer is one line naming the setting (exit status 2), not DVC's long message.
push: $(VENV)  ## check the DVC remote (credentials, bucket), then dvc push every cached output
	$(UV) run --frozen --no-sync contrastive remote check
	$(UV) run --frozen --no-sync dvc push

pull: $(VENV)  ## check the DVC remote, then dvc pull every output (a fresh clone: no retraining)
	$(UV) run --frozen --no-sync contrastive remote check
	$(UV) run --frozen --no-sync dvc pull

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
	$(UV) sync --frozen --group services --group bench
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
	$(UV) sync --frozen --compile-bytecode --group services
	@touch $@

clean:  ## remove pipeline outputs (keeps the DVC cache and the environment)
	rm -rf data/prepared models checkpoints metrics plots dvc_plots
