"""SimCLR (Chen et al., ICML 2020): an MLP head and NT-Xent over the two views of a batch."""

from __future__ import annotations

import torch
from torch import nn

from contrastive.config import Params
from contrastive.losses import NTXentLoss, Temperature
from contrastive.methods.base import Method, MethodInputs


class SimCLR(Method):
    """Each view's positive is the other view of its image; the 2N - 2 other views are negatives."""

    name = "simclr"

    def __init__(
        self, encoder: nn.Module, hidden_dim: int, out_dim: int, temperature: Temperature
    ) -> None:
        super().__init__(encoder, hidden_dim, out_dim, temperature)
        self.criterion = NTXentLoss()

    @classmethod
    def from_params(
        cls, encoder: nn.Module, params: Params, inputs: MethodInputs
    ) -> SimCLR:
        m, t = params.model, params.train
        return cls(
            encoder,
            m.projection_hidden_dim,
            m.projection_dim,
            Temperature(t.temperature, t.learn_temperature),
        )

    def forward(
        self, view_a: torch.Tensor, view_b: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        z_a, z_b, _ = self.project_global(view_a, view_b, labels)
        return self.criterion(z_a, z_b, temperature=self.temperature())
