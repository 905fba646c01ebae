"""Datasets larger than memory: the memory-mapped split, and streamed batches that equal the
in-memory ones bit for bit."""

from __future__ import annotations

import csv
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from contrastive import train
from contrastive.augment import SimCLRViews
from contrastive.batches import InMemoryBatches, StepRows, StreamingBatches
from contrastive.cli import main
from contrastive.config import AugmentConfig, ConfigError, load_params, parse_params
from contrastive.data import load_split, map_npz_member, map_split
from contrastive.layout import Layout
from contrastive.stages import pretrain as pretrain_stage
from tests.conftest import write_params

SIZE = 8


def split_file(folder: Path, n: int = 200, y_first: bool = False) -> Path:
    """A prepared-format ``train.npz`` of ``n`` random 12x12 images of 4 classes; ``y_first``
    stores ``y`` before ``x``, so ``x`` does not start at the first member."""
    data = np.random.default_rng(0)
    x = data.integers(0, 256, (n, 12, 12, 3), dtype=np.uint8)
    y = data.integers(0, 4, n).astype(np.int64)
    path = folder / "train.npz"
    if y_first:
        np.savez(path, y=y, x=x)
    else:
        np.savez(path, x=x, y=y)
    return path


@pytest.mark.parametrize("y_first", [False, True])
def test_the_mapped_images_equal_the_loaded_ones(tmp_path: Path, y_first: bool) -> None:
    split_file(tmp_path, y_first=y_first)
    source, labels = map_split(tmp_path, "train")
    x, y = load_split(tmp_path, "train")
    mapped = source.open()
    assert isinstance(mapped, np.memmap)
    assert mapped.dtype == np.uint8 and mapped.shape == x.shape == source.shape
    assert np.array_equal(mapped, x) and np.array_equal(labels, y)
    assert source.nbytes == x.nbytes


def test_a_compressed_member_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "train.npz"
    np.savez_compressed(path, x=np.zeros((4, 2, 2, 3), np.uint8), y=np.zeros(4, np.int64))
    with pytest.raises(ConfigError) as info:
        map_npz_member(path, "x")
    message = str(info.value)
    assert str(path) in message and "compressed" in message and "\n" not in message


def sources(
    folder: Path, balanced: bool, rank: int, world_size: int, workers: int, prefetch: bool
) -> tuple[InMemoryBatches, StreamingBatches]:
    """Both sources over the same file: batches of 48 (4 steps, 8 images dropped), seed 3; the
    streamed one makes its batches one ahead on a thread when ``prefetch``."""
    path = split_file(folder)
    source, labels = map_split(folder, "train")
    x, _ = load_split(folder, "train")
    assert path.exists()
    views = SimCLRViews(AugmentConfig(hflip=0.5, saturation=0.4, hue=0.1), SIZE)
    common = {
        "labels": torch.from_numpy(labels), "batch_size": 48, "views": views,
        "mean": [0.5] * 3, "std": [0.25] * 3, "seed": 3, "balanced": balanced,
        "rank": rank, "world_size": world_size,
    }
    in_memory = InMemoryBatches(torch.from_numpy(x), prefetch=False, **common)  # type: ignore[arg-type]
    streaming = StreamingBatches(  # type: ignore[arg-type]
        source, workers=workers, prefetch=prefetch, **common
    )
    return in_memory, streaming


@pytest.mark.parametrize(
    ("world_size", "rank", "balanced", "workers", "prefetch"),
    [
        (1, 0, False, 2, False), (1, 0, True, 0, False), (1, 0, False, 2, True),
        (2, 0, False, 2, False), (2, 1, False, 0, False), (2, 1, True, 2, True),
    ],
)
def test_streamed_batches_equal_the_in_memory_ones_exactly(
    tmp_path: Path, world_size: int, rank: int, balanced: bool, workers: int, prefetch: bool
) -> None:
    in_memory, streaming = sources(tmp_path, balanced, rank, world_size, workers, prefetch)
    assert streaming.steps_per_epoch == in_memory.steps_per_epoch == 4
    firsts = []
    for epoch in range(2):
        expected, got = list(in_memory.epoch(epoch)), list(streaming.epoch(epoch))
        assert len(got) == len(expected) == 4
        for mine, theirs in zip(got, expected, strict=True):
            assert mine[0].shape[0] == 48 // world_size
            for a, b in zip(mine, theirs, strict=True):
                assert a.dtype == b.dtype and torch.equal(a, b)
        firsts.append(expected[0][0])
    assert not torch.equal(firsts[0], firsts[1])  # the epochs do differ


