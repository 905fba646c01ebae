"""Provenance: where a model came from, as tags: the git commit and the ``dvc.lock`` entries.

A registered version is traceable to its code (``git.commit``, ``git.dirty``, ``git.changed``),
to the exact upstream stage outputs (``dvc.lock.<stage>``), and, through the tags the run logging
adds, to its params and data hash.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml

UPSTREAM_STAGES = ("prepare", "pretrain", "probe", "export")


def git_state(root: Path) -> dict[str, str]:
    """``git.commit``, ``git.dirty`` and ``git.changed`` (files that differ from the commit).

    Files that DVC writes (stage outputs, metrics, plots, ``dvc.lock``) do not make the tree dirty:
    during ``dvc repro`` they always differ, and their hashes are recorded separately.
    """

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True, timeout=30)
        return done.stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=no").splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    produced = _dvc_outputs(root / "dvc.yaml") | {"dvc.lock"}
    changed = [line[3:].split(" -> ")[-1].strip('"') for line in status]
    changed = [p for p in changed if not any(p == o or p.startswith(o + "/") for o in produced)]
    tags = {"git.commit": commit, "git.dirty": str(bool(changed)).lower()}
    if changed:
        tags["git.changed"] = ", ".join(changed[:20]) + (" ..." if len(changed) > 20 else "")
    return tags


def _dvc_outputs(dvc_yaml: Path) -> set[str]:
    """Paths of every stage's outs, metrics and plots in ``dvc.yaml`` (empty if absent)."""
    if not dvc_yaml.is_file():
        return set()
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    paths: set[str] = set()
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                paths.add(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return {p.rstrip("/") for p in paths}


def dvc_lock_hashes(lock_path: Path) -> dict[str, str]:
    """``dvc.lock.<stage>``: a short hash of each upstream stage's ``dvc.lock`` entry.

    DVC writes a stage's entry as soon as it completes, so during ``dvc repro`` the upstream
    entries describe exactly the outputs being registered. Outside DVC: ``unknown``.
    """
    entries = {}
    if lock_path.is_file():
        entries = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {})
    tags = {}
    for stage in UPSTREAM_STAGES:
        entry = entries.get(stage)
        digest = hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()[:16]
        tags[f"dvc.lock.{stage}"] = digest if entry else "unknown"
    return tags
