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
    fp32 = run_key(params, "data", CPU)
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert run_key(params, "data", CPU) != fp32
    assert run_key(params, "data", CPU) == run_key(params, "data", CPU)

