"""Triplet, margin-pair and SupCon: each loss against a direct, slow formula (values and
gradients), the mining modes and the negative-pair rule on hand-made examples, class balance, and
a tiny pretraining run of each method."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from contrastive import methods, train
from contrastive.augment import SimCLRViews
from contrastive.batches import InMemoryBatches
from contrastive.cli import main
from contrastive.config import AugmentConfig, ConfigError, Params, load_params, parse_params
from contrastive.data import prepare
from contrastive.layout import Layout
from contrastive.losses import MarginPairLoss, NTXentLoss, SupConLoss, TripletLoss
from contrastive.models import build_encoder, load_encoder
from contrastive.stages import pretrain as pretrain_stage
from tests.conftest import write_params

Terms = list[tuple[int, torch.Tensor]]
"""A loss written out: (anchor view, term) for every term the loss averages."""

# --- direct formulas: explicit loops over the 2N views --------------------------------------------


def slow_views(
    z_a: torch.Tensor, z_b: torch.Tensor, labels: torch.Tensor | None
) -> tuple[list[torch.Tensor], list[int]]:
    """The 2N views as unit vectors (views of image i at i and i + N) and each view's class;
    without labels each image is its own class."""
    rows = [v / torch.sqrt((v * v).sum()) for v in torch.cat([z_a, z_b])]
    n = len(z_a)
    classes = list(range(n)) if labels is None else labels.tolist()
    return rows, classes + classes


def dist(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(((u - v) ** 2).sum())


def slow_triplet(
    z_a: torch.Tensor, z_b: torch.Tensor, labels: torch.Tensor | None, margin: float, mining: str
) -> Terms:
    z, c = slow_views(z_a, z_b, labels)
    terms: Terms = []
    for a in range(len(z)):
        pos = [dist(z[a], z[p]) for p in range(len(z)) if p != a and c[p] == c[a]]
        neg = [dist(z[a], z[n]) for n in range(len(z)) if c[n] != c[a]]
        if not neg:
            continue
        if mining == "batch_hard":
            terms.append((a, torch.relu(max(pos) - min(neg) + margin)))
        elif mining == "semi_hard":
            for d_ap in pos:
                farther = [d_an for d_an in neg if d_an > d_ap]
                d_an = min(farther) if farther else max(neg)
                terms.append((a, torch.relu(d_ap - d_an + margin)))
        else:
            for d_ap in pos:
                for d_an in neg:
                    if d_ap - d_an + margin > 0:
                        terms.append((a, d_ap - d_an + margin))
    return terms


def slow_margin_pair(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    labels: torch.Tensor | None,
    margin: float,
    alpha: float,
    k: int,
) -> Terms:
    z, c = slow_views(z_a, z_b, labels)
    m = len(z)
    terms: Terms = []
    for a in range(m):
        positives = [p for p in range(m) if p != a and c[p] == c[a]]
        negatives = []
        for step in range(1, m):  # walk the batch order from the anchor on, wrapping around
            q = (a + step) % m
            if c[q] != c[a] and len(negatives) < k * len(positives):
                negatives.append(q)
        pairs = [dist(z[a], z[p]) for p in positives]
        pairs += [alpha * torch.relu(margin - dist(z[a], z[n])) ** 2 for n in negatives]
        terms.append((a, sum(pairs) / len(pairs)))
    return terms


def slow_supcon(
    z_a: torch.Tensor, z_b: torch.Tensor, labels: torch.Tensor, t: float | torch.Tensor
) -> Terms:
    z, c = slow_views(z_a, z_b, labels)
    terms: Terms = []
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        denominator = sum(torch.exp(z[i] @ z[a] / t) for a in others)
        positives = [p for p in others if c[p] == c[i]]
        logs = [torch.log(torch.exp(z[i] @ z[p] / t) / denominator) for p in positives]
        terms.append((i, -sum(logs) / len(positives)))
    return terms


def weighted_mean(terms: Terms, weights: torch.Tensor | None, n: int) -> torch.Tensor:
    """sum(w * l) / sum(w) with each term weighted by its anchor's image; 0 without terms."""
    w = [1.0 if weights is None else float(weights[a % n]) for a, _ in terms]
    if not terms:
        return torch.zeros((), dtype=torch.float64)
    return sum(wi * term for wi, (_, term) in zip(w, terms, strict=True)) / sum(w)


