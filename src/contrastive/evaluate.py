"""Frozen-feature evaluation: a linear probe, weighted kNN, retrieval, anomaly detection and
their baselines. It computes and returns; the ``probe`` stage writes (:mod:`contrastive.stages`).

The probe and kNN follow the usual self-supervised protocol (lightly, solo-learn): the encoder is
frozen, a multinomial logistic regression is fitted on train features with its L2 strength chosen on
val, and a weighted kNN (temperature 0.1, InstDisc / Wu et al. 2018,
:mod:`contrastive.features`) votes with the train features; its k is ``probe.knn_k``. Retrieval
and anomaly detection (:mod:`contrastive.retrieval`) measure what the embeddings are used for.
All are reported on the test split, next to the same measures on a randomly initialised encoder
of the same architecture and on raw pixels, so the gain from pretraining is visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from contrastive import retrieval
from contrastive.config import ConfigError, ModelConfig, Params
from contrastive.crossmodal import image_text_metrics
from contrastive.features import extract_features, knn_scores, resolve_knn_k, topk_accuracy
from contrastive.models import EncoderInfo, LinearProbe, TextSide, build_encoder, build_text_tower


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int,
    tolerance: float = 1e-4,
) -> LinearProbe:
    """Multinomial logistic regression on standardised features, fitted with L-BFGS from zero."""
    path = fit_probe_path(features, labels, num_classes, [weight_decay], max_iter, tolerance)
    return path[weight_decay]


def fit_probe_path(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    weight_decays: list[float],
    max_iter: int,
    tolerance: float = 1e-4,
    warm_start: bool = True,
    desc: str | None = None,
) -> dict[float, LinearProbe]:
    """A probe for every weight decay, each minimising ``mean CE + wd * ||W||^2`` (bias free).

    The fits run from the strongest decay to the weakest, each starting from the previous
    solution (a warm start along the regularisation path): a strongly regularised problem is well
    conditioned and converges in a few steps from zero, and each weaker one then starts near its
    own solution. Weakest first would start the hardest problem from zero and hand a large-norm
    solution to the others. ``warm_start=False`` starts every fit from zero (on the CIFAR-10
    development subset: 301 loss evaluations instead of 268 on raw pixels, 173 instead of 128 on
    random-init features). A fit stops after ``max_iter`` L-BFGS iterations or once no gradient
    entry exceeds ``tolerance``.
    """
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    # Eigenbasis of the feature covariance, shared by all fits: see _fit_preconditioned.
    eigenvalues, basis = torch.linalg.eigh(x.T @ x / len(x))
    rotated = x @ basis
    zeros = torch.zeros(num_classes, x.shape[1]), torch.zeros(num_classes)
    weight, bias = zeros
    probes = {}
    strongest_first = sorted(set(weight_decays), reverse=True)
    for wd in tqdm(strongest_first, desc, disable=desc is None, leave=False):
        if not warm_start:
            weight, bias = zeros
        weight, bias = _fit_preconditioned(
            rotated, labels, eigenvalues, basis, wd, weight, bias, max_iter, tolerance
        )
        probe = LinearProbe(x.shape[1], num_classes)
        probe.feature_mean.copy_(mean)
        probe.feature_std.copy_(std)
        with torch.no_grad():
            probe.linear.weight.copy_(weight)
            probe.linear.bias.copy_(bias)
        probes[wd] = probe.eval()
    return probes


def _fit_preconditioned(
    rotated: torch.Tensor,
    labels: torch.Tensor,
    eigenvalues: torch.Tensor,
    basis: torch.Tensor,
    weight_decay: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
    max_iter: int,
    tolerance: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L-BFGS on ``mean CE(x W^T + b) + wd * ||W||^2`` from ``(weight, bias)``; the new pair.

    Why preconditioned: correlated features (raw pixels above all) make the problem so badly
    conditioned that plain L-BFGS needs its whole ``max_iter`` budget for every weak decay. With
    the covariance ``U diag(lam) U^T`` of the standardised features ``x`` (``rotated = x U``), the
    Hessian at ``W = 0`` is ``lam / K + 2 wd`` along each eigenvector, for each of the ``K``
    classes. L-BFGS runs on ``V = W U / s`` with ``s = (lam / K + 2 wd)^(-1/2)``, where that
    Hessian is the identity; the objective, and so its minimiser, are unchanged:
    ``W = V diag(s) U^T``. On the raw pixels of the CIFAR-10 development subset the five decays
    of ``params.yaml`` take 268 loss evaluations, against 960 for plain L-BFGS cold-started at each
    decay (most of them stopped at 200 iterations, unconverged); see bench/probe.py.
    """
    num_classes = len(bias)
    # 1e-3 (the features are standardised: lam averages 1) keeps s finite when wd is 0.
    scale = ((eigenvalues.clamp_min(0) + 1e-3) / num_classes + 2 * weight_decay).rsqrt()
    z = rotated * scale
    v = (weight @ basis / scale).requires_grad_()
    b = bias.clone().requires_grad_()
    optimizer = torch.optim.LBFGS(
        [v, b], max_iter=max_iter, tolerance_grad=tolerance, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ v.T + b, labels) + weight_decay * (v * scale).square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (v * scale) @ basis.T, b.detach().clone()


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
    feats: Features, num_classes: int, params: Params, desc: str | None = None
) -> tuple[dict[str, float], LinearProbe, torch.Tensor]:
    """Linear probe (L2 chosen on val) and kNN on test; returns metrics, probe, test predictions.

    ``desc`` names a progress bar over the probe's fits (none when ``None``).
    """
    cfg = params.probe
    probes = fit_probe_path(
        feats.train, feats.y_train, num_classes, cfg.weight_decays, cfg.max_iter, cfg.tolerance,
        desc=desc,
    )
    with torch.no_grad():
        val_accs = {wd: topk_accuracy(p(feats.val), feats.y_val, 1) for wd, p in probes.items()}
    # The best on val; of equals, the first in the order of probe.weight_decays.
    wd = max(cfg.weight_decays, key=val_accs.__getitem__)
    val_acc, probe = val_accs[wd], probes[wd]
    with torch.no_grad():
        linear = probe(feats.test)
    k = resolve_knn_k(cfg.knn_k, feats.y_train)
    knn = knn_scores(feats.train, feats.y_train, feats.test, num_classes, k, cfg.knn_temperature)
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


@dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate_encoder` finds: the metrics (pretrained, random-init and raw-pixel
    features side by side), the chosen linear probe, its class for every test image, the test
    features, and the anomaly scores of each feature set for the histograms. For data without
    classes there is no probe (None), no prediction and no anomaly round."""

    metrics: dict[str, Any]
    probe: LinearProbe | None
    predictions: torch.Tensor
    test_features: torch.Tensor
    test_labels: torch.Tensor
    anomaly_rounds: dict[str, tuple[dict[int, tuple[np.ndarray, np.ndarray]], float]]


def evaluate_encoder(
    params: Params,
    encoder: nn.Module,
    info: EncoderInfo,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: list[str],
    device: torch.device,
    text: TextSide | None = None,
    test_captions: list[list[str]] | None = None,
) -> Evaluation:
    """The pretrained ``encoder`` against a random-init encoder of the same architecture and
    against raw pixels, each with the linear probe, the kNN, retrieval and anomaly detection on
    the ``train``/``val``/``test`` ``splits``; for an image-text model (its ``text`` side and the
    test split's captions), zero-shot classification and cross-modal recall too, against a
    random-init text side.

    Data without ``classes`` (captions without labels) have only the cross-modal recall: an
    image-text model is needed, else :class:`ConfigError`.
    """
    num_classes = len(classes)
    image_text = text is not None and test_captions is not None
    if not classes and not image_text:
        raise ConfigError("the prepared data have no classes (a caption file without a 'label' "
                          "column), so only an image-text model can be measured: train.method "
                          "clip")
    pretrained = _encoder_features(
        encoder, splits, info.mean, info.std, device, params.probe.batch_size, "pretrained"
    )
    results: dict[str, Any] = {}
    probe, predictions = None, torch.empty(0, dtype=torch.long)
    if classes:
        results, probe, predictions = evaluate_features(
            pretrained, num_classes, params, "probe pretrained"
        )

    torch.manual_seed(params.seed)
    random_encoder = build_encoder(ModelConfig(**info.model), info.image_size)
    random_feats = _encoder_features(
        random_encoder, splits, info.mean, info.std, device, params.probe.batch_size, "random-init"
    )
    random_results: dict[str, Any] = {}
    feature_sets = {"pretrained": (pretrained, results),
                    "random init": (random_feats, random_results)}
    compared = []
    if classes:
        random_results.update(evaluate_features(
            random_feats, num_classes, params, "probe random-init"
        )[0])
        pixel_feats = _pixel_features(splits)
        pixel_results, _, _ = evaluate_features(pixel_feats, num_classes, params,
                                                "probe raw pixels")
        feature_sets["raw pixels"] = (pixel_feats, pixel_results)
        compared = ["linear_top1", "knn_top1", "map_at_r", "anomaly_auroc"]
    if image_text:
        results.update(image_text_metrics(text, pretrained.test, pretrained.y_test, classes,
                                          test_captions))
        torch.manual_seed(params.seed)
        tower = build_text_tower(info, text.kind, text.config, text.tokenizer.get_vocab_size())
        random_text = TextSide(tower.eval(), text.tokenizer, text.kind, text.config)
        random_results.update(image_text_metrics(random_text, random_feats.test,
                                                 random_feats.y_test, classes, test_captions))
        compared += ["zero_shot_top1"] if classes else []
        compared += ["image_to_text_recall_at_1", "text_to_image_recall_at_1", "mean_recall_at_1"]

    histograms = {}
    for name, (feats, found) in feature_sets.items() if classes else ():
        uses, rounds = embedding_uses(feats, classes, params.probe.anomaly_k)
        found.update(uses)
        histograms[name] = (rounds, uses["anomaly_auroc"])

    metrics: dict[str, Any] = {name.replace(" ", "_"): found
                               for name, (_, found) in feature_sets.items()}
    metrics["gain_over_random"] = {
        k: round(results[k] - random_results[k], 6) for k in compared
    }
    if classes:
        metrics["knn_k"] = resolve_knn_k(params.probe.knn_k, pretrained.y_train)
        metrics["anomaly_k"] = params.probe.anomaly_k
    metrics["n_test"] = len(pretrained.y_test)
    metrics["embedding_dim"] = info.embedding_dim
    return Evaluation(metrics, probe, predictions, pretrained.test, pretrained.y_test, histograms)


def embedding_uses(
    feats: Features, classes: list[str], anomaly_k: int
) -> tuple[dict, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Retrieval (test queries the train split) and leave-one-class-out deep-kNN anomaly metrics,
    rounded like the probe's; and the anomaly scores of each round, for the histogram plot."""
    found = retrieval.retrieval_metrics(feats.train, feats.y_train, feats.test, feats.y_test)
    anomaly, rounds = retrieval.anomaly_metrics(
        feats.train, feats.y_train, feats.test, feats.y_test, classes, anomaly_k
    )
    per_class = {name: round(v, 6) for name, v in anomaly["anomaly_auroc_per_class"].items()}
    uses = {key: round(value, 6) for key, value in found.items()}
    uses["anomaly_auroc"] = round(float(anomaly["anomaly_auroc"]), 6)
    uses["anomaly_auroc_per_class"] = per_class
    return uses, rounds
