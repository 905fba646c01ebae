"""Where and how a run computes, resolved once at its start; and seeding: one seed drives
everything.

:class:`Runtime` is the device, the precision, the memory format and the process group of one
run, decided from the params (and the machine, for ``auto``) before any work; the loop, the
views, the kNN monitor, the run key and the report all read it instead of deriving it again.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from contrastive import distributed
from contrastive.config import ConfigError, Params, TrainConfig
from contrastive.distributed import SINGLE, World


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


@dataclass(frozen=True)
class Runtime:
    """The device, precision and process group of one run (:meth:`start`)."""

    device: torch.device
    bf16: bool = False
    channels_last: bool = False
    world: World = SINGLE

    @classmethod
    def resolve(cls, params: Params, device: torch.device | None = None,
                world: World = SINGLE) -> Runtime:
        """``params.device`` (or ``device``) and the precision it implies; no process group."""
        device = resolve_device(params.device) if device is None else device
        bf16, channels_last = resolve_precision(params.train, device)
        return cls(device, bf16, channels_last, world)

    @classmethod
    def start(cls, params: Params) -> Runtime:
        """:meth:`resolve`, after joining the process group that ``torchrun`` set up, if any
        (on CUDA, each process then computes on its own GPU); :func:`distributed.cleanup`
        leaves it."""
        world, device = distributed.init(params, resolve_device(params.device))
        return cls.resolve(params, device, world)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on the device, or nothing."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
