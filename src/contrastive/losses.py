"""Contrastive losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross entropy (NT-Xent), the InfoNCE loss of SimCLR.

    Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations",
    ICML 2020. For a batch of N images seen twice, each of the 2N views has its partner view as
    the positive and the other 2N - 2 views as negatives; the loss is the mean over all 2N views of

        -log( exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t) )

    where ``sim`` is cosine similarity and ``t`` the temperature.
    """

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        """``z_a``, ``z_b``: projections of the two views, ``(N, D)``; row i of each is image i."""
        n = z_a.shape[0]
        # z: (2N, D), unit length; views of image i sit at rows i and i + N
        z = F.normalize(torch.cat([z_a, z_b]).float(), dim=1)
        # logits: (2N, 2N) cosine similarities over the temperature
        logits = z @ z.T / self.temperature
        # a view is never its own negative
        logits.fill_diagonal_(float("-inf"))
        # targets: (2N,) index of each view's partner
        targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
        return F.cross_entropy(logits, targets)
