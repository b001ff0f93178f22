"""Feeding the head's training from the proposal and embedding caches, in an order that is a function of (seed, step).

Order of one epoch (`epoch_order`, from the shard index alone, no data read): shards in a random order; each
shard cut into blocks of `block_images` consecutive images (whole HDF5 chunks, read with one sequential
slice per dataset) taken in a random order; `buffer_blocks` consecutive blocks form a window, the in-memory
shuffle buffer, whose images are shuffled together. Epochs follow each other as one stream of images; global
step s trains on stream positions [s*B, (s+1)*B), and torchrun rank r of W on the r-th W-th of them, so W
processes train on what one would, and a resumed run on what an uninterrupted one would.

The loader (`StepLoader`) hands whole windows to DataLoader workers round-robin (each worker opens its own
HDF5 files); a worker reads the rows of this rank's images of the window (images that follow each other in a
shard in one slice, so one process reads each block in one piece and W ranks each read about a W-th of the
cache) and chooses their rows:
  - text rows: labels by IoU with the image's base GT boxes (`assign_labels`), optionally a balanced sample
    (`sample_rois`, its random stream a function of (seed, stream position));
  - image rows: the top `image_rois` proposals (stored by decreasing score; GT rows excluded).
The main process cuts the windows' images into step batches.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Iterator

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vild_pipe.errors import DataError, VildError, describe_error
from vild_pipe.pipeline.distributed import loader_workers
from vild_pipe.pipeline.embedding_cache import check_same_rows
from vild_pipe.pipeline.head import assign_labels, sample_rois
from vild_pipe.pipeline.shards import CacheFolder, RowField, bytes_per_row, format_bytes

log = logging.getLogger(__name__)

ORDER_PURPOSE, SAMPLE_PURPOSE = 21, 22   # keep the order's and the RoI sampling's random streams apart
NO_LABEL = -1                            # a row that is not in the ViLD-text sample


@dataclass
class CacheIndex:
    """Where every image of a cache lives: shard, position in it, its rows; read from the shards' index datasets."""

    proposals: CacheFolder
    embeddings: CacheFolder | None
    image_ids: np.ndarray            # (N,) in shard order
    shard: np.ndarray                # (N,) shard index of each image
    position: np.ndarray             # (N,) position of the image in its shard
    row_starts: list[np.ndarray]     # per shard, (n + 1,)

    @classmethod
    def build(cls, proposals: CacheFolder, embeddings: CacheFolder | None = None) -> "CacheIndex":
        ids, shards, positions, row_starts = [], [], [], []
        for index in range(proposals.num_shards):
            with proposals.read_shard(index) as reader:
                image_ids, row_start = reader.image_ids, reader.row_start
                if embeddings is not None:
                    with embeddings.read_shard(index) as embedding_reader:
                        check_same_rows(reader, embedding_reader)
            ids.append(image_ids)
            shards.append(np.full(len(image_ids), index, dtype=np.int64))
            positions.append(np.arange(len(image_ids), dtype=np.int64))
            row_starts.append(row_start)
        image_ids = np.concatenate(ids) if ids else np.empty(0, dtype=np.int64)
        if not len(image_ids):
            raise DataError(f"{proposals.path}: the cache holds no images")
        return cls(proposals, embeddings, image_ids, np.concatenate(shards), np.concatenate(positions), row_starts)

    def __len__(self) -> int:
        return len(self.image_ids)

    def rows(self, image: int) -> int:
        start = self.row_starts[self.shard[image]]
        return int(start[self.position[image] + 1] - start[self.position[image]])

    @property
    def num_rows(self) -> int:
        return int(sum(start[-1] for start in self.row_starts))


@dataclass(frozen=True)
class Window:
    """One shuffle buffer of an epoch: its blocks (shard, first, stop image positions) and its images in order."""

    epoch: int
    start: int                                  # offset of its first image in the epoch's order
    blocks: tuple[tuple[int, int, int], ...]
    images: np.ndarray = field(compare=False)   # global image indices, shuffled


def epoch_windows(index: CacheIndex, seed: int, epoch: int, block_images: int, buffer_blocks: int) -> list[Window]:
    """The windows of one epoch: a pure function of (seed, epoch) and the cache's index."""
    rng = np.random.default_rng([seed, epoch, ORDER_PURPOSE])
    first_image = np.concatenate([[0], np.cumsum([len(start) - 1 for start in index.row_starts])])
    blocks = []
    for shard in rng.permutation(len(index.row_starts)):
        count = len(index.row_starts[shard]) - 1
        starts = np.arange(0, count, block_images)
        for start in starts[rng.permutation(len(starts))]:
            blocks.append((int(shard), int(start), int(min(start + block_images, count))))
    windows, offset = [], 0
    for first in range(0, len(blocks), buffer_blocks):
        group = tuple(blocks[first:first + buffer_blocks])
        images = np.concatenate([np.arange(first_image[s] + a, first_image[s] + b) for s, a, b in group])
        windows.append(Window(epoch, offset, group, images[rng.permutation(len(images))]))
        offset += len(images)
    return windows


