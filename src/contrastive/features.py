"""Frozen features and the weighted kNN classifier on them: what the kNN monitor needs while
training and the probe stage after it.

Kept apart from :mod:`contrastive.evaluate` (the linear probe, retrieval, anomaly detection and
baselines) so that the ``pretrain`` stage depends on this alone: a change to an evaluation
metric does not rerun pretraining.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from contrastive.models import Preprocess


@torch.inference_mode()
def extract_features(
    encoder: nn.Module,
    images: np.ndarray,
    mean: list[float],
    std: list[float],
    device: torch.device,
    batch_size: int = 512,
    desc: str | None = None,
    bf16: bool = False,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """Embeddings ``(N, D)`` float32 on the CPU of uint8 images ``(N, H, W, 3)``, computed in
    batches; ``bf16`` and ``memory_format`` as in training (the kNN monitor), else fp32 NCHW."""
    encoder = encoder.to(device).eval()
    preprocess = Preprocess(mean, std).to(device)
    chunks = []
    starts = range(0, len(images), batch_size)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for start in tqdm(starts, desc=desc, disable=desc is None, leave=False):
            batch = torch.from_numpy(images[start : start + batch_size]).to(device)
            x = preprocess(batch).contiguous(memory_format=memory_format)
            chunks.append(encoder(x).float().cpu())
    return torch.cat(chunks)


KNN_K_CAP = 200
"""``probe.knn_k: auto`` uses at most this many neighbours: the CIFAR protocol's k."""


def resolve_knn_k(setting: int | str, train_labels: np.ndarray | torch.Tensor) -> int:
    """The kNN's k: ``setting`` when a number; for ``auto``, min(200, the smallest train class).

    Why: a weighted kNN with more neighbours than a class has images must take votes from other
    classes; 200 suits CIFAR (5,000 per class) but not digits (about 126 per class).
    """
    if setting != "auto":
        return int(setting)
    counts = np.bincount(np.asarray(train_labels))
    return min(KNN_K_CAP, int(counts[counts > 0].min()))


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