def assert_same_value_and_gradient(
    fast: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    slow: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z_a: torch.Tensor,
    z_b: torch.Tensor,
) -> None:
    """``fast`` in float32 and ``slow`` in float64 agree within 1e-5, in value and in the
    gradient with respect to both views."""
    fast_in = [z_a.float().requires_grad_(), z_b.float().requires_grad_()]
    slow_in = [z_a.double().requires_grad_(), z_b.double().requires_grad_()]
    fast_loss, slow_loss = fast(*fast_in), slow(*slow_in)
    assert slow_loss.item() > 0  # a loss of 0 would prove little
    assert fast_loss.item() == pytest.approx(slow_loss.item(), abs=1e-5)
    fast_grads = torch.autograd.grad(fast_loss, fast_in)
    slow_grads = torch.autograd.grad(slow_loss, slow_in)
    for f, s in zip(fast_grads, slow_grads, strict=True):
        assert s.abs().sum() > 0
        torch.testing.assert_close(f.double(), s, atol=1e-5, rtol=0)


def random_batch(n: int = 6, dim: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)


LABELS = torch.tensor([0, 1, 0, 2, 1, 0])
"""Six images of three classes, of 3, 2 and 1 images."""
WEIGHTS = torch.tensor([0.5, 2.0, 0.5, 3.0, 2.0, 0.5])
"""A weight per image, as ``class_weights[LABELS]`` would give."""
LABELLINGS = {
    "views": (None, None),
    "classes": (LABELS, None),
    "weighted_classes": (LABELS, WEIGHTS),
}


# --- the losses against their direct formulas -----------------------------------------------------


@pytest.mark.parametrize("labelling", LABELLINGS)
@pytest.mark.parametrize("mining", ["batch_hard", "semi_hard", "all"])
def test_triplet_matches_direct_formula(mining: str, labelling: str) -> None:
    labels, weights = LABELLINGS[labelling]
    margin = 0.3
    z_a, z_b = random_batch()
    loss = TripletLoss(margin, mining)
    assert_same_value_and_gradient(
        lambda a, b: loss(a, b, labels, weights),
        lambda a, b: weighted_mean(slow_triplet(a, b, labels, margin, mining), weights, 6),
        z_a,
        z_b,
    )


@pytest.mark.parametrize("labelling", LABELLINGS)
@pytest.mark.parametrize("k", [1, 3, 20])
def test_margin_pair_matches_direct_formula(k: int, labelling: str) -> None:
    """k = 20 asks for more negatives than the batch has: every negative is used."""
    labels, weights = LABELLINGS[labelling]
    margin, alpha = 1.2, 0.7
    z_a, z_b = random_batch()
    loss = MarginPairLoss(margin, alpha, k)
    assert_same_value_and_gradient(
        lambda a, b: loss(a, b, labels, weights),
        lambda a, b: weighted_mean(slow_margin_pair(a, b, labels, margin, alpha, k), weights, 6),
        z_a,
        z_b,
    )


@pytest.mark.parametrize("labelling", ["classes", "weighted_classes"])
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_supcon_matches_direct_formula(t: float, labelling: str) -> None:
    labels, weights = LABELLINGS[labelling]
    z_a, z_b = random_batch()
    assert_same_value_and_gradient(
        lambda a, b: SupConLoss(t)(a, b, labels, weights),
        lambda a, b: weighted_mean(slow_supcon(a, b, labels, t), weights, 6),
        z_a,
        z_b,
    )


def test_supcon_learned_temperature_gets_the_direct_formulas_gradient() -> None:
    z_a, z_b = random_batch()
    t_fast = torch.tensor(0.3, requires_grad=True)
    t_slow = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    fast = SupConLoss()(z_a, z_b, LABELS, temperature=t_fast)
    slow = weighted_mean(slow_supcon(z_a.double(), z_b.double(), LABELS, t_slow), None, 6)
    assert fast.item() == pytest.approx(slow.item(), abs=1e-5)
    (g_fast,), (g_slow,) = torch.autograd.grad(fast, t_fast), torch.autograd.grad(slow, t_slow)
    assert g_fast.item() == pytest.approx(g_slow.item(), abs=1e-5)


def test_supcon_with_distinct_labels_is_ntxent() -> None:
    z_a, z_b = random_batch(8, 5, seed=3)
    assert_same_value_and_gradient(
        lambda a, b: SupConLoss(0.2)(a, b, torch.arange(8)),
        lambda a, b: NTXentLoss(0.2)(a, b).double(),
        z_a,
        z_b,
    )


