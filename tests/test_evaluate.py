"""kNN, linear probe and accuracy helpers of the evaluation stage."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from contrastive.config import ConfigError, load_params, parse_params
from contrastive.evaluate import (
    Features,
    evaluate_features,
    fit_linear_probe,
    fit_probe_path,
)
from contrastive.features import knn_scores, topk_accuracy
from contrastive.layout import Layout
from contrastive.models import LinearProbe
from contrastive.plots import plot_embedding
from contrastive.stages import probe


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
    loose = fit_linear_probe(features, labels, 4, weight_decay=0.0, max_iter=100)
    tight = fit_linear_probe(features, labels, 4, weight_decay=1.0, max_iter=100)
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
        probe.run(load_params(), Layout())
    assert {p: Path(p).read_text() for p in outputs} == {p: f"earlier {p}" for p in outputs}


def correlated_problem(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(n, 30)`` mixed from 6 latent factors, as correlated as pixels, and 4 classes
    that depend on the factors, a fifth of them relabelled at random (not separable)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(6, 30, generator=torch.Generator().manual_seed(99))
    latent = torch.randn(n, 6, generator=g)
    features = latent @ mixing + 0.1 * torch.randn(n, 30, generator=g)
    labels = (latent[:, :4] * 1.5 + torch.randn(n, 4, generator=g)).argmax(1)
    noisy = torch.rand(n, generator=g) < 0.2
    labels[noisy] = torch.randint(0, 4, (int(noisy.sum()),), generator=g)
    return features, labels


def objective(probe: LinearProbe, features: torch.Tensor, labels: torch.Tensor, wd: float) -> float:
    """The probe's training objective, written out: mean cross-entropy + wd * ||W||^2."""
    with torch.no_grad():
        loss = F.cross_entropy(probe(features), labels) + wd * probe.linear.weight.square().sum()
    return loss.item()


def plain_lbfgs_probe(
    features: torch.Tensor, labels: torch.Tensor, wd: float, max_iter: int = 2000
) -> LinearProbe:
    """The reference: a cold-started L-BFGS fit on the standardised features themselves (no
    preconditioning, no warm start), run to convergence."""
    probe = LinearProbe(features.shape[1], 4)
    probe.feature_mean.copy_(features.mean(0))
    probe.feature_std.copy_(features.std(0))
    x = (features - probe.feature_mean) / probe.feature_std
    optimizer = torch.optim.LBFGS(
        probe.linear.parameters(), max_iter=max_iter, tolerance_grad=1e-6,
        tolerance_change=1e-12, line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe.linear(x), labels) + wd * probe.linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe


def test_warm_started_path_matches_cold_fits() -> None:
    x_train, y_train = correlated_problem(400, seed=1)
    x_val, y_val = correlated_problem(400, seed=2)
    decays = [0.0, 1e-3, 1e-2, 1e-1, 1.0]
    warm = fit_probe_path(x_train, y_train, 4, decays, max_iter=200, tolerance=1e-5)
    cold = fit_probe_path(x_train, y_train, 4, decays, 200, 1e-5, warm_start=False)

    def val_acc(probe: LinearProbe) -> float:
        with torch.no_grad():
            return topk_accuracy(probe(x_val), y_val, 1)

    accs = {}
    for wd in decays:
        reference = plain_lbfgs_probe(x_train, y_train, wd)
        best = objective(reference, x_train, y_train, wd)
        # Same minimum of the same objective, whichever start or coordinates the fit used.
        for path in (warm, cold):
            assert objective(path[wd], x_train, y_train, wd) == pytest.approx(best, abs=1e-4)
        accs[wd] = [val_acc(p) for p in (warm[wd], cold[wd], reference)]
        assert max(accs[wd]) - min(accs[wd]) <= 0.01
    chosen = [max(decays, key=lambda wd, i=i: accs[wd][i]) for i in range(3)]
    assert chosen[0] == chosen[1] == chosen[2]
    assert accs[decays[-1]][0] < accs[chosen[0]][0]  # the decays differ: a real choice


def test_evaluate_features_is_deterministic_for_a_seed() -> None:
    splits = [correlated_problem(n, seed) for n, seed in ((300, 1), (100, 2), (100, 3))]
    feats = Features(*(x for x, _ in splits), *(y for _, y in splits))
    params = parse_params({"seed": 3, "probe": {"weight_decays": [0.0, 1e-3, 1e-1], "knn_k": 20}})
    first, first_probe, first_pred = evaluate_features(feats, 4, params)
    second, second_probe, second_pred = evaluate_features(feats, 4, params)
    assert first == second
    assert torch.equal(first_pred, second_pred)
    assert torch.equal(first_probe.linear.weight, second_probe.linear.weight)
    assert first["linear_weight_decay"] in (0.0, 1e-3, 1e-1)
    assert first["linear_top1"] > 0.5  # a fitted probe, not chance (0.25)


def test_plot_embedding_caps_the_tsne_sample(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat(10)
    features = F.one_hot(labels, 5).float() * 3 + torch.randn(50, 5, generator=g)
    classes = [f"c{i}" for i in range(5)]
    path = tmp_path / "embedding.png"
    maps = plot_embedding(path, features, labels, classes, seed=0, tsne_points=20)
    assert maps["PCA"].shape == (50, 2)  # PCA maps every point
    assert maps["t-SNE"].shape == (20, 2)
    assert path.read_bytes().startswith(b"\x89PNG")
    again = plot_embedding(tmp_path / "again.png", features, labels, classes, 0, tsne_points=20)
    assert (again["t-SNE"] == maps["t-SNE"]).all()  # the same seed draws the same subsample
    assert set(plot_embedding(path, features, labels, classes, 0, tsne_points=0)) == {"PCA"}
