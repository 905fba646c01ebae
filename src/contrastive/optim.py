"""Optimisers and the learning-rate schedule of pretraining."""

from __future__ import annotations

import math

import torch
from torch import nn

from contrastive.config import TrainConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017), as in SimCLR.

    Biases and normalisation weights (1-D parameters) get neither weight decay nor adaptation.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if p.ndim > 1:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = p.norm(), grad.norm()
                    trust = torch.where(
                        (p_norm > 0) & (g_norm > 0),
                        group["trust_coefficient"] * p_norm / g_norm,
                        torch.ones_like(p_norm),
                    )
                    grad = grad.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = grad.clone()
                else:
                    buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])
        return loss


def build_optimizer(
    module: nn.Module, cfg: TrainConfig, fused: bool
) -> torch.optim.Optimizer:
    """The optimiser named by ``train.optimizer`` over ``module``'s trainable parameters, at the
    batch-scaled learning rate. Scalars (a learned temperature) get no weight decay."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups: list[dict] = [{"params": [p for p in trainable if p.ndim > 0]}]
    scalars = [p for p in trainable if p.ndim == 0]
    if scalars:
        groups.append({"params": scalars, "weight_decay": 0.0})
    lr = scaled_lr(cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused or None
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=cfg.weight_decay, fused=fused or None)
    return LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def scaled_lr(cfg: TrainConfig) -> float:
    """The linear scaling rule of Goyal et al. (2017): ``lr * batch_size / 256``."""
    return cfg.lr * cfg.batch_size / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to ``peak``, then cosine decay to zero."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
