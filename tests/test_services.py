"""The pipeline against the real services a team runs, each started here on 127.0.0.1:
PostgreSQL, an S3-compatible store (moto's server), and an ``mlflow server`` on both.

- ``dvc repro`` registers into the server unchanged; the model's artifacts land in S3;
- ``dvc push`` to a DVC remote in the same store, then ``dvc pull`` in a fresh clone restores every
  output, and ``dvc status`` finds nothing stale;
- two registrations racing from two processes lose and duplicate nothing, and ``champion`` ends
  on the better model, also when the processes share no file lock (two machines): the lease on
  the server serialises them;
- a server killed in the middle of ``contrastive register`` leaves the pipeline's files intact,
  and the rerun finishes without a second version;
- a server whose artifact destination names a bucket that does not exist: one line naming it,
  exit 2, no run and no version;
- no secret of the environment (S3 key, database password) reaches an MLflow param, tag,
  artifact, or the pipeline's output.

Run with ``make test-services`` (``pytest -m services``); ``make test`` leaves them out.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import yaml

from contrastive import store
from contrastive.config import load_params
from contrastive.provenance import _dvc_outputs
from contrastive.tracking import STATE_TAG, read_snapshot
from tests import services
from tests.conftest import make_dvc_project, write_params

pytestmark = pytest.mark.services
NAME = "contrastive-encoder"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """PostgreSQL, the S3 server with a bucket, and an MLflow server on both; the environment
    that points the pipeline at them (credentials only from the environment)."""
    root = tmp_path_factory.mktemp("services")
    env = {
        "AWS_ACCESS_KEY_ID": "contrastive-test",
        "AWS_SECRET_ACCESS_KEY": services.SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "PGPASSWORD": services.DB_PASSWORD,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",  # a dead server fails the register at once
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        with services.Postgres.running() as db, services.s3_server() as s3:
            services.make_bucket(s3)
            patch.setenv("MLFLOW_S3_ENDPOINT_URL", s3)
            server = services.MlflowServer(db.uri, f"s3://{services.BUCKET}/mlartifacts",
                                           root / "mlflow.log")
            server.start()
            patch.setenv("MLFLOW_TRACKING_URI", server.uri)
            try:
                yield {"s3": s3, "mlflow": server.uri, "db": db.uri, "server": server,
                       "log": str(root / "mlflow.log")}
            finally:
                server.stop()


def _run(args: list[str], cwd: Path, ok: bool = True, **kwargs: object) -> str:
    env = {**os.environ, "PATH": f"{services.BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False,
                          timeout=600, **kwargs)
    assert (done.returncode == 0) is ok, done.stdout + done.stderr
    return done.stdout + done.stderr


DVC = [sys.executable, "-m", "dvc"]
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
OUTPUTS: list[str] = []


def _hashes(project: Path) -> dict[str, str]:
    """sha256 of every file of every declared output, and of dvc.lock."""
    found = {}
    for declared in sorted(_dvc_outputs(project / "dvc.yaml") | {"dvc.lock"}):
        path = project / declared
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                found[file.relative_to(project).as_posix()] = hashlib.sha256(
                    file.read_bytes()).hexdigest()
    return found


def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


def versions() -> list:
    return client().search_model_versions(f"name = '{NAME}'")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, stack: dict[str, str]) -> Path:
    """A git + DVC project (tiny params) with a DVC remote in the S3 store, reproduced once."""
    root = tmp_path_factory.mktemp("project")
    make_dvc_project(root)
    _run([*DVC, "remote", "add", "-d", "storage", f"s3://{services.BUCKET}/dvc"], root)
    _run([*DVC, "remote", "modify", "storage", "endpointurl", stack["s3"]], root)
    output = _run([*DVC, "repro"], root)
    OUTPUTS.append(output)
    return root


def test_repro_registers_into_the_server_with_artifacts_in_s3(project: Path,
                                                             stack: dict[str, str]) -> None:
    report = json.loads((project / "reports" / "registry.json").read_text())
    assert report["decision"] == "promoted" and report["version"] == 1
    assert report["tracking_uri"] == stack["mlflow"]
    (version,) = versions()
    assert version.tags["gate.status"] == "done"
    assert client().get_model_version_by_alias(NAME, "champion").version == "1"
    keys = services.s3_keys(stack["s3"], "mlartifacts/")
    assert any(k.endswith("model_card.md") for k in keys)
    assert any(k.endswith(".onnx") for k in keys), keys[:20]
    assert "Running stage" not in _run([*DVC, "repro"], project)  # nothing stale after it


def test_push_then_pull_in_a_fresh_clone_restores_everything(project: Path,
                                                             tmp_path: Path) -> None:
    _run([*DVC, "push"], project)
    _run([*GIT, "add", "-A"], project)
    _run([*GIT, "commit", "-qm", "pipeline state"], project)
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "models" / "encoder.pt").exists()
    _run([*DVC, "pull"], clone)
    assert _hashes(clone) == _hashes(project)
    status = _run([*DVC, "status"], clone)
    assert "up to date" in status, status
    assert "Running stage" not in _run([*DVC, "repro"], clone)


def _variant(project: Path, tmp_path: Path, name: str, changes: dict[str, dict]) -> Path:
    """A copy of ``project`` with params changed and its stages run by the CLI (no DVC):
    another pipeline state, ready to register."""
    copy = tmp_path / name
    shutil.copytree(project, copy, ignore=shutil.ignore_patterns(".dvc", ".git", "checkpoints"))
    params = yaml.safe_load((copy / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    params["registry"]["min_improvement"] = 0.0  # the better model always wins
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    contrastive = str(services.BIN / "contrastive")
    stages = ["probe"] if set(changes) == {"probe"} else ["pretrain", "probe", "export"]
    for stage in stages:
        _run([contrastive, stage], copy)
    return copy


def _top1(project: Path) -> float:
    return json.loads((project / "metrics" / "probe.json").read_text())["pretrained"][
        "linear_top1"]


def test_two_racing_registrations_lose_and_duplicate_nothing(project: Path,
                                                              tmp_path: Path) -> None:
    first = _variant(project, tmp_path, "a", {"train": {"epochs": 2}})
    second = _variant(project, tmp_path, "b", {"train": {"epochs": 4}})
    assert _top1(first) != _top1(second)
    before = len(versions())
    env = {**os.environ, "PATH": f"{services.BIN}{os.pathsep}{os.environ['PATH']}"}
    racing = [subprocess.Popen([str(services.BIN / "contrastive"), "register"], cwd=p, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for p in (first, second)]
    outputs = [r.communicate(timeout=600)[0] for r in racing]
    assert [r.returncode for r in racing] == [0, 0], outputs
    found = versions()
    assert len(found) == before + 2
    states = [v.tags[STATE_TAG] for v in found]
    assert len(set(states)) == len(states)  # no state registered twice
    best = max((first, second, project), key=_top1)
    best_state = read_snapshot(load_params(best / "params.yaml"), best).state_key
    champion = client().get_model_version_by_alias(NAME, "champion")
    assert champion.tags[STATE_TAG] == best_state
    for version in found:
        assert version.tags["gate.status"] == "done"


def test_racing_registrations_from_two_machines_are_serialised_by_the_server(
    project: Path, tmp_path: Path
) -> None:
    """Each process has its own temporary folder, so their file locks differ, as on two
    machines: only the lease on the server (the registered model ``<name>.lock``) serialises
    them. The second gate sees the champion the first left, and the lease is gone after."""
    first = _variant(project, tmp_path, "d", {"train": {"epochs": 5}})
    second = _variant(project, tmp_path, "e", {"train": {"epochs": 6}})
    states = {read_snapshot(load_params(p / "params.yaml"), p).state_key for p in (first, second)}
    before = {v.version for v in versions()}
    champion_before = client().get_model_version_by_alias(NAME, "champion").version
    racing = []
    for machine, folder in enumerate((first, second)):
        tmp = tmp_path / f"machine-{machine}"
        tmp.mkdir()
        env = {
            **os.environ,
            "TMPDIR": str(tmp),
            "PATH": f"{services.BIN}{os.pathsep}{os.environ['PATH']}",
        }
        racing.append(
            subprocess.Popen(
                [str(services.BIN / "contrastive"), "register"],
                cwd=folder,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [r.communicate(timeout=600)[0] for r in racing]
    assert [r.returncode for r in racing] == [0, 0], outputs
    for tmp in tmp_path.glob("machine-*"):  # the file locks were apart
        assert len(list(tmp.glob("contrastive-registry-*.lock"))) == 1

    new = sorted((v for v in versions() if v.version not in before), key=lambda v: int(v.version))
    assert len(new) == 2 and {v.tags[STATE_TAG] for v in new} == states  # none lost or doubled
    assert {v.tags["gate.status"] for v in new} == {"done"}
    earlier, later = new
    left = earlier.version if earlier.tags["gate.decision"] == "promoted" else champion_before
    assert later.tags["gate.compared_with"] == left  # the second gate saw the first's champion
    runs = sorted((client().get_run(v.run_id).info for v in new), key=lambda r: r.start_time)
    assert runs[0].end_time <= runs[1].start_time  # one registration after the other
    champion = client().get_model_version_by_alias(NAME, "champion")
    assert float(champion.tags["linear_top1"]) == max(
        float(v.tags["linear_top1"]) for v in versions()
    )
    assert NAME + store.LEASE_SUFFIX not in {m.name for m in client().search_registered_models()}


def test_a_missing_bucket_is_one_line_naming_it_and_records_nothing(
    project: Path, tmp_path: Path, stack: dict[str, str]
) -> None:
    """An ``mlflow server`` whose ``--artifacts-destination`` names a bucket that the S3 server
    does not have: exit 2, one line naming the bucket and the setting, the pipeline's files as
    they were, and no run, no version, no lease left on the server."""
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, ignore=shutil.ignore_patterns(".dvc", ".git", "checkpoints"))
    before = _hashes(copy)
    assert "reports/registry.json" in before  # the earlier report stays as it was
    server = services.MlflowServer(
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        "s3://no-such-bucket/mlartifacts",
        tmp_path / "mlflow.log",
    )
    server.start()
    try:
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.uri}
        done = subprocess.run(
            [str(services.BIN / "contrastive"), "register"],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        other = mlflow.MlflowClient(tracking_uri=server.uri)
        experiment = other.get_experiment_by_name("contrastive")
        runs = other.search_runs([experiment.experiment_id]) if experiment else []
        models = other.search_registered_models()
    finally:
        server.stop()
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stdout + done.stderr
    assert lines[0].startswith(
        "contrastive register: error: the MLflow server's artifact destination (mlflow server "
        "--artifacts-destination) is s3://no-such-bucket/mlartifacts, and its bucket "
        "'no-such-bucket' does not exist"
    ), lines
    assert runs == [] and models == []
    assert _hashes(copy) == before


def test_server_killed_mid_register_then_rerun_finishes_once(
    project: Path, tmp_path: Path, stack: dict[str, str]
) -> None:
    variant = _variant(project, tmp_path, "c", {"probe": {"knn_k": 15}})
    state = read_snapshot(load_params(variant / "params.yaml"), variant).state_key
    before = _hashes(variant)
    server: services.MlflowServer = stack["server"]  # type: ignore[assignment]
    experiment = client().get_experiment_by_name("contrastive").experiment_id
    env = {**os.environ, "PATH": f"{services.BIN}{os.pathsep}{os.environ['PATH']}"}
    register = subprocess.Popen(
        [str(services.BIN / "contrastive"), "register"],
        cwd=variant,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        services.wait_until(
            lambda: client().search_runs([experiment], f"tags.{STATE_TAG} = '{state}'"),
            "the register's run",
            register,
            300,
        )
        server.kill()
        output = register.communicate(timeout=300)[0]
    finally:
        if register.poll() is None:
            register.kill()
        if server.process is None or server.process.poll() is not None:
            server.start()
    assert register.returncode == 1, output
    failure = [line for line in output.splitlines() if line.startswith("contrastive register:")]
    assert len(failure) == 1 and "files are intact" in failure[0], output
    assert _hashes(variant) == before  # the pipeline's files, the old registry report included

    _run([str(services.BIN / "contrastive"), "register"], variant)
    mine = [v for v in versions() if v.tags[STATE_TAG] == state]
    assert len(mine) == 1 and mine[0].tags["gate.status"] == "done"
    runs = client().search_runs([experiment], f"tags.{STATE_TAG} = '{state}'")
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_no_secret_reaches_mlflow(project: Path, tmp_path: Path, stack: dict[str, str]) -> None:
    """Every param, tag and artifact of every run and version, and the pipeline's output."""
    secrets = (services.SECRET_KEY, services.DB_PASSWORD)
    c = client()
    experiment = c.get_experiment_by_name("contrastive").experiment_id
    runs = c.search_runs([experiment])
    assert runs
    texts: list[str] = list(OUTPUTS)
    for run in runs:
        texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
        folder = tmp_path / run.info.run_id
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(folder))
        for file in folder.rglob("*"):
            if file.is_file():
                texts.append(file.read_bytes().decode(errors="replace"))
    for version in versions():
        texts += [json.dumps(version.tags), version.description or ""]
    texts.append(json.dumps(c.get_registered_model(NAME).tags))
    for text in texts:
        for secret in secrets:
            assert secret not in text
    assert len(texts) > 20


