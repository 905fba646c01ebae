"""The CLIP table: ``train.method: clip`` with each text encoder on the CIFAR-10 development set.

The images of the two dev files get captions from their class names by CLIP's prompt templates
(``data.source: pairs`` with an ``.npz``); ``small_cnn`` and the text tower train with the
README's CIFAR recipe (``params/cifar.yaml``: SimCLR's views, batch 256, 20 epochs), AdamW (lr
0.002, weight decay 0.05) and a temperature learned from 0.07, through the ``prepare``,
``pretrain`` and ``probe`` stages in a temporary folder. Prints, for each text encoder and for
random-init towers, zero-shot top-1/top-5, Recall@1 both ways, the linear probe and the kNN, and
the pretraining's wall time (the README's "Images and captions" table).

    python bench/clip.py [--epochs 20] [--encoders transformer gru]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import _threads  # noqa: F401  (the command's thread policy, before torch loads)
import torch
from _common import data_file, line, load, machine_line, parser
from methods import recipe

from contrastive.config import parse_params
from contrastive.layout import Layout
from contrastive.stages import prepare, pretrain, probe

FIGURES = ("zero_shot_top1", "zero_shot_top5", "image_to_text_recall_at_1",
           "text_to_image_recall_at_1", "linear_top1", "knn_top1")


def clip_params(train_file: Path, test_file: Path, epochs: int, encoder: str) -> dict:
    """The CIFAR recipe on templated captions, with ``encoder`` as the text tower."""
    raw = recipe(train_file, test_file, epochs)
    raw["data"]["source"] = "pairs"
    raw["model"]["text_encoder"] = encoder
    raw["train"] |= {"method": "clip", "optimizer": "adamw", "lr": 0.002, "weight_decay": 0.05,
                     "temperature": 0.07}
    return raw


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--encoders", nargs="+", default=["transformer", "gru"],
                   choices=["transformer", "gru"])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_file = data_file(args.data, "cifar10-dev-train.npz")
    test_file = data_file(args.data, "cifar10-dev-test.npz")
    print(machine_line("clip"))
    with tempfile.TemporaryDirectory(prefix="bench-clip-") as tmp:
        for encoder in args.encoders:
            params = parse_params(clip_params(train_file, test_file, args.epochs, encoder))
            layout = Layout(Path(tmp) / encoder)
            prepare.run(params, layout)
            started = time.perf_counter()
            pretrain.run(params, layout)
            seconds = time.perf_counter() - started
            found = probe.run(params, layout)
            for name, row in (("pretrained", found["pretrained"]),
                              ("random init", found["random_init"])):
                line(f"{encoder} {name}", *(f"{k} {row[k]:.3f}" for k in FIGURES),
                     f"pretrain {seconds:.0f} s" if name == "pretrained" else "", load())


if __name__ == "__main__":
    main()
