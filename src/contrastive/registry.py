"""The model registry: one version per pipeline state, and a promotion gate that can be trusted.

Every pipeline state becomes one version of ``registry.model_name``, found again by its
``pipeline_state`` tag, so a retry never registers it twice. Aliases (never stages):

- ``champion``: the best model measured so far, what users load;
- ``challenger``: the latest version that passed the export checks;
- ``previous-champion``: the champion that the current one replaced (what ``rollback`` restores).

The gate (:func:`decide`, a pure function) promotes a version only if its top-1 beats the
champion's by at least ``registry.min_improvement`` on the same evaluation (prepared data and
probe settings): the linear-probe top-1, or for an image-text (``clip``) model the zero-shot top-1,
or for one of captions without labels the mean image-text Recall@1 (``gate_metric`` names which);
models ranked by different figures are not compared. If the champion was measured on another
evaluation, it is first scored again on this one, through its registered ONNX model and the probe
stage's own :func:`evaluate_features` (or the prompt ensemble of :mod:`contrastive.classify`, or
:func:`contrastive.crossmodal.caption_recall`); if that is impossible the gate refuses. A version
whose ONNX parity failed or whose metrics are missing is never promoted. The decision and its
reason are tags on the version (``gate.*``) and go into ``reports/registry.json``.

Guarantees. A registration holds the store (:func:`~contrastive.store.registry_lock`) from the
moment it opens it (which creates the schema of a new one) until its aliases are set, so
registrations and manual promotions happen one after another: each decision sees the champion the
previous one left, and the champion only ever moves to a version that beat it (or that a person
chose). On one machine, or machines sharing the SQLite folder, a file lock does it; against a
tracking server or a database that several machines use, a lease on the store too (a registered
model ``<model_name>.lock`` without versions, which exists only while a registration runs; it is
not one of ``registry list``'s versions). Aliases are written in an order that a retry can finish
(``previous-champion``, then ``champion``, then ``challenger``), and ``gate.status`` says whether a
version's decision was fully applied.
"""

from __future__ import annotations

import getpass
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from contrastive import paths
from contrastive.config import ConfigError, Params
from contrastive.store import (
    TrackingError,
    check_artifact_store,
    connect,
    display_uri,
    ensure_experiment,
    first_line,
    mlflow_errors,
    registry_lock,
    tracking_uri,
)
from contrastive.tracking import (
    GATE_LABELS,
    LINEAR,
    RECALL,
    STATE_TAG,
    ZERO_SHOT,
    RunRecord,
    Snapshot,
    find_or_log_run,
    read_snapshot,
)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
AUDIT = "audit."  # registered-model tags audit.000001, audit.000002, ...: the manual decisions
PREPARED = paths.PREPARED
TOLERANCE = 1e-9  # a gain equal to min_improvement passes despite float rounding


# --- the gate -----------------------------------------------------------------------------------


class RescoreError(Exception):
    """The champion could not be scored on the candidate's evaluation data."""


@dataclass(frozen=True)
class Candidate:
    """What the gate needs to know about the version being registered."""

    top1: float | None
    """Its figure in ``metric`` (metrics/probe.json), on the evaluation ``eval_key``."""
    eval_key: str
    parity_ok: bool
    collapse: str | None = None
    """Why pretraining judged the representation collapsed (metrics/pretrain.json), or None."""
    metric: str = LINEAR


@dataclass(frozen=True)
class Champion:
    """The current champion and its top-1 (in ``metric``) on each evaluation it was measured on."""

    version: str
    top1: dict[str, float] = field(default_factory=dict)  # eval key -> top-1
    metric: str = LINEAR

    @classmethod
    def of(cls, version: Any) -> Champion:
        """From a registered version's tags: its own score and any re-scores on other data."""
        tags = version.tags
        metric = tags.get("gate_metric", LINEAR)
        top1 = {k.removeprefix("rescored."): float(v) for k, v in tags.items()
                if k.startswith("rescored.")}
        if "eval_key" in tags and _number(tags.get(metric)) is not None:
            top1[tags["eval_key"]] = float(tags[metric])
        return cls(str(version.version), top1, metric)


