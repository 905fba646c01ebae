"""Atomic file writes: an output is either complete or absent, never half-written.

A file or folder is written under a temporary name beside its target, flushed to disk (fsync) and
renamed onto the target; then the folder holding it is flushed, so that after a power loss the
target holds the old version or the new one, never a truncated file. A folder that replaces
another is renamed in only after the old one has been moved aside, and the old one is deleted
last: at every moment one complete version is on disk (a kill between the two renames leaves the
old one at ``.NAME.old``, and the next write of that path puts it back first).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Works for files and for directories (an existing directory at ``path`` is replaced).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():  # killed between the two renames below
        os.replace(old, path)
    _remove(old)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _fsync_tree(tmp)
    replaces_folder = tmp.is_dir() and path.exists()
    if replaces_folder:
        os.replace(path, old)  # kept until the new folder is in place
    os.replace(tmp, path)
    _fsync(path.parent)
    if replaces_folder:
        _remove(old)


def _fsync_tree(path: Path) -> None:
    """Flush a file, or a folder and everything in it, to disk."""
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            _fsync(item)


def _fsync(path: Path) -> None:
    """Flush one file's data, or one folder's entries (so that renames in it survive)."""
    if path.is_dir() and os.name == "nt":  # Windows cannot open a folder to flush it
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: str | Path, payload: Any) -> None:
    """Write ``payload`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | Path, rows: Iterable[Mapping[str, Any]], columns: list[str]) -> None:
    """Write ``rows`` with a header of ``columns`` (other keys of a row are left out)."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
