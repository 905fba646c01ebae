"""What a user meets first: `contrastive --version`, `--help` in plain text, and the commands for
registered models run from any folder when told where the project or the store is."""

from __future__ import annotations

import argparse
import os
from importlib.metadata import version
from pathlib import Path

import pytest
from PIL import Image

from contrastive.cli import build_parser, main, plain
from pipeline.retrain import main as retrain_main
from tests.conftest import write_params


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"contrastive {version('contrastive')}"


def _helps(parser: argparse.ArgumentParser) -> list[str]:
    """The --help text of ``parser`` and of every sub-command under it."""
    texts = [parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                texts += _helps(sub)
    return texts


def test_help_texts_carry_no_markup(capsys: pytest.CaptureFixture) -> None:
    helps = _helps(build_parser())
    assert len(helps) > 10
    with pytest.raises(SystemExit):
        retrain_main(["--help"])
    helps.append(capsys.readouterr().out)
    for text in helps:
        assert "``" not in text and ":class:" not in text and ":func:" not in text, text
    assert plain("``dvc repro`` and :class:`~pipeline.report.RetrainResult`") == (
        "dvc repro and RetrainResult")


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with params.yaml, and the current folder somewhere else."""
    project = tmp_path / "project"
    project.mkdir()
    write_params(project)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return project


def test_registry_list_finds_the_store_beside_params(elsewhere: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    params = str(elsewhere / "params.yaml")
    assert main(["registry", "list", "--params", params]) == 2
    err = capsys.readouterr().err
    assert f"no MLflow store at {elsewhere / 'mlflow.db'}" in err  # not one in the current folder
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{elsewhere / 'mlflow.db'}"
    assert not Path("mlflow.db").exists() and not (elsewhere / "mlflow.db").exists()


def test_tracking_uri_option_wins(elsewhere: Path, capsys: pytest.CaptureFixture) -> None:
    other = elsewhere.parent / "other" / "mlflow.db"
    args = ["--params", str(elsewhere / "params.yaml"), "--tracking-uri", f"sqlite:///{other}"]
    assert main(["registry", "list", *args]) == 2
    assert f"no MLflow store at {other}" in capsys.readouterr().err
    image = elsewhere / "photo.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["embed", *args, str(image), "--out", "emb.npy"]) == 2
    assert f"no MLflow store at {other}" in capsys.readouterr().err
    assert not Path("emb.npy").exists()


@pytest.mark.parametrize("uri", ["postgresql+psycopg2://u:secretpw@127.0.0.1:9/mlflow",
                                 "http://u:secretpw@127.0.0.1:9"])
def test_a_store_that_does_not_answer_is_one_line_naming_the_setting(
        elsewhere: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        uri: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["registry", "list", "--params", str(elsewhere / "params.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("contrastive registry: error: MLFLOW_TRACKING_URI: ")
    assert "127.0.0.1:9" in err[0] and "secretpw" not in err[0]
    assert "No module named" not in err[0]  # the driver is there: the server is not
