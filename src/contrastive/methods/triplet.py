"""Triplet (Schroff et al., CVPR 2015): an MLP head and a triplet loss mined in the batch."""

from __future__ import annotations

import torch
from torch import nn

from contrastive.config import Params
from contrastive.losses import TripletLoss
from contrastive.methods.base import Method, MethodInputs


class Triplet(Method):
    """An anchor's positive is the other view of its image, or, ``supervised``, any view of its
    class; its negatives are the views of other images (other classes). ``mining`` picks the
    triplets (:class:`~contrastive.losses.TripletLoss`).
    """

    name = "triplet"

    def __init__(
        self,
        encoder: nn.Module,
        hidden_dim: int,
        out_dim: int,
        criterion: TripletLoss,
        supervised: bool,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__(encoder, hidden_dim, out_dim, class_weights=class_weights)
        self.criterion = criterion
        self.supervised = supervised

    @classmethod
    def from_params(
        cls, encoder: nn.Module, params: Params, inputs: MethodInputs
    ) -> Triplet:
        m, t = params.model, params.train.triplet
        return cls(
            encoder,
            m.projection_hidden_dim,
            m.projection_dim,
            TripletLoss(t.margin, t.mining),
            t.supervised,
            inputs.class_weights,
        )

    def forward(
        self, view_a: torch.Tensor, view_b: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        z_a, z_b, labels = self.project_global(view_a, view_b, labels)
        return self.criterion(
            z_a, z_b, labels if self.supervised else None, self.sample_weights(labels)
        )
