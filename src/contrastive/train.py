"""Pretraining: a short loop over a contrastive method, and the run around it.

:func:`fit` knows no method and no tracker: it draws batches, asks the method for a loss, steps
the optimiser and calls the callbacks (progress, kNN monitor, checkpoints, tracking).
:func:`pretrain` builds the method, resumes from the checkpoint of the same params, runs
:func:`fit` and returns what it trained and measured; it writes no file itself (the checkpointer
and the tracker are callbacks; the ``pretrain`` stage, :mod:`contrastive.stages.pretrain`, writes
the outputs).

Under ``torchrun`` the same code runs in every process (:mod:`contrastive.distributed`): each
trains on its share of every global batch, the method's loss sees the global batch, DDP averages
the gradients, and rank 0 alone writes checkpoints, outputs and tracking and shows the progress.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from contrastive import distributed
from contrastive.augment import SimCLRViews
from contrastive.batches import InMemoryBatches, StreamingBatches
from contrastive.callbacks import (
    Callback,
    Checkpointer,
    KnnMonitor,
    ProgressBar,
    StopAfter,
    TrainingDivergedError,
    TrainState,
)
from contrastive.config import ConfigError, Params, params_hash
from contrastive.data import (
    MappedArray,
    has_labels,
    load_captions,
    load_manifest,
    load_prepared_tokenizer,
    load_split,
    map_split,
)
from contrastive.features import resolve_knn_k
from contrastive.methods import MethodInputs, build
from contrastive.methods.clip import CaptionTable
from contrastive.models import EncoderInfo, TextSide, build_encoder
from contrastive.optim import build_optimizer, lr_at, scaled_lr
from contrastive.runtime import Runtime, resolve_device, seed_everything

__all__ = ["TrainingDivergedError", "fit", "pretrain"]

MIN_SPREAD = 0.1
"""Below this embedding spread (1 when spread over the sphere, 0 when collapsed) the
representation counts as collapsed."""


def fit(
    state: TrainState,
    batches: InMemoryBatches | StreamingBatches,
    peak_lr: float,
    warmup_epochs: int,
    callbacks: Sequence[Callback],
    autocast: contextlib.AbstractContextManager[Any] | None = None,
    model: nn.Module | None = None,
) -> None:
    """Train ``state.method`` from epoch ``state.epoch`` to ``state.epochs``.

    ``model`` computes the loss: the method itself (the default), or the method in DDP
    (:func:`contrastive.distributed.wrap`). The epoch's loss is the mean over the processes.

    Linear warm-up then cosine decay of the learning rate, per step. A NaN or infinite epoch
    loss stops the run with :class:`TrainingDivergedError`; the last good checkpoint stays.
    Where the time goes (the views, the steps, each callback) is summed in ``state.seconds``.
    """
    method, optimizer = state.method, state.optimizer
    model = method if model is None else model
    autocast = autocast or contextlib.nullcontext()
    warmup_steps = warmup_epochs * state.steps_per_epoch
    seconds = state.seconds
    clock = time.perf_counter

    def call(hook: str, *args: Any) -> None:
        for callback in callbacks:
            started = clock()
            getattr(callback, hook)(state, *args)
            name = type(callback).__name__
            seconds[name] = seconds.get(name, 0.0) + clock() - started

    call("on_train_start")
    try:
        while state.epoch < state.epochs and not state.stop:
            method.train()
            device = next(method.parameters()).device
            loss_sum = torch.zeros((), device=device)
            started = clock()
            lr = 0.0
            waited = started
            for step, (view_a, view_b, labels) in enumerate(batches.epoch(state.epoch)):
                stepped = clock()
                global_step = state.epoch * state.steps_per_epoch + step
                lr = lr_at(global_step, state.total_steps, warmup_steps, peak_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast:
                    loss = model(view_a, view_b, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                method.after_step((global_step + 1) / state.total_steps)
                loss_sum += loss.detach()
                done = clock()
                seconds["views"] = seconds.get("views", 0.0) + stepped - waited
                seconds["steps"] = seconds.get("steps", 0.0) + done - stepped
                call("on_step_end", step)
                waited = clock()
            # the epoch's one host sync (and, with several processes, its one all-reduce)
            epoch_loss = (distributed.mean(loss_sum) / state.steps_per_epoch).item()
            elapsed = clock() - started
            state.epoch += 1
            if not math.isfinite(epoch_loss):
                raise TrainingDivergedError(
                    f"pretrain: loss became {epoch_loss} in epoch {state.epoch}; "
                    f"{state.kept()}. Lower train.lr or raise train.temperature"
                )
            record: dict[str, Any] = {
                "epoch": state.epoch,
                "loss": round(epoch_loss, 6),
                "lr": lr,
                "images_per_s": round(state.steps_per_epoch * state.images_per_step / elapsed, 1),
                **method.history_values(),
            }
            state.history.append(record)
            call("on_epoch_end", record)
    finally:
        call("on_train_end")


def run_key(params: Params, data_hash: str, runtime: Runtime) -> str:
    """What a checkpoint must match to be resumed: every param that changes the training.

    ``precision: auto`` means bf16 on one machine and fp32 on another, so the resolved
    precision and memory format count too: an fp32 checkpoint is never resumed in bf16. So does
    the number of processes (each draws its own views); ``train.devices`` and ``train.backend``
    only say how to launch, and ``train.streaming`` and ``train.loader_workers`` where the images
    are read from (the batches are the same).
    """
    train_cfg = params.train.model_dump(
        mode="json", exclude={"devices", "backend", "streaming", "loader_workers"}
    )
    run = {"seed": params.seed, "data": data_hash,
           "resolved": {"bf16": runtime.bf16, "channels_last": runtime.channels_last}}
    if runtime.world.world_size > 1:
        run["world_size"] = runtime.world.world_size
    return params_hash(params.model, params.augment, train_cfg, run)


def check_pretrain(
    params: Params, manifest: dict[str, Any], train_labels: np.ndarray, world_size: int = 1
) -> None:
    """Everything that can be said about ``params`` against the prepared data and the number
    of processes, before any work."""
    cfg, n = params.train, len(train_labels)
    if cfg.method == "clip" and "captions" not in manifest:
        raise ConfigError(
            f"train.method: 'clip' learns from image-caption pairs, but the prepared data "
            f"(data.source '{manifest['source']}') has no captions; use data.source: pairs"
        )
    if not has_labels(manifest) and cfg.method != "clip":
        raise ConfigError(
            f"train.method: '{cfg.method}' is measured with classes, but the prepared captions "
            "have no 'label' column; use clip (measured by image-text Recall@K), or add labels"
        )
    if world_size > 1:
        distributed.check_world(params, world_size)
    if cfg.backend == "nccl":
        distributed.resolve_backend(params, resolve_device(params.device))
    if cfg.sync_bn:
        with torch.device("meta"):  # the modules only, no weights
            inputs = MethodInputs(captions=CaptionTable.blank(params.model.text.context_length))
            method = build(build_encoder(params.model, manifest["image_size"]), params, inputs)
        if not distributed.has_batch_norm(method):
            raise ConfigError(
                f"train.sync_bn: true, but method '{cfg.method}' with encoder "
                f"'{params.model.encoder}' has no BatchNorm layer to synchronise; use false"
            )
    if cfg.batch_size > n:
        raise ConfigError(
            f"train.batch_size: {cfg.batch_size} is larger than the training split "
            f"({n} images); use at most {n}"
        )
    if cfg.uses_labels and len(np.unique(train_labels)) < 2:
        raise ConfigError(
            f"train.method: '{cfg.method}' uses labels as positives, but the training split has "
            "a single class; use simclr or moco, or data with at least two classes"
        )
    size = manifest["image_size"]
    if params.model.encoder == "vit_tiny" and size % params.model.patch_size:
        raise ConfigError(
            f"model.patch_size: {params.model.patch_size} does not divide data.image_size "
            f"({size}); use a divisor of {size}"
        )


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights per class, ``n / (C * n_c)``: 1 for every class when balanced."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def collapse_reason(spread: float, knn_top1: float | None, val_labels: np.ndarray) -> str | None:
    """Why the representation looks collapsed, or None: embeddings that barely vary, or a kNN
    no better than always answering the most common class."""
    if spread < MIN_SPREAD:
        return f"embedding spread {spread:.3f} < {MIN_SPREAD}: the images map to nearly one point"
    if knn_top1 is None:
        return None
    majority = np.bincount(val_labels).max() / len(val_labels)
    if knn_top1 <= majority + 0.02:
        return f"kNN top-1 {knn_top1:.3f} is at chance (most common class: {majority:.3f})"
    return None


@dataclass(frozen=True)
class TrainingData:
    """The prepared data that pretraining reads: the manifest, train and val as arrays, and
    where train's images lie in their file.

    Train's images are a memory map (nothing is read until used), so a split larger than memory
    can be streamed (:class:`StreamingBatches`) and the kNN monitor reads it in slices; the
    in-memory path copies it onto the device in :func:`build_run`.
    """

    manifest: dict[str, Any]
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    train_source: MappedArray
    train_captions: list[list[str]] | None = None
    """``pairs`` data: each training image's captions."""
    tokenizer: Tokenizer | None = None
    """``pairs`` data: the tokenizer learned from them."""

    @classmethod
    def load(cls, prepared_dir: str | Path) -> TrainingData:
        source, train_y = map_split(prepared_dir, "train")
        captions = load_captions(prepared_dir)
        return cls(
            load_manifest(prepared_dir),
            (source.open(), train_y),
            load_split(prepared_dir, "val"),
            source,
            captions["train"] if captions else None,
            load_prepared_tokenizer(prepared_dir),
        )

    def caption_table(self, context_length: int) -> CaptionTable | None:
        """The training captions as token ids, when the data has captions."""
        if self.train_captions is None or self.tokenizer is None:
            return None
        return CaptionTable.build(self.train_captions, self.tokenizer, context_length)


