"""The ``pretrain`` stage: train the method of ``params.train`` on the prepared train split and
write the encoder, its metrics, its report, the per-epoch history and its plot.

The training itself is :func:`contrastive.train.pretrain`; this module reads the data, opens the
run (:class:`~contrastive.runtime.Runtime`: device, precision, process group), hands the loop a
checkpointer in the layout's folder, and writes the outputs, each atomically, only at the end: a
failed or killed run leaves the previous ones in place.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process runs this; rank 0 alone writes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import torch

from contrastive import distributed
from contrastive.callbacks import Callback, Checkpointer
from contrastive.config import ConfigError, Params, StageFailed
from contrastive.data import load_manifest, map_split
from contrastive.files import write_csv, write_json
from contrastive.layout import Layout
from contrastive.models import save_encoder
from contrastive.plots import plot_training
from contrastive.runtime import Runtime, resolve_device
from contrastive.train import TrainingData, check_pretrain, pretrain


class RankFailed(StageFailed):
    """A process of a distributed run failed alone (the others stop with it); the last good
    checkpoint is kept. The CLI prints it on whichever rank raised it."""

    rank_specific = True


def run(
    params: Params,
    layout: Layout,
    callbacks: Sequence[Callback] = (),
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Pretrain and write the outputs; the metrics and the report in one mapping.

    ``callbacks`` run after the stage's own (kNN monitor, progress, checkpoint), on rank 0 only.
    ``stop_after_epoch`` ends the run after that epoch's checkpoint, as a kill would: then the
    result is ``{"stopped_after_epoch": n}`` and nothing but the checkpoint is written. Processes
    other than rank 0 return ``{}``.
    """
    data = TrainingData.load(layout.prepared)
    check_pretrain(params, data.manifest, data.train[1], distributed.env_world_size())
    runtime = Runtime.start(params)
    try:
        trained = pretrain(params, data, runtime, Checkpointer(layout.checkpoints), callbacks,
                           stop_after_epoch)
    except (ConfigError, StageFailed):
        raise
    except Exception as exc:
        if not runtime.world.distributed:
            raise
        raise RankFailed(f"rank {runtime.world.rank}: {type(exc).__name__}: "
                         f"{_first_line(exc)}") from exc
    finally:
        distributed.cleanup()
    if trained.state.epoch < params.train.epochs:
        return {"stopped_after_epoch": trained.state.epoch}
    if not runtime.world.is_main:
        return {}
    metrics, report = trained.metrics, trained.report
    if metrics["collapsed"]:
        print(
            f"contrastive pretrain: WARNING: the representation collapsed: "
            f"{report['collapse_reason']}. The register stage will refuse this model; lower "
            "train.lr or change the method",
            file=sys.stderr,
        )
    history = trained.state.history
    encoder = trained.state.method.encoder
    save_encoder(layout.encoder, encoder.to(memory_format=torch.contiguous_format), trained.info,
                 trained.text)
    extra = ["temperature"] if "temperature" in history[-1] else []
    write_csv(layout.pretrain_history, history, ["epoch", "loss", "lr", "images_per_s", *extra])
    write_csv(layout.knn_history, [r for r in history if "knn_top1" in r], ["epoch", "knn_top1"])
    plot_training(layout.pretrain_history, layout.knn_history, layout.training_plot)
    write_json(layout.pretrain_report, report)
    write_json(layout.pretrain_metrics, metrics)
    return {**metrics, **report}


def check_launch(params: Params, layout: Layout, processes: int) -> bool:
    """Every check :func:`run` makes, for ``processes`` processes about to be launched, so that
    bad input stops the command before any process starts; whether they train on CUDA."""
    manifest = load_manifest(layout.prepared)
    _, labels = map_split(layout.prepared, "train")  # the images may not fit in memory
    check_pretrain(params, manifest, labels, processes)
    return resolve_device(params.device).type == "cuda"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""
