"""The layout: every output of a run under one root, the project's paths by default, so that a
test or a bench that passes its own folder writes nothing into the project."""

from __future__ import annotations

from pathlib import Path

import pytest

from contrastive import paths
from contrastive.layout import Layout

OUTPUTS = {name.lower() for name in dir(paths) if name.isupper()} - {"manifest"}
"""The files of ``paths`` that the layout exposes (the manifest is the prepared folder's)."""


def files_of(layout: Layout) -> dict[str, Path]:
    return {name: getattr(layout, name) for name in dir(Layout)
            if isinstance(getattr(Layout, name), property)}


def test_the_default_layout_is_the_projects_paths() -> None:
    found = files_of(Layout())
    expected = {name: Path(getattr(paths, name.upper())) for name in OUTPUTS}
    assert set(found) == set(expected), set(found) ^ set(expected)  # each under its own name
    for name, path in expected.items():
        assert found[name] == path, name


def test_a_layout_under_another_root_keeps_every_file_there(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "run")
    for name, path in files_of(layout).items():
        assert path.is_relative_to(tmp_path / "run"), name
    assert layout.encoder == tmp_path / "run" / paths.ENCODER
    assert len(set(files_of(layout).values())) == len(files_of(layout))  # no two alike


def test_a_prepared_folder_elsewhere_moves_only_the_prepared_data(tmp_path: Path) -> None:
    shared = Layout(tmp_path / "run", prepared_dir=tmp_path / "shared")
    assert shared.prepared == tmp_path / "shared"
    assert shared.encoder == Layout(tmp_path / "run").encoder
    with pytest.raises(AttributeError):
        shared.root = tmp_path  # type: ignore[misc]
