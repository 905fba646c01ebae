"""Streaming against in-memory training batches: the same pretraining run, images/s of each.

Prepares ``--data`` (an npz file; default the CIFAR-10 dev subset, 4,500 32x32 images of which
about 3,600 become train) into a temporary folder with the project's ``params.yaml`` and
``data.source: npz``, then runs the ``pretrain`` stage's code for ``--epochs`` epochs with
``train.streaming: off`` (the split on the device) and ``on`` (read from the memory-mapped file by
``train.loader_workers`` DataLoader processes). The two runs train the same batches
(tests/test_streaming.py), so the loss is printed as a check. Prints images/s (mean of the
epochs after the first) and the load average before and after.

    python bench/streaming.py [--data ../shared/data/cifar10-dev-train.npz] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from contrastive.config import parse_params
from contrastive.data import map_split, prepare
from contrastive.layout import Layout
from contrastive.stages import pretrain

ROOT = Path(__file__).resolve().parents[1]


def params_for(data: Path, epochs: int, streaming: str, workers: int) -> Any:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["device"] = "cpu"
    raw["data"].update(source="npz", path=str(data), image_size=32)
    raw["train"].update(epochs=epochs, warmup_epochs=1, knn_every=0, streaming=streaming,
                        loader_workers=workers)
    return parse_params(raw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=ROOT.parent / "shared/data/cifar10-dev-train.npz")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = prepare(params_for(args.data, args.epochs, "off", 0).data, 0,
                           folder / "prepared")
        source, _ = map_split(folder / "prepared", "train")
        print(f"train split: {source.shape} uint8, {source.nbytes / 1e6:.1f} MB; "
              f"classes {manifest['num_classes']}")
        for streaming in ("off", "on"):
            out = folder / streaming
            layout = Layout(out, prepared_dir=folder / "prepared")
            metrics = pretrain.run(params_for(args.data, args.epochs, streaming, args.workers),
                                   layout)
            rows = layout.pretrain_history.read_text().split()[2:]  # after the header, epoch 1
            rates = [float(row.split(",")[3]) for row in rows]
            print(f"streaming {streaming}: {sum(rates) / len(rates):.1f} images/s "
                  f"(epochs 2-{args.epochs}: {rates}), final loss {metrics['final_loss']}, "
                  f"precision {metrics['precision']}, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
