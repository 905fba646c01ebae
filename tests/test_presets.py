"""The recipes (``params/cifar.yaml``, ``params/clip.yaml``) are the README's ``dvc exp run``
lines for CIFAR and for clip, and valid params: the benchmarks train exactly what the README tells
a user to run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from contrastive.config import parse_params

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "params" / "cifar.yaml"
CLIP_PRESET = ROOT / "params" / "clip.yaml"
DATA_FILES = {"data.path", "data.test_path"}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def readme_runs() -> list[dict[str, Any]]:
    """The ``-S key=value`` settings of each ``dvc exp run`` command of the README, each value
    read as YAML (as DVC reads it)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = [line for b in blocks for line in b.replace("\\\n", " ").splitlines()
             if "dvc exp run" in line]
    runs = []
    for line in lines:
        words = shlex.split(line)
        settings = [words[i + 1] for i, word in enumerate(words) if word == "-S"]
        runs.append({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in settings)})
    return runs


def readme_cifar_settings() -> dict[str, Any]:
    """The settings of the README's one ``dvc exp run`` command on the CIFAR dev files."""
    runs = [r for r in readme_runs() if "cifar10-dev-train.npz" in str(r.get("data.path"))]
    assert len(runs) == 1, "the README has one dvc exp run line for CIFAR"
    return runs[0]


def test_the_readme_runs_the_cifar_preset() -> None:
    preset = flatten(yaml.safe_load(PRESET.read_text()))
    readme = readme_cifar_settings()
    data_files = {"data.source", *DATA_FILES}
    assert readme["data.source"] == "npz" and set(readme) - set(preset) == data_files
    assert {k: v for k, v in readme.items() if k not in data_files} == preset


def test_the_readme_runs_the_clip_preset() -> None:
    """The offline line is the preset itself; a line with a caption file adds its path only."""
    preset = flatten(yaml.safe_load(CLIP_PRESET.read_text()))
    runs = [r for r in readme_runs() if r.get("train.method") == "clip"]
    assert preset in runs, "the README's clip line on the offline default is params/clip.yaml"
    for run in runs:
        assert {k: v for k, v in run.items() if k not in DATA_FILES} == preset


@pytest.mark.parametrize("path", [PRESET, CLIP_PRESET], ids=["cifar", "clip"])
def test_the_preset_is_valid_params(path: Path) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    preset = yaml.safe_load(path.read_text())
    for key, value in flatten(preset).items():  # every key already exists in params.yaml
        *sections, name = key.split(".")
        node = params
        for section in sections:
            node = node[section]
        assert name in node, key
        node[name] = value
    parse_params(params)
