"""The ``retrain`` flow: the DVC pipeline as Prefect tasks, one per stage, run unattended.

DVC decides what is stale (no Prefect caching); each task runs ``dvc repro <stage>`` and streams
its output into the task's log. Pretraining is retried with back-off and resumes from its
checkpoint; every task has a time limit; one retrain at a time holds the workspace. The summary is
published as Prefect artifacts and returned as a :class:`~pipeline.report.RetrainResult`.

    python -m pipeline.retrain [--set train.epochs=30] [--refresh]  # run once, print the summary
    python -m pipeline.retrain serve                                # run on params.yaml's cron
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import prefect
import yaml
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import State, TaskRun
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.exceptions import CancelledRun
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.runtime import flow_run, task_run
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelled
from prefect.tasks import Task, exponential_backoff

from contrastive.cli import plain
from contrastive.config import ConfigError
from contrastive.store import check_answers
from pipeline import stages
from pipeline.report import REGISTRY_REPORT, Registration, RetrainResult, StageRun, metrics_table
from pipeline.report import markdown as summary_markdown
from pipeline.settings import Settings, cron_schedule

DEPLOYMENT = "scheduled"
"""The deployment's name: ``retrain/scheduled`` (``make serve`` and ``pipeline/prefect.yaml``)."""
RETRIED_STAGE = "pretrain"
LOCK_FILE = ".dvc/tmp/retrain.lock"


class WorkspaceBusy(RuntimeError):
    """Another retrain holds this workspace."""


@task(cache_policy=NO_CACHE)
def set_params(project: Path, params: dict[str, Any]) -> list[str]:
    """Apply the run's params overrides to ``params.yaml``, as ``dvc exp run -S`` does."""
    sets = stages.apply_overrides(project, params)
    get_run_logger().info("params.yaml: %s", " ".join(sets))
    return sets


@task(cache_policy=NO_CACHE)
def refresh_data(project: Path) -> list[str]:
    """Update DVC imports and pull from the DVC remote before the first stage re-reads the data."""
    return stages.refresh_sources(project, get_run_logger())


@task(cache_policy=NO_CACHE)
def run_stage(project: Path, stage: str, force: bool = False) -> StageRun:
    """One stage through ``dvc repro``: it runs only if something it depends on changed."""
    started = time.monotonic()
    status = stages.repro(project, stage, get_run_logger(), force=force)
    return StageRun(stage, status, round(time.monotonic() - started, 1), task_run.run_count)


@task(cache_policy=NO_CACHE)
def save_experiment(project: Path, name: str) -> str | None:
    """Record a run with overrides as a DVC experiment (``dvc exp show`` lists it)."""
    return stages.save_experiment(project, name, get_run_logger())


def _worth_retrying(task_: Task[..., Any], run: TaskRun, state: State) -> bool:
    """Bad params or data (the stage exited with status 2) fail the same way every time."""
    try:
        state.result()
    except stages.DvcFailed as exc:
        return exc.exit_status != 2
    except Exception:
        return True
    return True


def _stage_task(stage: str, settings: Settings) -> Task[..., StageRun]:
    """The stage's task, named after it, with its time limit; pretraining retries with back-off
    (a retry resumes from ``checkpoints/last.pt``, which DVC keeps: ``persist: true``)."""
    options: dict[str, Any] = {
        "name": stage,
        "task_run_name": stage,
        "timeout_seconds": settings.stage_timeout_s,
    }
    if stage == RETRIED_STAGE:
        options |= {
            "timeout_seconds": settings.pretrain_timeout_s,
            "retries": settings.pretrain_retries,
            "retry_delay_seconds": exponential_backoff(settings.retry_delay_s),
            "retry_condition_fn": _worth_retrying,
        }
    return run_stage.with_options(**options)


