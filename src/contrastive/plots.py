"""The stages' plots as PNG images, drawn with matplotlib: what ``dvc plots show`` displays.

DVC draws CSV plots with Vega, which its HTML page loads from a CDN: offline, the page shows blank
plots. Images need nothing: ``dvc.yaml`` declares these PNGs as the plots (the CSVs stay outputs,
for ``dvc plots show plots/pretrain.csv -x epoch -y loss`` where a network is reachable), and the
register stage logs them to MLflow too.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import Any

from contrastive.files import atomic_path


def _pyplot() -> Any:
    """matplotlib.pyplot on the file backend, imported only when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rows(path: str | Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


def plot_training(history_csv: str | Path, knn_csv: str | Path, path: str | Path) -> None:
    """Loss and learning rate per epoch, and the kNN top-1 on val, side by side, into ``path``."""
    plt = _pyplot()
    history, knn = _rows(history_csv), _rows(knn_csv)
    fig, (loss_ax, knn_ax) = plt.subplots(1, 2, figsize=(11, 4))
    epochs = [int(float(r["epoch"])) for r in history]
    loss_ax.plot(epochs, [float(r["loss"]) for r in history], color="tab:blue")
    loss_ax.set(title="Contrastive loss", xlabel="epoch", ylabel="loss")
    lr_ax = loss_ax.twinx()
    lr_ax.plot(epochs, [float(r["lr"]) for r in history], color="tab:gray", linestyle="--")
    lr_ax.set_ylabel("learning rate (dashed)")
    knn_ax.plot([int(float(r["epoch"])) for r in knn], [float(r["knn_top1"]) for r in knn],
                marker="o", color="tab:green")
    knn_ax.set(title="kNN top-1 on val", xlabel="epoch", ylabel="top-1")
    fig.tight_layout()
    _save(fig, path)


def plot_confusion(confusion_csv: str | Path, classes: list[str], path: str | Path) -> None:
    """The confusion matrix of ``confusion_csv`` (one ``actual,predicted`` row per test image)."""
    plt = _pyplot()
    counts = Counter((r["actual"], r["predicted"]) for r in _rows(confusion_csv))
    matrix = [[counts[(a, p)] for p in classes] for a in classes]
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=90)
    ax.set_yticks(ticks, classes)
    ax.set(title="Linear probe on test: confusion", xlabel="predicted", ylabel="actual")
    if len(classes) <= 20:
        peak = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, n in enumerate(row):
                if n:
                    ax.text(j, i, n, ha="center", va="center", fontsize=7,
                            color="white" if n > peak / 2 else "black")
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: str | Path) -> None:
    """Write matplotlib figure ``fig`` to ``path`` as PNG, atomically, and free it."""
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
