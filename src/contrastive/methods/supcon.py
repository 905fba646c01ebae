"""SupCon (Khosla et al., NeurIPS 2020): an MLP head and the supervised contrastive loss."""

from __future__ import annotations

import torch
from torch import nn

from contrastive.config import Params
from contrastive.losses import SupConLoss, Temperature
from contrastive.methods.base import Method, MethodInputs


class SupCon(Method):
    """Every view of the same class is a positive, every view of another class a negative
    (:class:`~contrastive.losses.SupConLoss`, L_out); with all labels distinct this is SimCLR.
    """

    name = "supcon"

    def __init__(
        self,
        encoder: nn.Module,
        hidden_dim: int,
        out_dim: int,
        temperature: Temperature,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__(encoder, hidden_dim, out_dim, temperature, class_weights)
        self.criterion = SupConLoss()

    @classmethod
    def from_params(
        cls, encoder: nn.Module, params: Params, inputs: MethodInputs
    ) -> SupCon:
        m, t = params.model, params.train
        return cls(
            encoder,
            m.projection_hidden_dim,
            m.projection_dim,
            Temperature(t.temperature, t.learn_temperature),
            inputs.class_weights,
        )

    def forward(
        self, view_a: torch.Tensor, view_b: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        z_a, z_b, labels = self.project_global(view_a, view_b, labels)
        return self.criterion(
            z_a,
            z_b,
            labels,
            self.sample_weights(labels),
            temperature=self.temperature(),
        )
