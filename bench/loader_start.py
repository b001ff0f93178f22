"""Benchmark: what starting a stage's DataLoader workers costs under each multiprocessing start method.

    python bench/loader_start.py                       # fork, forkserver, spawn, and the stages' own choice
    python bench/loader_start.py --workers 2 --rounds 3

Python 3.14 made forkserver the default start method on Linux. A forkserver or spawned worker imports torch
and vild_pipe and unpickles its dataset before its first item; a forked one starts from the parent's memory.
Each round builds a two-worker loader over eight tiny items, as a stage does once, and times it to the last
item; `distributed.loader_workers` is what the stages pass (forked on Linux whatever the default).
"""
from __future__ import annotations

import argparse
import multiprocessing
import time

import torch
from torch.utils.data import DataLoader, Dataset

from vild_pipe.pipeline.distributed import loader_workers


class Zeros(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.zeros(3)


def seconds_to_last_item(workers: int, context) -> float:
    started = time.perf_counter()
    for _ in DataLoader(Zeros(), batch_size=2, num_workers=workers, multiprocessing_context=context):
        pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"default start method here: {multiprocessing.get_start_method()}; {args.workers} workers")
    print("| start method | seconds per loader, each round |")
    print("| --- | --- |")
    chosen = loader_workers(args.workers)["multiprocessing_context"]
    for label, context in (("fork", "fork"), ("forkserver", "forkserver"), ("spawn", "spawn"),
                           (f"stages' choice ({chosen or 'default'})", chosen)):
        times = [seconds_to_last_item(args.workers, context) for _ in range(args.rounds)]
        print(f"| {label} | {', '.join(f'{t:.2f}' for t in times)} |")


if __name__ == "__main__":
    main()
