"""MoCo v2: InfoNCE against a direct formula, the momentum update, the queue, and exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from contrastive import paths
from contrastive.config import MoCoConfig, ModelConfig, load_params
from contrastive.data import load_split, prepare
from contrastive.layout import Layout
from contrastive.losses import InfoNCELoss, Temperature
from contrastive.methods.moco import MoCo
from contrastive.models import build_encoder, load_encoder
from contrastive.stages import pretrain as pretrain_stage
from tests.conftest import write_params


def slow_infonce(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: torch.Tensor | float
) -> torch.Tensor:
    """MoCo's loss written out query by query: -log(e^(q.k/t) / (e^(q.k/t) + sum_j e^(q.n_j/t)))
    on unit vectors, averaged over the queries."""
    total = torch.zeros((), dtype=q.dtype)
    for i in range(len(q)):
        query = q[i] / q[i].norm()
        positive = torch.exp(query @ (k[i] / k[i].norm()) / t)
        negatives = sum(torch.exp(query @ (n / n.norm()) / t) for n in queue)
        total = total - torch.log(positive / (positive + negatives))
    return total / len(q)


def tiny_moco(queue_size: int = 6, momentum: float = 0.75, **config: object) -> MoCo:
    """MoCo around a SmallCNN of width 4 for 8x8 images, with a head of 8 -> 3."""
    torch.manual_seed(0)
    encoder = build_encoder(ModelConfig(encoder="small_cnn", width=4), image_size=8)
    moco_config = MoCoConfig(queue_size=queue_size, momentum=momentum, **config)
    return MoCo(encoder, hidden_dim=8, out_dim=3, temperature=Temperature(0.2), config=moco_config)


def views(n: int = 4, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 3, 8, 8, generator=g),
        torch.randn(n, 3, 8, 8, generator=g),
        torch.zeros(n),
    )


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_infonce_matches_direct_formula_values_and_gradients(t: float) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, queue = (
        torch.randn(*shape, generator=g, dtype=torch.float64) for shape in [(4, 5), (4, 5), (7, 5)]
    )
    q.requires_grad_(True)
    k.requires_grad_(True)
    loss = InfoNCELoss(t)(q, k, queue)
    expected = slow_infonce(q, k, queue, t)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for got, want in zip(
        torch.autograd.grad(loss, [q, k]), torch.autograd.grad(expected, [q, k]), strict=True
    ):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_infonce_learned_temperature_gets_the_direct_formulas_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, queue = (
        torch.randn(3, 4, generator=g),
        torch.randn(3, 4, generator=g),
        torch.randn(5, 4, generator=g),
    )
    q.requires_grad_(True)
    t = torch.tensor(0.3, requires_grad=True)
    # the constructor's temperature is replaced by the one given to forward
    loss = InfoNCELoss(0.9)(q, k, queue, temperature=t)
    expected = slow_infonce(q.double(), k.double(), queue.double(), t.double())
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    for got, want in zip(
        torch.autograd.grad(loss, [q, t]), torch.autograd.grad(expected, [q, t]), strict=True
    ):
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=0)


def test_infonce_rejects_keys_that_do_not_match_the_queries() -> None:
    with pytest.raises(ValueError, match="queue"):
        InfoNCELoss()(torch.randn(4, 3), torch.randn(1, 3), torch.randn(5, 3))


def test_key_side_is_a_frozen_copy_of_the_query_side() -> None:
    moco = tiny_moco()
    for query, key in moco._query_and_key():
        for (name, q), k in zip(query.state_dict().items(), key.state_dict().values(), strict=True):
            assert torch.equal(q, k), name
        assert not any(p.requires_grad for p in key.parameters())
    moco(*views()).backward()
    assert all(p.grad is None for p in moco.key_encoder.parameters())
    assert all(p.grad is not None for p in moco.encoder.parameters())


def test_after_step_moves_key_parameters_by_ema_and_copies_buffers() -> None:
    moco = tiny_moco(momentum=0.75)
    moco(*views())  # the query encoder's BatchNorm statistics move; the key's move otherwise
    with torch.no_grad():
        for p in [*moco.encoder.parameters(), *moco.head.parameters()]:
            p.add_(torch.randn_like(p))
    old = {
        name: value.clone()
        for name, value in moco.state_dict().items()
        if name.startswith(("key_encoder.", "key_head."))
    }
    moco.after_step(0.3)
    # 0.25 * query is exact in float32, so the hand formula matches bit for bit
    state = moco.state_dict()
    params = {name for name, _ in moco.named_parameters(remove_duplicate=False)}
    for name, before in old.items():
        query = state[name.replace("key_", "", 1)]
        if name in params:
            assert torch.equal(state[name], 0.75 * before + 0.25 * query), name
        else:
            assert torch.equal(state[name], query), name


def test_cosine_momentum_schedule() -> None:
    constant = tiny_moco(momentum=0.99)
    assert [constant.momentum_at(p) for p in (0.0, 0.5, 1.0)] == [0.99, 0.99, 0.99]
    cosine = tiny_moco(momentum=0.99, momentum_schedule="cosine")
    assert cosine.momentum_at(0.0) == pytest.approx(0.99, abs=1e-12)
    assert cosine.momentum_at(0.5) == pytest.approx(0.995, abs=1e-12)
    assert cosine.momentum_at(1.0) == 1.0
    assert cosine.momentum_at(0.25) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)

    # after_step uses the scheduled factor: 0.875 halfway from 0.75
    moco = tiny_moco(momentum=0.75, momentum_schedule="cosine")
    with torch.no_grad():
        for p in moco.encoder.parameters():
            p.add_(1.0)
    old = [p.clone() for p in moco.key_encoder.parameters()]
    moco.after_step(0.5)
    for before, q, k in zip(
        old, moco.encoder.parameters(), moco.key_encoder.parameters(), strict=True
    ):
        assert torch.equal(k, 0.875 * before + 0.125 * q)


def test_queue_is_fifo_and_wraps_around() -> None:
    moco = tiny_moco(queue_size=5)
    initial = moco.queue.clone()
    moco.enqueue(torch.full((2, 3), 1.0))
    assert int(moco.queue_ptr) == 2
    assert torch.equal(moco.queue[:2], torch.ones(2, 3))
    assert torch.equal(moco.queue[2:], initial[2:])
    moco.enqueue(torch.full((2, 3), 2.0))
    assert int(moco.queue_ptr) == 4
    # the third batch fills the last slot and wraps to the first
    moco.enqueue(torch.tensor([[3.0, 3, 3], [4, 4, 4]]))
    assert int(moco.queue_ptr) == 1
    expected = torch.tensor([[4.0] * 3, [1] * 3, [2] * 3, [2] * 3, [3] * 3])
    assert torch.equal(moco.queue, expected)

    # 7 keys into 5 slots from slot 1: written one by one, keys 4, 5, 6 overwrite 0, 1, 2
    keys = torch.arange(7.0).repeat_interleave(3).reshape(7, 3) + 10
    moco.enqueue(keys)
    assert torch.equal(moco.queue, keys[[4, 5, 6, 2, 3]])
    assert int(moco.queue_ptr) == 3


def test_forward_is_infonce_of_query_on_key_encoder_and_enqueues_those_keys() -> None:
    moco = tiny_moco(queue_size=6)
    view_a, view_b, labels = views()
    negatives = moco.queue.clone()
    loss = moco(view_a, view_b, labels)
    with torch.no_grad():
        keys = F.normalize(moco.key_head(moco.key_encoder(view_b)), dim=1)
        queries = moco.head(moco.encoder(view_a))
    assert loss.item() == pytest.approx(
        slow_infonce(queries, keys, negatives, 0.2).item(), abs=1e-5
    )
    assert torch.equal(moco.queue[:4], keys) and torch.equal(moco.queue[4:], negatives[4:])
    assert int(moco.queue_ptr) == 4


def test_symmetric_averages_both_directions_and_enqueues_both_key_sets() -> None:
    moco = tiny_moco(queue_size=10, symmetric=True)
    view_a, view_b, labels = views()
    negatives = moco.queue.clone()
    loss = moco(view_a, view_b, labels)
    with torch.no_grad():
        keys_a, keys_b = (
            F.normalize(moco.key_head(moco.key_encoder(v)), dim=1) for v in (view_a, view_b)
        )
        q_a, q_b = (moco.head(moco.encoder(v)) for v in (view_a, view_b))
    expected = slow_infonce(q_a, keys_b, negatives, 0.2) + slow_infonce(q_b, keys_a, negatives, 0.2)
    assert loss.item() == pytest.approx(expected.item() / 2, abs=1e-5)
    assert torch.equal(moco.queue[:8], torch.cat([keys_a, keys_b]))
    assert torch.equal(moco.queue[8:], negatives[8:])
    assert int(moco.queue_ptr) == 8


def test_resume_with_a_partly_filled_queue_matches_the_uninterrupted_run(workspace: Path) -> None:
    write_params(
        workspace,
        {
            "train": {
                "method": "moco",
                "epochs": 2,
                "learn_temperature": True,
                "moco": {"queue_size": 1536, "momentum_schedule": "cosine"},
            }
        },
    )
    params = load_params("params.yaml")
    prepare(params.data, params.seed)
    keys_per_epoch = len(load_split(paths.PREPARED, "train")[1]) // 128 * 128
    # 1152 of 1536 slots are written after epoch 1 (the rest still random); epoch 2 wraps around
    assert keys_per_epoch == 1152

    pretrain_stage.run(params, Layout("full", prepared_dir=Path(paths.PREPARED)))
    assert pretrain_stage.run(params, Layout(), stop_after_epoch=1) == {"stopped_after_epoch": 1}
    killed = torch.load("checkpoints/last.pt", weights_only=True)
    assert killed["epoch"] == 1 and int(killed["method"]["queue_ptr"]) == 1152
    pretrain_stage.run(params, Layout())

    full = torch.load(Layout("full").checkpoints / "last.pt", weights_only=True)
    resumed = torch.load("checkpoints/last.pt", weights_only=True)
    assert int(resumed["method"]["queue_ptr"]) == 2 * 1152 % 1536
    for (name, a), b in zip(full["method"].items(), resumed["method"].values(), strict=True):
        assert torch.equal(a, b), name
    timeless = [{k: v for k, v in r.items() if k != "images_per_s"} for r in full["history"]]
    assert timeless == [
        {k: v for k, v in r.items() if k != "images_per_s"} for r in resumed["history"]
    ]
    for (name, a), b in zip(
        load_encoder(Layout("full").encoder)[0].state_dict().items(),
        load_encoder(paths.ENCODER)[0].state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), name

    # the learned temperature moved from its start, 0.2, and stayed within CLIP's bounds
    temperatures = [record["temperature"] for record in full["history"]]
    assert len(set(temperatures)) == 2 and 0.2 not in temperatures
    assert all(0.01 <= t <= 1 for t in temperatures)
