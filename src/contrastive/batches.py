"""What the training loop iterates over: the training split as batches of two views per image.

The prepared images stay on the training device as one ``uint8`` tensor, and views are made there
a batch at a time. Every epoch draws its order and its views from one generator seeded by
``(seed, epoch)``, so a run resumed after epoch ``e`` continues exactly as the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from contrastive.augment import SimCLRViews
from contrastive.models import normalize

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Two normalised views ``(B, 3, H, W)`` of the same B images, and their labels ``(B,)``."""


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def view_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of rank ``rank``'s views in ``epoch`` when several processes train: each rank
    draws its own views, so no two ranks share the random crops of their images."""
    return (epoch_seed(seed, epoch) * 65_537 + rank + 1) % (2**63)


class InMemoryBatches:
    """Shuffled batches of the whole training split, held on ``device``; the last partial batch
    of an epoch is dropped.

    ``balanced`` draws each epoch's order with replacement so that every class is equally likely
    (a class-balanced sampler), instead of a permutation. ``prefetch`` makes each batch on a
    background thread while the caller trains on the one before; ``None`` decides by the device
    (:func:`prefetch_by_default`). The batches are the same either way.

    With ``world_size`` processes, ``batch_size`` is the global batch: every rank draws the same
    (seed, epoch) order and takes its ``batch_size / world_size`` consecutive images of each
    global batch (rank 0 the first), and draws their views from its own generator
    (:func:`view_seed`). A run is then reproducible for a given world size; with one process,
    order and views come from one generator, as they always did.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        views: SimCLRViews,
        mean: list[float],
        std: list[float],
        seed: int,
        memory_format: torch.memory_format = torch.contiguous_format,
        balanced: bool = False,
        prefetch: bool | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.views = batch_size, views
        self.mean, self.std, self.seed = mean, std, seed
        self.memory_format, self.balanced = memory_format, balanced
        self.prefetch = prefetch_by_default(images.device) if prefetch is None else prefetch
        self.steps_per_epoch = len(images) // batch_size
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        """Images per batch on this rank."""

    def order(self, generator: torch.Generator) -> torch.Tensor:
        """The epoch's sequence of image indices."""
        n = len(self.images)
        if not self.balanced:
            return torch.randperm(n, device=self.images.device, generator=generator)
        counts = torch.bincount(self.labels)
        weights = 1.0 / counts[self.labels].double()
        return torch.multinomial(weights, n, replacement=True, generator=generator)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The epoch's batches, in order; with :attr:`prefetch`, each made while the caller
        trains on the one before (same numbers: see :func:`one_ahead`)."""
        device = self.images.device
        generator = torch.Generator(device=device).manual_seed(epoch_seed(self.seed, epoch))
        order = self.order(generator)
        views_generator = generator
        if self.world_size > 1:
            views_generator = torch.Generator(device=device).manual_seed(
                view_seed(self.seed, epoch, self.rank)
            )
        start = self.rank * self.local_batch
        # CUDA streams are per thread: a prefetching thread must queue on the caller's stream
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

        def make(step: int) -> Batch:
            # index: (local_batch,) this rank's slice of the step's global batch
            first = step * self.batch_size + start
            index = order[first : first + self.local_batch]
            with torch.cuda.stream(stream):  # None (the CPU): nothing to do
                view_a, view_b = (
                    normalize(self.views(self.images[index], views_generator), self.mean, self.std)
                    .contiguous(memory_format=self.memory_format)
                    for _ in range(2)
                )
                return view_a, view_b, self.labels[index]

        if self.prefetch:
            yield from one_ahead(make, self.steps_per_epoch)
        else:
            yield from (make(step) for step in range(self.steps_per_epoch))


def prefetch_by_default(device: torch.device) -> bool:
    """Whether batches on ``device`` are made one ahead when the caller does not say.

    On CUDA, yes: the views are some 80 small kernels per batch, and queuing them from another
    thread while the training step runs keeps the host's launch work (and any wait the views make)
    off the step's critical path. On the CPU, no: the step already spreads its ops over every
    usable CPU, so views made beside it can only take cores from it, and they are a small share of
    a CPU step (about 8 ms of 300-600 ms for the digits default): measured on 2 cores, prefetching
    did not pay, idle or contended (docs/benchmarks.md, "Contention").
    """
    return device.type == "cuda"


def one_ahead(make: Callable[[int], Batch], count: int) -> Iterator[Batch]:
    """``make(0), make(1), ..., make(count - 1)``, each computed on a background thread while the
    caller works on the previous one.

    The calls run one at a time and in order (``make(k + 1)`` starts only after ``make(k)`` has
    returned), so a generator they share is drawn from in exactly the order of the plain loop and
    the results are the same, only earlier. An exception in ``make`` is raised to the caller when
    it asks for that batch. Grad and inference mode are per thread: ``make`` runs in the caller's.
    """
    if count == 0:
        return
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def in_callers_mode(step: int) -> Batch:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return make(step)

    with ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch") as worker:
        pending: Future[Batch] = worker.submit(in_callers_mode, 0)
        for step in range(count):
            batch = pending.result()
            if step + 1 < count:
                pending = worker.submit(in_callers_mode, step + 1)
            yield batch
