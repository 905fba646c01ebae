"""Contention: pretraining throughput when other processes compete for the cores.

The digits default of ``params.yaml`` (small_cnn, 16x16, batch 256, SimCLR, SGD) trains on the CPU
in a loop over :class:`~contrastive.batches.InMemoryBatches` and the method, as
:func:`contrastive.train.fit` does, while 0, 1 or 2 competing processes run beside it: Python busy
loops (``spin``: one busy core each) or torch training loops with torch's defaults (``torch``:
another user's training). Each thread policy trains in its own child process, because OpenMP reads
its settings when torch loads:

- ``old``: what every run got before, libgomp's defaults (threads spin before they sleep, one
  thread per core) and no prefetching;
- ``new``: what ``contrastive`` sets now (:func:`contrastive.cpu.configure_threads`: waiting
  threads sleep, one thread per usable CPU) with the batches' default on the CPU (no prefetching);
- ``new-prefetch``: the same, with each batch's views made on a background thread during the step
  before (what prefetching would add on the CPU).

All processes start first; the competitors are then paused (SIGSTOP) and resumed (SIGCONT) around
each measurement, so no start-up falls into one. For every round and every competition, each
policy in turn trains ``--seconds`` (at least ``--min-steps`` steps) while the others wait. Every
line gives the median pairs/s over the rounds, the ratio to the same policy's idle throughput and
to the old policy under the same competition, and the 1-minute load average at the end of each of
its measurements (it counts the competitors, and lags: it climbs for a minute after they start).
Target: with one competitor on 2 cores, the new policy keeps at least 40% of its idle throughput.
Exits 1 if a loss is not finite.

    python bench/contention.py [--seconds 3] [--rounds 2] [--competitors 1,2] [--kinds spin,torch]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _common import ROOT, WrongResult, run

TARGET = 0.4
"""Share of the idle throughput to keep with one competitor (on 2 cores)."""

POLICIES = ("old", "new", "new-prefetch")


def child(policy: str, prepared: Path) -> None:
    """One policy's training process: answers ``measure SECONDS MIN_STEPS`` lines on stdin with a
    JSON line (pairs/s, steps, loss) on stdout, until stdin closes."""
    if policy != "old":
        from contrastive.cpu import configure_threads

        configure_threads()  # before torch loads, as the contrastive command does
    import torch
    from _common import machine_line

    from contrastive.augment import SimCLRViews
    from contrastive.batches import Batch, InMemoryBatches
    from contrastive.config import load_params
    from contrastive.data import load_manifest, load_split
    from contrastive.methods import build
    from contrastive.models import build_encoder
    from contrastive.optim import build_optimizer, scaled_lr
    from contrastive.runtime import seed_everything

    params = load_params(ROOT / "params.yaml").model_copy(update={"device": "cpu"})
    manifest = load_manifest(prepared)
    x, y = load_split(prepared, "train")
    seed_everything(params.seed)
    method = build(build_encoder(params.model, manifest["image_size"]), params)
    optimizer = build_optimizer(method, params.train, fused=False)
    for group in optimizer.param_groups:
        group["lr"] = scaled_lr(params.train) / 10  # a fixed, gentle rate: no schedule needed
    prefetch = {"old": False, "new": None, "new-prefetch": True}[policy]  # None: the default
    batches = InMemoryBatches(
        torch.from_numpy(x), torch.from_numpy(y), params.train.batch_size,
        SimCLRViews(params.augment, manifest["image_size"]), manifest["mean"], manifest["std"],
        params.seed, prefetch=prefetch,
    )

    def endless() -> Iterator[Batch]:
        epoch = 0
        while True:
            yield from batches.epoch(epoch)
            epoch += 1

    stream = endless()

    def train(seconds: float, min_steps: int) -> dict[str, float]:
        loss_sum, steps = torch.zeros(()), 0
        started = time.perf_counter()
        while steps < min_steps or time.perf_counter() - started < seconds:
            view_a, view_b, labels = next(stream)
            loss = method(view_a, view_b, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
        loss_mean = (loss_sum / steps).item()
        elapsed = time.perf_counter() - started
        return {"pairs_per_s": steps * batches.batch_size / elapsed, "steps": steps,
                "seconds": elapsed, "loss": loss_mean}

    train(0, 3)  # warm-up: allocator, oneDNN kernels, the view workers
    settings = {k: os.environ.get(k, "unset") for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    print(json.dumps({"ready": machine_line(f"contention, {policy}"), "env": settings,
                      "prefetch": batches.prefetch, "threads": torch.get_num_threads()}),
          flush=True)
    for request in sys.stdin:
        _, seconds, min_steps = request.split()
        print(json.dumps(train(float(seconds), int(min_steps))), flush=True)


class Child:
    """A policy's training process, started with no OMP_* variable from this environment."""

    def __init__(self, policy: str, prepared: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
        paths = [str(ROOT / "src"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(path for path in paths if path)
        self.policy = policy
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--child", policy, "--prepared", str(prepared)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        )
        self.info = self.answer()

    def answer(self) -> dict:
        assert self.process.stdout is not None
        text = self.process.stdout.readline()
        if not text:
            raise RuntimeError(f"the {self.policy} child exited ({self.process.wait()})")
        return json.loads(text)

    def measure(self, seconds: float, min_steps: int) -> dict:
        assert self.process.stdin is not None
        self.process.stdin.write(f"measure {seconds} {min_steps}\n")
        self.process.stdin.flush()
        return self.answer()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


TORCH_LOOP = """
import torch
from torch import nn
net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1),
                    nn.ReLU(), nn.Flatten(), nn.Linear(64 * 16 * 16, 10))
optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
x, y = torch.randn(256, 3, 16, 16), torch.randint(0, 10, (256,))
print("ready", flush=True)
while True:
    loss = nn.functional.cross_entropy(net(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
"""
"""Another user's training as torch runs it by default (libgomp's spinning, a thread per core)."""

COMPETITORS = {"spin": "while True: pass", "torch": TORCH_LOOP}
"""What a competitor runs: a Python busy loop (one busy core), or a torch training loop."""


class Competitors:
    """``count`` competing processes of ``kind``, started once and paused (SIGSTOP) until
    :meth:`resume`: their start-up (importing torch) never falls into a measurement."""

    def __init__(self, kind: str, count: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
        self.processes = [
            subprocess.Popen([sys.executable, "-c", COMPETITORS[kind]], stdout=subprocess.PIPE,
                             text=True, env=env)
            for _ in range(count)
        ]
        for process in self.processes:
            if kind == "torch":
                assert process.stdout is not None
                process.stdout.readline()  # "ready"
        self.pause()

    def resume(self, count: int) -> None:
        for process in self.processes[:count]:
            process.send_signal(signal.SIGCONT)
        time.sleep(0.3)  # let them get going

    def pause(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGSTOP)

    def close(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0,
                   help="training time per measurement (default 3)")
    p.add_argument("--min-steps", type=int, default=2,
                   help="steps per measurement at least (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="measurements of each (default 2)")
    p.add_argument("--competitors", default="1,2",
                   help="numbers of competing processes, besides none (default 1,2)")
    p.add_argument("--kinds", default="spin,torch",
                   help="competitors: spin (Python busy loops) and/or torch (torch training "
                        "loops with torch's default threads); default spin,torch")
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"thread policies to compare (default {','.join(POLICIES)})")
    p.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    p.add_argument("--prepared", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.prepared)
        return
    counts = sorted({int(c) for c in args.competitors.split(",")} - {0})
    kinds, policies = args.kinds.split(","), args.policies.split(",")
    if unknown := set(policies) - set(POLICIES):
        p.error(f"--policies: unknown {sorted(unknown)}; choose from {', '.join(POLICIES)}")
    if unknown := set(kinds) - set(COMPETITORS):
        p.error(f"--kinds: unknown {sorted(unknown)}; choose from {', '.join(COMPETITORS)}")
    levels = [("none", 0)] + [(kind, count) for kind in kinds for count in counts]

    from contrastive.config import load_params
    from contrastive.data import prepare

    results: dict[tuple[str, str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-contention-") as tmp:
        params = load_params(ROOT / "params.yaml")
        prepare(params.data, params.seed, Path(tmp) / "prepared", Path(tmp) / "raw")
        children: dict[str, Child] = {}
        pools: dict[str, Competitors] = {}
        try:
            for policy in policies:  # one at a time: their start-up does not overlap
                children[policy] = Child(policy, Path(tmp) / "prepared")
                info = children[policy].info
                print(info["ready"], flush=True)
                print(f"#   {policy}: {info['env']}, torch threads {info['threads']}, "
                      f"prefetch {info['prefetch']}", flush=True)
            for kind in kinds:
                pools[kind] = Competitors(kind, max(counts, default=0))
            print(f"# {os.cpu_count()} cores; each measurement {args.seconds:g} s (at least "
                  f"{args.min_steps} steps), {args.rounds} rounds; competitors: none, "
                  f"{', '.join(f'{c} {k}' for k, c in levels[1:])}", flush=True)
            started = time.perf_counter()
            for _ in range(args.rounds):
                for kind, count in levels:
                    if count:
                        pools[kind].resume(count)
                    try:
                        for policy, c in children.items():
                            m = c.measure(args.seconds, args.min_steps)
                            m["load"] = os.getloadavg()[0]
                            results.setdefault((policy, kind, count), []).append(m)
                            if not math.isfinite(m["loss"]):
                                raise WrongResult(f"{policy}: loss {m['loss']}")
                    finally:
                        if count:
                            pools[kind].pause()
            print(f"# measured for {time.perf_counter() - started:.0f} s", flush=True)
        finally:
            for c in children.values():
                c.close()
            for pool in pools.values():
                pool.close()
    report(results, policies, levels)


def report(
    results: dict[tuple[str, str, int], list[dict]],
    policies: list[str],
    levels: list[tuple[str, int]],
) -> None:
    """One line per policy and competition: median pairs/s, share of the idle rate, vs old."""

    def rate(policy: str, kind: str, count: int) -> float:
        return statistics.median(m["pairs_per_s"] for m in results[(policy, kind, count)])

    for kind, count in levels:
        for policy in policies:
            pairs = rate(policy, kind, count)
            share = pairs / rate(policy, "none", 0)
            rates = " ".join(f"{m['pairs_per_s']:.0f}" for m in results[(policy, kind, count)])
            parts = [f"{pairs:7.1f} pairs/s", f"{share:6.1%} of idle", f"({rates})"]
            if policy != "old" and "old" in policies:
                parts.append(f"{pairs / rate('old', kind, count):.1f}x old")
            if count == 1 and policy == "new":
                parts.append(f"target >= {TARGET:.0%}: {'met' if share >= TARGET else 'NOT met'}")
            loads = [m["load"] for m in results[(policy, kind, count)]]
            label = "idle" if not count else f"{count} {kind}"
            print(f"{policy:<12} {label:<8} " + "  ".join(parts)
                  + f"  load {min(loads):.2f}-{max(loads):.2f} (at the end of each)", flush=True)


if __name__ == "__main__":
    run(main)
