"""deploy/compose.yaml by reading (no Docker engine here): the services a team runs, every port
on 127.0.0.1 unless BIND_ADDRESS says otherwise, and credentials only from the environment."""

from __future__ import annotations

import re

import yaml

from tests.conftest import ROOT

COMPOSE = ROOT / "deploy" / "compose.yaml"


def test_compose_has_the_team_services_bound_to_localhost() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "worker", "pipeline"} <= set(services)
    published = [port for s in services.values() for port in s.get("ports", [])]
    assert published and all(p.startswith("${BIND_ADDRESS:-127.0.0.1}:") for p in published)
    assert "--app-name basic-auth" in " ".join(services["mlflow"]["command"])
    worker = services["worker"]["command"]
    assert worker.startswith("prefect worker start --pool contrastive-process")


def test_compose_takes_every_credential_from_the_environment() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|AUTH_STRING|_KEY", key) or "@" in str(value):
                assert "${" in str(value), f"{name}.{key} is written in the file"
