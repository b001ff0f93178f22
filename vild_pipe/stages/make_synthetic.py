"""Stage `make-synthetic`: write the synthetic open-vocabulary world as COCO-format train and val sets.

Layout of OUT:
    train/000001.jpg ...   val/000001.jpg ...   images (JPEG quality 90)
    train.json, val.json   COCO files; `info.params` records what made them
    .parts/                work in progress: params.json and one annotation file per finished chunk of images

Resumable like the caches (DESIGN.md §5): images are rendered in chunks, each chunk writes its JPEGs and then
its annotation part (temp file + rename), so a killed run loses at most the chunks in flight and a rerun
skips the finished ones. A split's JSON is written last, the same way: a JSON that exists is complete.
Every image is seeded from (seed, split, index), so the bytes do not depend on `workers` or on resumption.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from joblib import Parallel, delayed
from tqdm import tqdm

from vild_pipe.data.synthetic import BASE_IDS, WORLD_VERSION, coco_categories, image_rng, render_image
from vild_pipe.errors import VildError
from vild_pipe.pipeline.shards import remove_stale_temps_in, temp_path, write_json_atomically

COMPACT = (",", ":")   # JSON separators of the world files

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
IMAGES_PER_CHUNK = 50
JPEG_QUALITY = 90
MIN_IMAGE_SIZE = 64
PARTS_DIR = ".parts"
OUTPUTS = ("train", "val", "train.json", "val.json", PARTS_DIR)


def run(out_dir: str | os.PathLike, seed: int = 0, train_images: int = 600, val_images: int = 150,
        image_size: int = 192, workers: int = 2, overwrite: bool = False) -> dict:
    """Generate the world into `out_dir` (or find it already there) and return a summary of what it holds."""
    started = time.perf_counter()
    out = Path(out_dir)
    counts = {"train": int(train_images), "val": int(val_images)}
    params = {"seed": int(seed), "train_images": counts["train"], "val_images": counts["val"],
              "image_size": int(image_size), "world_version": WORLD_VERSION}
    _check_arguments(out, params)
    if workers == 0:
        raise VildError(f"{out}: workers must be a positive count (or -1 for every core), not 0")

    if overwrite:
        _remove_outputs(out)
    else:
        _check_existing(out, params)

    finished = all((out / f"{split}.json").is_file() for split in SPLITS)
    if not finished:
        write_json_atomically(out / PARTS_DIR / "params.json", params, separators=COMPACT)
        for split in SPLITS:
            if not (out / f"{split}.json").is_file():
                _generate_split(out, split, params, workers)
                write_json_atomically(out / f"{split}.json", _merge_parts(out, split, params), separators=COMPACT)
        shutil.rmtree(out / PARTS_DIR)

    summary = _summarise(out, params, reused=finished, seconds=time.perf_counter() - started)
    _log_summary(summary)
    return summary


def _check_arguments(out: Path, params: dict) -> None:
    if params["train_images"] < 1 or params["val_images"] < 1:
        raise VildError(f"{out}: need at least one train and one val image "
                        f"(got {params['train_images']} and {params['val_images']})")
    if params["image_size"] < MIN_IMAGE_SIZE:
        raise VildError(f"{out}: image size must be at least {MIN_IMAGE_SIZE} pixels (got {params['image_size']})")
    if out.exists() and not out.is_dir():
        raise VildError(f"{out}: exists and is not a folder; pick another output folder")


def _stored_params(out: Path) -> list[tuple[Path, dict | None]]:
    """The parameters recorded by each of our files in `out` (None where a file records none)."""
    found = []
    for path in (out / "train.json", out / "val.json", out / PARTS_DIR / "params.json"):
        if not path.is_file():
            continue
        try:
            with open(path) as f:
                record = json.load(f)
        except (OSError, ValueError):
            found.append((path, None))
            continue
        if path.name != "params.json":
            info = record.get("info") if isinstance(record, dict) else None
            record = info.get("params") if isinstance(info, dict) else None
        found.append((path, record if isinstance(record, dict) else None))
    return found


def _check_existing(out: Path, params: dict) -> None:
    """Refuse to mix worlds: what is in `out` must have been made with the same parameters."""
    stored = _stored_params(out)
    for path, found in stored:
        if found != params:
            made_with = ", ".join(f"{k}={v}" for k, v in found.items()) if found else "unknown parameters"
            raise VildError(f"{path}: holds a synthetic world made with {made_with}; "
                            "pick another output folder or pass --overwrite")
    if not stored:
        present = [name for name in OUTPUTS if (out / name).exists()]
        if present:
            raise VildError(f"{out}: already holds {', '.join(present)} not made by make-synthetic; "
                            "pick another output folder or pass --overwrite")


def _remove_outputs(out: Path) -> None:
    """Remove only what this stage writes; anything else in the folder stays."""
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _generate_split(out: Path, split: str, params: dict, workers: int) -> None:
    total = params[f"{split}_images"]
    starts = [start for start in range(0, total, IMAGES_PER_CHUNK) if not _part_path(out, split, start).is_file()]
    if not starts:
        return
    (out / split).mkdir(parents=True, exist_ok=True)
    remove_stale_temps_in(out / split)
    jobs = (delayed(_make_chunk)(os.fspath(out), split, start, min(start + IMAGES_PER_CHUNK, total),
                                 params["seed"], params["image_size"]) for start in starts)
    results = Parallel(n_jobs=workers, return_as="generator_unordered")(jobs)
    for _ in tqdm(results, total=len(starts), desc=f"{split} images", unit="chunk", disable=None):
        pass


def _part_path(out: Path, split: str, start: int) -> Path:
    return out / PARTS_DIR / f"{split}-{start:06d}.json"


def _make_chunk(out_dir: str, split: str, start: int, stop: int, seed: int, image_size: int) -> None:
    """Render images start..stop-1 of a split, write their JPEGs, then their annotations as one part file."""
    out = Path(out_dir)
    images, annotations = [], []
    for index in range(start, stop):
        image_id = index + 1
        file_name = f"{split}/{image_id:06d}.jpg"
        image, objects = render_image(image_rng(seed, split, index), image_size)
        path = out / file_name
        temp = temp_path(path)
        image.save(temp, format="JPEG", quality=JPEG_QUALITY)
        os.replace(temp, path)
        images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
        annotations += [{"image_id": image_id, "category_id": obj.category_id, "bbox": list(obj.bbox),
                         "area": float(obj.area), "iscrowd": 0} for obj in objects]
    write_json_atomically(_part_path(out, split, start), {"images": images, "annotations": annotations},
                          separators=COMPACT)


def _merge_parts(out: Path, split: str, params: dict) -> dict:
    images, annotations = [], []
    for start in range(0, params[f"{split}_images"], IMAGES_PER_CHUNK):
        with open(_part_path(out, split, start)) as f:
            part = json.load(f)
        images += part["images"]
        annotations += part["annotations"]
    for ann_id, annotation in enumerate(annotations, start=1):
        annotation["id"] = ann_id
    info = {"description": "vild-pipe synthetic open-vocabulary world (shapes; base and novel categories)",
            "split": split, "params": params}
    return {"info": info, "images": images, "annotations": annotations, "categories": coco_categories()}


def _summarise(out: Path, params: dict, reused: bool, seconds: float) -> dict:
    images, instances = {}, {}
    for split in SPLITS:
        with open(out / f"{split}.json") as f:
            record = json.load(f)
        base = sum(1 for a in record["annotations"] if a["category_id"] in BASE_IDS)
        images[split] = len(record["images"])
        instances[split] = {"base": base, "novel": len(record["annotations"]) - base}
    return {"out_dir": os.fspath(out), "seed": params["seed"], "image_size": params["image_size"],
            "images": images, "instances": instances, "reused": reused, "seconds": round(seconds, 2)}


def _log_summary(summary: dict) -> None:
    parts = [f"{split} {summary['images'][split]} images, {summary['instances'][split]['base']} base + "
             f"{summary['instances'][split]['novel']} novel boxes" for split in SPLITS]
    verb = "found" if summary["reused"] else "wrote"
    logger.info("%s synthetic world in %s: %s (%.1f s)", verb, summary["out_dir"], "; ".join(parts),
                summary["seconds"])