def test_losses_ignore_autocast_and_compute_in_float32() -> None:
    z_a, z_b = random_batch()
    losses: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = [
        lambda a, b: TripletLoss(0.3, "semi_hard")(a, b, LABELS),
        lambda a, b: MarginPairLoss(1.2, 1.0, 2)(a, b, LABELS),
        lambda a, b: SupConLoss(0.2)(a, b, LABELS),
    ]
    for loss in losses:
        exact = loss(z_a, z_b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = loss(z_a.bfloat16(), z_b.bfloat16())
        assert low.dtype == torch.float32
        # only the bf16 rounding of the inputs remains (about 3 significant digits)
        assert low.item() == pytest.approx(exact.item(), rel=2e-2)


def test_single_class_batch_has_no_triplets_and_a_zero_loss() -> None:
    z_a, z_b = random_batch()
    for mining in ("batch_hard", "semi_hard", "all"):
        loss = TripletLoss(0.3, mining)(z_a, z_b, torch.zeros(6, dtype=torch.long))
        assert loss.item() == 0.0


# --- mining and the choice of negatives, on hand-made examples ------------------------------------


def on_circle(*degrees: float) -> torch.Tensor:
    """Unit vectors at these angles; two of them lie chord(difference) apart."""
    rad = torch.tensor(degrees) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def chord(degrees: float) -> float:
    return 2 * math.sin(math.radians(degrees) / 2)


# Two images, four views on the unit circle: image 0 at 0 and 60 degrees, image 1 at 40 and 150.
# View rows: 0 = image 0 at 0, 1 = image 1 at 40, 2 = image 0 at 60, 3 = image 1 at 150.
# Each anchor's positive and (angle to) its two negatives:
#   view 0: positive at 60; negatives at 40 (view 1) and 150 (view 3)
#   view 1: positive at 110; negatives at 40 (view 0) and 20 (view 2)
#   view 2: positive at 60; negatives at 20 (view 1) and 90 (view 3)
#   view 3: positive at 110; negatives at 150 (view 0) and 90 (view 2)
CIRCLE_A, CIRCLE_B = on_circle(0, 40), on_circle(60, 150)
MARGIN = 0.5


def test_batch_hard_takes_each_anchors_nearest_negative() -> None:
    # the nearest negative of each anchor: 40, 20, 20 and 90 degrees away
    picked = [(60, 40), (110, 20), (60, 20), (110, 90)]
    expected = sum(chord(p) - chord(n) + MARGIN for p, n in picked) / 4
    loss = TripletLoss(MARGIN, "batch_hard")(CIRCLE_A, CIRCLE_B)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_semi_hard_takes_the_nearest_negative_beyond_the_positive() -> None:
    # view 0: 150 (40 is nearer but closer than the positive), loss 0: outside the margin
    # view 1: no negative beyond 110: falls back to the farthest, 40
    # view 2: 90 (20 is closer than the positive); within the margin
    # view 3: 150 (90 is closer than the positive); within the margin
    picked = [(60, 150), (110, 40), (60, 90), (110, 150)]
    terms = [max(0.0, chord(p) - chord(n) + MARGIN) for p, n in picked]
    assert terms[0] == 0 and all(0 < term < MARGIN for term in terms[2:])
    loss = TripletLoss(MARGIN, "semi_hard")(CIRCLE_A, CIRCLE_B)
    assert loss.item() == pytest.approx(sum(terms) / 4, abs=1e-6)


def test_all_averages_over_the_triplets_with_a_positive_loss() -> None:
    triplets = [(60, 40), (60, 150), (110, 40), (110, 20), (60, 20), (60, 90), (110, 150),
                (110, 90)]
    terms = [chord(p) - chord(n) + MARGIN for p, n in triplets]
    active = [term for term in terms if term > 0]
    assert len(active) == 7  # (60, 150) is satisfied and must not dilute the mean
    loss = TripletLoss(MARGIN, "all")(CIRCLE_A, CIRCLE_B)
    assert loss.item() == pytest.approx(sum(active) / 7, abs=1e-6)


def test_margin_pair_negatives_follow_each_anchor_in_batch_order() -> None:
    """Three images, one negative per positive: view i of image i pairs with the next view in
    the batch order that shows another image (rows 0-2 first views, rows 3-5 second views)."""
    z_a, z_b = on_circle(0, 100, 200), on_circle(30, 140, 250)
    # (anchor, positive, negative) as rows; rows 2 -> 3 and 5 -> 0 wrap to the other half
    pairs = [(0, 3, 1), (1, 4, 2), (2, 5, 3), (3, 0, 4), (4, 1, 5), (5, 2, 0)]
    z = torch.cat([z_a, z_b])
    margin, alpha = 1.5, 2.0
    expected = 0.0
    for a, p, n in pairs:
        d_ap, d_an = (z[a] - z[p]).norm().item(), (z[a] - z[n]).norm().item()
        expected += (d_ap + alpha * max(0.0, margin - d_an) ** 2) / 2
    loss = MarginPairLoss(margin, alpha, 1)(z_a, z_b)
    assert loss.item() == pytest.approx(expected / 6, abs=1e-6)


def test_margin_pair_positive_term_is_the_distance() -> None:
    """A positive pair costs d, not d^2 / 2: two views 90 degrees apart (d = sqrt 2), negatives
    beyond the margin."""
    z_a, z_b = on_circle(0, 180), on_circle(90, 270)
    loss = MarginPairLoss(margin=0.5, alpha=1.0, negatives_per_positive=1)(z_a, z_b)
    # each anchor: one positive (sqrt 2) and one negative at distance >= sqrt 2 (cost 0)
    assert loss.item() == pytest.approx(math.sqrt(2) / 2, abs=1e-6)


# --- class balance --------------------------------------------------------------------------------


def tiny_params(method: str, **section: object) -> Params:
    raw: dict = {
        "device": "cpu",
        "model": {"encoder": "small_cnn", "width": 4, "projection_hidden_dim": 8,
                  "projection_dim": 4},
        "train": {"method": method, "batch_size": 4},
    }
    if section:
        raw["train"][method] = section
    return parse_params(raw)


@pytest.mark.parametrize(
    ("params", "slow"),
    [
        (tiny_params("supcon"), lambda a, b, y: slow_supcon(a, b, y, 0.2)),
        (
            tiny_params("triplet", supervised=True),
            lambda a, b, y: slow_triplet(a, b, y, 0.2, "batch_hard"),
        ),
        (
            tiny_params("margin_pair", supervised=True),
            lambda a, b, y: slow_margin_pair(a, b, y, 0.5, 1.0, 1),
        ),
    ],
    ids=["supcon", "triplet", "margin_pair"],
)
def test_class_weights_weigh_each_anchor_by_its_class(
    params: Params, slow: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Terms]
) -> None:
    # a training split of 9:1; its inverse-frequency weights n / (C * n_c)
    weights = train.class_weights(np.array([0] * 90 + [1] * 10), 2)
    torch.testing.assert_close(weights, torch.tensor([100 / 180, 100 / 20]))
    torch.manual_seed(0)
    encoder = build_encoder(params.model, 8)
    method = methods.build(encoder, params, methods.MethodInputs(class_weights=weights))
    # derived from the data on every start, so not part of the checkpoint
    assert "class_weights" not in method.state_dict()
    # a batch of four images, one of the rare class
    labels = torch.tensor([0, 0, 0, 1])
    view_a, view_b = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    loss = method(view_a, view_b, labels)

    with torch.no_grad():
        z_a, z_b = method.head(method.encoder(torch.cat([view_a, view_b]))).double().chunk(2)
    per_view = [float(term) for _, term in slow(z_a, z_b, labels)]
    w = [float(weights[c]) for c in labels.tolist() * 2]
    expected = sum(wi * li for wi, li in zip(w, per_view, strict=True)) / sum(w)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    # the rare class's anchors count 9 times as much: far from the plain mean
    assert abs(expected - sum(per_view) / 8) > 1e-3