def test_wrong_database_password_is_one_line_naming_the_setting(stack: dict[str, str],
                                                                tmp_path: Path) -> None:
    """A store URI whose password PostgreSQL refuses: exit 2, one line, no password shown."""
    wrong = stack["db"].replace(services.DB_PASSWORD, "wrong-password")
    write_params(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": wrong}
    done = subprocess.run([str(services.BIN / "contrastive"), "registry", "list", "--params",
                           str(tmp_path / "params.yaml")], env=env, capture_output=True,
                          text=True, check=False, timeout=300, cwd=tmp_path)
    write = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(write) == 1, done.stderr
    assert write[0].startswith("contrastive registry: error: MLFLOW_TRACKING_URI: the store at "
                               "postgresql+psycopg2://127.0.0.1:")
    assert "refused its user or password" in write[0]
    assert "wrong-password" not in done.stderr + done.stdout


@pytest.fixture(scope="module")
def s3_alone() -> Iterator[str]:
    """moto's S3 server by itself (no database, no MLflow server): its endpoint URL."""
    with services.s3_server() as url:
        yield url


def test_remote_check_names_the_missing_setting_and_passes_with_credentials(
    s3_alone: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``contrastive remote check`` (``make push`` / ``make pull`` run it first) against a real
    S3 server: no credentials, then a missing bucket, are one line naming the remote and the
    setting, exit 2; with keys from the environment or from ``.dvc/config.local``, exit 0. No
    secret is ever printed."""
    project, bucket = tmp_path / "project", "remote-check"
    project.mkdir()
    _run(["git", "init", "-q"], project)
    _run([*DVC, "init", "-q"], project)
    _run([*DVC, "remote", "add", "-d", "storage", f"s3://{bucket}/dvc"], project)
    _run([*DVC, "remote", "modify", "storage", "endpointurl", s3_alone], project)
    bare = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    bare |= {
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
    }
    keys = {"AWS_ACCESS_KEY_ID": "contrastive-test", "AWS_SECRET_ACCESS_KEY": services.SECRET_KEY}

    def check(env: dict[str, str]) -> tuple[int, str, list[str]]:
        done = subprocess.run(
            [sys.executable, "-m", "contrastive.cli", "remote", "check"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert services.SECRET_KEY not in done.stdout + done.stderr
        return done.returncode, done.stdout, done.stderr.strip().splitlines()

    label = f"contrastive remote: error: DVC remote 'storage' (s3://{bucket}/dvc)"
    status, out, err = check(bare)
    assert (status, out, len(err)) == (2, "", 1), err
    assert err[0].startswith(
        f"{label} has no credentials: set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, or `dvc remote modify --local storage "
        "access_key_id ...`"
    ), err

    status, out, err = check(bare | keys)
    assert (status, out, len(err)) == (2, "", 1), err
    assert err[0].startswith(f"{label}: bucket '{bucket}' does not exist at {s3_alone}: "), err

    for key, value in keys.items():
        monkeypatch.setenv(key, value)
    services.make_bucket(s3_alone, bucket)
    answers = f"DVC remote 'storage' (s3://{bucket}/dvc): bucket '{bucket}' answers at {s3_alone}"
    status, out, err = check(bare | keys)
    assert (status, err) == (0, []), err
    assert out.strip() == f"{answers} (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"

    _run(
        [*DVC, "remote", "modify", "--local", "storage", "access_key_id", "contrastive-test"],
        project,
    )
    _run(
        [*DVC, "remote", "modify", "--local", "storage", "secret_access_key", services.SECRET_KEY],
        project,
    )
    status, out, err = check(bare)
    assert (status, err) == (0, []), err
    assert out.strip() == (
        f"{answers} (credentials from the remote's access_key_id / secret_access_key)"
    )


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real ``prefect server start`` on 127.0.0.1 with its own PREFECT_HOME and SQLite
    database in ``tmp_path``: its API URL and its home. Stopped as Ctrl-C stops it (SIGINT),
    which must end it cleanly: exit status 0 within 30 s."""
    home, port = tmp_path / "prefect-server", services.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_UI_ENABLED": "false",
    }
    log = tmp_path / "prefect-server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [
                str(services.BIN / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api"
    try:
        services.wait_until(
            lambda: services.answers(f"{url}/health"), "prefect server start", server, 180
        )
        yield url, home
        server.send_signal(signal.SIGINT)
        assert server.wait(30) == 0, log.read_text(errors="replace")[-3000:]
        assert "Server stopped!" in log.read_text(errors="replace")
    finally:
        services.stop(server)


def test_a_deployment_runs_from_a_standalone_prefect_server_through_a_process_worker(
    project: Path, prefect_server: tuple[str, Path], tmp_path: Path
) -> None:
    """The documented route (docs/deploy.md) against a real ``prefect server start``: a process
    work pool, ``prefect deploy`` from pipeline/prefect.yaml, a flow run of the deployment, and
    ``prefect worker start --run-once`` picks it up and runs the flow in the project (a copy of
    the reproduced one: every stage's task runs and finds its stage up to date). The run ends
    Completed, with one task per stage, each waiting for the one before."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, home = prefect_server
    assert (home / "prefect.db").is_file()  # the server's own SQLite database, in its home
    copy = tmp_path / "project"
    shutil.copytree(project, copy)
    shutil.copytree(
        Path(__file__).resolve().parents[1] / "pipeline",
        copy / "pipeline",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    env = {
        **os.environ,
        "PREFECT_API_URL": url,
        "PREFECT_HOME": str(tmp_path / "client-home"),
        "PATH": f"{services.BIN}{os.pathsep}{os.environ['PATH']}",
    }

    def prefect_cli(*args: str) -> str:
        done = subprocess.run(
            [str(services.BIN / "prefect"), *args],
            cwd=copy,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        return done.stdout + done.stderr

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as prefect:
        prefect.create_work_pool(WorkPoolCreate(name="contrastive-process", type="process"))
        prefect_cli(
            "--no-prompt",
            "deploy",
            "--prefect-file",
            "pipeline/prefect.yaml",
            "--name",
            "scheduled",
        )
        deployment = prefect.read_deployment_by_name("retrain/scheduled")
        assert deployment.work_pool_name == "contrastive-process"
        flow_run = prefect.create_flow_run_from_deployment(deployment.id)
        worker = prefect_cli("worker", "start", "--pool", "contrastive-process", "--run-once")
        finished = prefect.read_flow_run(flow_run.id)
        assert finished.state is not None and finished.state.is_completed(), worker[-3000:]
        tasks = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    stages = ["prepare", "pretrain", "probe", "export", "register"]
    by_name = {run.name: run for run in tasks}
    assert sorted(by_name) == sorted(stages) and len(tasks) == len(stages), sorted(by_name)
    ids = {run.id: run.name for run in tasks}
    for before, after in zip(stages, stages[1:], strict=False):
        waits = [ids.get(i.id) for i in by_name[after].task_inputs.get("wait_for", [])]
        assert waits == [before], (after, waits)
        assert by_name[before].end_time <= by_name[after].start_time
    assert all(run.state is not None and run.state.is_completed() for run in tasks)
