"""Quality side by side with lightly: the README's CIFAR recipe against lightly's SimCLR recipe.

Both train the same ``small_cnn`` backbone on the CIFAR-10 development subset for the same
epochs at the same batch size, one after the other in this process, and both are scored by the
same evaluation on frozen backbone features: the ``probe`` stage's linear probe (L2 chosen on
val) and the weighted kNN (k=200, t=0.1), which is cross-checked against lightly's
``knn_predict`` on the same features (the run fails if they disagree).

- **product**: ``pretrain`` with ``params.yaml`` and the CIFAR recipe (``params/cifar.yaml``,
  the README's ``dvc exp run`` line: SimCLR's CIFAR views computed in batches, temperature 0.2,
  SGD lr 0.3 per 256 with warm-up and cosine decay, ``precision: auto``).
- **lightly**: lightly's CIFAR-10 benchmark recipe (``docs/.../cifar10_benchmark.py``):
  ``SimCLRTransform(input_size=32, gaussian_blur=0)`` per sample in DataLoader workers,
  ``SimCLRProjectionHead(d, d, 128)``, ``NTXentLoss()`` (temperature 0.5), SGD lr 0.06 per 128
  with momentum 0.9 and weight decay 5e-4, cosine annealing over the epochs, fp32.

Each seed (``--seeds``, default 0 and 1) drives the split, the weights, the order and the views
of both recipes. Prints one line per recipe and seed, then the means against the targets (kNN
and linear each at least 5 points over lightly's, training wall time at most half of lightly's).
``--ablate`` also trains the product's recipe once more for each of lightly's choices swapped in
(its temperature, its views, its optimiser schedule), to say which choices make the difference;
``--sweep`` trains only the product's recipe with each of :data:`CANDIDATES` (the settings tried
for the recipe). Needs the ``bench`` dependency group (``uv sync --group bench``), which holds
lightly.

    python bench/quality.py [--epochs 20] [--seeds 0 1] [--workers 2] [--ablate] [--out FILE]
    python bench/quality.py --sweep ["temperature 0.1" ...]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import _threads  # noqa: F401  (the command's thread policy, before torch loads)
import numpy as np
import torch
from _common import WrongResult, data_file, line, machine_line, parser, run
from methods import recipe
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from contrastive.config import Params, parse_params
from contrastive.data import SPLITS, load_manifest, load_split, prepare
from contrastive.evaluate import Features, evaluate_features
from contrastive.features import extract_features
from contrastive.layout import Layout
from contrastive.models import build_encoder, load_encoder
from contrastive.runtime import Runtime
from contrastive.stages import pretrain

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
"""lightly's default normalisation, used by its views and so by its evaluation."""


LIGHTLY_CHOICES = {
    "temperature 0.5": {"train": {"temperature": 0.5}},
    "views (crop 0.08, jitter 0.8/0.2)": {"augment": {
        "crop_scale": [0.08, 1.0], "brightness": 0.8, "contrast": 0.8, "saturation": 0.8,
        "hue": 0.2}},
    "lr 0.12, no warm-up": {"train": {"lr": 0.12, "warmup_epochs": 0}},
}
"""lightly's recipe where it differs from the product's, one choice at a time (``--ablate``)."""

CANDIDATES = {
    "temperature 0.1": {"train": {"temperature": 0.1}},
    "temperature 0.3": {"train": {"temperature": 0.3}},
    "lr 0.6": {"train": {"lr": 0.6}},
    "lr 0.15": {"train": {"lr": 0.15}},
    "head 512-128": {"model": {"projection_hidden_dim": 512, "projection_dim": 128}},
    "crop scale 0.3": {"augment": {"crop_scale": [0.3, 1.0]}},
    "crop scale 0.14": {"augment": {"crop_scale": [0.14, 1.0]}},
    "width 40": {"model": {"width": 40}},
    "adamw lr 0.002 wd 0.05": {"train": {"optimizer": "adamw", "lr": 0.002,
                                         "weight_decay": 0.05}},
    "lars lr 1.2 wd 1e-6": {"train": {"optimizer": "lars", "lr": 1.2, "weight_decay": 1e-6}},
    "blur 0.5 (sigma 0.1-1)": {"augment": {"blur_prob": 0.5, "blur_sigma": [0.1, 1.0]}},
    "weight decay 1e-4": {"train": {"weight_decay": 1e-4}},
}
"""Other settings of the product's recipe, one at a time (``--sweep NAME ...``): the levers of
the field this project had not tried (temperature, lr, optimiser, head, views, width)."""


