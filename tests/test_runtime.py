"""Precision: what ``auto`` resolves to, and that it is part of what a checkpoint must match."""

from __future__ import annotations

import pytest
import torch

from contrastive import runtime
from contrastive.config import parse_params
from contrastive.train import run_key
from tests.conftest import TINY

CPU = torch.device("cpu")


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_and_channels_last_exactly_on_cpus_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native)
    cfg = parse_params(TINY).train
    assert runtime.resolve_precision(cfg, CPU) == (native, native)


@pytest.mark.parametrize("native", [True, False])
def test_explicit_settings_win_over_the_cpu(monkeypatch, native):
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: native)
    cfg = parse_params(TINY | {"train": {"precision": "fp32", "channels_last": "on"}}).train
    assert runtime.resolve_precision(cfg, CPU) == (False, True)
    cfg = parse_params(TINY | {"train": {"precision": "bf16", "channels_last": "off"}}).train
    assert runtime.resolve_precision(cfg, CPU) == (True, False)


def test_a_checkpoint_of_auto_in_fp32_is_not_resumed_where_auto_means_bf16(monkeypatch):
    params = parse_params(TINY)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    fp32 = run_key(params, "data", runtime.Runtime.resolve(params, CPU))
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    bf16 = runtime.Runtime.resolve(params, CPU)
    assert bf16.bf16 and bf16.channels_last and bf16.precision == "bf16"
    assert run_key(params, "data", bf16) != fp32
    assert run_key(params, "data", bf16) == run_key(params, "data", runtime.Runtime.resolve(params))


def test_the_runtime_is_resolved_once_and_frozen():
    run = runtime.Runtime.resolve(parse_params(TINY | {"train": {"precision": "fp32",
                                                                  "channels_last": "on"}}))
    assert (run.device, run.bf16, run.memory_format) == (CPU, False, torch.channels_last)
    assert not run.world.distributed and run.precision == "fp32"
    with pytest.raises(AttributeError):
        run.bf16 = True  # type: ignore[misc]

