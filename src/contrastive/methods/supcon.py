"""SupCon (Khosla et al., NeurIPS 2020): an MLP head and the supervised contrastive loss."""

from __future__ import annotations

import torch
from torch import nn

from contrastive.config import Params
from contrastive.losses import SupConLoss, Temperature
from contrastive.methods.base import Method
from contrastive.models import ProjectionHead


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
        super().__init__(encoder)
        self.head = ProjectionHead(encoder.embedding_dim, hidden_dim, out_dim)
        self.temperature = temperature
        self.criterion = SupConLoss()
        # derived from the data, not learned: kept out of the checkpoint
        self.class_weights: torch.Tensor | None
        self.register_buffer("class_weights", class_weights, persistent=False)

    @classmethod
    def from_params(
        cls, encoder: nn.Module, params: Params, class_weights: torch.Tensor | None
    ) -> SupCon:
        m, t = params.model, params.train
        return cls(
            encoder,
            m.projection_hidden_dim,
            m.projection_dim,
            Temperature(t.temperature, t.learn_temperature),
            class_weights,
        )

    def forward(
        self, view_a: torch.Tensor, view_b: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        # z: (2N, projection_dim); rows i and i + N are the two views of image i
        z = self.head(self.encoder(torch.cat([view_a, view_b])))
        weights = None if self.class_weights is None else self.class_weights[labels]
        return self.criterion(*z.chunk(2), labels, weights, temperature=self.temperature())

    def after_step(self, progress: float) -> None:
        self.temperature.clamp_()

    def history_values(self) -> dict[str, float]:
        return self.temperature.history()