@dataclass(frozen=True)
class Decision:
    """``promoted`` | ``kept`` (lost to the champion) | ``refused`` (no fair comparison) |
    ``rejected`` (failed checks: never promoted, not a challenger)."""

    outcome: str
    reason: str
    compared_with: str | None = None
    reference_top1: float | None = None  # the champion's top-1 on the candidate's evaluation

    @property
    def promoted(self) -> bool:
        return self.outcome == "promoted"

    @property
    def eligible(self) -> bool:
        """Whether the version passed its checks, and so becomes the challenger."""
        return self.outcome != "rejected"


def decide(candidate: Candidate, champion: Champion | None, min_improvement: float,
           rescore: Callable[[], float]) -> Decision:
    """The promotion decision. ``rescore()`` scores the champion on the candidate's evaluation
    data; it is only called when no score on that evaluation is known, and may raise
    :class:`RescoreError`."""
    if candidate.collapse:
        return Decision("rejected", f"the representation collapsed in pretraining "
                        f"({candidate.collapse}); such a version is never promoted")
    if not candidate.parity_ok:
        return Decision("rejected", "the ONNX export failed its parity check against torch "
                        "(metrics/export.json); such a version is never promoted")
    top1, metric = candidate.top1, candidate.metric
    if top1 is None or not math.isfinite(top1):
        return Decision("rejected", f"the {metric} is missing from metrics/probe.json; "
                        "such a version is never promoted")
    if champion is None:
        return Decision("promoted", "first model: there was no champion yet")
    v = champion.version
    if champion.metric != metric:
        return Decision("refused", f"champion v{v} is ranked by {champion.metric}, this version "
                        f"by {metric} (image-text models by their zero-shot top-1, or their "
                        "mean Recall@1 without classes): no fair comparison; champion "
                        "unchanged (`contrastive registry promote` can choose)", v)
    if candidate.eval_key in champion.top1:
        reference, where = champion.top1[candidate.eval_key], "on the same evaluation data"
    else:
        try:
            reference = rescore()
        except RescoreError as exc:
            return Decision("refused", f"champion v{v} was measured on other evaluation data and "
                            f"could not be scored on this data ({exc}); champion unchanged", v)
        where = "re-scored on this evaluation data"
    gain = top1 - reference
    comparison = (f"{GATE_LABELS[metric]} {top1:.4f} vs champion v{v} {reference:.4f} ({where}): "
                  f"{gain:+.4f}")
    if gain >= min_improvement - TOLERANCE:
        return Decision("promoted", f"{comparison} >= registry.min_improvement "
                        f"{min_improvement:g}", v, reference)
    return Decision("kept", f"{comparison} < registry.min_improvement {min_improvement:g}; "
                    f"champion v{v} stays", v, reference)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# --- versions and aliases -----------------------------------------------------------------------


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST",
                                                "INVALID_PARAMETER_VALUE")


