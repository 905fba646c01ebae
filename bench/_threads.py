"""Imported first by a benchmark: the thread policy of the ``contrastive`` command (one OpenMP
thread per usable CPU, passive waiting), which must be set before torch loads.

A child of ``bench/pretrain_overhead.py --policies`` with ``BENCH_OMP_POLICY=default`` keeps
libgomp's own waiting (spin, then sleep) and sets only the thread count.
"""

import os

from contrastive.cpu import configure_threads, usable_cpus

if os.environ.get("BENCH_OMP_POLICY") == "default":
    os.environ.setdefault("OMP_NUM_THREADS", str(usable_cpus()))
else:
    configure_threads()
