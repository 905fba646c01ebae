"""GPU benchmark: a pretraining epoch of the CIFAR-style ResNet-18 on one CUDA GPU.

50,000 random 32x32 images (two views each), batch 512, through the project's own training code
(``contrastive.train.pretrain`` with ``device: cuda``, ``precision: auto`` = bf16 autocast,
``channels_last: auto`` = on, fused SGD, views generated on the GPU by ``SimCLRViews`` with SimCLR's
CIFAR recipe). Prints the epoch time and images/s of every epoch (epoch 1 includes cuDNN's
autotuning and allocator warm-up; the figure is the median of the later ones) and the share of an
epoch spent in augmentation (the same number of view batches timed alone, with synchronisation).
Goal on one H200: an epoch in at most 6 s.

Without CUDA it refuses with one line and exit status 2. ``--allow-cpu`` runs the same code on the
CPU with a small configuration, to check the script itself, not to measure anything.

    python bench/gpu.py [--epochs 3] [--images 50000] [--batch 512] [--compile]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
from _common import WrongResult, line, machine_line, parser, run

from contrastive.augment import SimCLRViews
from contrastive.config import AugmentConfig, load_params, parse_params
from contrastive.layout import Layout
from contrastive.stages import pretrain

ROOT = Path(__file__).resolve().parents[1]
GOAL_S = 6.0


def write_prepared(folder: Path, n: int, size: int, seed: int) -> None:
    """A prepared directory (the stage ``prepare``'s format) of ``n`` random training images."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    classes = [str(k) for k in range(10)]
    for split, count in (("train", n), ("val", 100), ("test", 100)):
        x = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
        np.savez(folder / f"{split}.npz", x=x, y=rng.integers(0, 10, count, dtype=np.int64))
    manifest = {"source": "random", "image_size": size, "classes": classes, "num_classes": 10,
                "mean": [0.5, 0.5, 0.5], "std": [0.29, 0.29, 0.29],
                "data_hash": f"random-{n}-{size}-{seed}",
                "totals": {"train": n, "val": 100, "test": 100}}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def augment_seconds(n: int, size: int, batch: int, device: torch.device, seed: int) -> float:
    """Seconds for one epoch's worth of view pairs alone (``n // batch`` batches, two views)."""
    images = torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed)).to(device)
    views = SimCLRViews(AugmentConfig(), size)
    generator = torch.Generator(device=device).manual_seed(seed)
    order = torch.randperm(n, device=device, generator=generator)

    def epoch() -> None:
        for step in range(n // batch):
            b = images[order[step * batch:(step + 1) * batch]]
            torch.cat([views(b, generator), views(b, generator)])
        if device.type == "cuda":
            torch.cuda.synchronize()

    epoch()  # warm-up
    start = time.perf_counter()
    epoch()
    return time.perf_counter() - start


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3, help="epochs (default 3; epoch 1 is warm-up)")
    p.add_argument("--images", type=int, default=50_000, help="random images (default 50000)")
    p.add_argument("--batch", type=int, default=512, help="batch size (default 512)")
    p.add_argument("--encoder", default="resnet18_cifar", help="model.encoder (resnet18_cifar)")
    p.add_argument("--compile", action="store_true", help="train.compile: true (torch.compile)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="run on the CPU with a small configuration: checks the script only")
    args = p.parse_args()
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.allow_cpu:
        device = torch.device("cpu")
        args.images, args.batch, args.encoder, args.epochs = 1024, 256, "small_cnn", 2
    else:
        print("bench/gpu.py: no CUDA GPU here (torch.cuda.is_available() is False); run it on a "
              "machine with one, or pass --allow-cpu to check the script on the CPU",
              file=sys.stderr)
        sys.exit(2)
    size = 32
    raw = load_params(ROOT / "params.yaml").model_dump(mode="json")
    raw["device"] = device.type
    raw["model"]["encoder"] = args.encoder
    raw["augment"] = AugmentConfig().model_dump(mode="json")
    raw["train"] |= {"epochs": args.epochs, "batch_size": args.batch, "knn_every": 0,
                     "warmup_epochs": 1, "compile": args.compile}
    params = parse_params(raw)

    print(machine_line("gpu"))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(f"# {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
              f"cuDNN {torch.backends.cudnn.version()}", flush=True)
    else:
        print("# --allow-cpu: a check of the script on the CPU, not a measurement", flush=True)
    print(f"# {args.encoder}, {args.images} random {size}x{size} images x 2 views, batch "
          f"{args.batch}, {args.epochs} epochs, compile {args.compile}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        tmp = Path(tmp)
        write_prepared(tmp / "prepared", args.images, size, params.seed)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        layout = Layout(tmp, prepared_dir=tmp / "prepared")
        metrics = pretrain.run(params, layout)
        wall = time.perf_counter() - started
        history = torch.load(layout.checkpoints / "last.pt", weights_only=True)["history"]
    if not all(np.isfinite(h["loss"]) for h in history):
        raise WrongResult(f"loss not finite: {[h['loss'] for h in history]}")
    steps = args.images // args.batch
    per_epoch = [steps * args.batch / h["images_per_s"] for h in history]
    for h, seconds in zip(history, per_epoch, strict=True):
        line(f"gpu epoch {h['epoch']}", f"{seconds:.2f} s", f"{h['images_per_s']:.0f} img/s",
             f"loss {h['loss']:.4f}")
    epoch_s = statistics.median(per_epoch[1:] or per_epoch)
    aug_s = augment_seconds(args.images, size, args.batch, device, params.seed)
    peak = (f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            if device.type == "cuda" else "CPU check")
    line("gpu epoch", f"{epoch_s:.2f} s", f"{steps * args.batch / epoch_s:.0f} img/s",
         f"augmentation {aug_s:.2f} s ({aug_s / epoch_s:.0%} of an epoch)", peak,
         f"precision {metrics['precision']}",
         f"goal <= {GOAL_S:g} s: {'met' if epoch_s <= GOAL_S else 'NOT met'}"
         if device.type == "cuda" else "goal: n/a on the CPU")
    print(f"# whole run {wall:.1f} s (set-up, {args.epochs} epochs, checkpoints)", flush=True)


if __name__ == "__main__":
    run(main)
