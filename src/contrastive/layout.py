"""Where a run's stages read and write: the project's paths (:mod:`contrastive.paths`) under one
root folder.

A stage takes ``(params, layout)``: the CLI and DVC pass ``Layout()`` (the project folder, the
current directory), a test or a bench ``Layout(tmp_path)``, so that nothing it runs writes into
the project. ``prepared_dir`` lets several runs read one prepared dataset that lies elsewhere
(the benches prepare a dataset once and train on it many times).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from contrastive import paths


@dataclass(frozen=True)
class Layout:
    """The files of one pipeline run, each ``root / paths.NAME``."""

    root: Path = Path(".")
    prepared_dir: Path | None = None
    """The prepared splits, when not ``root / data/prepared``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        if self.prepared_dir is not None:
            object.__setattr__(self, "prepared_dir", Path(self.prepared_dir))

    def _at(self, relative: str) -> Path:
        return self.root / relative

    @property
    def raw(self) -> Path:
        return self._at(paths.RAW)

    @property
    def prepared(self) -> Path:
        return self.prepared_dir if self.prepared_dir is not None else self._at(paths.PREPARED)

    @property
    def encoder(self) -> Path:
        return self._at(paths.ENCODER)

    @property
    def checkpoints(self) -> Path:
        return self._at(paths.CHECKPOINTS)

    @property
    def pretrain_metrics(self) -> Path:
        return self._at(paths.PRETRAIN_METRICS)

    @property
    def pretrain_report(self) -> Path:
        return self._at(paths.PRETRAIN_REPORT)

    @property
    def pretrain_history(self) -> Path:
        return self._at(paths.PRETRAIN_HISTORY)

    @property
    def knn_history(self) -> Path:
        return self._at(paths.KNN_HISTORY)

    @property
    def training_plot(self) -> Path:
        return self._at(paths.TRAINING_PLOT)

    @property
    def probe(self) -> Path:
        return self._at(paths.PROBE)

    @property
    def probe_metrics(self) -> Path:
        return self._at(paths.PROBE_METRICS)

    @property
    def confusion(self) -> Path:
        return self._at(paths.CONFUSION)

    @property
    def confusion_plot(self) -> Path:
        return self._at(paths.CONFUSION_PLOT)

    @property
    def embedding_plot(self) -> Path:
        return self._at(paths.EMBEDDING_PLOT)

    @property
    def anomaly_plot(self) -> Path:
        return self._at(paths.ANOMALY_PLOT)

    @property
    def onnx(self) -> Path:
        return self._at(paths.ONNX)

    @property
    def text_onnx_dir(self) -> Path:
        return self._at(paths.TEXT_ONNX_DIR)

    @property
    def export_metrics(self) -> Path:
        return self._at(paths.EXPORT_METRICS)

    @property
    def export_report(self) -> Path:
        return self._at(paths.EXPORT_REPORT)

    @property
    def registry_report(self) -> Path:
        return self._at(paths.REGISTRY_REPORT)
