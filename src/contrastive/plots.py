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

import numpy as np
import torch

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


def plot_note(path: str | Path, title: str, note: str) -> None:
    """A figure that says why a plot has nothing to show (data without classes have no confusion
    matrix and no leave-one-class-out anomaly rounds): the output still exists, and says so."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, note, ha="center", va="center", wrap=True)
    _save(fig, path)


def _save(fig: Any, path: str | Path) -> None:
    """Write matplotlib figure ``fig`` to ``path`` as PNG, atomically, and free it."""
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_embedding(
    path: str | Path,
    features: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    seed: int,
    tsne_points: int = 1000,
) -> dict[str, np.ndarray]:
    """PCA and t-SNE maps of the test embeddings, coloured by class (one colour when there are
    no ``classes``), side by side.

    PCA maps every embedding; t-SNE, which costs seconds per thousand points where PCA costs
    milliseconds, maps at most ``tsne_points`` of them, drawn with ``seed`` (0: no t-SNE map).
    Returns each map's 2-d coordinates.
    """
    import torch.nn.functional as F
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    plt = _pyplot()
    x, y = F.normalize(features, dim=1).numpy(), labels.numpy()
    maps = {"PCA": (PCA(n_components=2, random_state=seed).fit_transform(x), y)}
    keep = np.arange(len(x))
    if len(x) > tsne_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), tsne_points, replace=False))
    if len(keep) > 5:
        perplexity = min(30.0, (len(keep) - 1) / 3)
        tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed)
        maps["t-SNE"] = (tsne.fit_transform(x[keep]), y[keep])
    fig, axes = plt.subplots(1, len(maps), figsize=(6 * len(maps), 5.5), squeeze=False)
    scatters = []
    for ax, (name, (xy, colour)) in zip(axes[0], maps.items(), strict=True):
        # One colour scale for both maps, even when the t-SNE subsample lacks a class.
        by_class = {"c": colour, "cmap": "tab10", "vmin": 0, "vmax": len(classes) - 1}
        scatters.append(ax.scatter(xy[:, 0], xy[:, 1], s=8, alpha=0.8,
                                   **(by_class if classes else {})))
        shown = f"{len(xy)} of {len(x)}" if len(xy) < len(x) else f"{len(x)}"
        ax.set_title(f"{name} of test embeddings ({shown} images)")
        ax.set_xticks([])
        ax.set_yticks([])
    if classes:
        handles = scatters[0].legend_elements(num=None)[0]  # PCA: one per class present
        names = [classes[k] for k in np.unique(y)]
        fig.legend(handles, names, loc="center right", title="class", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return {name: xy for name, (xy, _) in maps.items()}


def plot_anomaly_histograms(
    path: str | Path, panels: dict[str, tuple[dict[int, tuple[np.ndarray, np.ndarray]], float]]
) -> None:
    """One histogram panel per feature set: the scores of normal and of anomalous test images,
    pooled over the leave-one-class-out rounds, with the mean AUROC in the title."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (name, (rounds, auroc)) in zip(axes[0], panels.items(), strict=True):
        normal = np.concatenate([n for n, _ in rounds.values()]) if rounds else np.zeros(0)
        anomalous = np.concatenate([a for _, a in rounds.values()]) if rounds else np.zeros(0)
        both = np.concatenate([normal, anomalous])
        bins = np.linspace(both.min(), both.max(), 41) if len(both) else 40
        ax.hist(normal, bins=bins, density=True, alpha=0.6, label="normal (other classes)")
        ax.hist(anomalous, bins=bins, density=True, alpha=0.6, label="anomalous (held-out class)")
        ax.set_title(f"{name}: mean AUROC {auroc:.3f}")
        ax.set_xlabel("deep-kNN score (mean cosine distance)")
    axes[0][0].set_ylabel("density")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
