"""Gallery indexes published with a registered model: build, publish, fetch, search.

``contrastive index build --model models:/NAME@ALIAS --gallery DIR|NPZ`` embeds a gallery with the
registered encoder, builds a :class:`~contrastive.index.GalleryIndex` and logs it as an artifact
of the model version's run, under a new path each time; the version's tags
(``gallery_index.*``) then point at it. Setting the tags is the last step, so a failed upload
leaves the version with its previous index (or none), never half of one. ``contrastive search``
uses that index when the version has one and no ``--gallery`` is given.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contrastive.config import ConfigError
from contrastive.data import read_image, standardize_images
from contrastive.files import atomic_path
from contrastive.index import GalleryIndex, build_searcher, fingerprint_images
from contrastive.inference import Encoder, embed_files, list_images, load_model
from contrastive.store import connect, first_line, mlflow_errors

TAG = "gallery_index"
"""Model-version tags: ``gallery_index.uri``, ``.params_hash``, ``.size``, ``.kind``."""
KINDS = ("auto", "exact", "faiss-hnsw")
_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w.-]+)|/(?P<version>\d+))")


def identity(encoder: Encoder) -> dict[str, Any]:
    """What an index records of the encoder that built it (see GalleryIndex.check)."""
    print_ = encoder.embed(fingerprint_images(encoder.input_size), output=encoder.search_space)
    return {"params_hash": encoder.params_hash, "model": encoder.source,
            "embedding_dim": int(print_.shape[1]),
            "fingerprint": np.round(print_.astype(np.float64), 6).tolist()}


@dataclass
class Gallery:
    """A gallery's images as embeddings, their names, and what was skipped."""

    items: list[str]
    embeddings: np.ndarray
    skipped: list[dict[str, str]]


def embed_gallery(encoder: Encoder, gallery: str, batch_size: int = 256) -> Gallery:
    """Embed a folder of image files (undecodable files skipped and listed) or an ``.npz`` whose
    ``x`` holds ``uint8 (N, H, W[, C])`` images (grey or RGB, resized as prepare does), in the
    encoder's search space."""
    path = Path(gallery)
    if path.suffix == ".npz" and path.is_file():
        images = _npz_images(path, encoder.input_size)
        return Gallery([f"{path.name}#{i}" for i in range(len(images))],
                       encoder.embed(images, batch_size, encoder.search_space), [])
    files = list_images([gallery])
    embedded = embed_files(encoder, files, batch_size, output=encoder.search_space)
    return Gallery([str(f) for f in embedded.files], embedded.embeddings, embedded.skipped)


def _npz_images(path: Path, size: int) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "x" not in npz.files:
                raise ConfigError(f"--gallery {path}: no array 'x' (has {npz.files})")
            x = npz["x"]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--gallery {path}: not a readable .npz ({first_line(exc)})") from None
    channels_ok = x.ndim == 3 or (x.ndim == 4 and x.shape[3] in (1, 3))
    if x.dtype != np.uint8 or not channels_ok:
        raise ConfigError(f"--gallery {path}: 'x' must be uint8 (N, H, W), (N, H, W, 1) or "
                          f"(N, H, W, 3) images, got {x.dtype} {x.shape}")
    if len(x) == 0:
        raise ConfigError(f"--gallery {path}: holds no images")
    return standardize_images(x, size)


def build_index(model: str, gallery: str, out: str | None = None, kind: str = "auto",
                batch_size: int = 256) -> dict[str, Any]:
    """``contrastive index build``: index ``gallery`` with ``model``; publish it on the model
    version (a ``models:/`` URI) and/or write it to folder ``out``."""
    if kind not in KINDS:
        raise ConfigError(f"--kind {kind}: must be one of {', '.join(KINDS)}")
    registered = _MODEL_URI.fullmatch(model)
    if registered is None and out is None:
        raise ConfigError(f"--model {model}: not a models:/ URI, so the index cannot be logged "
                          "with it; give --out FOLDER to write it locally")
    encoder = load_model(model)
    found = embed_gallery(encoder, gallery, batch_size)
    index = GalleryIndex(build_searcher(found.embeddings, kind), found.items, identity(encoder),
                         found.skipped)
    summary: dict[str, Any] = {"model": model, "gallery": gallery, "size": len(found.items),
                               "kind": index.searcher.kind, "skipped": found.skipped}
    if out is not None:
        with atomic_path(out) as tmp:
            index.save(tmp)
        summary["out"] = out
    if registered is not None:
        summary.update(publish(model, index))
    return summary


