"""Benchmark: evaluate's steps after scoring, for one mode, at COCO and LVIS size (time and peak memory, Linux).

    python bench/evaluate_scale.py --kind coco --images 5000              # COCO val: 65 categories in one run
    python bench/evaluate_scale.py --kind lvis --images 19809 --no-eval   # LVIS val: results file only
    python bench/evaluate_scale.py --kind lvis --images 3000              # 1203 categories, 100 a run

Writes a synthetic annotation file of the real shape (COCO's 80 categories with the 48/17 names, or LVIS'
1203 with 337 r / 461 c / 405 f and per-image federated lists, so evaluated LVIS' way; 7.3 or 12.4 boxes an
image, as COCO val and LVIS val have), makes 300
detections an image near its boxes, then times, for one mode, what `vild-pipe evaluate` does with them:
  arrays   (the stage's way) `Detections` -> the results file in pieces -> `evaluate_coco` (records per run)
  records  (the stage's way until session 6) one list of COCO records -> one JSON string -> `evaluate_coco`
Peak RSS is sampled every 0.05 s and reported above the start (annotations and detections loaded); one path
a run (`--path`).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from vild_pipe.data.coco import CocoDataset
from vild_pipe.data.splits import COCO_OV_BASE_NAMES, COCO_OV_NOVEL_NAMES
from vild_pipe.pipeline.evaluation import Detections, evaluate_coco, load_ground_truth, xyxy_to_xywh
from vild_pipe.pipeline.shards import write_bytes_atomically, write_json_atomically


def resident_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2**20


class PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0.0

    def run(self) -> None:
        while True:
            self.peak = max(self.peak, resident_gib())
            time.sleep(0.05)


def categories(kind: str) -> list[dict]:
    if kind == "coco":
        names = list(COCO_OV_BASE_NAMES + COCO_OV_NOVEL_NAMES) + [f"other {k}" for k in range(15)]
        return [{"id": k + 1, "name": name} for k, name in enumerate(names)]
    frequencies = np.random.default_rng(1).permutation(["r"] * 337 + ["c"] * 461 + ["f"] * 405)
    return [{"id": k + 1, "name": f"thing {k}", "frequency": str(f)} for k, f in enumerate(frequencies)]


def annotation_file(path: Path, kind: str, images: int, rng: np.random.Generator) -> None:
    cats = categories(kind)
    weights = 1.0 / np.arange(1, len(cats) + 1)       # skewed, as real datasets are
    per_image = rng.poisson(7.3 if kind == "coco" else 12.4, images) + 1
    records, annotations = [], []
    for image_id, count in enumerate(per_image.tolist(), start=1):
        record = {"id": image_id, "file_name": f"{image_id:012d}.jpg", "width": 640, "height": 480}
        wh = rng.uniform([12, 9], [380, 280], (count, 2))
        xy = rng.uniform(0, 1, (count, 2)) * ([640, 480] - wh)
        labels = rng.choice(len(cats), count, p=weights / weights.sum()) + 1
        for box, category in zip(np.round(np.concatenate([xy, wh], 1), 2).tolist(), labels.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": box, "area": box[2] * box[3], "iscrowd": 0})
        if kind == "lvis":   # federated: categories checked absent, and present ones not all drawn
            record["neg_category_ids"] = np.setdiff1d(rng.integers(1, len(cats) + 1, 16), labels)[:8].tolist()
            record["not_exhaustive_category_ids"] = labels[rng.random(count) < 0.1].tolist()
        records.append(record)
    path.write_text(json.dumps({"images": records, "annotations": annotations, "categories": cats}))


def detections_near_boxes(dataset: CocoDataset, count: int, classes: int, rng: np.random.Generator) -> list:
    """Per image (image_id, xyxy boxes, scores, class indices), as the stage's scoring hands them over."""
    found = []
    for record in dataset.images:
        boxes, _, _ = dataset.annotations_for(record.id)
        boxes = boxes[rng.integers(0, len(boxes), count)] + rng.normal(0, 8, (count, 4)).astype(np.float32)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        scores = np.sort(rng.random(count).astype(np.float32))[::-1].copy()
        found.append((record.id, boxes, scores, rng.integers(0, classes, count)))
    return found


def records_of(per_image: list, category_ids: list[int]) -> list[dict]:
    """The whole list of COCO records at once, as the stage built it until session 6."""
    ids = np.asarray(category_ids, dtype=np.int64)
    return [{"image_id": int(image_id), "category_id": category, "bbox": box, "score": score}
            for image_id, boxes, scores, classes in per_image
            for category, box, score in zip(ids[classes].tolist(), np.round(xyxy_to_xywh(boxes), 2).tolist(),
                                            scores.astype(np.float64).tolist())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("coco", "lvis"), default="coco")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--detections", type=int, default=300, help="detections per image")
    parser.add_argument("--path", choices=("arrays", "records"), default="arrays",
                        help="one a run: memory one path frees is not all given back before the next")
    parser.add_argument("--no-eval", action="store_true", help="stop after writing the results file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sampler = PeakSampler()
    sampler.start()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        annotation_file(tmp / "val.json", args.kind, args.images, rng)
        dataset = CocoDataset.load(tmp / "val.json")
        split = dataset.resolve_split("coco48-17" if args.kind == "coco" else "lvis")
        category_ids = sorted(split.base_ids + split.novel_ids)
        ground_truth = load_ground_truth(tmp / "val.json")
        per_image = detections_near_boxes(dataset, args.detections, len(category_ids), rng)
        image_ids = [record.id for record in dataset.images]
        print(f"{args.kind}: {args.images} images, {dataset.num_boxes} boxes, {len(category_ids)} evaluated"
              f" categories, {len(per_image) * args.detections} detections")
        print("| path | results file | written in | peak above start | with COCOeval | peak above start | AP50 |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        start, started = resident_gib(), time.perf_counter()
        sampler.peak = 0.0
        if args.path == "arrays":
            results = Detections.of_images(per_image, category_ids)
            write_bytes_atomically(tmp / "results.json", results.json_chunks())
        else:
            results = records_of(per_image, category_ids)
            write_json_atomically(tmp / "results.json", results)
        written, written_peak = time.perf_counter() - started, sampler.peak - start
        row = (f"| {args.path} | {(tmp / 'results.json').stat().st_size / 2**20:.0f} MiB | {written:.1f} s |"
               f" {written_peak:+.2f} GiB |")
        if args.no_eval:
            row += " – | – | – |"
        else:
            metrics = evaluate_coco(ground_truth, results, split.base_ids, split.novel_ids, image_ids=image_ids)
            row += f" {time.perf_counter() - started:.1f} s | {sampler.peak - start:+.2f} GiB | {metrics['AP50']:.6f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