def alias_version(client: Any, name: str, alias: str) -> Any | None:
    """The version holding ``alias``, or None when the alias or the model does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise


def resolve(client: Any, name: str, ref: str) -> Any:
    """The version named by a number or an alias; :class:`ConfigError` (one line) if none."""
    versions = client.search_model_versions(f"name = '{name}'")
    if not versions:
        raise ConfigError(f"no registered model '{name}' at {tracking_uri()}; run the pipeline "
                          "first (make run)")
    by_number = {str(v.version): v for v in versions}
    if ref.isdigit():
        if ref not in by_number:
            numbers = sorted(map(int, by_number))
            known = f"{numbers[0]} to {numbers[-1]}" if len(numbers) > 1 else str(numbers[0])
            raise ConfigError(f"{name} has no version {ref}; versions: {known}")
        return client.get_model_version(name, ref)
    version = alias_version(client, name, ref)
    if version is None:
        aliases = sorted(f"{a} (v{v})" for a, v in aliases_of(client, name).items())
        raise ConfigError(f"{name} has no alias '{ref}'; aliases: {', '.join(aliases) or 'none'}")
    return version


def aliases_of(client: Any, name: str) -> dict[str, str]:
    """Alias -> version number of a registered model (searches do not return aliases)."""
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def find_version(client: Any, name: str, state_key: str) -> Any | None:
    """The version registered for this pipeline state, if any (a retry or a rerun)."""
    found = client.search_model_versions(f"name = '{name}' and tags.{STATE_TAG} = '{state_key}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def create_version(client: Any, name: str, run: RunRecord, snapshot: Snapshot) -> Any:
    """Register the run's ONNX model, tagged with everything that traces it back."""
    import mlflow

    probe = snapshot.metrics["probe"].get("pretrained", {})
    tags = {
        **snapshot.tags,
        "eval_key": snapshot.eval_key,
        "linear_top1": str(snapshot.linear_top1),
        "knn_top1": str(probe.get("knn_top1")),
        "gate_metric": snapshot.gate_metric,
        snapshot.gate_metric: str(probe.get(snapshot.gate_metric)),
        "max_abs_diff": str(snapshot.metrics["export"].get("max_abs_diff")),
        "parity_ok": str(snapshot.parity_ok).lower(),
        "pytorch_model_uri": run.pytorch_model_uri,
    }
    version = mlflow.register_model(run.onnx_model_uri, name, tags=tags)
    p, m = snapshot.params, snapshot.manifest
    description = (f"{p.model.encoder} on {m.get('source')} ({m.get('image_size')} px), "
                   f"{p.train.epochs} epochs, {p.train.method}; {snapshot.gate_metric} "
                   f"{probe.get(snapshot.gate_metric)}; "
                   f"git {snapshot.tags.get('git.commit', 'unknown')[:12]}")
    client.update_model_version(name, version.version, description=description)
    return client.get_model_version(name, version.version)


def replace_champion(client: Any, name: str, version: str, current: Any | None) -> None:
    """Give ``version`` the champion alias; the replaced champion becomes previous-champion.

    ``previous-champion`` is written first, so an interruption never loses the old champion.
    """
    if current is not None and str(current.version) != version:
        client.set_registered_model_alias(name, PREVIOUS, current.version)
    client.set_registered_model_alias(name, CHAMPION, version)


def apply_gate(client: Any, name: str, version: Any, candidate: Candidate, params: Params,
               prepared_dir: str | Path = PREPARED) -> Decision:
    """Decide on ``version`` and set its aliases; a version is decided once.

    A rerun finds the recorded decision: when it was fully applied (``gate.status`` done) it is
    only reported, and no alias moves; when an interrupted run had already made the version
    champion, the remaining aliases are set.
    """
    tags, number = version.tags, str(version.version)
    recorded = Decision(tags.get("gate.decision", ""), tags.get("gate.reason", ""),
                        tags.get("gate.compared_with") or None,
                        _number(tags.get("gate.reference_top1")))
    if tags.get("gate.status") == "done":
        return recorded
    champion = alias_version(client, name, CHAMPION)
    if recorded.outcome and champion is not None and str(champion.version) == number:
        decision = recorded
    else:

        def rescore() -> float:
            assert champion is not None  # decide() only re-scores an existing champion
            value = rescore_version(name, str(champion.version), params, prepared_dir,
                                    candidate.metric)
            client.set_model_version_tag(name, champion.version,
                                         f"rescored.{candidate.eval_key}", str(value))
            return value

        current = Champion.of(champion) if champion is not None else None
        decision = decide(candidate, current, params.registry.min_improvement, rescore)
        for key, value in {
            "gate.decision": decision.outcome,
            "gate.reason": decision.reason,
            "gate.compared_with": decision.compared_with or "",
            "gate.reference_top1": "" if decision.reference_top1 is None
            else str(decision.reference_top1),
            "gate.status": "pending",
        }.items():
            client.set_model_version_tag(name, number, key, value)
        if decision.promoted:
            replace_champion(client, name, number, champion)
    if decision.eligible:
        client.set_registered_model_alias(name, CHALLENGER, number)
    client.set_model_version_tag(name, number, "gate.status", "done")
    return decision


