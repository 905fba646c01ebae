"""Where the stages read and write, relative to the project folder: defined here once.

``dvc.yaml`` declares the same paths (a test checks that the two agree), and the CLI, the Prefect
flow, the register stage and the tests all take them from here.
"""

from __future__ import annotations

PREPARED = "data/prepared"
MANIFEST = f"{PREPARED}/manifest.json"

ENCODER = "models/encoder.pt"
CHECKPOINTS = "checkpoints"
PRETRAIN_METRICS = "metrics/pretrain.json"
PRETRAIN_HISTORY = "plots/pretrain.csv"
KNN_HISTORY = "plots/knn.csv"

PROBE = "models/probe.pt"
PROBE_METRICS = "metrics/probe.json"
CONFUSION = "plots/confusion.csv"
EMBEDDING_PLOT = "plots/embedding.png"
ANOMALY_PLOT = "plots/anomaly.png"

ONNX = "models/encoder.onnx"
EXPORT_METRICS = "metrics/export.json"

REGISTRY_REPORT = "reports/registry.json"
