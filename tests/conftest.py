"""Shared fixtures: a tiny configuration that runs every stage in seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("CONTRASTIVE_LIVE_TRACKING", "0")  # on in the tests of live tracking

TINY: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "data": {"source": "digits", "image_size": 8},
    "model": {
        "encoder": "small_cnn",
        "width": 8,
        "projection_hidden_dim": 32,
        "projection_dim": 16,
    },
    "train": {"epochs": 3, "batch_size": 128, "warmup_epochs": 1, "knn_every": 2},
    "probe": {"weight_decays": [0.0, 0.001], "max_iter": 30, "knn_k": 20},
    "export": {"latency_repeats": 2},
}


def write_params(folder: Path, overrides: dict[str, Any] | None = None) -> Path:
    """params.yaml: the project's file, with the tiny configuration and ``overrides`` on top."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for layer in (TINY, overrides or {}):
        for key, value in layer.items():
            if isinstance(value, dict):
                params.setdefault(key, {}).update(value)
            else:
                params[key] = value
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def make_dvc_project(root: Path) -> None:
    """Make ``root`` a committed git + DVC project with this repository's dvc.yaml, .dvcignore and
    code, and the tiny params."""
    shutil.copy(ROOT / "dvc.yaml", root)
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(root)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True)
    shutil.copy(ROOT / ".dvcignore", root)  # after dvc init, which writes its own
    for command in ([*git, "add", "-A"], [*git, "commit", "-q", "-m", "init"]):
        subprocess.run(command, cwd=root, check=True, capture_output=True)


MLFLOW_DB = "mlflow.db"


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store, created by MLflow once for the session. A new store runs
    all of MLflow's schema migrations (1 to 3 s each); tests that need a new store copy this file
    instead (:func:`new_store`), which MLflow opens as it is, in milliseconds."""
    import mlflow

    folder = tmp_path_factory.mktemp("mlflow-template")
    db = folder / MLFLOW_DB
    uri = f"sqlite:///{db}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)  # the default experiment's artifact location: here, not the test's
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments()  # the tracking store: creates and migrates the schema
        client.search_registered_models()  # the registry store, on the same schema
    return db


def new_store(template: Path, folder: Path) -> str:
    """A new MLflow store: ``folder``/mlflow.db, a copy of ``template`` (the session's migrated
    store, :func:`mlflow_template`); returns its ``sqlite:///`` URI."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, folder / MLFLOW_DB)
    return f"sqlite:///{folder / MLFLOW_DB}"


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project folder with the tiny params.yaml, made the working directory."""
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path
