"""The four stages end to end on a tiny configuration, through the same CLI that DVC runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from contrastive import train
from contrastive.callbacks import Callback, TrainState
from contrastive.cli import main
from contrastive.config import load_params
from contrastive.data import prepare
from contrastive.layout import Layout
from contrastive.models import load_encoder
from contrastive.stages import pretrain as pretrain_stage
from tests.conftest import write_params

STAGES = ("prepare", "pretrain", "probe", "export")


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A project with the tiny params after the four stages, each run once through the CLI; the
    tests that read its outputs share it."""
    root = tmp_path_factory.mktemp("stages")
    write_params(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for stage in STAGES:
            assert main([stage]) == 0, stage
    yield root


def test_all_stages_produce_their_outputs(staged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(staged)
    for path in (
        "data/prepared/manifest.json",
        "models/encoder.pt",
        "checkpoints/last.pt",
        "models/probe.pt",
        "models/encoder.onnx",
        "plots/pretrain.csv",
        "plots/knn.csv",
        "plots/confusion.csv",
        "plots/embedding.png",
    ):
        assert (staged / path).is_file(), path

    pretrain = json.loads(Path("metrics/pretrain.json").read_text())
    report = json.loads(Path("reports/pretrain.json").read_text())
    assert pretrain["epochs"] == 3 and report["device"] == "cpu" and report["method"] == "simclr"
    assert report["images_per_s"] > 0 and report["collapse_reason"] is None
    assert report["knn_k"] == json.loads(Path("metrics/probe.json").read_text())["knn_k"] == 20
    assert pretrain["collapsed"] is False and 0.1 < pretrain["embedding_spread"] <= 2**0.5
    history = Path("plots/pretrain.csv").read_text().splitlines()
    assert history[0] == "epoch,loss,lr,images_per_s" and len(history) == 4
    assert [line.split(",")[0] for line in Path("plots/knn.csv").read_text().splitlines()] == [
        "epoch",
        "2",
        "3",
    ]

    probe = json.loads(Path("metrics/probe.json").read_text())
    for model in ("pretrained", "random_init", "raw_pixels"):
        assert 0.1 < probe[model]["linear_top1"] <= probe[model]["linear_top5"] <= 1.0
        assert 0.1 < probe[model]["knn_top1"] <= 1.0
    assert probe["gain_over_random"]["linear_top1"] == pytest.approx(
        probe["pretrained"]["linear_top1"] - probe["random_init"]["linear_top1"], abs=1e-5
    )
    confusion = Path("plots/confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and len(confusion) == probe["n_test"] + 1

    export = json.loads(Path("metrics/export.json").read_text())
    assert export["max_abs_diff"] <= 1e-4 and export["prediction_agreement"] == 1.0
    assert set(json.loads(Path("reports/export.json").read_text())["latency_ms"]) == {
        "ort_b1", "torch_b1", "ort_b256", "torch_b256"}
    for plot in ("plots/training.png", "plots/confusion.png"):
        assert Path(plot).read_bytes().startswith(b"\x89PNG"), plot


def _leaves(value: object) -> list[object]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    return [value]


def test_metrics_files_hold_only_numbers(staged: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `dvc metrics diff` and `dvc exp show` compare: numbers (and flags), never text or
    timings; those are in reports/ (the four stages' outputs, in ``staged``)."""
    monkeypatch.chdir(staged)
    for stage in ("pretrain", "probe", "export"):
        metrics = json.loads(Path(f"metrics/{stage}.json").read_text())
        for leaf in _leaves(metrics):
            assert leaf is None or isinstance(leaf, int | float), (stage, leaf)
        timings = {"images_per_s", "latency_ms", "export_seconds", "speedup_b1", "threads"}
        assert not timings & set(metrics), stage


def test_same_seed_same_result_and_resume_matches(workspace: Path) -> None:
    params = load_params("params.yaml")
    prepare(params.data, params.seed)
    assert main(["pretrain"]) == 0
    uninterrupted, _ = load_encoder("models/encoder.pt")
    first = json.loads(Path("metrics/pretrain.json").read_text())

    # the same params again, from scratch: identical weights and loss
    for path in ("checkpoints", "models"):
        for file in Path(path).glob("*"):
            file.unlink()
    assert main(["pretrain"]) == 0
    again, _ = load_encoder("models/encoder.pt")
    assert (
        json.loads(Path("metrics/pretrain.json").read_text())["final_loss"] == first["final_loss"]
    )
    for (name, a), b in zip(
        uninterrupted.state_dict().items(), again.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name

    # killed after epoch 1, started again: resumes and ends with the same weights
    # (a killed run leaves the previous outputs as they were)
    Path("checkpoints/last.pt").unlink()
    before = Path("models/encoder.pt").read_bytes()
    pretrain_stage.run(params, Layout(), stop_after_epoch=1)
    assert torch.load("checkpoints/last.pt", weights_only=True)["epoch"] == 1
    assert Path("models/encoder.pt").read_bytes() == before
    resumed_metrics = pretrain_stage.run(params, Layout())
    resumed, _ = load_encoder("models/encoder.pt")
    assert resumed_metrics["final_loss"] == first["final_loss"]
    for (name, a), b in zip(
        uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


class PoisonWeights(Callback):
    """Writes NaN into the first conv layer after ``after_steps`` steps: the next loss is NaN."""

    def __init__(self, after_steps: int) -> None:
        self.after_steps, self.steps = after_steps, 0

    def on_step_end(self, state: TrainState, step: int) -> None:
        self.steps += 1
        if self.steps == self.after_steps:
            with torch.no_grad():
                next(state.method.encoder.parameters()).fill_(float("nan"))


def test_nan_loss_stops_and_keeps_the_good_checkpoint(
    workspace: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["prepare"]) == 0
    params = load_params("params.yaml")
    steps_per_epoch = 1259 // 128
    with pytest.raises(train.TrainingDivergedError) as failure:
        pretrain_stage.run(params, Layout(), callbacks=[PoisonWeights(steps_per_epoch + 1)])
    assert "loss became nan in epoch 2" in str(failure.value)
    assert "epoch 1 is kept" in str(failure.value)
    assert torch.load("checkpoints/last.pt", weights_only=True)["epoch"] == 1
    assert not Path("models/encoder.pt").exists()


@pytest.mark.parametrize(
    ("overrides", "stage", "fragment"),
    [
        ({"train": {"batch_size": 5000}}, "pretrain", "train.batch_size: 5000 is larger"),
        ({"train": {"lr": -1}}, "pretrain", "train.lr"),
        ({"train": {"temperature": 0}}, "pretrain", "train.temperature"),
        ({"model": {"encoder": "vgg"}}, "pretrain", "model.encoder"),
        ({"data": {"source": "mnist"}}, "prepare", "data.source"),
        ({"data": {"source": "npz", "path": "missing.npz"}}, "prepare", "missing.npz"),
        ({"data": {"source": "imagefolder", "path": "empty"}}, "prepare", "empty"),
        ({"extra_section": {}}, "prepare", "unknown key 'extra_section'"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_outputs(
    workspace: Path, capsys: pytest.CaptureFixture, overrides: dict, stage: str, fragment: str
) -> None:
    Path("empty").mkdir()
    if stage == "pretrain":
        assert main(["prepare"]) == 0
        capsys.readouterr()
    write_params(workspace, overrides)
    assert main([stage]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err, err
    assert len(err.splitlines()) == 1
    assert not Path("models").exists() and not Path("checkpoints").exists()
