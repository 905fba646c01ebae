"""The methods table: every contrastive method at the same budget on the CIFAR-10 development set.

Each method pretrains ``small_cnn`` with the README's CIFAR recipe (SimCLR's views, batch 256,
SGD, 20 epochs, warm-up 2, weight decay 5e-4; each method's own params from ``params.yaml``),
then the ``probe`` stage's protocol scores the frozen features on the test split: the linear
probe (L2 chosen on val) and the weighted kNN (k=200, t=0.1). ``--vit METHOD`` adds ``vit_tiny``
trained with that method. Prints one line per row, then the table (``--out FILE`` also writes it
there). The same rows through DVC: ``docs/methods.md``.

    python bench/methods.py [--epochs 20] [--methods simclr moco ...] [--vit simclr]
                            [--precision fp32|bf16] [--seed 0]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import _threads  # noqa: F401  (the command's thread policy, before torch loads)
import torch
from _common import ROOT, data_file, line, machine_line, parser, project_params, run

from contrastive.config import METHODS, parse_params
from contrastive.data import SPLITS, load_manifest, load_split, prepare
from contrastive.evaluate import Features, evaluate_features
from contrastive.features import extract_features
from contrastive.layout import Layout
from contrastive.models import load_encoder
from contrastive.stages import pretrain


def recipe(data: Path, test: Path, epochs: int, precision: str = "auto") -> dict:
    """``params.yaml`` with the CIFAR recipe (``params/cifar.yaml``) on top, on the ``data`` and
    ``test`` files, for ``epochs`` (the warm-up kept shorter), no kNN monitor; channels_last
    follows ``precision``."""
    import yaml

    raw = project_params(yaml.safe_load((ROOT / "params" / "cifar.yaml").read_text()))
    channels_last = {"auto": "auto", "bf16": "on", "fp32": "off"}[precision]
    raw["device"] = "cpu"
    raw["data"] |= {"source": "npz", "path": str(data), "test_path": str(test)}
    warmup = min(raw["train"]["warmup_epochs"], epochs - 1)
    raw["train"] |= {"epochs": epochs, "warmup_epochs": warmup, "knn_every": 0,
                     "precision": precision, "channels_last": channels_last}
    return raw


def score(encoder: torch.nn.Module, prepared: Path, raw: dict) -> dict[str, float]:
    """The probe stage's linear probe and kNN on frozen features."""
    params = parse_params(raw)
    manifest = load_manifest(prepared)
    splits = {s: load_split(prepared, s) for s in SPLITS}
    cpu = torch.device("cpu")
    f = [extract_features(encoder, x, manifest["mean"], manifest["std"], cpu, 512)
         for x, _ in splits.values()]
    y = [torch.from_numpy(labels) for _, labels in splits.values()]
    metrics, _, _ = evaluate_features(Features(*f, *y), manifest["num_classes"], params)
    return metrics


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    image_only = [m for m in METHODS if m != "clip"]  # clip: bench/clip.py
    p.add_argument("--methods", nargs="+", default=image_only, choices=image_only)
    p.add_argument("--vit", choices=image_only, default=None,
                   help="also train vit_tiny (patch 4) with this method")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--seed", type=int, default=0, help="drives weights, order and views (0)")
    p.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train_file = data_file(args.data, "cifar10-dev-train.npz")
    test_file = data_file(args.data, "cifar10-dev-test.npz")
    print(machine_line("methods"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as tmp:
        tmp = Path(tmp)
        base = recipe(train_file, test_file, args.epochs, args.precision) | {"seed": args.seed}
        prepared = tmp / "prepared"
        prepare(parse_params(base).data, base["seed"], prepared)
        runs = [(m, "small_cnn") for m in args.methods]
        if args.vit:
            runs.append((args.vit, "vit_tiny"))
        for method, encoder in runs:
            raw = base | {"train": base["train"] | {"method": method},
                          "model": base["model"] | {"encoder": encoder}}
            out = tmp / f"{method}-{encoder}"
            started = time.perf_counter()
            layout = Layout(out, prepared_dir=prepared)
            metrics = pretrain.run(parse_params(raw), layout)
            seconds = time.perf_counter() - started
            probe = score(load_encoder(layout.encoder)[0], prepared, raw)
            row = (method, encoder, probe["knn_top1"], probe["linear_top1"], seconds,
                   metrics["images_per_s"])
            rows.append(row)
            line(f"{method} {encoder}", f"kNN {row[2]:.3f}", f"linear {row[3]:.3f}",
                 f"pretrain {seconds:.0f} s", f"{row[5]:.0f} img/s")
    header = ("| method | encoder | kNN top-1 | linear top-1 | pretrain wall s | images/s |\n"
              "| --- | --- | --- | --- | --- | --- |\n")
    body = "".join(f"| {m} | {e} | {k:.3f} | {lin:.3f} | {s:.0f} | {r:.0f} |\n"
                   for m, e, k, lin, s, r in rows)
    if args.out is not None:
        args.out.write_text(f"<!-- {machine_line('methods')}; python bench/methods.py "
                            f"--epochs {args.epochs} --precision {args.precision} -->\n"
                            + header + body)
    print(header + body, end="")


if __name__ == "__main__":
    run(main)