def test_balanced_sampler_draws_classes_about_equally() -> None:
    labels = torch.tensor([0] * 900 + [1] * 100)
    images = torch.zeros(1000, 8, 8, 3, dtype=torch.uint8)
    views = SimCLRViews(AugmentConfig(), 8)

    def drawn(balanced: bool) -> torch.Tensor:
        batches = InMemoryBatches(images, labels, 100, views, [0.5] * 3, [0.25] * 3, 0,
                                  balanced=balanced)
        return torch.cat([y for epoch in range(3) for _, _, y in batches.epoch(epoch)])

    balanced, plain = drawn(True), drawn(False)
    assert len(balanced) == len(plain) == 3000
    assert abs(balanced.float().mean().item() - 0.5) < 0.05
    assert torch.bincount(plain).tolist() == [2700, 300]


# --- tiny pretraining runs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("digits")
    params = load_params(write_params(folder))
    prepare(params.data, params.seed, out_dir=folder / "prepared")
    return folder / "prepared"


@pytest.fixture(scope="module")
def imbalanced_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits with all of classes 0-4 and one image in ten of classes 5-9."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.rint(bunch.images * 255 / 16).astype(np.uint8)
    y = bunch.target.astype(np.int64)
    keep = np.concatenate(
        [np.flatnonzero(y == k) if k < 5 else np.flatnonzero(y == k)[::10] for k in range(10)]
    )
    path = tmp_path_factory.mktemp("imbalanced") / "digits.npz"
    np.savez(path, x=x[keep], y=y[keep])
    return path


