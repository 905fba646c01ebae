"""params.yaml validation: every bad value is one line naming the key and what is allowed."""

import re
from pathlib import Path

import pytest
import yaml

from contrastive.config import ConfigError, Params, flatten, load_params, params_hash, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_are_valid_and_complete() -> None:
    """params.yaml spells out every key, so `dvc exp run -S` can change any of them."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = load_params(ROOT / "params.yaml")
    assert set(flatten(raw)) == set(flatten(params))


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"train": {"lr": -0.1}}, "train.lr: Input should be greater than 0"),
        ({"train": {"temperature": 0}}, "train.temperature"),
        ({"train": {"epochs": "ten"}}, "train.epochs"),
        ({"train": {"batch_size": 1}}, "train.batch_size"),
        ({"train": {"optimzer": "sgd"}}, "unknown key 'train.optimzer'; allowed here: method"),
        ({"colour": 1}, "unknown key 'colour'; allowed here: seed, device, data"),
        ({"model": {"encoder": "vit"}}, "model.encoder: Input should be 'small_cnn'"),
        ({"data": {"source": "mnist"}}, "data.source: Input should be 'digits'"),
        ({"data": {"source": "npz"}}, "data.path is required when data.source is 'npz'"),
        ({"data": {"source": "imagefolder", "path": ""}}, "data.path is required"),
        ({"augment": {"crop_scale": [0.9, 0.2]}}, "augment.crop_scale must be [low, high]"),
        ({"augment": {"hflip": 1.5}}, "augment.hflip"),
        ({"device": "tpu"}, "device: Input should be 'auto', 'cpu' or 'cuda'"),
        ({"probe": {"weight_decays": []}}, "probe.weight_decays"),
    ],
)
def test_bad_values_name_the_key(raw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_params(listing)


def test_params_hash_tracks_values() -> None:
    a = Params()
    b = parse_params({"train": {"lr": 0.5}})
    assert params_hash(a.train) == params_hash(Params().train)
    assert params_hash(a.train) != params_hash(b.train)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "params.yaml: empty; it must hold the pipeline's sections"),
        ("# nothing but a comment\n", "params.yaml: empty"),
        ("seed: 0\ntrain:\n  lr: [0.1\n", "not valid YAML at line 4: expected ',' or ']'"),
        ("train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n",
         "not valid YAML at line 4: key 'lr' appears twice (first at line 2)"),
        ("seed: 0\ntrain: {}\nseed: 1\n", "line 3: key 'seed' appears twice (first at line 1)"),
    ],
)
def test_empty_broken_or_ambiguous_files_name_the_line(tmp_path: Path, text: str,
                                                      fragment: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"train": {"epochs": True}}, "train.epochs: Input should be a valid integer (got True)"),
        ({"seed": False}, "seed: Input should be a valid integer"),
        ({"augment": {"crop_scale": [True, 1.0]}}, "augment.crop_scale.0"),
        ({"train": {"compile": 1}}, "train.compile: Input should be a valid boolean"),
        ({"data": {"download": "yes"}}, "data.download"),
    ],
)
def test_booleans_are_no_numbers_and_numbers_no_booleans(raw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_params(raw)


def test_whole_numbers_and_exponents_are_floats_but_booleans_are_not() -> None:
    params = parse_params({"train": {"lr": 1, "weight_decay": "1e-4", "momentum": 0}})
    assert (params.train.lr, params.train.weight_decay, params.train.momentum) == (1.0, 1e-4, 0.0)
    assert isinstance(params.train.lr, float)
    with pytest.raises(ConfigError, match="train.lr: Input should be a number, not true/false"):
        parse_params({"train": {"lr": True}})
