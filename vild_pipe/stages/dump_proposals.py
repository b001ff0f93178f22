"""vild-pipe dump-proposals: the detector's top boxes per image, with RoIAlign features, into a sharded cache.

Reads an annotation file and its images, runs the class-agnostic detector of train-rpn on every image and
writes the proposal cache of DESIGN.md §5: per image, the top `top_n` boxes after the box head's regression
and NMS (original pixels), their objectness, their C x 7 x 7 RoIAlign features (fp16) and, with `add_gt`,
the image's base ground-truth boxes flagged `is_gt` (score 1) so the head sees exact positives.

`add_gt` defaults to on for the annotation file the detector was trained on (train-rpn records its sha256
and split, and the rows then follow the detector's split) or one whose name contains "train" (train.json,
instances_train2017.json, lvis_v1_train.json), and off otherwise; the value used is part of the cache's
config. `nms_threshold` and `add_gt` left out of a rerun keep the values of the cache being resumed
(`_unsaid_settings`), so the same command resumes a cache made before their defaults changed. Only BASE boxes
are ever appended (the training view of the category split): novel boxes never reach the cache. Crowd boxes
are left out: they are regions, not exact positives.

Resumption and scale come from `pipeline.shards`: complete shards are skipped on a rerun; `shard` ("i/n")
and torchrun ranks split the shards between processes with no communication; whichever process finishes
last writes the final manifest. A shard is claimed (locked) when its first image is queued for decoding;
the finished shard is written by a background thread while the next one is computed. SIGTERM and SIGINT
release every lock before the run exits 2, and a shard of this worker left to another live run that is
still not complete at the end fails the run (`pipeline.shard_work`): exit 0 means this worker's part is done.

Every array is a function of the image and the detector weights only (the network sees one image at a
time, see `pipeline.proposals`), so a killed-and-resumed run, a torchrun run and a `--shard` run all fill
the same cache as one uninterrupted process on the same kind of device and precision.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vild_pipe.data.coco import CocoDataset
from vild_pipe.data.splits import CategorySplit
from vild_pipe.errors import DataError, VildError, counted, require_at_least, require_between
from vild_pipe.pipeline.crops import pil_to_uint8_chw
from vild_pipe.pipeline.detector import (
    check_fits_detector, detector_training_data, load_detector, model_sizes, resolve_detector_file,
)
from vild_pipe.pipeline.distributed import loader_workers, made_on, use_threads
from vild_pipe.pipeline.proposals import PROPOSAL_NMS_THRESHOLD, feature_shape, propose_with_features
from vild_pipe.pipeline.shard_work import (
    ClaimingSampler,
    ShardSequence,
    cache_summary,
    joined_process_group,
    log_measured_cost,
    log_nothing_to_write,
)
from vild_pipe.pipeline.shards import (
    CacheFolder,
    RowField,
    Worker,
    bytes_per_row,
    estimate_cache_bytes,
    format_bytes,
    parse_shard_option,
    shard_image_ranges,
    sha256_file,
)

log = logging.getLogger(__name__)

STAGE = "dump-proposals"


def proposal_fields(features: tuple[int, ...]) -> dict[str, RowField]:
    """The per-row datasets of a proposal shard; `features` is one box's feature shape, e.g. (256, 7, 7)."""
    return {
        "boxes": RowField("float32", (4,), "x1, y1, x2, y2 in original image pixels, clipped to the image"),
        "scores": RowField("float32", (), "objectness (class-agnostic box head), 1 for ground-truth rows"),
        "is_gt": RowField("bool", (), "row is an appended base ground-truth box, not a proposal"),
        "features": RowField("float16", features, "RoIAlign features from the detector's FPN (box_roi_pool)"),
    }


def default_add_gt(annotations: str | os.PathLike, detectors_own: bool | None) -> tuple[bool, str]:
    """Whether ground truth is appended when not said, and why: yes for the file the detector was trained on
    (`detectors_own`, by content; None where the detector does not say) or one named like a training split."""
    if detectors_own:
        return True, "the detector was trained on this annotation file"
    if "train" in Path(annotations).name.lower():
        return True, "the annotation file's name contains 'train'"
    if detectors_own is None:
        return False, "its name does not contain 'train' (the detector does not record its training file)"
    return False, "the detector was not trained on this annotation file and its name does not contain 'train'"


