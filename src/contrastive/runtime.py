"""Device choice and seeding: one seed drives everything."""

from __future__ import annotations

import random

import numpy as np
import torch

from contrastive.config import ConfigError, TrainConfig


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' asked for, but no CUDA GPU is present; use auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 natively (avx512_bf16 or AMX), as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(cfg: TrainConfig, device: torch.device) -> tuple[bool, bool]:
    """``(bf16, channels_last)`` from ``train.precision`` and ``train.channels_last``.

    ``auto`` turns both on for CUDA and for CPUs with native bf16, where bf16 autocast with
    channels_last trains 2-2.6x faster than fp32 at the same probe accuracy
    (docs/benchmarks.md, "bf16 against fp32"); elsewhere it leaves both off.
    """
    fast = device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and fast)
    channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and fast)
    return bf16, channels_last
