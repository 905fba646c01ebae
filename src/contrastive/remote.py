"""A preflight for the DVC remote: ``contrastive remote check`` before ``dvc push`` / ``dvc pull``.

DVC reports a remote without credentials, a missing bucket or an endpoint that does not answer
in messages of its own (``Unable to locate credentials``...). This check reads the remote from
DVC's config (``.dvc/config`` and ``.dvc/config.local``, as DVC merges them) and, for an
``s3://`` remote, resolves credentials the way DVC's S3 filesystem does (the remote's
``access_key_id`` / ``secret_access_key``, ``profile``, ``credentialpath``, ``configpath``, else
botocore's chain: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, the shared files, an
instance role) and asks the bucket at the remote's ``endpointurl`` whether it answers. Each
problem is one line that names the remote and the setting to fix
(:class:`~contrastive.config.ConfigError`: exit status 2). No secret is ever printed: not a key,
not a secret, not a password in a URL.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from contrastive.config import ConfigError
from contrastive.store import without_credentials

ADD_REMOTE = (
    "`make remote DVC_REMOTE_URL=s3://BUCKET/PATH` (or `dvc remote add --default storage "
    "s3://BUCKET/PATH`)"
)
CREDENTIAL_SOURCES = {
    "explicit": "the remote's access_key_id / secret_access_key",
    "env": "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
    "shared-credentials-file": "the shared credentials file",
    "config-file": "the AWS config file",
}
"""botocore's names for where credentials came from, as the messages say it."""
CONNECTION_ERRORS = {
    "EndpointConnectionError": "could not connect",
    "ConnectTimeoutError": "connect timeout",
    "ReadTimeoutError": "read timeout",
}
"""Reasons said in a few words: botocore's own messages repeat the URL."""
SECRET_OPTIONS = ("secret_access_key", "session_token", "sse_customer_key", "password")


@dataclass(frozen=True)
class Remote:
    """A DVC remote: its name, URL and every option DVC merged for it (secrets included: never
    print :attr:`options`)."""

    name: str
    url: str
    options: dict[str, Any] = field(repr=False)

    @property
    def scheme(self) -> str:
        """``s3``, ``gs``, ``ssh``...; ``local`` for a folder."""
        scheme = urlsplit(self.url).scheme
        return scheme if len(scheme) > 1 else "local"  # a Windows drive letter is no scheme

    @property
    def label(self) -> str:
        """``'storage' (s3://bucket/path)``, as every message names the remote."""
        return f"'{self.name}' ({without_credentials(self.url)})"


def read_remote(project: Path | str = ".", name: str | None = None) -> Remote:
    """The remote ``name``, else DVC's default remote, of the DVC project that holds
    ``project``, from DVC's merged config (system, global, ``.dvc/config``,
    ``.dvc/config.local``).

    Raises:
        ConfigError: not in a DVC project, its config does not parse, no remote is configured,
            no default remote is set, or ``name`` is not one of the remotes.
    """
    from dvc.config import Config
    from dvc.exceptions import DvcException, NotDvcRepoError
    from dvc.repo import Repo

    try:
        dvc_dir = Repo.find_dvc_dir(root=str(project))
    except NotDvcRepoError:
        raise ConfigError(
            f"{project} is not in a DVC project (no .dvc folder): run from the project's folder "
            "or pass --project"
        ) from None
    try:
        config = Config(dvc_dir=dvc_dir)
    except DvcException as exc:
        raise ConfigError(f"DVC config: {_first_line(exc)}") from None
    remotes: dict[str, dict[str, Any]] = dict(config.get("remote", {}))
    if not remotes:
        raise ConfigError(f"no DVC remote is configured: add one with {ADD_REMOTE}")
    known = ", ".join(sorted(remotes))
    if name is None:
        name = config.get("core", {}).get("remote")
        if not name:
            raise ConfigError(
                f"no default DVC remote (configured: {known}): set one with "
                "`dvc remote default NAME`, or pass --remote NAME"
            )
    if name not in remotes:
        raise ConfigError(
            f"DVC remote '{name}' is not configured (configured: {known}): pass one of them, "
            "or set the default (`dvc remote default NAME`)"
        )
    options = dict(remotes[name])
    return Remote(name, str(options.get("url", "")), options)


def check(project: Path | str = ".", name: str | None = None) -> str:
    """Check the DVC remote before ``dvc push`` / ``dvc pull``: one line saying what answered.

    An ``s3://`` remote needs credentials (unless ``allow_anonymous_login``) and a bucket that
    answers at its endpoint; other kinds of remote are only read from the config.

    Raises:
        ConfigError: one line naming the remote and the setting to fix.
    """
    remote = read_remote(project, name)
    if remote.scheme != "s3":
        return f"DVC remote {remote.label}: a {remote.scheme} remote; only s3 remotes are checked"
    return check_s3(remote)


