"""Benchmark: ViLD head training from the caches on the CPU, with the cache loader measured alone.

    python bench/train_head.py [--proposals P --embeddings E --annotations A --text TEXT] [options]

Without caches it writes a synthetic pair the size of the demo's (600 images, 100 proposals + 8 GT rows,
64x7x7 fp16 features, D = 128) to a temporary folder. It reports, for the same settings:
  loader alone   steps/s and RoIs/s of StepLoader (reading, labelling, sampling, batching), no training;
  step alone     steps/s and RoIs/s of the training step on batches already in memory;
  train-head     steps/s and RoIs/s of the whole stage (loader and step together, as a user runs it).
The loader must not be what limits training: its RoIs/s should be at least twice the step's.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vild_pipe.pipeline.cache_loader import CacheIndex, RowSelection, StepLoader, StepOrder
from vild_pipe.pipeline.embedding_cache import embedding_fields, open_cache_pair
from vild_pipe.pipeline.head import HeadConfig, ViLDHead
from vild_pipe.pipeline.shards import CacheFolder, ShardWriter
from vild_pipe.pipeline.text_embeddings import TextEmbeddings
from vild_pipe.stages import train_head
from vild_pipe.stages.dump_proposals import proposal_fields

STARTUP_STEPS = 5
"""Steps left out of the timings: the loader's workers start during them."""


def synthetic_caches(folder: Path, images: int, proposals: int, gt: int, channels: int, dim: int,
                     images_per_shard: int = 64) -> tuple[Path, Path, Path, Path]:
    """A proposal cache, its embedding cache, an annotation file and text embeddings, all random but consistent."""
    rng = np.random.default_rng(0)
    size, base = 192, 10
    categories = [{"id": k + 1, "name": f"shape{k}", "split": "base" if k < base else "novel"} for k in range(15)]
    split = {"spec": "field", "base_ids": list(range(1, base + 1)), "novel_ids": list(range(base + 1, 16))}
    records, annotations, per_image = [], [], []
    for image_id in range(1, images + 1):
        xy = rng.uniform(0, size - 40, (gt, 2))
        wh = rng.uniform(12, 40, (gt, 2))
        labels = rng.integers(1, base + 1, gt)
        records.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": size, "height": size})
        for box, label in zip(np.concatenate([xy, wh], 1), labels):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [float(v) for v in box], "area": float(box[2] * box[3]), "iscrowd": 0})
        gt_boxes = np.concatenate([xy, xy + wh], 1)
        jitter = rng.normal(0, 6, (proposals, 4))
        proposal_boxes = np.clip(gt_boxes[rng.integers(0, gt, proposals)] + jitter, 0, size)
        proposal_boxes[:, 2:] = np.maximum(proposal_boxes[:, 2:], proposal_boxes[:, :2] + 1)
        per_image.append((image_id, np.concatenate([proposal_boxes, gt_boxes]).astype(np.float32)))
    annotation_file = folder / "train.json"
    annotation_file.write_text(json.dumps({"images": records, "annotations": annotations, "categories": categories}))

    identity = {"model": "bench-clip", "sha256": "0" * 64, "embed_dim": dim, "input_resolution": 32}
    from vild_pipe.pipeline.shards import sha256_file
    shards = (images + images_per_shard - 1) // images_per_shard
    proposal_folder = CacheFolder.open_or_create(
        folder / "proposals", stage="dump-proposals", config={"top_n": proposals, "add_gt": True, "split": split},
        inputs={"annotations": {"file": "train.json", "sha256": sha256_file(annotation_file)}},
        fields=proposal_fields((channels, 7, 7)), num_shards=shards, images_per_shard=images_per_shard)
    embedding_folder = CacheFolder.open_or_create(
        folder / "embeddings", stage="cache-embeddings", config={},
        inputs={"clip": identity, "proposals": {"path": str(proposal_folder.path),
                                                "fingerprint": proposal_folder.fingerprint}},
        fields=embedding_fields(dim), num_shards=shards, images_per_shard=images_per_shard)
    for shard in range(shards):
        chunk = per_image[shard * images_per_shard:(shard + 1) * images_per_shard]
        with ShardWriter(proposal_folder, shard) as pw, ShardWriter(embedding_folder, shard) as ew:
            for image_id, boxes in chunk:
                rows = len(boxes)
                pw.add_image(image_id, boxes=boxes, scores=np.linspace(1, 0, rows, dtype=np.float32),
                             is_gt=np.arange(rows) >= proposals,
                             features=rng.standard_normal((rows, channels, 7, 7), dtype=np.float32).astype(np.float16))
                emb = rng.standard_normal((rows, dim), dtype=np.float32)
                emb /= np.linalg.norm(emb, axis=1, keepdims=True)
                ew.add_image(image_id, emb_1x=emb.astype(np.float16), emb_15x=emb.astype(np.float16),
                             emb=emb.astype(np.float16))
    proposal_folder.finalize()
    embedding_folder.finalize()
    texts = torch.nn.functional.normalize(torch.randn(15, dim), dim=-1)
    text_file = folder / "text.pt"
    TextEmbeddings([c["name"] for c in categories], texts, identity).save(text_file)
    return proposal_folder.path, embedding_folder.path, annotation_file, text_file


