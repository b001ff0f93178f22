"""Benchmark: what train-head's cache loader reads on each torchrun rank, and what its workers hold (Linux).

    python bench/train_head_ranks.py [--cache FOLDER] [--world-sizes 1 2 4] [--workers 2] [options]

FOLDER holds (or, when empty, gets) a synthetic cache pair of ViLD's row size written by bench/train_head.py's
`synthetic_caches`: by default 512 images of 300 proposals + 5 GT rows, 256x7x7 fp16 features, D = 512 (about
4 GiB). For each world size W and rank r, rank r's StepLoader runs in this process over one epoch; reported:
the bytes it read (/proc/self/io rchar), its time, and a checksum of its batches, whose sum over the ranks
must be the same for every W (the ranks together train on the batches of one process). Then one process with
--workers loader workers over the same epoch: peak PSS of the process tree and peak /dev/shm use, sampled
every 0.1 s.
"""
from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from pathlib import Path

import torch

from train_head import synthetic_caches
from vild_pipe.pipeline.cache_loader import CacheIndex, RowSelection, StepLoader, StepOrder
from vild_pipe.pipeline.embedding_cache import open_cache_pair
from vild_pipe.stages import train_head


def bytes_read() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar")).split()[1])


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(child) for child in f.read().split()]
            except OSError:
                pass
    return tree


def tree_pss() -> int:
    total = 0
    for pid in process_tree(os.getpid()):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += 1024 * next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total


def shared_memory_used() -> int:
    stats = os.statvfs("/dev/shm")
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


class PeakSampler(threading.Thread):
    """Peak process-tree PSS and /dev/shm use while the loader runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_pss = self.peak_shm = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.1):
            self.peak_pss = max(self.peak_pss, tree_pss())
            self.peak_shm = max(self.peak_shm, shared_memory_used())


def run_epoch(order: StepOrder, selection: RowSelection, ground_truth, steps: int, workers: int):
    checksum, rows, started = 0.0, 0, time.perf_counter()
    for batch in StepLoader(order, selection, ground_truth, 0, steps, workers=workers):
        rows += len(batch.labels)
        checksum += float(batch.features[:, :, 0, 0].double().sum()) + float(batch.labels.sum())
    return checksum, rows, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="/tmp/vild-bench-ranks", help="folder of the synthetic cache pair")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--proposals", type=int, default=300)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (images)")
    parser.add_argument("--block-images", type=int, default=16)
    parser.add_argument("--buffer-blocks", type=int, default=8)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    cache = Path(args.cache)
    if not (cache / "train.json").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        synthetic_caches(cache, args.images, args.proposals, 5, args.channels, args.dim)
        print(f"synthetic caches written to {cache} in {time.perf_counter() - started:.0f} s")
    proposals, embeddings = open_cache_pair(cache / "proposals", cache / "embeddings")
    index = CacheIndex.build(proposals, embeddings)
    train_set = train_head._training_annotations(cache / "train.json", proposals, None)
    ground_truth = train_head._ground_truth(train_set, index.image_ids)
    selection = RowSelection(text=True, image=True, image_rois=300, sample_rois=512)
    steps = len(index) // args.batch_size
    size = sum(path.stat().st_size for folder in ("proposals", "embeddings") for path in (cache / folder).glob("*.h5"))
    print(f"{len(index)} images, {index.num_rows} rows, {size / 2**30:.2f} GiB of shards; one epoch = {steps} steps"
          f" of {args.batch_size} images, windows of {args.block_images} x {args.buffer_blocks} images")
    print("| W | rank | read | time | checksum |\n| --- | --- | --- | --- | --- |")
    for world_size in args.world_sizes:
        total = 0.0
        for rank in range(world_size):
            order = StepOrder(index, args.batch_size, 0, args.block_images, args.buffer_blocks, rank, world_size)
            before = bytes_read()
            checksum, _, seconds = run_epoch(order, selection, ground_truth, steps, workers=0)
            total += checksum
            print(f"| {world_size} | {rank} | {(bytes_read() - before) / 2**30:.2f} GiB | {seconds:.1f} s |"
                  f" {checksum:.10g} |", flush=True)
        print(f"| {world_size} | sum | | | {total:.10g} |", flush=True)
    sampler = PeakSampler()
    sampler.start()
    order = StepOrder(index, args.batch_size, 0, args.block_images, args.buffer_blocks)
    _, rows, seconds = run_epoch(order, selection, ground_truth, steps, workers=args.workers)
    sampler.stopped.set()
    sampler.join()
    print(f"one process, {args.workers} loader workers: {steps} steps in {seconds:.1f} s ({rows / seconds:.0f} rows/s);"
          f" peak process tree PSS {sampler.peak_pss / 2**30:.2f} GiB, /dev/shm {sampler.peak_shm / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