def _unsaid_settings(earlier: dict, annotations: str | os.PathLike, annotations_sha256: str,
                     trained_on: dict, nms_threshold: float | None, add_gt: bool | None,
                     split: str | CategorySplit) -> tuple[float, bool, str | CategorySplit]:
    """Values for the settings the command left out (None, or split "auto"). The cache being resumed (its config
    `earlier`) keeps its own; otherwise: NMS at PROPOSAL_NMS_THRESHOLD, ground-truth rows by `default_add_gt`, and
    for the file the detector was trained on (`trained_on`, from `detector_training_data`), the detector's own
    split (its base boxes are the rows' positives)."""
    if nms_threshold is None:
        nms_threshold = earlier.get("nms_threshold", PROPOSAL_NMS_THRESHOLD)
        if nms_threshold != PROPOSAL_NMS_THRESHOLD:
            log.info("class-agnostic NMS at %g, as the cache being resumed was made (the default for a new cache"
                     " is %g)", nms_threshold, PROPOSAL_NMS_THRESHOLD)
    detectors_own = (trained_on["annotations_sha256"] == annotations_sha256
                     if trained_on.get("annotations_sha256") else None)
    if add_gt is None:
        add_gt, why = ((bool(earlier["add_gt"]), "as in the cache being resumed") if "add_gt" in earlier
                       else default_add_gt(annotations, detectors_own))
        log.info("%s ground-truth rows: %s (--add-gt/--no-add-gt to choose)",
                 "appending" if add_gt else "not appending", why)
    if add_gt and split == "auto":
        if earlier.get("split"):
            split = CategorySplit.from_json(earlier["split"])
        elif detectors_own and trained_on.get("split"):
            split = CategorySplit.from_json(trained_on["split"])
            log.info("ground-truth rows of the detector's own base categories (its split: %s)", split.spec)
    return float(nms_threshold), bool(add_gt), split


def _warn_of_a_split_not_the_detectors(trained_on: dict, annotations: str | os.PathLike, annotations_sha256: str,
                                       split: CategorySplit) -> None:
    """A warning when the detector's own training file gets ground-truth rows by another split: boxes of
    categories the detector was trained to see as background, or never saw, become the head's positives."""
    if trained_on.get("annotations_sha256") != annotations_sha256 or not trained_on.get("split"):
        return
    own = CategorySplit.from_json(trained_on["split"])
    if sorted(own.base_ids) != sorted(split.base_ids):
        log.warning("%s: the detector was trained on this file with split %s (%d base categories), the ground-truth"
                    " rows follow split %s (%d): leave --split out to use the detector's", os.fspath(annotations),
                    own.spec, len(own.base_ids), split.spec, len(split.base_ids))


def _split_record(split: CategorySplit, recorded: dict | None) -> dict:
    """The split as the cache's config records it. A cache being resumed keeps its own record (its `spec`, such
    as a novel-file's path) where its categories are the same: the same split named otherwise (a copy of the
    file, a relative path, the names listed) resumes the cache instead of being refused."""
    if recorded and CategorySplit.from_json(recorded) == split:
        return recorded
    return split.to_json()


def _config_of_existing_cache(out: str | os.PathLike) -> dict:
    """The config of the proposal cache already in `out`; {} where there is none (or none this stage reads)."""
    try:
        return dict(CacheFolder.open(out, stage=STAGE).config)
    except VildError:
        return {}


