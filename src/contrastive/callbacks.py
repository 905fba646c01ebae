"""What happens around the training loop: progress, the kNN monitor, checkpoints, tracking.

The loop (:func:`contrastive.train.fit`) calls each callback at the start of training, after
every step, after every epoch and at the end; callbacks see the :class:`TrainState` and may add
values to the epoch's record. Benches and tests observe the loop the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from contrastive.config import ConfigError, StageFailed
from contrastive.features import extract_features, knn_scores, topk_accuracy
from contrastive.files import atomic_path
from contrastive.runtime import Runtime


class TrainingDivergedError(StageFailed):
    """The loss or the weights became NaN or infinite; the last good checkpoint is kept."""


class CheckpointError(ConfigError):
    """A checkpoint file that cannot be trusted or read: one line saying what to do."""


@dataclass
class TrainState:
    """What the loop and its callbacks share."""

    method: torch.nn.Module
    optimizer: torch.optim.Optimizer
    epochs: int
    steps_per_epoch: int
    images_per_step: int
    run_key: str
    """Identifies the run's params and data: a checkpoint resumes only a run of the same key."""
    epoch: int = 0
    """Epochs completed."""
    history: list[dict[str, float]] = field(default_factory=list)
    saved_epoch: int | None = None
    """The epoch of the last checkpoint written or loaded."""
    stop: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    """Where this process's training time went, summed over its epochs: ``views`` (waiting for
    the next batch of views), ``steps`` (forward, backward, optimiser) and one entry per callback
    class (all its hooks). On CUDA, ops are queued, so the host's time lands where it waits."""

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def kept(self) -> str:
        """What is left to resume from, for error messages."""
        if self.saved_epoch is None:
            return "no checkpoint was written"
        return f"the checkpoint of epoch {self.saved_epoch} is kept"


class Callback:
    """Hooks of the training loop; each does nothing unless overridden."""

    def on_train_start(self, state: TrainState) -> None: ...

    def on_step_end(self, state: TrainState, step: int) -> None: ...

    def on_epoch_end(self, state: TrainState, record: dict[str, Any]) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...


class ProgressBar(Callback):
    """A tqdm bar over all steps, with the loss, images/s and kNN of the last epoch."""

    def __init__(self, desc: str = "pretrain") -> None:
        self.desc = desc
        self.bar: tqdm | None = None

    def on_train_start(self, state: TrainState) -> None:
        self.bar = tqdm(
            total=state.total_steps,
            initial=state.epoch * state.steps_per_epoch,
            desc=self.desc,
            unit="step",
            dynamic_ncols=True,
        )

    def on_step_end(self, state: TrainState, step: int) -> None:
        assert self.bar is not None
        self.bar.update()

    def on_epoch_end(self, state: TrainState, record: dict[str, Any]) -> None:
        assert self.bar is not None
        self.bar.set_postfix(
            loss=f"{record['loss']:.3f}",
            img_s=f"{record['images_per_s']:.0f}",
            knn=record.get("knn_top1", "-"),
        )

    def on_train_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.close()


def first_non_finite(module: torch.nn.Module) -> str | None:
    """The name of the first parameter or buffer with a NaN or infinite value, else None."""
    for name, value in module.state_dict().items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            return name
    return None


