"""Cost growth: the time of a pretraining epoch for 1x, 2x and 4x the images.

The project's ``pretrain`` (``params.yaml``'s model, batch and optimiser; SimCLR's CIFAR
augmentation; CPU defaults unless ``--precision``) on ``--images`` CIFAR-10 development images
(1x), and on 2 and 4 distinct copies of them (mirrored, flipped). An untimed 1x epoch warms up
first; then one epoch of each size, in turn, ``--rounds`` times. Growth is linear when the seconds
per 1,000 images stay the same: the line prints them and their 4x/1x ratio (1.00 is linear;
epochs hold whole batches only, so the image counts are not exactly 1:2:4). Fails (exit 1) when
a loss is not finite.

    python bench/scale.py [--images 1024] [--rounds 1] [--precision auto]
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from _common import WrongResult, data_file, line, machine_line, parser, run

from contrastive.config import AugmentConfig, DataConfig, Params, load_params, parse_params
from contrastive.data import prepare
from contrastive.layout import Layout
from contrastive.stages import pretrain

ROOT = Path(__file__).resolve().parents[1]


def copies(train: Path, per_class: int, factor: int, out: Path) -> Path:
    """``per_class`` images of every class, in ``factor`` distinct copies (mirrored, flipped)."""
    with np.load(train) as npz:
        x, y, classes = npz["x"], npz["y"], npz["classes"]
    keep = np.sort(np.concatenate([np.flatnonzero(y == k)[:per_class] for k in np.unique(y)]))
    x, y = x[keep], y[keep]
    variants = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]][:factor]
    np.savez(out, x=np.concatenate(variants), y=np.tile(y, factor), classes=classes)
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1024, help="images at 1x (default 1024)")
    p.add_argument("--rounds", type=int, default=1, help="timed epochs of each size (default 1)")
    p.add_argument("--precision", default="auto", help="train.precision (default auto)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train = data_file(args.data, "cifar10-dev-train.npz")
    test = data_file(args.data, "cifar10-dev-test.npz")
    raw = load_params(ROOT / "params.yaml").model_dump(mode="json")
    raw["device"] = "cpu"
    raw["augment"] = AugmentConfig().model_dump(mode="json")
    raw["train"] |= {"epochs": 1, "knn_every": 0, "warmup_epochs": 0,
                     "precision": args.precision}
    print(machine_line("scale"), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        tmp = Path(tmp)
        prepared: dict[int, Path] = {}
        for factor in (1, 2, 4):
            source = copies(train, math.ceil(args.images / 10), factor, tmp / f"x{factor}.npz")
            cfg = DataConfig(source="npz", path=str(source), test_path=str(test), image_size=32,
                             val_fraction=0.01)
            prepare(cfg, raw["seed"], tmp / f"prepared{factor}")
            prepared[factor] = tmp / f"prepared{factor}"
        params = parse_params(raw)

        def epoch_seconds(factor: int) -> tuple[float, int]:
            out = tmp / f"run{factor}"
            layout = Layout(out, prepared_dir=prepared[factor])
            pretrain.run(params, layout)
            state = torch.load(layout.checkpoints / "last.pt", weights_only=True)
            h = state["history"][-1]
            if not math.isfinite(h["loss"]):
                raise WrongResult(f"{factor}x: loss {h['loss']}")
            (layout.checkpoints / "last.pt").unlink()  # the next round starts afresh
            images = _images(prepared[factor], params)
            return images / h["images_per_s"], images

        epoch_seconds(1)  # warm-up
        times: dict[int, list[float]] = {1: [], 2: [], 4: []}
        images: dict[int, int] = {}
        for _ in range(args.rounds):
            for factor in times:
                seconds, images[factor] = epoch_seconds(factor)
                times[factor].append(seconds)
    epoch = {f: statistics.median(t) for f, t in times.items()}
    per_k = {f: epoch[f] / images[f] * 1000 for f in epoch}
    line("epoch time 1x/2x/4x",
         *(f"{f}x {images[f]} img {epoch[f]:.1f} s ({per_k[f]:.2f} s/1000 img)" for f in epoch),
         f"cost per image 4x/1x {per_k[4] / per_k[1]:.2f} (linear: 1.00)",
         f"precision {'bf16' if args.precision == 'bf16' else 'fp32'}")


def _images(prepared: Path, params: Params) -> int:
    """Images per epoch: whole batches of the training split."""
    n = json.loads((prepared / "manifest.json").read_text())["totals"]["train"]
    return n // params.train.batch_size * params.train.batch_size


if __name__ == "__main__":
    run(main)
