"""Live tracking: the pretraining run in MLflow while it trains, and register adopting it."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from contrastive import live, store
from contrastive.cli import main
from contrastive.config import load_params
from contrastive.layout import Layout
from contrastive.stages import pretrain as pretrain_stage
from contrastive.tracking import LIVE_TAG, STATE_TAG
from tests.conftest import new_store
from tests.test_tracking import make_project


@pytest.fixture
def tracked(workspace: Path, monkeypatch: pytest.MonkeyPatch, mlflow_template: Path) -> Path:
    """The tiny workspace, prepared, with live tracking on into its own SQLite store."""
    monkeypatch.setenv(live.ENV, "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", new_store(mlflow_template, workspace))
    assert main(["prepare"]) == 0
    return workspace


def runs() -> list:
    client = store.connect()
    experiment = client.get_experiment_by_name("contrastive")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def losses(run_id: str) -> list[tuple[int, float]]:
    history = store.connect().get_metric_history(run_id, "train/loss")
    return sorted((m.step, m.value) for m in history)


def test_pretrain_logs_each_epoch_while_it_trains(tracked: Path) -> None:
    assert main(["pretrain"]) == 0
    report = json.loads(Path("reports/pretrain.json").read_text())
    (run,) = runs()
    assert run.info.status == "FINISHED"
    assert run.data.tags[LIVE_TAG] == report["params_hash"]
    assert run.data.params["train.method"] == "simclr"
    csv_rows = Path("plots/pretrain.csv").read_text().splitlines()[1:]
    expected = [(int(r.split(",")[0]), float(r.split(",")[1])) for r in csv_rows]
    logged = losses(run.info.run_id)
    assert [step for step, _ in logged] == [step for step, _ in expected]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected])
    assert {"train/lr", "train/images_per_s", "train/knn_top1"} <= set(run.data.metrics)
    (dataset,) = run.inputs.dataset_inputs
    manifest = json.loads(Path("data/prepared/manifest.json").read_text())
    assert manifest["data_hash"].startswith(dataset.dataset.digest)


def test_a_resumed_pretraining_continues_its_run(tracked: Path) -> None:
    params = load_params("params.yaml")
    callback = live.LiveRun(params)
    assert pretrain_stage.run(params, Layout(), callbacks=[callback], stop_after_epoch=1)
    (stopped,) = runs()
    assert stopped.info.status == "FAILED" and len(losses(stopped.info.run_id)) == 1
    pretrain_stage.run(params, Layout(), callbacks=[live.LiveRun(params)])
    (finished,) = runs()
    assert finished.info.run_id == stopped.info.run_id
    assert finished.info.status == "FINISHED"
    assert [step for step, _ in losses(finished.info.run_id)] == [1, 2, 3]
    # the checkpoint is complete
    pretrain_stage.run(params, Layout(), callbacks=[live.LiveRun(params)])
    assert [run.info.run_id for run in runs()] == [finished.info.run_id]


def test_an_unreachable_store_never_stops_training(
    tracked: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    capsys.readouterr()
    assert main(["pretrain"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "live MLflow" in line]
    assert len(warnings) == 1 and "register will log the history" in warnings[0]
    assert Path("models/encoder.pt").is_file()


def test_register_adopts_the_live_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      mlflow_template: Path) -> None:
    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", new_store(mlflow_template, tmp_path))
    client = store.connect()
    experiment = store.ensure_experiment(client, "contrastive", store.tracking_uri())
    key = json.loads(Path("reports/pretrain.json").read_text())["params_hash"]
    with mlflow.start_run(experiment_id=experiment, tags={LIVE_TAG: key}) as pretraining:
        for epoch, loss in ((1, 5.0), (2, 4.5), (3, 4.2)):
            mlflow.log_metric("train/loss", loss, step=epoch)
    assert main(["register"]) == 0
    report = json.loads(Path("reports/registry.json").read_text())
    assert report["run_id"] == pretraining.info.run_id
    (run,) = runs()
    assert run.data.tags[STATE_TAG] and run.info.status == "FINISHED"
    assert losses(run.info.run_id) == [(1, 5.0), (2, 4.5), (3, 4.2)]  # not logged twice
    assert "probe.pretrained.linear_top1" in run.data.metrics
