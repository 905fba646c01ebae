"""Benchmark 4, pipeline overhead: a no-op ``dvc repro``; the share of a run spent outside training.

1. Set-up share: a full ``dvc repro`` of the default ``params.yaml`` in a temporary copy of the
   project (git + DVC, this ``dvc.yaml`` and ``src/``, as in ``tests/test_dvc.py``), every stage's
   command run through ``bench/_stage_timer.py``, then ``dvc metrics show`` (what ``make run``
   does). Its wall time splits into DVC's own time, interpreter start, imports, stage work, the
   pretraining loop's epoch overhead (kNN monitor, checkpoints) and the training steps. By default
   training runs ``--epochs 5`` (not the 60 of ``params.yaml``) and the figures of the default run
   are extrapolated linearly in epochs; ``--full`` runs the real default.
2. No-op: the median wall time of ``dvc repro`` when nothing is stale. In the project's own folder
   when its pipeline is there and up to date (``dvc status`` reports nothing; ``--tmp`` skips
   this, since a repro there takes DVC's lock), otherwise in the temporary copy of step 1 (with
   ``--skip-run``: a copy with tests/conftest.py's tiny params, run once first).

Set-up is DVC + interpreter start + imports; "outside training" is everything but the training
steps. Fails (exit 1) when the pipeline fails or when a second ``dvc repro`` is not a no-op.

    python bench/pipeline.py [--epochs 5 | --full] [--precision fp32] [--repeats 3] [--tmp]
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import WrongResult, line, machine_line, parser, project_params, run

ROOT = Path(__file__).resolve().parents[1]
TIMER = Path(__file__).resolve().parent / "_stage_timer.py"
NOOP_TARGET_S = 3.0
SETUP_TARGET = 0.15
TINY = {  # tests/conftest.py's tiny configuration: every stage in seconds
    "device": "cpu",
    "data": {"source": "digits", "image_size": 8},
    "model": {
        "encoder": "small_cnn",
        "width": 8,
        "projection_hidden_dim": 32,
        "projection_dim": 16,
    },
    "train": {"epochs": 3, "batch_size": 128, "warmup_epochs": 1, "knn_every": 2},
    "probe": {"weight_decays": [0.0, 0.001], "max_iter": 30, "knn_k": 20},
    "export": {"latency_repeats": 2},
}


def env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def sh(args: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run a command; return its wall time and output; raise WrongResult when it fails."""
    start = time.perf_counter()
    done = subprocess.run(
        args, cwd=cwd, env=env() | (extra_env or {}), capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise WrongResult(f"`{' '.join(args)}` in {cwd} failed ({done.returncode}):\n{tail}")
    return seconds, done.stdout + done.stderr


DVC = [sys.executable, "-m", "dvc"]


def ran_stages(output: str) -> list[str]:
    return [ln.split("'")[1] for ln in output.splitlines() if ln.startswith("Running stage '")]


def make_project(root: Path, params: dict, timed: bool) -> Path:
    """A git + DVC copy of the project: its dvc.yaml (commands timed if ``timed``), src/, params."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    if timed:
        for stage in spec["stages"].values():
            cmd = stage.get("cmd", "")
            if isinstance(cmd, str) and cmd.startswith("contrastive "):
                stage["cmd"] = f"{sys.executable} {TIMER} {cmd.removeprefix('contrastive ')}"
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    sh(["git", "init", "-q"], root)
    sh([*DVC, "init", "-q"], root)
    sh([*git, "add", "-A"], root)
    sh([*git, "commit", "-q", "-m", "bench"], root)
    return root


def project_is_current() -> bool:
    """The project's own pipeline has run and nothing is stale (so a repro there is a no-op)."""
    if not (ROOT / "dvc.lock").is_file() or not (ROOT / ".dvc").is_dir():
        return False
    try:
        done = subprocess.run(
            [*DVC, "status", "--json"],
            cwd=ROOT,
            env=env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return done.returncode == 0 and json.loads(done.stdout or "null") == {}
    except (subprocess.TimeoutExpired, json.JSONDecodeError):
        return False


def noop_repro(repeats: int, use_project: bool, ran: Path | None) -> None:
    """Time ``dvc repro`` where nothing is stale: the project, ``ran``, or a tiny copy."""
    tmp = None
    if use_project and project_is_current():
        where, folder = "project folder", ROOT
    elif ran is not None:
        where, folder = "temporary copy of the measured run", ran
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-noop-")
        where, folder = "temporary copy, tiny params", Path(tmp.name)
        make_project(folder, project_params(TINY), timed=False)
        sh([*DVC, "repro"], folder)
    try:
        times = []
        for _ in range(repeats):
            seconds, output = sh([*DVC, "repro"], folder)
            if ran_stages(output):
                raise WrongResult(f"a second dvc repro in the {where} ran {ran_stages(output)}")
            times.append(seconds)
        noop = statistics.median(times)
        python_start, _ = sh([sys.executable, "-c", "pass"], folder)
        line(
            "no-op dvc repro",
            f"{noop:.2f} s ({where}, median of {repeats})",
            f"python start {python_start:.2f} s",
            f"target < {NOOP_TARGET_S:g} s: {'met' if noop < NOOP_TARGET_S else 'NOT met'}",
        )
    finally:
        if tmp is not None:
            tmp.cleanup()


def training_seconds(folder: Path, params: dict) -> float:
    """Seconds in the training steps: each epoch's images / its images/s (plots/pretrain.csv)."""
    manifest = json.loads((folder / "data" / "prepared" / "manifest.json").read_text())
    batch = params["train"]["batch_size"]
    per_epoch = manifest["totals"]["train"] // batch * batch
    with (folder / "plots" / "pretrain.csv").open() as f:
        return sum(per_epoch / float(row["images_per_s"]) for row in csv.DictReader(f))


def setup_share(folder: Path, epochs: int | None, precision: str | None = None) -> None:
    """Run the pipeline in a new copy of the project at ``folder``; print where its time went."""
    train = project_params({})["train"]
    full_epochs = train["epochs"]
    epochs = epochs or full_epochs
    # The warm-up must stay shorter than the run; the schedule does not change a step's cost.
    warmup = min(train["warmup_epochs"], epochs - 1)
    train_overrides = {"epochs": epochs, "warmup_epochs": warmup}
    if precision:
        train_overrides["precision"] = precision
    params = project_params({"train": train_overrides})
    make_project(folder, params, timed=True)
    log = folder / "stages.jsonl"
    extra = {"BENCH_STAGE_LOG": str(log), "TQDM_DISABLE": "1"}
    repro_s, output = sh([*DVC, "repro"], folder, extra)
    metrics_s, _ = sh([*DVC, "metrics", "show"], folder, extra)
    records = [json.loads(ln) for ln in log.read_text().splitlines()]
    stages = [r["stage"] for r in records]
    if sorted(stages) != sorted(ran_stages(output)):
        raise WrongResult(f"timed stages {stages} differ from those DVC ran {ran_stages(output)}")
    train_s = training_seconds(folder, params)

    total = repro_s + metrics_s
    processes = sum(r["ended"] - r["created"] for r in records)
    part = {
        "dvc": total - processes,
        "interpreter": sum(r["started"] - r["created"] for r in records),
        "imports": sum(r["imported"] - r["started"] for r in records),
    }
    loop = {r["stage"]: r["loop_end"] - r["loop_start"] for r in records if "loop_start" in r}
    loop_s = sum(loop.values())
    part["stage work"] = sum(r["ended"] - r["imported"] for r in records) - loop_s
    part["epoch overhead"] = loop_s - train_s  # kNN monitor, checkpoints, per-epoch records
    part["training steps"] = train_s
    per_stage = "  ".join(f"{r['stage']} {r['ended'] - r['created']:.1f}" for r in records)
    print(
        f"# measured run: {epochs} epochs, {total:.1f} s in all (dvc repro {repro_s:.1f} s + "
        f"dvc metrics show {metrics_s:.1f} s); stage processes (s): {per_stage}",
        flush=True,
    )

    scale = full_epochs / epochs
    full = dict(part)
    full["epoch overhead"] *= scale
    full["training steps"] *= scale
    for label, figures in (("measured", part), ("default", full)):
        if label == "default" and scale == 1:
            continue
        run_total = sum(figures.values())
        setup = figures["dvc"] + figures["interpreter"] + figures["imports"]
        outside = 1 - figures["training steps"] / run_total
        how = (
            f"{epochs} epochs"
            if label == "measured"
            else f"{full_epochs} epochs, extrapolated from {epochs}"
        )
        line(
            f"run set-up share ({label})",
            f"{setup / run_total:.1%} of {run_total:.0f} s",
            f"outside training {outside:.1%}",
            how,
            f"target < {SETUP_TARGET:.0%}: "
            f"{'met' if setup / run_total < SETUP_TARGET else 'NOT met'}",
        )
        print(
            "#   " + ", ".join(f"{k} {v:.1f} s ({v / run_total:.0%})" for k, v in figures.items()),
            flush=True,
        )


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument(
        "--epochs",
        type=int,
        default=5,
        help="pretraining epochs of the measured run (default 5; the default run's "
        "figures are extrapolated)",
    )
    p.add_argument("--full", action="store_true", help="run the default params.yaml as it is")
    p.add_argument("--repeats", type=int, default=3, help="no-op repros timed (default 3)")
    p.add_argument(
        "--tmp",
        action="store_true",
        help="time the no-op in a temporary copy even if the project's pipeline is "
        "current (a repro in the project folder takes DVC's lock)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="train.precision of the measured run (default: params.yaml's); fp32 is the "
        "precision the set-up target was first measured at",
    )
    p.add_argument("--skip-run", action="store_true", help="only the no-op repro")
    args = p.parse_args()
    print(machine_line("pipeline overhead"), flush=True)
    if args.skip_run:
        noop_repro(args.repeats, use_project=not args.tmp, ran=None)
        return
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        setup_share(Path(tmp), None if args.full else args.epochs, args.precision)
        noop_repro(args.repeats, use_project=not args.tmp, ran=Path(tmp))


if __name__ == "__main__":
    run(main)
