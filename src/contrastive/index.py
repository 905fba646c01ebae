"""A nearest-neighbour index of a gallery's embeddings, tied to the encoder that made them.

Two kinds behind one interface (:class:`ExactIndex`, :class:`FaissIndex`): ``search(queries, k)``
returns cosine similarities and gallery positions, best first. Small galleries (up to
:data:`EXACT_LIMIT` images) use exact search, a matrix product in numpy; larger ones use FAISS's
HNSW graph (``faiss-cpu``), which answers a query without comparing it to every image
(``bench/index.py`` measures the trade: queries per second and recall against exact search).

An index folder holds ``index.json`` (what made it: the encoder's params hash and a fingerprint of
its embeddings, the gallery's files and those skipped) and the vectors (``vectors.npy`` or
``index.faiss``). :meth:`GalleryIndex.check` refuses an index made by another encoder: the params
hash must match, and the encoder must reproduce the fingerprint, the embeddings of two fixed
probe images, so an encoder with the same params but other weights is caught too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from contrastive.config import ConfigError

EXACT_LIMIT = 20_000
"""Galleries up to this many images get an exact index; larger ones a FAISS HNSW index."""
HNSW_NEIGHBOURS = 32  # M: graph edges per node (FAISS's usual default range 16-64)
HNSW_EF_SEARCH = 128  # candidates kept while searching: higher is slower and more exact
FINGERPRINT_ATOL = 1e-4
META_FILE = "index.json"
FORMAT = 1


class Searcher(Protocol):
    """What both index kinds offer."""

    kind: str

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def save(self, folder: Path) -> None: ...


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (cosine similarity becomes an inner product), as float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ExactIndex:
    """Exact cosine search: every query against every gallery vector."""

    kind = "exact"

    def __init__(self, vectors: np.ndarray) -> None:
        self.vectors = unit(vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` most similar gallery rows of each query: ``(scores, positions)``, (Q, k)."""
        sim = unit(queries) @ self.vectors.T
        k = min(k, sim.shape[1])
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1, kind="stable")
        positions = np.take_along_axis(top, order, axis=1)
        return np.take_along_axis(sim, positions, axis=1), positions

    def save(self, folder: Path) -> None:
        np.save(folder / "vectors.npy", self.vectors)

    @classmethod
    def load(cls, folder: Path) -> ExactIndex:
        return cls(np.load(folder / "vectors.npy"))


class FaissIndex:
    """Approximate cosine search with FAISS's HNSW graph on unit vectors (inner product)."""

    kind = "faiss-hnsw"

    def __init__(self, index: Any) -> None:
        self.index = index
        self.index.hnsw.efSearch = HNSW_EF_SEARCH

    @classmethod
    def build(cls, vectors: np.ndarray) -> FaissIndex:
        import faiss

        vectors = unit(vectors)
        index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.add(vectors)
        return cls(index)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`ExactIndex.search`; positions of -1 (too few found) are dropped by callers."""
        return self.index.search(unit(queries), min(k, self.index.ntotal))

    def save(self, folder: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(folder / "index.faiss"))

    @classmethod
    def load(cls, folder: Path) -> FaissIndex:
        import faiss

        return cls(faiss.read_index(str(folder / "index.faiss")))


def build_searcher(vectors: np.ndarray, kind: str = "auto") -> Searcher:
    """``exact`` up to :data:`EXACT_LIMIT` vectors when ``auto``, else FAISS HNSW."""
    if kind == "auto":
        kind = "exact" if len(vectors) <= EXACT_LIMIT else "faiss-hnsw"
    return ExactIndex(vectors) if kind == "exact" else FaissIndex.build(vectors)


@dataclass
class GalleryIndex:
    """A searcher, the gallery's item names in index order, and what made the embeddings."""

    searcher: Searcher
    items: list[str]
    encoder: dict[str, Any]  # params_hash, fingerprint, embedding_dim, model
    skipped: list[dict[str, str]] = field(default_factory=list)

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[float, str]]]:
        """Per query, up to ``k`` ``(cosine, item)`` pairs, best first; ``k`` must fit the
        gallery."""
        if k > len(self.items):
            raise ConfigError(f"-k {k}: the gallery index holds only {len(self.items)} images")
        scores, positions = self.searcher.search(queries, k)
        return [[(float(s), self.items[p]) for s, p in zip(row_s, row_p, strict=True) if p >= 0]
                for row_s, row_p in zip(scores, positions, strict=True)]

    def check(self, identity: dict[str, Any], where: str) -> None:
        """Refuse to serve an encoder other than the one that built the index (one line)."""
        built, given = self.encoder.get("params_hash"), identity.get("params_hash")
        if built != given:
            raise ConfigError(f"{where}: built by the encoder with params hash {built}, not by "
                              f"this model ({given}); rebuild it with `contrastive index build`")
        same = np.allclose(np.asarray(self.encoder["fingerprint"]),
                           np.asarray(identity["fingerprint"]), atol=FINGERPRINT_ATOL)
        if not same:
            raise ConfigError(f"{where}: built by an encoder with the same params hash "
                              f"({built}) but other weights; rebuild it with `contrastive index "
                              "build`")

    def save(self, folder: str | Path) -> None:
        """Write into ``folder`` (which the caller makes atomic: files.atomic_path)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.searcher.save(folder)
        meta = {"format": FORMAT, "kind": self.searcher.kind, "size": len(self.items),
                "items": self.items, "encoder": self.encoder, "skipped": self.skipped}
        (folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> GalleryIndex:
        """Read an index folder; a folder that is not one is a one-line :class:`ConfigError`."""
        folder = Path(folder)
        try:
            meta = json.loads((folder / META_FILE).read_text())
            searcher: Searcher = (ExactIndex.load(folder) if meta["kind"] == "exact"
                                  else FaissIndex.load(folder))
            return cls(searcher, list(meta["items"]), dict(meta["encoder"]), meta["skipped"])
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            raise ConfigError(f"{folder}: not a gallery index ({type(exc).__name__}: {exc}); "
                              "build one with `contrastive index build`") from None


def fingerprint_images(size: int) -> np.ndarray:
    """Two fixed images, ``uint8 (2, size, size, 3)``, whose embeddings identify an encoder."""
    return np.random.default_rng(20200416).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
