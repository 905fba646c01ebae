"""CLIP's symmetric InfoNCE against a direct formula written out term by term."""

from __future__ import annotations

import math

import pytest
import torch

from contrastive.losses import CLIPLoss, Temperature


def direct_clip(image: torch.Tensor, text: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """The loss of CLIP with explicit loops over the pairs: for every i, -log of the softmax
    of the positive s_ii over its row (image to text) and over its column (text to image)."""
    n = len(image)
    u = [x / x.norm() for x in image]
    v = [y / y.norm() for y in text]
    s = [[(u[i] @ v[j]) / t for j in range(n)] for i in range(n)]
    total = torch.zeros(())
    for i in range(n):
        positive = torch.exp(s[i][i])
        row = sum(torch.exp(s[i][j]) for j in range(n))
        column = sum(torch.exp(s[j][i]) for j in range(n))
        total = total - torch.log(positive / row) - torch.log(positive / column)
    return total / (2 * n)


def pairs(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


@pytest.mark.parametrize("t", [0.07, 0.5, 1.0, "tensor"])
@pytest.mark.parametrize(("n", "d"), [(1, 4), (2, 3), (5, 8), (9, 16)])
def test_matches_direct_formula(n: int, d: int, t: float | str) -> None:
    temperature: torch.Tensor | float = torch.tensor(0.2) if t == "tensor" else float(t)
    image, text = pairs(n, d, seed=10 * n + d)
    loss = CLIPLoss()(image, text, temperature)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, direct_clip(image, text, temperature))


@pytest.mark.parametrize("initial", [0.07, 0.5])
def test_gradients_match_direct_formula(initial: float) -> None:
    image, text = pairs(6, 5, seed=3)
    grads = []
    for fn in (CLIPLoss(), direct_clip):
        temp = Temperature(initial, learnable=True)
        x, y = image.clone().requires_grad_(), text.clone().requires_grad_()
        t = temp()
        assert isinstance(t, torch.Tensor)
        torch.testing.assert_close(t, torch.tensor(initial))
        loss = fn(x, y, t)
        grads.append(torch.autograd.grad(loss, [x, y, temp.log_t]))
    (gx, gy, gt), (ex, ey, et) = grads
    assert gx.abs().sum() > 0 and gy.abs().sum() > 0 and gt.abs() > 0
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gy, ey)
    torch.testing.assert_close(gt, et)


def test_symmetric_in_image_and_text() -> None:
    image, text = pairs(7, 6, seed=4)
    loss = CLIPLoss()
    torch.testing.assert_close(loss(image, text, 0.1), loss(text, image, 0.1))


def test_aligned_pairs_near_zero_shuffled_pairs_not() -> None:
    n, d, t = 8, 10, 0.01
    # orthogonal rows of differing lengths: the loss normalises them
    image = torch.eye(n, d) * torch.arange(1.0, n + 1)[:, None]
    loss = CLIPLoss()
    aligned = loss(image, image.clone(), t)
    # every row shifted by one: no image sits with its own text, all positives score 0 vs 1/t
    shuffled = loss(image, image.roll(1, dims=0), t)
    assert 0.0 <= aligned.item() < 1e-6
    assert shuffled.item() == pytest.approx(1 / t + math.log(1 + (n - 1) * math.exp(-1 / t)))
    assert shuffled > aligned + 10


def test_single_pair_is_exactly_zero() -> None:
    image, text = pairs(1, 5, seed=5)
    assert CLIPLoss()(image, text, 0.07).item() == 0.0


def test_bf16_under_autocast_computes_in_float32() -> None:
    image, text = (x.bfloat16() for x in pairs(16, 32, seed=6))
    t = torch.tensor(0.05)
    loss = CLIPLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(image, text, t)
    assert mixed.dtype == torch.float32
    # the same bf16 values taken to float32 first: a bf16 matmul would be off by ~1e-2
    torch.testing.assert_close(mixed, loss(image.float(), text.float(), t))


@pytest.mark.parametrize(
    ("image_shape", "text_shape"),
    [((4, 8), (5, 8)), ((4, 8), (4, 7)), ((4, 8), (4, 8, 1)), ((8,), (8,)), ((0, 8), (0, 8))],
)
def test_rejects_mismatched_shapes(
    image_shape: tuple[int, ...], text_shape: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError) as raised:
        CLIPLoss()(torch.randn(image_shape), torch.randn(text_shape), 0.1)
    assert str(image_shape) in str(raised.value) and str(text_shape) in str(raised.value)