def run(
    detector: str | os.PathLike,
    annotations: str | os.PathLike,
    out: str | os.PathLike,
    images: str | os.PathLike | None = None,
    split: str | CategorySplit = "auto",
    top_n: int = 300,
    min_box_side: float = 2.0,
    nms_threshold: float | None = None,
    add_gt: bool | None = None,
    images_per_shard: int = 64,
    batch_size: int = 8,
    shard: str | tuple[int, int] | None = None,
    device: str = "auto",
    workers: int = 2,
    fp16: bool = True,
    threads: int = 0,
    skip_bad_images: bool = False,
    overwrite: bool = False,
) -> dict:
    """Fill the proposal cache `out` for every image of `annotations`; returns a summary (see
    `shard_work.cache_summary`).

    `detector` is a train-rpn run folder or checkpoint; `images` the image folder (default: the annotation
    file's folder); `split` the category split (data.splits spec) whose base boxes `add_gt` appends.
    `top_n`, `min_box_side` (original pixels) and `nms_threshold` (the box head's class-agnostic NMS; None:
    see `_unsaid_settings`) shape the proposals; they, `add_gt`, the split and the precision make the cache's
    config, so a rerun with other values is refused unless `overwrite`. `batch_size` images are decoded by
    `workers` DataLoader processes and handed over together (the network still sees one at a time); `threads`
    sets torch's CPU threads (0: torch's default); `fp16` runs the backbone under fp16 autocast on CUDA.
    `shard` "i/n" takes this job's part of the shards (with torchrun, split again between the ranks).
    """
    require_at_least("--top-n", top_n)
    if min_box_side < 0:
        raise VildError(f"--min-box-side must be >= 0 pixels, got {min_box_side}")
    require_between("--nms-threshold", nms_threshold, 0, 1, low_open=True)
    require_at_least("--batch-size", batch_size)
    require_at_least("--workers", workers, 0)
    shard_option = parse_shard_option(shard) if isinstance(shard, str) else shard
    resolve_detector_file(detector)  # an unfinished or mistaken run folder is refused before any work or log line
    use_threads(threads)
    with joined_process_group(device) as info:
        started = time.monotonic()
        main_process = info.rank == 0
        dataset = CocoDataset.load(annotations, images)
        if not len(dataset):
            raise DataError(f"{os.fspath(annotations)}: no images to dump proposals for")
        annotations_sha256 = sha256_file(annotations)
        trained_on = detector_training_data(detector)   # what train-rpn recorded of its data: file sha256, split
        earlier = {} if overwrite else _config_of_existing_cache(out)
        nms_threshold, add_gt, split = _unsaid_settings(earlier, annotations, annotations_sha256, trained_on,
                                                        nms_threshold, add_gt, split)
        ground_truth = dataset.training_view(split) if add_gt else None
        if ground_truth is not None:
            _warn_of_a_split_not_the_detectors(trained_on, annotations, annotations_sha256, ground_truth.split)

        model, _, detector_identity = load_detector(detector, info.device)
        use_fp16 = fp16 and info.device.type == "cuda"
        fields = proposal_fields(feature_shape(model))
        config = {
            "top_n": int(top_n),
            "min_box_side": float(min_box_side),
            "nms_threshold": float(nms_threshold),
            "add_gt": bool(add_gt),
            "split": _split_record(ground_truth.split, earlier.get("split")) if ground_truth is not None else None,
            "precision": "fp16-backbone" if use_fp16 else "fp32",
        }
        annotation_path = Path(annotations)
        inputs = {
            "detector": detector_identity,
            "annotations": {"file": annotation_path.name, "sha256": annotations_sha256},
        }
        ranges = shard_image_ranges(len(dataset), images_per_shard)
        folder = CacheFolder.open_or_create(
            out, stage=STAGE, config=config, inputs=inputs, fields=fields, num_shards=len(ranges),
            images_per_shard=images_per_shard, overwrite=overwrite, made_with=made_on(info.device),
        )
        worker = Worker.of(shard_option, info.rank, info.world_size)
        pending = [i for i in worker.shards(folder.num_shards) if not folder.is_complete(i)]
        if main_process:
            _log_expected_cost(fields, dataset, ground_truth, top_n, folder, pending, ranges)

        if pending:
            log.info("%s: %s to write on %s (%s)", worker, counted(len(pending), "shard"), info.device,
                     config["precision"])
            written = _write_shards(
                model, dataset, ground_truth, folder, pending, ranges, config, batch_size, workers, info.device,
                skip_bad_images, show_progress=main_process,
            )
        else:
            written = []
            log_nothing_to_write(folder.num_shards, worker)

        complete = folder.finalize()
        summary = cache_summary(folder, written, complete, time.monotonic() - started)
        log_measured_cost(folder, summary)
        return summary


def _log_expected_cost(fields, dataset, ground_truth, top_n, folder, pending, ranges) -> None:
    """What the cache will take on disk, at most (every image yielding `top_n` boxes), before writing it."""
    gt_rows = 0
    if ground_truth is not None:
        for record in dataset.images:
            _, _, iscrowd = ground_truth.annotations_for(record.id)
            gt_rows += int((~iscrowd).sum())
    num_images = len(dataset)
    total = estimate_cache_bytes(fields, top_n * num_images + gt_rows, num_images, folder.num_shards)
    pending_images = sum(len(ranges[i]) for i in pending)
    log.info(
        "proposal cache %s: up to %s per image (%d proposals + %.1f ground-truth boxes on average, %s a row with"
        " %s fp16 features), up to %s for %d images in %d shards; this worker has %d shards (%d images) to write",
        folder.path, format_bytes(total / num_images), top_n, gt_rows / num_images, format_bytes(bytes_per_row(fields)),
        "x".join(map(str, fields["features"].shape)), format_bytes(total), num_images, folder.num_shards,
        len(pending), pending_images,
    )


