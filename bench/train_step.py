"""Benchmark 2, training step: the project's pretraining against a loop written the common way.

On (a stratified subset of) the CIFAR-10 development set, 32x32, the same encoder, projection head,
NT-Xent loss, batch size, SGD optimiser and learning-rate schedule (``params.yaml`` with SimCLR's
CIFAR augmentation):

- reference: a ``Dataset`` that returns two torchvision ``transforms.v2`` views per image (the
  operations of ``bench/views.py``), in a ``DataLoader`` with one worker per core, feeding the
  model in fp32 (the common way);
- project fp32: ``contrastive.train.pretrain`` with the CPU defaults of ``params.yaml``
  (``precision: auto`` and ``channels_last: auto``, which mean fp32 and NCHW on the CPU);
- project bf16: the same with ``precision: bf16`` and ``channels_last: on``.

Each runs once per seed (``--seeds``, default 2: seed 0 and 1 drive the initial weights, the order
and the views). All runs take turns epoch by epoch: each runs in its own thread and hands over to
the next at the end of every epoch (the project's at its checkpoint), so a change of machine load
hits them alike while every run keeps its model, optimiser and workers warm. Images/s counts
images (each seen as two views) in each epoch's timed loop, epoch 1 left out as warm-up. After the
runs a linear probe and a kNN classifier are fitted on each seed-0 encoder's frozen features (the
``probe`` stage's protocol), beside a randomly initialised encoder, so a change of the learned
features shows.

Fails (exit 1) when a loss is not finite or a project's final loss (mean over seeds) differs from
the reference's by more than the noise: 4 standard errors of the difference, from the reference's
spread over seeds (with ``--seeds 1``: from its last epoch's steps), at least 0.05.

    python bench/train_step.py [--epochs 2] [--images 1536] [--seeds 2] [--no-bf16] [--no-probe]
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the benchmark's output

import numpy as np
import torch
from _common import WrongResult, data_file, line, machine_line, parser, run, verdict
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from views import torchvision_pipeline

from contrastive.callbacks import Callback, TrainState
from contrastive.config import AugmentConfig, DataConfig, Params, load_params, parse_params
from contrastive.data import load_manifest, load_split, prepare
from contrastive.evaluate import Features, evaluate_features
from contrastive.features import extract_features
from contrastive.layout import Layout
from contrastive.losses import NTXentLoss
from contrastive.models import ProjectionHead, build_encoder, load_encoder
from contrastive.optim import build_optimizer, lr_at, scaled_lr
from contrastive.runtime import seed_everything
from contrastive.stages import pretrain

TARGET = 2.0
ROOT = Path(__file__).resolve().parents[1]


def subset(source: Path, per_class: int, out: Path) -> Path:
    """The first ``per_class`` images of every class of an .npz, as a new .npz."""
    with np.load(source) as npz:
        x, y, classes = npz["x"], npz["y"], npz["classes"]
    keep = np.sort(np.concatenate([np.flatnonzero(y == k)[:per_class] for k in np.unique(y)]))
    np.savez(out, x=x[keep], y=y[keep], classes=classes)
    return out


def bench_params(epochs: int, data: Path, test: Path) -> dict:
    """``params.yaml`` with the CIFAR development data, SimCLR's CIFAR augmentation, no kNN."""
    raw = load_params(ROOT / "params.yaml").model_dump(mode="json")
    raw["device"] = "cpu"
    raw["data"] |= {"source": "npz", "path": str(data), "test_path": str(test), "image_size": 32}
    raw["augment"] = AugmentConfig().model_dump(mode="json")
    raw["train"] |= {"epochs": epochs, "knn_every": 0, "warmup_epochs": min(1, epochs - 1)}
    return raw


class TwoViews(Dataset):
    """Two independently augmented, normalised views of each image: what a worker computes."""

    def __init__(self, images: np.ndarray, transform: v2.Compose) -> None:
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[i]
        return self.transform(image), self.transform(image)


