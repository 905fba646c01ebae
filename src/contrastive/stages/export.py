"""The ``export`` stage: export the pretrained encoder to ONNX, check it with onnxruntime against
torch on the test split (:func:`contrastive.export.export_encoder`), and write the model, its
metrics and its report.

Missing or mismatched inputs stop the stage before any work
(:class:`~contrastive.config.ConfigError`), a failed check after it
(:class:`~contrastive.export.ExportCheckError`); in both cases nothing is written and an older
model stays as it was.
"""

from __future__ import annotations

from typing import Any

from contrastive.config import ConfigError, Params
from contrastive.data import load_split
from contrastive.export import check_inputs, export_encoder
from contrastive.files import atomic_path, write_json
from contrastive.layout import Layout
from contrastive.models import load_encoder, load_probe


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """Export, check and write; the metrics and the report in one mapping."""
    for path in (layout.encoder, layout.probe):
        if not path.is_file():
            raise ConfigError(f"{path}: not found; run the pretrain and probe stages first")
    encoder, info = load_encoder(layout.encoder)
    probe = load_probe(layout.probe)
    images, _ = load_split(layout.prepared, "test")
    check_inputs(info, probe, images, layout.probe, layout.prepared)
    exported = export_encoder(encoder, info, probe, images, params.export)

    with atomic_path(layout.onnx) as tmp:
        tmp.write_bytes(exported.model_bytes)
    write_json(layout.export_report, exported.report)
    write_json(layout.export_metrics, exported.metrics)
    return {**exported.metrics, **exported.report}
