"""Checkpoints are data, never code; a bad one stops the run with one line; only finite weights
are kept; a collapsed representation is flagged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from contrastive.cli import main
from contrastive.config import load_params
from contrastive.layout import Layout
from contrastive.stages import pretrain as pretrain_stage
from tests.conftest import write_params


class Planted:
    """Unpickling this object would create ``marker``: what an attacker's file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


@pytest.fixture
def prepared(workspace: Path) -> Path:
    assert main(["prepare"]) == 0
    return workspace


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("contrastive")]
    assert len(errors) == 1, err
    return errors[0]


def test_a_planted_pickle_never_runs(prepared: Path, capsys: pytest.CaptureFixture) -> None:
    marker = prepared / "pwned"
    Path("checkpoints").mkdir()
    torch.save({"run_key": Planted(marker), "epoch": 1}, "checkpoints/last.pt")
    capsys.readouterr()
    assert main(["pretrain"]) == 2
    line = one_error_line(capsys)
    assert "checkpoints/last.pt" in line and "delete it" in line
    assert not marker.exists()
    assert not Path("models/encoder.pt").exists()


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_corrupt_checkpoint_is_one_line_and_loses_nothing(
    prepared: Path, capsys: pytest.CaptureFixture, damage: str
) -> None:
    Path("models").mkdir()
    Path("models/encoder.pt").write_bytes(b"the encoder of an earlier run")
    pretrain_stage.run(load_params("params.yaml"), Layout(), stop_after_epoch=1)
    encoder = Path("models/encoder.pt").read_bytes()
    checkpoint = Path("checkpoints/last.pt")
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    capsys.readouterr()
    assert main(["pretrain"]) == 2
    line = one_error_line(capsys)
    assert "checkpoints/last.pt: not a readable checkpoint" in line and "delete it" in line
    assert Path("models/encoder.pt").read_bytes() == encoder


def test_a_diverging_run_keeps_only_finite_checkpoints(
    prepared: Path, capsys: pytest.CaptureFixture
) -> None:
    write_params(prepared, {"train": {"lr": 1e6}})
    capsys.readouterr()
    assert main(["pretrain"]) == 1
    line = one_error_line(capsys)
    assert "NaN or infinite" in line or "loss became" in line
    checkpoint = Path("checkpoints/last.pt")
    if checkpoint.exists():  # whatever was kept holds only finite values
        state = torch.load(checkpoint, weights_only=True)["method"]
        for name, value in state.items():
            if value.is_floating_point():
                assert torch.isfinite(value).all(), name
    assert not Path("models/encoder.pt").exists()


def test_a_collapsed_representation_is_flagged(
    prepared: Path, capsys: pytest.CaptureFixture
) -> None:
    write_params(prepared, {"train": {"lr": 1000}})
    capsys.readouterr()
    assert main(["pretrain"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: the representation collapsed" in err
    metrics = json.loads(Path("metrics/pretrain.json").read_text())
    assert metrics["collapsed"] is True and metrics["embedding_spread"] < 0.1
    reason = json.loads(Path("reports/pretrain.json").read_text())["collapse_reason"]
    assert "spread" in reason or "kNN" in reason