def check_s3(remote: Remote) -> str:
    """Resolve the S3 remote's credentials and ask its bucket whether it answers
    (``HeadBucket``, at most two attempts with DVC's timeouts or 10 s each)."""
    import botocore.exceptions
    from botocore import UNSIGNED
    from botocore.config import Config

    bucket = urlsplit(remote.url).netloc
    if not bucket:
        raise ConfigError(
            f"DVC remote {remote.label} names no bucket: `dvc remote modify {remote.name} url "
            "s3://BUCKET/PATH`"
        )
    session, source = s3_credentials(remote)
    options = remote.options
    endpoint = options.get("endpointurl")
    settings: dict[str, Any] = {
        "connect_timeout": int(options.get("connect_timeout") or 10),
        "read_timeout": int(options.get("read_timeout") or 10),
        "retries": {"max_attempts": 2, "mode": "standard"},
    }
    if source is None:
        settings["signature_version"] = UNSIGNED
    try:
        client = session.create_client(
            "s3",
            endpoint_url=endpoint,
            region_name=options.get("region")
            or session.get_config_variable("region")
            or "us-east-1",
            use_ssl=options.get("use_ssl", True),
            verify=options.get("ssl_verify"),
            config=Config(**settings),
        )
    except (ValueError, botocore.exceptions.BotoCoreError) as exc:  # "Invalid endpoint: ..."
        raise ConfigError(
            f"DVC remote {remote.label}: {_first_line(exc, remote)}: check its endpointurl and "
            f"region (`dvc remote modify {remote.name} endpointurl URL`)"
        ) from None
    where = without_credentials(endpoint or client.meta.endpoint_url)
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as exc:
        raise ConfigError(bucket_error(remote, bucket, where, source, exc)) from None
    except botocore.exceptions.BotoCoreError as exc:
        reason = CONNECTION_ERRORS.get(type(exc).__name__) or _first_line(exc, remote)
        raise ConfigError(
            f"DVC remote {remote.label}: no S3 server answers at {where} ({reason}): "
            f"check the remote's endpointurl (`dvc remote modify {remote.name} endpointurl URL`)"
        ) from None
    credentials = "anonymous" if source is None else f"credentials from {source}"
    return f"DVC remote {remote.label}: bucket '{bucket}' answers at {where} ({credentials})"


def s3_credentials(remote: Remote) -> tuple[Any, str | None]:
    """A botocore session with the credentials DVC would use for ``remote``, and where they come
    from (:data:`CREDENTIAL_SOURCES`); ``None`` for an anonymous remote.

    Raises:
        ConfigError: no credentials resolve, only half of a key pair is set, or the remote's
            ``profile`` (or ``AWS_PROFILE``) is not in the AWS config files.
    """
    import botocore.exceptions
    import botocore.session

    options = remote.options
    session = botocore.session.Session(profile=options.get("profile"))
    # DVC sets these two only when the environment does not (os.environ.setdefault)
    for setting, variable, name in (
        ("credentialpath", "AWS_SHARED_CREDENTIALS_FILE", "credentials_file"),
        ("configpath", "AWS_CONFIG_FILE", "config_file"),
    ):
        if options.get(setting) and not os.environ.get(variable):
            session.set_config_variable(name, options[setting])
    if options.get("allow_anonymous_login"):
        return session, None
    key, secret = options.get("access_key_id"), options.get("secret_access_key")
    if bool(key) != bool(secret):
        have, missing = (
            ("access_key_id", "secret_access_key")
            if key
            else ("secret_access_key", "access_key_id")
        )
        raise ConfigError(
            f"DVC remote {remote.label} has {have} but no {missing}: "
            f"`dvc remote modify --local {remote.name} {missing} ...`"
        )
    if key:
        session.set_credentials(key, secret, options.get("session_token"))
    try:
        credentials = session.get_credentials()
    except botocore.exceptions.ProfileNotFound:
        setting = "its `profile` setting" if options.get("profile") else "AWS_PROFILE"
        raise ConfigError(
            f"DVC remote {remote.label}: the AWS profile of {setting} is not in the AWS config "
            f"files: fix the profile, or `dvc remote modify --local {remote.name} profile NAME`"
        ) from None
    except botocore.exceptions.PartialCredentialsError as exc:
        raise ConfigError(
            f"DVC remote {remote.label} has incomplete credentials ({_first_line(exc)}): set "
            "both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from None
    except botocore.exceptions.BotoCoreError as exc:  # a credential process, SSO, a role
        raise ConfigError(
            f"DVC remote {remote.label}: its credentials did not resolve "
            f"({_first_line(exc, remote)})"
        ) from None
    if credentials is None:
        raise ConfigError(
            f"DVC remote {remote.label} has no credentials: set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY, or `dvc remote modify --local {remote.name} access_key_id "
            "...` and `secret_access_key ...` (or `profile`, `credentialpath`)"
        )
    return session, CREDENTIAL_SOURCES.get(credentials.method, credentials.method)


def bucket_error(
    remote: Remote, bucket: str, where: str, source: str | None, exc: Exception
) -> str:
    """The one line for a ``HeadBucket`` the server refused: no such bucket, credentials it does
    not accept, or another error code."""
    response = getattr(exc, "response", {}) or {}
    code = str(response.get("Error", {}).get("Code", "")) or "?"
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    prefix = f"DVC remote {remote.label}"
    if code in ("404", "NoSuchBucket", "NotFound") or status == 404:
        return (
            f"{prefix}: bucket '{bucket}' does not exist at {where}: create it, or point the "
            f"remote at another one (`dvc remote modify {remote.name} url s3://BUCKET/PATH`)"
        )
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or (
        status in (401, 403)
    ):
        given = source or "no credentials (allow_anonymous_login)"
        return (
            f"{prefix}: {where} refused access to bucket '{bucket}' with {given} ({code}): "
            "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or the remote's access_key_id / "
            "secret_access_key / profile"
        )
    return f"{prefix}: bucket '{bucket}' at {where}: {code} ({status}): {_first_line(exc, remote)}"


def _first_line(exc: BaseException, remote: Remote | None = None, limit: int = 160) -> str:
    """The first line of an error, shortened, with the remote's secrets (its secret options and
    any password in its URLs) replaced by ``***``."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    if remote is not None:
        for url in (remote.url, str(remote.options.get("endpointurl") or "")):
            text = text.replace(url, without_credentials(url)) if url else text
        for option in SECRET_OPTIONS:
            secret = str(remote.options.get(option) or "")
            text = text.replace(secret, "***") if secret else text
    return text if len(text) <= limit else text[: limit - 3] + "..."
