"""Real servers for the service tests, started as local processes on 127.0.0.1 and stopped after.

PostgreSQL (Debian's binaries: ``initdb``, ``pg_ctl``), an S3-compatible store (moto's standalone
server), and an ``mlflow server`` whose backend store is that database and whose artifacts go to
that bucket. No Docker engine is needed. PostgreSQL refuses to run as root: as root, the database
runs as the ``postgres`` user (which Debian's package creates).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

BIN = Path(sys.executable).absolute().parent
SECRET_KEY = "s3-secret-do-not-leak-7f3a"
DB_PASSWORD = "db-password-do-not-leak-91c2"
BUCKET = "contrastive"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: callable, what: str, process: subprocess.Popen | None = None,
               timeout_s: float = 120) -> None:
    """Poll ``check()`` until it is true; fail with ``what`` after ``timeout_s`` or if
    ``process`` ends first."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready after {timeout_s} s")
        time.sleep(0.5)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def stop(process: subprocess.Popen) -> None:
    """End a server started in its own session, and everything it started."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def postgres_bin() -> Path:
    """The folder of ``initdb`` and ``pg_ctl``: on PATH, else Debian's versioned folder."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not folders:
        raise RuntimeError("PostgreSQL is not installed (make test-services installs it)")
    return Path(folders[-1])


@dataclass
class Postgres:
    """A PostgreSQL cluster in ``folder``, on 127.0.0.1:``port``; MLflow uses its database
    ``postgres`` (the one initdb makes), as user ``mlflow`` with a password."""

    folder: Path
    port: int
    user: str = "mlflow"

    @property
    def uri(self) -> str:
        return f"postgresql+psycopg2://{self.user}:{DB_PASSWORD}@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=120)

    @classmethod
    @contextlib.contextmanager
    def running(cls) -> Iterator[Postgres]:
        """A new cluster in a folder of its own under the system temporary folder (as root, the
        ``postgres`` user could not enter pytest's private temporary folders); removed after."""
        folder = Path(tempfile.mkdtemp(prefix="contrastive-pg-"))
        try:
            db = cls(folder, free_port())
            (folder / "pw").write_text(DB_PASSWORD)
            if os.geteuid() == 0:
                shutil.chown(folder, "postgres", "postgres")
                shutil.chown(folder / "pw", "postgres", "postgres")
            pg, data = postgres_bin(), folder / "data"
            db._run(str(pg / "initdb"), "-D", str(data), "-U", db.user, "--pwfile",
                    str(folder / "pw"), "-A", "scram-sha-256", "--no-sync")
            options = f"-p {db.port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
            db._run(str(pg / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                    str(folder / "log"), "-w", "start")
            try:
                yield db
            finally:
                db._run(str(pg / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1; yields its endpoint URL. Any key pair is accepted."""
    port = free_port()
    process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: answers(url), "moto_server", process, 60)
        yield url
    finally:
        stop(process)


def make_bucket(endpoint: str, name: str = BUCKET) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)


def s3_keys(endpoint: str, prefix: str = "", bucket: str = BUCKET) -> list[str]:
    """Every object key under ``prefix`` in ``bucket``."""
    import boto3

    pages = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").get_paginator(
        "list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@dataclass
class MlflowServer:
    """``mlflow server`` on PostgreSQL with artifacts in S3; :meth:`start` again after
    :meth:`kill` restarts it on the same port."""

    backend: str
    artifacts: str
    log: Path
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.port = self.port or free_port()
        command = [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend,
                   "--artifacts-destination", self.artifacts, "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1"]
        # MLflow's job runner (huey consumers for GenAI jobs, which no test uses) would add
        # five polling processes per server to the 2 cores.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, env=env)
        try:
            wait_until(lambda: answers(f"{self.uri}/health"), "mlflow server", self.process, 180)
        except RuntimeError as exc:
            tail = self.log.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError("\n".join([str(exc), *tail])) from None

    def kill(self) -> None:
        """Stop the server at once, as a crash would."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
