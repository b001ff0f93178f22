"""The shard loop both cache stages share: claim a shard, compute it, publish it in the background.

A shard is claimed (locked) when its first item is queued for decoding, so two runs pointed at one cache
never compute the same shard; a finished shard is published by a background thread while the next one is
computed; whichever process finishes last writes the final manifest (`CacheFolder.finalize`).

SIGTERM and SIGINT stop the loop with an exception in the main thread (`StopSignals`), so that the locks this
process holds are released and the shard being published is finished before it exits (a lock left by a run
killed on another host would hold its shard for FOREIGN_STALE_S): the stage then fails with `CacheStopped`.
A shard of this worker that another live run was writing, and that is still not complete at the end, fails
the run with `ShardsHeldElsewhere`: exit status 0 means that this worker's part of the cache is complete.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Hashable, Iterable

import torch

from vild_pipe.errors import VildError, counted, first_few
from vild_pipe.pipeline.checkpoint import GracefulStop
from vild_pipe.pipeline.distributed import cleanup_distributed, init_distributed
from vild_pipe.pipeline.shards import (
    FOREIGN_STALE_S,
    CacheFolder,
    ShardLock,
    ShardWriter,
    Worker,
    claim_shard,
    describe_lock_holder,
    format_bytes,
    live_lock_holder,
    shard_name,
)

log = logging.getLogger(__name__)


@contextlib.contextmanager
def joined_process_group(device: str):
    """This process's place in a torchrun job (or a job of one); leaves the process group it joined at the end."""
    was_distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    info = init_distributed(device)
    try:
        yield info
    finally:
        if not was_distributed:
            cleanup_distributed()


