"""Retrieval (Recall@K, mAP@R) and deep-kNN anomaly metrics, the kNN's k, and the probe stage."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from contrastive.config import ConfigError, ModelConfig, load_params, parse_params
from contrastive.data import load_manifest, prepare
from contrastive.features import resolve_knn_k
from contrastive.layout import Layout
from contrastive.models import EncoderInfo, build_encoder, save_encoder
from contrastive.retrieval import (
    knn_anomaly_scores,
    leave_one_class_out,
    retrieval_metrics,
)
from contrastive.stages import probe


def at_angles(degrees: list[float]) -> torch.Tensor:
    radians = torch.tensor(degrees) * math.pi / 180
    return torch.stack([radians.cos(), radians.sin()], dim=1)


def test_retrieval_metrics_on_a_case_worked_by_hand() -> None:
    """Gallery at 0, 30, 60, 120 degrees (classes 0, 1, 0, 1); cosine ranks by angle.

    Query 10 deg, class 0: ranks g0 g1 g2 g3 -> relevant 1 0 1 0, R = 2, AP@R = (1/1) / 2 = 0.5.
    Query 100 deg, class 0: ranks g3 g2 g1 g0 -> 0 1 0 1, AP@R = (0 + 1/2) / 2 = 0.25.
    Query 40 deg, class 1: ranks g1 g2 g0 g3 -> 1 0 0 1, AP@R = (1/1) / 2 = 0.5.
    """
    gallery, labels = at_angles([0, 30, 60, 120]), torch.tensor([0, 1, 0, 1])
    got = retrieval_metrics(gallery * 3, labels, at_angles([10, 100, 40]), torch.tensor([0, 0, 1]))
    assert got["recall_at_1"] == pytest.approx(2 / 3)
    assert got["recall_at_5"] == got["recall_at_10"] == 1.0  # 4 gallery images: all retrieved
    assert got["map_at_r"] == pytest.approx((0.5 + 0.25 + 0.5) / 3)


def map_at_r_written_out(gallery: np.ndarray, g_labels: np.ndarray, queries: np.ndarray,
                         q_labels: np.ndarray) -> float:
    """Musgrave et al.'s definition, one query at a time."""
    unit = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    total = 0.0
    for query, label in zip(queries, q_labels, strict=True):
        order = np.argsort(-(unit @ (query / np.linalg.norm(query))), kind="stable")
        r = int((g_labels == label).sum())
        relevant = g_labels[order[:r]] == label
        precision = np.cumsum(relevant) / np.arange(1, r + 1)
        total += float((precision * relevant).sum() / r)
    return total / len(queries)


def test_retrieval_metrics_match_the_definitions_on_random_data() -> None:
    g = torch.Generator().manual_seed(0)
    gallery, g_labels = torch.randn(300, 8, generator=g), torch.randint(0, 5, (300,), generator=g)
    queries, q_labels = torch.randn(70, 8, generator=g), torch.randint(0, 5, (70,), generator=g)
    got = retrieval_metrics(gallery, g_labels, queries, q_labels)
    expected = map_at_r_written_out(gallery.numpy(), g_labels.numpy(), queries.numpy(),
                                    q_labels.numpy())
    assert got["map_at_r"] == pytest.approx(expected, rel=1e-5)
    sims = F.normalize(queries, dim=1) @ F.normalize(gallery, dim=1).T
    for k in (1, 5, 10):
        top = g_labels[sims.topk(k, dim=1).indices]
        assert got[f"recall_at_{k}"] == pytest.approx(
            (top == q_labels[:, None]).any(1).float().mean().item())
    assert got["recall_at_1"] <= got["recall_at_5"] <= got["recall_at_10"]


def test_separated_classes_retrieve_perfectly() -> None:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(3).repeat_interleave(20)
    gallery = torch.eye(3)[labels] * 10 + torch.randn(60, 3, generator=g) * 0.1
    got = retrieval_metrics(gallery, labels, torch.eye(3), torch.arange(3))
    assert got == {"recall_at_1": 1.0, "recall_at_5": 1.0, "recall_at_10": 1.0, "map_at_r": 1.0}


def test_anomaly_score_is_the_mean_cosine_distance_to_the_k_nearest() -> None:
    reference = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    query = torch.tensor([[3.0, 0.0]])
    assert knn_anomaly_scores(reference, query, 1).tolist() == pytest.approx([0.0])
    assert knn_anomaly_scores(reference, query, 2).tolist() == pytest.approx([0.5])  # (0 + 1) / 2
    assert knn_anomaly_scores(reference, query, 9).tolist() == pytest.approx([1.0])  # all 3