class Reference:
    """The common way: DataLoader + per-sample torchvision transforms, fp32, same model and loss."""

    def __init__(self, params: Params, prepared: Path, workers: int) -> None:
        manifest = load_manifest(prepared)
        train_x, _ = load_split(prepared, "train")
        cfg, size = params.train, manifest["image_size"]
        transform = v2.Compose([torchvision_pipeline(params.augment, size),
                                v2.Normalize(manifest["mean"], manifest["std"])])
        seed_everything(params.seed)
        self.encoder = build_encoder(params.model)
        self.head = ProjectionHead(self.encoder.embedding_dim, params.model.projection_hidden_dim,
                                   params.model.projection_dim)
        both = torch.nn.ModuleList([self.encoder, self.head])
        self.optimizer = build_optimizer(both, cfg, fused=False)
        self.criterion = NTXentLoss(cfg.temperature)
        self.loader = DataLoader(TwoViews(train_x, transform), batch_size=cfg.batch_size,
                                 shuffle=True, drop_last=True, num_workers=workers,
                                 persistent_workers=workers > 0,
                                 generator=torch.Generator().manual_seed(params.seed))
        self.steps = len(train_x) // cfg.batch_size
        self.total_steps = self.steps * cfg.epochs
        self.warmup_steps = self.steps * cfg.warmup_epochs
        self.peak_lr = scaled_lr(cfg)
        self.batch_size = cfg.batch_size
        self.epoch = 0
        self.history: list[dict[str, float]] = []
        self.last_losses: list[float] = []

    def run_epoch(self) -> None:
        self.encoder.train()
        self.head.train()
        losses = []
        started = time.perf_counter()
        for step, (a, b) in enumerate(self.loader):
            lr = lr_at(self.epoch * self.steps + step, self.total_steps, self.warmup_steps,
                       self.peak_lr)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            z = self.head(self.encoder(torch.cat([a, b])))
            loss = self.criterion(*z.chunk(2))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
        seconds = time.perf_counter() - started
        self.epoch += 1
        self.last_losses = losses
        self.history.append({"loss": statistics.fmean(losses),
                             "images_per_s": self.steps * self.batch_size / seconds})


class Turns:
    """Runs in threads that take turns: one runs at a time, in a fixed order, an epoch per turn."""

    def __init__(self, order: list[str]) -> None:
        self.order, self.active = list(order), 0
        self.changed = threading.Condition()

    def wait(self, name: str) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.order[self.active] == name)

    def hand_over(self, name: str, finished: bool = False) -> None:
        with self.changed:
            if finished:
                self.order.remove(name)
                self.active = self.active % len(self.order) if self.order else 0
            else:
                self.active = (self.active + 1) % len(self.order)
            self.changed.notify_all()


class HandOver(Callback):
    """The project's end of epoch (after its checkpoint): let the next run have its epoch."""

    def __init__(self, turns: Turns, name: str) -> None:
        self.turns, self.name = turns, name

    def on_epoch_end(self, state: TrainState, record: dict) -> None:
        if state.epoch < state.epochs:
            self.turns.hand_over(self.name)
            self.turns.wait(self.name)


class Project:
    """``contrastive.train.pretrain`` as a whole run, handing over at the end of every epoch."""

    def __init__(self, raw: dict, prepared: Path, folder: Path) -> None:
        self.params = parse_params(raw)
        self.prepared, self.folder = prepared, folder
        self.metrics: dict = {}
        self.history: list[dict[str, float]] = []

    def run(self, turns: Turns, name: str) -> None:
        layout = Layout(self.folder, prepared_dir=self.prepared)
        self.metrics = pretrain.run(self.params, layout, callbacks=[HandOver(turns, name)])
        state = torch.load(layout.checkpoints / "last.pt", weights_only=True)
        self.history = state["history"]


