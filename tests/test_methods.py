"""Every method through the same engine: it trains, it resumes exactly, bad params stop it early."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from contrastive.cli import main
from contrastive.config import METHODS, load_params
from contrastive.layout import Layout
from contrastive.methods import REGISTRY
from contrastive.stages import pretrain as pretrain_stage
from tests.conftest import write_params

# Small enough for seconds per run; moco's queue (384) is not full after the first epoch.
METHOD_PARAMS = {"moco": {"queue_size": 384}}
# clip: the digits with templated captions, a small GRU text tower
CLIP = {"data": {"source": "pairs", "vocab_size": 300},
        "model": {"text_encoder": "gru", "text": {"width": 16, "layers": 1}}}


def method_overrides(method: str) -> dict:
    train_section: dict = {"method": method}
    if method in METHOD_PARAMS:
        train_section[method] = METHOD_PARAMS[method]
    return {"train": train_section, **(CLIP if method == "clip" else {})}


def test_every_configured_method_is_registered() -> None:
    assert set(REGISTRY) == set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_resume_after_a_kill_is_exact(workspace: Path, method: str) -> None:
    """Killed after epoch 1 and started again, a run ends with the whole method state (encoder,
    heads, queues, momentum encoders) equal to that of an uninterrupted run."""
    write_params(workspace, method_overrides(method))
    assert main(["prepare"]) == 0
    params = load_params("params.yaml")
    metrics = pretrain_stage.run(params, Layout())
    assert metrics["method"] == method and metrics["final_loss"] < float("inf")
    uninterrupted = torch.load("checkpoints/last.pt", weights_only=True)

    Path("checkpoints/last.pt").unlink()
    assert pretrain_stage.run(params, Layout(), stop_after_epoch=1) == {"stopped_after_epoch": 1}
    assert torch.load("checkpoints/last.pt", weights_only=True)["epoch"] == 1
    resumed_metrics = pretrain_stage.run(params, Layout())
    resumed = torch.load("checkpoints/last.pt", weights_only=True)

    assert resumed_metrics["final_loss"] == metrics["final_loss"]
    def without_speed(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "images_per_s"} for row in history]

    assert without_speed(resumed["history"]) == without_speed(uninterrupted["history"])
    expected = uninterrupted["method"]
    assert resumed["method"].keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(resumed["method"][name], value), name


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"train": {"method": "byol"}}, "train.method"),
        ({"train": {"method": "simclr", "queue_size": 10}}, "belongs to train.moco"),
        ({"train": {"triplet": {"queue_size": 10}}}, "train.triplet.queue_size"),
        ({"train": {"method": "moco", "moco": {"queue_size": 0}}}, "train.moco.queue_size"),
        ({"train": {"method": "moco", "moco": {"queue_size": 64}}}, "at least train.batch_size"),
        ({"train": {"method": "moco", "moco": {"momentum": 1.0}}}, "train.moco.momentum"),
        ({"train": {"method": "triplet", "triplet": {"margin": 0}}}, "train.triplet.margin"),
        ({"train": {"method": "margin_pair", "margin_pair": {"margin": -1}}},
         "train.margin_pair.margin"),
        ({"train": {"warmup_epochs": 3}}, "train.warmup_epochs"),
        ({"train": {"method": "triplet", "learn_temperature": True}}, "train.learn_temperature"),
        ({"train": {"class_balance": "weights"}}, "train.class_balance"),
        ({"model": {"encoder": "vit_tiny", "patch_size": 3}}, "model.patch_size"),
    ],
)
def test_bad_method_params_stop_before_any_work(
    workspace: Path, capsys: pytest.CaptureFixture, overrides: dict, fragment: str
) -> None:
    assert main(["prepare"]) == 0
    capsys.readouterr()
    write_params(workspace, overrides)
    assert main(["pretrain"]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err, err
    assert len(err.splitlines()) == 1
    assert not Path("checkpoints").exists() and not Path("models").exists()
