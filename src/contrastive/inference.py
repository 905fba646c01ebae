"""Using a registered encoder: open it, embed image files (and for an image-text model,
texts), with onnxruntime only.

Searching a gallery is :mod:`contrastive.gallery`; anomaly scores, :mod:`contrastive.anomaly`.

A model is named by an MLflow model URI (``models:/contrastive-encoder@champion``,
``models:/contrastive-encoder/3``, ``runs:/<id>/encoder-onnx``) or by a local ``.onnx`` file or
model folder. Image files are read the way the prepare stage reads an image folder (upright, RGB,
resized to the model's input size); a file that does not decode is reported and skipped.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from contrastive.config import ConfigError
from contrastive.data import read_image  # the prepare stage's image decoding
from contrastive.export import (
    IMAGE_EMBEDS,
    INPUT_NAME,
    OUTPUT_NAME,
    TEXT_EMBEDS,
    TEXT_INFO_FILE,
    TEXT_ONNX_FILE,
    TOKENS_NAME,
    onnx_metadata,
    ort_session,
)
from contrastive.files import atomic_path
from contrastive.paths import TEXT_ONNX_DIR
from contrastive.store import connect, first_line, mlflow_errors
from contrastive.text import TOKENIZER_FILE

OUTPUT_FORMATS = (".npy", ".parquet")


@dataclass
class TextEncoder:
    """The text tower of an image-text model and the tokenizer beside it (which truncates and
    pads to the tower's context itself)."""

    session: Any  # onnxruntime.InferenceSession
    tokenizer: Any  # tokenizers.Tokenizer
    logit_scale: float | None = None
    """1 / the learned temperature (``text.json``): cosine x scale are CLIP's logits; None when
    the model does not say (exported before it was recorded)."""

    def embed(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Unit embeddings ``float32 (N, D)`` of ``texts``, in the space of ``image_embeds``."""
        tokens = np.array([e.ids for e in self.tokenizer.encode_batch(list(texts))],
                          dtype=np.int64)
        return np.concatenate([
            self.session.run([TEXT_EMBEDS], {TOKENS_NAME: tokens[i:i + batch_size]})[0]
            for i in range(0, len(tokens), batch_size)
        ])


@dataclass
class Encoder:
    """An onnxruntime session of an exported encoder and what it expects."""

    session: Any  # onnxruntime.InferenceSession
    input_size: int
    source: str
    params_hash: str | None = None
    """The training params' hash from the ONNX metadata: names the encoder (gallery indexes)."""
    text: TextEncoder | None = None
    """The text tower of an image-text (clip) model; None for an image-only one."""
    classes: list[str] = field(default_factory=list)

    def embed(self, images: np.ndarray, batch_size: int = 256,
              output: str = OUTPUT_NAME) -> np.ndarray:
        """Embeddings ``float32 (N, D)`` of ``uint8 (N, S, S, 3)`` images, in batches: the
        encoder's (``embeddings``), or an image-text model's unit ``image_embeds``."""
        return np.concatenate([
            self.session.run([output], {INPUT_NAME: images[i:i + batch_size]})[0]
            for i in range(0, len(images), batch_size)
        ])

    def texts(self) -> TextEncoder:
        """The text tower; a :class:`ConfigError` for a model that has none."""
        if self.text is None:
            raise ConfigError(f"--model {self.source}: has no text tower; texts and class names "
                              "need a model trained with train.method: clip")
        return self.text

    def embed_shared(self, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Unit ``image_embeds`` of an image-text model, comparable with its text embeddings."""
        self.texts()
        return self.embed(images, batch_size, IMAGE_EMBEDS)

    @property
    def search_space(self) -> str:
        """The output galleries are searched in: an image-text model's shared space (so that
        images and texts query one index), else the encoder's embeddings."""
        return IMAGE_EMBEDS if self.text is not None else OUTPUT_NAME


def load_model(model: str) -> Encoder:
    """Open ``model``: a local ``.onnx`` file or MLflow model folder, or an MLflow model URI.

    A missing file, alias, version or model name is a :class:`ConfigError` (one line); a store
    that cannot be reached is a :class:`~contrastive.store.TrackingError`.
    """
    local = Path(model)
    if local.exists():
        return _open(*_onnx_files(local, model), model)
    if ":/" not in model:
        raise ConfigError(f"--model {model}: no such file, and not a model URI "
                          "(models:/NAME@ALIAS or models:/NAME/VERSION)")
    with tempfile.TemporaryDirectory(prefix="contrastive-model-") as folder:
        _download(model, folder)
        return _open(*_onnx_files(Path(folder), model), model)


def _download(uri: str, folder: str) -> None:
    """Download the artifacts of model ``uri`` into ``folder``; lookup errors are ConfigErrors."""
    import mlflow
    from mlflow.exceptions import MlflowException

    connect(must_exist=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # ours is enough
    with mlflow_errors(f"downloading {uri}"):
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                message = str(exc).strip().splitlines()[0]
                raise ConfigError(f"--model {uri}: {message}") from None
            raise


def _onnx_files(path: Path, name: str) -> tuple[Path, Path | None]:
    """The image model and, when there is one, the text tower: a file and the project's
    ``models/text/text.onnx`` beside it, or a model folder's ``.onnx`` files."""
    if path.is_file():
        text = path.parent / Path(TEXT_ONNX_DIR).name / TEXT_ONNX_FILE
        return path, text if text.is_file() else None
    found = sorted(path.rglob("*.onnx"))
    images = [f for f in found if f.name != TEXT_ONNX_FILE]
    if not images:
        raise ConfigError(f"--model {name}: holds no .onnx file")
    texts = [f for f in found if f.name == TEXT_ONNX_FILE]
    return images[0], texts[0] if texts else None


def _session(onnx_path: Path, source: str) -> Any:
    try:
        return ort_session(onnx_path)
    except Exception as exc:  # onnxruntime raises its own, unexported error types
        reason = first_line(exc)
        raise ConfigError(f"--model {source}: not a usable ONNX model ({reason})") from None


def _open(onnx_path: Path, text_path: Path | None, source: str) -> Encoder:
    """onnxruntime sessions; the input size comes from the model's metadata or input shape."""
    session = _session(onnx_path, source)
    metadata = onnx_metadata(onnx_path)
    size = metadata.get("input_size") or session.get_inputs()[0].shape[1]
    if not isinstance(size, int):
        raise ConfigError(f"--model {source}: the model does not say its input size")
    params_hash = metadata.get("params_hash")
    outputs = {o.name for o in session.get_outputs()}
    text = None
    if text_path is not None and IMAGE_EMBEDS in outputs:
        from tokenizers import Tokenizer

        tokenizer = text_path.parent / TOKENIZER_FILE
        if not tokenizer.is_file():
            raise ConfigError(f"--model {source}: {TOKENIZER_FILE} missing beside {TEXT_ONNX_FILE}")
        info = text_path.parent / TEXT_INFO_FILE
        scale = json.loads(info.read_text()).get("logit_scale") if info.is_file() else None
        text = TextEncoder(_session(text_path, source), Tokenizer.from_file(str(tokenizer)),
                           scale)
    return Encoder(session, size, source, str(params_hash) if params_hash else None, text,
                   list(metadata.get("classes") or []))


# --- image files --------------------------------------------------------------------------------


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Files given, and every non-hidden file below folders given, in sorted order."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(
                f for f in path.rglob("*")
                if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
            )
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{path}: no such file or folder")
    if not files:
        raise ConfigError(f"{', '.join(map(str, paths))}: no files to embed")
    return files


@dataclass
class Embedded:
    """Embeddings of the files that decoded, in order, and the files skipped with the reason."""

    files: list[Path]
    embeddings: np.ndarray
    skipped: list[dict[str, str]] = field(default_factory=list)


def embed_files(encoder: Encoder, files: Sequence[Path], batch_size: int = 256,
                progress: bool = True, output: str = OUTPUT_NAME) -> Embedded:
    """Decode and embed ``files`` a batch at a time; undecodable files are reported and skipped."""
    kept: list[Path] = []
    chunks: list[np.ndarray] = []
    skipped: list[dict[str, str]] = []
    bar = tqdm(total=len(files), desc="embed", unit="img", disable=not progress, leave=False)
    for start in range(0, len(files), batch_size):
        images = []
        for path in files[start:start + batch_size]:
            try:
                images.append(read_image(path, encoder.input_size))
                kept.append(path)
            except Exception as exc:  # any decoder failure means: skip this file and say why
                skipped.append({"file": str(path), "reason": first_line(exc)})
                tqdm.write(f"skipped {path}: {first_line(exc)}", file=sys.stderr)
            bar.update()
        if images:
            chunks.append(encoder.embed(np.stack(images), batch_size, output))
    bar.close()
    if not kept:
        raise ConfigError(f"none of the {len(files)} files is a readable image")
    return Embedded(kept, np.concatenate(chunks), skipped)


def write_embeddings(path: str | Path, embedded: Embedded) -> None:
    """``.npy``: the ``(N, D)`` array, rows in file order; ``.parquet``: ``file`` and ``embedding``
    columns. Written atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".npy":
            with tmp.open("wb") as handle:
                np.save(handle, embedded.embeddings)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            vectors = embedded.embeddings.astype(np.float32)
            column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
            table = pa.table({"file": [str(f) for f in embedded.files], "embedding": column})
            pq.write_table(table, tmp)


def embed(model: str, inputs: Sequence[str], out: str, batch_size: int = 256) -> dict[str, Any]:
    """``contrastive embed``: embed image files and folders into ``out`` (.npy or .parquet)."""
    if Path(out).suffix not in OUTPUT_FORMATS:
        raise ConfigError(f"--out {out}: must end in {' or '.join(OUTPUT_FORMATS)}")
    files = list_images(inputs)
    encoder = load_model(model)
    embedded = embed_files(encoder, files, batch_size)
    write_embeddings(out, embedded)
    return {"model": model, "out": out, "embedded": len(embedded.files),
            "dim": int(embedded.embeddings.shape[1]), "skipped": embedded.skipped}
