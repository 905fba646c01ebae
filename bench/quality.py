"""Quality side by side with lightly: the README's CIFAR recipe against lightly's SimCLR recipe.

Both train the same ``small_cnn`` backbone on the CIFAR-10 development subset for the same
epochs at the same batch size, one after the other in this process, and both are scored by the
same evaluation on frozen backbone features: the ``probe`` stage's linear probe (L2 chosen on
val) and the weighted kNN (k=200, t=0.1), which is cross-checked against lightly's
``knn_predict`` on the same features (the run fails if they disagree).

- **product**: ``pretrain`` with ``params.yaml`` and the README's CIFAR overrides (SimCLR's views
  computed in batches, temperature 0.2, SGD lr 0.3 per 256 with warm-up and cosine decay,
  ``precision: auto``).
- **lightly**: lightly's CIFAR-10 benchmark recipe (``docs/.../cifar10_benchmark.py``):
  ``SimCLRTransform(input_size=32, gaussian_blur=0)`` per sample in DataLoader workers,
  ``SimCLRProjectionHead(d, d, 128)``, ``NTXentLoss()`` (temperature 0.5), SGD lr 0.06 per 128
  with momentum 0.9 and weight decay 5e-4, cosine annealing over the epochs, fp32.

Prints one line per recipe and the ratios. ``--ablate`` then trains the product's recipe once
more for each of lightly's choices swapped in (its temperature, its views, its optimiser
schedule), to say which choices make the difference. Needs the ``bench`` dependency group
(``uv sync --group bench``), which holds lightly.

    python bench/quality.py [--epochs 20] [--seed 0] [--workers 2] [--ablate] [--out FILE]
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
from contrastive.evaluate import Features, evaluate_features, extract_features
from contrastive.models import build_encoder, load_encoder
from contrastive.runtime import resolve_precision
from contrastive.train import pretrain

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
    pretrain(parse_params(run_raw), prepared, out / "encoder.pt", out / "checkpoints",
             out / "pretrain.json", out / "pretrain.csv", out / "knn.csv")
    return out / "encoder.pt", time.perf_counter() - started


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="drives weights, order and views (0)")
    p.add_argument("--workers", type=int, default=2, help="lightly's DataLoader workers (2)")
    p.add_argument("--ablate", action="store_true",
                   help="also the product's recipe with each of lightly's choices swapped in")
    p.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_file = data_file(args.data, "cifar10-dev-train.npz")
    test_file = data_file(args.data, "cifar10-dev-test.npz")
    print(machine_line("quality vs lightly"))
    raw = product_params(train_file, test_file, args.epochs, args.seed)
    params = parse_params(raw)
    precision = "bf16" if resolve_precision(params.train, torch.device("cpu"))[0] else "fp32"
    rows: dict[str, tuple[float, float, float]] = {}

    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        tmp = Path(tmp)
        prepared = tmp / "prepared"
        prepare(params.data, params.seed, prepared)
        manifest = load_manifest(prepared)

        started = time.perf_counter()
        backbone = train_lightly(params, load_split(prepared, "train")[0], args.epochs,
                                 args.workers)
        seconds = time.perf_counter() - started
        m = score(backbone, prepared, params, IMAGENET["mean"], IMAGENET["std"])
        rows["lightly"] = (m["knn_top1"], m["linear_top1"], seconds)
        line("lightly", f"kNN {m['knn_top1']:.3f}",
             f"linear {m['linear_top1']:.3f}", f"pretrain {seconds:.0f} s")

        runs = {"product": {}}
        if args.ablate:
            runs |= {f"product, lightly's {name}": o for name, o in LIGHTLY_CHOICES.items()}
        for i, (name, overrides) in enumerate(runs.items()):
            encoder, seconds = train_product(raw, overrides, prepared, tmp / f"product-{i}")
            m = score(load_encoder(encoder)[0], prepared, params, manifest["mean"],
                      manifest["std"])
            rows[name] = (m["knn_top1"], m["linear_top1"], seconds)
            line(name, f"kNN {m['knn_top1']:.3f}", f"linear {m['linear_top1']:.3f}",
                 f"pretrain {seconds:.0f} s", f"precision {precision}")

    (k_l, lin_l, s_l), (k_p, lin_p, s_p) = rows["lightly"], rows["product"]
    line("product vs lightly", f"kNN {k_p - k_l:+.3f}", f"linear {lin_p - lin_l:+.3f}",
         f"wall time {s_l / s_p:.2f}x faster", "target: as accurate, >= 2x faster: "
         + ("met" if k_p >= k_l - 0.01 and lin_p >= lin_l - 0.01 and s_l / s_p >= 2 else "NOT met"))
    table = ("| recipe | kNN top-1 | linear top-1 | pretrain wall s |\n| --- | --- | --- | --- |\n"
             + "".join(f"| {n} | {k:.3f} | {lin:.3f} | {s:.0f} |\n"
                       for n, (k, lin, s) in rows.items()))
    print(table, end="")
    if args.out is not None:
        args.out.write_text(f"<!-- {machine_line('quality vs lightly')}; python bench/quality.py "
                            f"--epochs {args.epochs} --seed {args.seed} -->\n" + table)


if __name__ == "__main__":
    run(main)