def available_ram() -> int:
    """Bytes of RAM this machine can still give without swapping: ``MemAvailable`` (free memory
    plus the page cache it can drop), else the free pages ``os.sysconf`` reports (fewer: the page
    cache counts as used)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def should_stream(setting: str, nbytes: int, device: torch.device) -> bool:
    """Whether to stream a training split of ``nbytes`` uint8 bytes to ``device``.

    ``on``/``off`` say so. ``auto`` streams when the split exceeds half the free memory of the
    device: ``torch.cuda.mem_get_info`` on CUDA; on the CPU the available RAM shared by the
    processes of this machine (``LOCAL_WORLD_SIZE``, each holding a copy). The other half is
    left to the model, its activations, the views and the optimiser. Since both paths give the
    same batches, ranks that decide differently still train the same run.
    """
    if setting != "auto":
        return setting == "on"
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = available_ram() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return nbytes > free // 2


def build_run(
    params: Params, data: TrainingData, runtime: Runtime
) -> tuple[TrainState, InMemoryBatches | StreamingBatches]:
    """The method around a freshly initialised encoder (seeded), its optimiser and its batches
    (this process's share of them, under several processes): held on the device, or streamed
    from the file when ``train.streaming`` says so (:func:`should_stream`)."""
    cfg, manifest = params.train, data.manifest
    device, world, memory_format = runtime.device, runtime.world, runtime.memory_format
    seed_everything(params.seed)
    encoder = build_encoder(params.model, manifest["image_size"])
    train_x, train_y = data.train
    weights = (
        class_weights(train_y, manifest["num_classes"]) if cfg.class_balance == "weights" else None
    )
    captions = data.caption_table(params.model.text.context_length)
    method = build(encoder, params, MethodInputs(weights, captions))
    if cfg.sync_bn and world.distributed:
        distributed.convert_sync_batchnorm(method)
    method = method.to(device, memory_format=memory_format)
    if cfg.compile:
        encoder.compile()  # in place: the state_dict keys stay the same
    optimizer = build_optimizer(method, cfg, fused=device.type == "cuda")
    # what the batches carry besides the views: the labels, or (clip) each image's index
    targets = np.arange(len(train_y)) if method.batch_targets == "index" else train_y
    common: dict[str, Any] = {
        "labels": torch.from_numpy(targets).to(device),
        "batch_size": cfg.batch_size,
        "views": SimCLRViews(params.augment, manifest["image_size"]),
        "mean": manifest["mean"],
        "std": manifest["std"],
        "seed": params.seed,
        "memory_format": memory_format,
        "balanced": cfg.class_balance == "sampler",
        "rank": world.rank,
        "world_size": world.world_size,
    }
    batches: InMemoryBatches | StreamingBatches
    if should_stream(cfg.streaming, data.train_source.nbytes, device):
        batches = StreamingBatches(data.train_source, workers=cfg.loader_workers, **common)
    else:  # copy the mapped file into memory (then onto the device): the fast default
        batches = InMemoryBatches(torch.from_numpy(train_x).to(device, copy=True), **common)
    key = run_key(params, manifest["data_hash"], runtime)
    state = TrainState(method, optimizer, cfg.epochs, batches.steps_per_epoch, cfg.batch_size, key)
    return state, batches


def summarize(
    state: TrainState, params: Params, data: TrainingData, runtime: Runtime,
    streamed: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stage's metrics and its report, from the finished run's history, with the collapse
    check. The metrics hold only numbers that describe the model (``dvc metrics diff`` compares
    them); the report holds the rest: the method, device, precision, whether the images were
    streamed (what ``train.streaming: auto`` chose), the k of the kNN monitor (what
    ``probe.knn_k: auto`` chose), speed, the run key and why the representation collapsed."""
    history = state.history
    knn = [r["knn_top1"] for r in history if "knn_top1" in r]
    spread = history[-1].get("embedding_spread", 1.0)
    collapsed = collapse_reason(spread, knn[-1] if knn else None, data.val[1])
    metrics = {
        "final_loss": history[-1]["loss"],
        "knn_val_top1": knn[-1] if knn else None,
        "embedding_spread": spread,
        "collapsed": collapsed is not None,
        "epochs": params.train.epochs,
    }
    if "temperature" in history[-1]:
        metrics["temperature"] = history[-1]["temperature"]
    report = {
        "method": params.train.method,
        "images_per_s": round(sum(r["images_per_s"] for r in history) / len(history), 1),
        "device": runtime.device.type,
        "precision": runtime.precision,
        "streaming": streamed,
        "knn_k": resolve_knn_k(params.probe.knn_k, data.train[1]) if knn else None,
        "seconds": {name: round(value, 3) for name, value in sorted(state.seconds.items())},
        "params_hash": state.run_key,
        "collapse_reason": collapsed,
    }
    return metrics, report


@dataclass(frozen=True)
class Trained:
    """What :func:`pretrain` returns: the final state (the method, its encoder, the per-epoch
    history), the metrics and the report of :func:`summarize` (empty when the run stopped early
    or on processes other than rank 0) and the description saved with the encoder."""

    state: TrainState
    metrics: dict[str, Any]
    report: dict[str, Any]
    info: EncoderInfo
    text: TextSide | None = None
    """An image-text method's text half, saved with the encoder."""


def pretrain(
    params: Params,
    data: TrainingData,
    runtime: Runtime,
    checkpointer: Checkpointer,
    callbacks: Sequence[Callback] = (),
    stop_after_epoch: int | None = None,
) -> Trained:
    """Train the method of ``params.train`` on ``data`` from the checkpoint of the same run, if
    ``checkpointer`` holds one, to ``train.epochs`` (or ``stop_after_epoch``, as a kill would).

    Rank 0 monitors the kNN, shows progress and checkpoints; ``callbacks`` run after those, on
    rank 0 only. The process group, if any, is ``runtime``'s and stays open.
    """
    state, batches = build_run(params, data, runtime)
    world, manifest, probe = runtime.world, data.manifest, params.probe
    checkpointer.resume(state, runtime.device, announce=world.is_main)
    own: list[Callback] = []
    if world.is_main:  # rank 0 alone monitors, shows progress, writes and tracks
        labelled = has_labels(manifest)  # without classes: the embedding spread alone
        monitor = KnnMonitor(
            params.train.knn_every if labelled else 0, data.train, data.val, manifest["mean"],
            manifest["std"], runtime, manifest["num_classes"],
            resolve_knn_k(probe.knn_k, data.train[1]) if labelled else 0,
            probe.knn_temperature, probe.batch_size,
        )
        own += [monitor, ProgressBar(), checkpointer]
    if stop_after_epoch is not None:
        own.append(StopAfter(stop_after_epoch))
    if world.is_main:
        own += callbacks
    model = distributed.wrap(state.method, world, runtime.device)
    fit(state, batches, scaled_lr(params.train), params.train.warmup_epochs, own,
        runtime.autocast(), model)
    encoder = state.method.encoder
    info = EncoderInfo(
        model=params.model.model_dump(mode="json"),
        image_size=manifest["image_size"],
        mean=manifest["mean"],
        std=manifest["std"],
        embedding_dim=encoder.embedding_dim,
        classes=manifest["classes"],
        params_hash=state.run_key,
    )
    tower = state.method.text_tower()
    text = None
    if tower is not None and data.tokenizer is not None:
        scale = 1 / float(state.method.temperature().detach())
        text = TextSide(tower, data.tokenizer, params.model.text_encoder, params.model.text,
                        round(scale, 6))
    if state.epoch < params.train.epochs or not world.is_main:
        return Trained(state, {}, {}, info, text)
    metrics, report = summarize(
        state, params, data, runtime, isinstance(batches, StreamingBatches)
    )
    return Trained(state, metrics, report, info, text)
