"""Frozen-feature evaluation: feature extraction, a linear probe, weighted kNN and baselines.

The probe and kNN follow the usual self-supervised protocol (lightly, solo-learn): the encoder is
frozen, a multinomial logistic regression is fitted on train features with its L2 strength chosen on
val, and a weighted kNN (k=200, temperature 0.1, InstDisc / Wu et al. 2018) votes with the train
features. Both are reported on the test split, next to the same measures on a randomly initialised
encoder of the same architecture and on raw pixels, so the gain from pretraining is visible.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from contrastive import paths
from contrastive.config import ModelConfig, Params
from contrastive.data import load_manifest, load_split
from contrastive.files import atomic_path, write_json
from contrastive.models import LinearProbe, Preprocess, build_encoder, load_encoder, save_probe
from contrastive.runtime import resolve_device


@torch.inference_mode()
def extract_features(
    encoder: nn.Module,
    images: np.ndarray,
    mean: list[float],
    std: list[float],
    device: torch.device,
    batch_size: int = 512,
    desc: str | None = None,
) -> torch.Tensor:
    """Embeddings ``(N, D)`` on the CPU of uint8 images ``(N, H, W, 3)``, computed in batches."""
    encoder = encoder.to(device).eval()
    preprocess = Preprocess(mean, std).to(device)
    chunks = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None, leave=False):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        chunks.append(encoder(preprocess(batch)).float().cpu())
    return torch.cat(chunks)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Share of rows whose true label is among the ``k`` highest scores."""
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return hits.float().mean().item()


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores ``(Q, C)`` of a cosine-similarity kNN whose votes weigh ``exp(sim / t)``."""
    train = F.normalize(train_features, dim=1)
    k = min(k, len(train))
    out = []
    for start in range(0, len(query_features), chunk):
        query = F.normalize(query_features[start : start + chunk], dim=1)
        sim, idx = (query @ train.T).topk(k, dim=1)  # (q, k)
        weights = (sim / temperature).exp()
        votes = F.one_hot(train_labels[idx], num_classes).float()  # (q, k, C)
        out.append((votes * weights[..., None]).sum(dim=1))
    return torch.cat(out)


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int,
    seed: int,
) -> LinearProbe:
    """Multinomial logistic regression on standardised features, fitted with L-BFGS."""
    torch.manual_seed(seed)
    probe = LinearProbe(features.shape[1], num_classes)
    probe.feature_mean.copy_(features.mean(0))
    probe.feature_std.copy_(features.std(0).clamp_min(1e-6))
    standardized = (features - probe.feature_mean) / probe.feature_std
    linear = probe.linear
    optimizer = torch.optim.LBFGS(
        linear.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(standardized), labels)
        loss = loss + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe.eval()


@dataclass
class Features:
    """Frozen features and labels of the three splits."""

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    y_train: torch.Tensor
    y_val: torch.Tensor
    y_test: torch.Tensor


def evaluate_features(
    feats: Features, num_classes: int, params: Params
) -> tuple[dict[str, float], LinearProbe, torch.Tensor]:
    """Linear probe (L2 chosen on val) and kNN on test; returns metrics, probe, test predictions."""
    cfg = params.probe
    best: tuple[float, float, LinearProbe] | None = None
    for wd in cfg.weight_decays:
        probe = fit_linear_probe(
            feats.train, feats.y_train, num_classes, wd, cfg.max_iter, params.seed
        )
        with torch.no_grad():
            val_acc = topk_accuracy(probe(feats.val), feats.y_val, 1)
        if best is None or val_acc > best[0]:
            best = (val_acc, wd, probe)
    assert best is not None
    val_acc, wd, probe = best
    with torch.no_grad():
        linear = probe(feats.test)
    knn = knn_scores(
        feats.train, feats.y_train, feats.test, num_classes, cfg.knn_k, cfg.knn_temperature
    )
    metrics = {
        "linear_top1": topk_accuracy(linear, feats.y_test, 1),
        "linear_top5": topk_accuracy(linear, feats.y_test, 5),
        "linear_val_top1": val_acc,
        "linear_weight_decay": wd,
        "knn_top1": topk_accuracy(knn, feats.y_test, 1),
        "knn_top5": topk_accuracy(knn, feats.y_test, 5),
    }
    return {k: round(v, 6) for k, v in metrics.items()}, probe, linear.argmax(1)


def _encoder_features(
    encoder: nn.Module,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    mean: list[float],
    std: list[float],
    device: torch.device,
    batch_size: int,
    name: str,
) -> Features:
    f = {
        s: extract_features(encoder, x, mean, std, device, batch_size, f"{name} {s}")
        for s, (x, _) in splits.items()
    }
    y = {s: torch.from_numpy(labels) for s, (_, labels) in splits.items()}
    return Features(f["train"], f["val"], f["test"], y["train"], y["val"], y["test"])


def _pixel_features(
    splits: dict[str, tuple[np.ndarray, np.ndarray]], max_side: int = 32
) -> Features:
    """Raw pixels as features, downsampled to at most ``max_side`` so large images stay cheap."""

    def pixels(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
        if t.shape[-1] > max_side:
            t = F.interpolate(t, size=(max_side, max_side), mode="area")
        return t.flatten(1)

    f = {s: pixels(x) for s, (x, _) in splits.items()}
    y = {s: torch.from_numpy(labels) for s, (_, labels) in splits.items()}
    return Features(f["train"], f["val"], f["test"], y["train"], y["val"], y["test"])


def probe_stage(
    params: Params,
    prepared_dir: str | Path = paths.PREPARED,
    encoder_path: str | Path = paths.ENCODER,
    probe_path: str | Path = paths.PROBE,
    metrics_path: str | Path = paths.PROBE_METRICS,
    confusion_path: str | Path = paths.CONFUSION,
    embedding_plot: str | Path = paths.EMBEDDING_PLOT,
) -> dict:
    """Evaluate the pretrained encoder against a random-init encoder and raw pixels.

    Each output is written atomically at the end; a failure leaves the earlier outputs as they were.
    """
    device = resolve_device(params.device)
    manifest = load_manifest(prepared_dir)
    classes, num_classes = manifest["classes"], manifest["num_classes"]
    splits = {s: load_split(prepared_dir, s) for s in ("train", "val", "test")}
    encoder, info = load_encoder(encoder_path)

    pretrained = _encoder_features(
        encoder, splits, info.mean, info.std, device, params.probe.batch_size, "pretrained"
    )
    results, probe, predictions = evaluate_features(pretrained, num_classes, params)

    torch.manual_seed(params.seed)
    random_encoder = build_encoder(ModelConfig(**info.model), info.image_size)
    random_feats = _encoder_features(
        random_encoder, splits, info.mean, info.std, device, params.probe.batch_size, "random-init"
    )
    random_results, _, _ = evaluate_features(random_feats, num_classes, params)
    pixel_results, _, _ = evaluate_features(_pixel_features(splits), num_classes, params)

    metrics = {
        "pretrained": results,
        "random_init": random_results,
        "raw_pixels": pixel_results,
        "gain_over_random": {
            k: round(results[k] - random_results[k], 6) for k in ("linear_top1", "knn_top1")
        },
        "n_test": len(pretrained.y_test),
        "embedding_dim": info.embedding_dim,
    }
    save_probe(probe_path, probe)
    _write_confusion(confusion_path, pretrained.y_test, predictions, classes)
    plot_embedding(embedding_plot, pretrained.test, pretrained.y_test, classes, params.seed)
    write_json(metrics_path, metrics)
    return metrics


def _write_confusion(
    path: str | Path, actual: torch.Tensor, predicted: torch.Tensor, classes: list[str]
) -> None:
    """One row per test image, the shape DVC's ``confusion`` plot template reads."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["actual", "predicted"])
        for a, p in zip(actual.tolist(), predicted.tolist(), strict=True):
            writer.writerow([classes[a], classes[p]])


def plot_embedding(
    path: str | Path, features: torch.Tensor, labels: torch.Tensor, classes: list[str], seed: int
) -> None:
    """PCA and t-SNE maps of the test embeddings, coloured by class, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = F.normalize(features, dim=1).numpy()
    maps = {"PCA": PCA(n_components=2, random_state=seed).fit_transform(x)}
    if len(x) > 5:
        perplexity = min(30.0, (len(x) - 1) / 3)
        maps["t-SNE"] = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            x
        )
    fig, axes = plt.subplots(1, len(maps), figsize=(6 * len(maps), 5.5), squeeze=False)
    for ax, (name, xy) in zip(axes[0], maps.items(), strict=True):
        scatter = ax.scatter(xy[:, 0], xy[:, 1], c=labels.numpy(), cmap="tab10", s=8, alpha=0.8)
        ax.set_title(f"{name} of test embeddings ({len(x)} images)")
        ax.set_xticks([])
        ax.set_yticks([])
    handles = scatter.legend_elements(num=len(classes))[0]
    fig.legend(handles, classes, loc="center right", title="class", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