def rescore_version(name: str, version: str, params: Params,
                    prepared_dir: str | Path = PREPARED, metric: str = LINEAR) -> float:
    """Linear-probe top-1 of registered ``version`` on the prepared data, fitted as the probe
    stage fits it (same splits, settings and seed), or its zero-shot top-1 on the test split
    with the prepared data's class names, or its mean Recall@1 on the test split's captions;
    :class:`RescoreError` if impossible."""
    import torch

    from contrastive.data import SPLITS, load_manifest, load_split
    from contrastive.evaluate import Features, evaluate_features
    from contrastive.inference import load_model

    try:
        encoder = load_model(f"models:/{name}/{version}")
        manifest = load_manifest(prepared_dir)
        size = manifest["image_size"]
        if encoder.input_size != size:
            raise RescoreError(f"it takes {encoder.input_size}x{encoder.input_size} images, "
                               f"the data are {size}x{size}")
        if metric == ZERO_SHOT:
            return _zero_shot_top1(encoder, manifest["classes"], prepared_dir)
        if metric == RECALL:
            return _mean_recall_at_1(encoder, prepared_dir)
        splits = {s: load_split(prepared_dir, s) for s in SPLITS}
        features = [torch.from_numpy(encoder.embed(x, params.probe.batch_size))
                    for x, _ in splits.values()]
        labels = [torch.from_numpy(y) for _, y in splits.values()]
        metrics, _, _ = evaluate_features(Features(*features, *labels),
                                          manifest["num_classes"], params)
    except (RescoreError, TrackingError):
        raise
    except Exception as exc:  # whatever stops the re-score makes the comparison impossible
        raise RescoreError(first_line(exc)) from exc
    return float(metrics["linear_top1"])


def _zero_shot_top1(encoder: Any, classes: list[str], prepared_dir: str | Path) -> float:
    """The share of test images whose nearest class prompt ensemble is their class."""
    from contrastive.classify import label_embeddings
    from contrastive.data import load_split

    if encoder.text is None:
        raise RescoreError("it has no text tower, so no zero-shot top-1")
    images, labels = load_split(prepared_dir, "test")
    scores = encoder.embed_shared(images) @ label_embeddings(encoder.texts(), classes).T
    return float((scores.argmax(axis=1) == labels).mean())


def _mean_recall_at_1(encoder: Any, prepared_dir: str | Path) -> float:
    """The mean of image-to-text and text-to-image Recall@1 of the test images and captions."""
    import torch

    from contrastive.crossmodal import caption_recall
    from contrastive.data import load_captions, load_split

    if encoder.text is None:
        raise RescoreError("it has no text tower, so no image-text Recall@1")
    captions = load_captions(prepared_dir)
    if captions is None:
        raise RescoreError("the prepared data have no captions")
    images = torch.from_numpy(encoder.embed_shared(load_split(prepared_dir, "test")[0]))
    found = caption_recall(images, lambda texts: torch.from_numpy(encoder.texts().embed(texts)),
                           captions["test"])
    return float(found[RECALL])


# --- the register stage -------------------------------------------------------------------------


