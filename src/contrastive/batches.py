"""What the training loop iterates over: the training split as batches of two views per image.

The prepared images stay on the training device as one ``uint8`` tensor, and views are made there
a batch at a time. Every epoch draws its order and its views from one generator seeded by
``(seed, epoch)``, so a run resumed after epoch ``e`` continues exactly as the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from contrastive.augment import SimCLRViews
from contrastive.models import normalize

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""Two normalised views ``(B, 3, H, W)`` of the same B images, and their labels ``(B,)``."""


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


class InMemoryBatches:
    """Shuffled batches of the whole training split, held on ``device``; the last partial batch
    of an epoch is dropped.

    ``balanced`` draws each epoch's order with replacement so that every class is equally likely
    (a class-balanced sampler), instead of a permutation.
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
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.views = batch_size, views
        self.mean, self.std, self.seed = mean, std, seed
        self.memory_format, self.balanced = memory_format, balanced
        self.steps_per_epoch = len(images) // batch_size

    def order(self, generator: torch.Generator) -> torch.Tensor:
        """The epoch's sequence of image indices."""
        n = len(self.images)
        if not self.balanced:
            return torch.randperm(n, device=self.images.device, generator=generator)
        counts = torch.bincount(self.labels)
        weights = 1.0 / counts[self.labels].double()
        return torch.multinomial(weights, n, replacement=True, generator=generator)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        device = self.images.device
        generator = torch.Generator(device=device).manual_seed(epoch_seed(self.seed, epoch))
        order = self.order(generator)
        for step in range(self.steps_per_epoch):
            index = order[step * self.batch_size : (step + 1) * self.batch_size]
            batch = self.images[index]
            view_a, view_b = (
                normalize(self.views(batch, generator), self.mean, self.std).contiguous(
                    memory_format=self.memory_format
                )
                for _ in range(2)
            )
            yield view_a, view_b, self.labels[index]
