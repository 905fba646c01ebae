"""Run one pipeline stage (``contrastive <stage>``) and record where its time went.

Used by ``bench/pipeline.py`` in place of a stage's ``cmd`` inside a temporary copy of the project:
``python bench/_stage_timer.py <stage>``. It appends one JSON line to ``$BENCH_STAGE_LOG`` with wall
clock timestamps (seconds since the epoch):

- ``created``: when the process was created (from ``/proc``), before the interpreter started;
- ``started``: this file's first line, once the interpreter is up;
- ``imported``: after the stage's modules are imported (the imports the stage function makes when
  it starts; imports made later inside the work, e.g. matplotlib for a plot, count as work);
- ``loop_start``, ``loop_end``: the pretraining loop (pretrain only);
- ``ended``: when the stage function returned.
"""

from __future__ import annotations

import time

STARTED = time.time()

import contextlib  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

MODULES = {
    "prepare": ["contrastive.data"],
    "pretrain": ["contrastive.train"],
    "probe": ["contrastive.evaluate"],
    "export": ["contrastive.export"],
    "register": ["contrastive.registry", "contrastive.tracking"],
}


def process_created() -> float:
    """Wall-clock time when this process was created, or when this file started if unknown."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(ln.split()[1]) for ln in f if ln.startswith("btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return STARTED


def run_stage(stage: str, record: dict[str, object]) -> int:
    """The stage as its ``cmd`` runs it; pretrain through the library, to time its loop with a
    callback."""
    import contrastive.cli

    if stage != "pretrain":
        return contrastive.cli.main([stage, *sys.argv[2:]])
    from contrastive.callbacks import Callback
    from contrastive.config import load_params
    from contrastive.layout import Layout
    from contrastive.stages import pretrain

    class LoopTimer(Callback):
        def on_train_start(self, state: object) -> None:
            record["loop_start"] = time.time()

        def on_train_end(self, state: object) -> None:
            record["loop_end"] = time.time()

    pretrain.run(load_params(), Layout(), callbacks=[LoopTimer()])
    return 0


def main() -> int:
    stage = sys.argv[1]
    record: dict[str, object] = {"stage": stage, "created": process_created(), "started": STARTED}
    import contrastive.cli  # noqa: F401  (the CLI's own imports count as start-up)

    for name in MODULES.get(stage, []):
        with contextlib.suppress(ImportError):  # a stage this list knows but the CLI lacks
            importlib.import_module(name)
    record["imported"] = time.time()
    try:
        return run_stage(stage, record)
    finally:
        record["ended"] = time.time()
        with open(os.environ["BENCH_STAGE_LOG"], "a") as log:
            log.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    sys.exit(main())
