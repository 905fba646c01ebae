"""ONNX export of the encoder, checked against torch and timed (the ``export`` stage,
:mod:`contrastive.stages.export`, writes the file and its metrics).

The exported graph takes raw images, ``uint8 (N, H, W, 3)`` RGB, named ``images``, and returns
``float32 (N, D)`` embeddings, named ``embeddings``. Preprocessing (cast, scale to [0, 1],
mean/std, NHWC -> NCHW) is part of the graph and everything a consumer needs to know (input size,
mean/std, embedding size, params hash, classes) is stored in the model's metadata, so a consumer
needs nothing but onnxruntime.

The model is only returned if onnxruntime reproduces the torch embeddings within ``export.atol``
and the linear probe predicts the same class from both on every test image; otherwise
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
from torch import nn

from contrastive.config import ConfigError, ExportConfig, StageFailed
from contrastive.models import EncoderInfo, LinearProbe, Preprocess

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
BATCH_SIZE = 256
"""Batch size of the parity check and of the large-batch latency measurement."""

# Metadata values stored as JSON (lists and numbers); every other value is a plain string.
_JSON_METADATA = ("input_size", "mean", "std", "embedding_dim", "classes")


class ExportCheckError(StageFailed):
    """The exported model does not reproduce the torch model closely enough to be used."""


class EmbeddingModel(nn.Sequential):
    """Raw ``uint8 (N, H, W, 3)`` RGB images -> embeddings ``float32 (N, D)``: what is exported."""

    def __init__(self, encoder: nn.Module, info: EncoderInfo) -> None:
        super().__init__(Preprocess(info.mean, info.std), encoder)


@dataclass(frozen=True)
class Exported:
    """What :func:`export_encoder` gives: the checked ONNX file's bytes, its metrics (parity and
    the file: numbers that describe the model) and its report (the exporter, the timings and the
    threads they ran on: they change from run to run)."""

    model_bytes: bytes
    metrics: dict[str, Any]
    report: dict[str, Any]


def export_encoder(encoder: nn.Module, info: EncoderInfo, probe: LinearProbe,
                   images: np.ndarray, cfg: ExportConfig) -> Exported:
    """Export ``encoder`` (with its preprocessing) to ONNX, check it against torch on
    ``images`` (the test split) and time both.

    The exporter writes into a temporary folder, removed at the end; the caller writes the bytes.
    Raises :class:`ExportCheckError` when onnxruntime disagrees with torch.
    """
    model = EmbeddingModel(encoder, info).eval()
    with tempfile.TemporaryDirectory(prefix="contrastive-export-") as folder:
        path = Path(folder) / "encoder.onnx"
        start = time.perf_counter()
        exporter, fallback_reason = _export_onnx(model, info.image_size, path, cfg.opset)
        export_seconds = time.perf_counter() - start
        _add_metadata(path, info)
        onnx.checker.check_model(str(path))
        session = ort_session(path)
        parity = check_parity(_torch_embed(model, images), _ort_embed(session, images),
                              probe, cfg.atol)
        latency = _latency_ms(model, session, images, cfg.latency_repeats)
        model_bytes = path.read_bytes()
        opset = _default_opset(path)

    metrics: dict[str, Any] = {
        **parity,
        "n_test": len(images),
        "onnx_file_bytes": len(model_bytes),
        "opset": opset,
    }
    report: dict[str, Any] = {
        "exporter": exporter,
        "export_seconds": round(export_seconds, 2),
        "threads": torch.get_num_threads(),
        "latency_ms": latency,
        "speedup_b1": round(latency["torch_b1"] / latency["ort_b1"], 2),
        "speedup_b256": round(latency["torch_b256"] / latency["ort_b256"], 2),
    }
    if fallback_reason:
        report["dynamo_error"] = fallback_reason
    return Exported(model_bytes, metrics, report)


def check_inputs(info: EncoderInfo, probe: LinearProbe, images: np.ndarray,
                 probe_path: str | Path, prepared_dir: str | Path) -> None:
    """Stop before any work when the encoder, probe and test images do not fit together."""
    if probe.linear.in_features != info.embedding_dim:
        raise ConfigError(f"{probe_path}: probe expects {probe.linear.in_features} features, "
                          f"the encoder gives {info.embedding_dim}; rerun the probe stage")
    expected = (info.image_size, info.image_size, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != expected:
        raise ConfigError(f"{prepared_dir}: test images must be uint8 (N, {info.image_size}, "
                          f"{info.image_size}, 3) like the encoder's training data, got "
                          f"{images.dtype} {images.shape}")
    if len(images) == 0:
        raise ConfigError(f"{prepared_dir}: the test split is empty")


def _export_onnx(model: nn.Module, image_size: int, path: Path,
                 opset: int) -> tuple[str, str | None]:
    """Write ``model`` to ``path`` with a dynamic batch axis; return (exporter, dynamo error).

    The dynamo exporter (torch.export) is the supported path. If it fails for some encoder, the
    legacy TorchScript exporter is tried, and the dynamo error is returned so it can be reported.
    """
    # Batch 2, not 1: torch.export specialises a dimension whose example size is 1.
    example = (torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8),)
    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    try:
        torch.onnx.export(model, example, str(path), dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
                          **names)
        return "dynamo", None
    except Exception as exc:  # any exporter failure means: try the other one
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter says it is
        torch.onnx.export(model, example, str(path), dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          **names)
    return "torchscript", reason


def _add_metadata(path: Path, info: EncoderInfo) -> None:
    """Store what a consumer needs to feed the model and interpret its output."""
    props = {
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


def _torch_embed(model: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(b)).numpy() for b in _batches(images)])


def _ort_embed(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    return np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: b})[0]
                           for b in _batches(images)])


def check_parity(reference: np.ndarray, candidate: np.ndarray, probe: LinearProbe,
                 atol: float) -> dict[str, float]:
    """Compare ONNX embeddings (``candidate``) with torch's (``reference``), ``(N, D)`` each.

    Raises :class:`ExportCheckError` when the largest absolute difference exceeds ``atol`` (or is
    NaN) or when the probe's predicted class differs on any image. Returns both figures.
    """
    max_abs_diff = float(np.max(np.abs(candidate.astype(np.float64) - reference)))
    if not max_abs_diff <= atol:  # written so that NaN fails too
        raise ExportCheckError(f"ONNX embeddings differ from torch by up to {max_abs_diff:.3g}; "
                               f"limit export.atol = {atol:.3g}")
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
                f"ort_b{size}": lambda b=batch: session.run([OUTPUT_NAME], {INPUT_NAME: b}),
                f"torch_b{size}": lambda t=tensor: model(t),
            }, repeats)
    return latency
