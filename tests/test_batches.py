"""The training batches: prefetching the next batch changes when it is made, never what it is."""

from __future__ import annotations

import threading

import pytest
import torch

from contrastive.augment import SimCLRViews
from contrastive.batches import InMemoryBatches, one_ahead, prefetch_by_default
from contrastive.config import AugmentConfig

SIZE = 8


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def batches(
    prefetch: bool | None, views: SimCLRViews | None = None, device: str = "cpu", **kwargs: object
) -> InMemoryBatches:
    """200 random 12x12 images of 4 classes in batches of 48 (4 per epoch, 8 images dropped)."""
    data = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (200, 12, 12, 3), dtype=torch.uint8, generator=data)
    labels = torch.randint(0, 4, (200,), generator=data)
    images, labels = images.to(device), labels.to(device)
    views = views or SimCLRViews(AugmentConfig(hflip=0.5, saturation=0.4, hue=0.1), SIZE)
    return InMemoryBatches(images, labels, 48, views, [0.5] * 3, [0.25] * 3, seed=3,
                           prefetch=prefetch, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("balanced", [False, True])
def test_prefetched_batches_equal_the_plain_ones_exactly(balanced: bool, device: str) -> None:
    plain = batches(False, balanced=balanced, device=device)
    ahead = batches(True, balanced=balanced, device=device)
    for epoch in range(2):
        expected, got = list(plain.epoch(epoch)), list(ahead.epoch(epoch))
        assert len(got) == len(expected) == 4
        for mine, theirs in zip(got, expected, strict=True):
            for a, b in zip(mine, theirs, strict=True):
                assert torch.equal(a, b)
    assert not torch.equal(expected[0][0], expected[1][0])  # the batches do differ


def test_prefetching_by_default_on_cuda_only() -> None:
    """On the CPU the views would take cores from the step (docs/benchmarks.md, "Contention")."""
    assert batches(None).prefetch is False
    assert prefetch_by_default(torch.device("cuda")) is True


def test_the_next_batch_is_made_on_another_thread_while_the_caller_holds_this_one() -> None:
    made = [threading.Event() for _ in range(3)]
    threads: list[str] = []

    def make(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        threads.append(threading.current_thread().name)
        made[step].set()
        return torch.full((1,), step), torch.zeros(1), torch.zeros(1)

    steps = one_ahead(make, 3)
    assert next(steps)[0].item() == 0
    assert made[1].wait(timeout=30)  # made before the caller asked for it
    assert not made[2].is_set()  # only one batch ahead
    assert [b[0].item() for b in steps] == [1, 2]
    assert all(name.startswith("batch-prefetch") for name in threads)


class FailingViews(SimCLRViews):
    """Views that fail on the third call (the first view of the second batch)."""

    def __init__(self) -> None:
        super().__init__(AugmentConfig(), SIZE)
        self.calls = 0

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("views failed")
        return super().__call__(images, generator)


def test_an_error_while_prefetching_reaches_the_caller_at_that_batch() -> None:
    steps = batches(True, views=FailingViews()).epoch(0)
    next(steps)  # the first batch is fine
    with pytest.raises(RuntimeError, match="views failed"):
        next(steps)


def test_a_caller_that_stops_early_leaves_no_thread_behind() -> None:
    steps = batches(True).epoch(0)
    next(steps)
    assert any(t.name.startswith("batch-prefetch") for t in threading.enumerate())
    steps.close()  # as a loop that breaks or fails does
    assert not any(t.name.startswith("batch-prefetch") for t in threading.enumerate())
