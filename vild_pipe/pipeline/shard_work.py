"""The shard loop both cache stages share: claim a shard, compute it, publish it in the background.

A shard is claimed (locked) when its first item is queued for decoding, so two runs pointed at one cache
never compute the same shard; a finished shard is published by a background thread while the next one is
computed; whichever process finishes last writes the final manifest (`CacheFolder.finalize`).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable

import torch

from vild_pipe.pipeline.distributed import cleanup_distributed, init_distributed
from vild_pipe.pipeline.shards import (
    CacheFolder, ShardLock, ShardWriter, format_bytes, shard_name, shards_for_worker, try_lock_shard,
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


class ClaimingSampler:
    """Yields `(shard index, item)` for the worker's shards, locking each shard as its first item is queued.

    The DataLoader pulls items a few batches ahead of the model, so a shard is claimed shortly before it is
    computed rather than all at the start; a shard another live run holds (or finished meanwhile) is passed
    over. Claimed shards queue up in `claimed`, in order, for the main loop (`open_next`).
    """

    def __init__(self, folder: CacheFolder, shard_indices: list[int], items_of: Callable[[int], Iterable[Hashable]]):
        self.folder = folder
        self.shard_indices = shard_indices
        self.items_of = items_of
        self.claimed: collections.deque[tuple[int, ShardLock]] = collections.deque()

    def __iter__(self):
        for index in self.shard_indices:
            lock = try_lock_shard(self.folder, index)
            if lock is None:
                continue
            self.claimed.append((index, lock))
            for item in self.items_of(index):
                yield index, item

    def open_next(self, shard_index: int) -> OpenShard:
        """The writer of the next claimed shard, which must be `shard_index`."""
        index, lock = self.claimed.popleft()
        if index != shard_index:
            raise RuntimeError(f"items of {shard_name(shard_index)} arrived while {shard_name(index)} was expected")
        return OpenShard(index, lock, ShardWriter(self.folder, index))

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
    publisher. Use as a context manager: a clean exit publishes the last shard and waits for it; an error
    drops the open shard, releases the claims not started and lets the shard being published finish."""

    def __init__(self, sampler: ClaimingSampler, before_publish: Callable[[OpenShard], None] | None = None):
        self.sampler = sampler
        self.before_publish = before_publish
        self.publisher = BackgroundPublisher()
        self.current: OpenShard | None = None

    def shard(self, index: int) -> OpenShard:
        if self.current is None or self.current.index != index:
            self._publish_current()
            self.current = self.sampler.open_next(index)
        return self.current

    def _publish_current(self) -> None:
        if self.current is not None:
            if self.before_publish is not None:
                self.before_publish(self.current)
            self.publisher.submit(self.current)
            self.current = None

    @property
    def published(self) -> list[int]:
        return self.publisher.published

    def __enter__(self) -> ShardSequence:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
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
            self.publisher.shutdown()


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


def log_nothing_to_write(num_shards: int, worker: int, num_workers: int) -> None:
    """Why this worker writes nothing: it was dealt no shard (more workers than shards), or all of its are done."""
    if shards_for_worker(num_shards, worker, num_workers):
        log.info("worker %d of %d: every shard of this worker is already complete", worker, num_workers)
    else:
        log.info("worker %d of %d: no shards for this worker (the cache has %d)", worker, num_workers, num_shards)


def log_measured_cost(folder: CacheFolder, summary: dict) -> None:
    if summary["images"]:
        log.info("%s: %d of %d shards complete, %d images, %d rows, %s measured (%s per image)%s", folder.path,
                 summary["complete_shards"], summary["num_shards"], summary["images"], summary["rows"],
                 format_bytes(summary["bytes"]), format_bytes(summary["bytes_per_image"]),
                 "" if summary["complete"] else "; the cache is finished when the other workers' shards are written")
    if summary["skipped_images"]:
        log.warning("%d images were skipped as unreadable; they are listed in the shard markers and, once the"
                    " cache is complete, in %s", len(summary["skipped_images"]), folder.path / "manifest.json")
