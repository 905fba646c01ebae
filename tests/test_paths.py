"""Outputs that follow from another (a stage's report, its plot) go where the project keeps them
only when the stage writes the project's files; otherwise beside the given path, so a bench or a
test that writes to a temporary folder writes nothing into the project."""

from __future__ import annotations

from pathlib import Path

from contrastive import paths


def test_companion_of_the_standard_path_is_the_standard_companion() -> None:
    assert paths.companion(paths.PRETRAIN_METRICS, paths.PRETRAIN_METRICS,
                           paths.PRETRAIN_REPORT, ".report.json") == "reports/pretrain.json"


def test_companion_of_another_path_lies_beside_it(tmp_path: Path) -> None:
    given = tmp_path / "run" / "pretrain.json"
    assert paths.companion(given, paths.PRETRAIN_METRICS, paths.PRETRAIN_REPORT,
                           ".report.json") == str(tmp_path / "run" / "pretrain.report.json")
    assert paths.companion(tmp_path / "c.csv", paths.CONFUSION, paths.CONFUSION_PLOT,
                           ".png") == str(tmp_path / "c.png")
