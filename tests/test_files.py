"""Atomic writes: what a crash, a kill or a power loss can leave behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from contrastive import files


def test_a_file_is_flushed_before_its_rename_and_the_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.fstat(fd).st_ino))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("rename", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    files.write_json(tmp_path / "metrics.json", {"a": 1})

    written, folder = (tmp_path / "metrics.json").stat().st_ino, tmp_path.stat().st_ino
    assert events == [("fsync", written), ("rename", written), ("fsync", folder)]


def test_a_replaced_folder_is_on_disk_at_every_moment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "prepared"
    target.mkdir()
    (target / "train.npz").write_text("old")
    real_replace = os.replace

    def killed_before_the_new_folder_is_in(src: str | Path, dst: str | Path) -> None:
        if Path(src).name == ".prepared.tmp":
            raise KeyboardInterrupt  # as a kill at this moment would stop it
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(files.os, "replace", killed_before_the_new_folder_is_in)
        with pytest.raises(KeyboardInterrupt), files.atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "train.npz").write_text("new")
    assert "old" in {p.read_text() for p in tmp_path.rglob("train.npz")}  # not lost

    with pytest.raises(ValueError), files.atomic_path(target):  # the next write puts it back
        raise ValueError("this write fails too")
    assert (target / "train.npz").read_text() == "old"

    with files.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "train.npz").write_text("new")
    assert (target / "train.npz").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]  # nothing left aside