def measure_loader(proposals, embeddings, annotations, args) -> dict:
    proposal_folder, embedding_folder = open_cache_pair(proposals, embeddings)
    train_set = train_head._training_annotations(annotations, proposal_folder, None)
    index = CacheIndex.build(proposal_folder, embedding_folder)
    order = StepOrder(index, args.batch_size, 0, args.block_images, args.buffer_blocks)
    selection = RowSelection(True, True, args.image_rois, args.sample_rois, 0.25, 0)
    loader = StepLoader(order, selection, train_head._ground_truth(train_set, index.image_ids), 0, args.steps,
                        args.workers)
    batches, rois = [], 0
    started = time.perf_counter()
    for batch in loader:
        rois += len(batch.labels)
        if len(batches) < 20:
            batches.append(batch)
    seconds = time.perf_counter() - started
    return {"steps_per_s": args.steps / seconds, "rois_per_s": rois / seconds, "batches": batches,
            "channels": proposal_folder.fields["features"].shape[0], "dim": embedding_folder.fields["emb"].shape[0]}


def measure_step(batches, channels: int, dim: int, args) -> dict:
    torch.manual_seed(0)
    head = ViLDHead(HeadConfig(channels, 7, args.representation_size, dim))
    optimizer = torch.optim.SGD(head.parameters(), lr=args.lr, momentum=0.9)
    texts = torch.nn.functional.normalize(torch.randn(10, dim), dim=-1)
    config = {"temperature": 0.01, "image_weight": 0.5, "clip_grad_norm": 1.0}
    train_head._train_step(head, head, optimizer, batches[0], texts, config, torch.device("cpu"))  # warm-up
    rois, started = 0, time.perf_counter()
    for batch in batches[1:]:
        train_head._train_step(head, head, optimizer, batch, texts, config, torch.device("cpu"))
        rois += len(batch.labels)
    seconds = time.perf_counter() - started
    return {"steps_per_s": (len(batches) - 1) / seconds, "rois_per_s": rois / seconds}


def measure_stage(proposals, embeddings, annotations, text, run_dir, args) -> dict:
    train_head.run(proposals, embeddings, annotations, run_dir, text=text, iterations=args.steps,
                   batch_size=args.batch_size, lr=args.lr, warmup=10, representation_size=args.representation_size,
                   image_rois=args.image_rois, sample_rois=args.sample_rois, block_images=args.block_images,
                   buffer_blocks=args.buffer_blocks, workers=args.workers, device="cpu",
                   checkpoint_every=args.steps)
    records = [json.loads(line) for line in (Path(run_dir) / train_head.METRICS_NAME).read_text().splitlines()]
    timed = records[STARTUP_STEPS:]   # leave out the first steps (worker start-up)
    seconds = sum(r["step_s"] for r in timed)
    return {"steps_per_s": len(timed) / seconds,
            "rois_per_s": sum(r["rois"] for r in timed) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proposals")
    parser.add_argument("--embeddings")
    parser.add_argument("--annotations")
    parser.add_argument("--text", help="embed-text file (needed with --proposals)")
    parser.add_argument("--steps", type=int, default=60,
                        help=f"more than {STARTUP_STEPS}: the first ones are not timed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--representation-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--image-rois", type=int, default=300)
    parser.add_argument("--sample-rois", type=int, default=512)
    parser.add_argument("--block-images", type=int, default=4)
    parser.add_argument("--buffer-blocks", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.steps <= STARTUP_STEPS:
        parser.error(f"--steps must be more than {STARTUP_STEPS}: the first {STARTUP_STEPS} (worker start-up) are not"
                     " timed")
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.proposals:
            proposals, embeddings, annotations, text = args.proposals, args.embeddings, args.annotations, args.text
        else:
            started = time.perf_counter()
            proposals, embeddings, annotations, text = synthetic_caches(tmp, 600, 100, 8, 64, 128)
            print(f"synthetic caches written in {time.perf_counter() - started:.1f} s")
        loader = measure_loader(proposals, embeddings, annotations, args)
        step = measure_step(loader.pop("batches"), loader.pop("channels"), loader.pop("dim"), args)
        stage = measure_stage(proposals, embeddings, annotations, text, tmp / "run", args)
    settings = {k: v for k, v in vars(args).items() if k not in ("proposals", "embeddings", "annotations", "text")}
    print(f"settings: {json.dumps(settings)}; torch threads {torch.get_num_threads()}")
    print("| measured | steps/s | RoIs/s |\n| --- | --- | --- |")
    for name, result in (("loader alone", loader), ("step alone", step), ("train-head (both)", stage)):
        print(f"| {name} | {result['steps_per_s']:.2f} | {result['rois_per_s']:.0f} |")
    print(f"loader / step RoIs/s: {loader['rois_per_s'] / step['rois_per_s']:.1f}x")


if __name__ == "__main__":
    main()