class StopRequested(BaseException):
    """SIGTERM or SIGINT, raised in the main thread by `StopSignals`. A BaseException, as KeyboardInterrupt is,
    so that no `except Exception` on its way (torch's DataLoader, ours) takes it for an error and goes on."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class CacheStopped(VildError):
    """The shard loop was stopped by a signal after releasing its locks; like TrainingStopped, one line and exit
    status 2, so a script does not go on with an unfinished cache."""

    def __init__(self, folder: CacheFolder, signal_name: str, published: int):
        complete = len(folder.complete_shards())
        super().__init__(
            f"{folder.path}: stopped by {signal_name}; {counted(published, 'shard')} published by this run"
            f" ({complete} of {folder.num_shards} complete), rerun the same command to resume"
        )


class ShardsHeldElsewhere(VildError):
    """Shards of this worker that another live run was writing are still not complete at the end: the cache is
    not done, whatever this run wrote (a lock of a run killed on another host looks live for FOREIGN_STALE_S)."""

    def __init__(self, folder: CacheFolder, held: dict[int, dict], published: int):
        names_by_holder: dict[str, list[str]] = {}
        for index, holder in sorted(held.items()):
            names_by_holder.setdefault(describe_lock_holder(holder), []).append(shard_name(index))
        writing = "; ".join(f"{first_few(names, 8)} ({holder})" for holder, names in names_by_holder.items())
        super().__init__(
            f"{folder.path}: the cache is not complete: another run is writing {writing}; {counted(published, 'shard')}"
            f" published by this run. Rerun the same command when that run has finished (the lock of a run killed"
            f" on another host counts as stale {FOREIGN_STALE_S / 60:.0f} min after its last heartbeat)"
        )


class StopSignals(GracefulStop):
    """SIGTERM and SIGINT raise StopRequested in the main thread: at once, or at the end of a `held()` block.

    A shard's lock changes hands in held blocks (taken and recorded, opened, handed to the publisher), so the
    exception never lands between two steps of one: a lock taken but not yet recorded would be left behind,
    and a shard aborted while being published could be published empty. While a `protected` function runs
    (the clean-up, ShardSequence.__exit__, from its first instruction on) signals are only recorded too. The
    first signal raises; later ones are only recorded, but for a second SIGINT, which raises KeyboardInterrupt
    at once as under GracefulStop (a user who does not want to wait for the clean-up).
    """

    def __init__(self, protected: Iterable[Callable] = ()):
        super().__init__()
        self._protected = {function.__code__ for function in protected}
        self._holding = 0
        self._raised = False

    def _handle(self, signum: int, frame: Any) -> None:
        first = not self.requested
        super()._handle(signum, frame)
        if first and not self._holding and not self._in_protected(frame):
            self._raise()

    def _in_protected(self, frame: Any) -> bool:
        while frame is not None:
            if frame.f_code in self._protected:
                return True
            frame = frame.f_back
        return False

    def _raise(self) -> None:
        self._raised = True
        raise StopRequested(self.signal_name)

    @property
    def pending(self) -> bool:
        """A signal came that has not been raised yet."""
        return self.requested and not self._raised

    @contextlib.contextmanager
    def held(self):
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
        if not self._holding and self.pending:
            self._raise()

    def __enter__(self) -> StopSignals:
        self._holding += 1  # a signal while the handlers go in waits for the next held block's end
        try:
            return super().__enter__()
        finally:
            self._holding -= 1

    def hold_from_now(self) -> None:
        """Only record signals from now on; the caller asks `pending`."""
        self._holding += 1

    def __exit__(self, *exc_info: Any) -> None:
        self.hold_from_now()
        super().__exit__(*exc_info)


class ClaimingSampler:
    """Yields `(shard index, item)` for the worker's shards, locking each shard as its first item is queued.

    The DataLoader pulls items a few batches ahead of the model, so a shard is claimed shortly before it is
    computed rather than all at the start; a shard another live run holds (or finished meanwhile) is passed
    over, the former noted in `held_elsewhere`. Claimed shards queue up in `claimed`, in order, for the main
    loop (`open_next`). A claim is made inside `hold()`, which ShardSequence sets to its StopSignals' `held`.
    """

    def __init__(self, folder: CacheFolder, shard_indices: list[int], items_of: Callable[[int], Iterable[Hashable]]):
        self.folder = folder
        self.shard_indices = shard_indices
        self.items_of = items_of
        self.claimed: collections.deque[tuple[int, ShardLock]] = collections.deque()
        self.held_elsewhere: dict[int, dict] = {}
        self.hold: Callable[[], ContextManager] = contextlib.nullcontext

    def __iter__(self):
        warned = False
        for index in self.shard_indices:
            with self.hold():
                lock, holder = claim_shard(self.folder, index)
                if lock is not None:
                    self.claimed.append((index, lock))
            if lock is None:
                if holder is not None:
                    self.held_elsewhere[index] = holder
                continue
            if self.folder.made_otherwise and not warned:
                warned = True
                log.warning("%s: begun with other settings than this run's (%s): the shards this run writes may"
                            " differ from the others in their last bits; resume with the first run's settings for a"
                            " cache equal bit for bit to one run's", self.folder.path,
                            "; ".join(self.folder.made_otherwise))
            for item in self.items_of(index):
                yield index, item

    def open_next(self, shard_index: int) -> OpenShard:
        """The writer of the next claimed shard, which must be `shard_index`."""
        index, lock = self.claimed[0]
        if index != shard_index:
            raise RuntimeError(f"items of {shard_name(shard_index)} arrived while {shard_name(index)} was expected")
        shard = OpenShard(index, lock, ShardWriter(self.folder, index))
        self.claimed.popleft()
        return shard

    def still_held_elsewhere(self) -> dict[int, dict]:
        """The shards passed over for another live run that are still not complete, with who holds them now (or
        held them, where the lock is gone: that run stopped without finishing them)."""
        return {index: live_lock_holder(self.folder.lock_path(index)) or holder
                for index, holder in self.held_elsewhere.items() if not self.folder.is_complete(index)}

    def release_unstarted(self) -> None:
        while self.claimed:
            self.claimed.popleft()[1].release()


@dataclass
class OpenShard:
    index: int
    lock: ShardLock
    writer: ShardWriter

    def abort(self) -> None:
        self.writer.abort()
        self.lock.release()


class BackgroundPublisher:
    """Publishes finished shards on one background thread, at most one at a time (bounded memory)."""

    def __init__(self):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._in_flight: Future | None = None
        self.published: list[int] = []

    def submit(self, shard: OpenShard) -> None:
        self.wait()
        self._in_flight = self._executor.submit(self._publish, shard)
        self.published.append(shard.index)

    @staticmethod
    def _publish(shard: OpenShard) -> dict:
        try:
            return shard.writer.close()
        finally:
            shard.lock.release()

    def wait(self) -> None:
        """Block until the shard in flight is published; re-raises its error (disk full...)."""
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.result()

    def stop_after_error(self) -> None:
        """Let the shard being published finish (it is complete); an error of its own is secondary to the one
        already being raised, so it is logged, not raised."""
        try:
            self.wait()
        except Exception as publish_error:
            log.error("while stopping: %s", publish_error)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


class ShardSequence:
    """The shards one process writes, in order: `shard(i)` opens shard i when its first item arrives, and
    hands the previous one (after `before_publish(shard)`, which may still add rows) to the background
    publisher. Use as a context manager around the loop: a clean exit publishes the last shard and waits for
    it; an error drops the open shard, releases the claims not started and lets the shard being published
    finish. Inside it SIGTERM and SIGINT are such errors (`StopSignals`) and end as CacheStopped; a clean exit
    with shards left to another run that are still not complete raises ShardsHeldElsewhere."""

    def __init__(self, sampler: ClaimingSampler, before_publish: Callable[[OpenShard], None] | None = None):
        self.sampler = sampler
        self.before_publish = before_publish
        self.publisher = BackgroundPublisher()
        self.current: OpenShard | None = None
        self.stop = StopSignals(protected=[ShardSequence.__exit__])
        sampler.hold = self.stop.held

    def shard(self, index: int) -> OpenShard:
        if self.current is None or self.current.index != index:
            self._publish_current()
            with self.stop.held():
                self.current = self.sampler.open_next(index)
        return self.current

    def _publish_current(self) -> None:
        if self.current is not None:
            if self.before_publish is not None:
                self.before_publish(self.current)
            with self.stop.held():
                self.publisher.submit(self.current)
                self.current = None

    @property
    def published(self) -> list[int]:
        return self.publisher.published

    def __enter__(self) -> ShardSequence:
        self.stop.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop.hold_from_now()  # a signal during the clean-up is raised after it, as CacheStopped
        try:
            if exc_type is None:
                self._publish_current()
                self.publisher.wait()
            else:
                if self.current is not None:
                    self.current.abort()
                self.sampler.release_unstarted()
                self.publisher.stop_after_error()
        finally:
            try:
                self.publisher.shutdown()
            finally:
                self.stop.__exit__()
        if isinstance(exc, StopRequested) or (exc_type is None and self.stop.pending):
            signal_name = exc.signal_name if isinstance(exc, StopRequested) else self.stop.signal_name
            published = sum(self.sampler.folder.is_complete(index) for index in self.published)
            raise CacheStopped(self.sampler.folder, signal_name, published) from None
        if exc_type is None:
            held = self.sampler.still_held_elsewhere()
            for index, holder in sorted(held.items()):
                log.warning("%s of this worker is not complete: another run is writing it (%s)", shard_name(index),
                            describe_lock_holder(holder))
            if held:
                raise ShardsHeldElsewhere(self.sampler.folder, held, len(self.published))


def cache_summary(folder: CacheFolder, written: list[int], complete: bool, seconds: float) -> dict:
    """Totals over the cache's complete shards, and what this process wrote."""
    totals = folder.manifest_summary()
    images = totals["images"]
    return {
        "out": os.fspath(folder.path),
        "complete": complete,
        "num_shards": totals["num_shards"],
        "complete_shards": totals["complete_shards"],
        "shards_written": written,
        "images": images,
        "rows": totals["rows"],
        "bytes": totals["bytes"],
        "bytes_per_image": totals["bytes"] / images if images else 0.0,
        "skipped_images": totals["skipped_images"],
        "seconds": round(seconds, 2),
    }


def log_nothing_to_write(num_shards: int, worker: Worker) -> None:
    """Why this worker writes nothing: it was dealt no shard (more workers than shards), or all of its are done."""
    if worker.shards(num_shards):
        log.info("%s: every shard of this worker is already complete", worker)
    else:
        log.info("%s: no shards for this worker (the cache has %d)", worker, num_shards)


def log_measured_cost(folder: CacheFolder, summary: dict) -> None:
    if summary["images"]:
        log.info("%s: %d of %s complete, %d images, %d rows, %s measured (%s per image)%s", folder.path,
                 summary["complete_shards"], counted(summary["num_shards"], "shard"), summary["images"],
                 summary["rows"], format_bytes(summary["bytes"]), format_bytes(summary["bytes_per_image"]),
                 "" if summary["complete"] else "; the cache is finished when the other workers' shards are written")
    if summary["skipped_images"]:
        log.warning("%d images were skipped as unreadable; they are listed in the shard markers and, once the"
                    " cache is complete, in %s", len(summary["skipped_images"]), folder.path / "manifest.json")
