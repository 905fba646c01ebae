"""``contrastive anomaly``: deep-kNN anomaly scores of image files, with a calibrated threshold.

The reference of "normal" is the prepared train split, embedded with the model; an image's score is
its mean cosine distance to its ``k`` nearest train embeddings (Bergman et al. 2020, as measured by
the probe stage: :func:`contrastive.retrieval.knn_anomaly_scores`). The threshold is the score that
at most ``fpr`` of the val split exceed: a chosen false-positive rate on data known to be normal.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contrastive import paths
from contrastive.config import ConfigError
from contrastive.data import load_manifest, load_split, standardize_images
from contrastive.inference import Encoder, embed_files, list_images, load_model
from contrastive.retrieval import knn_anomaly_scores


class Detector:
    """Train embeddings as the reference and the threshold calibrated on val."""

    def __init__(self, reference: np.ndarray, val: np.ndarray, k: int, fpr: float) -> None:
        self.reference, self.k, self.fpr = torch.from_numpy(reference), k, fpr
        val_scores = self.scores(val)
        # Scores strictly above the threshold are anomalies: at most fpr of val exceed it.
        self.threshold = float(np.quantile(val_scores, 1 - fpr, method="higher"))

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """Deep-kNN score of each embedding (higher: less like the train split)."""
        return knn_anomaly_scores(self.reference, torch.from_numpy(embeddings), self.k).numpy()


def calibrate(encoder: Encoder, prepared_dir: str | Path, k: int, fpr: float,
              batch_size: int = 256) -> Detector:
    """Embed the prepared train and val splits (resized to the model's input when they differ)
    and calibrate the threshold at false-positive rate ``fpr`` on val."""
    if not 0 < fpr < 1:
        raise ConfigError(f"--fpr {fpr}: must be between 0 and 1 (0.05 = 5% of normal images "
                          "flagged)")
    if k < 1:
        raise ConfigError(f"-k {k}: must be at least 1")
    load_manifest(prepared_dir)  # one clear line when the prepared data are missing
    splits = {}
    for split in ("train", "val"):
        images, _ = load_split(prepared_dir, split)
        if len(images) == 0:
            raise ConfigError(f"{prepared_dir}: the {split} split is empty")
        splits[split] = encoder.embed(standardize_images(images, encoder.input_size), batch_size)
    if k > len(splits["train"]):
        raise ConfigError(f"-k {k}: the train split holds only {len(splits['train'])} images")
    return Detector(splits["train"], splits["val"], k, fpr)


def anomaly(model: str, inputs: Sequence[str], prepared_dir: str | Path = paths.PREPARED,
            fpr: float = 0.05, k: int = 2, batch_size: int = 256) -> dict[str, Any]:
    """Score image files and folders; each is anomalous when its score exceeds the threshold."""
    files = list_images(inputs)
    encoder = load_model(model)
    detector = calibrate(encoder, prepared_dir, k, fpr, batch_size)
    embedded = embed_files(encoder, files, batch_size)
    scores = detector.scores(embedded.embeddings)
    return {
        "model": model, "k": k, "fpr": fpr, "threshold": round(detector.threshold, 6),
        "images": [{"image": str(f), "score": round(float(s), 6),
                    "anomalous": bool(s > detector.threshold)}
                   for f, s in zip(embedded.files, scores, strict=True)],
        "skipped": embedded.skipped,
    }


def format_scores(result: dict[str, Any]) -> str:
    """The scores as a table, with the threshold and how it was chosen."""
    lines = [f"threshold {result['threshold']:.4f} (val false-positive rate {result['fpr']:g}, "
             f"k={result['k']})", "score   anomalous  image"]
    lines += [f"{r['score']:6.4f}  {'yes' if r['anomalous'] else 'no':>9}  {r['image']}"
              for r in result["images"]]
    return "\n".join(lines)
