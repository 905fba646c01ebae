"""params.yaml validation: every bad value is one line naming the key and what is allowed."""

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
