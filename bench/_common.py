"""What every benchmark shares: the machine line, interleaved timing, result lines and failures.

Each benchmark times the project and a reference in the same process, taking turns (reference,
candidate, reference, ...), so that a change of load from other processes hits both alike and
their ratio stays meaningful even when the absolute figures do not. Every figure is printed on one
line with the load average at the time. A benchmark exits 1 only when a result is wrong (different
outputs, a failed check), never because a number is slow; a missing input exits 2 with one line.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
"""The CIFAR-10 development subset beside the project (see ../shared/data/README.md)."""


class WrongResult(Exception):
    """A benchmark produced a wrong result: the run must fail, whatever the speed."""


def load() -> str:
    """The 1-minute load average, for the line of every figure."""
    return f"load {os.getloadavg()[0]:.2f}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_line(title: str) -> str:
    """One line naming the benchmark, the machine, the library versions and the load."""
    import torch

    flags = cpu_flags()
    isa = "avx512_bf16" if "avx512_bf16" in flags else "avx512f" if "avx512f" in flags else "-"
    return (
        f"# {title}: {cpu_name()}, {os.cpu_count()} cores ({isa}), torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads, python {platform.python_version()}, {load()}"
    )


def interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each function; they take turns within every repeat.

    ``warmup`` untimed calls of each come first (allocations, worker start, lazy set-up).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def project_params(overrides: dict) -> dict:
    """The project's params.yaml with ``overrides`` (one level of sections) on top."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in overrides.items():
        if isinstance(value, dict):
            params.setdefault(key, {}).update(value)
        else:
            params[key] = value
    return params


def median(values: list[float]) -> float:
    return statistics.median(values)


def verdict(ratio: float, target: float) -> str:
    return f"target >= {target:g}x: {'met' if ratio >= target else 'NOT met'}"


def line(name: str, *parts: str) -> None:
    """Print one result line: ``name  part  part ...  load x.xx``."""
    print(f"{name:<28} " + "  ".join(parts) + f"  {load()}", flush=True)


def data_file(folder: Path, name: str) -> Path:
    """``folder/name``, or exit 2 with one line saying what is missing and where it comes from."""
    path = Path(folder) / name
    if not path.is_file():
        print(
            f"error: {path} not found; the benchmarks use the CIFAR-10 development subset "
            f"(see ../shared/data/README.md); give its folder with --data",
            file=sys.stderr,
        )
        sys.exit(2)
    return path


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with ``--data`` (the shared data folder) and ``--threads``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--data",
        type=Path,
        default=SHARED_DATA,
        help=f"folder holding cifar10-dev-*.npz (default {SHARED_DATA})",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's, one per core)",
    )
    return p


def run(main: Callable[[], None]) -> None:
    """Call ``main``; a :class:`WrongResult` ends the process with one line and status 1."""
    try:
        main()
    except WrongResult as exc:
        print(f"WRONG RESULT: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
