# An image that runs the Prefect retrain flow (pipeline/), and so `dvc repro`, on the GPU, or on
# the CPU with the build argument; a Docker or Kubernetes work pool runs it (pipeline/prefect.yaml).
#   docker build -t contrastive .                                         # CUDA runtime base
#   docker build -t contrastive:cpu --build-arg BASE_IMAGE=python:3.11-slim .
#   docker run --gpus all \
#     -v $PWD/data/raw:/app/data/raw -v contrastive-dvc-cache:/app/.dvc/cache \
#     -v contrastive-checkpoints:/app/checkpoints -v contrastive-mlflow:/mlflow contrastive
# The volumes keep the raw data, the DVC cache (its run cache restores unchanged stages in a new
# container), the checkpoints (a retried pretraining resumes) and the MLflow store. Add
# `-e PREFECT_API_URL=http://HOST:4200/api` to report to a Prefect server; `... contrastive dvc
# repro` runs the pipeline without Prefect. The torch wheels in uv.lock carry their own CUDA
# libraries; the base image brings the rest.
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends git ca-certificates \
    && if ! command -v python3 >/dev/null; then \
         apt-get install -y --no-install-recommends python3 python3-venv; fi \
    && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv

ENV UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_TRACKING_URI=sqlite:////mlflow/mlflow.db

# The MLflow store lives outside the DVC workspace (/app), on its own volume.
RUN useradd --create-home --uid 1000 app && mkdir -p /opt/venv /app /mlflow \
    && chown app:app /opt/venv /app /mlflow
USER app
WORKDIR /app

# Dependencies first, so code changes do not reinstall torch.
COPY --chown=app:app pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project --python python3
COPY --chown=app:app . .
# No .git in the image: DVC runs without an SCM. The volumes' folders exist, owned by app.
RUN uv sync --frozen --no-dev --python python3 && dvc config --local core.no_scm true \
    && mkdir -p data/raw .dvc/cache checkpoints

VOLUME ["/app/data/raw", "/app/.dvc/cache", "/app/checkpoints", "/mlflow"]
CMD ["python", "-m", "pipeline.retrain"]
