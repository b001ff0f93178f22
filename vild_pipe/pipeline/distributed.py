"""Single-process or torchrun, decided from the environment (the nanoGPT way).

`torchrun --nproc_per_node=W ...` sets RANK, WORLD_SIZE and LOCAL_RANK; without them the same code runs as
one process. The training stages wrap their model with `wrap_ddp` and take their slice of every global
batch (`checkpoint.StepSampler`); the cache stages need no communication: rank r of W takes shards
r, r+W, ... (`shards.Worker`).
"""
from __future__ import annotations

import gc
import logging
import os
import random
import signal
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vild_pipe.errors import VildError, require_at_least

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job: rank r of world_size, on `device`."""

    rank: int
    world_size: int
    local_rank: int
    is_distributed: bool
    device: torch.device


def pick_device(requested: str | None = None) -> torch.device:
    """Resolve a --device value: None or "auto" means CUDA when there is one, else CPU."""
    if requested is None or requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise VildError(f"--device {requested}: not a device name (use auto, cpu, cuda or cuda:N)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise VildError(f"--device {requested}: no CUDA device is available (torch {torch.__version__}, {build})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise VildError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise VildError(f"--device {requested}: MPS is not available on this machine")
    return device


def use_threads(threads: int) -> None:
    """A --threads value: torch's CPU threads for this process (0: torch's default, left as it is)."""
    require_at_least("--threads", threads, 0)
    if threads:
        torch.set_num_threads(threads)


def made_on(device: torch.device) -> dict[str, Any]:
    """What a cache records of the arithmetic that filled it (`CacheFolder.open_or_create`'s `made_with`): the
    device, and on the CPU torch's thread count, which splits matmuls and convolutions otherwise (measured:
    RoIAlign features up to 4e-3 apart between 1 and 2 threads; torchrun sets OMP_NUM_THREADS=1)."""
    if device.type == "cpu":
        return {"device": device_name(device), "threads": torch.get_num_threads()}
    return {"device": device_name(device)}


def device_name(device: torch.device) -> str:
    """The device as its arithmetic goes: "cpu", or "cuda: <the card's name>" (another card may round otherwise)."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return device.type


def loader_workers(workers: int) -> dict[str, Any]:
    """DataLoader options for `workers` worker processes: forked on Linux whatever Python's default, and
    leaving stop signals to the main process (`ignore_stop_signals`).

    Python 3.14 made forkserver the default there: each worker then imports torch and unpickles its dataset,
    seconds a loader against 0.15 s forked (bench/loader_start.py), paid by every stage. Forking is safe
    here: workers use no CUDA, open their own HDF5 files, and are started before the shard writer has work.
    Elsewhere (macOS, Windows) the platform's default stays.
    """
    fork = workers > 0 and sys.platform.startswith("linux")
    return {"num_workers": workers, "multiprocessing_context": "fork" if fork else None,
            "worker_init_fn": ignore_stop_signals if workers > 0 else None}


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's init: workers leave SIGTERM/SIGINT to the main process, which stops cleanly (saves a
    checkpoint under GracefulStop, releases its shard locks under shard_work.StopSignals) and then stops them;
    a worker killed by the signal would instead fail the main process with a traceback wherever it was."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group if there is one (nccl on CUDA, gloo on CPU); else run as one process.

    Under torchrun each process uses cuda:LOCAL_RANK (or the CPU when `device` says cpu or there is no GPU).
    Calling it again in the same process returns the same answer without re-initialising.
    """
    if not _launched_by_torchrun():
        return DistInfo(rank=0, world_size=1, local_rank=0, is_distributed=False, device=pick_device(device))

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if pick_device(device).type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise VildError(
                f"LOCAL_RANK={local_rank}: only {torch.cuda.device_count()} CUDA device(s) are visible on this node"
            )
        run_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(run_device)
        backend = "nccl"
    else:
        run_device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        log.info("rank %d of %d joined the %s process group on %s", rank, world_size, backend, run_device)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, is_distributed=True, device=run_device)


def cleanup_distributed() -> None:
    """Leave the process group (a no-op for a single process).

    A DDP wrapper sits in a reference cycle (only the garbage collector frees it) and holds the group and
    its reducer; freed at interpreter exit, after the group is gone, such objects can abort a finished rank
    ("terminate called without an active exception", seen once in CI). Collect them while the group lives."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def is_main(info: DistInfo | None = None) -> bool:
    """True on the one process that writes files and logs progress (rank 0)."""
    if info is not None:
        return info.rank == 0
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (a no-op for a single process)."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all ranks, as a new tensor (a copy for a single process). Under NCCL the
    tensor must be on the rank's GPU."""
    reduced = tensor.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over all ranks, as a new tensor (a copy for a single process)."""
    reduced = all_reduce_sum(tensor)
    if dist.is_initialized():
        reduced /= dist.get_world_size()
    return reduced


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when `flag` is true on at least one rank, so all ranks take the same branch (e.g. stop now)."""
    if not dist.is_initialized():
        return flag
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank; `[obj]` for a single process."""
    if not dist.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def wrap_ddp(model: nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    """The model wrapped in DistributedDataParallel when distributed, else the model itself.

    DDP broadcasts rank 0's parameters at construction, so ranks seeded differently still start equal.
    """
    if not info.is_distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / torch.compile wrappers (what a checkpoint stores)."""
    while True:
        if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (CPU and all CUDA devices) with seed + rank.

    Adding the rank gives each rank its own dropout masks; model initialisation still agrees because
    `wrap_ddp` starts every rank from rank 0's weights.
    """
    seeded = seed + rank
    random.seed(seeded)
    np.random.seed(seeded % 2**32)
    torch.manual_seed(seeded)
