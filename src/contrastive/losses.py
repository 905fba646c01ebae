"""Contrastive losses: small, typed classes, each with its paper and a direct-formula test.

Every loss computes in float32 with autocast off, whatever precision the encoder ran in: the
exponentials and log-sum-exps of a contrastive loss lose too much in bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _float32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.float() for t in tensors]


class Temperature(nn.Module):
    """A softmax temperature: fixed, or learned as ``log t`` and kept in ``[low, high]``.

    CLIP (Radford et al. 2021) learns the inverse temperature in log space and clips it at 100;
    here ``log t`` is a parameter clamped by :meth:`clamp_` after each optimiser step, so ``t``
    stays in ``[0.01, 1]``. A fixed temperature is returned as the exact float it was given.
    """

    def __init__(
        self, initial: float, learnable: bool = False, low: float = 0.01, high: float = 1.0
    ) -> None:
        super().__init__()
        if initial <= 0:
            raise ValueError(f"temperature must be > 0, got {initial}")
        self.initial, self.learnable = initial, learnable
        self.bounds = (math.log(low), math.log(high))
        if learnable:
            start = min(max(math.log(initial), self.bounds[0]), self.bounds[1])
            self.log_t = nn.Parameter(torch.tensor(start, dtype=torch.float32))

    def forward(self) -> torch.Tensor | float:
        return self.log_t.exp() if self.learnable else self.initial

    @torch.no_grad()
    def clamp_(self) -> None:
        if self.learnable:
            self.log_t.clamp_(*self.bounds)

    def history(self) -> dict[str, float]:
        """``{"temperature": t}`` for the per-epoch history when learned; nothing when fixed."""
        return {"temperature": float(self())} if self.learnable else {}


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

    def forward(
        self,
        z_a: torch.Tensor,
        z_b: torch.Tensor,
        temperature: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """``z_a``, ``z_b``: projections of the two views, ``(N, D)``; row i of each is image i.

        ``temperature`` (a scalar tensor, possibly learned) replaces the constructor's value.
        """
        t = self.temperature if temperature is None else temperature
        with torch.autocast(z_a.device.type, enabled=False):
            z_a, z_b = _float32(z_a, z_b)
            n = z_a.shape[0]
            # z: (2N, D), unit length; views of image i sit at rows i and i + N
            z = F.normalize(torch.cat([z_a, z_b]), dim=1)
            # logits: (2N, 2N) cosine similarities over the temperature
            logits = z @ z.T / t
            # a view is never its own negative
            logits = logits.masked_fill(
                torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf")
            )
            # targets: (2N,) index of each view's partner
            targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
            return F.cross_entropy(logits, targets)


class InfoNCELoss(nn.Module):
    """InfoNCE against a queue of negative keys: the loss of MoCo.

    He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020,
    Eq. 1 (the name is from van den Oord et al., "Representation Learning with Contrastive
    Predictive Coding", 2018). Query ``q_i`` has one positive key ``k_i`` (the other view of its
    image) and the K keys ``n_j`` of the queue as negatives; the loss is the mean over the N
    queries of

        -log( exp(q_i . k_i / t) / (exp(q_i . k_i / t) + sum_j exp(q_i . n_j / t)) )

    on L2-normalised vectors: a (1 + K)-way softmax classifier that must pick the positive key.
    """

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        queue: torch.Tensor,
        temperature: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """``q``: queries ``(N, D)``; ``k``: their positive keys ``(N, D)``, row i for query i;
        ``queue``: negative keys ``(K, D)``.

        ``temperature`` (a scalar tensor, possibly learned) replaces the constructor's value.
        """
        if k.shape != q.shape or queue.ndim != 2 or queue.shape[1] != q.shape[1]:
            raise ValueError(
                f"expected q and k of one shape (N, D) and a queue (K, D), got "
                f"{tuple(q.shape)}, {tuple(k.shape)} and {tuple(queue.shape)}"
            )
        t = self.temperature if temperature is None else temperature
        with torch.autocast(q.device.type, enabled=False):
            # q, k: (N, D) and queue: (K, D), all unit length
            q, k, queue = (F.normalize(x, dim=1) for x in _float32(q, k, queue))
            # positive: (N, 1) similarity of each query with its own key
            positive = (q * k).sum(dim=1, keepdim=True)
            # negative: (N, K) similarity of each query with every queued key
            negative = q @ queue.T
            # logits: (N, 1 + K) over the temperature; the positive is class 0 of every row
            logits = torch.cat([positive, negative], dim=1) / t
            targets = torch.zeros(len(q), dtype=torch.long, device=q.device)
            return F.cross_entropy(logits, targets)
