"""Data parallel on the CPU: the step time of 2 gloo processes against 1 process, as a ratio.

The default pipeline's model (``params.yaml``: small CNN, 16x16 images, global batch 256, SimCLR)
trains ``--steps`` steps on random views (views excluded: only the step and its communication
count). 1 process with 2 threads on the whole batch, then 2 processes with 1 thread each on half
of it, through the project's own engine (``contrastive.distributed``: DDP, the gathered global
batch, optionally the global BatchNorm). Prints the seconds per step, their ratio, the load
average, and the bytes each step communicates: the gathered projections and DDP's gradient
all-reduce (docs/scaling.md turns these into what to expect on 8 GPUs).

    python bench/distributed.py [--steps 20] [--sync-bn]
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from contrastive import distributed
from contrastive.config import load_params
from contrastive.methods import build
from contrastive.models import build_encoder

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 3


def steps_time(steps: int, sync_bn: bool, threads: int) -> float:
    """Seconds per training step of this process (after WARMUP untimed steps)."""
    torch.set_num_threads(threads)
    params = load_params(ROOT / "params.yaml")
    params = params.model_copy(update={"device": "cpu", "train": params.train.model_copy(
        update={"sync_bn": sync_bn})})
    world, device = distributed.init(params, torch.device("cpu"))
    size, batch = params.data.image_size, params.train.batch_size // world.world_size
    torch.manual_seed(0)
    method = build(build_encoder(params.model, size), params)
    if sync_bn and world.distributed:
        distributed.convert_sync_batchnorm(method)
    model = distributed.wrap(method, world, device)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(world.rank)
    views = torch.randn(2, batch, 3, size, size, generator=g)
    labels = torch.zeros(batch, dtype=torch.long)
    for step in range(WARMUP + steps):
        if step == WARMUP:
            distributed.barrier()
            started = time.perf_counter()
        loss = model(views[0], views[1], labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    distributed.barrier()
    seconds = (time.perf_counter() - started) / steps
    distributed.cleanup()
    return seconds


def _worker(rank: int, port: int, steps: int, sync_bn: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    seconds = steps_time(steps, sync_bn, threads=1)
    if rank == 0:
        Path(out).write_text(str(seconds))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sync-bn", action="store_true")
    args = p.parse_args()
    one = steps_time(args.steps, args.sync_bn, threads=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/seconds"
        mp.spawn(_worker, args=(port, args.steps, args.sync_bn, out), nprocs=2, join=True)
        two = float(Path(out).read_text())
    params = load_params(ROOT / "params.yaml")
    method = build(build_encoder(params.model, params.data.image_size), params)
    n_params = sum(p.numel() for p in method.parameters() if p.requires_grad)
    batch, dim = params.train.batch_size, params.model.projection_dim
    print(f"1 process x 2 threads: {one * 1000:.1f} ms/step; 2 gloo processes x 1 thread: "
          f"{two * 1000:.1f} ms/step; ratio 2p/1p {two / one:.2f} (sync_bn {args.sync_bn}, "
          f"load {os.getloadavg()[0]:.2f})")
    print(f"per step: gradient all-reduce {n_params:,} floats ({n_params * 4 / 1e6:.2f} MB); "
          f"gathered projections 2 x {batch} x {dim} floats ({2 * batch * dim * 4 / 1e6:.3f} MB)")


if __name__ == "__main__":
    main()
