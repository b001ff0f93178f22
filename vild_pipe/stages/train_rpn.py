"""vild-pipe train-rpn: train the class-agnostic detector on base boxes; vild-pipe recall: measure its recall.

RUN (the run folder) holds:
    last.pt          resumable training state (model, optimiser, scheduler, step, RNG states, config)
    model.pt         the final detector: weights + DetectorConfig (what `load_detector` and later stages read;
                     a folder without it is refused, and its last.pt is used only when given as the file)
    metrics.jsonl    one JSON line per step: loss terms, lr, step time, images/s
    recall.json      class-agnostic recall on the val split (when `val` is given)

Every base box is class 1 ("object"); novel boxes are removed by the training view and never used. Training
is resumable (checkpoint every N steps and on SIGTERM; rerunning the same command continues and ends at the
same step with, on CPU, identical weights) because everything random in a step is a pure function of
(seed, step, position in the global batch): the images (`StepSampler`), the scale of the step, each image's
flip, and the RPN's and RoI head's box sampling (`set_sampling_seeds`). Under torchrun each rank takes its
slice of the same global batch, so W processes train what one would (DDP averages the gradients).
Every image file (and every --val one) is checked up front, before the run folder is made: training opens
images lazily and would otherwise stop at the step that draws a missing one.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from vild_pipe.data.coco import CocoDataset
from vild_pipe.data.splits import CategorySplit
from vild_pipe.errors import DataError, VildError, require_at_least
from vild_pipe.pipeline.checkpoint import (
    GracefulStop, StepSampler, load_checkpoint, resume_or_start, save_on_schedule_or_stop,
)
from vild_pipe.pipeline.detector import (
    INFERENCE_FIELDS, MODEL_NAME, DetectorConfig, build_detector, check_images_fit_detector, load_detector,
    model_sizes, resolve_detector_file, save_final_model, set_sampling_seeds,
)
from vild_pipe.pipeline.distributed import (
    all_reduce_mean, cleanup_distributed, init_distributed, is_main, loader_workers, pick_device, seed_everything,
    use_threads, wrap_ddp,
)
from vild_pipe.pipeline.recall import format_recall, measure_recall
from vild_pipe.pipeline.shards import format_bytes, read_json_report, sha256_file, write_json_atomically
from vild_pipe.pipeline.training_run import (
    METRICS_NAME, SPLIT_NAMING, append_metrics, check_optimiser, check_schedule, keep_metrics_until,
    lr_factor_schedule, make_run_dir, run_folder_lock,
)

log = logging.getLogger(__name__)

RECALL_NAME = "recall.json"
LOSS_TERMS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg")

# Per preset: what `iterations`, `batch_size`, `lr`, `warmup` and `schedule` default to.
# small: measured on the synthetic world on 2 CPU cores (bench/RESULTS.md). resnet50-fpn: Detectron's 1x
# schedule (90k iterations of 16 images, lr 0.02, decay x0.1 at 2/3 and 8/9).
TRAINING_DEFAULTS: dict[str, dict[str, Any]] = {
    "small": {"iterations": 1600, "batch_size": 4, "lr": 0.02, "warmup": 100, "schedule": "cosine"},
    "resnet50-fpn": {"iterations": 90000, "batch_size": 16, "lr": 0.02, "warmup": 1000, "schedule": "step"},
}
BOX_CLASSES = ("object", "base")
# A resnet50-fpn training step on the CPU, measured (torch 2.14.1, 2026-11-27): peak RSS 3.0 / 4.9 / 8.6 GB for
# 1 / 2 / 4 images of 800x1066 px, so about 1.2 GB and 1.85 GB an image, in proportion to its pixels.
R50_CPU_STEP_BYTES = 1.2e9
R50_CPU_BYTES_PER_PIXEL = 1.85e9 / (800 * 1066)
SCALE_PURPOSE, FLIP_PURPOSE = 11, 12   # keep the per-step and per-image random streams apart


def run(annotations: str | os.PathLike, run_dir: str | os.PathLike, images: str | os.PathLike | None = None,
        split: str = "auto", backbone: str = "resnet50-fpn", backbone_init: str = "none",
        min_size: int | None = None, max_size: int | None = None, iterations: int | None = None,
        batch_size: int | None = None, lr: float | None = None, warmup: int | None = None,
        schedule: str | None = None, momentum: float = 0.9, weight_decay: float = 1e-4,
        clip_grad_norm: float | None = None,
        scale_jitter: tuple[float, float] = (0.75, 1.25), hflip: bool = True, checkpoint_every: int = 200,
        seed: int = 0, device: str = "auto", workers: int = 2, amp: bool = True,
        val: str | os.PathLike | None = None, val_images: str | os.PathLike | None = None, top_k: int = 100,
        threads: int = 0, box_classes: str = "object", detector_options: dict[str, Any] | None = None
        ) -> dict[str, Any]:
    """Train (or resume, or find finished) the detector in `run_dir`; returns a summary of the run.

    `box_classes`: "object" trains the box head on object vs background (DESIGN.md's class-agnostic
    detector); "base" trains it on the base categories (`BaseClassPredictor`), which teaches a backbone
    trained from scratch the category features ViLD's end-to-end training gives it. Either way only base
    boxes are seen and the detector's outputs are class-agnostic.
    """
    started = time.perf_counter()
    require_at_least("--workers", workers, 0)
    use_threads(threads)
    run_dir = Path(run_dir)
    info = init_distributed(device)
    owns_process_group = info.is_distributed

    if box_classes not in BOX_CLASSES:
        raise VildError(f"--box-classes must be one of {', '.join(BOX_CLASSES)}, got {box_classes!r}")
    train_set = CocoDataset.load(annotations, images).training_view(split)
    if not train_set.num_boxes:
        raise DataError(f"{os.fspath(annotations)}: no base boxes to train the detector on (split"
                        f" {train_set.split.spec}: {len(train_set.split.base_ids)} base categories, none annotated)")
    detector_options = dict(detector_options or {})
    if box_classes == "base":
        detector_options["box_classes"] = len(train_set.split.base_ids)
    detector = _detector_config(backbone, backbone_init, min_size, max_size, detector_options)
    hyper = _training_settings(detector.backbone, iterations, batch_size, lr, warmup, schedule)
    _check_settings(hyper, scale_jitter, checkpoint_every, top_k)
    check_optimiser(momentum, weight_decay, clip_grad_norm)
    # Training opens images lazily: a missing one would stop the run hours in, at the step that draws it.
    train_set.check_image_files()
    low_scale = scale_jitter[0]
    check_images_fit_detector(train_set, detector.min_size * low_scale, detector.max_size * low_scale)
    if val is not None:
        val_set = CocoDataset.load(val, val_images, check_images=True, images_option="--val-images")
        check_images_fit_detector(val_set, detector.min_size, detector.max_size)
    if is_main(info):
        _warn_of_cpu_memory(detector, hyper["batch_size"], info.device)
    use_amp = bool(amp) and info.device.type == "cuda"
    config = {
        "detector": detector.to_dict(),
        "data": _data_identity(train_set),
        **hyper,
        "momentum": momentum, "weight_decay": weight_decay, "clip_grad_norm": clip_grad_norm,
        "scale_jitter": list(scale_jitter),
        "hflip": bool(hflip), "seed": int(seed), "amp": use_amp,
    }
    if is_main(info):
        log.info("train-rpn: %d images, %d base boxes (split %s; novel boxes removed); %s backbone (init %s), "
                 "%d steps of %d images on %d process(es), %s%s", len(train_set), train_set.num_boxes,
                 train_set.split.spec, detector.backbone, detector.backbone_init, hyper["iterations"],
                 hyper["batch_size"], info.world_size, info.device, ", AMP" if use_amp else "")

    seed_everything(seed, info.rank)
    model = build_detector(detector).to(info.device)
    if is_main(info):
        make_run_dir(run_dir)  # after the backbone's weights are in hand: a failed download leaves no folder
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=hyper["lr"],
                                momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor_schedule(hyper))
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    sampler = StepSampler(len(train_set), hyper["batch_size"], seed, info.rank, info.world_size)

    try:
        with GracefulStop() as stop, run_folder_lock(run_dir, is_main(info)):
            step = resume_or_start(run_dir, config, model, optimizer, scheduler, scaler,
                                   resumable_changes=[f"detector.{name}" for name in INFERENCE_FIELDS]
                                   + [SPLIT_NAMING])
            first_step = step
            if is_main(info):
                keep_metrics_until(run_dir / METRICS_NAME, step)
            ddp_model = wrap_ddp(model, info)
            ddp_model.train()
            loader = _step_loader(train_set, sampler, config, first_step, workers, info.device)
            progress = tqdm(total=hyper["iterations"], initial=step, desc="train-rpn", unit="step",
                            disable=None if is_main(info) else True)
            tick = time.perf_counter()
            for batch_images, batch_targets, positions in loader:
                unreadable = [image for image in batch_images if isinstance(image, str)]
                if unreadable:
                    raise DataError(unreadable[0])
                losses = _train_step(ddp_model, model, optimizer, scaler, batch_images, batch_targets, positions,
                                     seed, step, info.device, use_amp, clip_grad_norm)
                scheduler.step()
                step += 1
                now = time.perf_counter()
                record = _metrics_record(step, losses, optimizer, now - tick, hyper["batch_size"])
                tick = now
                if is_main(info):
                    append_metrics(run_dir / METRICS_NAME, record)
                    progress.update(1)
                    progress.set_postfix(loss=f"{record['loss']:.3f}", obj=f"{record['loss_objectness']:.3f}",
                                         cls=f"{record['loss_classifier']:.3f}", lr=f"{record['lr']:.4f}")
                save_on_schedule_or_stop(stop, info.device, run_dir, step, hyper["iterations"], checkpoint_every,
                                         config, model, optimizer, scheduler, scaler)
            progress.close()
        trained = step - first_step
        summary: dict[str, Any] = {"run_dir": os.fspath(run_dir), "steps": step, "trained_steps": trained,
                                   "world_size": info.world_size}
        if not is_main(info):
            return summary
        model_file = run_dir / MODEL_NAME
        if trained or _saved_detector_config(model_file) != detector.to_dict():
            save_final_model(run_dir, model, detector, step, training=config)
        seconds = time.perf_counter() - started
        summary["seconds"] = round(seconds, 1)
        if trained:
            log.info("train-rpn: %d steps in %.0f s (%.1f images/s); wrote %s", trained, seconds,
                     trained * hyper["batch_size"] / seconds, model_file)
        else:
            log.info("train-rpn: %s already finished at step %d", run_dir, step)
        if val is not None:
            summary["recall"] = run_recall(run_dir, val, images=val_images, split=train_set.split, top_k=top_k,
                                           device=str(info.device), out=run_dir / RECALL_NAME,
                                           images_option="--val-images")
        return summary
    finally:
        if owns_process_group:
            cleanup_distributed()


def run_recall(detector_path: str | os.PathLike, annotations: str | os.PathLike,
               images: str | os.PathLike | None = None, split: str | CategorySplit = "auto", top_k: int = 100,
               device: str = "auto", source: str = "detections", batch_size: int = 8, workers: int = 0,
               out: str | os.PathLike | None = None, images_option: str = "--images") -> dict[str, Any]:
    """Class-agnostic recall of a detector (run folder or file) on an annotated split, base and novel apart.

    Writes the result as JSON to `out` when given (a result already there for the same detector, data and
    settings is returned as is). Logs one line with recall@0.5 and AR per group. `images_option` names the option
    that gives `images`, for the hint of a missing image.
    """
    require_at_least("--top-k", top_k)
    require_at_least("--batch-size", batch_size)
    require_at_least("--workers", workers, 0)
    dataset = CocoDataset.load(annotations, images, images_option=images_option)
    category_split = dataset.resolve_split(split)
    settings = {"annotations": os.fspath(annotations), "split": category_split.to_json(), "top_k": top_k,
                "source": source}
    if out is not None and Path(out).is_file():
        previous = read_json_report(out, "a recall report", "use another --out or move the file")
        file = resolve_detector_file(detector_path)
        if previous.get("settings") == settings and previous.get("detector", {}).get("sha256") == sha256_file(file):
            log.info("recall (from %s): %s", out, format_recall(previous["recall"]))
            return previous
    run_device = pick_device(device)
    model, config, identity = load_detector(detector_path, run_device)
    check_images_fit_detector(dataset, *model_sizes(model))
    started = time.perf_counter()
    recall = measure_recall(model, dataset, category_split, top_k=top_k, source=source, device=run_device,
                            batch_size=batch_size, workers=workers)
    result = {"detector": identity, "settings": settings, "detector_inference": {
        name: getattr(config, name) for name in INFERENCE_FIELDS}, "recall": recall,
        "seconds": round(time.perf_counter() - started, 1)}
    log.info("recall of %s on %s (%s): %s", identity["checkpoint"], os.fspath(annotations), source,
             format_recall(recall))
    if out is not None:
        write_json_atomically(out, result, indent=2)
    return result


# --------------------------------------------------------------------------- settings

def _detector_config(backbone: str, backbone_init: str, min_size: int | None, max_size: int | None,
                     options: dict[str, Any] | None) -> DetectorConfig:
    overrides = dict(options or {})
    if min_size is not None:
        overrides["min_size"] = min_size
    if max_size is not None:
        overrides["max_size"] = max_size
    return DetectorConfig.preset(backbone, backbone_init=backbone_init, **overrides)


def _training_settings(backbone: str, iterations: int | None, batch_size: int | None, lr: float | None,
                       warmup: int | None, schedule: str | None) -> dict[str, Any]:
    given = {"iterations": iterations, "batch_size": batch_size, "lr": lr, "warmup": warmup, "schedule": schedule}
    return {name: TRAINING_DEFAULTS[backbone][name] if value is None else value for name, value in given.items()}


def _check_settings(hyper: dict[str, Any], scale_jitter: Sequence[float], checkpoint_every: int, top_k: int) -> None:
    check_schedule(hyper)
    if len(scale_jitter) != 2 or not 0 < scale_jitter[0] <= scale_jitter[1]:
        raise VildError(f"scale jitter must be two factors 0 < low <= high, got {list(scale_jitter)}")
    require_at_least("--checkpoint-every", checkpoint_every)
    require_at_least("--top-k", top_k)


def _warn_of_cpu_memory(detector: DetectorConfig, batch_size: int, device: torch.device) -> None:
    """A warning where a resnet50-fpn step on the CPU would need more memory than the machine has: the preset's
    defaults (16 images at 800 px) are a GPU's, and the kernel would kill the run at its first step, without a
    word. Every process of one machine holds its share of the batch, so the whole batch is counted."""
    if device.type != "cpu" or detector.backbone != "resnet50-fpn":
        return
    total = _physical_memory()
    if total is None:
        return
    per_image = R50_CPU_BYTES_PER_PIXEL * detector.min_size * detector.min_size * 4 / 3   # a 4:3 photograph
    needed = R50_CPU_STEP_BYTES + batch_size * per_image
    if needed > 0.8 * total:
        fits = int((0.8 * total - R50_CPU_STEP_BYTES) // per_image)
        log.warning("train-rpn: a resnet50-fpn step of %d images at %d px on the CPU needs about %s (measured %s an"
                    " 800x1066 image), more than this machine's %s: the run would be killed for memory; %s, or"
                    " --backbone small (the CPU preset)", batch_size, detector.min_size, format_bytes(needed),
                    format_bytes(R50_CPU_BYTES_PER_PIXEL * 800 * 1066), format_bytes(total),
                    f"--batch-size {fits} fits" if fits >= 1 else "give a smaller --min-size and --max-size")


def _physical_memory() -> int | None:
    """The machine's memory in bytes; None where the platform does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _data_identity(train_set: CocoDataset) -> dict[str, Any]:
    """What the training data is, by content: a run resumed on other data would train a model of neither."""
    return {"annotations_sha256": sha256_file(train_set.path), "images": len(train_set),
            "base_boxes": train_set.num_boxes, "split": train_set.split.to_json()}


