"""Benchmark: `evaluate_coco` with its COCOeval runs in 1, 2, 4, ... worker processes (wall time, same numbers).

    python bench/evaluate_workers.py --kind coco --images 5000 --workers 1 2 4 8   # COCO val size
    python bench/evaluate_workers.py --kind lvis --images 5000 --workers 1 2 4 8   # LVIS-shaped, federated

The synthetic annotation file and the 300 detections an image are evaluate_scale.py's (the shapes of COCO val
and LVIS val). Each setting evaluates the same detections; every metric must equal the one-process run's.
Also prints the cost of one (image, category) pair in one process, which sets `evaluation.PAIRS_PER_WORKER`.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from evaluate_scale import annotation_file, detections_near_boxes
from vild_pipe.data.coco import CocoDataset
from vild_pipe.pipeline.evaluation import Detections, evaluate_coco, load_ground_truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("coco", "lvis"), default="coco")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=300, help="detections per image")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "val.json"
        rng = np.random.default_rng(0)
        annotation_file(path, args.kind, args.images, rng)
        dataset = CocoDataset.load(path)
        split = dataset.resolve_split("coco48-17" if args.kind == "coco" else "lvis")
        category_ids = sorted(split.base_ids + split.novel_ids)
        results = Detections.of_images(detections_near_boxes(dataset, args.detections, len(category_ids), rng),
                                       category_ids)
        ground_truth = load_ground_truth(path)
    pairs = args.images * len(category_ids)
    print(f"{args.kind}: {args.images} images, {len(category_ids)} evaluated categories ({pairs:,} pairs), "
          f"{len(results):,} detections")
    print("| workers | evaluate_coco | speed-up | AP50 | same metrics |")
    print("| --- | --- | --- | --- | --- |")
    reference, one = None, None
    for workers in args.workers:
        started = time.perf_counter()
        metrics = evaluate_coco(ground_truth, results, split.base_ids, split.novel_ids, workers=workers)
        seconds = time.perf_counter() - started
        reference = reference or metrics
        one = one or seconds
        print(f"| {workers} | {seconds:.1f} s | {one / seconds:.2f}x | {metrics['AP50']:.6f} |"
              f" {'yes' if metrics == reference else 'NO'} |", flush=True)
        if workers == 1:
            print(f"(one process: {1e6 * seconds / pairs:.1f} us an (image, category) pair)", flush=True)


if __name__ == "__main__":
    main()
