"""Where the stages read and write, relative to the project folder: defined here once.

``metrics/*.json`` hold only numbers that describe the model (what ``dvc metrics diff`` and
``dvc exp show`` compare); the facts of a run that are not such numbers (timings, the device, the
method's name, text) go to ``reports/*.json``, plain outputs that DVC does not compare.

``dvc.yaml`` declares the same paths (a test checks that the two agree), and the CLI, the Prefect
flow, the register stage and the tests all take them from here.
"""

from __future__ import annotations

from pathlib import Path

PREPARED = "data/prepared"
MANIFEST = f"{PREPARED}/manifest.json"

ENCODER = "models/encoder.pt"
CHECKPOINTS = "checkpoints"
PRETRAIN_METRICS = "metrics/pretrain.json"
PRETRAIN_REPORT = "reports/pretrain.json"
PRETRAIN_HISTORY = "plots/pretrain.csv"
KNN_HISTORY = "plots/knn.csv"
TRAINING_PLOT = "plots/training.png"

PROBE = "models/probe.pt"
PROBE_METRICS = "metrics/probe.json"
CONFUSION = "plots/confusion.csv"
CONFUSION_PLOT = "plots/confusion.png"
EMBEDDING_PLOT = "plots/embedding.png"
ANOMALY_PLOT = "plots/anomaly.png"

ONNX = "models/encoder.onnx"
EXPORT_METRICS = "metrics/export.json"
EXPORT_REPORT = "reports/export.json"

REGISTRY_REPORT = "reports/registry.json"


def companion(given: str | Path, default: str, companion_of_default: str, suffix: str) -> str:
    """Where a stage writes an output that follows from another one: the standard path
    ``companion_of_default`` when ``given`` is the standard ``default``, else beside ``given``
    (its stem + ``suffix``), so that a bench or test writing to a temporary folder never writes
    into the project."""
    if str(given) == default:
        return companion_of_default
    given = Path(given)
    return str(given.with_name(given.stem + suffix))
