"""How many CPUs this process may really use, and OpenMP settings that share busy cores well.

Torch runs the ops of a training step on OpenMP threads (libgomp), by default one per core of the
machine, and by default they *spin* while waiting for each other at the end of every op. When
other processes hold some of the cores (a shared machine, or a container with a CPU quota), a
spinning thread burns the time slice another thread needs, and one descheduled thread stalls every
op: four trainings on 2 cores ran at 45 image pairs/s against 1,600 for one (docs/benchmarks.md,
"Contention"). Two settings avoid that:

- one thread per CPU the process may use: the affinity mask (``taskset``, cpusets) and the cgroup
  CPU quota (``docker --cpus``, Kubernetes limits) both count, whichever is smaller;
- ``OMP_WAIT_POLICY=PASSIVE``: a waiting thread sleeps and yields its core instead of spinning.

OpenMP reads its environment once, when torch loads it, so :func:`configure_threads` must run
before ``import torch``. This module imports no torch for that reason; the ``contrastive`` command
calls it first thing (:func:`contrastive.cli.main`).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where the cgroup file systems are mounted (v2 directly, v1 one folder per controller)."""

OWN_CGROUP = Path("/proc/self/cgroup")
"""This process's cgroup in each hierarchy: ``id:controllers:path`` per line (v2: ``0::path``)."""


def _own_cgroup_paths(cgroup_file: Path) -> dict[str, str]:
    """Controller -> this process's cgroup path; ``""`` names the v2 (unified) hierarchy."""
    try:
        text = cgroup_file.read_text()
    except OSError:
        return {}
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    return paths


def _limit_file(mount: Path, own_path: str, name: str) -> Path | None:
    """``name`` in the process's own cgroup folder under ``mount``, else at the mount's top.

    In a container (its own cgroup namespace, or its cgroup bind-mounted) the mount's top *is* the
    process's cgroup; on a host, the process's folder (e.g. a systemd slice) holds its limit.
    """
    for folder in (mount / own_path.lstrip("/"), mount):
        if (folder / name).is_file():
            return folder / name
    return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, cgroup_file: Path = OWN_CGROUP) -> float | None:
    """The cgroup CPU quota of this process in CPUs (quota / period, e.g. 1.5), None if none.

    cgroup v2: ``cpu.max`` holds ``"QUOTA PERIOD"``, or ``"max PERIOD"`` for no quota.
    cgroup v1: ``cpu/cpu.cfs_quota_us`` (``-1`` for no quota) and ``cpu/cpu.cfs_period_us``.
    Unreadable or malformed files count as no quota: the limit is advice, never a failure.
    """
    own = _own_cgroup_paths(cgroup_file)
    try:
        v2 = _limit_file(root, own.get("", "/"), "cpu.max")
        if v2 is not None:
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        for mount in (root / "cpu", root / "cpu,cpuacct"):
            v1 = _limit_file(mount, own.get("cpu", "/"), "cpu.cfs_quota_us")
            if v1 is not None:
                quota_us = int(v1.read_text())
                period_us = int((v1.parent / "cpu.cfs_period_us").read_text())
                return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError, ZeroDivisionError):
        return None
    return None


def usable_cpus(root: Path = CGROUP_ROOT, cgroup_file: Path = OWN_CGROUP) -> int:
    """CPUs this process may use: min(CPUs in its affinity mask, the cgroup quota rounded up),
    and at least 1. A quota of 1.5 CPUs gives 2: threads may run on two cores at a time."""
    # macOS and Windows have no affinity mask to read: every CPU counts there
    affinity = getattr(os, "sched_getaffinity", None)
    cpus = len(affinity(0)) if affinity else os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, cgroup_file)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)


def configure_threads() -> dict[str, str]:
    """Make torch's threads share the CPUs well: one per usable CPU, sleeping when they wait.

    Sets ``OMP_WAIT_POLICY=PASSIVE`` and ``OMP_NUM_THREADS`` (:func:`usable_cpus`) in
    ``os.environ`` unless the user set them (a value given by the user always wins); child
    processes inherit them. Call it before ``import torch``: OpenMP reads them when torch loads it.
    If torch is already imported, its intra-op thread count is set instead (the wait policy can no
    longer change). Returns the values now in force.
    """
    environ = os.environ
    if not environ.get("OMP_WAIT_POLICY"):
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if not environ.get("OMP_NUM_THREADS"):
        threads = usable_cpus()
        environ["OMP_NUM_THREADS"] = str(threads)
        torch = sys.modules.get("torch")
        if torch is not None and hasattr(torch, "set_num_threads"):
            torch.set_num_threads(threads)
    return {name: environ[name] for name in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
