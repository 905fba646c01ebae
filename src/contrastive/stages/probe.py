"""The ``probe`` stage: evaluate the pretrained encoder on frozen features against a random-init
encoder and raw pixels (:func:`contrastive.evaluate.evaluate_encoder`), and write the probe, the
metrics, the confusion matrix and the plots.

Each output is written atomically at the end; a failure leaves the earlier outputs as they were.
For data without classes (captions without labels) there is no probe (``probe.pt`` says so), the
confusion CSV has only its header, and the two class plots say why they are empty.
"""

from __future__ import annotations

from typing import Any

from contrastive.config import Params
from contrastive.data import load_captions, load_manifest, load_split
from contrastive.evaluate import evaluate_encoder
from contrastive.files import write_csv, write_json
from contrastive.layout import Layout
from contrastive.models import load_encoder, load_text_side, save_probe
from contrastive.plots import plot_anomaly_histograms, plot_confusion, plot_embedding, plot_note
from contrastive.runtime import resolve_device

NO_CLASSES = ("The captions have no 'label' column, so there are no classes:\n"
              "the model is measured by image-text Recall@K (metrics/probe.json).")


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """Evaluate and write the outputs; the metrics."""
    device = resolve_device(params.device)
    classes = load_manifest(layout.prepared)["classes"]
    splits = {s: load_split(layout.prepared, s) for s in ("train", "val", "test")}
    encoder, info = load_encoder(layout.encoder)
    captions = load_captions(layout.prepared)
    found = evaluate_encoder(params, encoder, info, splits, classes, device,
                             load_text_side(layout.encoder), captions["test"] if captions else None)

    save_probe(layout.probe, found.probe, info.embedding_dim)
    # one row per test image, the shape DVC's ``confusion`` plot template reads
    pairs = zip(found.test_labels.tolist(), found.predictions.tolist(), strict=True)
    rows = [{"actual": classes[a], "predicted": classes[p]} for a, p in pairs] if classes else []
    write_csv(layout.confusion, rows, ["actual", "predicted"])
    plot_embedding(layout.embedding_plot, found.test_features, found.test_labels, classes,
                   params.seed, params.probe.tsne_points)
    if classes:
        plot_confusion(layout.confusion, classes, layout.confusion_plot)
        plot_anomaly_histograms(layout.anomaly_plot, found.anomaly_rounds)
    else:
        plot_note(layout.confusion_plot, "Linear probe on test: confusion", NO_CLASSES)
        plot_note(layout.anomaly_plot, "Leave-one-class-out anomaly detection", NO_CLASSES)
    write_json(layout.probe_metrics, found.metrics)
    return found.metrics
