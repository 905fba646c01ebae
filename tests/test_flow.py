"""The Prefect ``retrain`` flow end to end on a tiny git + DVC project: a first run with a params
override runs every stage (its pretraining crashes once and resumes from its checkpoint), a second
run is up to date, a second retrain is cancelled, and the deployments carry params.yaml's cron."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import State
from prefect.settings import PREFECT_API_URL
from prefect.states import Failed
from prefect.testing.utilities import prefect_test_harness

from contrastive.config import ConfigError
from pipeline import stages
from pipeline.report import RetrainResult, markdown
from pipeline.retrain import (
    _worth_retrying,
    retrain,
    run_stage,
    scheduled_deployment,
    workspace_lock,
)
from pipeline.settings import Settings
from tests.conftest import ROOT, make_dvc_project, new_store
from tests.services import free_port

STAGE_NAMES = ("prepare", "pretrain", "probe", "export", "register")

# `contrastive`, except that the first pretraining stops after its first epoch's checkpoint and
# exits 1, as a killed worker would. Put first on PATH for the first run only.
CRASH_ONCE = """#!{python}
import sys
from pathlib import Path

from contrastive.cli import main

crashed = Path({marker!r})
if sys.argv[1:] == ["pretrain"] and not crashed.exists():
    from contrastive.config import load_params
    from contrastive.layout import Layout
    from contrastive.stages import pretrain

    crashed.touch()
    pretrain.run(load_params(), Layout(), stop_after_epoch=1)
    sys.exit(1)
sys.exit(main())
"""


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[None]:
    """One temporary Prefect server for the session (about 14 s to start)."""
    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, prefect_api: None,
            mlflow_template: Path) -> Iterator[Path]:
    """A git + DVC project with this repository's dvc.yaml, .dvcignore and code, the tiny params,
    its MLflow store (a new SQLite file: a copy of the migrated template) in another temporary
    folder, and no delay before a retry."""
    root = tmp_path_factory.mktemp("flow")
    store = new_store(mlflow_template, tmp_path_factory.mktemp("flow-mlflow"))
    make_dvc_project(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        patch.setenv("RETRAIN_RETRY_DELAY_S", "0")
        yield root


@pytest.fixture(scope="module")
def first_run(project: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[State, str]:
    """The first retrain, with ``train.epochs=2`` (the tiny params have 3) and a pretraining that
    crashes after its first epoch: the run's final state and its log."""
    bin_dir = tmp_path_factory.mktemp("bin")
    wrapper = bin_dir / "contrastive"
    marker = bin_dir / "crashed"
    wrapper.write_text(CRASH_ONCE.format(python=sys.executable, marker=str(marker)))
    wrapper.chmod(0o755)
    logs = _LogLines()
    logging.getLogger("prefect").addHandler(logs)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(stages, "BIN_DIR", bin_dir)
            state = retrain(params={"train.epochs": 2}, project=str(project), return_state=True)
    finally:
        logging.getLogger("prefect").removeHandler(logs)
    assert marker.exists(), "the crashing `contrastive` was not used"
    return state, "\n".join(logs.lines)


def test_first_run_runs_every_stage_and_publishes_its_summary(
    first_run: tuple[State, str], project: Path
) -> None:
    state, _ = first_run
    result: RetrainResult = state.result()
    names = stages.stage_names(project)
    assert [stage.name for stage in result.stages] == names
    assert {stage.status for stage in result.stages} == {"ran"}
    assert result.headline == "ran " + ", ".join(names) and not result.up_to_date
    assert (project / "models" / "encoder.onnx").is_file()
    if "register" in names:  # the first model becomes the champion
        assert result.registered and result.registration is not None
        assert (result.registration.version, result.registration.decision) == (1, "promoted")

    summary, table = _artifacts(state.state_details.flow_run_id)
    assert summary == markdown(result)
    assert summary.startswith(f"# Retrain: ran {', '.join(names)}\n")
    for name in names:
        assert f"| {name} | ran |" in summary
    linear_top1 = json.loads((project / "metrics" / "probe.json").read_text())["pretrained"][
        "linear_top1"
    ]
    assert result.metrics["probe.pretrained.linear_top1"] == pytest.approx(linear_top1)
    assert {"metric": "probe.pretrained.linear_top1", "value": linear_top1} in table


