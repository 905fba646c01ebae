"""The MLflow store: where it is, opening it, one writer at a time, and failures as one line.

The store is ``MLFLOW_TRACKING_URI`` when set, else the embedded ``sqlite:///mlflow.db`` in the
project with artifacts in ``mlartifacts/`` beside it. Every MLflow call that can fail because of
the store (server unreachable, SQLite locked, registry error) runs inside :func:`mlflow_errors`,
which turns the failure into one :class:`TrackingError` line saying what failed and how to retry.
Changes to the registry happen one at a time (:func:`registry_lock`): a file lock serialises the
processes of one machine, and a lease on the store itself those of every machine sharing a
tracking server or a database.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import random
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlsplit, urlunsplit

from contrastive.config import ConfigError, Params, StageFailed, flatten

DEFAULT_DB = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
LOCK_TIMEOUT_S = 600
SERVER_ATTEMPTS = 3
REFUSED_CREDENTIALS = ("password authentication failed", "Access denied for user")
"""What PostgreSQL and MySQL say when a database store's URI has a wrong user or password: a
setting to fix (exit 2), not a failure to retry."""
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
"""Tracking URIs that name a database server (``postgresql://`` or ``postgresql+psycopg2://``)."""
SHARED_STORES = ("http://", "https://", *DATABASE_SCHEMES)
"""Stores that several machines may use at once: a tracking server, a database server."""
BUCKET_PROBE = "contrastive-bucket-check"
"""A path under an experiment's artifact location that nothing writes: listing it costs one
request and answers whether the location's bucket exists."""
LEASE_SUFFIX = ".lock"
LEASE_STALE_S = 1800
"""A lease older than this was abandoned (its holder died without deleting it) and may be broken.
It must exceed the longest registration (both models uploaded, the champion re-scored): a
registration still running after this long may lose its lease to a waiter."""

log = logging.getLogger(__name__)


class TrackingError(StageFailed):
    """The MLflow store failed (unreachable, locked, refused a write); the pipeline is intact."""


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's embedded SQLite store (absolute path)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_DB).resolve()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) else None


def artifact_location(uri: str) -> str | None:
    """Where new experiments keep artifacts: ``mlartifacts/`` beside a SQLite file; a server's
    own default otherwise (None)."""
    db = sqlite_path(uri)
    return (db.resolve().parent / ARTIFACT_DIR).as_uri() if db else None


def connect(uri: str | None = None, must_exist: bool = False) -> Any:
    """Point MLflow at ``uri`` (default :func:`tracking_uri`) and return an ``MlflowClient``.

    ``must_exist`` is for read-only commands: a missing SQLite file is a :class:`ConfigError`
    instead of a new, empty store. Opening a new store creates its schema, which two processes
    must not do at once: whoever may open a new store holds :func:`store_lock` while connecting.
    """
    import mlflow

    uri = uri or tracking_uri()
    db = sqlite_path(uri)
    if must_exist and db is not None and not db.is_file():
        raise ConfigError(
            f"no MLflow store at {db}; run the pipeline first (make run) or set MLFLOW_TRACKING_URI"
        )
    if uri.startswith(("http://", "https://")):
        check_server(uri)
    elif uri.startswith(DATABASE_SCHEMES):
        check_database(uri)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema-migration chatter
    mlflow.set_tracking_uri(uri)
    with mlflow_errors("opening the MLflow store", uri):
        return mlflow.MlflowClient(tracking_uri=uri)


def check_server(uri: str, attempts: int = SERVER_ATTEMPTS, wait_s: float = 2.0) -> None:
    """Fail fast, with one line naming ``MLFLOW_TRACKING_URI``, when no server answers at ``uri``.

    MLflow's client would retry a refused connection for minutes before failing. Nothing is
    written before this check.
    """
    check_answers(uri, "MLFLOW_TRACKING_URI", "MLflow server", "start the server or fix the URI",
                  attempts, wait_s)


def check_answers(url: str, setting: str, server: str, remedy: str,
                  attempts: int = SERVER_ATTEMPTS, wait_s: float = 2.0) -> None:
    """Raise :class:`ConfigError`, one line naming ``setting``, when no ``server`` answers at
    ``url`` (its ``/health``). A server that answers at all (even 401 without credentials)
    passes; one that is only slow gets ``attempts`` tries of 10 s each, ``wait_s`` apart."""
    import requests

    error: Exception | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(wait_s)
        try:
            requests.get(f"{url.rstrip('/')}/health", timeout=10)
            return
        except requests.RequestException as exc:
            error = exc
    assert error is not None
    raise ConfigError(
        f"{setting}: no {server} answers at {display_uri(url)} after {attempts} tries "
        f"({first_line(error, 120)}); {remedy}"
    )


def check_database(uri: str) -> None:
    """Fail at once, with one line naming ``MLFLOW_TRACKING_URI`` and no password, when the
    database of a ``postgresql://`` (or MySQL, SQL Server) store refuses the connection: MLflow
    itself would retry for about 100 s and print each attempt's traceback."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        raise ConfigError(f"MLFLOW_TRACKING_URI: {display_uri(uri)}: {first_line(exc)}") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as exc:
        cause = str(getattr(exc, "orig", exc) or exc).strip().splitlines()
        why = ("refused its user or password" if any(s in str(exc) for s in REFUSED_CREDENTIALS)
               else f"cannot be reached ({cause[0] if cause else type(exc).__name__})")
        raise ConfigError(f"MLFLOW_TRACKING_URI: the store at {display_uri(uri)} {why}; fix the "
                          "URI or its credentials") from None
    finally:
        engine.dispose()


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, shortened: what an error line can hold."""
    text = str(exc).strip().splitlines()
    message = f"{type(exc).__name__}: {text[0] if text else ''}"
    return message if len(message) <= limit else message[: limit - 3] + "..."


@contextmanager
def mlflow_errors(action: str, uri: str | None = None) -> Iterator[None]:
    """Turn a store failure inside the block into one :class:`TrackingError` line with a retry hint.

    ``ConfigError`` and ``StageFailed`` pass through: they already say what is wrong.
    """
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (ConfigError, StageFailed):
        raise
    except (MlflowException, requests.RequestException, sqlalchemy.exc.SQLAlchemyError,
            OSError) as exc:
        if any(sign in str(exc) for sign in REFUSED_CREDENTIALS):
            raise ConfigError(
                f"MLFLOW_TRACKING_URI: the store at {display_uri(uri or tracking_uri())} refused "
                "its user or password; fix the credentials in the URI (or the environment)"
            ) from None
        raise TrackingError(
            f"{action} failed at {display_uri(uri or tracking_uri())}: {first_line(exc)}. The "
            "pipeline's files are intact. Fix the store (server up? SQLite file free?) and retry; "
            "`dvc repro` or `contrastive register` then reuses the run and version already "
            "recorded"
        ) from exc


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold a file lock for the store while registering, so registrations happen one at a time.

    The lock sits beside a SQLite file, or in the temporary folder keyed by the URI for a server.
    It serialises every process on this machine (and on any machine sharing the SQLite folder);
    for processes on other machines that use the same server, :func:`registry_lock` adds a lease.
    """
    from filelock import FileLock, Timeout

    db = sqlite_path(uri)
    if db is not None:
        path = db.with_name(db.name + ".lock")
    else:
        key = hashlib.sha256(uri.encode()).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"contrastive-registry-{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=LOCK_TIMEOUT_S)
    except Timeout:
        raise TrackingError(
            f"another registration held {path} for {LOCK_TIMEOUT_S} s; retry when it has finished"
        ) from None
    try:
        yield
    finally:
        lock.release()


@contextmanager
def registry_lock(uri: str, name: str, client: Any | None = None) -> Iterator[Any]:
    """Hold the store for a change to registered model ``name``: :func:`store_lock` on this
    machine and, when the store is shared (:data:`SHARED_STORES`), :func:`lease` on the store.

    Yields ``client``, or, without one, a client connected under the file lock (opening a new
    store creates its schema, which two processes must not do at once).
    """
    with store_lock(uri), ExitStack() as stack:
        client = client or connect(uri)
        if uri.startswith(SHARED_STORES):
            stack.enter_context(lease(client, f"{name}{LEASE_SUFFIX}", uri))
        yield client


@contextmanager
def lease(client: Any, lock: str, uri: str) -> Iterator[None]:
    """Hold registered model ``lock`` on the store, so one process at a time holds it, from any
    machine: the store refuses a second model of the same name, so creating it is atomic.

    The lease has no versions; its tags say who holds it (owner, host, pid, acquired_at). A
    waiter retries with growing pauses for up to :data:`LOCK_TIMEOUT_S`. The holder deletes the
    lease when done; if it cannot (the store went down), the lease counts as abandoned, and is
    broken with a WARNING, once its process on this machine has ended, or from any machine once
    it is older than :data:`LEASE_STALE_S`. Breaking is not atomic: two waiters breaking the
    same lease at the same instant could both go on, which only an abandoned lease makes possible.
    """
    from mlflow.exceptions import MlflowException

    tags = {
        "owner": getpass.getuser(),
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "acquired_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    note = "A lease, not a model: held by `contrastive` while it changes the registry."
    deadline, pause = time.monotonic() + LOCK_TIMEOUT_S, 0.1
    with mlflow_errors(f"taking the lease {lock}", uri):
        while True:
            try:
                client.create_registered_model(lock, tags=tags, description=note)
                break
            except MlflowException as exc:  # held; or released while the store looked
                if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                    raise
            holder = _lease_holder(client, lock)
            if holder is None:
                continue  # released while the store looked: try again at once
            why = _abandoned(holder)
            if why:
                log.warning(
                    "broke the abandoned lease %s at %s (%s; held by %s)",
                    lock,
                    display_uri(uri),
                    why,
                    _held_by(holder),
                )
                _break(client, lock, holder)
                continue
            if time.monotonic() > deadline:
                raise TrackingError(
                    f"{lock} at {display_uri(uri)}: another registration holds it (held by "
                    f"{_held_by(holder)}); gave up after {LOCK_TIMEOUT_S} s. Retry when it has "
                    f"finished (a lease whose holder died is broken after {LEASE_STALE_S} s)"
                )
            time.sleep(pause * random.uniform(1, 1.5))  # jitter: waiters spread out
            pause = min(2 * pause, 5.0)
    try:
        yield
    finally:
        try:
            client.delete_registered_model(lock)
        except Exception as exc:  # the store failed: the lease is broken later as abandoned
            log.warning(
                "could not release the lease %s at %s (%s); it is broken when abandoned",
                lock,
                display_uri(uri),
                first_line(exc),
            )


def _lease_holder(client: Any, lock: str) -> Any | None:
    """The registered model that is the lease, or None when nobody holds it."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(lock)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _abandoned(holder: Any) -> str | None:
    """Why the lease ``holder`` was abandoned, or None while its holder may still be working."""
    age = time.time() - holder.creation_timestamp / 1000  # the store's clock against ours
    if age > LEASE_STALE_S:
        return f"{age:.0f} s old, more than {LEASE_STALE_S} s"
    tags = holder.tags
    if tags.get("host") == socket.gethostname() and not _running(tags.get("pid", "")):
        return "its process on this machine has ended"
    return None


def _running(pid: str) -> bool:
    """Whether process ``pid`` of this machine is running (unknown counts as running)."""
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):  # no pid; or another user's process
        pass
    return True


