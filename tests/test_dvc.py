"""The DVC contract: `dvc repro` runs the stages, a second one does nothing, and a params change
reruns only the stages that read the changed key."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, write_params


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _ran(output: str) -> set[str]:
    return {
        stage
        for stage in ("prepare", "pretrain", "probe", "export")
        if f"Running stage '{stage}'" in output
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC project with this repository's dvc.yaml and code, and the tiny params."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(ROOT / "dvc.yaml", root)
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    write_params(root)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    _run(["git", "init", "-q"], root)
    _run([sys.executable, "-m", "dvc", "init", "-q"], root)
    _run([*git, "add", "-A"], root)
    _run([*git, "commit", "-q", "-m", "init"], root)
    return root


def test_repro_then_noop_then_only_stale_stages(project: Path) -> None:
    dvc = [sys.executable, "-m", "dvc"]
    assert _ran(_run([*dvc, "repro"], project)) == {"prepare", "pretrain", "probe", "export"}
    assert (project / "dvc.lock").is_file()

    second = _run([*dvc, "repro"], project)
    assert _ran(second) == set()

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["export"]["latency_repeats"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert _ran(_run([*dvc, "repro"], project)) == {"export"}

    params["probe"]["max_iter"] = 25
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    # export reruns only if the probe's weights changed
    assert {"probe"} <= _ran(_run([*dvc, "repro"], project)) <= {"probe", "export"}

    metrics = _run([*dvc, "metrics", "show", "--json"], project)
    assert "linear_top1" in metrics and "max_abs_diff" in metrics