def run_pretrain(folder: Path, prepared: Path, overrides: dict) -> dict:
    params = load_params(write_params(folder, overrides))
    return pretrain_stage.run(params, Layout(folder, prepared_dir=prepared))


@pytest.mark.parametrize(
    "train_cfg",
    [
        {"method": "triplet"},
        {"method": "triplet", "triplet": {"supervised": True, "mining": "semi_hard"}},
        {"method": "margin_pair", "margin_pair": {"negatives_per_positive": 2}},
        {"method": "supcon", "learn_temperature": True},
    ],
    ids=["triplet", "triplet_supervised", "margin_pair", "supcon"],
)
def test_tiny_pretraining_gives_a_finite_loss_and_an_encoder(
    tmp_path: Path, digits_prepared: Path, train_cfg: dict
) -> None:
    metrics = run_pretrain(tmp_path, digits_prepared, {"train": train_cfg})
    assert metrics["method"] == train_cfg["method"]
    assert math.isfinite(metrics["final_loss"]) and metrics["final_loss"] > 0
    encoder, _ = load_encoder(Layout(tmp_path).encoder)
    assert encoder(torch.zeros(2, 3, 8, 8)).shape == (2, encoder.embedding_dim)
    if train_cfg.get("learn_temperature"):
        assert 0.01 <= metrics["temperature"] <= 1


@pytest.mark.parametrize("balance", ["weights", "sampler"])
def test_imbalanced_supcon_with_class_balance(
    tmp_path: Path, imbalanced_npz: Path, balance: str
) -> None:
    overrides = {
        "data": {"source": "npz", "path": str(imbalanced_npz), "image_size": 8},
        "train": {"method": "supcon", "class_balance": balance},
    }
    params = load_params(write_params(tmp_path, overrides))
    manifest = prepare(params.data, params.seed, out_dir=tmp_path / "prepared")
    counts = manifest["counts"]["train"]
    assert counts["0"] > 5 * counts["9"]
    metrics = run_pretrain(tmp_path, tmp_path / "prepared", overrides)
    assert math.isfinite(metrics["final_loss"]) and metrics["final_loss"] > 0
    assert Layout(tmp_path).encoder.is_file()


# --- one-line errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("section", ["triplet", "margin_pair"])
def test_non_positive_margin_is_refused(section: str) -> None:
    with pytest.raises(ConfigError, match=f"train.{section}.margin"):
        parse_params({"train": {"method": section, section: {"margin": 0}}})


@pytest.mark.parametrize(
    "train_cfg",
    [
        {"method": "supcon"},
        {"method": "triplet", "triplet": {"supervised": True}},
        {"method": "margin_pair", "margin_pair": {"supervised": True}},
    ],
    ids=["supcon", "triplet", "margin_pair"],
)
def test_labels_as_positives_on_single_class_data_exit_2_naming_the_method(
    workspace: Path, digits_prepared: Path, capsys: pytest.CaptureFixture, train_cfg: dict
) -> None:
    # prepare itself refuses an npz of one class ...
    single = workspace / "one_class.npz"
    distinct = np.repeat(np.arange(30, dtype=np.uint8), 64).reshape(30, 8, 8)
    np.savez(single, x=distinct, y=np.zeros(30, np.int64))
    write_params(workspace, {"data": {"source": "npz", "path": str(single), "image_size": 8}})
    assert main(["prepare"]) == 2
    assert "data.path" in capsys.readouterr().err
    # ... so a training split of one class can only come from elsewhere: digits relabelled
    prepared = workspace / "data" / "prepared"
    prepared.mkdir(parents=True)
    for file in ("manifest.json", "val.npz", "test.npz"):
        (prepared / file).write_bytes((digits_prepared / file).read_bytes())
    with np.load(digits_prepared / "train.npz") as npz:
        np.savez(prepared / "train.npz", x=npz["x"], y=np.zeros_like(npz["y"]))
    write_params(workspace, {"train": train_cfg})

    assert main(["pretrain"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "train.method" in err and "single class" in err, err
    assert not Path("models").exists() and not Path("checkpoints").exists()