# --------------------------------------------------------------------------- data

def step_scale(seed: int, step: int, jitter: Sequence[float]) -> float:
    """The image scale factor of a step (one per global batch, so images of a batch need no padding)."""
    low, high = jitter
    return float(np.random.default_rng([seed, step, SCALE_PURPOSE]).uniform(low, high)) if high > low else float(low)


def image_flip(seed: int, step: int, position: int) -> bool:
    """Whether the image at `position` of the global batch of `step` is flipped left-right."""
    return bool(np.random.default_rng([seed, step, position, FLIP_PURPOSE]).random() < 0.5)


class TrainingImages(Dataset):
    """Item (step, position, sample): the image resized to the step's scale, maybe flipped, with its target.

    Target boxes are the image's non-crowd boxes of the training view, labelled 1 (object) or 1 + their base
    category's index (`box_classes` > 1); crowd boxes
    are left out (torchvision's Faster R-CNN has no ignore regions). An unreadable image gives its one-line
    error message in place of the image tensor.
    """

    def __init__(self, dataset: CocoDataset, min_size: int, max_size: int, seed: int,
                 scale_jitter: Sequence[float], hflip: bool, box_classes: int = 1):
        self.dataset = dataset
        self.base_index = {int(c): k for k, c in enumerate(sorted(dataset.split.base_ids))}
        if box_classes not in (1, len(self.base_index)):
            raise VildError(f"the detector's box head learns {box_classes} classes but the split has"
                            f" {len(self.base_index)} base categories")
        self.box_classes = box_classes
        self.min_size, self.max_size = min_size, max_size
        self.seed = seed
        self.scale_jitter = tuple(scale_jitter)
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.dataset)

    def box_labels(self, category_ids: np.ndarray) -> np.ndarray:
        """1 (object) for every box, or 1 + the base category's index when the box head learns the categories."""
        if self.box_classes == 1:
            return np.ones(len(category_ids), dtype=np.int64)
        return np.array([1 + self.base_index[int(c)] for c in category_ids], dtype=np.int64)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        step, position, sample = key
        record = self.dataset.images[sample]
        boxes, categories, crowd = self.dataset.annotations_for(record.id)
        try:
            image = pil_to_tensor(self.dataset.open_image(record)).float().div_(255)
        except DataError as err:
            # Handed over as a value, raised by the main process: DataLoader would re-raise it wrapped in a
            # worker's multi-line traceback.
            return str(err), {}, position
        boxes = torch.from_numpy(boxes[~crowd])
        image, boxes = resize_for_training(image, boxes, self.min_size, self.max_size,
                                           step_scale(self.seed, step, self.scale_jitter))
        if self.hflip and image_flip(self.seed, step, position):
            image = image.flip(-1)
            boxes = torch.stack([image.shape[-1] - boxes[:, 2], boxes[:, 1], image.shape[-1] - boxes[:, 0],
                                 boxes[:, 3]], dim=1)
        target = {"boxes": boxes, "labels": torch.from_numpy(self.box_labels(categories[~crowd]))}
        return image, target, position


