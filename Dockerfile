# syntax=docker/dockerfile:1.7
# An image that runs the Prefect retrain flow (pipeline/), and so `dvc repro`, on the GPU or on
# the CPU; a Docker or Kubernetes work pool runs it (pipeline/prefect.yaml, deploy/compose.yaml).
#   docker build -t contrastive .                            # torch from uv.lock (PyPI: CUDA)
#   docker build -t contrastive:cpu --build-arg TORCH=cpu .  # torch from PyTorch's CPU index
#   docker run --gpus all \
#     -v $PWD/data/raw:/app/data/raw -v contrastive-dvc-cache:/app/.dvc/cache \
#     -v contrastive-checkpoints:/app/checkpoints -v contrastive-mlflow:/mlflow contrastive
# The volumes keep the raw data, the DVC cache (its run cache restores unchanged stages in a new
# container), the checkpoints (a retried pretraining resumes) and the MLflow store. Add
# `-e PREFECT_API_URL=http://HOST:4200/api` to report to a Prefect server; `... contrastive dvc
# repro` runs the pipeline without Prefect.
#
# Base: plain Ubuntu. PyPI's Linux torch wheels bring their own CUDA libraries (nvidia-* wheels,
# about 4 GB); a CUDA runtime base image would only add a second copy. The GPU driver comes from
# the host (`--gpus all`, NVIDIA Container Toolkit).
# TORCH=cpu: everything else from uv.lock, then torch and torchvision at the locked versions
# from PyTorch's CPU wheel index (no CUDA wheels, which make most of the 6.4 GB). That index is
# not PyPI; a build that cannot reach it keeps the default (TORCH=cuda runs on the CPU too).
ARG BASE_IMAGE=ubuntu:24.04

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM ${BASE_IMAGE}
ARG TORCH=cuda
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends git ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv

ENV UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_CACHE_DIR=/home/app/.cache/uv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_TRACKING_URI=sqlite:////mlflow/mlflow.db

# The user app, uid 1000 (the base image's `ubuntu` user, uid 1000, is removed first).
# The MLflow store lives outside the DVC workspace (/app), on its own volume.
COPY deploy/app-user.sh /usr/local/bin/app-user.sh
RUN sh /usr/local/bin/app-user.sh && mkdir -p /opt/venv /app /mlflow /home/app/.cache/uv \
    && chown -R app:app /opt/venv /app /mlflow /home/app/.cache
USER app
WORKDIR /app

# Dependencies first, so code changes do not reinstall torch. uv's downloads stay in a build
# cache mount: a rebuild after a lock change downloads only what changed, and the image holds
# no cache.
COPY --chown=app:app pyproject.toml uv.lock README.md ./
COPY --chown=app:app deploy/cpu-requirements.sh deploy/
RUN --mount=type=cache,target=/home/app/.cache/uv,uid=1000,gid=1000 \
    if [ "$TORCH" = cpu ]; then \
        sh deploy/cpu-requirements.sh > /tmp/requirements.txt 2> /tmp/torch.txt \
        && uv venv /opt/venv --python python3 \
        && uv pip install --python /opt/venv/bin/python -r /tmp/requirements.txt \
        && uv pip install --python /opt/venv/bin/python --index-url "$TORCH_CPU_INDEX" \
             $(sed 's/$/+cpu/' /tmp/torch.txt); \
    else \
        uv sync --frozen --no-dev --no-install-project --python python3; \
    fi
COPY --chown=app:app . .
# No .git in the image: DVC runs without an SCM. The volumes' folders exist, owned by app.
RUN --mount=type=cache,target=/home/app/.cache/uv,uid=1000,gid=1000 \
    if [ "$TORCH" = cpu ]; then \
        uv pip install --python /opt/venv/bin/python --no-deps .; \
    else \
        uv sync --frozen --no-dev --python python3; \
    fi \
    && dvc config --local core.no_scm true && mkdir -p data/raw .dvc/cache checkpoints

VOLUME ["/app/data/raw", "/app/.dvc/cache", "/app/checkpoints", "/mlflow"]
CMD ["python", "-m", "pipeline.retrain"]
