"""The ``prepare`` stage: load ``params.data``'s source, clean and split it into the layout's
prepared folder (:func:`contrastive.data.prepare`, which owns that folder's format)."""

from __future__ import annotations

from typing import Any

from contrastive.config import Params
from contrastive.data import prepare
from contrastive.layout import Layout


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """Prepare the splits; their image counts and the number of classes."""
    manifest = prepare(params.data, params.seed, layout.prepared, layout.raw)
    return {"counts": manifest["totals"], "classes": manifest["num_classes"]}
