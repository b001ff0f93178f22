"""Parity check: `evaluate --protocol lvis` (COCOeval on federated inputs) against the official lvis-api.

    pip install lvis   # not a dependency of vild-pipe; its package also imports opencv and matplotlib
    python bench/lvis_parity.py [--images 400] [--categories 120] [--seeds 0 1 2]

For each seed it writes a synthetic LVIS-shaped ground truth (categories with r/c/f frequencies, images with
`neg_category_ids` and `not_exhaustive_category_ids`) and detections that exercise every federated rule:
jittered true boxes with right and wrong labels, false positives on checked-absent, unchecked and
not-exhaustive categories, and more than 300 detections on some images. Then it prints AP, AP50, AP75, AP_r,
AP_c, AP_f from `evaluation.evaluate_coco` and from lvis-api's `LVISEval(iou_type="bbox")`, the largest
difference, and the AP that plain COCOeval (`--protocol coco`) gives on the same files.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import tempfile
from pathlib import Path

import numpy as np

from vild_pipe.pipeline.evaluation import evaluate_coco

METRICS = {"AP": "AP", "AP50": "AP50", "AP75": "AP75", "AP_r": "APr", "AP_c": "APc", "AP_f": "APf"}


def lvis_shaped(images: int, categories: int, rng: np.random.Generator) -> tuple[dict, list[dict]]:
    """Ground truth in LVIS v1's shape and detections for it."""
    frequency = rng.choice(["r", "c", "f"], categories, p=[0.3, 0.4, 0.3])
    cats = [{"id": k + 1, "name": f"thing {k}", "frequency": str(f)} for k, f in enumerate(frequency)]
    records, annotations, results = [], [], []
    for image_id in range(1, images + 1):
        present = rng.choice(categories, rng.integers(1, min(6, categories + 1)), replace=False) + 1
        absent = np.setdiff1d(np.arange(1, categories + 1), present)
        negative = rng.choice(absent, rng.integers(0, min(8, len(absent) + 1)), replace=False)
        not_exhaustive = present[rng.random(len(present)) < 0.2]
        records.append({"id": image_id, "width": 640, "height": 480, "neg_category_ids": negative.tolist(),
                        "not_exhaustive_category_ids": not_exhaustive.tolist()})
        for category in present.tolist():
            for _ in range(rng.integers(1, 4)):
                wh = rng.uniform(10, 200, 2)
                xy = rng.uniform(0, 1, 2) * ([640, 480] - wh)
                box = [*xy.round(2).tolist(), *wh.round(2).tolist()]
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                    "bbox": box, "area": box[2] * box[3], "segmentation": []})
                for _ in range(2):   # jittered, right label mostly
                    label = category if rng.random() < 0.8 else int(rng.integers(1, categories + 1))
                    jittered = np.maximum(np.array(box) + rng.normal(0, 6, 4) * [1, 1, 0.5, 0.5], 1).round(2)
                    results.append({"image_id": image_id, "category_id": label, "bbox": jittered.tolist(),
                                    "score": round(float(rng.random()), 4)})
        labels = np.concatenate([negative, present, rng.integers(1, categories + 1, 6)])   # checked and not
        for label in rng.choice(labels, rng.integers(5, 25)).tolist():
            xy = rng.uniform(0, 500, 2).round(2)
            results.append({"image_id": image_id, "category_id": int(label), "bbox": [*xy.tolist(), 40.0, 30.0],
                            "score": round(float(rng.random()) * 0.7, 4)})
        if image_id % 10 == 0:   # over LVIS' 300 a image
            for label in rng.choice(labels, 320).tolist():
                xy = rng.uniform(0, 500, 2).round(2)
                results.append({"image_id": image_id, "category_id": int(label), "bbox": [*xy.tolist(), 20.0, 20.0],
                                "score": round(float(rng.random()), 4)})
    return {"images": records, "annotations": annotations, "categories": cats}, results


def official(annotation_file: Path, results: list[dict]) -> dict[str, float]:
    if not hasattr(np, "float"):
        np.float = float   # lvis 0.5.3, the newest on PyPI, still names the alias numpy 1.24 removed
    from lvis import LVIS, LVISEval
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = LVISEval(LVIS(str(annotation_file)), [dict(r) for r in results], iou_type="bbox")
        evaluator.run()
    return {name: float(evaluator.results[key]) for name, key in METRICS.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--categories", type=int, default=120)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    print("| seed | detections | " + " | ".join(f"{m} ours / lvis-api" for m in METRICS)
          + " | largest difference | AP by plain COCOeval |")
    print("| --- " * (len(METRICS) + 4) + "|")
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            dataset, results = lvis_shaped(args.images, args.categories, np.random.default_rng(seed))
            annotation_file = Path(tmp) / f"lvis-{seed}.json"
            annotation_file.write_text(json.dumps(dataset))
            ours = evaluate_coco(annotation_file, results)
            theirs = official(annotation_file, results)
            assert ours["protocol"] == "lvis"
            largest = max(abs(ours[name] - theirs[name]) for name in METRICS)
            cells = " | ".join(f"{ours[name]:.6f} / {theirs[name]:.6f}" for name in METRICS)
            plain = evaluate_coco(annotation_file, results, protocol="coco")["AP"]
            print(f"| {seed} | {len(results)} | {cells} | {largest:.2e} | {plain:.6f} |", flush=True)


if __name__ == "__main__":
    main()
