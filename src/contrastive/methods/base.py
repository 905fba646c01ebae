"""What every contrastive method is: an ``nn.Module`` that turns two views of a batch into a loss.

A method owns the encoder it trains, its heads and its state (a momentum encoder, a queue, a
learnable temperature), so that its ``state_dict`` is everything a checkpoint must hold for a
resumed run to continue exactly. The training loop knows only this interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from contrastive.config import Params
from contrastive.distributed import gather, gather_no_grad
from contrastive.losses import Temperature
from contrastive.models import ProjectionHead

if TYPE_CHECKING:
    from contrastive.methods.clip import CaptionTable
    from contrastive.text_models import TextTower

REGISTRY: dict[str, type[Method]] = {}


@dataclass(frozen=True)
class MethodInputs:
    """What a method takes from the training data besides the batches."""

    class_weights: torch.Tensor | None = None
    """One per class, mean 1, when ``train.class_balance`` is ``weights``: methods that use
    labels weigh each sample's loss by its class."""
    captions: CaptionTable | None = None
    """``clip``: every caption of the training split, as token ids."""


class Method(nn.Module):
    """A contrastive objective around an encoder.

    Subclasses set ``name`` (the value of ``train.method``) and implement :meth:`forward`; those
    with state that changes outside the optimiser override :meth:`after_step`.
    """

    name: ClassVar[str] = ""
    batch_targets: ClassVar[str] = "labels"
    """What the third element of a batch holds: the images' ``labels``, or (``index``) their
    indices into the training split."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def __init__(
        self,
        encoder: nn.Module,
        hidden_dim: int,
        out_dim: int,
        temperature: Temperature | None = None,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        """``encoder`` and an MLP projection head (``hidden_dim``, ``out_dim``) on top of it;
        ``temperature`` for the InfoNCE methods; ``class_weights`` (one per class) to weigh each
        sample's loss by its class."""
        super().__init__()
        self.encoder = encoder
        self.head = ProjectionHead(encoder.embedding_dim, hidden_dim, out_dim)
        self.temperature = temperature
        # derived from the data, not learned: kept out of the checkpoint
        self.class_weights: torch.Tensor | None
        self.register_buffer("class_weights", class_weights, persistent=False)

    def project(
        self, view_a: torch.Tensor, view_b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both views through the encoder and the head as one batch of 2N, so BatchNorm sees
        them together (as SimCLR does); the projections ``(N, out_dim)`` of each view."""
        z = self.head(self.encoder(torch.cat([view_a, view_b])))
        z_a, z_b = z.chunk(2)
        return z_a, z_b

    def project_global(
        self, view_a: torch.Tensor, view_b: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`project`, then the projections and labels of every process, in rank order:
        the global batch, whose other images are the negatives (``(N * world_size, out_dim)``
        twice and ``(N * world_size,)``). Gradients flow back through the gather to this
        process's rows (:func:`contrastive.distributed.gather`). One process: :meth:`project`."""
        z_a, z_b = self.project(view_a, view_b)
        return gather(z_a), gather(z_b), gather_no_grad(labels)

    def sample_weights(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Each sample's class weight under ``train.class_balance: weights``, else None."""
        return None if self.class_weights is None else self.class_weights[labels]

    @classmethod
    def from_params(cls, encoder: nn.Module, params: Params, inputs: MethodInputs) -> Method:
        """Build the method from ``params`` around ``encoder``, with what it needs of the data
        (``inputs``).
        """
        raise NotImplementedError

    def forward(
        self, view_a: torch.Tensor, view_b: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The loss of a batch: two normalised views ``(N, 3, H, W)`` of the same N images, and
        their labels ``(N,)`` (methods that learn without labels ignore them)."""
        raise NotImplementedError

    def after_step(self, progress: float) -> None:
        """Called after every optimiser step; ``progress`` is the share of training done, in
        (0, 1]. Keeps a learned temperature in its bounds."""
        if self.temperature is not None:
            self.temperature.clamp_()

    def text_tower(self) -> TextTower | None:
        """The image head and text encoder of an image-text method (``clip``); None here."""
        return None

    def history_values(self) -> dict[str, float]:
        """Values to record in the per-epoch history besides the loss: a learned temperature."""
        return {} if self.temperature is None else self.temperature.history()