class Checkpointer(Callback):
    """Saves the method's whole state, the optimiser and the history after every epoch.

    A checkpoint is written only if every parameter and buffer is finite: a diverging run stops
    with the last good checkpoint in place. Writes are atomic and synced (``files.atomic_path``).
    """

    FILE = "last.pt"

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / self.FILE

    def on_epoch_end(self, state: TrainState, record: dict[str, Any]) -> None:
        bad = first_non_finite(state.method)
        if bad is not None:
            raise TrainingDivergedError(
                f"pretrain: '{bad}' became NaN or infinite in epoch {state.epoch}; "
                f"{state.kept()}. Lower train.lr or raise train.temperature"
            )
        payload = {
            "run_key": state.run_key,
            "epoch": state.epoch,
            "method": state.method.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "history": state.history,
        }
        with atomic_path(self.path) as tmp:
            torch.save(payload, tmp)
        state.saved_epoch = state.epoch

    def resume(self, state: TrainState, device: torch.device, announce: bool = True) -> bool:
        """Load the checkpoint into ``state`` if there is one of this run; True if resumed.
        ``announce``: say so (every process resumes, rank 0 alone speaks).

        Only tensors, numbers, strings and containers are unpickled (``weights_only``): a
        planted file cannot run code. A checkpoint of other params is ignored (it is replaced
        after the first epoch); an unreadable one stops the run with one line.
        """
        if not self.path.is_file():
            return False
        try:
            saved = torch.load(self.path, map_location=device, weights_only=True)
            run_key = saved["run_key"]
        except Exception as exc:  # truncated, empty, not a zip, or objects that are not data
            text = str(exc).strip()
            reason = text.splitlines()[0][:120] if text else type(exc).__name__
            raise CheckpointError(
                f"{self.path}: not a readable checkpoint ({reason}); delete it to train from "
                "the start, or put back a good copy to resume"
            ) from None
        if run_key != state.run_key:
            if announce:
                tqdm.write(
                    f"pretrain: {self.path} belongs to other params; training from the start"
                )
            return False
        state.method.load_state_dict(saved["method"])
        state.optimizer.load_state_dict(saved["optimizer"])
        state.history, state.epoch = saved["history"], saved["epoch"]
        state.saved_epoch = state.epoch
        if announce:
            tqdm.write(f"pretrain: resuming from {self.path} after epoch {state.epoch}")
        return True


def embedding_spread(features: torch.Tensor) -> float:
    """How much unit-length embeddings vary: the mean per-dimension std times sqrt(D).

    About 1 for embeddings spread over the sphere, 0 when every image maps to the same point
    (a collapsed representation).
    """
    unit = F.normalize(features.float(), dim=1)
    return float(unit.std(dim=0).mean() * math.sqrt(unit.shape[1]))


class StopAfter(Callback):
    """Ends the run after ``epoch`` (after its checkpoint), as a kill would: for resume tests."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, state: TrainState, record: dict[str, Any]) -> None:
        if state.epoch >= self.epoch and state.epoch < state.epochs:
            state.stop = True


class KnnMonitor(Callback):
    """Representation quality while training: kNN top-1 on val with train as the memory bank,
    every ``every`` epochs and at the last (``every`` 0: never), and the embedding spread of
    val at the last epoch, which tells a collapsed representation.

    The features are computed on the run's device, in its precision and memory format
    (``runtime``): in fp32 NCHW, on a CPU that trains in bf16, the monitor cost 3-4x as much
    (docs/benchmarks.md, "Pretraining overhead").
    """

    def __init__(
        self,
        every: int,
        train: tuple[Any, Any],
        val: tuple[Any, Any],
        mean: list[float],
        std: list[float],
        runtime: Runtime,
        num_classes: int,
        k: int,
        temperature: float,
        batch_size: int,
    ) -> None:
        self.every, self.train, self.val = every, train, val
        self.mean, self.std, self.runtime = mean, std, runtime
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.batch_size = batch_size

    def on_epoch_end(self, state: TrainState, record: dict[str, Any]) -> None:
        last = state.epoch == state.epochs
        due = self.every and (state.epoch % self.every == 0 or last)
        if not (due or last):
            return
        encoder = state.method.encoder
        was_training = encoder.training

        def features(images: Any) -> torch.Tensor:
            runtime = self.runtime
            return extract_features(
                encoder, images, self.mean, self.std, runtime.device, self.batch_size,
                bf16=runtime.bf16, memory_format=runtime.memory_format,
            )

        f_val = features(self.val[0])
        if last:
            record["embedding_spread"] = round(embedding_spread(f_val), 6)
        if due:
            scores = knn_scores(
                features(self.train[0]),
                torch.from_numpy(self.train[1]),
                f_val,
                self.num_classes,
                self.k,
                self.temperature,
            )
            record["knn_top1"] = round(topk_accuracy(scores, torch.from_numpy(self.val[1]), 1), 6)
        encoder.train(was_training)
