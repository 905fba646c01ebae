"""Tests for the prepare stage: sources, cleaning, splits, the prepared format and its errors."""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contrastive.config import ConfigError, DataConfig
from contrastive.data import SPLITS, load_manifest, load_split, prepare, read_image

FILES = ("train.npz", "val.npz", "test.npz", "manifest.json")


def random_images(n: int, size: int = 8, seed: int = 0) -> np.ndarray:
    """Distinct random RGB images, uint8 (n, size, size, 3)."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def save_npz(path: Path, x: np.ndarray, y: np.ndarray, **extra: np.ndarray) -> str:
    np.savez(path, x=x, y=y, **extra)
    return str(path)


def all_splits(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {split: load_split(out, split) for split in SPLITS}


def image_rows(x: np.ndarray) -> set[bytes]:
    return {image.tobytes() for image in x}


def npz_cfg(path: str, **kwargs: object) -> DataConfig:
    return DataConfig(source="npz", path=path, image_size=8, **kwargs)


# --- digits, the default -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("digits") / "prepared"
    return out, prepare(DataConfig(), seed=0, out_dir=out)


def test_digits_default_writes_the_prepared_format(digits: tuple[Path, dict]) -> None:
    out, manifest = digits
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert manifest == load_manifest(out)
    assert manifest["source"] == "digits"
    assert manifest["classes"] == [str(k) for k in range(10)]
    assert manifest["num_classes"] == 10
    assert manifest["totals"]["all"] == 1797
    assert manifest["split"]["test_from"] == "split"

    for split, (x, y) in all_splits(out).items():
        assert x.dtype == np.uint8 and x.shape[1:] == (16, 16, 3)
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert len(x) == manifest["totals"][split]
        # grayscale spread over three equal channels, full 0..255 range
        assert (x[..., 0] == x[..., 1]).all() and (x[..., 1] == x[..., 2]).all()
        assert x.min() == 0 and x.max() == 255
        counts = np.bincount(y, minlength=10).tolist()
        assert counts == [manifest["counts"][split][str(k)] for k in range(10)]
        assert min(counts) > 0
        hashes = manifest["hashes"][split]
        assert hashes["x"] == hashlib.sha256(x.tobytes()).hexdigest()
        assert hashes["y"] == hashlib.sha256(y.tobytes()).hexdigest()


def test_digits_split_is_stratified(digits: tuple[Path, dict]) -> None:
    _, manifest = digits
    counts = manifest["counts"]
    for k in map(str, range(10)):
        total = sum(counts[split][k] for split in SPLITS)
        assert abs(counts["test"][k] - 0.2 * total) <= 1
        assert abs(counts["val"][k] - 0.1 * total) <= 1


def test_mean_and_std_come_from_the_train_split(digits: tuple[Path, dict]) -> None:
    out, manifest = digits
    train = load_split(out, "train")[0] / 255
    assert manifest["mean"] == pytest.approx(train.mean(axis=(0, 1, 2)).tolist(), abs=1e-6)
    assert manifest["std"] == pytest.approx(train.std(axis=(0, 1, 2)).tolist(), abs=1e-6)
    test = load_split(out, "test")[0] / 255
    assert manifest["mean"][0] != pytest.approx(test.mean(), abs=1e-6)


def test_same_seed_gives_identical_bytes_and_another_seed_another_split(
    digits: tuple[Path, dict], tmp_path: Path
) -> None:
    out, manifest = digits
    again = prepare(DataConfig(), seed=0, out_dir=tmp_path / "again")
    for name in FILES:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    assert again["data_hash"] == manifest["data_hash"]

    other = prepare(DataConfig(), seed=1, out_dir=tmp_path / "other")
    assert other["totals"] == manifest["totals"]
    assert other["hashes"]["train"]["x"] != manifest["hashes"]["train"]["x"]
    assert other["data_hash"] != manifest["data_hash"]


# --- npz ------------------------------------------------------------------------------------------


def test_duplicates_are_removed_so_splits_are_disjoint(tmp_path: Path) -> None:
    x = random_images(30)
    y = np.arange(30) % 3
    # 10 exact copies with the same label, 5 with another label (the first label must win)
    copies = np.arange(10)
    conflicts = np.arange(10, 15)
    x_all = np.concatenate([x, x[copies], x[conflicts]])
    y_all = np.concatenate([y, y[copies], (y[conflicts] + 1) % 3])
    path = save_npz(tmp_path / "dups.npz", x_all, y_all)

    manifest = prepare(npz_cfg(path), seed=0, out_dir=tmp_path / "out")

    assert manifest["duplicates_removed"] == {"total": 15, "conflicting_labels": 5}
    assert manifest["totals"]["all"] == 30
    splits = all_splits(tmp_path / "out")
    rows = [image_rows(x) for x, _ in splits.values()]
    assert len(set.union(*rows)) == sum(len(r) for r in rows) == 30
    label_of = {image.tobytes(): label for image, label in zip(x, y, strict=True)}
    for xs, ys in splits.values():
        assert all(label_of[image.tobytes()] == label for image, label in zip(xs, ys, strict=True))


def test_npz_without_test_path_splits_everything_with_names(tmp_path: Path) -> None:
    x, y = random_images(40), np.arange(40) % 4
    names = np.array(["cat", "dog", "eel", "fox"])
    path = save_npz(tmp_path / "a.npz", x, y, classes=names)

    manifest = prepare(npz_cfg(path), seed=3, out_dir=tmp_path / "out")

    assert manifest["classes"] == ["cat", "dog", "eel", "fox"]
    assert manifest["counts"]["test"] == {"cat": 2, "dog": 2, "eel": 2, "fox": 2}
    assert manifest["counts"]["val"] == {"cat": 1, "dog": 1, "eel": 1, "fox": 1}
    assert manifest["totals"] == {"train": 28, "val": 4, "test": 8, "all": 40}
    assert image_rows(np.concatenate([xs for xs, _ in all_splits(tmp_path / "out").values()])) == (
        image_rows(x)
    )


def test_npz_test_path_becomes_the_test_split(tmp_path: Path) -> None:
    train_x, train_y = random_images(40, seed=1), np.arange(40) % 2
    test_x, test_y = random_images(6, seed=2), np.array([0, 1, 0, 1, 1, 0])
    cfg = npz_cfg(
        save_npz(tmp_path / "train.npz", train_x, train_y),
        test_path=save_npz(tmp_path / "test.npz", test_x, test_y),
        val_fraction=0.25,
    )

    manifest = prepare(cfg, seed=0, out_dir=tmp_path / "out")

    x, y = load_split(tmp_path / "out", "test")
    np.testing.assert_array_equal(x, test_x)  # same images, same order
    np.testing.assert_array_equal(y, test_y)
    assert manifest["split"]["test_from"] == "source"
    assert manifest["counts"]["val"] == {"0": 5, "1": 5}  # a quarter of each class's 20
    assert manifest["totals"]["train"] == 30


def test_npz_grayscale_and_other_sizes_become_rgb_at_image_size(tmp_path: Path) -> None:
    gray = random_images(12, size=12)[..., 0]  # (N, H, W)
    path = save_npz(tmp_path / "gray.npz", gray, np.arange(12) % 2)

    prepare(npz_cfg(path), seed=0, out_dir=tmp_path / "out")

    x = np.concatenate([xs for xs, _ in all_splits(tmp_path / "out").values()])
    assert x.shape == (12, 8, 8, 3)
    assert (x[..., 0] == x[..., 2]).all()
    expected = np.asarray(Image.fromarray(gray[0]).resize((8, 8), Image.Resampling.BILINEAR))
    assert expected.tobytes() in {image[..., 0].tobytes() for image in x}


def test_npz_labels_beyond_the_class_names_fail(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "a.npz", random_images(9), np.arange(9) % 3, classes=np.array(["a"]))
    with pytest.raises(ConfigError, match="a.npz: key 'y' has label 2"):
        prepare(npz_cfg(path), seed=0, out_dir=tmp_path / "out")


def test_npz_test_path_with_other_class_names_fails(tmp_path: Path) -> None:
    x, y = random_images(9), np.arange(9) % 3
    cfg = npz_cfg(
        save_npz(tmp_path / "a.npz", x, y, classes=np.array(["a", "b", "c"])),
        test_path=save_npz(tmp_path / "b.npz", x, y, classes=np.array(["a", "b", "x"])),
    )
    with pytest.raises(ConfigError, match="data.test_path: .*b.npz: key 'classes' differs"):
        prepare(cfg, seed=0, out_dir=tmp_path / "out")


BAD_NPZ = {
    "missing x": ({"y": np.zeros(3, np.int64)}, "key 'x' missing"),
    "float x": ({"x": np.zeros((3, 8, 8, 3), np.float32), "y": np.zeros(3)}, "key 'x' has dtype"),
    "four channels": (
        {"x": np.zeros((3, 8, 8, 4), np.uint8), "y": np.zeros(3, np.int64)},
        "key 'x' has shape",
    ),
    "float y": ({"x": np.zeros((3, 8, 8, 3), np.uint8), "y": np.zeros(3)}, "key 'y' is float64"),
    "lengths": (
        {"x": np.zeros((3, 8, 8, 3), np.uint8), "y": np.zeros(2, np.int64)},
        "keys 'x' and 'y' differ in length",
    ),
    "negative y": (
        {"x": random_images(3), "y": np.array([0, -1, 1])},
        "key 'y' has label -1",
    ),
}


@pytest.mark.parametrize("case", BAD_NPZ, ids=list(BAD_NPZ))
def test_bad_npz_names_file_and_key(tmp_path: Path, case: str) -> None:
    arrays, message = BAD_NPZ[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ConfigError, match=message) as error:
        prepare(npz_cfg(str(path)), seed=0, out_dir=tmp_path / "out")
    assert str(error.value).startswith(f"data.path: {path}")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_missing_or_unreadable_npz_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.npz"
    with pytest.raises(ConfigError, match=f"data.path: {missing} does not exist; give an .npz"):
        prepare(npz_cfg(str(missing)), seed=0, out_dir=tmp_path / "out")

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ConfigError, match=f"data.path: {garbage}: not a readable .npz"):
        prepare(npz_cfg(str(garbage)), seed=0, out_dir=tmp_path / "out")

    good = save_npz(tmp_path / "good.npz", random_images(9), np.arange(9) % 3)
    with pytest.raises(ConfigError, match=f"data.test_path: {missing} does not exist"):
        prepare(npz_cfg(good, test_path=str(missing)), seed=0, out_dir=tmp_path / "out")


def test_npz_path_that_is_a_folder_says_a_file_is_expected(tmp_path: Path) -> None:
    folder = tmp_path / "test_images"
    folder.mkdir()
    good = save_npz(tmp_path / "good.npz", random_images(9), np.arange(9) % 3)
    expected = f"data.test_path: {folder} is a folder; an .npz file is expected"
    with pytest.raises(ConfigError, match=expected):
        prepare(npz_cfg(good, test_path=str(folder)), seed=0, out_dir=tmp_path / "out")


def test_fewer_than_two_classes_fails(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "one.npz", random_images(9), np.zeros(9, np.int64))
    with pytest.raises(ConfigError, match=r"found 1 class\(es\) \['0'\]; need at least two"):
        prepare(npz_cfg(path), seed=0, out_dir=tmp_path / "out")


def test_too_small_class_is_named(tmp_path: Path) -> None:
    y = np.array([0, 0, 0, 1, 1, 2, 2, 2])  # class '1' cannot fill three splits
    path = save_npz(tmp_path / "small.npz", random_images(8), y)
    with pytest.raises(ConfigError, match="class '1' has 2 images after cleaning"):
        prepare(npz_cfg(path), seed=0, out_dir=tmp_path / "out")

    names = np.array(["a", "b", "c", "d"])  # class 'd' is named but has no image
    path = save_npz(tmp_path / "empty.npz", random_images(9), np.arange(9) % 3, classes=names)
    with pytest.raises(ConfigError, match="class 'd' has 0 images"):
        prepare(npz_cfg(path), seed=0, out_dir=tmp_path / "out")


def test_fractions_that_leave_no_training_image_fail(tmp_path: Path) -> None:
    path = save_npz(tmp_path / "a.npz", random_images(8), np.arange(8) % 2)
    cfg = npz_cfg(path, val_fraction=0.45, test_fraction=0.45)
    with pytest.raises(ConfigError, match="data.val_fraction, data.test_fraction: .* class '0'"):
        prepare(cfg, seed=0, out_dir=tmp_path / "out")


# --- atomic output --------------------------------------------------------------------------------


def test_failure_keeps_the_earlier_output_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "prepared"
    good = save_npz(tmp_path / "good.npz", random_images(9), np.arange(9) % 3)
    prepare(npz_cfg(good), seed=0, out_dir=out)
    before = {name: (out / name).read_bytes() for name in FILES}

    with pytest.raises(ConfigError):
        prepare(npz_cfg(str(tmp_path / "missing.npz")), seed=0, out_dir=out)

    calls = []

    def savez_then_fail(*args: object, **kwargs: object) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full")
        real_savez(*args, **kwargs)

    real_savez = np.savez
    monkeypatch.setattr(np, "savez", savez_then_fail)
    with pytest.raises(OSError, match="disk full"):
        prepare(npz_cfg(good), seed=1, out_dir=out)

    assert {name: (out / name).read_bytes() for name in FILES} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.npz", "prepared"]


def test_load_split_and_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="split 'holdout' unknown"):
        load_split(tmp_path, "holdout")
    with pytest.raises(ConfigError, match="train.npz: prepared split not found"):
        load_split(tmp_path, "train")
    with pytest.raises(ConfigError, match="manifest.json: prepared manifest not found"):
        load_manifest(tmp_path)


# --- imagefolder ----------------------------------------------------------------------------------


def save_png(path: Path, image: np.ndarray | Image.Image) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def make_folder(root: Path, classes: str = "abc", per_class: int = 4, seed: int = 0) -> None:
    images = iter(random_images(len(classes) * per_class, size=8, seed=seed))
    for name in classes:
        for i in range(per_class):
            save_png(root / name / f"{i}.png", next(images))


def test_imagefolder_skips_broken_files_and_converts_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "images"
    make_folder(root)
    (root / "a" / "corrupt.png").write_bytes(b"this is not an image")
    whole = save_png(root / "b" / "full.png", random_images(1, size=32, seed=9)[0])
    (root / "b" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "b" / "full.png").unlink()
    gray = Image.fromarray(np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1)), mode="L")
    save_png(root / "c" / "gray.png", gray)
    odd = random_images(1, size=20, seed=5)[0][:, :13]  # 20 x 13, not square
    save_png(root / "c" / "odd.png", odd)

    manifest = prepare(
        DataConfig(source="imagefolder", path=str(root), image_size=8),
        seed=0,
        out_dir=tmp_path / "o",
    )

    assert manifest["classes"] == ["a", "b", "c"]
    assert [entry["file"] for entry in manifest["skipped"]] == ["a/corrupt.png", "b/truncated.png"]
    assert all(
        entry["reason"] and str(root) not in entry["reason"] for entry in manifest["skipped"]
    )
    assert manifest["totals"]["all"] == 14
    x = np.concatenate([xs for xs, _ in all_splits(tmp_path / "o").values()])
    assert x.shape == (14, 8, 8, 3)
    equal_channels = [(image[..., 0] == image[..., 1]).all() for image in x]
    assert sum(equal_channels) == 1  # only the grayscale one; random RGB never is
    resized = Image.fromarray(odd).resize((8, 8), Image.Resampling.BILINEAR)
    assert np.asarray(resized).tobytes() in image_rows(x)


def test_16_bit_greyscale_png_keeps_its_shades(tmp_path: Path) -> None:
    ramp = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040  # 0 .. 65520 in 64 steps
    save_png(tmp_path / "deep.png", Image.fromarray(ramp))
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    pixels = read_image(tmp_path / "deep.png", 8)
    expected = np.rint(ramp / 257).astype(np.uint8)  # 65535 -> 255
    for channel in range(3):
        np.testing.assert_array_equal(pixels[..., channel], expected)


def test_imagefolder_train_test_layout_keeps_the_given_test(tmp_path: Path) -> None:
    make_folder(tmp_path / "images" / "train", classes="xy", per_class=10, seed=1)
    make_folder(tmp_path / "images" / "test", classes="xy", per_class=2, seed=2)
    cfg = DataConfig(source="imagefolder", path=str(tmp_path / "images"), image_size=8)

    manifest = prepare(cfg, seed=0, out_dir=tmp_path / "out")

    assert manifest["classes"] == ["x", "y"]
    assert manifest["split"]["test_from"] == "source"
    assert manifest["counts"]["test"] == {"x": 2, "y": 2}
    assert manifest["counts"]["val"] == {"x": 1, "y": 1}
    test_images = image_rows(random_images(4, size=8, seed=2))
    assert image_rows(load_split(tmp_path / "out", "test")[0]) == test_images


def test_imagefolder_without_images_fails_naming_the_path(tmp_path: Path) -> None:
    root = tmp_path / "empty"
    (root / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match=f"data.path: {root} holds no readable image"):
        prepare(DataConfig(source="imagefolder", path=str(root)), seed=0, out_dir=tmp_path / "o")
    with pytest.raises(ConfigError, match="is not a folder"):
        cfg = DataConfig(source="imagefolder", path=str(tmp_path / "nothing"))
        prepare(cfg, seed=0, out_dir=tmp_path / "o")


def test_imagefolder_class_without_readable_image_fails(tmp_path: Path) -> None:
    root = tmp_path / "images"
    make_folder(root, classes="ab")
    (root / "c").mkdir()
    (root / "c" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ConfigError, match="class 'c' has 0 images after cleaning"):
        prepare(DataConfig(source="imagefolder", path=str(root)), seed=0, out_dir=tmp_path / "o")


def test_imagefolder_with_one_class_fails(tmp_path: Path) -> None:
    make_folder(tmp_path / "images", classes="a")
    cfg = DataConfig(source="imagefolder", path=str(tmp_path / "images"))
    with pytest.raises(ConfigError, match=r"found 1 class\(es\) \['a'\]"):
        prepare(cfg, seed=0, out_dir=tmp_path / "o")


# --- torchvision datasets (never downloaded here) ------------------------------------------------


def test_cifar10_missing_files_without_download_says_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="set data.download: true") as error:
        prepare(DataConfig(source="cifar10"), seed=0, out_dir=tmp_path / "o", raw_dir=tmp_path)
    assert f"under {tmp_path}" in str(error.value)


def test_cifar10_failed_download_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision import datasets

    def no_network(self: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(datasets.CIFAR10, "download", no_network)
    cfg = DataConfig(source="cifar10", path=str(tmp_path), download=True)
    with pytest.raises(ConfigError, match="data.download: .*network unreachable.*place the"):
        prepare(cfg, seed=0, out_dir=tmp_path / "o")


def test_fake_cifar10_loads_with_its_own_test_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torchvision import datasets

    folder = tmp_path / "raw" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["plane", "car", "bird"] + [f"c{k}" for k in range(3, 10)]
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": 10 for i in range(1, 6)} | {"test_batch": 20}
    for file, n in batches.items():
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)  # CHW rows, as CIFAR stores
        entry = {"data": data, "labels": [k % 10 for k in range(n)]}
        (folder / file).write_bytes(pickle.dumps(entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    # the fake files cannot match torchvision's md5 sums
    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(datasets.cifar, "check_integrity", lambda *args, **kwargs: True)

    manifest = prepare(
        DataConfig(source="cifar10", image_size=32),
        seed=0,
        out_dir=tmp_path / "out",
        raw_dir=tmp_path / "raw",
    )

    assert manifest["classes"] == names
    assert manifest["split"]["test_from"] == "source"
    assert manifest["totals"] == {"train": 40, "val": 10, "test": 20, "all": 70}
    x, y = load_split(tmp_path / "out", "test")
    test = pickle.loads((folder / "test_batch").read_bytes())
    expected = test["data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(x, expected)
    np.testing.assert_array_equal(y, test["labels"])
