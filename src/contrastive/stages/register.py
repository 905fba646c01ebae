"""The ``register`` stage: log the pipeline's state as one MLflow run, register it as a version
of the model, apply the promotion gate (:func:`contrastive.registry.register`), and write what
happened to the layout's registry report.

When an upstream output is missing or the store fails, the earlier report stays as it was and a
rerun completes the registration without duplicates.
"""

from __future__ import annotations

from typing import Any

from contrastive.config import Params
from contrastive.files import write_json
from contrastive.layout import Layout
from contrastive.registry import register


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """Register and gate; the report."""
    report = register(params, layout.root)
    write_json(layout.registry_report, report)
    return report
