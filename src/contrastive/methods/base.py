"""What every contrastive method is: an ``nn.Module`` that turns two views of a batch into a loss.

A method owns the encoder it trains, its heads and its state (a momentum encoder, a queue, a
learnable temperature), so that its ``state_dict`` is everything a checkpoint must hold for a
resumed run to continue exactly. The training loop knows only this interface.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from contrastive.config import Params

REGISTRY: dict[str, type[Method]] = {}


class Method(nn.Module):
    """A contrastive objective around an encoder.

    Subclasses set ``name`` (the value of ``train.method``) and implement :meth:`forward`; those
    with state that changes outside the optimiser override :meth:`after_step`.
    """

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    @classmethod
    def from_params(
        cls, encoder: nn.Module, params: Params, class_weights: torch.Tensor | None
    ) -> Method:
        """Build the method from ``params`` around ``encoder``.

        ``class_weights`` (one per class, mean 1) are given when ``train.class_balance`` is
        ``weights``; methods that use labels weigh each sample's loss by its class.
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
        (0, 1]. The default does nothing."""

    def history_values(self) -> dict[str, float]:
        """Values to record in the per-epoch history besides the loss (a learned temperature)."""
        return {}
