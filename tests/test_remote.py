"""``contrastive remote check``: the DVC remote read from DVC's config, and one line with exit
status 2 naming the setting to fix when the remote has no credentials, half a key pair, an
unknown profile, or a bucket or endpoint that does not answer, without ever printing a secret.

Nothing here needs a server: the S3 remote of these tests points at a port where nothing listens
(tests/test_services.py checks the same command against a real S3 server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from contrastive.cli import main
from contrastive.remote import Remote, bucket_error, read_remote
from contrastive.store import without_credentials
from tests.conftest import ROOT
from tests.services import free_port

SECRET = "remote-secret-do-not-print-5d1e"


def dvc_project(root: Path, config: str = "", local: str = "") -> Path:
    """A folder DVC takes for a project: ``.dvc/config`` and ``.dvc/config.local`` (what
    ``dvc remote add`` and ``dvc remote modify --local`` write)."""
    (root / ".dvc").mkdir(parents=True)
    (root / ".dvc" / "config").write_text(config)
    if local:
        (root / ".dvc" / "config.local").write_text(local)
    return root


def s3_config(endpoint: str | None = None, name: str = "storage") -> str:
    lines = [
        f"[core]\n    remote = {name}\n",
        f"['remote \"{name}\"']\n    url = s3://bucket/dvc\n",
    ]
    if endpoint:
        lines.append(f"    endpointurl = {endpoint}\n")
    return "".join(lines)


@pytest.fixture
def no_aws(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No AWS credentials anywhere: no keys in the environment, no shared files, no profile, no
    instance role."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def run_check(project: Path, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    status = main(["remote", "check", "--project", str(project), *args])
    out, err = capsys.readouterr()
    return status, out, err


def one_error(status: int, out: str, err: str) -> str:
    """The single stderr line of a check that failed with exit status 2, with no secret."""
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and not out, (status, out, err)
    assert SECRET not in out + err
    assert lines[0].startswith("contrastive remote: error: ")
    return lines[0]


def test_the_remote_is_read_from_dvc_config_with_its_local_settings(tmp_path: Path) -> None:
    project = dvc_project(
        tmp_path,
        s3_config("http://127.0.0.1:9000"),
        f"['remote \"storage\"']\n    access_key_id = key\n    secret_access_key = {SECRET}\n",
    )
    (project / "sub" / "folder").mkdir(parents=True)
    remote = read_remote(project / "sub" / "folder")  # found from a folder inside, as DVC does
    assert (remote.name, remote.url, remote.scheme) == ("storage", "s3://bucket/dvc", "s3")
    assert remote.options["endpointurl"] == "http://127.0.0.1:9000"
    assert remote.options["secret_access_key"] == SECRET
    assert SECRET not in remote.label + repr(remote)


@pytest.mark.parametrize(
    ("config", "args", "expected"),
    [
        (None, [], "is not in a DVC project (no .dvc folder): run from the project's folder"),
        ("", [], "no DVC remote is configured: add one with `make remote DVC_REMOTE_URL="),
        ("['remote \"a\"']\n    url = s3://a/x\n", [], "no default DVC remote (configured: a)"),
        (s3_config(), ["--remote", "b"], "DVC remote 'b' is not configured (configured: storage)"),
        ("[core\n", [], "DVC config: "),
    ],
)
def test_a_missing_remote_is_one_line_naming_what_to_set(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    config: str | None,
    args: list[str],
    expected: str,
) -> None:
    project = tmp_path if config is None else dvc_project(tmp_path / "p", config)
    assert expected in one_error(*run_check(project, capsys, *args))


def test_no_credentials_names_the_remote_and_the_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_aws: None
) -> None:
    project = dvc_project(tmp_path / "p", s3_config("http://127.0.0.1:9"))
    line = one_error(*run_check(project, capsys))
    assert line == (
        "contrastive remote: error: DVC remote 'storage' (s3://bucket/dvc) has no credentials: "
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or `dvc remote modify --local storage "
        "access_key_id ...` and `secret_access_key ...` (or `profile`, `credentialpath`)"
    )


@pytest.mark.parametrize(
    ("local", "env", "expected"),
    [
        (
            f"    secret_access_key = {SECRET}\n",
            {},
            "has secret_access_key but no access_key_id: `dvc remote modify --local storage "
            "access_key_id ...`",
        ),
        ("    profile = nobody\n", {}, "the AWS profile of its `profile` setting is not in"),
        ("", {"AWS_PROFILE": "nobody"}, "the AWS profile of AWS_PROFILE is not in"),
        ("", {"AWS_ACCESS_KEY_ID": "key"}, "incomplete credentials (Partial credentials found"),
    ],
)
def test_half_credentials_and_unknown_profiles_are_named(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    no_aws: None,
    local: str,
    env: dict[str, str],
    expected: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    local_config = f"['remote \"storage\"']\n{local}" if local else ""
    project = dvc_project(tmp_path / "p", s3_config("http://127.0.0.1:9"), local_config)
    line = one_error(*run_check(project, capsys))
    assert line.startswith("contrastive remote: error: DVC remote 'storage' (s3://bucket/dvc)")
    assert expected in line


def test_an_endpoint_that_does_not_answer_names_endpointurl(
    tmp_path: Path, capsys: pytest.CaptureFixture, no_aws: None
) -> None:
    """Credentials from the remote's own settings (config.local); nothing listens at the
    endpoint: one line naming it and the setting, the secret not shown."""
    endpoint = f"http://user:{SECRET}@127.0.0.1:{free_port()}"
    local = f"['remote \"storage\"']\n    access_key_id = key\n    secret_access_key = {SECRET}\n"
    project = dvc_project(tmp_path / "p", s3_config(endpoint), local)
    line = one_error(*run_check(project, capsys))
    assert line.startswith(
        f"contrastive remote: error: DVC remote 'storage' (s3://bucket/dvc): no S3 server answers "
        f"at http://127.0.0.1:{endpoint.rsplit(':', 1)[1]} ("
    )
    assert line.endswith(
        "check the remote's endpointurl (`dvc remote modify storage endpointurl URL`)"
    )


def _client_error(code: str, status: int) -> ClientError:
    response = {
        "Error": {"Code": code, "Message": "x"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "HeadBucket")  # type: ignore[arg-type]


def test_bucket_errors_name_the_bucket_or_the_credentials() -> None:
    remote = Remote("storage", "s3://bucket/dvc", {"secret_access_key": SECRET})
    where, source = "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    missing = bucket_error(remote, "bucket", where, source, _client_error("404", 404))
    assert missing == (
        "DVC remote 'storage' (s3://bucket/dvc): bucket 'bucket' does not exist at "
        "http://127.0.0.1:9000: create it, or point the remote at another one (`dvc remote "
        "modify storage url s3://BUCKET/PATH`)"
    )
    refused = bucket_error(remote, "bucket", where, source, _client_error("403", 403))
    assert refused.startswith(
        "DVC remote 'storage' (s3://bucket/dvc): http://127.0.0.1:9000 refused access to bucket "
        "'bucket' with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (403): check"
    )
    other = bucket_error(remote, "bucket", where, source, _client_error("SlowDown", 503))
    assert "SlowDown (503)" in other
    assert all(SECRET not in text for text in (missing, refused, other))


def test_urls_lose_their_password() -> None:
    assert without_credentials("http://user:pw@host:9000/x") == "http://host:9000/x"
    assert without_credentials("s3://bucket/path") == "s3://bucket/path"


def test_other_remotes_are_only_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = "[core]\n    remote = backup\n['remote \"backup\"']\n    url = /srv/dvc-cache\n"
    status, out, err = run_check(dvc_project(tmp_path / "p", config), capsys)
    assert (status, err) == (0, "")
    assert out.strip() == (
        "DVC remote 'backup' (/srv/dvc-cache): a local remote; only s3 remotes are checked"
    )


def test_remote_check_help_imports_no_heavy_module() -> None:
    """``--help`` stays fast: neither DVC nor botocore is imported to show it."""
    code = (
        "import sys\nfrom contrastive.cli import build_parser\n"
        "try:\n    build_parser().parse_args(['remote', 'check', '--help'])\n"
        "except SystemExit:\n    pass\n"
        "print(sorted(m for m in ('dvc', 'botocore', 'torch') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.strip().splitlines()[-1] == "[]"
