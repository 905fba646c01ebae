"""Where the stages read and write, relative to the project folder: defined here once.

``metrics/*.json`` hold only numbers that describe the model (what ``dvc metrics diff`` and
``dvc exp show`` compare); the facts of a run that are not such numbers (timings, the device, the
method's name, text) go to ``reports/*.json``, plain outputs that DVC does not compare.

``dvc.yaml`` declares the same paths (a test checks that the two agree); the stages reach them
through :class:`contrastive.layout.Layout`, under the project folder or a test's own.
"""

from __future__ import annotations

RAW = "data/raw"
"""Where cifar10 and stl10 are downloaded when ``data.path`` is not set."""
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
TEXT_ONNX_DIR = "models/text"
"""The text tower of an image-text model: ``text.onnx``, ``tokenizer.json`` and ``text.json``
(for an image-only model, ``text.json`` alone, saying there is none: DVC needs the folder)."""
EXPORT_METRICS = "metrics/export.json"
EXPORT_REPORT = "reports/export.json"

REGISTRY_REPORT = "reports/registry.json"