def register(params: Params, root: str | Path = ".") -> dict[str, Any]:
    """Log the pipeline state of the project at ``root`` as one MLflow run, register it, run the
    gate; the report of what happened (the ``register`` stage writes it).

    Raises :class:`ConfigError` when an upstream output is missing and
    :class:`~contrastive.store.TrackingError` when the store fails; then nothing is touched, and
    a rerun completes the registration without duplicates.
    """
    root = Path(root)
    snapshot = read_snapshot(params, root)
    uri, name = tracking_uri(), params.registry.model_name
    with registry_lock(uri, name) as client, mlflow_errors("registering the model", uri):
        experiment_id = ensure_experiment(client, params.registry.experiment, uri)
        check_artifact_store(client, experiment_id)  # a missing bucket: before any write
        run = find_or_log_run(client, experiment_id, snapshot, root)
        version = find_version(client, name, snapshot.state_key)
        new_version = version is None
        if version is None:
            version = create_version(client, name, run, snapshot)
        candidate = Candidate(snapshot.gate_top1, snapshot.eval_key, snapshot.parity_ok,
                              snapshot.collapse, snapshot.gate_metric)
        decision = apply_gate(client, name, version, candidate, params, root / PREPARED)
        number = str(version.version)
        aliases = sorted(client.get_model_version(name, number).aliases)
        champion = alias_version(client, name, CHAMPION)
    report = {
        "model": name,
        "version": int(number),
        "run_id": run.run_id,
        "aliases": aliases,
        "decision": decision.outcome,
        "reason": decision.reason,
        "linear_top1": snapshot.linear_top1,
        "gate_metric": snapshot.gate_metric,
        snapshot.gate_metric: snapshot.gate_top1,
        "champion": _champion_summary(champion, number, snapshot, decision),
        "min_improvement": params.registry.min_improvement,
        "pipeline_state": snapshot.state_key,
        "data_hash": snapshot.manifest.get("data_hash"),
        "new_run": not run.reused,
        "new_version": new_version,
        "tracking_uri": display_uri(uri, root),
    }
    return report


def _champion_summary(champion: Any | None, number: str, snapshot: Snapshot,
                      decision: Decision) -> dict[str, Any] | None:
    """The champion after the decision and its top-1 in its gate metric: on this evaluation data
    when known (``same_evaluation``), else on the data it was measured on."""
    if champion is None:
        return None
    if str(champion.version) == number:
        return {"version": int(number), snapshot.gate_metric: snapshot.gate_top1,
                "same_evaluation": True}
    known = Champion.of(champion)
    top1 = known.top1.get(snapshot.eval_key)
    if top1 is None and decision.compared_with == str(champion.version):
        top1 = decision.reference_top1
    if top1 is not None:
        return {"version": int(champion.version), known.metric: top1, "same_evaluation": True}
    own = _number(champion.tags.get(known.metric))
    return {"version": int(champion.version), known.metric: own, "same_evaluation": False}


# --- commands for people ------------------------------------------------------------------------