def product_params(train: Path, test: Path, epochs: int, seed: int) -> dict:
    """``params.yaml`` with the README's CIFAR recipe (``bench/methods.py``), precision ``auto``,
    and the CIFAR kNN protocol (k=200, t=0.1) for both recipes."""
    raw = recipe(train, test, epochs) | {"seed": seed}
    raw["probe"] = raw["probe"] | {"knn_k": 200, "knn_temperature": 0.1}
    return raw


class TwoViews(Dataset):
    """uint8 images ``(N, H, W, 3)`` as PIL images through lightly's two-view transform."""

    def __init__(self, images: np.ndarray, transform: object) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return self.transform(Image.fromarray(self.images[i]))


class LightlySimCLR(nn.Module):
    """The backbone with lightly's SimCLR projection head, as in lightly's benchmark."""

    def __init__(self, backbone: nn.Module) -> None:
        from lightly.models.modules.heads import SimCLRProjectionHead

        super().__init__()
        self.backbone = backbone
        dim = backbone.embedding_dim
        self.head = SimCLRProjectionHead(dim, dim, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).flatten(start_dim=1))


def train_lightly(params: Params, images: np.ndarray, epochs: int, workers: int) -> nn.Module:
    """lightly's CIFAR-10 SimCLR recipe on ``images``; returns the trained backbone."""
    from lightly.loss import NTXentLoss
    from lightly.transforms import SimCLRTransform

    batch = params.train.batch_size
    torch.manual_seed(params.seed)
    model = LightlySimCLR(build_encoder(params.model, params.data.image_size))
    loader = DataLoader(
        TwoViews(images, SimCLRTransform(input_size=params.data.image_size, gaussian_blur=0.0)),
        batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(params.seed),
    )
    criterion = NTXentLoss()
    optim = torch.optim.SGD(model.parameters(), lr=6e-2 * batch / 128, momentum=0.9,
                            weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optim, epochs)
    model.train()
    for _ in range(epochs):
        for x0, x1 in loader:
            loss = criterion(model(x0), model(x1))
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
        schedule.step()
    return model.backbone.eval()


def score(
    backbone: nn.Module, prepared: Path, params: Params, mean: list[float], std: list[float]
) -> dict[str, float]:
    """The probe stage's linear probe and kNN, cross-checked against lightly's ``knn_predict``."""
    from lightly.utils.benchmarking import knn_predict

    splits = {s: load_split(prepared, s) for s in SPLITS}
    cpu = torch.device("cpu")
    with torch.no_grad():
        f = [extract_features(backbone, x, mean, std, cpu, 512) for x, _ in splits.values()]
    y = [torch.from_numpy(labels) for _, labels in splits.values()]
    feats = Features(*f, *y)
    classes = load_manifest(prepared)["num_classes"]
    metrics, _, _ = evaluate_features(feats, classes, params)
    bank = nn.functional.normalize(feats.train, dim=1)
    query = nn.functional.normalize(feats.test, dim=1)
    theirs = knn_predict(query, bank.T.contiguous(), feats.y_train, classes, 200, 0.1)[:, 0]
    lightly_knn = (theirs == feats.y_test).float().mean().item()
    if abs(lightly_knn - metrics["knn_top1"]) > 0.002:  # ties may break differently
        raise WrongResult(f"kNN top-1 {metrics['knn_top1']:.4f} differs from lightly's "
                          f"knn_predict {lightly_knn:.4f} on the same features")
    return metrics


def train_product(raw: dict, overrides: dict, prepared: Path, out: Path) -> tuple[Path, float]:
    """``pretrain`` on ``raw`` params with ``overrides`` (by section) on top: encoder, seconds."""
    run_raw = {k: v | overrides.get(k, {}) if isinstance(v, dict) else v for k, v in raw.items()}
    started = time.perf_counter()
    layout = Layout(out, prepared_dir=prepared)
    pretrain.run(parse_params(run_raw), layout)
    return layout.encoder, time.perf_counter() - started


Row = tuple[float, float, float]
"""kNN top-1, linear top-1 and pretraining wall seconds of one trained encoder."""

LEAD, TIME_RATIO = 0.05, 0.5
"""Targets (issue 18), on the means over the seeds: the product's kNN and linear top-1 each at
least 5 points over lightly's, and its training wall time at most half of lightly's."""


