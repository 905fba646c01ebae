"""The DVC contract: `dvc repro` runs the stages, a second one does nothing, and a params change
reruns only the stages that read the changed key. Each run of `register` that sees a new pipeline
state adds exactly one version to the registry (a SQLite store outside the project). Params that a
stage refuses stop `dvc repro` with every output kept as it was."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import yaml

from contrastive.provenance import _dvc_outputs
from tests.conftest import make_dvc_project, new_store


def _run(args: list[str], cwd: Path, ok: bool = True) -> str:
    """Run a command with this environment's tools first on PATH; assert it succeeds (or, with
    ``ok=False``, that it fails); return its output."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert (done.returncode == 0) is ok, done.stdout + done.stderr
    return done.stdout + done.stderr


def _ran(output: str) -> set[str]:
    return {
        stage
        for stage in ("prepare", "pretrain", "probe", "export", "register")
        if f"Running stage '{stage}'" in output
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, mlflow_template: Path) -> Iterator[Path]:
    """A git + DVC project (conftest.make_dvc_project) with the tiny params; its MLflow store is
    a new SQLite file (a copy of the migrated template) in another temporary folder."""
    root = tmp_path_factory.mktemp("project")
    store = new_store(mlflow_template, tmp_path_factory.mktemp("mlflow"))
    make_dvc_project(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store)
        yield root


def _versions() -> dict[str, dict[str, str]]:
    """Tags of each registered version, by version number."""
    client = mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    found = client.search_model_versions("name = 'contrastive-encoder'")
    return {str(v.version): v.tags for v in found}


def test_repro_then_noop_then_only_stale_stages(project: Path) -> None:
    dvc = [sys.executable, "-m", "dvc"]
    stages = {"prepare", "pretrain", "probe", "export", "register"}
    assert _ran(_run([*dvc, "repro"], project)) == stages
    assert (project / "dvc.lock").is_file()
    report = json.loads((project / "reports" / "registry.json").read_text())
    assert report["decision"] == "promoted" and "champion" in report["aliases"]
    tags = _versions()["1"]  # traced to the commit and to the upstream dvc.lock entries
    assert len(tags["git.commit"]) == 40 and tags["git.dirty"] == "false"
    assert all(tags[f"dvc.lock.{s}"] != "unknown" for s in ("prepare", "pretrain", "export"))

    second = _run([*dvc, "repro"], project)
    assert _ran(second) == set() and len(_versions()) == 1

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["export"]["latency_repeats"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    # a params change is a new pipeline state (new latencies alone would not be one)
    assert _ran(_run([*dvc, "repro"], project)) == {"export", "register"}
    assert len(_versions()) == 2 and _versions()["2"]["git.changed"] == "params.yaml"

    params["probe"]["max_iter"] = 25
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    # export reruns only if the probe's weights changed, register only if an output changed
    ran = _ran(_run([*dvc, "repro"], project))
    assert {"probe"} <= ran <= {"probe", "export", "register"}
    assert len(_versions()) == 2 + ("register" in ran)

    metrics = _run([*dvc, "metrics", "show", "--json"], project)
    assert "linear_top1" in metrics and "max_abs_diff" in metrics
    for not_a_metric in ("latency_ms", "images_per_s", "method", "min_improvement", "run_id"):
        assert not_a_metric not in metrics, not_a_metric  # in reports/, which DVC does not compare

    # the plots page works offline: images only, no script from a CDN
    _run([*dvc, "plots", "show", "-o", "dvc_plots"], project)
    page = (project / "dvc_plots" / "index.html").read_text()
    assert "<script" not in page and "cdn" not in page
    for image in ("training.png", "confusion.png", "embedding.png"):
        assert image in page, image


def _output_files(project: Path) -> dict[str, str]:
    """sha256 of every file of every output that dvc.yaml declares, and of dvc.lock."""
    hashes = {}
    for declared in sorted(_dvc_outputs(project / "dvc.yaml") | {"dvc.lock"}):
        path = project / declared
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                name = file.relative_to(project).as_posix()
                hashes[name] = hashlib.sha256(file.read_bytes()).hexdigest()
    return hashes


def test_refused_params_lose_no_output(project: Path) -> None:
    """`dvc repro` with params that a stage refuses fails, and every output keeps its bytes, the
    `cache: false` metrics and plots (which `dvc checkout` could not restore) included."""
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "repro"], project)  # the whole pipeline, or nothing after the test above
    params_file = project / "params.yaml"
    good = params_file.read_text()
    before = _output_files(project)
    for path in ("data/prepared/train.npz", "models/encoder.pt", "models/encoder.onnx",
                 "metrics/pretrain.json", "plots/pretrain.csv", "plots/knn.csv",
                 "plots/embedding.png", "reports/registry.json"):
        assert path in before, path

    refused = [  # (section, key, value): the key named in the error
        ("train", "lr", -1),  # pretrain
        ("train", "batch_size", 100_000),  # pretrain, after reading the data
        ("data", "source", "mnist"),  # prepare
    ]
    for section, key, value in refused:
        params = yaml.safe_load(good)
        params[section][key] = value
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        output = _run([*dvc, "repro"], project, ok=False)
        assert f"{section}.{key}" in output and "exited with 2" in output, output
        assert _output_files(project) == before, f"{section}.{key}: outputs changed"

    params_file.write_text("")  # an emptied file is refused too, not run with code defaults
    output = _run([*dvc, "repro"], project, ok=False)
    assert "params.yaml" in output, output
    assert _output_files(project) == before
    params_file.write_text(good)