def list_versions(params: Params) -> str:
    """``contrastive registry list``: one line per version, newest first."""
    name = params.registry.model_name
    client = connect(must_exist=True)
    with mlflow_errors("listing the registry"):
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise ConfigError(f"no registered model '{name}' at {tracking_uri()}; run the "
                              "pipeline first (make run)")
        aliases: dict[str, list[str]] = {}
        for alias, number in sorted(aliases_of(client, name).items()):
            aliases.setdefault(number, []).append(alias)
    header = ("version", "aliases", "gate", "linear_top1", "knn_top1", "parity", "decision",
              "git", "run_id")
    rows = [header]
    for v in sorted(versions, key=lambda v: -int(v.version)):
        t = v.tags
        dirty = "+dirty" if t.get("git.dirty") == "true" else ""
        metric = t.get("gate_metric", LINEAR)
        decision = t.get("gate.decision", "-")
        if "manual.action" in t:
            decision += f"; {t['manual.action']} by {t.get('manual.user', '?')}"
        rows.append((
            str(v.version), ",".join(aliases.get(str(v.version), [])) or "-",
            f"{metric}={t.get(metric, '-')}",
            t.get("linear_top1", "-"),
            t.get("knn_top1", "-"), "ok" if t.get("parity_ok") == "true" else "FAILED",
            decision,
            t.get("git.commit", "unknown")[:10] + dirty, v.run_id or "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    return "\n".join([f"{name} at {tracking_uri()}", *lines])


def show(params: Params, ref: str) -> dict[str, Any]:
    """``contrastive registry show ALIAS|VERSION``: the version, its tags and its run's metrics."""
    name = params.registry.model_name
    client = connect(must_exist=True)
    with mlflow_errors(f"reading {name} {ref}"):
        version = resolve(client, name, ref)
        metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
    created = datetime.fromtimestamp(version.creation_timestamp / 1000, UTC)
    return {
        "model": name,
        "version": int(version.version),
        "aliases": sorted(version.aliases),
        "uri": f"models:/{name}/{version.version}",
        "run_id": version.run_id,
        "created": created.isoformat(timespec="seconds"),
        "description": version.description,
        "tags": dict(sorted(version.tags.items())),
        "metrics": {k: v for k, v in sorted(metrics.items()) if not k.startswith("train/")},
        "audit": [entry for entry in audit_trail(client, name)
                  if str(version.version) in (entry["from_version"], entry["to_version"])],
    }


def promote(params: Params, ref: str, reason: str) -> dict[str, Any]:
    """``contrastive registry promote VERSION``: a person makes a version champion, with a reason.

    A version that failed its checks (``gate.decision`` rejected) is refused: it is never promoted.
    """
    name = params.registry.model_name
    uri = tracking_uri()
    client = connect(uri, must_exist=True)
    with registry_lock(uri, name, client), mlflow_errors(f"promoting {name} {ref}", uri):
        version = resolve(client, name, ref)
        number = str(version.version)
        if version.tags.get("gate.decision") == "rejected":
            raise ConfigError(f"{name} v{number} failed its checks and is never promoted: "
                              f"{version.tags.get('gate.reason', '')}")
        return _manual_change(client, name, number, "promoted", reason)


def rollback(params: Params, reason: str) -> dict[str, Any]:
    """``contrastive registry rollback``: previous-champion becomes champion again (and the
    demoted champion becomes previous-champion, so a second rollback undoes the first)."""
    name = params.registry.model_name
    uri = tracking_uri()
    client = connect(uri, must_exist=True)
    with registry_lock(uri, name, client), mlflow_errors(f"rolling back {name}", uri):
        resolve(client, name, CHAMPION)  # one clear line if there is no champion
        previous = alias_version(client, name, PREVIOUS)
        if previous is None:
            raise ConfigError(f"{name} has no {PREVIOUS} to roll back to")
        return _manual_change(client, name, str(previous.version), "restored", reason)


def _manual_change(client: Any, name: str, number: str, action: str,
                   reason: str) -> dict[str, Any]:
    """Make ``number`` champion for a person's ``reason``: recorded in the version's tags first,
    then the aliases move (as the gate does)."""
    if not reason.strip():
        raise ConfigError("--reason: say why (it is recorded on the version)")
    current = alias_version(client, name, CHAMPION)
    before = str(current.version) if current is not None else None
    if before != number:
        user, now = getpass.getuser(), datetime.now(UTC).isoformat(timespec="seconds")
        record = {
            "manual.action": action,
            "manual.reason": reason,
            "manual.user": user,
            "manual.time": now,
            "manual.replaced": before or "",
        }
        for key, value in record.items():  # the latest decision, shown by `registry list`
            client.set_model_version_tag(name, number, key, value)
        _append_audit(client, name, {"action": action, "from_version": before,
                                     "to_version": number, "reason": reason, "user": user,
                                     "time": now})
        replace_champion(client, name, number, current)
    return {
        "model": name,
        "champion": int(number),
        "replaced": int(before) if before and before != number else None,
        "changed": before != number,
        "reason": reason,
    }


def _append_audit(client: Any, name: str, entry: dict[str, Any]) -> None:
    """Add one manual decision to the registered model's audit trail, as tag ``audit.<n>`` (JSON).

    Entries are numbered and never overwritten, so every decision stays on record (the version's
    ``manual.*`` tags keep only the latest). Callers hold the store lock, so ``n`` is unique.
    """
    tags = client.get_registered_model(name).tags
    n = 1 + sum(key.startswith(AUDIT) for key in tags)
    client.set_registered_model_tag(name, f"{AUDIT}{n:06d}", json.dumps(entry, sort_keys=True))


def audit_trail(client: Any, name: str) -> list[dict[str, Any]]:
    """Every manual decision on ``name``, oldest first: action, from_version, to_version, reason,
    user, time."""
    tags = client.get_registered_model(name).tags
    return [json.loads(tags[key]) for key in sorted(tags) if key.startswith(AUDIT)]
