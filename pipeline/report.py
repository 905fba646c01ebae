"""What a retrain did, as a typed result, and the same facts as Markdown and as a table.

The flow publishes both as Prefect artifacts and returns the result; ``make retrain`` prints the
Markdown. The register stage's decision comes from ``reports/registry.json`` (its output).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contrastive import paths
from contrastive.tracking import GATE_LABELS
from pipeline.stages import StageStatus

REGISTER_STAGE = "register"
REGISTRY_REPORT = paths.REGISTRY_REPORT
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"
"""Where ``make ui`` (``mlflow ui``) serves the project's local SQLite store."""


@dataclass(frozen=True)
class StageRun:
    """One stage of one retrain: what DVC did with it."""

    name: str
    status: StageStatus
    seconds: float
    attempts: int | None = 1
    """Tries it took (None for a failed stage: the Prefect UI lists its attempts)."""
    error: str = ""


@dataclass(frozen=True)
class Registration:
    """The register stage's decision (``reports/registry.json``): the version it registered, the
    promotion gate's decision and reason, and this version's and the champion's probe top-1."""

    version: int
    decision: str
    reason: str
    run_id: str
    tracking_uri: str
    new_version: bool
    aliases: list[str] = field(default_factory=list)
    gate_metric: str = "linear_top1"
    """What the gate ranked the version by: linear_top1, zero_shot_top1 or mean_recall_at_1."""
    top1: float | None = None
    champion_version: int | None = None
    champion_top1: float | None = None

    @classmethod
    def read(cls, path: Path) -> Registration | None:
        """The registration in ``path``; None if there is none (no register stage yet)."""
        if not path.is_file():
            return None
        raw: dict[str, Any] = json.loads(path.read_text())
        champion = raw.get("champion") or {}
        metric = raw.get("gate_metric", "linear_top1")
        return cls(
            version=raw["version"],
            decision=raw["decision"],
            reason=raw["reason"],
            run_id=raw["run_id"],
            tracking_uri=raw["tracking_uri"],
            new_version=raw.get("new_version", True),
            aliases=raw.get("aliases", []),
            gate_metric=metric,
            top1=raw.get(metric),
            champion_version=champion.get("version"),
            champion_top1=champion.get(metric),
        )

    @property
    def run_url(self) -> str:
        """The run in the MLflow UI: the tracking server's, or ``mlflow ui``'s (local store)."""
        remote = self.tracking_uri.startswith(("http://", "https://"))
        ui = self.tracking_uri.rstrip("/") if remote else LOCAL_MLFLOW_UI
        return f"{ui}/#/runs/{self.run_id}"


@dataclass(frozen=True)
class RetrainResult:
    """Everything a retrain did: the stages, the metrics, the registry decision, the overrides."""

    stages: list[StageRun]
    metrics: dict[str, float]
    registration: Registration | None
    """The registry's latest decision (``reports/registry.json``), made by this run or earlier."""
    seconds: float
    overrides: list[str] = field(default_factory=list)
    refreshed: list[str] | None = None
    """The refresh's DVC commands; None if the run did not refresh the data."""
    experiment: str | None = None

    @property
    def ran(self) -> list[str]:
        return [stage.name for stage in self.stages if stage.status == "ran"]

    @property
    def failed(self) -> StageRun | None:
        return next((stage for stage in self.stages if stage.status == "failed"), None)

    @property
    def up_to_date(self) -> bool:
        """No stage had to run (and none failed): nothing changed, nothing was registered."""
        return not self.ran and self.failed is None

    @property
    def registered(self) -> bool:
        """Whether this run registered a new model version (its register stage ran)."""
        return (
            REGISTER_STAGE in self.ran
            and self.registration is not None
            and self.registration.new_version
        )

    @property
    def headline(self) -> str:
        if self.failed:
            return f"failed in stage {self.failed.name}"
        return "up to date" if self.up_to_date else "ran " + ", ".join(self.ran)


def metrics_table(result: RetrainResult) -> list[dict[str, Any]]:
    """One row per metric that dvc.yaml declares (the registry report's numbers included)."""
    return [{"metric": name, "value": value} for name, value in sorted(result.metrics.items())]


def markdown(result: RetrainResult) -> str:
    """The run's summary: what ran and what was up to date, the registry, the metrics."""
    lines = [f"# Retrain: {result.headline}", ""]
    if result.up_to_date:
        lines += ["Nothing changed: every stage was up to date and nothing was registered.", ""]
    if result.refreshed is not None:
        done = ", ".join(f"`{c}`" for c in result.refreshed) or "no DVC import or remote to update"
        first = result.stages[0].name if result.stages else "the first stage"
        lines += [f"Data refreshed ({done}); `{first}` ran even if it was up to date.", ""]
    if result.overrides:
        where = (
            f" (DVC experiment `{result.experiment}`)"
            if result.experiment
            else " (not saved as a DVC experiment: no git repository, or see the log)"
        )
        lines += ["Params set: " + " ".join(f"`{s}`" for s in result.overrides) + where, ""]
    lines += ["| stage | status | seconds | attempts |", "|---|---|---:|---:|"]
    for stage in result.stages:
        status = f"{stage.status}: {stage.error}" if stage.error else stage.status
        attempts = "-" if stage.attempts is None else stage.attempts
        lines.append(f"| {stage.name} | {status} | {stage.seconds:.1f} | {attempts} |")
    lines += ["", f"Total: {result.seconds:.1f} s.", "", "## Registry", "", _registry(result)]
    if result.metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {row['metric']} | {_number(row['value'])} |" for row in metrics_table(result)]
    return "\n".join(lines) + "\n"


def _registry(result: RetrainResult) -> str:
    """The gate's decision, this version's figure (its ``gate_metric``) against the champion's,
    the MLflow run."""
    reg = result.registration
    if reg is None:
        return f"No registration: the pipeline has no `{REGISTER_STAGE}` stage output yet."
    aliases = f" ({', '.join(reg.aliases)})" if reg.aliases else ""
    text = f"version {reg.version}{aliases}: **{reg.decision}**. {reg.reason}."
    figure = GATE_LABELS.get(reg.gate_metric, reg.gate_metric)
    figure = figure[0].upper() + figure[1:]
    if reg.top1 is not None and reg.champion_version == reg.version:
        text += f" {figure} {reg.top1:.4f}: this version is the champion."
    elif reg.top1 is not None and reg.champion_top1 is not None:
        text += (
            f" {figure} {reg.top1:.4f} against the champion's"
            f" {reg.champion_top1:.4f} (version {reg.champion_version})."
        )
    text += f" MLflow run [{reg.run_id}]({reg.run_url}) in `{reg.tracking_uri}`."
    if result.registered:
        return f"Registered {text}"
    return f"Nothing registered by this run. The latest registration: {text}"


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() else f"{value:.6g}"
