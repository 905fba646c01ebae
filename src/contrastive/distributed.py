"""The distributed context of pretraining: one process per device under ``torchrun``.

Everything that talks to other processes lives here, so the training loop and the methods stay
the same code in one process and in several:

- :class:`World` says who this process is (rank, world size, whether it writes the outputs);
  :func:`init` builds it from the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and opens the process group: NCCL on CUDA,
  gloo on the CPU. Without them, or with ``WORLD_SIZE=1``, no process group is opened and every
  function below is the identity: a single-process run computes exactly what it did before.
- :func:`gather` is the gradient-aware all-gather of the global negatives
  (``torch.distributed.nn.functional.all_gather``). Its backward sums, over the ranks, the
  gradient every rank's loss sends to a rank's rows; since every rank computes the same global
  loss, each rank's rows receive ``world_size`` times the single-process gradient, and DDP's
  gradient *average* divides that factor out again. So no loss scaling is needed: the averaged
  gradients equal those of one process on the whole global batch (``tests/test_distributed.py``).
- :class:`SyncBatchNorm` normalises with the statistics of the global batch (torch's own
  ``nn.SyncBatchNorm`` refuses CPU tensors, so gloo runs could not use it); its all-reduces carry
  gradients the same way.
- :func:`launch` relaunches the ``contrastive`` command through ``torch.distributed.run`` when
  ``train.devices`` asks for more than one process.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from contrastive.config import ConfigError, Params


@dataclass(frozen=True)
class World:
    """Who this process is among the processes of one training run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    """``nccl`` or ``gloo`` when a process group is open, None in a single process."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes checkpoints, metrics, plots and MLflow records."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


# torch 2.x marks torch.distributed.nn.functional deprecated in favour of a private module; it
# is still the public gradient-aware collective API (and the one the project names)
warnings.filterwarnings(
    "ignore", r"torch\.distributed\.nn\.functional\.\w+ is deprecated", FutureWarning
)

SINGLE = World()
"""The context of a plain, single-process run."""


def env_world_size() -> int:
    """The world size ``torchrun`` set for this process (``WORLD_SIZE``), 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def resolve_backend(params: Params, device: torch.device) -> str:
    """``train.backend``: ``auto`` is NCCL on CUDA and gloo on the CPU; NCCL needs CUDA."""
    backend = params.train.backend
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(
            f"train.backend: 'nccl' needs CUDA GPUs, but training runs on {device.type}"
            f"{'' if torch.cuda.is_available() else ' (no CUDA GPU is present)'}; "
            "use auto or gloo"
        )
    return backend


def init(params: Params, device: torch.device) -> tuple[World, torch.device]:
    """Join the process group that ``torchrun`` set up, if any; the context and the device of
    this process (``cuda:LOCAL_RANK`` on CUDA).

    With ``WORLD_SIZE`` unset or 1, nothing happens: :data:`SINGLE` and ``device`` unchanged.
    """
    world_size = env_world_size()
    if world_size <= 1:
        return SINGLE, device
    backend = resolve_backend(params, device)
    _die_with_parent()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return World(dist.get_rank(), dist.get_world_size(), local_rank, backend), device


def _die_with_parent() -> None:
    """Ask Linux to end this process when its parent (torchrun's agent) dies.

    torchrun starts each worker in a session of its own, so killing the launching command (a
    Prefect time limit, Ctrl-C in a pipeline, ``kill``) would otherwise leave the workers
    training, and writing checkpoints, on their own. Elsewhere: nothing (best effort).
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def active() -> bool:
    """Whether a process group of more than one process is open."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of every rank, in rank order, with gradients flowing back to each rank's own rows
    (see the module docstring for why the result needs no loss scaling); the tensor itself in a
    single process."""
    if not active():
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor))


@torch.no_grad()
def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of every rank, in rank order, without gradients (labels, keys to enqueue)."""
    if not active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over the ranks (for reporting the loss); itself in one process."""
    if not active():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def _sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over the ranks, differentiable: the backward sums every rank's gradient."""
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor)


def barrier() -> None:
    if active():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (at the end of a run, also after an error)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch: the mean and variance of every rank's rows together.

    The same parameters and buffers as ``nn.BatchNorm1d/2d`` (a checkpoint or saved encoder
    loads either way). Outside training, or in a single process, it is plain BatchNorm. Two
    all-reduces per layer (the sum, then the squared deviations from the global mean: the
    two-pass variance, as exact as one process's), both carrying gradients. Works with gloo and
    NCCL alike, unlike ``torch.nn.SyncBatchNorm`` (GPU only).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(input)
        self._check_input_dim(input)
        x = input.float()
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        # count: rows times pixels per channel over every rank; mean, var: (C,) global, biased
        count = _sum(torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype, device=x.device))
        mu = _sum(x.sum(dims)) / count
        centred = x - mu.view(shape)
        var = _sum(centred.square().sum(dims)) / count
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else (
                    self.momentum)
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(mu.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(input.dtype)


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every ``BatchNorm*d`` replaced, in place, by :class:`SyncBatchNorm`
    holding the same parameters and buffers."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(
            child, SyncBatchNorm
        ):
            sync = SyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine,
                child.track_running_stats,
            )
            # the very same tensors: a frozen layer (MoCo's key encoder) stays frozen
            sync.weight, sync.bias = child.weight, child.bias
            sync.running_mean, sync.running_var = child.running_mean, child.running_var
            sync.num_batches_tracked = child.num_batches_tracked
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child)
    return module


def wrap(method: nn.Module, world: World, device: torch.device) -> nn.Module:
    """What the loop calls to get the loss: ``method`` itself in one process, else ``method`` in
    DistributedDataParallel, which averages the gradients over the ranks during backward."""
    if not world.distributed:
        return method
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(method, device_ids=ids)


def check_world(params: Params, world_size: int) -> None:
    """Bad combinations of the world size with the params, before any work (ConfigError)."""
    batch = params.train.batch_size
    if world_size > batch:
        raise ConfigError(
            f"train.devices: {world_size} processes but train.batch_size is {batch}: every "
            f"process needs at least one image per batch; use at most {batch} processes"
        )
    if batch % world_size:
        raise ConfigError(
            f"train.batch_size: {batch} (the global batch) is not divisible by the "
            f"{world_size} processes; use a multiple of {world_size}"
        )


def requested_processes(params: Params) -> int:
    """How many processes ``train.devices`` asks the CLI to launch: ``auto`` is one per CUDA
    GPU when training runs on CUDA, else 1."""
    devices = params.train.devices
    if devices != "auto":
        return int(devices)
    on_cuda = params.device in ("auto", "cuda") and torch.cuda.is_available()
    return max(1, torch.cuda.device_count()) if on_cuda else 1


def launch(argv: Sequence[str], processes: int, on_cuda: bool) -> int:
    """Run ``python -m contrastive.cli ARGV`` in ``processes`` processes through
    ``torch.distributed.run`` (``--standalone``: one machine); their exit status.

    The workers print their own one-line errors; torchrun's failure report (a traceback of the
    agent) is not printed again. On the CPU, each worker gets an equal share of the threads.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if not on_cuda:
        threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
        os.environ["OMP_NUM_THREADS"] = str(max(1, threads // processes))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    args = parse_args(
        ["--standalone", f"--nproc-per-node={processes}", "--module", "contrastive.cli", *argv]
    )
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values() if f.exitcode and f.exitcode > 0]
        return min(codes) if codes else 1
    except KeyboardInterrupt:
        return 130
    sys.stdout.flush()
    return 0
