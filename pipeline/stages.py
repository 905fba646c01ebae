"""The flow's way into the pipeline: DVC commands run as subprocesses, their output streamed to a
logger, and what ``dvc.yaml`` declares (stages, metrics files) read from it.

Nothing here knows what a stage does: DVC decides what is stale and runs ``contrastive <stage>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml

from contrastive.config import parse_params

StageStatus = Literal["ran", "up to date", "restored from run cache", "failed"]

BIN_DIR = Path(sys.executable).parent
"""Where this environment's commands live; put first on PATH so DVC finds its ``contrastive``."""

PROGRESS_INTERVAL_S = "30"
"""tqdm progress lines at most this often in the logs (unless TQDM_MININTERVAL is set)."""

Logger = logging.Logger | logging.LoggerAdapter

STAGE_ERROR = re.compile(r"contrastive [\w-]+: (error|failed): ")
"""The one line a stage command prints when it stops (cli.main)."""


class DvcFailed(RuntimeError):
    """A DVC command failed. ``exit_status`` is the stage command's status when DVC reports one
    (2 means bad params or data: running it again cannot help)."""

    def __init__(self, message: str, exit_status: int | None = None) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def stage_names(project: Path) -> list[str]:
    """The stages of ``dvc.yaml``, in the order they are written (upstream first)."""
    return list(_dvc_yaml(project).get("stages", {}))


def read_metrics(project: Path) -> dict[str, float]:
    """Every number in the metrics files that ``dvc.yaml`` declares, as ``file-stem.key.path``."""
    metrics: dict[str, float] = {}
    for stage in _dvc_yaml(project).get("stages", {}).values():
        for entry in stage.get("metrics", []):
            path = project / (entry if isinstance(entry, str) else next(iter(entry)))
            if path.is_file():
                text = path.read_text()
                data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
                metrics.update(_flat_numbers(data, path.stem))
    return metrics


def repro(project: Path, stage: str, logger: Logger, force: bool = False) -> StageStatus:
    """``dvc repro <stage>``: DVC runs the stage only if something it depends on changed.

    Stale upstream stages would run too (earlier tasks have normally brought them up to date).
    Returns what DVC did with the stage: ``ran``, ``up to date`` or ``restored from run cache``.
    """
    output = run_dvc(["repro", *(["--force"] if force else []), stage], project, logger)
    if f"Running stage '{stage}'" in output:
        return "ran"
    if f"Stage '{stage}' is cached" in output:
        return "restored from run cache"
    return "up to date"


def apply_overrides(project: Path, overrides: dict[str, Any]) -> list[str]:
    """Write ``{"train.epochs": 30}``-style overrides into ``params.yaml`` as ``dvc exp run -S``
    does (with DVC's own function: comments are kept, unknown keys refused), after checking the
    result with the pipeline's validation, so that a bad value changes nothing.

    Returns the overrides as ``-S`` strings, for example ``train.epochs=30``.
    """
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

    sets = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    params = project / "params.yaml"
    with tempfile.TemporaryDirectory(prefix=".retrain-", dir=project) as scratch:
        candidate = Path(scratch) / "params.yaml"
        shutil.copyfile(params, candidate)
        try:
            dvc_apply_overrides(candidate, sets)
        except InvalidArgumentError as exc:
            cause = str(exc.__cause__ or exc).splitlines()[0]
            raise ValueError(f"params overrides {sets}: {cause}") from None
        # a ConfigError names the key and what is allowed
        parse_params(yaml.safe_load(candidate.read_text()), "params.yaml with the overrides")
        os.replace(candidate, params)
    return sets


def refresh_sources(project: Path, logger: Logger) -> list[str]:
    """Bring DVC-tracked inputs up to date: ``dvc update`` of each import (a ``.dvc`` file made by
    ``dvc import``), then ``dvc pull`` if a remote is configured. Returns the commands run.

    The remote is checked before anything runs (:func:`contrastive.remote.check`): a remote
    without credentials or bucket fails with its one line and exit status 2, not DVC's message.
    """
    from dvc.repo import Repo

    from contrastive.config import ConfigError
    from contrastive.remote import check

    with Repo(str(project)) as repo:
        commands = [["update", stage.relpath] for stage in repo.index.stages if stage.is_import]
        if repo.config.get("remote"):
            commands.append(["pull", "--allow-missing"])
    if ["pull", "--allow-missing"] in commands:
        try:
            logger.info("%s", check(project))
        except ConfigError as exc:
            raise DvcFailed(f"dvc pull: {exc}", exit_status=2) from None
    for command in commands:
        run_dvc(command, project, logger)
    return ["dvc " + " ".join(command) for command in commands]


def save_experiment(project: Path, name: str, logger: Logger) -> str | None:
    """``dvc exp save``: record the workspace (params, ``dvc.lock``, metrics) as experiment
    ``name``, as ``dvc exp run`` does at its end. Needs git: without it, returns None."""
    if not (project / ".git").exists():
        logger.info("no git repository: not saved as a DVC experiment (dvc.lock has the params)")
        return None
    run_dvc(["exp", "save", "--name", name], project, logger)
    return name


def run_dvc(args: list[str], project: Path, logger: Logger) -> str:
    """Run ``dvc ARGS`` in ``project``, log each line of its output (the stage command's too) as it
    comes, and return the whole output. Raises :class:`DvcFailed` if DVC fails.

    DVC runs in a process group of its own, so that an interruption (a task's timeout) stops the
    stage command too; DVC gets SIGINT first, which releases its lock.
    """
    env = {**os.environ, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("TQDM_MININTERVAL", PROGRESS_INTERVAL_S)
    env.setdefault("PYTHONUNBUFFERED", "1")  # the stage's output as it comes
    logger.info("$ dvc %s", " ".join(args))
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", *args],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: list[str] = []

    def emit(raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip()
        if line:
            lines.append(line)
            logger.info(line)

    try:
        assert process.stdout is not None
        pending = b""
        # read1 returns what has come without waiting for a newline: tqdm redraws with \r
        while chunk := process.stdout.read1(65536):
            *complete, pending = re.split(rb"[\r\n]", pending + chunk)
            for raw in complete:
                emit(raw)
        emit(pending)
        status = process.wait()
    finally:
        _stop(process)
    if status != 0:
        error = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), f"exit {status}")
        exited = re.search(r"exited with (\d+)", error)
        # the stage command's own line says what is wrong (the key, the file); DVC's says less
        stage_error = next((ln for ln in reversed(lines) if STAGE_ERROR.match(ln)), None)
        raise DvcFailed(f"dvc {' '.join(args)}: {stage_error or error}",
                        int(exited[1]) if exited else None)
    return "\n".join(lines)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End DVC and the stage it runs if they are still running: SIGINT, then SIGKILL."""
    if process.poll() is not None:
        return
    for sig, grace_s in ((signal.SIGINT, 10), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace_s)
            return


def _dvc_yaml(project: Path) -> dict[str, Any]:
    return yaml.safe_load((project / "dvc.yaml").read_text()) or {}


def _flat_numbers(value: Any, prefix: str = "") -> dict[str, float]:
    """``{"a": {"b": 1}}`` -> ``{"prefix.a.b": 1.0}``: the numbers only (no flags, no text)."""
    if isinstance(value, dict):
        flat: dict[str, float] = {}
        for key, item in value.items():
            flat.update(_flat_numbers(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    return {prefix: float(value)} if is_number else {}
