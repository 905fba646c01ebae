"""Several processes train the model one process would: 2 gloo processes on the CPU against 1.

Each worker is a spawned process that joins a process group through the same variables torchrun
sets (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``), with one torch thread: the
machine may have only 2 cores.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from contrastive import distributed
from contrastive.cli import main
from contrastive.config import METHODS, Params, parse_params
from contrastive.methods import MethodInputs, build
from contrastive.methods.clip import CaptionTable
from contrastive.models import build_encoder
from contrastive.text import train_tokenizer
from tests.conftest import ROOT, TINY, write_params

WORLD = 2
BATCH = 8  # images in the global batch: 4 per process
SIZE = 8
STEPS = 3

# Every method, with the options that change what crosses processes: labels (supcon,
# supervised triplet), a learned temperature (a scalar parameter), MoCo's queue both ways.
CASES: dict[str, dict[str, Any]] = {
    "simclr": {"method": "simclr"},
    "simclr_learned_t": {"method": "simclr", "learn_temperature": True},
    "moco": {"method": "moco", "moco": {"queue_size": 16}},
    "moco_symmetric": {"method": "moco", "moco": {"queue_size": 16, "symmetric": True}},
    "triplet": {"method": "triplet"},
    "triplet_supervised": {"method": "triplet", "triplet": {"supervised": True}},
    "margin_pair": {"method": "margin_pair", "margin_pair": {"negatives_per_positive": 2}},
    "supcon": {"method": "supcon"},
    "clip": {"method": "clip"},
}
CLIP_MODEL = {"text_encoder": "gru", "text": {"width": 8, "layers": 1, "context_length": 12}}

GRAD_ATOL = 1e-5
"""The issue's bound. Gradients here are up to about 4 in size; the processes add the same terms
in another order (all-reduced partial sums, BatchNorm statistics from per-process parts), so they
differ by float32 rounding: observed at most 6.4e-6 (simclr), about 1.5e-6 relative."""
WEIGHT_ATOL = 5e-5
"""After STEPS SGD steps (lr 0.1, momentum 0.9): each step moves a weight by lr times the
momentum buffer, so a 6e-6 gradient difference carries up to 0.1 * (1 + 1.9 + 2.71) * 6e-6 =
3.4e-6 into the weights, and BatchNorm's running variance sums squares of values of order 1;
observed at most 1.03e-5 (moco). 5e-5 leaves a factor of 5; a wrong gradient (a missing gather,
a loss counted twice, BatchNorm over half the batch) is off by 1e-3 or more after one step."""


def case_params(case: str) -> Params:
    train_section = {"epochs": 2, "warmup_epochs": 0, "batch_size": BATCH, "sync_bn": True,
                     **CASES[case]}
    model = TINY["model"] | (CLIP_MODEL if case == "clip" else {})
    return parse_params({**TINY, "model": model, "train": train_section})


def method_inputs(params: Params) -> MethodInputs:
    """clip: two captions for each of the BATCH images (the batches carry image indices)."""
    if params.train.method != "clip":
        return MethodInputs()
    captions = [[f"a photo of a {k}.", f"a blurry photo of the {k}."] for k in range(BATCH)]
    tok = train_tokenizer([c for own in captions for c in own], 300)
    return MethodInputs(captions=CaptionTable.build(captions, tok,
                                                    params.model.text.context_length))


DATA_SEED = {"moco_symmetric": 200}
"""The data of a case where it is not the default (100). With 100, step 2 of symmetric MoCo puts
one hidden unit of the projection head's swapped term within 6e-8 of the ReLU's kink (float64:
+2.9e-6); 1 and 2 processes sum BatchNorm's statistics in another order, so float32 rounds it to
opposite sides, the unit passes a gradient in one run only, and the weights part by 0.017 after
3 steps. Every tensor before that ReLU agrees; with seeds 200, 300, 400 and 500 the runs agree
within 3.4e-6. The test is of the computation, not of that one rounding, so the case uses 200."""


def global_batch(step: int, seed: int = 100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two views of BATCH images and their labels (4 classes, 2 images each), drawn by step."""
    g = torch.Generator().manual_seed(seed + step)
    view_a = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    view_b = torch.randn(BATCH, 3, SIZE, SIZE, generator=g)
    labels = torch.arange(BATCH) % 4
    return view_a, view_b, labels


