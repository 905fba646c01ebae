"""The ``export`` stage: export the pretrained encoder to ONNX, check it with onnxruntime against
torch on the test split (:func:`contrastive.export.export_encoder`), and write the model, its
metrics and its report. An image-text (``clip``) model's text tower goes to its own ONNX file,
checked the same way on the class prompts and test captions, with the tokenizer beside it, in
``models/text/`` (:func:`contrastive.export.export_text_tower`); for an image-only model that
folder holds only ``text.json``, saying there is no text tower.

Missing or mismatched inputs stop the stage before any work
(:class:`~contrastive.config.ConfigError`), a failed check after it
(:class:`~contrastive.export.ExportCheckError`); in both cases nothing is written and an older
model stays as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from contrastive.captions import templated_captions
from contrastive.config import ConfigError, Params
from contrastive.data import load_captions, load_split
from contrastive.export import (
    TEXT_INFO_FILE,
    TEXT_ONNX_FILE,
    Exported,
    check_inputs,
    export_encoder,
    export_text_tower,
)
from contrastive.files import atomic_path, write_json
from contrastive.layout import Layout
from contrastive.models import EncoderInfo, TextSide, load_encoder, load_probe, load_text_side
from contrastive.text import TOKENIZER_FILE, for_model, save_tokenizer

MAX_PARITY_TEXTS = 2048
"""The text tower's parity check: the class prompts and at most this many distinct test captions."""


def run(params: Params, layout: Layout) -> dict[str, Any]:
    """Export, check and write; the metrics and the report in one mapping."""
    for path in (layout.encoder, layout.probe):
        if not path.is_file():
            raise ConfigError(f"{path}: not found; run the pretrain and probe stages first")
    encoder, info = load_encoder(layout.encoder)
    probe = load_probe(layout.probe)
    side = load_text_side(layout.encoder)
    images, _ = load_split(layout.prepared, "test")
    check_inputs(info, probe, images, layout.probe, layout.prepared)
    exported = export_encoder(encoder, info, probe, images, params.export,
                              image_head=side.tower.image_head if side else None)
    metrics, report = dict(exported.metrics), dict(exported.report)
    text = None
    if side is not None:
        text = export_text_tower(side, info, parity_texts(info, layout), params.export)
        metrics["text"], report["text"] = text.metrics, text.report

    with atomic_path(layout.text_onnx_dir) as folder:
        write_text_folder(folder, side, text)
    with atomic_path(layout.onnx) as tmp:
        tmp.write_bytes(exported.model_bytes)
    write_json(layout.export_report, report)
    write_json(layout.export_metrics, metrics)
    merged = {**metrics, **report}
    if text is not None:
        merged["text"] = {**text.metrics, **text.report}
    return merged


def parity_texts(info: EncoderInfo, layout: Layout) -> list[str]:
    """What the text tower is checked on: every class prompt, then distinct test captions."""
    texts = [prompt for name in info.classes for prompt in templated_captions(name)]
    captions = (load_captions(layout.prepared) or {}).get("test", [])
    distinct = sorted({c for own in captions for c in own} - set(texts))
    return texts + distinct[:MAX_PARITY_TEXTS]


def write_text_folder(folder: Path, side: TextSide | None, text: Exported | None) -> None:
    """``text.onnx``, ``tokenizer.json`` and ``text.json`` (what feeds the tower), or for an
    image-only model ``text.json`` alone."""
    folder.mkdir()
    if side is None or text is None:
        write_json(folder / TEXT_INFO_FILE, {"text_tower": None,
                                        "why": "only train.method clip learns a text tower"})
        return
    (folder / TEXT_ONNX_FILE).write_bytes(text.model_bytes)
    save_tokenizer(for_model(side.tokenizer, side.config.context_length), folder / TOKENIZER_FILE)
    write_json(folder / TEXT_INFO_FILE, {
        "text_tower": side.kind, "onnx": TEXT_ONNX_FILE, "tokenizer": TOKENIZER_FILE,
        "context_length": side.config.context_length,
        "logit_scale": side.logit_scale,
        "input": "int64 (N, context_length): [SOS] tokens [EOS], right-padded with 0, as "
                 "tokenizer.json's encode_batch gives them (it truncates and pads)",
        "output": "float32 (N, D) unit text_embeds; compare with the image model's image_embeds",
        "logits": "logit_scale x cosine (1 / the learned temperature, as CLIP's logits); their "
                  "softmax over labels gives zero-shot probabilities",
    })
