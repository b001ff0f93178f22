"""Benchmark of `vild-pipe cache-embeddings`: fast path vs reference path vs the bare image tower.

Builds a folder of JPEG photographs (scikit-image's samples, or the images of --photos on a machine without
scikit-image, e.g. a lent GPU; resized to --side px on the longer side), a
proposal cache written directly with --boxes random boxes per image (no detector needed), and a CLIP model
of OpenAI's architecture with random weights; then measures, in one run, on the same boxes and model:

  bare tower   crops/s of `Teacher.encode_images` on ready-made normalised crops at --batch-size
  fast         crops/s of the whole stage, JPEG files on disk -> shards on disk (1x and 1.5x crops)
  reference    the same with --crop-method reference (CLIP's preprocess per PIL crop), on --reference-images

Usage (CPU):  python bench/cache_embeddings.py --model small --images 32 --boxes 100
       (GPU):  python bench/cache_embeddings.py --model ViT-B/32 --images 256 --boxes 300 --device cuda
Prints a Markdown row per measurement and writes them as JSON to --out/results.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vild_pipe.pipeline.shards import CacheFolder, ShardWriter, sha256_file
from vild_pipe.pipeline.teacher import SmallClipConfig, load_teacher, save_clip
from vild_pipe.stages import cache_embeddings
from vild_pipe.stages.dump_proposals import proposal_fields

warnings.simplefilter("ignore")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
MODELS = {
    "small": SmallClipConfig(),  # the demo teacher's architecture (ModifiedResNet, 32 px)
    "ViT-B/32": SmallClipConfig(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                                vision_patch_size=32, transformer_width=512, transformer_layers=12),
}


def sample_photos(folder: Path | None) -> list[Image.Image]:
    """The photographs to tile the benchmark with: every image file of `folder`, or scikit-image's samples."""
    if folder is not None:
        return [Image.open(p).convert("RGB") for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpg", ".png")]
    import skimage.data
    return [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]


def make_images(root: Path, count: int, side: int, photos: list[Image.Image]) -> list[dict]:
    records = []
    for image_id in range(1, count + 1):
        photo = photos[image_id % len(photos)]
        scale = side / max(photo.size)
        photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC)
        name = f"{image_id:06d}.jpg"
        photo.save(root / name, quality=90)
        records.append({"id": image_id, "file_name": name, "width": photo.width, "height": photo.height})
    return records


