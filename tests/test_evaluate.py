"""kNN, linear probe and accuracy helpers of the evaluation stage."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from contrastive.config import ConfigError, load_params
from contrastive.evaluate import fit_linear_probe, knn_scores, probe_stage, topk_accuracy


def test_topk_accuracy() -> None:
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_accuracy(scores, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(scores, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(scores, labels, 5) == 1.0  # k larger than the classes: all of them


def test_knn_matches_weighted_vote_written_out() -> None:
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(40, 6, generator=g), torch.randint(0, 4, (40,), generator=g)
    query = torch.randn(7, 6, generator=g)
    k, t = 5, 0.1
    got = knn_scores(bank, labels, query, 4, k=k, temperature=t, chunk=3)
    for i in range(len(query)):
        sims = F.normalize(bank, dim=1) @ F.normalize(query[i], dim=0)
        expected = torch.zeros(4)
        for j in sims.topk(k).indices.tolist():
            expected[labels[j]] += math.exp(sims[j].item() / t)
        assert torch.allclose(got[i], expected, rtol=1e-4)


def test_knn_finds_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 5
    labels = torch.arange(3).repeat_interleave(30)
    bank = centres[labels] + torch.randn(90, 3, generator=g)
    scores = knn_scores(bank, labels, centres, 3, k=10)
    assert scores.argmax(1).tolist() == [0, 1, 2]


def test_linear_probe_separates_separable_classes_and_regularises() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(50)
    features = F.one_hot(labels, 4).float() * 3 + torch.randn(200, 4, generator=g)
    features = torch.cat([features, torch.randn(200, 12, generator=g)], dim=1)
    loose = fit_linear_probe(features, labels, 4, weight_decay=0.0, max_iter=100, seed=0)
    tight = fit_linear_probe(features, labels, 4, weight_decay=1.0, max_iter=100, seed=0)
    with torch.no_grad():
        assert topk_accuracy(loose(features), labels, 1) > 0.95
    assert tight.linear.weight.norm() < loose.linear.weight.norm()
    assert torch.allclose(loose.feature_mean, features.mean(0))


def test_failed_probe_keeps_the_earlier_outputs(workspace: Path) -> None:
    """A probe that stops (here: no prepared data) leaves the last good outputs untouched."""
    outputs = ["models/probe.pt", "metrics/probe.json", "plots/confusion.csv",
               "plots/embedding.png"]
    for path in outputs:
        Path(path).parent.mkdir(exist_ok=True)
        Path(path).write_text(f"earlier {path}")
    with pytest.raises(ConfigError, match="prepared manifest not found"):
        probe_stage(load_params())
    assert {p: Path(p).read_text() for p in outputs} == {p: f"earlier {p}" for p in outputs}