@contextlib.contextmanager
def workspace_lock(project: Path, wait_s: float = 0.0) -> Iterator[None]:
    """Hold the workspace for one retrain; raise :class:`WorkspaceBusy` after ``wait_s`` seconds
    if another one holds it. The OS releases the lock if its holder dies."""
    path = project / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    with path.open("a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                if time.monotonic() >= deadline:
                    raise WorkspaceBusy(
                        f"another retrain is running in {project} ({holder}); this run did nothing"
                    ) from None
                time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))
        handle.truncate(0)
        since = datetime.now(UTC).isoformat(timespec="seconds")
        handle.write(f"pid {os.getpid()}, flow run {flow_run.name or '-'}, since {since}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


@flow(name="retrain")
def retrain(
    params: dict[str, Any] | None = None, refresh: bool = False, project: str = "."
) -> RetrainResult:
    """Run the DVC pipeline's stages in order and report what ran, what was up to date, the
    metrics and the registry's decision.

    Args:
        params: overrides such as ``{"train.epochs": 30}``, written to ``params.yaml`` as
            ``dvc exp run -S`` does; the run is then saved as a DVC experiment (with git).
        refresh: update DVC imports, pull from the DVC remote, and run the first stage even if
            DVC finds it up to date (a growing image folder is not a DVC dependency).
        project: the DVC project's folder.
    """
    root = Path(project).resolve()
    settings = Settings.from_env()
    logger = get_run_logger()
    try:
        with workspace_lock(root, settings.lock_wait_s):
            result = _run_pipeline(root, params or {}, refresh, settings)
    except WorkspaceBusy as busy:
        logger.warning("%s", busy)
        # Prefect makes a returned state the run's final state: the run shows as Cancelled
        return Cancelled(message=str(busy))  # type: ignore[return-value]
    logger.info("retrain: %s (%.1f s)", result.headline, result.seconds)
    return result


def _run_pipeline(
    root: Path, params: dict[str, Any], refresh: bool, settings: Settings
) -> RetrainResult:
    """The flow's body, inside the workspace lock: publishes the summary even if a stage fails."""
    started = time.monotonic()
    bounded = {"timeout_seconds": settings.stage_timeout_s}
    # Each task waits for the one before it (wait_for): the run's task graph shows the order.
    upstream: list[PrefectFuture[Any]] = []
    overrides: list[str] = []
    refreshed = None
    if params:
        upstream = [set_params.with_options(**bounded).submit(root, params)]
        overrides = upstream[0].result()
    if refresh:
        upstream = [refresh_data.with_options(**bounded).submit(root, wait_for=upstream)]
        refreshed = upstream[0].result()
    runs: list[StageRun] = []
    failure: Exception | None = None
    for index, stage in enumerate(stages.stage_names(root)):
        stage_started = time.monotonic()
        future = _stage_task(stage, settings).submit(root, stage, force=refresh and index == 0,
                                                     wait_for=upstream)
        try:
            runs.append(future.result())
        except Exception as exc:
            seconds = round(time.monotonic() - stage_started, 1)
            runs.append(StageRun(stage, "failed", seconds, attempts=None, error=one_line(exc)))
            failure = exc
            break
        upstream = [future]
    experiment = None
    if overrides and failure is None:
        # A run that trained and registered stays Completed if only its record fails: the
        # task shows as Failed and the summary says the run was not saved as an experiment.
        name = f"retrain-{flow_run.name}" if flow_run.name else "retrain"
        saved = save_experiment.with_options(**bounded).submit(root, name, wait_for=upstream)
        saved.wait()
        experiment = saved.result() if saved.state.is_completed() else None
    result = RetrainResult(
        stages=runs,
        metrics=stages.read_metrics(root),
        registration=Registration.read(root / REGISTRY_REPORT),
        seconds=round(time.monotonic() - started, 1),
        overrides=overrides,
        refreshed=refreshed,
        experiment=experiment,
    )
    publish(result)
    if failure is not None:
        raise failure
    return result


def one_line(exc: BaseException) -> str:
    """The first line of an error, as the summary's stage table shows it."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def publish(result: RetrainResult) -> None:
    """The summary as Prefect artifacts: a Markdown report and a table of the metrics."""
    create_markdown_artifact(
        summary_markdown(result), key="retrain-summary", description=f"Retrain: {result.headline}"
    )
    create_table_artifact(
        metrics_table(result), key="retrain-metrics", description="Metrics of this pipeline state"
    )


def scheduled_deployment(project: Path) -> RunnerDeployment:
    """The deployment ``make serve`` runs: params.yaml's cron, one run at a time (a run that
    comes while one is running waits for it)."""
    return retrain.to_deployment(
        name=DEPLOYMENT,
        schedule=cron_schedule(project),
        concurrency_limit=1,
        parameters={"project": str(project)},
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


@contextlib.contextmanager
def local_server(port: int) -> Iterator[str]:
    """Run ``prefect server start`` (API, UI and the scheduler) while the block runs.

    The temporary server that Prefect starts by itself has no scheduler: a cron would never fire.
    """
    url = f"http://127.0.0.1:{port}/api"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    server = subprocess.Popen([*command, "--port", str(port)])
    try:
        deadline = time.monotonic() + 120
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Prefect server did not start on port {port}")
            time.sleep(1)
        os.environ["PREFECT_API_URL"] = url  # for the processes that run the flow
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        server.terminate()
        server.wait(30)


def check_api(url: str, attempts: int = 3, wait_s: float = 2.0) -> None:
    """Fail fast, with one line naming ``PREFECT_API_URL``, when no Prefect server answers at
    ``url``: Prefect's client would retry for about half a minute and end in an error that names
    no setting.

    Raises:
        ConfigError: nothing answered.
    """
    check_answers(url, "PREFECT_API_URL", "Prefect server", "start it (prefect server start) or "
                  "fix the URL, or unset it for a temporary local server", attempts, wait_s)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).is_success
    except httpx.HTTPError:
        return False


def serve(project: Path, port: int) -> None:
    """Serve the scheduled deployment until interrupted, on ``PREFECT_API_URL`` if set, else on a
    local Prefect server (UI at http://127.0.0.1:PORT)."""
    if PREFECT_API_URL.value():
        prefect.serve(scheduled_deployment(project))
        return
    with local_server(port):
        print(f"Prefect UI: http://127.0.0.1:{port}", flush=True)
        prefect.serve(scheduled_deployment(project))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.retrain",
        description=plain(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="run",
        choices=["run", "serve", "cron", "timezone"],
        help="run the flow once (default); serve it on the schedule; print the schedule's cron "
        "or timezone (for prefect.yaml)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a param for this run, as dvc exp run -S does (repeatable)",
    )
    parser.add_argument("--refresh", action="store_true", help="refresh the data before prepare")
    parser.add_argument("--project", default=".", help="the DVC project's folder (.)")
    parser.add_argument("--port", type=int, default=4200, help="serve: local server port (4200)")
    args = parser.parse_args(argv)
    project = Path(args.project).resolve()
    api = PREFECT_API_URL.value()
    if api and args.command in ("run", "serve"):
        try:
            check_api(api)
        except ConfigError as exc:
            print(f"retrain: error: {exc}", file=sys.stderr)
            return 2

    if args.command == "serve":
        serve(project, args.port)
        return 0
    if args.command in ("cron", "timezone"):
        print(getattr(cron_schedule(project), args.command))
        return 0
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    try:
        result = retrain(params=overrides, refresh=args.refresh, project=str(project))
    except CancelledRun as exc:
        print(f"retrain cancelled: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"retrain failed: {exc}", file=sys.stderr)
        return 1
    print(summary_markdown(result))
    return 0


if __name__ == "__main__":
    # Through the importable module, so that a served deployment finds `pipeline.retrain.retrain`
    # (this file runs as `__main__`)
    from pipeline.retrain import main as module_main

    sys.exit(module_main())