def make_proposal_cache(out: Path, annotations: Path, records: list[dict], boxes_per_image: int,
                        images_per_shard: int) -> None:
    rng = np.random.default_rng(0)
    num_shards = -(-len(records) // images_per_shard)
    folder = CacheFolder.open_or_create(
        out, stage="dump-proposals", config={"bench": boxes_per_image},
        inputs={"annotations": {"file": annotations.name, "sha256": sha256_file(annotations)}},
        fields=proposal_fields((1, 1, 1)), num_shards=num_shards, images_per_shard=images_per_shard,
    )
    for index in range(num_shards):
        with ShardWriter(folder, index) as shard:
            for record in records[index * images_per_shard:(index + 1) * images_per_shard]:
                size = np.array([record["width"], record["height"]])
                sides = np.exp(rng.uniform(np.log(8), np.log(size.min()), (boxes_per_image, 2)))
                corners = rng.uniform(0, 1, (boxes_per_image, 2)) * (size - sides)
                boxes = np.concatenate([corners, corners + sides], axis=1).astype(np.float32)
                shard.add_image(record["id"], boxes=boxes, scores=np.ones(boxes_per_image, np.float32),
                                is_gt=np.zeros(boxes_per_image, bool),
                                features=np.zeros((boxes_per_image, 1, 1, 1), np.float16))
    folder.finalize()


def bare_tower(teacher, batch_size: int, batches: int) -> float:
    """crops/s of the image tower alone on ready normalised crops already on the device."""
    size = teacher.input_resolution
    crops = torch.randn(batch_size, 3, size, size, device=teacher.device, dtype=teacher.dtype)
    teacher.encode_images(crops, batch_size)  # warm-up
    if teacher.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(batches):
        teacher.encode_images(crops, batch_size)
    if teacher.device.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * batches / (time.perf_counter() - started)


def stage_rate(proposals, annotations, out, model_file, **options) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    summary = cache_embeddings.run(proposals, annotations, out, str(model_file), **options)
    seconds = time.perf_counter() - started
    return summary["crops"] / seconds, summary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--reference-images", type=int, help="Images for the reference path [default: all].")
    parser.add_argument("--boxes", type=int, default=100, help="Boxes per image (2 crops each).")
    parser.add_argument("--side", type=int, default=640, help="Longer image side, pixels.")
    parser.add_argument("--batch-size", type=int, help="Crops per encoder batch [stage default].")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reference-workers", type=int,
                        help="Loader workers of the reference path [default: --workers]; its workers hand over"
                             " finished crops (360 MB an image at 300 boxes, 224 px) through /dev/shm.")
    parser.add_argument("--out", default="/tmp/vild-bench-embeddings")
    parser.add_argument("--photos", type=Path, help="Folder of .jpg/.png photographs [default: scikit-image's].")
    args = parser.parse_args()

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "images").mkdir(parents=True)
    records = make_images(out / "images", args.images, args.side, sample_photos(args.photos))
    annotations = out / "images" / "bench.json"
    annotations.write_text(json.dumps({"images": records, "annotations": [],
                                       "categories": [{"id": 1, "name": "thing"}]}))
    make_proposal_cache(out / "proposals", annotations, records, args.boxes, images_per_shard=16)
    torch.manual_seed(0)
    model_file = out / "model.pt"
    save_clip(MODELS[args.model].build(), model_file)
    teacher = load_teacher(str(model_file), args.device)
    batch_size = args.batch_size or (1024 if teacher.device.type == "cuda" else 256)
    common = dict(batch_size=batch_size, device=args.device, workers=args.workers)

    results = {"model": args.model, "device": str(teacher.device), "batch_size": batch_size, "images": args.images,
               "boxes_per_image": args.boxes, "side": args.side, "precision": str(teacher.dtype)}
    if teacher.device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(teacher.device)
    results["bare_tower_crops_s"] = bare_tower(teacher, batch_size, batches=max(3, 20000 // batch_size))
    results["fast_crops_s"], summary = stage_rate(out / "proposals", annotations, out / "fast", model_file, **common)
    results["bytes_per_image"] = summary["bytes_per_image"]
    reference_annotations = annotations
    if args.reference_images and args.reference_images < args.images:
        keep = records[:args.reference_images]
        reference_annotations = out / "images" / "reference.json"
        reference_annotations.write_text(json.dumps({"images": keep, "annotations": [],
                                                     "categories": [{"id": 1, "name": "thing"}]}))
        make_proposal_cache(out / "proposals-reference", reference_annotations, keep, args.boxes, 16)
        reference_proposals = out / "proposals-reference"
    else:
        reference_proposals = out / "proposals"
    reference_workers = args.workers if args.reference_workers is None else args.reference_workers
    results["reference_workers"] = reference_workers
    results["reference_crops_s"], _ = stage_rate(reference_proposals, reference_annotations, out / "reference",
                                                 model_file, crop_method="reference",
                                                 **{**common, "workers": reference_workers})
    results["fast_over_tower"] = results["fast_crops_s"] / results["bare_tower_crops_s"]
    results["fast_over_reference"] = results["fast_crops_s"] / results["reference_crops_s"]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("| model | device | batch | boxes/img | bare tower crops/s | fast end-to-end crops/s | reference crops/s |"
          " fast / tower | fast / reference |")
    print(f"| {args.model} | {results.get('gpu', results['device'])} | {batch_size} | {args.boxes} |"
          f" {results['bare_tower_crops_s']:.0f} | {results['fast_crops_s']:.0f} | {results['reference_crops_s']:.0f} |"
          f" {results['fast_over_tower']:.2f} | {results['fast_over_reference']:.1f} |")


if __name__ == "__main__":
    main()
