"""What the training loop's extras cost, and how the loop accounts for them.

``fit`` times the views, the steps and every callback (``TrainState.seconds``, written to
``reports/pretrain.json``), which is how ``bench/pretrain_overhead.py`` says where an epoch goes;
the kNN monitor computes its features in the training's precision.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contrastive import paths, train
from contrastive.batches import Batch, InMemoryBatches
from contrastive.callbacks import Callback, TrainState
from contrastive.config import load_params
from contrastive.data import prepare
from contrastive.features import extract_features
from contrastive.layout import Layout
from contrastive.models import SmallCNN
from contrastive.runtime import Runtime
from contrastive.stages import pretrain as pretrain_stage

VIEW_DELAY, EPOCH_DELAY, STEP_DELAY = 0.02, 0.05, 0.01


class SlowViews:
    """The batches of ``batches``, each handed out ``VIEW_DELAY`` seconds late."""

    def __init__(self, batches: InMemoryBatches) -> None:
        self.batches = batches
        self.steps_per_epoch = batches.steps_per_epoch

    def epoch(self, epoch: int) -> Iterator[Batch]:
        for batch in self.batches.epoch(epoch):
            time.sleep(VIEW_DELAY)
            yield batch


class SlowAtEpochEnd(Callback):
    def on_epoch_end(self, state: TrainState, record: dict[str, Any]) -> None:
        time.sleep(EPOCH_DELAY)


class SlowAfterEachStep(Callback):
    def on_step_end(self, state: TrainState, step: int) -> None:
        time.sleep(STEP_DELAY)


def test_fit_accounts_for_the_views_the_steps_and_each_callback(workspace: Path) -> None:
    params = load_params("params.yaml")
    prepare(params.data, params.seed)
    state, batches = train.build_run(params, train.TrainingData.load(paths.PREPARED),
                                     Runtime.resolve(params))
    slow_views = SlowViews(batches)
    train.fit(state, slow_views, 0.1, 1, [SlowAtEpochEnd(), SlowAfterEachStep()])

    epochs, steps, seconds = state.epochs, state.epochs * state.steps_per_epoch, state.seconds
    assert set(seconds) == {"views", "steps", "SlowAtEpochEnd", "SlowAfterEachStep"}
    assert VIEW_DELAY * steps <= seconds["views"] < VIEW_DELAY * steps + 1.0
    assert EPOCH_DELAY * epochs <= seconds["SlowAtEpochEnd"] < EPOCH_DELAY * epochs + 0.5
    assert STEP_DELAY * steps <= seconds["SlowAfterEachStep"] < STEP_DELAY * steps + 0.5
    assert seconds["steps"] > 0
    # images/s covers the views, the steps and the per-step callbacks, not the epoch's end
    in_epochs = sum(state.steps_per_epoch * state.images_per_step / r["images_per_s"]
                    for r in state.history)
    per_step = seconds["views"] + seconds["steps"] + seconds["SlowAfterEachStep"]
    assert per_step <= in_epochs * 1.01 + 0.01
    assert in_epochs < per_step + seconds["SlowAtEpochEnd"] * 0.5


def test_pretrain_reports_where_its_time_went(workspace: Path) -> None:
    params = load_params("params.yaml")
    prepare(params.data, params.seed)
    result = pretrain_stage.run(params, Layout())
    seconds = result["seconds"]
    assert {"views", "steps", "KnnMonitor", "ProgressBar", "Checkpointer"} <= set(seconds)
    assert all(value >= 0 for value in seconds.values())
    assert seconds["steps"] > seconds["ProgressBar"]


def test_monitor_features_in_bf16_and_channels_last_match_fp32() -> None:
    torch.manual_seed(0)
    encoder = SmallCNN(8)
    images = np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    mean, std, cpu = [0.5] * 3, [0.25] * 3, torch.device("cpu")
    fp32 = extract_features(encoder, images, mean, std, cpu, 32)
    channels_last = extract_features(encoder.to(memory_format=torch.channels_last), images,
                                     mean, std, cpu, 32, memory_format=torch.channels_last)
    bf16 = extract_features(encoder, images, mean, std, cpu, 32, bf16=True,
                            memory_format=torch.channels_last)
    assert fp32.dtype == bf16.dtype == torch.float32 and fp32.shape == bf16.shape == (64, 32)
    torch.testing.assert_close(channels_last, fp32, rtol=1e-4, atol=1e-5)
    assert not torch.equal(bf16, fp32)  # it did run in bf16
    cosine = torch.nn.functional.cosine_similarity(bf16, fp32, dim=1)
    assert cosine.min() > 0.99
