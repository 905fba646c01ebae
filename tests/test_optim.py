"""The learning-rate schedule and the optimisers."""

import pytest
import torch

from contrastive.config import TrainConfig
from contrastive.optim import LARS, build_optimizer, lr_at, scaled_lr


def test_lr_scales_with_batch_size() -> None:
    assert scaled_lr(TrainConfig(lr=0.3, batch_size=512)) == pytest.approx(0.6)
    assert scaled_lr(TrainConfig(lr=0.3, batch_size=128)) == pytest.approx(0.15)


def test_warmup_then_cosine() -> None:
    total, warmup, peak = 100, 10, 1.0
    lrs = [lr_at(s, total, warmup, peak) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[55] == pytest.approx(0.5, abs=0.02)
    assert lrs[-1] < 0.01


@pytest.mark.parametrize("name", ["sgd", "adamw", "lars"])
def test_each_optimizer_reduces_a_loss(name: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    opt = build_optimizer(model, TrainConfig(optimizer=name, lr=0.5, batch_size=256), False)
    first = None
    for _ in range(50):
        loss = torch.nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_lars_leaves_biases_unadapted() -> None:
    bias = torch.nn.Parameter(torch.ones(3))
    bias.grad = torch.full((3,), 2.0)
    LARS([bias], lr=0.1, momentum=0.0, weight_decay=0.5).step()
    # plain SGD without weight decay: 1 - 0.1 * 2
    assert torch.allclose(bias, torch.full((3,), 0.8))


def test_a_learned_temperature_gets_no_weight_decay() -> None:
    from contrastive.losses import Temperature

    module = torch.nn.Module()
    module.linear = torch.nn.Linear(4, 2)
    module.temperature = Temperature(0.2, learnable=True)
    opt = build_optimizer(module, TrainConfig(weight_decay=0.1), False)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(module.temperature.log_t)] == 0.0
    assert decays[id(module.linear.weight)] == 0.1