def resize_for_training(image: torch.Tensor, boxes: torch.Tensor, min_size: int, max_size: int, scale: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize as torchvision's GeneralizedRCNNTransform does (shorter side to min_size, longer side at most
    max_size, bilinear), with both sizes multiplied by `scale`."""
    height, width = image.shape[-2:]
    factor = min(min_size * scale / min(height, width), max_size * scale / max(height, width))
    resized = torch.nn.functional.interpolate(image[None], scale_factor=factor, mode="bilinear",
                                              recompute_scale_factor=True, align_corners=False)[0]
    new_height, new_width = resized.shape[-2:]
    ratios = torch.tensor([new_width / width, new_height / height] * 2, dtype=boxes.dtype)
    return resized, boxes.reshape(-1, 4) * ratios


class _StepBatches:
    """The batches of steps first..iterations-1: each a list of (step, position, sample) for this rank."""

    def __init__(self, sampler: StepSampler, first: int, total: int):
        self.sampler, self.first, self.total = sampler, first, total

    def __len__(self) -> int:
        return max(0, self.total - self.first)

    def __iter__(self):
        start = self.sampler.rank * self.sampler.local_batch_size
        for step in range(self.first, self.total):
            samples = self.sampler.indices(step)
            yield [(step, start + offset, int(sample)) for offset, sample in enumerate(samples)]


def _collate(items: list) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], list[int]]:
    images, targets, positions = zip(*items)
    return list(images), list(targets), list(positions)


def _step_loader(train_set: CocoDataset, sampler: StepSampler, config: dict[str, Any], first_step: int,
                 workers: int, device: torch.device) -> DataLoader:
    detector = config["detector"]
    dataset = TrainingImages(train_set, detector["min_size"], detector["max_size"], config["seed"],
                             config["scale_jitter"], config["hflip"], detector.get("box_classes", 1))
    return DataLoader(dataset, batch_sampler=_StepBatches(sampler, first_step, config["iterations"]),
                      collate_fn=_collate, pin_memory=device.type == "cuda",
                      **loader_workers(workers))


# --------------------------------------------------------------------------- one step

def _train_step(ddp_model: torch.nn.Module, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler | None, images: list[torch.Tensor], targets: list[dict],
                positions: list[int], seed: int, step: int, device: torch.device, use_amp: bool,
                clip_grad_norm: float | None) -> dict[str, float]:
    images = [image.to(device, non_blocking=True) for image in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    set_sampling_seeds(model, seed, step, positions)
    with torch.autocast(device_type=device.type, enabled=use_amp):
        losses = ddp_model(images, targets)
    total = sum(losses[name] for name in LOSS_TERMS)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        if clip_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        if clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        optimizer.step()
    values = all_reduce_mean(torch.stack([losses[name].detach().float() for name in LOSS_TERMS]))
    result = dict(zip(LOSS_TERMS, values.tolist()))
    if not all(math.isfinite(v) for v in result.values()):
        raise VildError(f"train-rpn: loss is not finite at step {step + 1} ({result}); lower the learning rate")
    return result


def _metrics_record(step: int, losses: dict[str, float], optimizer: torch.optim.Optimizer, seconds: float,
                    global_batch: int) -> dict[str, Any]:
    return {"step": step, "loss": sum(losses.values()), **losses, "lr": optimizer.param_groups[0]["lr"],
            "step_s": round(seconds, 4), "images_per_s": round(global_batch / seconds, 2) if seconds > 0 else None}


def _saved_detector_config(model_file: Path) -> dict[str, Any] | None:
    """The detector config inside an existing model.pt (None if there is none); inference settings may differ
    from this run's, and then model.pt is rewritten with this run's."""
    state = load_checkpoint(model_file)
    return None if state is None else state.get("detector")
