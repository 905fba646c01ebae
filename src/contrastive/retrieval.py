"""What embeddings are used for, measured: retrieval by cosine similarity and deep-kNN anomalies.

- **Retrieval** (Musgrave et al., "A Metric Learning Reality Check", 2020): every query (a test
  image) ranks the gallery (the train split) by cosine similarity; an image of the query's class is
  relevant. Recall@K is the share of queries with a relevant image among the first K; mAP@R
  averages, over queries, ``AP@R = 1/R * sum_{i<=R} P(i) * rel(i)``, where ``R`` is the number of
  relevant gallery images of that query: a precision that also rewards ranking all the relevant
  images first, not just one.
- **Anomaly detection** (deep kNN; Bergman, Cohen and Hoshen, "Deep Nearest Neighbor Anomaly
  Detection", 2020): the score of an image is its mean cosine distance ``1 - cos`` to its ``k``
  nearest reference embeddings. Protocol: leave one class out of the train split, score the test
  split, and measure the AUROC of the held-out class as the anomaly; once per class, averaged.

Everything is exact (all pairs, in chunks of queries) and deterministic given the embeddings.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

RECALL_AT = (1, 5, 10)
CHUNK = 1024
"""Queries per block of the similarity matrix: bounds memory to ``CHUNK x gallery`` floats."""


def retrieval_metrics(
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    recall_at: tuple[int, ...] = RECALL_AT,
) -> dict[str, float]:
    """Recall@K for each K of ``recall_at`` and mAP@R of ``queries`` searching ``gallery``.

    Ties in similarity are broken by gallery order (torch's stable sort), so the figures are
    deterministic. A query whose class is absent from the gallery has ``R = 0`` and counts as a
    miss for Recall@K and 0 for mAP@R.
    """
    gallery_unit = F.normalize(gallery.float(), dim=1)
    relevant_counts = torch.bincount(gallery_labels, minlength=int(query_labels.max()) + 1)
    depth = min(len(gallery), max(max(recall_at), int(relevant_counts.max())))
    hits_at = {k: 0.0 for k in recall_at}
    ap_sum = 0.0
    for start in range(0, len(queries), CHUNK):
        query = F.normalize(queries[start : start + CHUNK].float(), dim=1)
        labels = query_labels[start : start + CHUNK]
        sim = query @ gallery_unit.T  # (q, N)
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :depth]
        relevant = (gallery_labels[order] == labels[:, None]).float()  # (q, depth)
        for k in recall_at:
            hits_at[k] += relevant[:, :k].amax(dim=1).sum().item()
        r = relevant_counts[labels].float()  # (q,)
        rank = torch.arange(1, depth + 1, dtype=torch.float32)
        within_r = rank[None, :] <= r[:, None]  # only the first R ranks count
        precision = relevant.cumsum(dim=1) / rank  # P(i)
        ap = (precision * relevant * within_r).sum(dim=1) / r.clamp_min(1)
        ap_sum += ap.sum().item()
    n = len(queries)
    metrics = {f"recall_at_{k}": hits_at[k] / n for k in recall_at}
    metrics["map_at_r"] = ap_sum / n
    return metrics


def knn_anomaly_scores(reference: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Deep-kNN anomaly score ``(Q,)``: mean cosine distance of each query to its ``k`` nearest
    reference embeddings (higher: less like the reference). ``k`` is capped at the reference size.
    """
    reference_unit = F.normalize(reference.float(), dim=1)
    k = min(k, len(reference_unit))
    scores = []
    for start in range(0, len(queries), CHUNK):
        query = F.normalize(queries[start : start + CHUNK].float(), dim=1)
        nearest = (query @ reference_unit.T).topk(k, dim=1).values  # (q, k)
        scores.append(1 - nearest.mean(dim=1))
    return torch.cat(scores)


def leave_one_class_out(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    k: int,
) -> tuple[dict[int, float], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Per class ``c``: the AUROC of deep-kNN scores against train without ``c``, with the test
    images of ``c`` as the anomalies; and the scores ``(normal, anomalous)`` behind it.

    A class absent from the test split, or the only class in it, has no AUROC and is left out.
    """
    from sklearn.metrics import roc_auc_score  # slow import (~1.3 s); pretraining never needs it

    present = [c for c in torch.unique(train_labels).tolist()
               if (test_labels == c).any() and not (test_labels == c).all()]
    reference_unit = F.normalize(train.float(), dim=1)
    columns = {c: train_labels != c for c in present}
    ks = {c: min(k, int(keep.sum())) for c, keep in columns.items()}
    blocks: dict[int, list[torch.Tensor]] = {c: [] for c in present}
    for start in range(0, len(test), CHUNK):
        # One similarity block serves every round: each round only hides its class's columns.
        sim = F.normalize(test[start : start + CHUNK].float(), dim=1) @ reference_unit.T
        for c in present:
            if ks[c] == 0:
                continue
            nearest = sim.masked_fill(~columns[c], -torch.inf).topk(ks[c], dim=1).values
            blocks[c].append(1 - nearest.mean(dim=1))
    aurocs: dict[int, float] = {}
    scores: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for c in present:
        if not blocks[c]:
            continue
        anomalous = (test_labels == c).numpy()
        score = torch.cat(blocks[c]).numpy()
        aurocs[c] = float(roc_auc_score(anomalous, score))
        scores[c] = (score[~anomalous], score[anomalous])
    return aurocs, scores


def anomaly_metrics(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    test: torch.Tensor,
    test_labels: torch.Tensor,
    classes: list[str],
    k: int,
) -> tuple[dict[str, float | dict[str, float]], dict[int, tuple[np.ndarray, np.ndarray]]]:
    """``anomaly_auroc`` (the mean over classes) and ``anomaly_auroc_per_class`` (by class name),
    and the per-class scores for the histogram plot."""
    aurocs, scores = leave_one_class_out(train, train_labels, test, test_labels, k)
    per_class = {classes[c]: value for c, value in aurocs.items()}
    mean = float(np.mean(list(aurocs.values()))) if aurocs else float("nan")
    return {"anomaly_auroc": mean, "anomaly_auroc_per_class": per_class}, scores