# ---------------------------------------------------------------------------------------------- the shard loop


class _DecodedImages(Dataset):
    """Decodes images in DataLoader workers: (shard, position, image id, uint8 CHW tensor or None, error or None).

    A bad image is returned as its one-line DataError message instead of raised: DataLoader would wrap the
    error in a multi-line traceback, and the main process decides whether to stop or to skip it.
    """

    def __init__(self, dataset: CocoDataset, detector_sizes: tuple[int, int]):
        self.dataset = dataset
        self.detector_sizes = detector_sizes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        shard_index, position = key
        record = self.dataset.images[position]
        try:
            pixels = pil_to_uint8_chw(self.dataset.open_image(record))
            check_fits_detector(record.path, *pixels.shape[-2:], *self.detector_sizes)
        except DataError as err:
            return shard_index, position, record.id, None, str(err)
        return shard_index, position, record.id, pixels, None


def _write_shards(model, dataset, ground_truth, folder, pending, ranges, config, batch_size, workers, device,
                  skip_bad_images, show_progress) -> list[int]:
    """Compute and publish the `pending` shards this process can claim; returns the ones it wrote."""
    sampler = ClaimingSampler(folder, pending, lambda index: ranges[index])
    loader = DataLoader(
        _DecodedImages(dataset, model_sizes(model)), batch_size=batch_size, sampler=sampler, collate_fn=list,
        pin_memory=device.type == "cuda", **loader_workers(workers),
    )
    total = sum(len(ranges[i]) for i in pending)
    progress = tqdm(total=total, desc="dump-proposals", unit="img", disable=None if show_progress else True)
    with ShardSequence(sampler) as shards, progress:
        for batch in loader:
            decoded = [item for item in batch if item[3] is not None]
            extra = None
            if ground_truth is not None:
                extra = [_gt_boxes(ground_truth, item[2]) for item in decoded]
            proposals = propose_with_features(
                model, [item[3] for item in decoded], top_n=config["top_n"],
                min_box_side=config["min_box_side"], nms_threshold=config["nms_threshold"], extra_boxes=extra,
                fp16=config["precision"] == "fp16-backbone",
            )
            by_position = {item[1]: (k, result) for k, (item, result) in enumerate(zip(decoded, proposals))}
            for shard_index, position, image_id, _, error in batch:
                writer = shards.shard(shard_index).writer
                if error is not None:
                    if not skip_bad_images:
                        raise DataError(f"{error} (--skip-bad-images records such images and goes on)")
                    log.warning("skipping image %d: %s", image_id, error)
                    writer.skip_image(image_id, error)
                else:
                    k, result = by_position[position]
                    writer.add_image(image_id, **_rows(result, extra[k] if extra is not None else None))
                progress.update(1)
    return shards.published


def _gt_boxes(ground_truth: CocoDataset, image_id: int) -> torch.Tensor:
    """The image's base, non-crowd ground-truth boxes (xyxy, original pixels) from the training view."""
    boxes, _, iscrowd = ground_truth.annotations_for(image_id)
    return torch.from_numpy(boxes[~iscrowd])


def _rows(result, gt_boxes: torch.Tensor | None) -> dict[str, np.ndarray]:
    """One image's rows: proposals by decreasing score, then its ground-truth boxes (score 1, is_gt)."""
    boxes, scores, features = result.boxes.numpy(), result.scores.numpy(), result.features.numpy()
    is_gt = np.zeros(len(boxes), dtype=bool)
    if gt_boxes is not None and len(gt_boxes):
        boxes = np.concatenate([boxes, gt_boxes.numpy().astype(np.float32)])
        scores = np.concatenate([scores, np.ones(len(gt_boxes), dtype=np.float32)])
        is_gt = np.concatenate([is_gt, np.ones(len(gt_boxes), dtype=bool)])
        features = np.concatenate([features, result.extra_features.numpy()])
    return {"boxes": boxes, "scores": scores, "is_gt": is_gt, "features": features}
