"""SimCLR (Chen et al., ICML 2020): an MLP head and NT-Xent over the two views of a batch."""

from __future__ import annotations

import torch
from torch import nn

from contrastive.config import Params
from contrastive.losses import NTXentLoss, Temperature
from contrastive.methods.base import Method
from contrastive.models import ProjectionHead


class SimCLR(Method):
    """Each view's positive is the other view of its image; the 2N - 2 other views are negatives.

    Both views go through the encoder as one batch of 2N, so BatchNorm sees them together, as in
    the paper.
    """

    name = "simclr"

    def __init__(
        self, encoder: nn.Module, hidden_dim: int, out_dim: int, temperature: Temperature
    ) -> None:
        super().__init__(encoder)
        self.head = ProjectionHead(encoder.embedding_dim, hidden_dim, out_dim)
        self.temperature = temperature
        self.criterion = NTXentLoss()

    @classmethod
    def from_params(
        cls, encoder: nn.Module, params: Params, class_weights: torch.Tensor | None
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
        # z: (2N, projection_dim); rows i and i + N are the two views of image i
        z = self.head(self.encoder(torch.cat([view_a, view_b])))
        return self.criterion(*z.chunk(2), temperature=self.temperature())

    def after_step(self, progress: float) -> None:
        self.temperature.clamp_()

    def history_values(self) -> dict[str, float]:
        return self.temperature.history()
