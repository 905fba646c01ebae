"""ONNX export of the encoder, checked against torch and timed (the ``export`` stage,
:mod:`contrastive.stages.export`, writes the file and its metrics).

The exported graph takes raw images, ``uint8 (N, H, W, 3)`` RGB, named ``images``, and returns
``float32 (N, D)`` embeddings, named ``embeddings``. Preprocessing (cast, scale to [0, 1],
mean/std, NHWC -> NCHW) is part of the graph and everything a consumer needs to know (input size,
mean/std, embedding size, params hash, classes) is stored in the model's metadata, so a consumer
needs nothing but onnxruntime.

An image-text (``clip``) model has two files: the image graph gets a second output,
``image_embeds``, unit vectors in the space shared with text, and the text tower is its own graph,
``int64 (N, context_length)`` token ids named ``tokens`` (what :func:`contrastive.text.encode`
makes with the tokenizer saved beside it) -> unit ``text_embeds``.

The model is only returned if onnxruntime reproduces the torch embeddings within ``export.atol``
and the linear probe (if the data have classes) predicts the same class from both on every test
image; otherwise
:class:`ExportCheckError` is raised and the stage writes nothing.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from contrastive.config import ConfigError, ExportConfig, StageFailed
from contrastive.models import EncoderInfo, LinearProbe, Preprocess, TextSide
from contrastive.text import SPECIAL_TOKENS, TOKENIZER_FILE, encode

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
IMAGE_EMBEDS = "image_embeds"
"""An image-text model's second image output: unit embeddings in the space it shares with text."""
TOKENS_NAME = "tokens"
TEXT_EMBEDS = "text_embeds"
"""The text tower's output: unit embeddings of ``int64 (N, context_length)`` token ids."""
TEXT_ONNX_FILE, TEXT_INFO_FILE = "text.onnx", "text.json"
"""The text tower's files in its folder (``paths.TEXT_ONNX_DIR``), beside the tokenizer."""
BATCH_SIZE = 256
"""Batch size of the parity check and of the large-batch latency measurement."""

# Metadata values stored as JSON (lists and numbers); every other value is a plain string.
_JSON_METADATA = ("input_size", "mean", "std", "embedding_dim", "classes", "context_length",
                  "special_ids")


class ExportCheckError(StageFailed):
    """The exported model does not reproduce the torch model closely enough to be used."""


class EmbeddingModel(nn.Sequential):
    """Raw ``uint8 (N, H, W, 3)`` RGB images -> embeddings ``float32 (N, D)``: what is exported."""

    def __init__(self, encoder: nn.Module, info: EncoderInfo) -> None:
        super().__init__(Preprocess(info.mean, info.std), encoder)


class ImageTextImageModel(nn.Module):
    """An image-text model's image side: raw images -> (encoder ``embeddings``, unit
    ``image_embeds`` in the shared space), so one file serves the probe and text search."""

    def __init__(self, encoder: nn.Module, info: EncoderInfo, image_head: nn.Module) -> None:
        super().__init__()
        self.embedding = EmbeddingModel(encoder, info)
        self.image_head = image_head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.embedding(images)
        return features, F.normalize(self.image_head(features), dim=1)


