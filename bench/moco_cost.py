"""MoCo's cost per training step against SimCLR's, at the same batch size, as a ratio.

Both methods are built from ``params.yaml`` (``model``: small_cnn of width 32, head 256 -> 64;
``train.moco``: queue of 4096, momentum 0.99) around encoders with the same initial weights, and
trained on the same fixed random 32x32 views (no augmentation: only the method's step is timed).
A step is what the loop does: forward, backward, optimiser step, ``after_step``. The methods take
turns step by step (``_common.interleaved``), so load from other processes hits them alike.

Per image of the batch, SimCLR runs the trained encoder forward and backward on both views; MoCo
runs it on one view only, plus a forward without gradient of the key encoder on the other, the
momentum update of the key encoder and the queue. The symmetric option does both directions. So
asymmetric MoCo is expected to be cheaper than SimCLR, and symmetric MoCo dearer.

Fails (exit 1) when a loss is not finite.

    python bench/moco_cost.py [--repeats 5] [--batch 256] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable

import torch
from _common import WrongResult, interleaved, line, machine_line, median, project_params, run

from contrastive.config import Params, TrainConfig, parse_params
from contrastive.methods import Method, build
from contrastive.models import build_encoder
from contrastive.optim import build_optimizer

IMAGE_SIZE = 32


def params_for(method: str, symmetric: bool, batch_size: int) -> Params:
    """``params.yaml`` with small_cnn of width 32 on the CPU in fp32, and ``method``."""
    raw = project_params(
        {
            "device": "cpu",
            "model": {"encoder": "small_cnn", "width": 32},
            "train": {"method": method, "batch_size": batch_size, "precision": "fp32"},
        }
    )
    raw["train"]["moco"]["symmetric"] = symmetric
    return parse_params(raw)


def training_step(
    method: Method, cfg: TrainConfig, batch: tuple[torch.Tensor, ...]
) -> Callable[[], None]:
    """One step of :func:`contrastive.train.fit` on a fixed batch, as a function."""
    optimizer = build_optimizer(method, cfg, fused=False)
    done = 0

    def step() -> None:
        nonlocal done
        loss = method(*batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done += 1
        method.after_step(min(done / 100, 1.0))
        if not math.isfinite(loss.item()):
            raise WrongResult(f"{type(method).__name__}: loss became {loss.item()}")

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="timed steps of each method")
    p.add_argument("--batch", type=int, default=256, help="images per step (two views each)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line("MoCo step cost against SimCLR"), flush=True)

    torch.manual_seed(0)
    encoder = build_encoder(params_for("simclr", False, args.batch).model, IMAGE_SIZE)
    g = torch.Generator().manual_seed(1)
    batch = (
        torch.randn(args.batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
        torch.randn(args.batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
        torch.zeros(args.batch, dtype=torch.long),
    )
    steps = {}
    for label, method_name, symmetric in [
        ("simclr", "simclr", False),
        ("moco", "moco", False),
        ("moco symmetric", "moco", True),
    ]:
        params = params_for(method_name, symmetric, args.batch)
        method = build(copy.deepcopy(encoder), params)
        method.train()
        steps[label] = training_step(method, params.train, batch)

    times = interleaved(steps, args.repeats, warmup=1)
    simclr = median(times["simclr"])
    for label, seconds in times.items():
        line(
            f"{label} (batch {args.batch})",
            f"median step {median(seconds) * 1000:.0f} ms over {len(seconds)} steps",
            f"ratio to simclr {median(seconds) / simclr:.2f}",
        )


if __name__ == "__main__":
    run(main)
