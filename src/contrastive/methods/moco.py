"""MoCo v2 (He et al., CVPR 2020; Chen et al. 2020): a momentum key encoder and a queue of keys."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from contrastive.config import MoCoConfig, Params
from contrastive.distributed import gather_no_grad
from contrastive.losses import InfoNCELoss, Temperature
from contrastive.methods.base import Method, MethodInputs


class MoCo(Method):
    """Queries from the encoder and an MLP head, keys from slowly moving copies of both, and
    negatives from a queue of the keys of past batches.

    He et al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020;
    Chen et al., "Improved Baselines with Momentum Contrastive Learning", 2020 (MoCo v2: the MLP
    head, here :class:`~contrastive.models.ProjectionHead`).

    - The key encoder and key head are deep copies that the optimiser never updates: after every
      step they move towards the query side, ``key = m * key + (1 - m) * query`` for parameters,
      and take its buffers (BatchNorm running statistics) as they are. The reference code updates
      them at the start of the next forward instead, which is the same sequence of weights.
    - The queue holds the last ``queue_size`` keys, unit length, the oldest at ``queue_ptr``. It
      starts as random unit vectors, as in the reference code, and each batch's keys replace the
      oldest once the loss is computed. Queue and pointer are buffers, so the ``state_dict`` (the
      checkpoint) holds the whole state and a resumed run continues exactly.
    - ``symmetric`` also makes view b the query and view a the key, as the official CIFAR-10
      demo of MoCo (``colab/moco_cifar10_demo.ipynb``) and MoCo v3 do. Both losses use the queue
      as it was before the batch; their mean (the demo and v3 sum them) keeps the loss on the
      scale of the asymmetric one. The keys of both views are enqueued, view a's first, as in
      the demo (MoCo v3 has no queue).

    BatchNorm: each view goes through each encoder as a batch of its own, as in the reference
    code. MoCo's Shuffle BN (Sec. 3.3) hands the key encoder other subsets of the batch than the
    query encoder on every GPU, so that BN statistics cannot give the positive away; it needs
    several processes. In one process the key encoder's BN sees the whole key batch, the same
    images as the query batch. Under several processes, each process's keys are gathered
    (:meth:`_gather`) and every process enqueues the keys of the global batch, so the queues stay
    equal; with ``train.sync_bn`` both encoders normalise over the global batch, as in one
    process (and as MoCo v3 does); without it, over each process's share. MoCo's Shuffle BN is
    not implemented: it would go into :meth:`_keys`.
    """

    name = "moco"

    def __init__(
        self,
        encoder: nn.Module,
        hidden_dim: int,
        out_dim: int,
        temperature: Temperature,
        config: MoCoConfig,
    ) -> None:
        super().__init__(encoder, hidden_dim, out_dim, temperature)
        self.key_encoder = copy.deepcopy(encoder)
        self.key_head = copy.deepcopy(self.head)
        for param in [*self.key_encoder.parameters(), *self.key_head.parameters()]:
            param.requires_grad_(False)
        self.criterion = InfoNCELoss()
        self.momentum = config.momentum
        self.momentum_schedule = config.momentum_schedule
        self.symmetric = config.symmetric
        # queue: (queue_size, out_dim) unit-length keys; queue_ptr: the slot of the oldest
        self.register_buffer("queue", F.normalize(torch.randn(config.queue_size, out_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_params(
        cls, encoder: nn.Module, params: Params, inputs: MethodInputs
    ) -> MoCo:
        m, t = params.model, params.train
        return cls(
            encoder,
            m.projection_hidden_dim,
            m.projection_dim,
            Temperature(t.temperature, t.learn_temperature),
            t.moco,
        )

    def forward(
        self, view_a: torch.Tensor, view_b: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        t = self.temperature()
        # the negatives of this batch, kept apart from the buffer that enqueue writes below
        negatives = self.queue.clone()
        # keys: (N, out_dim), unit length, without gradient
        keys_b = self._keys(view_b)
        loss = self.criterion(self.head(self.encoder(view_a)), keys_b, negatives, temperature=t)
        if not self.symmetric:
            self.enqueue(self._gather(keys_b))
            return loss
        keys_a = self._keys(view_a)
        swapped = self.criterion(self.head(self.encoder(view_b)), keys_a, negatives, temperature=t)
        # view a's keys of every process, then view b's: the single-process order
        self.enqueue(torch.cat([self._gather(keys_a), self._gather(keys_b)]))
        return (loss + swapped) / 2

    @torch.no_grad()
    def _keys(self, view: torch.Tensor) -> torch.Tensor:
        """Unit-length keys ``(N, out_dim)`` of ``view`` from the key encoder and key head.

        In one process the key encoder's BatchNorm sees the whole batch; under several, MoCo
        shuffles the batch across processes here and restores its order after the encoder.
        """
        return F.normalize(self.key_head(self.key_encoder(view)).float(), dim=1)

    def _gather(self, keys: torch.Tensor) -> torch.Tensor:
        """The keys of every process, in rank order, to enqueue: the reference code's
        ``concat_all_gather``. One process already holds them all."""
        return gather_no_grad(keys)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` ``(B, D)`` in order from ``queue_ptr`` over the oldest keys, wrapping
        around the end. Of more keys than the queue holds, the last ``queue_size`` stay, as if
        written one by one. Stays on the device: no host synchronisation."""
        size, n = len(self.queue), len(keys)
        kept = min(n, size)
        # slots: (kept,) where the last `kept` keys land when written one by one from the pointer
        slots = (self.queue_ptr + torch.arange(n - kept, n, device=self.queue.device)) % size
        self.queue.index_copy_(0, slots, keys[n - kept :].to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    def momentum_at(self, progress: float) -> float:
        """The EMA factor once ``progress`` (0 to 1) of training is done: ``momentum``, or with
        the ``cosine`` schedule of BYOL (Grill et al., NeurIPS 2020) raised from ``momentum`` at
        the start to 1 at the end: ``1 - (1 - momentum) * (cos(pi * progress) + 1) / 2``."""
        if self.momentum_schedule == "constant":
            return self.momentum
        return 1 - (1 - self.momentum) * (math.cos(math.pi * progress) + 1) / 2

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        super().after_step(progress)
        m = self.momentum_at(progress)
        for query, key in self._query_and_key():
            for q, k in zip(query.parameters(), key.parameters(), strict=True):
                k.mul_(m).add_(q, alpha=1 - m)
            for q, k in zip(query.buffers(), key.buffers(), strict=True):
                k.copy_(q)

    def _query_and_key(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        yield self.encoder, self.key_encoder
        yield self.head, self.key_head