class TextModel(nn.Module):
    """Token ids ``int64 (N, L)`` -> unit ``text_embeds float32 (N, D)``: the text tower."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_encoder(tokens), dim=1)


@dataclass(frozen=True)
class Exported:
    """What :func:`export_encoder` gives: the checked ONNX file's bytes, its metrics (parity and
    the file: numbers that describe the model) and its report (the exporter, the timings and the
    threads they ran on: they change from run to run)."""

    model_bytes: bytes
    metrics: dict[str, Any]
    report: dict[str, Any]


@dataclass(frozen=True)
class _Run:
    """One exported graph, checked by onnx, and its outputs from torch and onnxruntime."""

    model_bytes: bytes
    session: ort.InferenceSession
    exporter: str
    fallback_reason: str | None
    export_seconds: float
    opset: int
    torch_outputs: list[np.ndarray]
    ort_outputs: list[np.ndarray]


def _export_and_run(model: nn.Module, example: torch.Tensor, input_name: str,
                    output_names: list[str], metadata: dict[str, Any], inputs: np.ndarray,
                    opset: int) -> _Run:
    """Export ``model`` in a temporary folder, add ``metadata``, check the graph, and run both
    torch and onnxruntime on ``inputs``."""
    with tempfile.TemporaryDirectory(prefix="contrastive-export-") as folder:
        path = Path(folder) / "model.onnx"
        start = time.perf_counter()
        exporter, fallback_reason = _export_onnx(model, example, path, opset, input_name,
                                                 output_names)
        export_seconds = time.perf_counter() - start
        _add_metadata(path, metadata)
        onnx.checker.check_model(str(path))
        session = ort_session(path)
        return _Run(path.read_bytes(), session, exporter, fallback_reason, export_seconds,
                    _default_opset(path), _torch_outputs(model, inputs),
                    _ort_outputs(session, input_name, output_names, inputs))


def export_encoder(encoder: nn.Module, info: EncoderInfo, probe: LinearProbe | None,
                   images: np.ndarray, cfg: ExportConfig,
                   image_head: nn.Module | None = None) -> Exported:
    """Export ``encoder`` (with its preprocessing, and for an image-text model its ``image_head``
    as a second output) to ONNX, check it against torch on ``images`` (the test split) and time
    both.

    The exporter writes into a temporary folder, removed at the end; the caller writes the bytes.
    Raises :class:`ExportCheckError` when onnxruntime disagrees with torch.
    """
    model = (EmbeddingModel(encoder, info) if image_head is None
             else ImageTextImageModel(encoder, info, image_head)).eval()
    outputs = [OUTPUT_NAME] if image_head is None else [OUTPUT_NAME, IMAGE_EMBEDS]
    example = torch.zeros(2, info.image_size, info.image_size, 3, dtype=torch.uint8)
    run = _export_and_run(model, example, INPUT_NAME, outputs, _image_metadata(info), images,
                          cfg.opset)
    parity = check_parity(run.torch_outputs[0], run.ort_outputs[0], probe, cfg.atol)
    if image_head is not None:
        parity["image_embeds_max_abs_diff"] = check_close(
            run.torch_outputs[1], run.ort_outputs[1], cfg.atol, IMAGE_EMBEDS)
    latency = _latency_ms(model, run.session, images, cfg.latency_repeats)
    metrics: dict[str, Any] = {
        **parity,
        "n_test": len(images),
        "onnx_file_bytes": len(run.model_bytes),
        "opset": run.opset,
    }
    report: dict[str, Any] = {
        **_exporter_report(run),
        "threads": torch.get_num_threads(),
        "latency_ms": latency,
        "speedup_b1": round(latency["torch_b1"] / latency["ort_b1"], 2),
        "speedup_b256": round(latency["torch_b256"] / latency["ort_b256"], 2),
    }
    return Exported(run.model_bytes, metrics, report)


def export_text_tower(side: TextSide, info: EncoderInfo, texts: list[str],
                      cfg: ExportConfig) -> Exported:
    """Export the text tower of an image-text model (token ids in, unit ``text_embeds`` out) and
    check it against torch on ``texts`` (the class prompts and test captions); the tokenizer
    that makes its input is saved beside it by the stage. Raises :class:`ExportCheckError`
    when onnxruntime disagrees with torch by more than ``export.atol``."""
    if len(texts) < 2:
        raise ConfigError(f"the text tower's parity check needs at least 2 texts, got "
                          f"{len(texts)}")
    tokens = encode(side.tokenizer, texts, side.config.context_length).numpy()
    model = TextModel(side.tower.text_encoder).eval()
    metadata = {
        "context_length": side.config.context_length,
        "text_encoder": side.kind,
        "embedding_dim": side.tower.text_encoder.embedding_dim,
        "params_hash": info.params_hash,
        "special_ids": dict(zip(SPECIAL_TOKENS, range(len(SPECIAL_TOKENS)), strict=True)),
        "tokenizer": TOKENIZER_FILE,
    }
    run = _export_and_run(model, torch.from_numpy(tokens[:2]), TOKENS_NAME, [TEXT_EMBEDS],
                          metadata, tokens, cfg.opset)
    metrics = {
        "max_abs_diff": check_close(run.torch_outputs[0], run.ort_outputs[0], cfg.atol,
                                    TEXT_EMBEDS),
        "n_texts": len(texts),
        "onnx_file_bytes": len(run.model_bytes),
        "opset": run.opset,
    }
    return Exported(run.model_bytes, metrics, _exporter_report(run))


def _exporter_report(run: _Run) -> dict[str, Any]:
    report: dict[str, Any] = {"exporter": run.exporter,
                              "export_seconds": round(run.export_seconds, 2)}
    if run.fallback_reason:
        report["dynamo_error"] = run.fallback_reason
    return report


def check_inputs(info: EncoderInfo, probe: LinearProbe | None, images: np.ndarray,
                 probe_path: str | Path, prepared_dir: str | Path) -> None:
    """Stop before any work when the encoder, probe (None: data without classes) and test
    images do not fit together."""
    if probe is not None and probe.linear.in_features != info.embedding_dim:
        raise ConfigError(f"{probe_path}: probe expects {probe.linear.in_features} features, "
                          f"the encoder gives {info.embedding_dim}; rerun the probe stage")
    expected = (info.image_size, info.image_size, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
        raise ConfigError(f"{prepared_dir}: test images must be uint8 (N, {info.image_size}, "
                          f"{info.image_size}, 3) like the encoder's training data, got "
                          f"{images.dtype} {images.shape}")
    if len(images) == 0:
        raise ConfigError(f"{prepared_dir}: the test split is empty")


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int,
                 input_name: str, output_names: list[str]) -> tuple[str, str | None]:
    """Write ``model`` to ``path`` with a dynamic batch axis; return (exporter, dynamo error).

    The dynamo exporter (torch.export) is the supported path. If it fails for some encoder, the
    legacy TorchScript exporter is tried, and the dynamo error is returned so it can be reported.
    ``example`` needs a batch of 2, not 1: torch.export specialises a dimension of size 1.
    """
    names = {"input_names": [input_name], "output_names": output_names, "opset_version": opset}
    try:
        torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
                          **names)
        return "dynamo", None
    except Exception as exc:  # any exporter failure means: try the other one
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter says it is
        torch.onnx.export(model, (example,), str(path), dynamo=False,
                          dynamic_axes={n: {0: "batch"} for n in [input_name, *output_names]},
                          **names)
    return "torchscript", reason


def _image_metadata(info: EncoderInfo) -> dict[str, Any]:
    """What a consumer needs to feed the image model and interpret its output."""
    return {
        "input_size": info.image_size,
        "channel_order": "RGB",
        "layout": "NHWC uint8",
        "mean": info.mean,
        "std": info.std,
        "embedding_dim": info.embedding_dim,
        "params_hash": info.params_hash,
        "encoder": info.model.get("encoder", ""),
        "classes": info.classes,
    }


def _add_metadata(path: Path, props: dict[str, Any]) -> None:
    """Store ``props`` in the model's metadata (lists, numbers and mappings as JSON)."""
    model = onnx.load(str(path))
    existing = {p.key: p.value for p in model.metadata_props}
    ours = {k: json.dumps(v) if k in _JSON_METADATA else str(v) for k, v in props.items()}
    onnx.helper.set_model_props(model, {**existing, **ours})
    _drop_stack_traces(model)
    onnx.save(model, str(path))


