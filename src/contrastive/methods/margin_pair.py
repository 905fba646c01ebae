"""Margin pairs (Hadsell et al., CVPR 2006): an MLP head and the pairwise contrastive loss."""

from __future__ import annotations

import torch
from torch import nn

from contrastive.config import Params
from contrastive.losses import MarginPairLoss
from contrastive.methods.base import Method, MethodInputs


class MarginPair(Method):
    """Positive pairs are the two views of an image, or, ``supervised``, any two views of a
    class; each positive pair gets ``negatives_per_positive`` negative pairs, chosen without
    randomness from the batch (:class:`~contrastive.losses.MarginPairLoss`).
    """

    name = "margin_pair"

    def __init__(
        self,
        encoder: nn.Module,
        hidden_dim: int,
        out_dim: int,
        criterion: MarginPairLoss,
        supervised: bool,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__(encoder, hidden_dim, out_dim, class_weights=class_weights)
        self.criterion = criterion
        self.supervised = supervised

    @classmethod
    def from_params(
        cls, encoder: nn.Module, params: Params, inputs: MethodInputs
    ) -> MarginPair:
        m, p = params.model, params.train.margin_pair
        return cls(
            encoder,
            m.projection_hidden_dim,
            m.projection_dim,
            MarginPairLoss(p.margin, p.alpha, p.negatives_per_positive),
            p.supervised,
            inputs.class_weights,
        )

    def forward(
        self, view_a: torch.Tensor, view_b: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        z_a, z_b, labels = self.project_global(view_a, view_b, labels)
        return self.criterion(
            z_a, z_b, labels if self.supervised else None, self.sample_weights(labels)
        )
