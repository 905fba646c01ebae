"""Zero-shot classification with a registered image-text (``clip``) model, onnxruntime only:
``contrastive classify --labels cat,dog,ship IMAGES``.

Each label becomes the mean of its embeddings under CLIP's prompt templates ("a photo of a
{}.", ...), normalised: the prompt ensemble the probe stage's zero-shot figure uses
(:mod:`contrastive.crossmodal`). An image's label is the one whose ensemble is nearest to its
``image_embeds`` by cosine; no labelled image is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from contrastive.captions import templated_captions
from contrastive.config import ConfigError
from contrastive.inference import TextEncoder, embed_files, list_images, load_model


def parse_labels(labels: str) -> list[str]:
    """``"cat,dog,ship"`` -> the names; one line naming the problem for an empty or repeated
    name, or fewer than two."""
    names = [name.strip() for name in labels.split(",")]
    if any(not name for name in names):
        raise ConfigError(f"--labels {labels!r}: a label is empty; give names separated by "
                          "commas, e.g. cat,dog,ship")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"--labels {labels!r}: {repeated[0]!r} is given twice")
    if len(names) < 2:
        raise ConfigError(f"--labels {labels!r}: give at least two labels to choose between")
    return names


def label_embeddings(text: TextEncoder, names: Sequence[str]) -> np.ndarray:
    """One unit vector per label: its prompts' embeddings averaged, ``(C, D)``."""
    prompts = [templated_captions(name) for name in names]
    flat = text.embed([p for per_label in prompts for p in per_label])
    mean = flat.reshape(len(names), len(prompts[0]), -1).mean(axis=1)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def classify(model: str, labels: str, inputs: Sequence[str], top: int = 1,
             batch_size: int = 256) -> dict[str, Any]:
    """``contrastive classify``: each image's ``top`` labels, best first, with their cosine and,
    when the model records its logit scale, their probability (CLIP's softmax over the labels of
    cosine x scale)."""
    names = parse_labels(labels)
    files = list_images(inputs)
    encoder = load_model(model)
    text = encoder.texts()
    classes = label_embeddings(text, names)
    embedded = embed_files(encoder, files, batch_size, output=encoder.search_space)
    scores = embedded.embeddings @ classes.T  # (N, C) cosine: both sides are unit vectors
    probabilities = None if text.logit_scale is None else softmax(text.logit_scale * scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :min(top, len(names))]
    predictions = []
    for i, (path, row) in enumerate(zip(embedded.files, order, strict=True)):
        ranked = [{"label": names[j], "cosine": round(float(scores[i, j]), 6)} for j in row]
        if probabilities is not None:
            for entry, j in zip(ranked, row, strict=True):
                entry["probability"] = round(float(probabilities[i, j]), 6)
        predictions.append({"image": str(path), "label": names[row[0]], "top": ranked})
    return {"model": model, "labels": names, "predictions": predictions,
            "skipped": embedded.skipped}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by each row's maximum so that large logits do not overflow."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def format_predictions(result: dict[str, Any]) -> str:
    """The predictions as a table: the image, its label, cosine and probability (when known),
    then any runners-up."""
    width = max(len(name) for name in [*result["labels"], "label"])
    known = all("probability" in p["top"][0] for p in result["predictions"])

    def figures(entry: dict[str, Any]) -> str:
        cosine = f"{entry['cosine']:6.4f}"
        return f"{cosine}  {entry['probability']:6.4f}" if known else cosine

    lines = [f"{'label':<{width}}  cosine  " + ("prob    " if known else "") + "image"]
    for p in result["predictions"]:
        best = p["top"][0]
        others = ", ".join(f"{t['label']} {figures(t).replace('  ', ' ')}" for t in p["top"][1:])
        lines.append(f"{best['label']:<{width}}  {figures(best)}  {p['image']}"
                     + (f"  ({others})" if others else ""))
    return "\n".join(lines)
