"""The CIFAR recipe (``params/cifar.yaml``) is the README's ``dvc exp run`` line for CIFAR, and
valid params: the benchmarks train exactly what the README tells a user to run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from contrastive.config import parse_params

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "params" / "cifar.yaml"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def readme_cifar_settings() -> dict[str, Any]:
    """The ``-S key=value`` settings of the README's ``dvc exp run`` command that names CIFAR,
    each value read as YAML (as DVC reads it)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = [b.replace("\\\n", " ") for b in blocks if "cifar10-dev-train.npz" in b]
    runs = [line for c in commands for line in c.splitlines() if "dvc exp run" in line]
    assert len(runs) == 1, "the README has one dvc exp run line for CIFAR"
    words = shlex.split(runs[0])
    settings = [words[i + 1] for i, word in enumerate(words) if word == "-S"]
    return {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in settings)}


def test_the_readme_runs_the_cifar_preset() -> None:
    preset = flatten(yaml.safe_load(PRESET.read_text()))
    readme = readme_cifar_settings()
    data_files = {"data.source", "data.path", "data.test_path"}
    assert readme["data.source"] == "npz" and set(readme) - set(preset) == data_files
    assert {k: v for k, v in readme.items() if k not in data_files} == preset


def test_the_cifar_preset_is_valid_params() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    preset = yaml.safe_load(PRESET.read_text())
    for key, value in flatten(preset).items():  # every key already exists in params.yaml
        *sections, name = key.split(".")
        node = params
        for section in sections:
            node = node[section]
        assert name in node, key
        node[name] = value
    parse_params(params)
