"""Image-text figures of a ``clip`` model on the test split: zero-shot classification and
cross-modal retrieval, as CLIP reports them (Radford et al. 2021, sections 3.1 and 3.3).

- **Zero-shot**: each class is the mean of its name's embeddings under CLIP's prompt templates
  ("a photo of a {}.", ...), normalised (the prompt ensemble); an image's class is the nearest.
  No label of the training data is used.
- **Recall@K**: image-to-text, the share of images with one of their own captions among the K
  nearest captions; text-to-image, the share of captions with one of their images among the K
  nearest images. Each distinct caption counts once: with real captions (one image each) this
  is the usual protocol; with templated ones every image of a class owns its class's captions.
  ``mean_recall_at_1``, the mean of the two Recall@1, ranks a model of captions without labels,
  which have no classes for zero-shot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from contrastive.captions import templated_captions
from contrastive.features import topk_accuracy
from contrastive.models import TextSide
from contrastive.text import encode

RECALL_AT = (1, 5, 10)


@torch.inference_mode()
def embed_texts(side: TextSide, texts: Sequence[str], batch_size: int = 512) -> torch.Tensor:
    """Captions -> unit shared-space embeddings ``(N, D)``, float32 on the CPU."""
    tokens = encode(side.tokenizer, list(texts), side.config.context_length)
    tower = side.tower.eval()
    chunks = [tower.embed_texts(tokens[i : i + batch_size]) for i in range(0, len(tokens),
                                                                          batch_size)]
    return F.normalize(torch.cat(chunks).float(), dim=1)


@torch.inference_mode()
def embed_images(side: TextSide, features: torch.Tensor) -> torch.Tensor:
    """Image encoder features ``(N, F)`` -> unit shared-space embeddings ``(N, D)``."""
    return F.normalize(side.tower.eval().embed_images(features).float(), dim=1)


def class_embeddings(side: TextSide, classes: Sequence[str]) -> torch.Tensor:
    """One unit embedding per class: its prompts' embeddings averaged, ``(C, D)``."""
    prompts = [templated_captions(name) for name in classes]
    flat = embed_texts(side, [p for per_class in prompts for p in per_class])
    per_class = flat.view(len(classes), len(prompts[0]), -1).mean(dim=1)
    return F.normalize(per_class, dim=1)


def recall_at(queries: torch.Tensor, gallery: torch.Tensor, relevant: torch.Tensor,
              ks: Sequence[int] = RECALL_AT, chunk: int = 1024) -> dict[int, float]:
    """Share of ``queries`` ``(Q, D)`` with a ``relevant`` ``(Q, G)`` item among their k most
    similar ``gallery`` items ``(G, D)``, for each k; unit vectors, in chunks of rows."""
    top = min(max(ks), len(gallery))
    hits = []
    for start in range(0, len(queries), chunk):
        nearest = (queries[start : start + chunk] @ gallery.T).topk(top, dim=1).indices
        hits.append(relevant[start : start + chunk].gather(1, nearest))
    found = torch.cat(hits)  # (Q, top): relevant, in rank order
    return {k: found[:, : min(k, top)].any(dim=1).float().mean().item() for k in ks}


def image_text_metrics(side: TextSide, features: torch.Tensor, labels: torch.Tensor,
                       classes: Sequence[str], captions: Sequence[Sequence[str]]
                       ) -> dict[str, float]:
    """Zero-shot top-1/top-5 (when there are ``classes``) and :func:`caption_recall` of the test
    images (their encoder ``features`` and ``labels``) and their ``captions``, rounded."""
    images = embed_images(side, features)
    metrics = {}
    if classes:
        scores = images @ class_embeddings(side, classes).T
        metrics["zero_shot_top1"] = topk_accuracy(scores, labels, 1)
        metrics["zero_shot_top5"] = topk_accuracy(scores, labels, 5)
    metrics |= caption_recall(images, lambda texts: embed_texts(side, texts), captions)
    return {name: round(value, 6) for name, value in metrics.items()}


def caption_recall(images: torch.Tensor, embed: Callable[[list[str]], torch.Tensor],
                   captions: Sequence[Sequence[str]]) -> dict[str, float]:
    """Recall@1/5/10 image-to-text and text-to-image of unit ``images`` ``(N, D)`` and their
    ``captions`` (embedded by ``embed``, unit rows), and ``mean_recall_at_1``, the mean of the
    two Recall@1: what ranks a model of data without classes."""
    # each distinct caption once; an image's captions are those it was given, so that with
    # templated captions every image of a class owns its class's captions
    distinct = sorted({c for own in captions for c in own})
    column = {c: j for j, c in enumerate(distinct)}
    owns = torch.zeros(len(images), len(distinct), dtype=torch.bool)
    for i, own in enumerate(captions):
        owns[i, [column[c] for c in own]] = True
    texts = embed(distinct)
    metrics = {}
    for direction, found in (
        ("image_to_text", recall_at(images, texts, owns)),
        ("text_to_image", recall_at(texts, images, owns.T)),
    ):
        for k, value in found.items():
            metrics[f"{direction}_recall_at_{k}"] = value
    metrics["mean_recall_at_1"] = (metrics["image_to_text_recall_at_1"]
                                   + metrics["text_to_image_recall_at_1"]) / 2
    return metrics
