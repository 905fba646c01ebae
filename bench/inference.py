"""Benchmark 3, inference: onnxruntime against torch eager for the exported encoder.

The encoder of ``params.yaml`` (``small_cnn`` width 32 by default; ``--encoder resnet18_cifar``
for the ResNet) with non-trivial BatchNorm statistics goes through the project's export stage
(``contrastive.export.export_encoder``: uint8 NHWC images in, preprocessing inside the graph, parity
checks) on 32x32 CIFAR-10 test images. Then, taking turns within every repeat, at batch 1, 64 and
256:

- torch: the same ``EmbeddingModel`` (preprocessing + encoder) in eager mode under
  ``torch.inference_mode``, with torch's default threads, and at small batches also on one
  thread (torch's intra-op threads cost more than they bring on tiny ops, and much more when the
  cores are shared with other processes);
- onnxruntime: ``contrastive.export.ort_session`` (what the project's consumers get);
- with ``--variants``, onnxruntime sessions as a user would open them with default options, and
  with single settings changed, to show what each setting is worth.

Fails (exit 1) when onnxruntime's embeddings differ from torch's by more than ``export.atol``.

    python bench/inference.py [--repeats 30] [--encoder small_cnn] [--variants]
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _common import WrongResult, data_file, interleaved, line, machine_line, median, parser, run

from contrastive.config import ExportConfig, ModelConfig, load_params
from contrastive.export import INPUT_NAME, OUTPUT_NAME, EmbeddingModel, export_encoder, ort_session
from contrastive.models import (
    EncoderInfo,
    LinearProbe,
    build_encoder,
    load_encoder,
    load_probe,
    save_encoder,
    save_probe,
)

TARGETS = {1: 4.0, 256: 3.0}
ROOT = Path(__file__).resolve().parents[1]


def make_model(folder: Path, model: ModelConfig, images: np.ndarray, labels: np.ndarray,
               classes: list[str]) -> dict[str, Path]:
    """A saved encoder with non-trivial BatchNorm statistics, a probe and a prepared test split."""
    torch.manual_seed(0)
    encoder = build_encoder(model)
    for module in encoder.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    info = EncoderInfo(model=model.model_dump(mode="json"), image_size=images.shape[1],
                       mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26],
                       embedding_dim=encoder.embedding_dim, classes=classes,
                       params_hash="bench")
    probe = LinearProbe(encoder.embedding_dim, len(classes))
    paths = {"encoder": folder / "encoder.pt", "probe": folder / "probe.pt",
             "prepared": folder / "prepared", "onnx": folder / "encoder.onnx",
             "metrics": folder / "export.json"}
    save_encoder(paths["encoder"], encoder, info)
    save_probe(paths["probe"], probe)
    paths["prepared"].mkdir()
    np.savez(paths["prepared"] / "test.npz", x=images, y=labels)
    return paths


def session(path: Path, **settings: object) -> ort.InferenceSession:
    """An onnxruntime CPU session with default options except ``settings``."""
    options = ort.SessionOptions()
    for key, value in settings.items():
        if key.startswith("config:"):
            options.add_session_config_entry(key.removeprefix("config:"), str(value))
        else:
            setattr(options, key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30, help="timed calls per batch size (30)")
    p.add_argument("--encoder", default=None, help="model.encoder (default: params.yaml's)")
    p.add_argument("--batches", default="1,64,256", help="batch sizes (default 1,64,256)")
    p.add_argument("--one-thread-up-to", type=int, default=64,
                   help="also time torch on one thread at batch sizes up to this (default 64)")
    p.add_argument("--variants", action="store_true",
                   help="also time onnxruntime sessions with default and single changed options")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = data_file(args.data, "cifar10-dev-test.npz")
    with np.load(path) as npz:
        images, labels = npz["x"], npz["y"].astype(np.int64)
        classes = [str(c) for c in npz["classes"]]
    model_cfg = load_params(ROOT / "params.yaml").model
    if args.encoder:
        model_cfg = model_cfg.model_copy(update={"encoder": args.encoder})
    cfg = ExportConfig(latency_repeats=1)
    batches = [int(b) for b in args.batches.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
        paths = make_model(Path(tmp), model_cfg, images, labels, classes)
        encoder, info = load_encoder(paths["encoder"])
        exported = export_encoder(encoder, info, load_probe(paths["probe"]), images, cfg)
        paths["onnx"].write_bytes(exported.model_bytes)
        metrics = {**exported.metrics, **exported.report}
        model = EmbeddingModel(encoder, info).eval()
        threads = torch.get_num_threads()
        sessions: dict[str, ort.InferenceSession] = {"onnxruntime": ort_session(paths["onnx"])}
        if args.variants:
            sessions |= {
                "ort defaults, spinning": session(paths["onnx"]),
                "ort defaults, no spinning": session(
                    paths["onnx"], **{"config:session.intra_op.allow_spinning": "0"}),
                "ort basic optimisation": session(
                    paths["onnx"], graph_optimization_level=ort.GraphOptimizationLevel
                    .ORT_ENABLE_BASIC, intra_op_num_threads=threads, inter_op_num_threads=1),
                "ort 1 thread": session(paths["onnx"], intra_op_num_threads=1,
                                        inter_op_num_threads=1),
            }
        print(machine_line("inference"))
        print(f"# {model_cfg.encoder} ({info.embedding_dim}-d embeddings) on {info.image_size}x"
              f"{info.image_size} CIFAR-10 test images; exporter {metrics['exporter']}, opset "
              f"{metrics['opset']}, export parity max |diff| {metrics['max_abs_diff']:.2g}; "
              f"{args.repeats} repeats, medians", flush=True)

        for size in batches:
            batch = np.ascontiguousarray(images[np.arange(size) % len(images)])
            tensor = torch.from_numpy(batch)
            with torch.inference_mode():
                expected = model(tensor).numpy()
            for name, s in sessions.items():
                got = s.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
                diff = float(np.max(np.abs(got.astype(np.float64) - expected)))
                if not diff <= cfg.atol:
                    raise WrongResult(f"{name} at batch {size}: embeddings differ from torch by "
                                      f"{diff:.3g} (limit {cfg.atol:g})")

            def torch_call(t: torch.Tensor = tensor) -> None:
                with torch.inference_mode():
                    model(t)

            def torch_one_thread(t: torch.Tensor = tensor) -> None:
                torch.set_num_threads(1)
                try:
                    torch_call(t)
                finally:
                    torch.set_num_threads(threads)

            fns: dict[str, Callable[[], object]] = {"torch": torch_call}
            if size <= args.one_thread_up_to:
                fns["torch 1 thread"] = torch_one_thread
            for name, s in sessions.items():
                fns[name] = lambda s=s, b=batch: s.run([OUTPUT_NAME], {INPUT_NAME: b})
            times = interleaved(fns, args.repeats, warmup=2)
            ms = {name: median(t) * 1000 for name, t in times.items()}
            for name in sessions:
                ratio = ms["torch"] / ms[name]
                parts = [f"{name} {ms[name]:.3f} ms", f"torch {ms['torch']:.3f} ms",
                         f"ratio {ratio:.2f}x"]
                if name == "onnxruntime" and size in TARGETS:
                    parts.append(f"target >= {TARGETS[size]:g}x: "
                                 f"{'met' if ratio >= TARGETS[size] else 'NOT met'}")
                line(f"inference b{size}", *parts)
            if "torch 1 thread" in ms:
                one = ms["torch 1 thread"]
                line(f"inference b{size}", f"torch 1 thread {one:.3f} ms",
                     f"onnxruntime {ms['onnxruntime']:.3f} ms",
                     f"ratio {one / ms['onnxruntime']:.2f}x (torch without intra-op threads)")
        print(f"# check passed: onnxruntime within {cfg.atol:g} of torch at every batch size; "
              f"{os.cpu_count()} cores, torch and onnxruntime on {threads} threads", flush=True)


if __name__ == "__main__":
    run(main)
