"""What the two training stages (train-rpn, train-head) share about a run folder: the lr schedule, the
metrics file and the folder itself."""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator

from vild_pipe.errors import VildError, describe_error, require_at_least
from vild_pipe.pipeline.distributed import any_rank
from vild_pipe.pipeline.shards import FOREIGN_STALE_S, ShardLock, describe_lock_holder, write_text_atomically

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
RUN_LOCK_NAME = "run.lock"

WARMUP_START = 0.001   # lr factor at step 0 of the warm-up
STEP_DECAYS = ((2 / 3, 0.1), (8 / 9, 0.01))
SCHEDULES = ("cosine", "step")


SPLIT_NAMING = "data.split.spec"
"""How a run's config names its category split: the same categories named otherwise (a copy of a novel-file, a
relative path, the names listed) resume the run."""


def check_schedule(hyper: dict[str, Any]) -> None:
    """VildError unless the step count, batch, lr, warm-up and schedule make a schedule."""
    require_at_least("--iterations", hyper["iterations"])
    require_at_least("--batch-size", hyper["batch_size"])
    if not hyper["lr"] > 0:
        raise VildError(f"--lr must be positive, got {hyper['lr']}")
    if hyper["warmup"] < 0:
        raise VildError(f"--warmup must be 0 or more, got {hyper['warmup']}")
    if hyper["schedule"] not in SCHEDULES:
        raise VildError(f"unknown lr schedule {hyper['schedule']!r}: use one of {', '.join(SCHEDULES)}")
    if hyper["warmup"] >= hyper["iterations"] > 1:   # a short run on a small dataset, with the default warm-up
        last = hyper["lr"] * lr_factor_schedule(hyper)(hyper["iterations"] - 1)
        log.warning("--warmup %d is not shorter than --iterations %d: the lr never reaches --lr %g (its last step"
                    " runs at %.3g); a --warmup of about a tenth of the steps suits a short run", hyper["warmup"],
                    hyper["iterations"], hyper["lr"], last)


def check_optimiser(momentum: float, weight_decay: float, clip_grad_norm: float | None) -> None:
    """VildError for optimiser settings torch would take and train wrongly with (a negative gradient-norm limit
    flips every gradient) or refuse with a traceback."""
    if not 0 <= momentum < 1:
        raise VildError(f"--momentum must be in [0, 1), got {momentum}")
    if weight_decay < 0:
        raise VildError(f"--weight-decay must be 0 or more, got {weight_decay}")
    if clip_grad_norm is not None and clip_grad_norm < 0:
        raise VildError(f"--clip-grad-norm must be 0 or more (0: off), got {clip_grad_norm}")


def lr_factor_schedule(hyper: dict[str, Any]):
    """lr multiplier after `step` steps: linear warm-up from WARMUP_START, then cosine to 0 or step decay."""
    total, warmup, schedule = hyper["iterations"], hyper["warmup"], hyper["schedule"]

    def factor(step: int) -> float:
        if step < warmup:
            return WARMUP_START + (1 - WARMUP_START) * step / warmup
        if schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        decay = 1.0
        for fraction, value in STEP_DECAYS:
            if step >= round(fraction * total):
                decay = value
        return decay

    return factor


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one line (a single write: a killed run leaves whole lines only)."""
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    except OSError as err:
        raise VildError(f"{path}: cannot write ({describe_error(err)})") from err


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metric lines of steps after `step`: a resumed run redoes them and logs them again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    write_text_atomically(path, "".join(line + "\n" for line in kept))


def make_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise VildError(f"{run_dir}: exists and is not a folder; pick another run folder")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VildError(f"{run_dir}: cannot create the run folder ({describe_error(err)})") from err


@contextlib.contextmanager
def run_folder_lock(run_dir: Path, main_process: bool = True) -> Iterator[None]:
    """Hold RUN_DIR/run.lock while training: a second run of the same folder (a command started twice, a job
    requeued while the first still runs) is refused instead of interleaving checkpoints and metric lines."""
    with run_lock(run_dir / RUN_LOCK_NAME, run_dir, "is training in this run folder", main_process):
        yield


@contextlib.contextmanager
def run_lock(path: Path, guarded: Path, doing: str, main_process: bool = True) -> Iterator[None]:
    """Hold the lock file `path` while this run writes `guarded`; another live holder is a VildError naming it
    and `doing` (what it is doing there). A killed run's lock is found stale (dead pid, or no heartbeat from
    another host) and taken over. Under torchrun only the main process, the one that writes, holds it; every
    rank learns whether it got it, so all of them stop with one line instead of the others failing in their
    next collective."""
    lock, problem = None, None
    if main_process:
        try:
            lock, holder = ShardLock.acquire(path)
        except OSError as err:
            problem = f"{path}: cannot create ({describe_error(err)})"
        else:
            if lock is None:
                problem = (f"{guarded}: {describe_lock_holder(holder)} {doing}; wait for it to end or stop it"
                           f" (should it have been killed, the next run takes over {path}: on its host at once,"
                           f" elsewhere {FOREIGN_STALE_S / 60:.0f} min after its last heartbeat)")
    if any_rank(problem is not None):
        raise VildError(problem or f"{guarded}: the main process could not take {path.name} (its error says why)")
    with lock if lock is not None else contextlib.nullcontext():
        yield
