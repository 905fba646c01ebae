"""Benchmark 1, views: the project's batched per-sample augmentation against torchvision's.

Both make one SimCLR view of every image of the CIFAR-10 development set (32x32) with the same
operations and parameters (``AugmentConfig()``: SimCLR's CIFAR recipe, random resized crop of
scale 0.2-1, flip 0.5, colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale 0.2), one pass over the
images per round, the two taking turns:

- project: ``SimCLRViews`` on batches in the main process;
- reference: torchvision ``transforms.v2`` applied one image at a time in a ``DataLoader`` with one
  worker process per core (the common way).

Fails (exit 1) when the project's views are not float32 (N, 3, 32, 32) in [0, 1], are not drawn
per sample, or their statistics (pixel mean and std per channel, share of gray views) differ from
torchvision's beyond sampling noise.

    python bench/views.py [--rounds 3] [--batch 512] [--intra-op]
"""

from __future__ import annotations

import os

import numpy as np
import torch
from _common import (
    WrongResult,
    data_file,
    interleaved,
    line,
    machine_line,
    median,
    parser,
    run,
    verdict,
)
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from contrastive.augment import CPU_CHUNK_PIXELS, SimCLRViews
from contrastive.config import AugmentConfig

TARGET = 10.0


def torchvision_pipeline(cfg: AugmentConfig, size: int) -> v2.Compose:
    """The same operations and parameters as ``SimCLRViews(cfg, size)``, per image.

    Colour jitter is four one-op ``ColorJitter``s, so that it runs brightness, contrast,
    saturation, hue in the project's fixed order (one ``ColorJitter`` shuffles the order per call,
    which makes views a little more varied and the contrastive task a little harder).
    """
    jitter = [v2.ColorJitter(brightness=cfg.brightness), v2.ColorJitter(contrast=cfg.contrast),
              v2.ColorJitter(saturation=cfg.saturation), v2.ColorJitter(hue=cfg.hue)]
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(cfg.hflip),
        v2.RandomApply([v2.Compose(jitter)], p=cfg.jitter_prob),
        v2.RandomGrayscale(cfg.grayscale_prob),
        v2.ToDtype(torch.float32, scale=True),
    ])


class PerSample(Dataset):
    """uint8 CHW images through a per-image transform: what a DataLoader worker runs."""

    def __init__(self, images: torch.Tensor, transform: v2.Compose) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[i])


def statistics_of(views: torch.Tensor) -> dict[str, np.ndarray | float]:
    gray = (views[:, 0] == views[:, 1]).all(dim=(1, 2)) & (views[:, 1] == views[:, 2]).all(
        dim=(1, 2)
    )
    return {
        "mean": views.mean(dim=(0, 2, 3)).numpy(),
        "std": views.std(dim=(0, 2, 3)).numpy(),
        "gray": gray.double().mean().item(),
    }


def check(project: torch.Tensor, reference: torch.Tensor, views: SimCLRViews,
          images: torch.Tensor) -> str:
    """Raise :class:`WrongResult` unless the project's views are right; return a summary."""
    n, size = len(images), views.image_size
    if project.shape != (n, 3, size, size) or project.dtype != torch.float32:
        raise WrongResult(f"views: got {project.dtype} {tuple(project.shape)}, "
                          f"expected float32 {(n, 3, size, size)}")
    if not (project.min() >= 0 and project.max() <= 1 and torch.isfinite(project).all()):
        raise WrongResult("views: values outside [0, 1]")
    same = images[:1].expand(64, -1, -1, -1)
    flat = views(same, torch.Generator().manual_seed(1)).flatten(1)
    distances = torch.cdist(flat, flat).fill_diagonal_(float("inf"))
    if distances.min() < 1e-3:
        raise WrongResult("views: two copies of one image got the same view (not per sample)")
    ours, theirs = statistics_of(project), statistics_of(reference)
    # Sampling noise of 5000 views is ~0.003 on the means and ~0.006 on the gray share; the crop
    # resampling differs slightly (roi_align vs antialiased resize), which moves the std a little.
    for key, tol in (("mean", 0.02), ("std", 0.02), ("gray", 0.03)):
        gap = float(np.max(np.abs(np.asarray(ours[key]) - np.asarray(theirs[key]))))
        if gap > tol:
            raise WrongResult(f"views: {key} differs from torchvision's by {gap:.4f} "
                              f"(limit {tol}): project {ours[key]}, torchvision {theirs[key]}")
    def fmt(values: np.ndarray) -> str:
        return "/".join(f"{v:.3f}" for v in values)

    return (f"project vs torchvision: channel means {fmt(ours['mean'])} vs {fmt(theirs['mean'])}, "
            f"stds {fmt(ours['std'])} vs {fmt(theirs['std'])}, "
            f"gray share {ours['gray']:.3f} vs {theirs['gray']:.3f}")


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="timed passes of each (default 3)")
    p.add_argument("--batch", type=int, default=512, help="images per batch (default 512)")
    p.add_argument("--workers", type=int, default=None,
                   help="reference DataLoader workers (default: one per core)")
    p.add_argument("--intra-op", action="store_true",
                   help="also time the project's ops spread over torch's intra-op threads "
                        "(the previous implementation)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = args.workers or len(os.sched_getaffinity(0))
    path = data_file(args.data, "cifar10-dev-train.npz")
    with np.load(path) as npz:
        images = torch.from_numpy(npz["x"])  # uint8 (N, 32, 32, 3)
    n, size, batch = len(images), images.shape[1], args.batch
    cfg = AugmentConfig()
    views = SimCLRViews(cfg, size)
    print(machine_line("views"))
    print(f"# {n} images of {size}x{size}, batch {batch}, {args.rounds} rounds; reference: "
          f"torchvision.transforms.v2 per image in a DataLoader with {workers} workers", flush=True)

    loader = DataLoader(PerSample(images.permute(0, 3, 1, 2).contiguous(),
                                  torchvision_pipeline(cfg, size)),
                        batch_size=batch, num_workers=workers, persistent_workers=workers > 0)
    out: dict[str, torch.Tensor] = {}

    def reference() -> None:
        out["reference"] = torch.cat(list(loader))

    def project() -> None:
        generator = torch.Generator().manual_seed(0)
        out["project"] = torch.cat([views(images[i:i + batch], generator)
                                    for i in range(0, n, batch)])

    def intra_op() -> None:  # the previous CPU path: chunks in turn, each op on all threads
        generator = torch.Generator().manual_seed(0)
        chunk = max(1, CPU_CHUNK_PIXELS // size**2)
        for i in range(0, n, batch):
            b = images[i:i + batch]
            params = views.draw(len(b), size, size, generator)
            for j in range(0, len(b), chunk):
                views.apply(b[j:j + chunk], params[j:j + chunk])

    fns = {"reference": reference, "project": project}
    if args.intra_op:
        fns["intra_op"] = intra_op
    times = interleaved(fns, args.rounds)
    summary = check(out["project"], out["reference"], views, images)
    rate = {name: n / median(t) for name, t in times.items()}
    ratio = rate["project"] / rate["reference"]
    line("views img/s", f"project {rate['project']:.0f}", f"torchvision {rate['reference']:.0f}",
         f"ratio {ratio:.1f}x", verdict(ratio, TARGET))
    if args.intra_op:
        line("views img/s intra-op", f"project (per-op threads) {rate['intra_op']:.0f}",
             f"ratio to project {rate['project'] / rate['intra_op']:.1f}x")
    print(f"# check passed: {summary}", flush=True)


if __name__ == "__main__":
    run(main)
