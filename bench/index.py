"""Benchmark: the FAISS HNSW gallery index against exact search, on 50,000 embeddings.

Synthetic embeddings stand in for a gallery: 50,000 vectors of 128 dimensions drawn around 100
cluster centres (real embeddings cluster by class), and 1,000 queries from the same mixture.
Both indexes are the project's (``contrastive.index``: ``ExactIndex``, a numpy matrix product,
and ``FaissIndex``, HNSW with M=32 and efSearch=128); they take turns answering the same queries,
in batches of 1,000 and one query at a time. Printed: queries per second of each, their ratio,
the build time, and the recall@10 of HNSW against exact search.

Fails (exit 1) when HNSW's recall@10 falls below 0.9: a fast index that misses is wrong.

    python bench/index.py [--size 50000] [--dim 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import WrongResult, interleaved, line, machine_line, median, run

from contrastive.index import ExactIndex, FaissIndex

K = 10
MIN_RECALL = 0.9


def synthetic(size: int, dim: int, queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gallery and query vectors around 100 shared cluster centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(100, dim)).astype(np.float32)

    def draw(n: int) -> np.ndarray:
        return centres[rng.integers(0, 100, n)] + 0.7 * rng.normal(size=(n, dim)).astype(
            np.float32)

    return draw(size), draw(queries)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=50_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", type=int, default=1_000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(machine_line("gallery index: FAISS HNSW vs exact"), flush=True)
    gallery, queries = synthetic(args.size, args.dim, args.queries)

    start = time.perf_counter()
    exact = ExactIndex(gallery)
    exact_build = time.perf_counter() - start
    start = time.perf_counter()
    hnsw = FaissIndex.build(gallery)
    hnsw_build = time.perf_counter() - start
    line("build", f"exact {exact_build:.2f} s", f"hnsw {hnsw_build:.2f} s",
         f"({args.size:,} x {args.dim})")

    truth = exact.search(queries, K)[1]
    found = hnsw.search(queries, K)[1]
    recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth, strict=True)]))
    line("recall@10 of hnsw", f"{recall:.4f}", f"(of exact, {args.queries:,} queries)")

    batched = interleaved({"exact": lambda: exact.search(queries, K),
                           "hnsw": lambda: hnsw.search(queries, K)}, args.repeats)
    qps = {name: args.queries / median(t) for name, t in batched.items()}
    line(f"batch of {args.queries:,}", f"exact {qps['exact']:,.0f} q/s",
         f"hnsw {qps['hnsw']:,.0f} q/s", f"ratio {qps['hnsw'] / qps['exact']:.1f}x")

    singles = queries[:100]

    def one_by_one(index: ExactIndex | FaissIndex) -> None:
        for query in singles:
            index.search(query[None], K)

    single = interleaved({"exact": lambda: one_by_one(exact), "hnsw": lambda: one_by_one(hnsw)},
                         max(1, args.repeats // 2))
    qps1 = {name: len(singles) / median(t) for name, t in single.items()}
    line("one query at a time", f"exact {qps1['exact']:,.0f} q/s",
         f"hnsw {qps1['hnsw']:,.0f} q/s", f"ratio {qps1['hnsw'] / qps1['exact']:.1f}x")
    if recall < MIN_RECALL:
        raise WrongResult(f"HNSW recall@10 {recall:.4f} < {MIN_RECALL}")


if __name__ == "__main__":
    run(main)