def test_leave_one_class_out_equals_scoring_each_round_on_its_own() -> None:
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(4, 6, generator=g) * 2
    train_y, test_y = torch.arange(4).repeat(25), torch.arange(4).repeat(10)
    train = centres[train_y] + torch.randn(100, 6, generator=g)
    test = centres[test_y] + torch.randn(40, 6, generator=g)
    aurocs, scores = leave_one_class_out(train, train_y, test, test_y, k=3)
    assert set(aurocs) == {0, 1, 2, 3}
    for c in range(4):
        own = knn_anomaly_scores(train[train_y != c], test, 3).numpy()
        anomalous = (test_y == c).numpy()
        assert aurocs[c] == pytest.approx(roc_auc_score(anomalous, own))
        np.testing.assert_allclose(scores[c][1], own[anomalous], rtol=1e-5)
        assert aurocs[c] > 0.8  # separated clusters: the held-out one stands out


def test_auto_k_is_the_smallest_train_class_up_to_200() -> None:
    assert resolve_knn_k("auto", np.array([0] * 5 + [1] * 3 + [2] * 7)) == 3
    assert resolve_knn_k("auto", np.repeat(np.arange(10), 5000)) == 200
    assert resolve_knn_k("auto", torch.tensor([2, 2, 5, 5, 5])) == 2  # labels need not start at 0
    assert resolve_knn_k(17, np.array([0, 1])) == 17  # a number is used as given


@pytest.mark.parametrize("value", [0, -3, "ten", "20", True, 5.0, None])
def test_neighbour_counts_are_whole_numbers_or_auto(value: object) -> None:
    for key in ("knn_k", "anomaly_k"):
        if key == "anomaly_k" and value == "ten":
            continue
        with pytest.raises(ConfigError) as info:
            parse_params({"probe": {key: value}})
        message = str(info.value)
        assert f"probe.{key}" in message and "\n" not in message, message
    assert parse_params({"probe": {"knn_k": "auto"}}).probe.knn_k == "auto"
    assert parse_params({"probe": {"knn_k": 7}}).probe.knn_k == 7


def test_probe_stage_reports_retrieval_anomalies_and_the_k_used(workspace: Path) -> None:
    """The probe stage on tiny digits with an untrained encoder: every new figure is a number in
    range, per feature set, the histogram is written, and a second run gives the same numbers."""
    params = load_params()
    prepare(params.data, params.seed)
    manifest = load_manifest("data/prepared")
    torch.manual_seed(0)
    cfg = ModelConfig(width=4)
    net = build_encoder(cfg, manifest["image_size"])
    save_encoder("models/encoder.pt", net, EncoderInfo(
        model=cfg.model_dump(), image_size=manifest["image_size"], mean=manifest["mean"],
        std=manifest["std"], embedding_dim=net.embedding_dim, classes=manifest["classes"],
        params_hash="0" * 16))
    auto = load_params().model_copy(update={"probe": params.probe.model_copy(
        update={"knn_k": "auto"})})
    metrics = probe.run(auto, Layout())
    smallest = min(manifest["counts"]["train"].values())
    assert metrics["knn_k"] == min(200, smallest) and metrics["anomaly_k"] == 2
    for key in ("pretrained", "random_init", "raw_pixels"):
        found = metrics[key]
        for name in ("recall_at_1", "recall_at_5", "recall_at_10", "map_at_r", "anomaly_auroc"):
            assert 0.0 <= found[name] <= 1.0, (key, name)
        assert found["recall_at_1"] <= found["recall_at_5"] <= found["recall_at_10"]
        per_class = found["anomaly_auroc_per_class"]
        assert set(per_class) == set(manifest["classes"])
        assert found["anomaly_auroc"] == pytest.approx(np.mean(list(per_class.values())), abs=1e-5)
    assert metrics["raw_pixels"]["recall_at_1"] > 0.5  # digits' pixels retrieve well: not random
    assert Path("plots/anomaly.png").read_bytes().startswith(b"\x89PNG")
    written = json.loads(Path("metrics/probe.json").read_text())

    def numbers_only(value: object) -> bool:
        if isinstance(value, dict):
            return all(numbers_only(v) for v in value.values())
        return isinstance(value, int | float) and not isinstance(value, bool)

    assert numbers_only(written)
    assert probe.run(auto, Layout()) == metrics  # the same seed and data give the same figures


def test_per_class_metric_names_are_valid_mlflow_names() -> None:
    """An image folder's class names become metric-name parts: MLflow's refused characters
    are replaced, the numbers kept."""
    from mlflow.utils.validation import _validate_metric_name

    from contrastive.tracking import Snapshot, final_metrics

    probe = {"pretrained": {"anomaly_auroc_per_class": {"cat (wild)+1": 0.75, "dog": 0.5}}}
    snapshot = Snapshot(parse_params({}), {}, {"probe": probe}, {}, [], "key", {})
    flat = final_metrics(snapshot)
    assert flat == {"probe.pretrained.anomaly_auroc_per_class.cat _wild__1": 0.75,
                    "probe.pretrained.anomaly_auroc_per_class.dog": 0.5}
    for name in flat:
        _validate_metric_name(name)