def publish(model: str, index: GalleryIndex) -> dict[str, Any]:
    """Log ``index`` into the model version's run and point the version's tags at it."""
    client, version = model_version(model)
    if not version.run_id:
        raise ConfigError(f"--model {model}: version {version.version} has no run to hold the "
                          "index")
    with tempfile.TemporaryDirectory(prefix="contrastive-index-") as folder:
        index.save(folder)
        digest = hashlib.sha256()
        for file in sorted(Path(folder).iterdir()):
            digest.update(file.read_bytes())
        path = f"{TAG}-{digest.hexdigest()[:12]}"
        with mlflow_errors(f"logging the gallery index of {model}"):
            client.log_artifacts(version.run_id, folder, path)
            uri = f"runs:/{version.run_id}/{path}"
            # The uri tag last: until then the version still names its previous index.
            for key, value in (("params_hash", index.encoder.get("params_hash")),
                               ("size", len(index.items)), ("kind", index.searcher.kind),
                               ("uri", uri)):
                client.set_model_version_tag(version.name, version.version, f"{TAG}.{key}",
                                             str(value))
    return {"version": int(version.version), "artifact": uri}


def model_version(model: str) -> tuple[Any, Any]:
    """The MLflow client and the model version that ``models:/NAME@ALIAS|/VERSION`` names."""
    from mlflow.exceptions import MlflowException

    match = _MODEL_URI.fullmatch(model)
    if match is None:
        raise ConfigError(f"--model {model}: not a models:/NAME@ALIAS or models:/NAME/VERSION URI")
    client = connect(must_exist=True)
    name, alias = match["name"], match["alias"]
    with mlflow_errors(f"looking up {model}"):
        try:
            version = (client.get_model_version_by_alias(name, alias) if alias
                       else client.get_model_version(name, match["version"]))
        except MlflowException as exc:
            raise ConfigError(f"--model {model}: {first_line(exc)}") from None
    return client, version


def fetch_index(model: str) -> GalleryIndex | None:
    """The index published on the version ``model`` names, or None (no index, not a URI)."""
    import mlflow

    if _MODEL_URI.fullmatch(model) is None:
        return None
    _, version = model_version(model)
    uri = version.tags.get(f"{TAG}.uri")
    if not uri:
        return None
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="contrastive-index-") as folder, \
            mlflow_errors(f"downloading the gallery index of {model}"):
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=folder)
        return GalleryIndex.load(local)


def search(model: str, queries: Sequence[str], k: int = 5, gallery: str | None = None,
           index_dir: str | None = None, batch_size: int = 256,
           texts: Sequence[str] = ()) -> list[dict[str, Any]]:
    """``contrastive search``: per query image, and per query text (``--text``, an image-text
    model), the ``k`` most similar gallery images (cosine).

    The gallery is, in this order: ``gallery`` (a folder or .npz, embedded now), the index folder
    ``index_dir``, or the index published on the model version.
    """
    if k < 1:
        raise ConfigError(f"-k {k}: must be at least 1")
    if not queries and not texts:
        raise ConfigError("search: give query images, or --text \"a sentence\"")
    empty = [t for t in texts if not t.strip()]
    if empty:
        raise ConfigError("--text: a query text is empty")
    missing = [q for q in queries if not Path(q).is_file()]
    if missing:
        raise ConfigError(f"{missing[0]}: query image not found")
    encoder = load_model(model)
    text_tower = encoder.texts() if texts else None
    if gallery is not None:
        found = embed_gallery(encoder, gallery, batch_size)
        index = GalleryIndex(build_searcher(found.embeddings, "exact"), found.items,
                             identity(encoder), found.skipped)
    else:
        index = GalleryIndex.load(index_dir) if index_dir else fetch_index(model)
        if index is None:
            raise ConfigError(f"--model {model}: has no gallery index; build one with "
                              "`contrastive index build`, or give --gallery or --index")
        index.check(identity(encoder), f"--index {index_dir}" if index_dir
                    else f"the gallery index of {model}")
    images = []
    for query in queries:
        try:
            images.append(read_image(Path(query), encoder.input_size))
        except Exception as exc:  # any decoder failure
            raise ConfigError(f"{query}: not a readable image ({first_line(exc)})") from None
    vectors = []
    if images:
        vectors.append(encoder.embed(np.stack(images), batch_size, encoder.search_space))
    if text_tower is not None:
        vectors.append(text_tower.embed(texts, batch_size))
    hits = index.search(np.concatenate(vectors), k)
    return [{"query": str(q), "neighbours": [{"rank": r, "cosine": round(score, 6), "image": item}
                                            for r, (score, item) in enumerate(row, 1)]}
            for q, row in zip([*queries, *texts], hits, strict=True)]


def format_hits(results: list[dict[str, Any]]) -> str:
    """The search results as a table: one block per query."""
    lines = []
    for result in results:
        if len(results) > 1:
            lines.append(f"query {result['query']}")
        lines.append("rank  cosine  image")
        lines += [f"{hit['rank']:>4}  {hit['cosine']:6.4f}  {hit['image']}"
                  for hit in result["neighbours"]]
    return "\n".join(lines)