def product_row(raw: dict, overrides: dict, prepared: Path, out: Path, name: str) -> Row:
    """Train the product's recipe with ``overrides``, score it and print its line."""
    params = parse_params(raw)
    manifest = load_manifest(prepared)
    encoder, seconds = train_product(raw, overrides, prepared, out)
    m = score(load_encoder(encoder)[0], prepared, params, manifest["mean"], manifest["std"])
    precision = Runtime.resolve(params, torch.device("cpu")).precision
    line(name, f"kNN {m['knn_top1']:.3f}", f"linear {m['linear_top1']:.3f}",
         f"pretrain {seconds:.0f} s", f"precision {precision}")
    return m["knn_top1"], m["linear_top1"], seconds


def lightly_row(raw: dict, prepared: Path, epochs: int, workers: int, name: str) -> Row:
    """Train lightly's recipe on the same prepared split, score it and print its line."""
    params = parse_params(raw)
    started = time.perf_counter()
    backbone = train_lightly(params, load_split(prepared, "train")[0], epochs, workers)
    seconds = time.perf_counter() - started
    m = score(backbone, prepared, params, IMAGENET["mean"], IMAGENET["std"])
    line(name, f"kNN {m['knn_top1']:.3f}", f"linear {m['linear_top1']:.3f}",
         f"pretrain {seconds:.0f} s", "precision fp32")
    return m["knn_top1"], m["linear_top1"], seconds


def mean_row(rows: list[Row]) -> Row:
    knn, linear, seconds = (float(np.mean(column)) for column in zip(*rows, strict=True))
    return knn, linear, seconds


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="each drives the split, weights, order and views of both recipes (0 1)")
    p.add_argument("--workers", type=int, default=2, help="lightly's DataLoader workers (2)")
    p.add_argument("--ablate", action="store_true",
                   help="also the product's recipe with each of lightly's choices swapped in "
                        "(first seed)")
    p.add_argument("--sweep", nargs="*", default=None, choices=list(CANDIDATES),
                   help="instead, only the product's recipe and each of these settings on it "
                        "(all if none is named), first seed")
    p.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_file = data_file(args.data, "cifar10-dev-train.npz")
    test_file = data_file(args.data, "cifar10-dev-test.npz")
    print(machine_line("quality vs lightly"), flush=True)
    rows: dict[str, list[Row]] = {}

    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        for i, seed in enumerate(args.seeds):
            raw = product_params(train_file, test_file, args.epochs, seed)
            prepared = Path(tmp) / f"prepared-{seed}"
            prepare(parse_params(raw).data, seed, prepared)
            runs: dict[str, dict] = {"product": {}}
            if args.sweep is not None:
                runs |= {name: CANDIDATES[name] for name in args.sweep or CANDIDATES}
            else:
                rows.setdefault("lightly", []).append(
                    lightly_row(raw, prepared, args.epochs, args.workers, f"lightly, seed {seed}"))
                if args.ablate and i == 0:
                    runs |= {f"product, lightly's {n}": o for n, o in LIGHTLY_CHOICES.items()}
            for j, (name, overrides) in enumerate(runs.items()):
                out = Path(tmp) / f"run-{seed}-{j}"
                rows.setdefault(name, []).append(
                    product_row(raw, overrides, prepared, out, f"{name}, seed {seed}"))
            if args.sweep is not None:
                return

    means = {name: mean_row(values) for name, values in rows.items()}
    (k_l, lin_l, s_l), (k_p, lin_p, s_p) = means["lightly"], means["product"]
    met = k_p - k_l >= LEAD and lin_p - lin_l >= LEAD and s_p / s_l <= TIME_RATIO
    line(f"product vs lightly, mean of {len(args.seeds)} seeds", f"kNN {k_p - k_l:+.3f}",
         f"linear {lin_p - lin_l:+.3f}", f"wall time {s_p / s_l:.2f}x lightly's",
         f"target: kNN and linear >= +{LEAD:.2f}, time <= {TIME_RATIO}x: "
         f"{'met' if met else 'NOT met'}")
    seeds = " ".join(map(str, args.seeds))
    table = ("| recipe | seeds | kNN top-1 | linear top-1 | pretrain wall s |\n"
             "| --- | --- | --- | --- | --- |\n"
             + "".join(f"| {n} | {seeds if len(rows[n]) > 1 else args.seeds[0]} | {k:.3f} | "
                       f"{lin:.3f} | {s:.0f} |\n" for n, (k, lin, s) in means.items()))
    print(table, end="")
    if args.out is not None:
        args.out.write_text(f"<!-- {machine_line('quality vs lightly')}; python bench/quality.py "
                            f"--epochs {args.epochs} --seeds {seeds} -->\n" + table)


if __name__ == "__main__":
    run(main)