def test_the_step_dataset_pickles_without_its_mapping(tmp_path: Path) -> None:
    """Workers get the map's location, never the mapped array."""
    split_file(tmp_path)
    source, _ = map_split(tmp_path, "train")
    rows = StepRows(source, np.arange(200), 48, 0, 48, 4)
    first = rows[1]
    assert rows._array is not None
    copy = pickle.loads(pickle.dumps(rows))
    assert copy._array is None
    assert torch.equal(copy[1], first)
    assert torch.equal(first, torch.from_numpy(load_split(tmp_path, "train")[0][48:96]))


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"train": {"streaming": "yes"}}, "train.streaming: Input should be 'auto', 'on' or 'off'"),
        ({"train": {"streaming": True}}, "train.streaming"),
        ({"train": {"loader_workers": -1}}, "train.loader_workers"),
        ({"train": {"loader_workers": 1.5}}, "train.loader_workers"),
    ],
)
def test_bad_values_of_the_keys_are_rejected_naming_them(raw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_auto_streams_only_what_exceeds_half_the_free_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu = torch.device("cpu")
    free = train.available_ram()
    assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert not train.should_stream("auto", free // 4, cpu)
    assert train.should_stream("auto", free, cpu)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four processes share the RAM, a copy each
    assert train.should_stream("auto", free // 4, cpu)
    assert train.should_stream("on", 1, cpu) and not train.should_stream("off", 10**15, cpu)


def break_crc(path: Path, member: str) -> None:
    """Change the CRC-32 the central directory of the zip at ``path`` records for ``member``:
    reading the member through ``zipfile`` (``np.load``) then fails, mapping it does not."""
    data = bytearray(path.read_bytes())
    entry = data.find(b"PK\x01\x02")
    while entry >= 0:
        name_length = int.from_bytes(data[entry + 28 : entry + 30], "little")
        if data[entry + 46 : entry + 46 + name_length] == member.encode():
            data[entry + 16] ^= 0xFF
            path.write_bytes(bytes(data))
            return
        entry = data.find(b"PK\x01\x02", entry + 4)
    raise AssertionError(f"{member} not in {path}")


def test_a_streamed_pretrain_trains_exactly_the_in_memory_run(workspace: Path) -> None:
    """``train.streaming: on`` gives the loss, kNN, metrics and encoder of ``off``, bit for bit.
    Neither reads the training images through ``np.load`` (their CRC is broken, so it would
    fail): the kNN monitor reads the map in slices, and only ``off`` copies it to the device."""
    assert main(["prepare"]) == 0
    break_crc(workspace / "data/prepared/train.npz", "x.npy")
    with pytest.raises(zipfile.BadZipFile):
        load_split(workspace / "data/prepared", "train")
    runs = {}
    for streaming in ("off", "on"):
        out = workspace / streaming
        write_params(workspace, {"train": {"epochs": 2, "knn_every": 1, "streaming": streaming}})
        layout = Layout(out, prepared_dir=workspace / "data/prepared")
        metrics = pretrain_stage.run(load_params("params.yaml"), layout)
        with layout.pretrain_history.open() as handle:
            history = [{k: v for k, v in row.items() if k != "images_per_s"}
                       for row in csv.DictReader(handle)]
        assert metrics.pop("streaming") is (streaming == "on")
        metrics.pop("images_per_s")
        assert all(value >= 0 for value in metrics.pop("seconds").values())  # wall time
        saved = torch.load(layout.encoder, weights_only=True)["state_dict"]
        runs[streaming] = (metrics, history, layout.knn_history.read_text(), saved)
    off, on = runs["off"], runs["on"]
    assert on[0] == off[0] and on[1] == off[1] and len(off[1]) == 2
    assert on[2] == off[2] and off[2].count("\n") == 3  # header and 2 epochs of kNN
    assert on[3].keys() == off[3].keys() and off[3]
    for name, tensor in off[3].items():
        assert torch.equal(tensor, on[3][name]), name
