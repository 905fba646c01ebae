"""NT-Xent against a direct, slow formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from contrastive.losses import NTXentLoss


def slow_ntxent(z_a: torch.Tensor, z_b: torch.Tensor, t: float) -> float:
    """The loss of SimCLR written out term by term over the 2N views."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z_a, z_b])]
    n = len(z_a)
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        sims = {k: float(z[i] @ z[k]) / t for k in range(2 * n) if k != i}
        denominator = sum(math.exp(s) for s in sims.values())
        total += -math.log(math.exp(sims[partner]) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_matches_direct_formula(t: float) -> None:
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert NTXentLoss(t)(z_a, z_b).item() == pytest.approx(slow_ntxent(z_a, z_b, t), rel=1e-5)


def test_aligned_views_score_lower_than_random_views() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(32, 16, generator=g)
    loss = NTXentLoss(0.2)
    aligned = loss(z, z + 0.01 * torch.randn(32, 16, generator=g))
    unrelated = loss(z, torch.randn(32, 16, generator=g))
    assert aligned < unrelated
    # a perfect match cannot beat log(1) but must be far below chance, log(2N - 1)
    assert aligned.item() < math.log(63) / 2


def test_gradient_flows_to_both_views() -> None:
    z_a = torch.randn(4, 3, requires_grad=True)
    z_b = torch.randn(4, 3, requires_grad=True)
    NTXentLoss(0.5)(z_a, z_b).backward()
    assert z_a.grad is not None and z_a.grad.abs().sum() > 0
    assert z_b.grad is not None and z_b.grad.abs().sum() > 0


def test_rejects_non_positive_temperature() -> None:
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(0.0)
