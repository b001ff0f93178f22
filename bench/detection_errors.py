"""What a mode's detections get wrong, and what the proposals never offered, on a demo run's val split.

    python bench/detection_errors.py vild-demo [--mode ViLD] [--top 20] [--by-hidden]

For novel and for base categories apart, the 2×(ground-truth count) highest-scored detections of
OUT/evaluation/results-<mode>.json are sorted into: correct (IoU ≥ 0.5 with an unmatched object of the
class), duplicate, mislocalised (IoU 0.1–0.5 with an object of the class), another object (IoU ≥ 0.5 with an
object of another class), part of other objects (IoU 0.1–0.5 with one), background. Then the recall@0.5 of the
top `--top` cached val proposals per category. With `--by-hidden`, the val objects grouped by how much of
them other objects hide (re-rendered from the world's seed: the code's world version must be the world's):
how often the mode's best detection at IoU ≥ 0.5 has the right class, and how often there is one at all.
bench/RESULTS.md's error breakdowns came from this.
"""
import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torchvision.ops import box_iou

from vild_pipe.data.synthetic import WORLD_VERSION, image_rng, render_image
from vild_pipe.pipeline.shards import CacheFolder

HIDDEN_BINS = ((0.0, 0.05), (0.05, 0.2), (0.2, 0.3), (0.3, 1.0))


def xyxy(bbox) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def error_kinds(results: list[dict], objects: dict[int, list[dict]], wanted: set[int]) -> tuple[Counter, int]:
    """Counts of each kind among the 2×GT top-scored detections of the `wanted` categories, and the GT count."""
    detections = sorted((d for d in results if d["category_id"] in wanted), key=lambda d: -d["score"])
    count = sum(1 for anns in objects.values() for a in anns if a["category_id"] in wanted)
    matched, kinds = set(), Counter()
    for detection in detections[:2 * count]:
        anns = objects[detection["image_id"]]
        if not anns:
            kinds["background"] += 1
            continue
        ious = box_iou(torch.tensor([xyxy(detection["bbox"])]), torch.tensor([xyxy(a["bbox"]) for a in anns]))[0]
        same = [i for i, a in enumerate(anns) if a["category_id"] == detection["category_id"]]
        best_same = max(same, key=lambda i: ious[i]) if same else None
        best_any = int(ious.argmax())
        if best_same is not None and ious[best_same] >= 0.5:
            kinds["duplicate" if anns[best_same]["id"] in matched else "correct"] += 1
            matched.add(anns[best_same]["id"])
        elif best_same is not None and ious[best_same] >= 0.1:
            kinds["mislocalised"] += 1
        elif ious[best_any] >= 0.5:
            kinds["another object"] += 1
        elif ious[best_any] >= 0.1:
            kinds["part of other objects"] += 1
        else:
            kinds["background"] += 1
    return kinds, count


def proposal_recall(cache: Path, objects: dict[int, list[dict]], top: int) -> dict[int, tuple[int, int]]:
    """category id -> (objects hit at IoU ≥ 0.5 by one of the top `top` proposals, objects)."""
    hits = defaultdict(lambda: [0, 0])
    folder = CacheFolder.open(cache)
    for index in folder.complete_shards():
        with folder.read_shard(index) as shard:
            images = [(int(image_id), shard.image_rows(k, ["boxes", "is_gt"]))
                      for k, image_id in enumerate(shard.image_ids)]
        for image_id, rows in images:
            anns = objects[image_id]
            if not anns:
                continue
            boxes = rows["boxes"][~rows["is_gt"]][:top]
            found = (box_iou(torch.tensor(boxes), torch.tensor([xyxy(a["bbox"]) for a in anns])) >= 0.5).any(0)
            for ann, hit in zip(anns, found.tolist() if len(boxes) else [False] * len(anns)):
                hits[ann["category_id"]][0] += int(hit)
                hits[ann["category_id"]][1] += 1
    return hits


def hidden_fractions(world: dict) -> list[float]:
    """The hidden share of every val annotation, in file order, from re-rendering the world's val images."""
    params = world["info"]["params"]
    if params["world_version"] != WORLD_VERSION:
        raise SystemExit(f"the world is version {params['world_version']}, this code draws {WORLD_VERSION}")
    hidden = [o.hidden for index in range(params["val_images"])
              for o in render_image(image_rng(params["seed"], "val", index), params["image_size"])[1]]
    if len(hidden) != len(world["annotations"]):
        raise SystemExit("re-rendered objects do not match the annotations")
    return hidden


def by_hidden(results: list[dict], world: dict, wanted: set[int]) -> list[tuple[tuple, int, float, float]]:
    """Per hidden-share bin: (bin, objects, share whose best detection at IoU ≥ 0.5 is right, share found)."""
    detections = defaultdict(list)
    for d in results:
        detections[d["image_id"]].append(d)
    counts = {b: [0, 0, 0] for b in HIDDEN_BINS}
    for ann, hidden in zip(world["annotations"], hidden_fractions(world)):
        if ann["category_id"] not in wanted:
            continue
        found = detections[ann["image_id"]]
        boxes = torch.tensor([xyxy(d["bbox"]) for d in found]).reshape(-1, 4)
        ious = box_iou(torch.tensor([xyxy(ann["bbox"])]), boxes)[0]
        hits = [(d["score"], d["category_id"]) for d, iou in zip(found, ious.tolist()) if iou >= 0.5]
        row = counts[next(b for b in HIDDEN_BINS if b[0] <= hidden < b[1])]
        row[0] += 1
        row[1] += bool(hits) and max(hits)[1] == ann["category_id"]
        row[2] += bool(hits)
    return [(b, n, right / n, seen / n) for b, (n, right, seen) in counts.items() if n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", type=Path, help="a finished `vild-pipe demo` output folder")
    parser.add_argument("--mode", default="ViLD", help="which results-<mode>.json to read")
    parser.add_argument("--top", type=int, default=20, help="proposals per image for the recall table")
    parser.add_argument("--by-hidden", action="store_true", help="also group the val objects by hidden share")
    args = parser.parse_args()
    truth = json.loads((args.demo / "world/val.json").read_text())
    results = json.loads((args.demo / "evaluation" / f"results-{args.mode}.json").read_text())
    objects = defaultdict(list)
    for ann in truth["annotations"]:
        objects[ann["image_id"]].append(ann)
    names = {c["id"]: c["name"] for c in truth["categories"]}
    for split in ("novel", "base"):
        wanted = {c["id"] for c in truth["categories"] if c["split"] == split}
        kinds, count = error_kinds(results, objects, wanted)
        print(f"{args.mode}, {split} ({count} objects), top {2 * count} detections: "
              + ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()))
        if args.by_hidden:
            for (low, high), n, right, seen in by_hidden(results, truth, wanted):
                print(f"  {split} objects {low:.0%}-{high:.0%} hidden: {n}, best detection right {right:.2f},"
                      f" found {seen:.2f}")
    hits = proposal_recall(args.demo / "proposals/val", objects, args.top)
    print(f"recall@0.5 of the top {args.top} proposals: "
          + ", ".join(f"{names[c]} {h / n:.2f}" for c, (h, n) in sorted(hits.items())))


if __name__ == "__main__":
    main()