def test_failed_pretraining_is_retried_and_resumes_from_its_checkpoint(
    first_run: tuple[State, str], project: Path
) -> None:
    state, logs = first_run
    pretrain = next(stage for stage in state.result().stages if stage.name == "pretrain")
    assert pretrain.status == "ran" and pretrain.attempts == 2
    assert "resuming from checkpoints/last.pt after epoch 1" in logs
    history = (project / "plots" / "pretrain.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history] == ["epoch", "1", "2"]


def test_params_overrides_are_applied_as_a_dvc_experiment(
    first_run: tuple[State, str], project: Path
) -> None:
    result: RetrainResult = first_run[0].result()
    assert result.overrides == ["train.epochs=2"]
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["epochs"] == 2
    assert json.loads((project / "metrics" / "pretrain.json").read_text())["epochs"] == 2
    assert result.experiment and result.experiment.startswith("retrain-")
    listed = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "list", "--name-only"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.experiment in listed.stdout.split()

    # a bad value stops the run before anything changes
    with pytest.raises(ConfigError, match="train.epochs"):
        retrain(params={"train.epochs": 0}, project=str(project))
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["epochs"] == 2


def test_the_task_graph_runs_the_stages_in_order(first_run: tuple[State, str]) -> None:
    """Each stage's task waits for the one before it: the run's graph has an edge per step."""
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[
                first_run[0].state_details.flow_run_id])))
    # stage tasks are named after their stage; the others "set_params-<suffix>"
    by_id = {run.id: run.name if run.name in STAGE_NAMES else run.name.rsplit("-", 1)[0]
             for run in tasks}
    latest = {by_id[run.id]: run for run in tasks}
    order = [name for name in STAGE_NAMES if name in latest]
    assert order == list(STAGE_NAMES)
    for before, after in zip(order, order[1:], strict=False):
        waits = [by_id.get(i.id) for i in latest[after].task_inputs.get("wait_for", [])]
        assert waits == [before], (after, waits)
    first = [by_id.get(i.id) for i in latest[order[0]].task_inputs.get("wait_for", [])]
    assert first == ["set_params"]  # the overrides come first


def test_a_failed_stage_fails_the_run_with_its_error_in_the_summary(project: Path) -> None:
    params_file = project / "params.yaml"
    good = params_file.read_text()
    params = yaml.safe_load(good)
    params["train"]["lr"] = -1  # pretrain refuses it: exit 2, not retried
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        state = retrain(project=str(project), return_state=True)
    finally:
        params_file.write_text(good)
    assert state.is_failed()
    summary, _ = _artifacts(state.state_details.flow_run_id)
    assert summary.startswith("# Retrain: failed in stage pretrain\n")
    (row,) = [line for line in summary.splitlines() if line.startswith("| pretrain |")]
    assert ("| pretrain | failed: dvc repro pretrain: contrastive pretrain: error: params.yaml: "
            "train.lr: " in row)
    assert "| probe |" not in summary  # nothing after the failed stage ran


def test_second_run_is_up_to_date_and_registers_nothing(
    first_run: tuple[State, str], project: Path
) -> None:
    state = retrain(project=str(project), return_state=True)
    result: RetrainResult = state.result()
    assert {stage.status for stage in result.stages} == {"up to date"}
    assert result.up_to_date and not result.registered and result.headline == "up to date"
    summary, _ = _artifacts(state.state_details.flow_run_id)
    assert summary.startswith("# Retrain: up to date\n\nNothing changed")


def test_a_second_retrain_is_cancelled_while_one_holds_the_workspace(project: Path) -> None:
    with workspace_lock(project):
        state = retrain(project=str(project), return_state=True)
    assert state.is_cancelled()
    assert "another retrain is running" in (state.message or "")


def test_served_deployment_has_the_cron_schedule_and_runs_one_at_a_time(project: Path) -> None:
    deployment_id = scheduled_deployment(project).apply()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(deployment_id)
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 3 * * 1" and schedule.schedule.timezone == "UTC"
    assert deployment.global_concurrency_limit is not None
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.parameters == {"project": str(project)}