def run_in_turns(runs: dict[str, Reference | Project], epochs: int) -> None:
    """Run every run to the end, one epoch per turn, in the order of ``runs``."""
    turns = Turns(list(runs))
    errors: dict[str, BaseException] = {}

    def body(name: str, r: Reference | Project) -> None:
        turns.wait(name)
        try:
            if isinstance(r, Project):
                r.run(turns, name)
            else:
                for epoch in range(epochs):
                    r.run_epoch()
                    if epoch + 1 < epochs:
                        turns.hand_over(name)
                        turns.wait(name)
        except BaseException as exc:  # reported below, after the other runs have finished
            errors[name] = exc
        finally:
            turns.hand_over(name, finished=True)

    threads = [threading.Thread(target=body, args=item, name=item[0]) for item in runs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, exc in errors.items():
        raise RuntimeError(f"the {name} run failed") from exc


def rate(history: list[dict[str, float]]) -> float:
    """Median images/s over the epochs after the first (all of them if there is only one)."""
    rates = [h["images_per_s"] for h in history]
    return statistics.median(rates[1:] or rates)


def probe(encoder: torch.nn.Module, prepared: Path, params: Params) -> dict[str, float]:
    manifest = load_manifest(prepared)
    splits = {s: load_split(prepared, s) for s in ("train", "val", "test")}
    cpu = torch.device("cpu")
    f = {s: extract_features(encoder, x, manifest["mean"], manifest["std"], cpu, 512)
         for s, (x, _) in splits.items()}
    y = {s: torch.from_numpy(labels) for s, (_, labels) in splits.items()}
    feats = Features(f["train"], f["val"], f["test"], y["train"], y["val"], y["test"])
    metrics, _, _ = evaluate_features(feats, manifest["num_classes"], params)
    return metrics


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2, help="epochs of each run (default 2)")
    p.add_argument("--images", type=int, default=1536,
                   help="images of the development set used, stratified (default 1536; 5000: "
                        "all)")
    p.add_argument("--workers", type=int, default=None,
                   help="reference DataLoader workers (default: one per core)")
    p.add_argument("--seeds", type=int, default=2,
                   help="runs of each with seeds 0..N-1 (default 2): their spread is the noise "
                        "the final losses are compared within")
    p.add_argument("--no-bf16", action="store_true", help="skip the project's bf16 run")
    p.add_argument("--no-probe", action="store_true", help="skip the probe of the encoders")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs < 1:
        p.error("--epochs must be at least 1")
    workers = args.workers or len(os.sched_getaffinity(0))
    train_file = data_file(args.data, "cifar10-dev-train.npz")
    test_file = data_file(args.data, "cifar10-dev-test.npz")

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        data = subset(train_file, max(3, args.images // 10), tmp / "train.npz")
        raw = bench_params(args.epochs, data, test_file)
        prepared = tmp / "prepared"
        prepare(DataConfig(**raw["data"]), raw["seed"], prepared)
        params = parse_params(raw)
        n_train = len(load_split(prepared, "train")[1])
        print(machine_line("training step"))
        print(f"# {n_train} training images of 32x32, batch {params.train.batch_size}, "
              f"{n_train // params.train.batch_size} steps per epoch, {args.epochs} epochs; "
              f"{params.model.encoder} width {params.model.width}, SGD, NT-Xent; reference: "
              f"DataLoader with {workers} workers + torchvision v2 per sample, fp32", flush=True)

        variants = {"fp32": raw}
        if not args.no_bf16:
            variants["bf16"] = raw | {"train": raw["train"] | {"precision": "bf16",
                                                               "channels_last": "on"}}
        runs: dict[str, Reference | Project] = {}
        for seed in range(args.seeds):
            runs[f"reference/{seed}"] = Reference(params.model_copy(update={"seed": seed}),
                                                  prepared, workers)
            for name, variant in variants.items():
                runs[f"{name}/{seed}"] = Project(variant | {"seed": seed}, prepared,
                                                 tmp / f"{name}-{seed}")
        started = time.perf_counter()
        run_in_turns(runs, args.epochs)
        print(f"# {len(runs)} runs of {args.epochs} epochs took "
              f"{time.perf_counter() - started:.0f} s; images/s per epoch:", flush=True)
        for name, r in runs.items():
            print(f"#   {name:<14} " + " ".join(f"{h['images_per_s']:.0f}" for h in r.history),
                  flush=True)

        def of(name: str) -> list[Reference | Project]:
            return [runs[f"{name}/{seed}"] for seed in range(args.seeds)]

        def pooled_rate(name: str) -> float:
            return rate([h for r in of(name) for h in (r.history[1:] or r.history)])

        ref_losses = [r.history[-1]["loss"] for r in of("reference")]
        if args.seeds > 1:  # run-to-run noise: the spread of the reference over seeds
            noise = statistics.stdev(ref_losses) / math.sqrt(args.seeds)
            how = f"1 s.e. over {args.seeds} seeds"
        else:  # only the steps of one epoch: a weaker check
            steps = of("reference")[0].last_losses
            noise = statistics.stdev(steps) / math.sqrt(len(steps)) if len(steps) > 1 else 0.0
            how = "1 s.e. of the last epoch's steps; --seeds 2 for run-to-run noise"
        tolerance = max(4 * math.sqrt(2) * noise, 0.05)
        ref_rate, ref_loss = pooled_rate("reference"), statistics.fmean(ref_losses)
        line("train reference img/s", f"{ref_rate:.1f}", f"final loss {ref_loss:.4f}",
             f"noise {noise:.4f} ({how})")
        failures = []
        for name in variants:
            losses = [r.history[-1]["loss"] for r in of(name)]
            r, loss = pooled_rate(name), statistics.fmean(losses)
            ratio = r / ref_rate
            line(f"train project {name} img/s", f"{r:.1f}", f"reference {ref_rate:.1f}",
                 f"ratio {ratio:.2f}x", verdict(ratio, TARGET),
                 f"final loss {loss:.4f} vs {ref_loss:.4f} (allowed +-{tolerance:.3f})")
            if not (math.isfinite(loss) and abs(loss - ref_loss) <= tolerance):
                failures.append(f"{name}: final loss {loss:.4f}, reference {ref_loss:.4f}, "
                                f"allowed difference {tolerance:.4f}")
        if not math.isfinite(ref_loss):
            failures.append(f"reference: final loss {ref_loss}")

        if not args.no_probe:
            encoders = {"reference": runs["reference/0"].encoder.eval()}
            for name in variants:
                encoders[name] = load_encoder(runs[f"{name}/0"].folder / "encoder.pt")[0]
            torch.manual_seed(params.seed)
            encoders["random-init"] = build_encoder(params.model)
            started = time.perf_counter()
            for name, encoder in encoders.items():
                m = probe(encoder, prepared, params)
                line(f"probe {name}", f"linear top-1 {m['linear_top1']:.3f}",
                     f"kNN top-1 {m['knn_top1']:.3f}")
            print(f"# probes took {time.perf_counter() - started:.0f} s", flush=True)
        if failures:
            raise WrongResult("; ".join(failures))


if __name__ == "__main__":
    run(main)