def _drop_stack_traces(model: onnx.ModelProto) -> None:
    """Remove the Python stack trace the dynamo exporter records on every node.

    It holds absolute paths of this machine (the project's and the environment's), so without
    this the file's bytes, and with them the registry's state key, would depend on the folder the
    project sits in, and the registered model would carry those paths.
    """
    graphs = [model.graph, *model.functions]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            kept = [p for p in node.metadata_props if not p.key.endswith("stack_trace")]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
            for attribute in node.attribute:  # subgraphs (If, Loop, Scan)
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)


def onnx_metadata(onnx_path: str | Path) -> dict[str, Any]:
    """The model's metadata: lists and numbers decoded from JSON, other values as strings."""
    model = onnx.load(str(onnx_path))
    return {p.key: json.loads(p.value) if p.key in _JSON_METADATA else p.value
            for p in model.metadata_props}


def _default_opset(path: Path) -> int:
    """The opset of the standard ONNX domain actually in the file (may differ from the asked)."""
    model = onnx.load(str(path))
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def ort_session(onnx_path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session with all graph optimisations and torch's thread count.

    One inter-op thread: the graph is a single chain, so parallelism comes from inside each op.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _batches(images: np.ndarray) -> list[np.ndarray]:
    return [images[i:i + BATCH_SIZE] for i in range(0, len(images), BATCH_SIZE)]


def _torch_outputs(model: nn.Module, inputs: np.ndarray) -> list[np.ndarray]:
    """Each output of ``model`` on ``inputs``, in batches."""
    per_batch = []
    with torch.inference_mode():
        for batch in _batches(inputs):
            out = model(torch.from_numpy(batch))
            per_batch.append(out if isinstance(out, tuple) else (out,))
    return [np.concatenate([b[i].numpy() for b in per_batch]) for i in range(len(per_batch[0]))]


def _ort_outputs(session: ort.InferenceSession, input_name: str, output_names: list[str],
                 inputs: np.ndarray) -> list[np.ndarray]:
    per_batch = [session.run(output_names, {input_name: b}) for b in _batches(inputs)]
    return [np.concatenate([b[i] for b in per_batch]) for i in range(len(output_names))]


def check_close(reference: np.ndarray, candidate: np.ndarray, atol: float, name: str) -> float:
    """The largest absolute difference; :class:`ExportCheckError` above ``atol`` (or NaN)."""
    max_abs_diff = float(np.max(np.abs(candidate.astype(np.float64) - reference)))
    if not max_abs_diff <= atol:  # written so that NaN fails too
        raise ExportCheckError(f"ONNX {name} differ from torch by up to {max_abs_diff:.3g}; "
                               f"limit export.atol = {atol:.3g}")
    return max_abs_diff


def check_parity(reference: np.ndarray, candidate: np.ndarray, probe: LinearProbe | None,
                 atol: float) -> dict[str, float]:
    """Compare ONNX embeddings (``candidate``) with torch's (``reference``), ``(N, D)`` each.

    Raises :class:`ExportCheckError` when the largest absolute difference exceeds ``atol`` (or is
    NaN) or when the probe's predicted class differs on any image. Returns both figures; only
    the first without a probe (data without classes).
    """
    max_abs_diff = check_close(reference, candidate, atol, OUTPUT_NAME)
    if probe is None:
        return {"max_abs_diff": max_abs_diff}
    with torch.inference_mode():
        predicted = [probe(torch.from_numpy(e)).argmax(dim=1) for e in (reference, candidate)]
    agreement = float((predicted[0] == predicted[1]).double().mean())
    if agreement < 1.0:
        raise ExportCheckError(f"probe predictions from ONNX agree with torch on {agreement:.2%} "
                               f"of {len(reference)} test images; limit 100%")
    return {"max_abs_diff": max_abs_diff, "prediction_agreement": agreement}


def _median_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time of each function in ms, after one untimed warm-up call of each.

    The functions take turns within every repeat, so a change in machine load (other processes)
    affects all of them alike and their ratio stays meaningful.
    """
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(t) * 1000, 4) for name, t in times.items()}


def _latency_ms(model: nn.Module, session: ort.InferenceSession, images: np.ndarray,
                repeats: int) -> dict[str, float]:
    """Median ms per batch, onnxruntime vs torch eager, at batch 1 and 256 (images tiled)."""
    latency = {}
    for size in (1, BATCH_SIZE):
        batch = np.ascontiguousarray(images[np.arange(size) % len(images)])
        tensor = torch.from_numpy(batch)
        with torch.inference_mode():
            latency |= _median_ms({
                f"ort_b{size}": lambda b=batch: session.run(None, {INPUT_NAME: b}),
                f"torch_b{size}": lambda t=tensor: model(t),
            }, repeats)
    return latency
