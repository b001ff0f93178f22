"""Resumable training: atomic checkpoints, RNG state, signal-driven stops, and a data order that depends on
(seed, step) only.

A training loop that uses these pieces and is killed at any point, then rerun with the same command, reaches
bit-for-bit the same weights as a run that was never interrupted (on CPU with a fixed seed; on CUDA as far as
the kernels themselves are deterministic):

    seed_everything(config["seed"], info.rank)
    model, optimizer, scheduler = ...
    sampler = StepSampler(n_samples, config["batch_size"], config["seed"], info.rank, info.world_size)
    with GracefulStop() as stop:
        step = resume_or_start(run_dir, config, model, optimizer, scheduler)
        model = wrap_ddp(model, info)
        while step < config["iterations"]:
            train_one_step(model, sampler.indices(step))
            step += 1
            stopping = stop.requested_on_any_rank(info.device)
            if stopping or step % config["checkpoint_every"] == 0 or step == config["iterations"]:
                save_training_state(run_dir, step, config, model, optimizer, scheduler)
            if stopping:
                raise TrainingStopped(stop.signal_name, step, run_dir / CHECKPOINT_NAME)

Checkpoints are loaded with `torch.load(weights_only=True)`: everything saved here is tensors and plain
python values (the RNG states are converted to tensors, the config to JSON types), so loading a checkpoint
never runs pickled code and keeps working across torch's change of the `weights_only` default.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import pickle
import random
import re
import signal
import threading
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vild_pipe.errors import DataError, VildError, describe_error, value_changes
from vild_pipe.pipeline.distributed import any_rank, barrier, gather_objects, unwrap_model

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.pt"
CHECKPOINT_FORMAT = 1


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> Path:
    """Write `state` to `path` atomically: a reader sees the previous file or the new one, never half of one.

    The data goes to `path.tmp` in the same folder, is fsynced, then renamed over `path`. A failed write
    (disk full, read-only folder) raises VildError naming the file, removes the temp file and leaves the
    previous checkpoint untouched.
    """
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        if tmp.exists():  # `path` has one writer, us: this is what a run killed while saving left
            tmp.unlink()
            log.info("removed %s, left by a run stopped while saving", tmp)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            torch.save(dict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        # torch's zip writer reports a failed write (e.g. ENOSPC) as RuntimeError, not OSError.
        if isinstance(err, (OSError, RuntimeError)):
            raise VildError(f"{path}: cannot write checkpoint ({describe_error(err)})") from err
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable; not every platform/filesystem allows opening a folder, so best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    remove_stale_tmp: bool = True, mmap: bool = False) -> dict[str, Any] | None:
    """The dict saved at `path`, or None when there is none yet (`mmap`: tensors mapped, not read, for a
    caller that wants only the small entries).

    A `path.tmp` left by a run killed mid-save is removed (the previous `path`, if any, is complete);
    under torchrun only rank 0, the one writer, may do that, or it could delete a save in progress.
    A truncated or corrupt file raises DataError naming it.
    """
    path = Path(path)
    tmp = _tmp_path(path)
    if remove_stale_tmp and tmp.exists():
        tmp.unlink(missing_ok=True)
        log.info("removed %s, left by a run stopped while saving", tmp)
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        if isinstance(err, OSError) and err.errno != errno.EINVAL:  # EINVAL: torch's zip reader on a cut file
            raise VildError(f"{path}: cannot read checkpoint ({describe_error(err)})") from err
        raise DataError(f"{path}: not a readable checkpoint ({describe_load_error(path, err)})") from err
    if not isinstance(state, dict):
        raise DataError(f"{path}: not a checkpoint written by vild-pipe (holds a {type(state).__name__}, not a dict)")
    return state


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_PICKLE_MAGIC = b"\x80"     # a pickle of protocol 2 or more: torch's legacy format, or a plain pickle


def describe_load_error(path: str | os.PathLike, err: BaseException,
                        otherwise: str | None = "truncated or corrupt") -> str:
    """Why `torch.load(path)` failed with `err`, in a few words for "PATH: not a readable checkpoint (REASON)".

    torch's own messages run to paragraphs of advice about `weights_only` that does not fit the usual cases:
    a JSON or text file given by mistake, a file cut short, or a pickle of other objects than tensors (which
    must not be loaded with `weights_only=False` on a stranger's word). The file's first bytes tell which.
    `otherwise` names the failure of a file that looks whole, with torch's first sentence after it; None gives
    the exception's type instead (for callers whose failure may come after the load).
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError as read_err:
        return f"cannot read it: {describe_error(read_err)}"
    if not head:
        return "empty file"
    if not head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        return f"not a PyTorch file{_looks_like(head)}"
    if head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
        return "truncated or corrupt: its zip directory is missing"
    if isinstance(err, pickle.UnpicklingError) and "weights only load failed" in str(err).lower():
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        example = f", e.g. {found.group(1)}," if found else ","
        return f"holds pickled Python objects besides tensors{example} which vild-pipe does not load"
    sentence = "" if isinstance(err, OSError) else _first_sentence(describe_error(err))
    if otherwise is None:
        return f"{type(err).__name__}: {sentence}" if sentence else type(err).__name__
    return f"{otherwise}: {sentence}" if sentence else otherwise


def _first_sentence(text: str, limit: int = 160) -> str:
    """The first sentence of `text`, cut at a word boundary past `limit` characters."""
    sentence = re.split(r"(?<=\w)\. ", text)[0].rstrip(".")
    if len(sentence) <= limit:
        return sentence
    return sentence[:limit].rsplit(" ", 1)[0] + " ..."


def _looks_like(head: bytes) -> str:
    """", it looks like JSON" / ", it looks like text" for a file's first bytes, else nothing."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # a multi-byte character cut by the 512-byte read is still text
            return ""
        text = head[:err.start].decode("utf-8")
    if not text.strip() or not all(c.isprintable() or c.isspace() for c in text):
        return ""
    return ", it looks like JSON" if text.lstrip().startswith(("{", "[")) else ", it looks like text"


def rng_state() -> dict[str, Any]:
    """The state of every random generator a training step may draw from: python, numpy, torch CPU and CUDA.

    Held as tensors and plain numbers so `torch.load(weights_only=True)` reads it back.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": py_version,
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state()` returned, so the next random draws repeat those of the saved run."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["kind"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) != torch.cuda.device_count():
            log.warning(
                "checkpoint holds %d CUDA RNG states, this machine has %d devices: restoring the first %d",
                len(cuda_states), torch.cuda.device_count(), min(len(cuda_states), torch.cuda.device_count()),
            )
        for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


class TrainingStopped(VildError):
    """Raised after the checkpoint is saved because SIGTERM/SIGINT asked the run to stop.

    It is a VildError on purpose: the CLI prints it as one line and exits 2, so a script such as
    `vild-pipe train-rpn ... && vild-pipe dump-proposals ...` does not go on with an unfinished model.
    """

    def __init__(self, signal_name: str | None, step: int, checkpoint: str | os.PathLike):
        super().__init__(
            f"{checkpoint}: stopped by {signal_name or 'a stop request'} after step {step} and saved; "
            "rerun the same command to resume"
        )
        self.step = step


class GracefulStop:
    """Turn SIGTERM and SIGINT into a flag the training loop checks at each step boundary.

    The handlers only set `requested` (and `signal_name`); the loop saves a checkpoint and stops cleanly.
    A second SIGINT while a stop is pending raises KeyboardInterrupt, for a user who does not want to wait.
    The previous handlers come back on exit. Outside the main thread signals cannot be caught; the context
    then does nothing and `requested` stays False.
    """

    def __init__(self, signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def requested_on_any_rank(self, device: torch.device | str = "cpu") -> bool:
        """Whether any rank was asked to stop; every rank must call it at the same step under torchrun.

        Ranks may receive the signal at different steps; agreeing on it keeps them from waiting forever on a
        rank that has already left the loop.
        """
        return any_rank(self.requested, device)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is not threading.main_thread():
            log.debug("not in the main thread: SIGTERM/SIGINT will not be turned into a graceful stop")
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of n samples in one epoch: a pure function of (seed, epoch), independent of any global RNG."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class StepSampler:
    """The sample indices of global step s, computed from (seed, s) alone, so a resumed run needs no iterator.

    Samples flow as one endless stream of epochs, each a fresh permutation; global step s takes stream
    positions [s*B, (s+1)*B) and a batch may span two epochs. Under torchrun rank r of W takes the r-th
    contiguous 1/W of the global batch, so W ranks together see what one process would.
    """

    def __init__(self, n: int, global_batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise VildError("nothing to train on: the training set is empty")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise VildError(
                f"batch size {global_batch_size} must be a positive multiple of the number of processes ({world_size})"
            )
        self.n = n
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._cached_epoch = -1
        self._cached_order = np.empty(0, dtype=np.int64)

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._cached_epoch:
            self._cached_order = epoch_permutation(self.seed, epoch, self.n)
            self._cached_epoch = epoch
        return self._cached_order

    def global_indices(self, step: int) -> np.ndarray:
        """All sample indices of global step `step`, across every rank."""
        positions = np.arange(step * self.global_batch_size, (step + 1) * self.global_batch_size)
        epochs, offsets = np.divmod(positions, self.n)
        batch = np.empty(self.global_batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            batch[in_epoch] = self._order(int(epoch))[offsets[in_epoch]]
        return batch

    def indices(self, step: int) -> np.ndarray:
        """This rank's sample indices for global step `step`."""
        start = self.rank * self.local_batch_size
        return self.global_indices(step)[start : start + self.local_batch_size]


def _plain_config(config: Any) -> dict[str, Any]:
    """The config as JSON types (paths become strings, tuples lists): safe to store and compare."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return json.loads(json.dumps(dict(config), default=str, sort_keys=True))


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       resumable_changes: Iterable[str] = ()) -> list[str]:
    """'key: old -> new' for every (dotted) config key that differs, except those listed as resumable."""
    return value_changes(_plain_config(saved), _plain_config(current), skip=resumable_changes)


def save_training_state(
    run_dir: str | os.PathLike,
    step: int,
    config: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    scaler: Any = None,
    extra: Mapping[str, Any] | None = None,
    name: str = CHECKPOINT_NAME,
) -> Path:
    """Checkpoint everything needed to continue after `step` completed steps to run_dir/`name` (last.pt).

    Under torchrun every rank must call it (each rank's RNG state is gathered); only rank 0 writes.
    `extra` holds the caller's own tensors/plain values (e.g. a running loss average).
    """
    rng_per_rank = gather_objects(rng_state())
    path = Path(run_dir) / name
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        state: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "step": int(step),
            "config": _plain_config(config),
            "model": unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": rng_per_rank,
            "world_size": len(rng_per_rank),
        }
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if extra is not None:
            state["extra"] = dict(extra)
        save_checkpoint(path, state)
    # No rank goes on (to read the run folder, or clean its temp files) before the checkpoint is published.
    barrier()
    log.debug("saved %s at step %d", path, step)
    return path


def save_on_schedule_or_stop(stop: "GracefulStop", device: torch.device | str, run_dir: str | os.PathLike, step: int,
                             last_step: int, every: int, config: Any, model: nn.Module,
                             optimizer: torch.optim.Optimizer, scheduler: Any = None, scaler: Any = None,
                             extra: Mapping[str, Any] | None = None, name: str = CHECKPOINT_NAME) -> None:
    """After a training step: checkpoint every `every` steps, at `last_step`, and when a stop signal reached any
    rank; in that last case raise TrainingStopped once the state is saved, so no finished step is lost."""
    stopping = stop.requested_on_any_rank(device)
    if stopping or step % every == 0 or step == last_step:
        save_training_state(run_dir, step, config, model, optimizer, scheduler, scaler, extra, name)
    if stopping:
        raise TrainingStopped(stop.signal_name, step, Path(run_dir) / name)


def resume_or_start(
    run_dir: str | os.PathLike,
    config: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    scaler: Any = None,
    resumable_changes: Iterable[str] = (),
    name: str = CHECKPOINT_NAME,
    extra_into: dict[str, Any] | None = None,
) -> int:
    """Continue from run_dir/`name` (last.pt) if there is one: the number of completed steps (0 for a fresh start).

    Restores model (DDP-wrapped or not), optimizer, scheduler, scaler and this rank's RNG state, and copies the
    `extra` saved with them into `extra_into` (for a loop whose step draws from more than the global RNGs and
    the modules: its own generator, say). Refuses, naming the keys, a checkpoint saved with another config:
    mixing two configs in one run gives a model neither describes. Keys in `resumable_changes` (dotted for
    nested ones, e.g. "iterations") may differ. Call it after seeding and after building the optimizer; under
    torchrun every rank calls it.
    """
    path = Path(run_dir) / name
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    state = load_checkpoint(path, remove_stale_tmp=rank == 0)
    if state is None:
        log.info("no checkpoint %s: starting at step 0", f"in {run_dir}" if name == CHECKPOINT_NAME else f"at {path}")
        return 0
    missing = {"step", "config", "model", "optimizer", "rng"} - state.keys()
    if missing:
        raise DataError(f"{path}: not a training checkpoint (lacks {', '.join(sorted(missing))})")
    differences = config_differences(state["config"], config, resumable_changes)
    if differences:
        raise VildError(
            f"{path}: saved with another config ({'; '.join(differences)}); "
            "use a new run folder, or delete this one to start over"
        )
    for part, given in (("scheduler", scheduler), ("scaler", scaler)):
        if (given is not None) != (part in state):
            held = "holds" if part in state else "lacks"
            uses = "does not use" if given is None else "uses"
            raise VildError(f"{path}: checkpoint {held} a {part} state but this run {uses} one")

    try:
        unwrap_model(model).load_state_dict(state["model"])
    except RuntimeError as err:
        raise DataError(f"{path}: model weights do not fit this model ({describe_error(err)})") from err
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(state["scaler"])

    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if state["world_size"] == world_size:
        set_rng_state(state["rng"][rank])
    else:
        log.warning(
            "%s was saved by %d process(es), this run has %d: the data order is unchanged, the random streams "
            "(dropout, augmentation) continue from this run's seed instead",
            path, state["world_size"], world_size,
        )
    if extra_into is not None:
        extra_into.update(state.get("extra", {}))
    log.info("resuming from %s at step %d", path, state["step"])
    return int(state["step"])
