"""The CPUs a process may use (affinity and cgroup quota) and the thread policy the CLI sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contrastive.cpu import cgroup_cpu_limit, usable_cpus

SRC = Path(__file__).parents[1] / "src"


def cgroup_v2(root: Path, cpu_max: str, own: str = "/") -> Path:
    """A fake cgroup v2 mount with ``cpu.max`` in the folder of cgroup ``own``; returns the fake
    ``/proc/self/cgroup``."""
    folder = root / own.lstrip("/")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cpu.max").write_text(cpu_max + "\n")
    proc = root / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return proc


def cgroup_v1(root: Path, quota_us: int, period_us: int = 100_000) -> Path:
    """A fake cgroup v1 ``cpu`` mount with a CFS quota; returns the fake ``/proc/self/cgroup``."""
    folder = root / "cpu"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text(f"{quota_us}\n")
    (folder / "cpu.cfs_period_us").write_text(f"{period_us}\n")
    proc = root / "proc-self-cgroup"
    proc.write_text("4:memory:/\n2:cpu,cpuacct:/\n1:name=systemd:/\n")
    return proc


@pytest.fixture
def eight_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process may run on CPUs 0-7 (its affinity mask)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)


def test_v2_quota_is_quota_over_period_rounded_up(tmp_path: Path, eight_cpus: None) -> None:
    proc = cgroup_v2(tmp_path, "150000 100000")
    assert cgroup_cpu_limit(tmp_path, proc) == 1.5
    assert usable_cpus(tmp_path, proc) == 2


def test_v2_max_means_no_quota_and_the_affinity_counts(tmp_path: Path, eight_cpus: None) -> None:
    proc = cgroup_v2(tmp_path, "max 100000")
    assert cgroup_cpu_limit(tmp_path, proc) is None
    assert usable_cpus(tmp_path, proc) == 8


def test_v2_quota_of_the_process_own_cgroup(tmp_path: Path, eight_cpus: None) -> None:
    """On a host (no cgroup namespace) the limit sits in the process's folder, e.g. a slice."""
    (tmp_path / "cpu.max").write_text("max 100000\n")  # the parent's: no limit
    proc = cgroup_v2(tmp_path, "300000 100000", own="/system.slice/train.service")
    assert usable_cpus(tmp_path, proc) == 3


def test_v1_cfs_quota(tmp_path: Path, eight_cpus: None) -> None:
    proc = cgroup_v1(tmp_path, 250_000, 100_000)
    assert cgroup_cpu_limit(tmp_path, proc) == 2.5
    assert usable_cpus(tmp_path, proc) == 3


def test_v1_minus_one_means_no_quota(tmp_path: Path, eight_cpus: None) -> None:
    proc = cgroup_v1(tmp_path, -1)
    assert cgroup_cpu_limit(tmp_path, proc) is None
    assert usable_cpus(tmp_path, proc) == 8


@pytest.mark.parametrize(("quota_us", "expected"), [(50_000, 1), (100_000, 1), (400_000, 4)])
def test_quota_smaller_than_the_affinity_wins_and_at_least_one_cpu(
    tmp_path: Path, eight_cpus: None, quota_us: int, expected: int
) -> None:
    proc = cgroup_v2(tmp_path, f"{quota_us} 100000")
    assert usable_cpus(tmp_path, proc) == expected


def test_affinity_smaller_than_the_quota_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    proc = cgroup_v1(tmp_path, 1_600_000)  # 16 CPUs of quota, pinned to 2
    assert usable_cpus(tmp_path, proc) == 2


@pytest.mark.parametrize("content", ["", "garbage", "100000 0"])
def test_no_or_unreadable_cgroup_files_mean_no_quota(
    tmp_path: Path, eight_cpus: None, content: str
) -> None:
    assert cgroup_cpu_limit(tmp_path, tmp_path / "missing") is None
    (tmp_path / "cpu.max").write_text(content)
    assert cgroup_cpu_limit(tmp_path, tmp_path / "missing") is None
    assert usable_cpus(tmp_path, tmp_path / "missing") == 8


# --- the thread policy of the command -------------------------------------------------------------

MAIN = """
import contextlib, io, json, os, sys
from contrastive import cli
torch_before = "torch" in sys.modules
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    cli.main(["--help"])
print(json.dumps({"torch_before": torch_before,
                  "policy": os.environ.get("OMP_WAIT_POLICY"),
                  "threads": os.environ.get("OMP_NUM_THREADS")}))
"""


def run_python(code: str, **env_overrides: str) -> dict:
    """Run ``code`` in a fresh interpreter with only the given OMP_* variables set; its last line
    of output, as JSON. A fresh process, because OpenMP reads the variables when torch loads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env |= {"PYTHONPATH": str(SRC), **env_overrides}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-800:]
    return json.loads(done.stdout.splitlines()[-1])


def test_main_sets_passive_waiting_and_one_thread_per_usable_cpu_before_torch() -> None:
    out = run_python(MAIN)
    assert out == {"torch_before": False, "policy": "PASSIVE", "threads": str(usable_cpus())}


def test_main_leaves_the_users_settings_alone() -> None:
    out = run_python(MAIN, OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="3")
    assert (out["policy"], out["threads"]) == ("ACTIVE", "3")
    out = run_python(MAIN, OMP_NUM_THREADS="1")  # one set, the other still gets its default
    assert (out["policy"], out["threads"]) == ("PASSIVE", "1")


def test_setup_after_torch_was_imported_sets_its_thread_count() -> None:
    code = (
        "import json, torch; from contrastive.cpu import configure_threads, usable_cpus\n"
        "torch.set_num_threads(usable_cpus() + 3)\n"
        "configure_threads()\n"
        "print(json.dumps({'torch': torch.get_num_threads(), 'usable': usable_cpus()}))"
    )
    out = run_python(code)
    assert out["torch"] == out["usable"]