def test_prefect_yaml_deploys_with_the_schedule_of_params_yaml(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["schedule"] = {"cron": "30 4 * * 2", "timezone": "Europe/Paris"}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(ROOT / "pipeline", project / "pipeline")
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="contrastive-process", type="process"))
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    deploy = [sys.executable, "-m", "prefect", "--no-prompt", "deploy"]
    done = subprocess.run(
        [*deploy, "--prefect-file", "pipeline/prefect.yaml", "--name", "scheduled"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("retrain/scheduled")
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "30 4 * * 2"
    assert schedule.schedule.timezone == "Europe/Paris"
    assert deployment.global_concurrency_limit is not None
    assert deployment.global_concurrency_limit.limit == 1
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}
    ]

    # a run of the deployment, picked up and run by a process worker
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run_from_deployment(deployment.id)
    worker = [sys.executable, "-m", "prefect", "worker", "start", "--pool",
              "contrastive-process", "--run-once"]
    done = subprocess.run(worker, cwd=project, env=env, capture_output=True, text=True,
                          check=False, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    with get_client(sync_client=True) as client:
        finished = client.read_flow_run(flow_run.id)
    assert finished.state is not None and finished.state.is_completed(), done.stdout
    summary, _ = _artifacts(flow_run.id)
    assert summary.startswith("# Retrain: up to date")


def test_a_stage_that_rejects_its_params_or_data_is_not_retried() -> None:
    def worth_retrying(error: Exception) -> bool:
        return _worth_retrying(run_stage, None, Failed(data=error))  # type: ignore[arg-type]

    assert not worth_retrying(stages.DvcFailed("bad params or data", exit_status=2))
    assert worth_retrying(stages.DvcFailed("killed", exit_status=1))
    assert worth_retrying(stages.DvcFailed("dvc lock taken"))
    assert worth_retrying(TimeoutError("the attempt timed out"))


def test_settings_come_from_the_environment() -> None:
    assert Settings.from_env({}) == Settings()
    settings = Settings.from_env({"RETRAIN_PRETRAIN_RETRIES": "5", "RETRAIN_LOCK_WAIT_S": "1.5"})
    assert (settings.pretrain_retries, settings.lock_wait_s) == (5, 1.5)
    with pytest.raises(ValueError, match="RETRAIN_PRETRAIN_RETRIES must be >= 0"):
        Settings.from_env({"RETRAIN_PRETRAIN_RETRIES": "two"})


class _LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _artifacts(flow_run_id: UUID | None) -> tuple[str, list[dict[str, object]]]:
    """The run's Markdown summary and its metrics table."""
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_key = {artifact.key: artifact.data for artifact in artifacts}
    table = by_key["retrain-metrics"]
    return str(by_key["retrain-summary"]), json.loads(table) if isinstance(table, str) else table


@pytest.mark.parametrize("command", ["run", "serve"])
def test_a_prefect_api_url_where_nothing_listens_is_one_line_and_exit_2(
    command: str, tmp_path: Path
) -> None:
    """``python -m pipeline.retrain`` (``make retrain`` / ``make serve``) with a PREFECT_API_URL
    where nothing listens: one line naming the setting, exit status 2, the project untouched."""
    make_dvc_project(tmp_path)
    before = sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*"))
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {**os.environ, "PREFECT_API_URL": url, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.retrain", command, "--project", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    lines = done.stderr.strip().splitlines()
    assert (done.returncode, done.stdout, len(lines)) == (2, "", 1), done.stderr
    assert lines[0].startswith(
        f"retrain: error: PREFECT_API_URL: no Prefect server answers at {url} after 3 tries ("
    )
    assert lines[0].endswith(
        "start it (prefect server start) or fix the URL, or unset it for a temporary local server"
    )
    assert sorted(path.relative_to(tmp_path) for path in tmp_path.rglob("*")) == before


def test_refresh_checks_the_dvc_remote_before_it_pulls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--refresh`` with an s3 remote that has no credentials: the remote check's one line
    (exit status 2: not retried), before any ``dvc`` command runs."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    project = tmp_path / "project"
    (project / ".dvc").mkdir(parents=True)
    (project / ".dvc" / "config").write_text(
        "[core]\n    remote = storage\n    no_scm = true\n"
        "['remote \"storage\"']\n    url = s3://bucket/dvc\n"
    )
    ran: list[list[str]] = []
    monkeypatch.setattr(stages, "run_dvc", lambda args, *_: ran.append(args) or "")
    with pytest.raises(stages.DvcFailed) as failed:
        stages.refresh_sources(project, logging.getLogger("test"))
    assert failed.value.exit_status == 2 and ran == []
    assert str(failed.value).startswith(
        "dvc pull: DVC remote 'storage' (s3://bucket/dvc) has no credentials: set "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    )


def test_the_summary_gives_the_figure_the_gate_ranked_by(tmp_path: Path) -> None:
    from pipeline.report import Registration

    report = {"version": 3, "decision": "kept", "reason": "too small a gain", "run_id": "r1",
              "tracking_uri": "sqlite:///mlflow.db", "gate_metric": "zero_shot_top1",
              "linear_top1": 0.9, "zero_shot_top1": 0.61,
              "champion": {"version": 2, "zero_shot_top1": 0.6}}
    (tmp_path / "registry.json").write_text(json.dumps(report))
    result = RetrainResult([], {}, Registration.read(tmp_path / "registry.json"), 1.0)
    assert "Zero-shot top-1 0.6100 against the champion's 0.6000 (version 2)" in markdown(result)