def _held_by(holder: Any) -> str:
    """Who holds the lease, from its tags: ``user on host, pid 123, since <time>``."""
    tags = holder.tags
    return (
        f"{tags.get('owner', '?')} on {tags.get('host', '?')}, pid {tags.get('pid', '?')}, "
        f"since {tags.get('acquired_at', '?')}"
    )


def _break(client: Any, lock: str, holder: Any) -> None:
    """Delete the abandoned lease ``holder``, unless another waiter broke it and took the lease
    meanwhile (a lease of another creation time)."""
    from mlflow.exceptions import MlflowException

    current = _lease_holder(client, lock)
    if current is None or current.creation_timestamp != holder.creation_timestamp:
        return
    try:
        client.delete_registered_model(lock)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def ensure_experiment(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created (with local artifacts for SQLite) when missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise ConfigError(
                f"registry.experiment: '{name}' is deleted in {uri}; restore it "
                "(mlflow experiments restore) or choose another name"
            )
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(uri))


def check_artifact_store(client: Any, experiment_id: str) -> None:
    """Fail before anything is written, with one line naming the setting, when the experiment's
    artifacts would go to a bucket that does not exist.

    The setting is the MLflow server's ``--artifacts-destination`` when the server stores the
    artifacts (an ``mlflow-artifacts:`` location); else the experiment's artifact location (from
    the server's ``--default-artifact-root``, or given when the experiment was made), which this
    process writes to itself, at ``MLFLOW_S3_ENDPOINT_URL`` when set. A missing bucket answers
    RESOURCE_DOES_NOT_EXIST, which a missing folder in a bucket does not; any other failure is
    left to :func:`mlflow_errors`.
    """
    import mlflow

    experiment = client.get_experiment(experiment_id)
    location = experiment.artifact_location
    try:
        mlflow.artifacts.list_artifacts(artifact_uri=f"{location.rstrip('/')}/{BUCKET_PROBE}")
    except Exception as exc:
        text = f"{getattr(exc, 'error_code', '')} {exc}"  # a server's answer is in the text
        if "RESOURCE_DOES_NOT_EXIST" not in text:
            raise
        if location.startswith("mlflow-artifacts:"):  # the server writes: its own setting
            named = re.search(r"artifacts in (\S+?): ", text)  # the server names it
            destination = named[1] if named else "?"
            setting = (
                "the MLflow server's artifact destination (mlflow server --artifacts-destination)"
            )
        else:
            endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL")
            destination = location
            setting = f"the artifact location of experiment '{experiment.name}'"
            setting += f" (at MLFLOW_S3_ENDPOINT_URL {endpoint})" if endpoint else ""
        raise ConfigError(
            f"{setting} is {destination}, and its bucket '{urlparse(destination).netloc}' does "
            "not exist; create the bucket or change the setting (no run or version was recorded)"
        ) from None


def logged_params(params: Params) -> dict[str, str]:
    """The params as runs record them: flat keys (``train.lr``), lists and mappings as JSON."""
    return {
        k: json.dumps(v) if isinstance(v, list | dict) else str(v)
        for k, v in flatten(params).items()
    }


def display_uri(uri: str, root: str | Path = ".") -> str:
    """``uri`` as a committed report may show it: a local store (a SQLite file, a ``file:`` URI or
    a bare folder) inside ``root`` relative to it, elsewhere as ``.../NAME`` (no path of this
    machine); a server without credentials (``user:password@``) or query (``?token=``)."""
    db = sqlite_path(uri)
    scheme, sep, rest = uri.partition("://")
    if db is not None or scheme == "file" or not sep:
        local = db if db is not None else Path(rest if sep else uri)
        prefix = "sqlite:///" if db is not None else ("file:" if sep else "")
        try:
            return prefix + local.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            return f"{prefix}.../{local.name}"
    return without_credentials(uri)


def without_credentials(url: str) -> str:
    """``url`` without the user and password of its authority (``http://user:pw@host``) and
    without its query (``?token=...``), where secrets ride along."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query=""))
