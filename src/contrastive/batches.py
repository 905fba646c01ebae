"""What the training loop iterates over: the training split as batches of two views per image.

The prepared images stay on the training device as one ``uint8`` tensor (:class:`InMemoryBatches`)
or, when they do not fit, are read step by step from the memory-mapped file
(:class:`StreamingBatches`, the same batches bit for bit); views are made on the device a batch
at a time. Every epoch draws its order and its views from one generator seeded by
``(seed, epoch)``, so a run resumed after epoch ``e`` continues exactly as the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from contrastive.augment import SimCLRViews
from contrastive.data import MappedArray
from contrastive.models import normalize

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Two normalised views ``(B, 3, H, W)`` of the same B images, and their labels ``(B,)``."""

Rows = tuple[Callable[[int], torch.Tensor], Callable[[], None]]
"""One epoch's source of uint8 rows: step -> rows on the device, and a release of its resources."""


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def view_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of rank ``rank``'s views in ``epoch`` when several processes train: each rank
    draws its own views, so no two ranks share the random crops of their images."""
    return (epoch_seed(seed, epoch) * 65_537 + rank + 1) % (2**63)


class _Batches:
    """What both batch sources share: the epoch's order, this rank's slice of every global batch,
    and the views, all drawn on ``device`` from the (seed, epoch) generator in one fixed order.
    A subclass says only where the uint8 rows of a step come from (:meth:`_rows`)."""

    def __init__(
        self,
        num_images: int,
        labels: torch.Tensor,
        batch_size: int,
        views: SimCLRViews,
        mean: list[float],
        std: list[float],
        seed: int,
        memory_format: torch.memory_format,
        balanced: bool,
        prefetch: bool | None,
        rank: int,
        world_size: int,
    ) -> None:
        self.num_images, self.labels = num_images, labels
        self.device = labels.device
        self.batch_size, self.views = batch_size, views
        self.mean, self.std, self.seed = mean, std, seed
        self.memory_format, self.balanced = memory_format, balanced
        self.prefetch = prefetch_by_default(self.device) if prefetch is None else prefetch
        self.steps_per_epoch = num_images // batch_size
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        """Images per batch on this rank."""

    def order(self, generator: torch.Generator) -> torch.Tensor:
        """The epoch's sequence of image indices."""
        n = self.num_images
        if not self.balanced:
            return torch.randperm(n, device=self.device, generator=generator)
        counts = torch.bincount(self.labels)
        weights = 1.0 / counts[self.labels].double()
        return torch.multinomial(weights, n, replacement=True, generator=generator)

    def step_index(self, order: torch.Tensor, step: int) -> torch.Tensor:
        """``(local_batch,)``: this rank's slice of global batch ``step`` of ``order``."""
        first = step * self.batch_size + self.rank * self.local_batch
        return order[first : first + self.local_batch]

    def _rows(self, order: torch.Tensor) -> Rows:
        """For the epoch of ``order``: a function giving step k's uint8 rows ``(local_batch, H,
        W, 3)`` on the device (called for k = 0, 1, ... in order), and one that releases what it
        holds."""
        raise NotImplementedError

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The epoch's batches, in order; with :attr:`prefetch`, each made while the caller
        trains on the one before (same numbers: see :func:`one_ahead`)."""
        device = self.device
        generator = torch.Generator(device=device).manual_seed(epoch_seed(self.seed, epoch))
        order = self.order(generator)
        views_generator = generator
        if self.world_size > 1:
            views_generator = torch.Generator(device=device).manual_seed(
                view_seed(self.seed, epoch, self.rank)
            )
        # CUDA streams are per thread: a prefetching thread must queue on the caller's stream
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        rows, release = self._rows(order)

        def make(step: int) -> Batch:
            index = self.step_index(order, step)
            with torch.cuda.stream(stream):  # None (the CPU): nothing to do
                images = rows(step)
                view_a, view_b = (
                    normalize(self.views(images, views_generator), self.mean, self.std)
                    .contiguous(memory_format=self.memory_format)
                    for _ in range(2)
                )
                return view_a, view_b, self.labels[index]

        try:
            if self.prefetch:
                yield from one_ahead(make, self.steps_per_epoch)
            else:
                yield from (make(step) for step in range(self.steps_per_epoch))
        finally:
            release()


class InMemoryBatches(_Batches):
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
        super().__init__(
            len(images), labels, batch_size, views, mean, std, seed, memory_format, balanced,
            prefetch, rank, world_size,
        )
        self.images = images

    def _rows(self, order: torch.Tensor) -> Rows:
        return (lambda step: self.images[self.step_index(order, step)]), lambda: None


class StepRows(torch.utils.data.Dataset[torch.Tensor]):
    """Item k: the uint8 rows of step k of one epoch, read from the memory-mapped split, in the
    order of ``order`` (this rank's slice of global batch k).

    Only the map's location travels to DataLoader workers; each opens the map itself on first
    use, so no mapping (and no page of the file) is pickled or shared.
    """

    def __init__(
        self, source: MappedArray, order: np.ndarray, batch_size: int, start: int,
        local_batch: int, steps: int,
    ) -> None:
        self.source, self.order = source, order
        self.batch_size, self.start, self.local_batch, self.steps = (
            batch_size, start, local_batch, steps,
        )
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> torch.Tensor:
        if self._array is None:
            self._array = self.source.open()
        first = step * self.batch_size + self.start
        index = self.order[first : first + self.local_batch]
        # read the rows in file order, once each (the balanced sampler repeats images), then
        # put them in the batch's order
        unique, inverse = np.unique(index, return_inverse=True)
        return torch.from_numpy(np.ascontiguousarray(self._array[unique][inverse]))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}


class StreamingBatches(_Batches):
    """The batches of :class:`InMemoryBatches`, bit for bit, without holding the images: the
    same order, slice and views (drawn on ``labels.device`` from the same generators in the
    same order), but each step's uint8 rows are read from the memory-mapped training split by
    ``workers`` DataLoader processes, a few steps ahead, and copied to the device.

    The labels (8 bytes an image) stay on the device: the balanced sampler needs them.
    ``workers`` 0 reads in the calling process.
    """

    def __init__(
        self,
        source: MappedArray,
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
        workers: int = 2,
    ) -> None:
        super().__init__(
            source.shape[0], labels, batch_size, views, mean, std, seed, memory_format,
            balanced, prefetch, rank, world_size,
        )
        self.source, self.workers = source, workers

    def _rows(self, order: torch.Tensor) -> Rows:
        rows = StepRows(
            self.source, order.cpu().numpy(), self.batch_size, self.rank * self.local_batch,
            self.local_batch, self.steps_per_epoch,
        )
        pin = self.device.type == "cuda"
        loader = torch.utils.data.DataLoader(
            rows, batch_size=None, num_workers=self.workers, pin_memory=pin,
            prefetch_factor=4 if self.workers else None,
        )
        steps = iter(loader)
        expected = [0]

        def read(step: int) -> torch.Tensor:
            assert step == expected[0], "steps are read in order"
            expected[0] += 1
            return next(steps).to(self.device, non_blocking=pin)

        def release() -> None:
            nonlocal steps
            del steps  # ends the workers

        return read, release


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
