"""The pretraining loop: SimCLR views, NT-Xent, warm-up + cosine schedule, checkpoint and resume.

The prepared training images stay on the training device as ``uint8`` and views are generated
there, a batch at a time. Every epoch draws its shuffling and its views from a generator seeded by
``(seed, epoch)``, so a run resumed from the checkpoint of epoch ``e`` continues exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from contrastive.augment import SimCLRViews
from contrastive.config import ConfigError, Params, StageFailed, params_hash
from contrastive.data import load_manifest, load_split
from contrastive.evaluate import extract_features, knn_scores, topk_accuracy
from contrastive.files import atomic_path, remove_outputs, write_json
from contrastive.losses import NTXentLoss
from contrastive.models import EncoderInfo, ProjectionHead, build_encoder, normalize, save_encoder
from contrastive.optim import build_optimizer, lr_at, scaled_lr
from contrastive.runtime import resolve_device, seed_everything

CHECKPOINT = "last.pt"


class TrainingDivergedError(StageFailed):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def _knn_accuracy(
    encoder: nn.Module,
    train: tuple,
    val: tuple,
    mean: list[float],
    std: list[float],
    device: torch.device,
    num_classes: int,
    params: Params,
) -> float:
    """kNN top-1 on val with train as the memory bank: the monitor of representation quality."""
    was_training = encoder.training
    f_train = extract_features(encoder, train[0], mean, std, device, params.probe.batch_size)
    f_val = extract_features(encoder, val[0], mean, std, device, params.probe.batch_size)
    encoder.train(was_training)
    scores = knn_scores(
        f_train,
        torch.from_numpy(train[1]),
        f_val,
        num_classes,
        params.probe.knn_k,
        params.probe.knn_temperature,
    )
    return topk_accuracy(scores, torch.from_numpy(val[1]), 1)


def pretrain(
    params: Params,
    prepared_dir: str | Path = "data/prepared",
    encoder_path: str | Path = "models/encoder.pt",
    checkpoint_dir: str | Path = "checkpoints",
    metrics_path: str | Path = "metrics/pretrain.json",
    history_path: str | Path = "plots/pretrain.csv",
    knn_path: str | Path = "plots/knn.csv",
    stop_after_epoch: int | None = None,
) -> dict[str, Any]:
    """Pretrain the encoder with SimCLR and write the encoder, metrics and per-epoch history.

    ``stop_after_epoch`` ends the run early after that epoch's checkpoint, as a kill would; tests
    use it to check that resuming gives the result of an uninterrupted run.
    """
    cfg = params.train
    manifest = load_manifest(prepared_dir)
    train_x, train_y = load_split(prepared_dir, "train")
    val = load_split(prepared_dir, "val")
    if cfg.batch_size > len(train_x):
        raise ConfigError(
            f"train.batch_size: {cfg.batch_size} is larger than the training split "
            f"({len(train_x)} images); use at most {len(train_x)}"
        )
    device = resolve_device(params.device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    channels_last = cfg.channels_last == "on" or (
        cfg.channels_last == "auto" and device.type == "cuda"
    )
    remove_outputs(encoder_path, metrics_path, history_path, knn_path)

    seed_everything(params.seed)
    encoder = build_encoder(params.model)
    head = ProjectionHead(
        encoder.embedding_dim, params.model.projection_hidden_dim, params.model.projection_dim
    )
    encoder.to(device)
    head.to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    encoder.to(memory_format=memory_format)
    optimizer = build_optimizer([encoder, head], cfg, fused=device.type == "cuda")
    criterion = NTXentLoss(cfg.temperature)
    views = SimCLRViews(params.augment, manifest["image_size"])
    mean, std = manifest["mean"], manifest["std"]
    forward_encoder = torch.compile(encoder) if cfg.compile else encoder

    run_key = params_hash(
        params.model,
        params.augment,
        params.train,
        {"seed": params.seed, "data": manifest["data_hash"]},
    )
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT
    history: list[dict[str, float]] = []
    start_epoch = 0
    if checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        if state["run_key"] == run_key:
            encoder.load_state_dict(state["encoder"])
            head.load_state_dict(state["head"])
            optimizer.load_state_dict(state["optimizer"])
            history, start_epoch = state["history"], state["epoch"]
            tqdm.write(f"pretrain: resuming from {checkpoint_path} after epoch {start_epoch}")

    images = torch.from_numpy(train_x).to(device)
    n = len(images)
    steps_per_epoch = n // cfg.batch_size
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = steps_per_epoch * cfg.warmup_epochs
    peak_lr = scaled_lr(cfg)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )

    bar = tqdm(
        total=total_steps,
        initial=start_epoch * steps_per_epoch,
        desc="pretrain",
        unit="step",
        dynamic_ncols=True,
    )
    for epoch in range(start_epoch, cfg.epochs):
        encoder.train()
        head.train()
        generator = torch.Generator(device=device).manual_seed(_epoch_seed(params.seed, epoch))
        order = torch.randperm(n, device=device, generator=generator)
        loss_sum = torch.zeros((), device=device)
        started = time.perf_counter()
        for step in range(steps_per_epoch):
            lr = lr_at(epoch * steps_per_epoch + step, total_steps, warmup_steps, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = images[order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
            pair = torch.cat([views(batch, generator), views(batch, generator)])
            pair = normalize(pair, mean, std).contiguous(memory_format=memory_format)
            with autocast:
                z = head(forward_encoder(pair))
            loss = criterion(*z.float().chunk(2))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            bar.update()
        epoch_loss = (loss_sum / steps_per_epoch).item()  # the one host sync of the epoch
        seconds = time.perf_counter() - started
        if not math.isfinite(epoch_loss):
            bar.close()
            kept = (
                f"the checkpoint of epoch {history[-1]['epoch']} is kept"
                if history
                else "no checkpoint was written"
            )
            raise TrainingDivergedError(
                f"pretrain: loss became {epoch_loss} in epoch {epoch + 1}; {kept}. "
                "Lower train.lr or raise train.temperature"
            )
        record = {
            "epoch": epoch + 1,
            "loss": round(epoch_loss, 6),
            "lr": lr,
            "images_per_s": round(steps_per_epoch * cfg.batch_size / seconds, 1),
        }
        last = epoch + 1 == cfg.epochs
        if cfg.knn_every and ((epoch + 1) % cfg.knn_every == 0 or last):
            record["knn_top1"] = round(
                _knn_accuracy(
                    encoder,
                    (train_x, train_y),
                    val,
                    mean,
                    std,
                    device,
                    manifest["num_classes"],
                    params,
                ),
                6,
            )
        history.append(record)
        bar.set_postfix(
            loss=f"{epoch_loss:.3f}",
            img_s=f"{record['images_per_s']:.0f}",
            knn=record.get("knn_top1", "-"),
        )
        _save_checkpoint(checkpoint_path, run_key, epoch + 1, encoder, head, optimizer, history)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch and not last:
            bar.close()
            return {"stopped_after_epoch": epoch + 1}
    bar.close()

    info = EncoderInfo(
        model=params.model.model_dump(mode="json"),
        image_size=manifest["image_size"],
        mean=mean,
        std=std,
        embedding_dim=encoder.embedding_dim,
        classes=manifest["classes"],
        params_hash=run_key,
    )
    save_encoder(encoder_path, encoder.to(memory_format=torch.contiguous_format), info)
    knn_records = [r for r in history if "knn_top1" in r]
    metrics = {
        "final_loss": history[-1]["loss"],
        "knn_val_top1": knn_records[-1]["knn_top1"] if knn_records else None,
        "epochs": cfg.epochs,
        "images_per_s": round(sum(r["images_per_s"] for r in history) / len(history), 1),
        "device": device.type,
        "precision": "bf16" if bf16 else "fp32",
        "params_hash": run_key,
    }
    _write_csv(history_path, history, ["epoch", "loss", "lr", "images_per_s"])
    _write_csv(knn_path, knn_records, ["epoch", "knn_top1"])
    write_json(metrics_path, metrics)
    return metrics


def _save_checkpoint(
    path: Path,
    run_key: str,
    epoch: int,
    encoder: nn.Module,
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    history: list[dict[str, float]],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "run_key": run_key,
        "epoch": epoch,
        "encoder": encoder.state_dict(),
        "head": head.state_dict(),
        "optimizer": optimizer.state_dict(),
        "history": history,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _write_csv(path: str | Path, rows: list[dict[str, float]], columns: list[str]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