class StepOrder:
    """Which images global step s trains on, on which rank: stream positions [s*B, (s+1)*B) over the epochs."""

    def __init__(self, index: CacheIndex, global_batch: int, seed: int, block_images: int = 16,
                 buffer_blocks: int = 8, rank: int = 0, world_size: int = 1):
        if global_batch < 1 or global_batch % world_size:
            raise VildError(f"batch size {global_batch} must be a positive multiple of the number of processes"
                            f" ({world_size})")
        if block_images < 1 or buffer_blocks < 1:
            raise VildError(f"block images and buffer blocks must be positive (got {block_images}, {buffer_blocks})")
        self.index, self.global_batch, self.seed = index, global_batch, seed
        self.block_images, self.buffer_blocks = block_images, buffer_blocks
        self.rank, self.world_size = rank, world_size
        self._cache: dict[int, list[Window]] = {}

    @property
    def local_batch(self) -> int:
        return self.global_batch // self.world_size

    def windows(self, epoch: int) -> list[Window]:
        if epoch not in self._cache:
            self._cache = {epoch: epoch_windows(self.index, self.seed, epoch, self.block_images, self.buffer_blocks)}
        return self._cache[epoch]

    def image_at(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.index))
        windows = self.windows(epoch)
        starts = [window.start for window in windows]
        window = windows[int(np.searchsorted(starts, offset, side="right")) - 1]
        return int(window.images[offset - window.start])

    def global_images(self, step: int) -> np.ndarray:
        """Global image indices of step `step`, across all ranks (a test and benchmark aid)."""
        return np.array([self.image_at(p) for p in range(step * self.global_batch, (step + 1) * self.global_batch)])

    def is_mine(self, positions: np.ndarray) -> np.ndarray:
        """Whether each stream position belongs to this rank's part of its step."""
        return (positions % self.global_batch) // self.local_batch == self.rank

    def windows_between(self, first_step: int, stop_step: int) -> Iterator[tuple[Window, int]]:
        """(window, stream position of its first image) for every window touching steps [first_step, stop_step)."""
        first, stop = first_step * self.global_batch, stop_step * self.global_batch
        if stop <= first:
            return
        size = len(self.index)
        for epoch in range(first // size, (stop - 1) // size + 1):
            for window in self.windows(epoch):
                begin = epoch * size + window.start
                if begin + len(window.images) > first and begin < stop:
                    yield window, begin


@dataclass(frozen=True)
class RowSelection:
    """Which rows of an image train which loss, and where the GT of the images is."""

    text: bool
    image: bool
    image_rois: int = 300             # top-M proposals for ViLD-image
    sample_rois: int | None = 512     # RoIs sampled per image for ViLD-text; None: every row
    foreground_fraction: float = 0.25
    seed: int = 0


@dataclass(frozen=True)
class RowChoice:
    """The rows of one image that train something (indices in row order), their text label and image flag."""

    keep: np.ndarray          # (k,) row indices within the image
    labels: np.ndarray        # (k,) NO_LABEL for rows outside the ViLD-text sample
    image_mask: np.ndarray    # (k,) bool, rows with a ViLD-image target


def choose_rows(boxes: np.ndarray, is_gt: np.ndarray, gt: tuple[np.ndarray, np.ndarray] | None,
                selection: RowSelection, position: int) -> RowChoice:
    """Which rows of one image train which loss; needs only the image's boxes, not its features."""
    count = len(is_gt)
    labels = np.full(count, NO_LABEL, dtype=np.int64)
    if selection.text:
        assigned = assign_labels(boxes, *gt).numpy() if gt is not None else np.zeros(count, dtype=np.int64)
        if selection.sample_rois is None:
            labels = assigned
        else:
            rng = np.random.default_rng([selection.seed, position, SAMPLE_PURPOSE])
            chosen = sample_rois(assigned, selection.sample_rois, selection.foreground_fraction, rng)
            labels[chosen] = assigned[chosen]
    image_mask = np.zeros(count, dtype=bool)
    if selection.image:
        image_mask[np.flatnonzero(~is_gt)[:selection.image_rois]] = True
    keep = np.flatnonzero((labels != NO_LABEL) | image_mask)
    return RowChoice(keep, labels[keep], image_mask[keep])


class _ShardFiles:
    """HDF5 handles of this process (a forked worker must not use its parent's)."""

    def __init__(self):
        self._handles: dict[str, h5py.File] = {}

    def get(self, folder: CacheFolder, shard: int) -> h5py.File:
        path = str(folder.shard_path(shard))
        if path not in self._handles:
            try:
                self._handles[path] = h5py.File(path, "r")
            except OSError as err:
                raise DataError(f"{path}: cannot open the cache shard ({describe_error(err)})") from err
        return self._handles[path]

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


class WindowReader(IterableDataset):
    """Yields, per window of steps [first_step, stop_step), this rank's images in stream order with their rows.

    Worker w of n takes windows w, w+n, ...; DataLoader returns items round-robin, so in window order.
    An item is (positions (k,), row counts (k,), dict of row arrays concatenated over the k images).
    """

    def __init__(self, order: StepOrder, selection: RowSelection,
                 ground_truth: dict[int, tuple[np.ndarray, np.ndarray]], first_step: int, stop_step: int):
        self.order, self.selection, self.ground_truth = order, selection, ground_truth
        self.first_step, self.stop_step = first_step, stop_step
        self.fields = ["boxes", "is_gt", "features"]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
        worker = get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        files = _ShardFiles()
        first, stop = self.first_step * self.order.global_batch, self.stop_step * self.order.global_batch
        try:
            for number, (window, begin) in enumerate(self.order.windows_between(self.first_step, self.stop_step)):
                if number % workers != worker_id:
                    continue
                positions = begin + np.arange(len(window.images))
                wanted = (positions >= first) & (positions < stop) & self.order.is_mine(positions)
                yield self._read_window(files, window, positions[wanted], window.images[wanted])
        finally:
            files.close()

    def _read_window(self, files: _ShardFiles, window: Window, positions: np.ndarray, images: np.ndarray):
        """This rank's images of the window with their chosen rows, in stream order. Only their rows are read,
        the images that follow each other in a shard in one slice per dataset, into one array per field
        (shared memory in a worker, so handing it to the main process makes no copy of them)."""
        index, selection = self.order.index, self.selection
        if not len(images):
            return positions, np.zeros(0, dtype=np.int64), {}
        runs = {}                     # image -> (arrays of its run, its first row in them, its row count)
        for run in _consecutive_images(index, images):
            shard, first, last = int(index.shard[run[0]]), int(index.position[run[0]]), int(index.position[run[-1]])
            row_start = index.row_starts[shard]
            rows = slice(int(row_start[first]), int(row_start[last + 1]))
            h5 = files.get(index.proposals, shard)
            arrays = {name: h5[name][rows] for name in self.fields}
            if selection.image:
                arrays["emb"] = files.get(index.embeddings, shard)["emb"][rows]
            for image in run:
                at = int(index.position[image])
                runs[int(image)] = (arrays, int(row_start[at] - row_start[first]),
                                    int(row_start[at + 1] - row_start[at]))
        choices = []
        for image, position in zip(images, positions):
            arrays, start, count = runs[int(image)]
            gt = self.ground_truth.get(int(index.image_ids[image]))
            choices.append(choose_rows(arrays["boxes"][start:start + count], arrays["is_gt"][start:start + count],
                                       gt, selection, int(position)))
        counts = np.array([len(choice.keep) for choice in choices], dtype=np.int64)
        fields = {"features": index.proposals.fields["features"]}
        if selection.image:
            fields["emb"] = index.embeddings.fields["emb"]
        joined = {name: _empty_rows(int(counts.sum()), field, shared=get_worker_info() is not None)
                  for name, field in fields.items()}
        at = 0
        for image, choice in zip(images, choices):
            arrays, start, _ = runs[int(image)]
            for name, out in joined.items():
                out.numpy()[at:at + len(choice.keep)] = arrays[name][start + choice.keep]
            at += len(choice.keep)
        joined["labels"] = torch.from_numpy(np.concatenate([choice.labels for choice in choices]))
        joined["image_mask"] = torch.from_numpy(np.concatenate([choice.image_mask for choice in choices]))
        return positions, counts, joined


def _consecutive_images(index: CacheIndex, images: np.ndarray) -> list[np.ndarray]:
    """`images` sorted and cut into runs of images that follow each other in one shard."""
    images = np.sort(images)
    cuts = np.flatnonzero((np.diff(images) != 1) | (np.diff(index.shard[images]) != 0)) + 1
    return np.split(images, cuts) if len(images) else []


def _empty_rows(count: int, field: RowField, shared: bool) -> torch.Tensor:
    """Room for `count` rows of a field; in shared memory when a DataLoader worker will hand it over."""
    rows = torch.from_numpy(np.empty((count, *field.shape), dtype=field.dtype))
    return rows.share_memory_() if shared else rows


@dataclass
class StepBatch:
    """This rank's part of one global step: the selected rows of its images, concatenated."""

    step: int
    images: int
    features: torch.Tensor        # (u, C, 7, 7) float16
    labels: torch.Tensor          # (u,) int64, NO_LABEL for rows outside the ViLD-text sample
    image_mask: torch.Tensor      # (u,) bool, rows with a ViLD-image target
    emb: torch.Tensor | None      # (u, D) float16 CLIP targets (rows outside image_mask unused)


SHARED_MEMORY = "/dev/shm"


def window_bytes(order: StepOrder, selection: RowSelection) -> int:
    """About what one window's rows take as it travels from a worker: this rank's share of the window's images
    times the cache's mean rows per image (ViLD's 300 image RoIs and 512 sampled RoIs select nearly all)."""
    index = order.index
    fields = {name: index.proposals.fields[name] for name in ("boxes", "is_gt", "features")}
    if selection.image and index.embeddings is not None:
        fields["emb"] = index.embeddings.fields["emb"]
    images = order.block_images * order.buffer_blocks / order.world_size
    return int(images * index.num_rows / max(1, len(index)) * bytes_per_row(fields))


def shared_memory_share(folder: str = SHARED_MEMORY) -> tuple[int, int] | None:
    """(free bytes of the shared memory loader workers pass data through, how many processes of this node share
    it: torchrun's LOCAL_WORLD_SIZE); None where there is no such folder (not Linux)."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    return free, max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def workers_that_fit(workers: int, bytes_per_worker: int, folder: str = SHARED_MEMORY) -> int:
    """As many of `workers` as the shared memory their windows travel through can hold, with a warning when
    that is fewer: torch loses a window that does not fit in a worker's queue thread, and the step then waits
    for it forever (measured with a container's default 64 MiB /dev/shm). The torchrun processes of a node
    (LOCAL_WORLD_SIZE) share it, so each counts on its part. The data order does not depend on the number of
    workers, so neither do the weights."""
    if workers < 1:
        return workers
    share = shared_memory_share(folder)
    if share is None:
        return workers  # no such folder (not Linux): torch shares memory another way
    free, processes = share
    fit = min(workers, free // processes // max(1, bytes_per_worker))
    if fit < workers:
        log.warning("%s: %s free for %d process(es), but %d loader worker(s) each would pass about %s of cached rows"
                    " through it at once; using %d (0: reading in the main process). For speed: more shared memory"
                    " (docker run --shm-size) or fewer --block-images / --buffer-blocks", folder, format_bytes(free),
                    processes, workers, format_bytes(workers * bytes_per_worker), fit)
    return int(fit)


class StepLoader:
    """Iterates StepBatch for steps [first_step, stop_step) of this rank, read by `workers` processes."""

    def __init__(self, order: StepOrder, selection: RowSelection,
                 ground_truth: dict[int, tuple[np.ndarray, np.ndarray]], first_step: int, stop_step: int,
                 workers: int = 2, prefetch: int = 2):
        self.order, self.first_step, self.stop_step = order, first_step, stop_step
        self.reader = WindowReader(order, selection, ground_truth, first_step, stop_step)
        options: dict[str, Any] = {}
        workers = workers_that_fit(workers, window_bytes(order, selection) * (prefetch + 1))   # + the one it fills
        if workers > 0:
            options = {"prefetch_factor": prefetch, "persistent_workers": False}
        self.loader = DataLoader(self.reader, batch_size=None, **loader_workers(workers), **options)

    def __len__(self) -> int:
        return max(0, self.stop_step - self.first_step)

    def __iter__(self) -> Iterator[StepBatch]:
        pending: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []   # (counts, arrays) of the current step
        have, step = 0, self.first_step
        local = self.order.local_batch
        for positions, counts, arrays in self.loader:
            positions, counts = np.asarray(positions), np.asarray(counts)
            arrays = {name: np.asarray(value) for name, value in arrays.items()}
            row_edges = np.concatenate([[0], np.cumsum(counts)])
            taken = 0
            while taken < len(positions):
                need = local - have
                part = slice(taken, min(len(positions), taken + need))
                rows = slice(int(row_edges[part.start]), int(row_edges[part.stop]))
                pending.append({name: value[rows] for name, value in arrays.items()})
                have += part.stop - part.start
                taken = part.stop
                if have == local:
                    yield self._batch(step, pending)
                    pending, have, step = [], 0, step + 1
        if step != self.stop_step:
            raise VildError(f"the cache loader ended at step {step}, expected {self.stop_step}")

    def _batch(self, step: int, parts: list[dict[str, np.ndarray]]) -> StepBatch:
        joined = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        emb = torch.from_numpy(joined["emb"]) if "emb" in joined else None
        return StepBatch(step, self.order.local_batch, torch.from_numpy(joined["features"]),
                         torch.from_numpy(joined["labels"]), torch.from_numpy(joined["image_mask"]), emb)