def train_steps(case: str, world: distributed.World) -> dict[str, Any]:
    """One step's loss and gradients, then the state after STEPS SGD steps, for this process's
    share of every global batch (all of it in one process)."""
    params = case_params(case)
    torch.manual_seed(0)
    method = build(build_encoder(params.model, SIZE), params, method_inputs(params))
    if world.distributed:
        distributed.convert_sync_batchnorm(method)
    model = distributed.wrap(method, world, torch.device("cpu"))
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)
    share = slice(world.rank * BATCH // world.world_size,
                  (world.rank + 1) * BATCH // world.world_size)
    result: dict[str, Any] = {}
    for step in range(STEPS):
        view_a, view_b, labels = global_batch(step, DATA_SEED.get(case, 100))
        if method.batch_targets == "index":
            labels = torch.arange(BATCH)
        loss = model(view_a[share], view_b[share], labels[share])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            result["loss"] = distributed.mean(loss.detach()).item()
            result["grads"] = {name: p.grad.clone() for name, p in method.named_parameters()
                               if p.grad is not None}
        optimizer.step()
        method.after_step((step + 1) / STEPS)
    result["state"] = {k: v.clone() for k, v in method.state_dict().items()}
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    fn(*args)


def spawn(fn: Callable[..., Any], *args: Any) -> None:
    """``fn(*args)`` in WORLD processes that see torchrun's variables."""
    mp.spawn(_worker, args=(WORLD, _free_port(), fn, args), nprocs=WORLD, join=True)


def _all_cases(out: str) -> None:
    world, _ = distributed.init(case_params("simclr"), torch.device("cpu"))
    try:
        results = {case: train_steps(case, world) for case in CASES}
    finally:
        distributed.cleanup()
    if world.is_main:
        torch.save(results, out)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every case trained by 2 processes, once for the module (one spawn: a few seconds)."""
    out = tmp_path_factory.mktemp("ddp") / "results.pt"
    spawn(_all_cases, str(out))
    return torch.load(out, weights_only=True)


def test_the_cases_cover_every_method() -> None:
    assert {c["method"] for c in CASES.values()} == set(METHODS)


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    torch.set_num_threads(1)
    return {case: train_steps(case, distributed.SINGLE) for case in CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_compute_the_loss_and_gradients_of_one(
    one_process: dict[str, Any], two_processes: dict[str, Any], case: str
) -> None:
    one, two = one_process[case], two_processes[case]
    assert two["loss"] == pytest.approx(one["loss"], abs=GRAD_ATOL)
    assert two["grads"].keys() == one["grads"].keys()
    for name, grad in one["grads"].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(two["grads"][name], grad, atol=GRAD_ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_after_a_few_steps_the_weights_agree(
    one_process: dict[str, Any], two_processes: dict[str, Any], case: str
) -> None:
    one, two = one_process[case], two_processes[case]
    assert two["state"].keys() == one["state"].keys()
    for name, value in one["state"].items():
        if value.is_floating_point():
            torch.testing.assert_close(two["state"][name], value, atol=WEIGHT_ATOL, rtol=0,
                                       msg=name)
        else:
            assert torch.equal(two["state"][name], value), name


def _no_sync_bn(out: str) -> None:
    """simclr without sync_bn: each process's BatchNorm sees only its half of the batch."""
    params = case_params("simclr")
    world, _ = distributed.init(params, torch.device("cpu"))
    try:
        method = build(build_encoder(params.model, SIZE), params)
        model = distributed.wrap(method, world, torch.device("cpu"))
        view_a, view_b, labels = global_batch(0)
        share = slice(world.rank * BATCH // 2, (world.rank + 1) * BATCH // 2)
        model(view_a[share], view_b[share], labels[share]).backward()
        grads = {n: p.grad.clone() for n, p in method.named_parameters()}
    finally:
        distributed.cleanup()
    if world.is_main:
        torch.save(grads, out)


def test_the_equality_needs_the_global_batch_norm(tmp_path: Path) -> None:
    """The check above can fail: without sync_bn the gradients differ (the test is not blind)."""
    torch.set_num_threads(1)
    spawn(_no_sync_bn, str(tmp_path / "grads.pt"))
    local = torch.load(tmp_path / "grads.pt", weights_only=True)
    reference = train_steps("simclr", distributed.SINGLE)["grads"]
    worst = max((local[n] - g).abs().max().item() for n, g in reference.items())
    assert worst > 100 * GRAD_ATOL


# --- pretrain in 2 processes: the stage, killed and resumed -------------------------------------

DDP_TRAIN = {"epochs": 4, "warmup_epochs": 1, "batch_size": 128, "knn_every": 2,
             "devices": WORLD, "sync_bn": True}


def command(folder: Path) -> subprocess.Popen:
    """``contrastive pretrain`` as DVC runs it, in its own session (so the test can kill it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "CONTRASTIVE_LIVE_TRACKING": "0"}
    env.pop("OMP_NUM_THREADS", None)  # the command shares the CPUs out between its processes
    return subprocess.Popen(
        [sys.executable, "-m", "contrastive.cli", "pretrain"], cwd=folder, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate(timeout=240)
    assert process.returncode == 0, err
    return out


def without_speed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in history]


def test_a_killed_two_process_pretrain_resumes_to_the_uninterrupted_result(
    workspace: Path,
) -> None:
    """``train.devices: 2``: the command relaunches itself through torch.distributed.run.
    Killed (SIGKILL to the command) after its first checkpoint and run again, it ends with the
    weights, queues and history of an uninterrupted 2-process run."""
    write_params(workspace, {"train": DDP_TRAIN})
    assert main(["prepare"]) == 0
    finish(command(workspace))
    uninterrupted = torch.load("checkpoints/last.pt", weights_only=True)
    assert Path("models/encoder.pt").is_file() and Path("metrics/pretrain.json").is_file()
    for output in ("checkpoints/last.pt", "models/encoder.pt", "metrics/pretrain.json"):
        Path(output).unlink()

    process = command(workspace)
    deadline = time.monotonic() + 240
    while not Path("checkpoints/last.pt").exists() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    killed_at = torch.load("checkpoints/last.pt", weights_only=True)["epoch"]
    assert 1 <= killed_at < DDP_TRAIN["epochs"], "the run finished before the kill"
    assert not Path("models/encoder.pt").exists()
    time.sleep(1)  # the workers end with their parent (PR_SET_PDEATHSIG)

    out = finish(command(workspace))
    resumed = torch.load("checkpoints/last.pt", weights_only=True)
    assert '"final_loss"' in out and Path("models/encoder.pt").is_file()
    assert without_speed(resumed["history"]) == without_speed(uninterrupted["history"])
    assert resumed["method"].keys() == uninterrupted["method"].keys()
    for name, value in uninterrupted["method"].items():
        assert torch.equal(resumed["method"][name], value), name


@pytest.mark.parametrize(
    ("overrides", "environ", "fragment"),
    [
        ({"devices": 3}, {}, "not divisible by train.devices (3)"),
        ({"devices": 200}, {}, "train.devices: 200 processes"),
        ({}, {"WORLD_SIZE": "3", "RANK": "0"}, "not divisible by the 3 processes"),
        ({"batch_size": 4}, {"WORLD_SIZE": "6", "RANK": "0"}, "6 processes"),
        ({"backend": "nccl", "devices": 2}, {}, "train.backend: 'nccl' needs CUDA"),
    ],
)
def test_bad_distributed_input_stops_before_any_work(
    workspace: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
    overrides: dict, environ: dict, fragment: str,
) -> None:
    """One line, exit status 2, no process started and nothing written."""
    assert main(["prepare"]) == 0
    write_params(workspace, {"train": overrides, "device": "cpu"})
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    capsys.readouterr()
    assert main(["pretrain"]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err
    assert not Path("checkpoints").exists() and not Path("models").exists()


def test_sync_bn_needs_batch_norm() -> None:
    """Every method's projection head has BatchNorm, so ``train.sync_bn`` is valid for all of
    them today; the check stands for a future method or head without it."""
    params = parse_params({**TINY, "train": {"sync_bn": True}})
    assert distributed.has_batch_norm(build(build_encoder(params.model, SIZE), params))
    assert not distributed.has_batch_norm(torch.nn.Sequential(torch.nn.Linear(2, 2)))
