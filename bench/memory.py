"""Peak memory of the stages ``prepare``, ``pretrain`` and ``probe``, and its growth with the data.

Each stage runs as its own process (``python -m contrastive.cli <stage>``, as DVC runs it) in a
temporary folder, and its peak resident memory (``ru_maxrss``) is read when it ends. Datasets:

- ``default``: ``params.yaml`` as it is (the digits), with ``train.epochs: 1`` (memory does not
  depend on the number of epochs; the kNN monitor runs at the end of that epoch);
- ``cifar``: the CIFAR-10 development set (4,500 train, 500 val, 1,000 test images of 32x32),
  SimCLR's CIFAR augmentation, 1 epoch;
- ``--growth``: the CIFAR set at 1x, 2x and 4x the training images (each copy mirrored or flipped,
  so no image is a duplicate), to show that memory grows only by what the data and its features
  take: the extra megabytes per extra thousand images are printed beside the size of those
  images and of their raw-pixel features (the probe's largest feature set).

Fails (exit 1) when a stage fails.

    python bench/memory.py [--datasets default,cifar] [--growth]   (default: --datasets default)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from _common import WrongResult, data_file, line, machine_line, parser, project_params, run

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "pretrain", "probe")
SIMCLR_CIFAR = {
    "hflip": 0.5,
    "saturation": 0.4,
    "hue": 0.1,
    "grayscale_prob": 0.2,
    "crop_scale": [0.2, 1.0],
}


def peak_mb(stage: str, folder: Path) -> tuple[float, float]:
    """Run ``contrastive <stage>`` in ``folder``; its peak resident memory in MB and seconds."""
    start = time.perf_counter()
    env = {**os.environ, "TQDM_DISABLE": "1", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "contrastive.cli", stage],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-10:])
        raise WrongResult(f"contrastive {stage} failed ({proc.returncode}) in {folder}:\n{tail}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # ru_maxrss: KiB on Linux


def run_stages(name: str, params: dict, folder: Path) -> dict[str, float]:
    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    measured = {stage: peak_mb(stage, folder) for stage in STAGES}
    peaks = {stage: mb for stage, (mb, _) in measured.items()}
    totals = json.loads((folder / "data" / "prepared" / "manifest.json").read_text())["totals"]
    line(
        f"memory {name}",
        *(f"{s} {mb:.0f} MB ({t:.0f} s)" for s, (mb, t) in measured.items()),
        f"({totals['train']} train, {totals['val']} val, {totals['test']} test images)",
    )
    return peaks | {"train": totals["train"]}


def copies(train: Path, factor: int, out: Path) -> Path:
    """The training .npz with ``factor`` distinct copies of every image (mirrored, flipped)."""
    with np.load(train) as npz:
        x, y, classes = npz["x"], npz["y"], npz["classes"]
    variants = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]][:factor]
    np.savez(out, x=np.concatenate(variants), y=np.tile(y, factor), classes=classes)
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--datasets", default="default", help="comma-separated: default, cifar (default: default)"
    )
    p.add_argument("--growth", action="store_true", help="also 1x, 2x and 4x the CIFAR images")
    args = p.parse_args()
    names = [n for n in args.datasets.split(",") if n]
    needs_cifar = "cifar" in names or args.growth
    if needs_cifar:
        train = data_file(args.data, "cifar10-dev-train.npz")
        test = data_file(args.data, "cifar10-dev-test.npz")
    print(machine_line("memory"), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        tmp = Path(tmp)

        def cifar(path: Path) -> dict:
            return project_params(
                {
                    "device": "cpu",
                    "augment": SIMCLR_CIFAR,
                    "data": {
                        "source": "npz",
                        "path": str(path),
                        "test_path": str(test),
                        "image_size": 32,
                    },
                    "train": {"epochs": 1, "knn_every": 1},
                }
            )

        if "default" in names:
            run_stages(
                "default", project_params({"train": {"epochs": 1, "knn_every": 1}}), tmp / "default"
            )
        if "cifar" in names:
            run_stages("cifar", cifar(train), tmp / "cifar")
        if args.growth:
            runs = {
                f: run_stages(
                    f"cifar {f}x", cifar(copies(train, f, tmp / f"train{f}.npz")), tmp / f"cifar{f}"
                )
                for f in (1, 2, 4)
            }
            extra = runs[4]["train"] - runs[1]["train"]
            per_k = {s: (runs[4][s] - runs[1][s]) / extra * 1000 for s in STAGES}
            pixels_mb = 32 * 32 * 3 * 1000 / 2**20
            line(
                "memory growth per 1000 images",
                *(f"{s} +{mb:.1f} MB" for s, mb in per_k.items()),
                f"(images {pixels_mb:.1f} MB, raw-pixel features {4 * pixels_mb:.1f} MB)",
            )


if __name__ == "__main__":
    run(main)
