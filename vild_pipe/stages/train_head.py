"""vild-pipe train-head: the ViLD head trained from the proposal and embedding caches alone (no images, no CLIP).

RUN (the run folder) holds:
    last.pt          resumable training state (head, optimiser, scheduler, step, RNG states, config)
    head.pt          the final head: weights, HeadConfig, losses, CLIP and detector identities, the caches and text
                     it used
    text_base.pt     the base categories' text embeddings, when computed here from `clip`
    metrics.jsonl    one JSON line per step: loss terms, lr, step time, RoIs/s

Losses (DESIGN.md §2): ViLD-text, cross-entropy of cosine logits against [learned background, base texts] / τ
with labels from IoU >= 0.5 with the image's base GT boxes; ViLD-image, L1 distance to the cached CLIP
embedding (`emb`, 1x + 1.5x) of the top M proposals, weight w. `losses` picks "text", "image" or both, so
the ablation trains from the same caches. Novel categories never enter the classifier or the labels.

Resumable and torchrun-ready like train-rpn: the images of a step and the RoI sample of each image are pure
functions of (seed, step, stream position) (`pipeline.cache_loader`), and each loss is normalised by its
count over the GLOBAL batch, so W processes train what one process trains and a killed run rerun with the
same command ends at the same weights.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from vild_pipe.data.coco import CocoDataset
from vild_pipe.data.splits import CategorySplit
from vild_pipe.errors import DataError, VildError, require_at_least, require_between
from vild_pipe.pipeline.cache_loader import NO_LABEL, CacheIndex, RowSelection, StepBatch, StepLoader, StepOrder
from vild_pipe.pipeline.checkpoint import GracefulStop, resume_or_start, save_on_schedule_or_stop
from vild_pipe.pipeline.distributed import (
    all_reduce_sum, barrier, cleanup_distributed, init_distributed, is_main, seed_everything, use_threads, wrap_ddp,
)
from vild_pipe.pipeline.embedding_cache import (
    annotations_of, check_text_clip, clip_identity, embedding_dim, open_caches,
)
from vild_pipe.pipeline.head import (
    HEAD_NAME, IMAGE_LOSS_WEIGHT, TEMPERATURE, HeadConfig, ViLDHead, save_head, vild_image_loss, vild_text_loss,
)
from vild_pipe.pipeline.shards import CacheFolder
from vild_pipe.pipeline.training_run import (
    METRICS_NAME, SPLIT_NAMING, append_metrics, check_optimiser, check_schedule, keep_metrics_until,
    lr_factor_schedule, make_run_dir, run_folder_lock,
)
from vild_pipe.pipeline.text_embeddings import (
    TextEmbeddings, clip_file_identity, embed_text, load_text_embeddings, load_text_rows,
)

log = logging.getLogger(__name__)

TEXT_NAME = "text_base.pt"
LOSSES = ("text", "image", "text+image")
OPTIMIZERS = ("sgd", "adamw")


def run(proposals: str | os.PathLike, embeddings: str | os.PathLike | None, annotations: str | os.PathLike,
        run_dir: str | os.PathLike, text: str | os.PathLike | None = None, clip: str | None = None,
        losses: str = "text+image", split: str | None = None,
        iterations: int = 20000, batch_size: int = 16, lr: float = 0.02, warmup: int = 500,
        schedule: str = "cosine", optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 1e-4,
        clip_grad_norm: float | None = 1.0, representation_size: int = 1024, conv_layers: int = 0,
        image_weight: float = IMAGE_LOSS_WEIGHT, image_rois: int = 300,
        sample_rois: int | None = 512, foreground_fraction: float = 0.25, temperature: float = TEMPERATURE,
        block_images: int = 16, buffer_blocks: int = 8, checkpoint_every: int = 500, seed: int = 0,
        device: str = "auto", workers: int = 2, threads: int = 0) -> dict[str, Any]:
    """Train (or resume, or find finished) the ViLD head in `run_dir`; returns a summary of the run.

    `proposals`/`embeddings`: the caches (train split, GT rows appended); `embeddings` may be None for
    losses="text". `annotations`: the annotation file the proposal cache was made from (its base GT boxes
    label the RoIs); `split` defaults to the split recorded in the proposal cache. Text embeddings of the base
    categories come from `text` (an embed-text file holding every base name) or are computed with `clip`
    into RUN/text_base.pt. `batch_size` is the global number of images per step; `sample_rois` None keeps
    every row for ViLD-text. `clip_grad_norm` (default 1): at τ = 0.01 the early ViLD-text gradients are ~100x
    the ViLD-image ones and plain SGD thrashes; clipped, both losses fall (measured on the synthetic caches).
    `conv_layers` 3x3 convs come before the two FC layers (0: torchvision's TwoMLPHead; ViLD's own head has 4).
    """
    started = time.perf_counter()
    use_threads(threads)
    run_dir = Path(run_dir)
    info = init_distributed(device)
    owns_process_group = info.is_distributed
    try:
        hyper = {"iterations": iterations, "batch_size": batch_size, "lr": lr, "warmup": warmup, "schedule": schedule}
        if optimizer not in OPTIMIZERS:
            raise VildError(f"--optimizer {optimizer}: use one of {', '.join(OPTIMIZERS)}")
        _check_settings(losses, hyper, image_rois, sample_rois, foreground_fraction, checkpoint_every, workers)
        check_optimiser(momentum, weight_decay, clip_grad_norm)
        use_text, use_image = "text" in losses, "image" in losses
        proposal_folder, embedding_folder = _open_caches(proposals, embeddings, use_image)
        train_set = _training_annotations(annotations, proposal_folder, split)
        if use_text and not train_set.num_boxes:
            raise DataError(f"{os.fspath(annotations)}: no base boxes (split {train_set.split.spec}) to label the RoIs:"
                            " the ViLD-text loss would learn the background alone; give a file with base"
                            " annotations, or --losses image")
        if use_text and not proposal_folder.config.get("add_gt") and is_main(info):
            log.warning("%s: the cache holds no ground-truth rows (dumped with --no-add-gt, or from a file the"
                        " detector was not trained on whose name lacks 'train'): ViLD-text learns from proposals"
                        " alone; dump-proposals --add-gt gives it the exact base boxes ViLD trains on",
                        proposal_folder.path)
        base_names = train_set.split.base_names(train_set.categories)
        texts = _base_text_embeddings(text, clip, base_names, run_dir, embedding_folder, info, required=use_text)
        if is_main(info):
            make_run_dir(run_dir)
        head_config = HeadConfig(*_feature_shape(proposal_folder), representation_size=representation_size,
                                 conv_layers=conv_layers,
                                 embed_dim=_embed_dim(embedding_folder, texts))
        index = CacheIndex.build(proposal_folder, embedding_folder if use_image else None)
        ground_truth = _ground_truth(train_set, index.image_ids)
        config = {
            "losses": losses, **hyper, "optimizer": optimizer, "momentum": momentum, "weight_decay": weight_decay,
            "clip_grad_norm": clip_grad_norm,
            "head": head_config.to_dict(), "image_weight": image_weight, "image_rois": image_rois,
            "sample_rois": sample_rois, "foreground_fraction": foreground_fraction, "temperature": temperature,
            "block_images": block_images, "buffer_blocks": buffer_blocks, "seed": seed,
            "data": {"proposals": proposal_folder.fingerprint,
                     "embeddings": embedding_folder.fingerprint if embedding_folder is not None else None,
                     "annotations_sha256": proposal_folder.inputs["annotations"]["sha256"],
                     "split": train_set.split.to_json(),
                     "text": _text_identity(texts)},
        }
        if is_main(info):
            log.info("train-head (%s): %d images, %d cached rows, %d base categories, head %s -> %d; %d steps of "
                     "%d images on %d process(es), %s", losses, len(index), index.num_rows, len(base_names),
                     head_config.in_channels, head_config.embed_dim, iterations, batch_size, info.world_size,
                     info.device)

        seed_everything(seed, info.rank)
        head = ViLDHead(head_config).to(info.device)
        optimiser = _optimiser(head, optimizer, lr, momentum, weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_factor_schedule(hyper))
        order = StepOrder(index, batch_size, seed, block_images, buffer_blocks, info.rank, info.world_size)
        selection = RowSelection(use_text, use_image, image_rois, sample_rois, foreground_fraction, seed)
        text_matrix = texts.embeddings.to(info.device) if use_text else None

        with GracefulStop() as stop, run_folder_lock(run_dir, is_main(info)):
            # the CLIP file's name may change (a copy, a link): its sha256 and the texts' digest are compared
            step = resume_or_start(run_dir, config, head, optimiser, scheduler,
                                   resumable_changes=["data.text.clip.model", SPLIT_NAMING])
            first_step = step
            if is_main(info):
                keep_metrics_until(run_dir / METRICS_NAME, step)
            # The background embedding takes no gradient without ViLD-text; DDP must be told.
            ddp_head = wrap_ddp(head, info, find_unused_parameters=not use_text)
            ddp_head.train()
            loader = StepLoader(order, selection, ground_truth, first_step, iterations, workers)
            progress = tqdm(total=iterations, initial=step, desc=f"train-head {losses}", unit="step",
                            disable=None if is_main(info) else True)
            tick = time.perf_counter()
            for batch in loader:
                terms = _train_step(ddp_head, head, optimiser, batch, text_matrix, config, info.device)
                scheduler.step()
                step += 1
                now = time.perf_counter()
                record = _metrics_record(step, terms, optimiser, now - tick, batch_size)
                tick = now
                if is_main(info):
                    append_metrics(run_dir / METRICS_NAME, record)
                    progress.update(1)
                    progress.set_postfix({name: f"{record[name]:.3f}" for name in ("loss", "text", "image")
                                          if record.get(name) is not None})
                save_on_schedule_or_stop(stop, info.device, run_dir, step, iterations, checkpoint_every, config,
                                         head, optimiser, scheduler)
            progress.close()

        trained = step - first_step
        summary: dict[str, Any] = {"run_dir": os.fspath(run_dir), "losses": losses, "steps": step,
                                   "trained_steps": trained, "world_size": info.world_size}
        if not is_main(info):
            return summary
        head_file = run_dir / HEAD_NAME
        if trained or not head_file.is_file():
            save_head(head_file, head, _head_info(config, step, proposal_folder, embedding_folder, texts,
                                                  base_names, text, run_dir))
        seconds = time.perf_counter() - started
        summary.update(seconds=round(seconds, 1), head=os.fspath(head_file), **_last_losses(run_dir / METRICS_NAME))
        if trained:
            log.info("train-head: %d steps in %.0f s; wrote %s (final loss %s)", trained, seconds, head_file,
                     summary.get("loss"))
        else:
            log.info("train-head: %s already finished at step %d", run_dir, step)
        return summary
    finally:
        if owns_process_group:
            cleanup_distributed()


# --------------------------------------------------------------------------- inputs and their identities

def _check_settings(losses: str, hyper: dict[str, Any], image_rois: int, sample_rois: int | None,
                    foreground_fraction: float, checkpoint_every: int, workers: int) -> None:
    if losses not in LOSSES:
        raise VildError(f"--losses {losses}: use one of {', '.join(LOSSES)}")
    check_schedule(hyper)
    require_at_least("--image-rois", image_rois)
    require_at_least("--sample-rois", sample_rois)
    require_at_least("--checkpoint-every", checkpoint_every)
    require_at_least("--workers", workers, 0)
    require_between("--foreground-fraction", foreground_fraction, 0, 1, low_open=True)


def _open_caches(proposals, embeddings, use_image: bool) -> tuple[CacheFolder, CacheFolder | None]:
    if embeddings is None and use_image:
        raise VildError("the ViLD-image loss needs the embedding cache (cache-embeddings) of the proposal cache")
    return open_caches(proposals, embeddings)


def _feature_shape(proposals: CacheFolder) -> tuple[int, int]:
    channels, height, width = proposals.fields["features"].shape
    if height != width:
        raise DataError(f"{proposals.path}: features are {channels}x{height}x{width}; the head expects square RoIs")
    return channels, height


def _training_annotations(annotations, proposals: CacheFolder, split: str | None) -> CocoDataset:
    """The base boxes that label the RoIs: the annotation file the cache was made from, in its split."""
    dataset = annotations_of(proposals, annotations)
    cached = proposals.config.get("split")
    if split is None:
        if cached is None:
            raise VildError(f"{proposals.path}: the cache records no category split (made without GT rows?);"
                            " give --split, and use a training cache")
        return dataset.training_view(CategorySplit.from_json(cached))
    view = dataset.training_view(split)
    if cached is not None and CategorySplit.from_json(cached) != view.split:
        raise VildError(f"--split {split}: differs from the split the proposal cache {proposals.path} was made with"
                        f" ({cached.get('spec')}); leave --split out")
    return view


def _base_text_embeddings(text, clip, base_names: list[str], run_dir: Path, embeddings: CacheFolder | None,
                          info, required: bool) -> TextEmbeddings | None:
    """The base categories' text embeddings, rows in base-name order; checked against the image embeddings
    before RUN_DIR is made (a refused run leaves no folder), except the dimension of ones computed with --clip."""
    if text is not None and clip is not None:
        raise VildError("give either --text (an embed-text file) or --clip (to compute the text embeddings), not both")
    if text is None and clip is None:
        if required:
            raise VildError("the ViLD-text loss needs the base categories' text embeddings: give --text or --clip")
        return None
    if text is not None:
        texts = load_text_rows(text, base_names)
        check_text_clip(embeddings, os.fspath(text), texts.clip, texts.embed_dim)
        return texts
    check_text_clip(embeddings, f"--clip {clip}", clip_file_identity(clip))
    if is_main(info):
        make_run_dir(run_dir)
        embed_text(clip, base_names, out=run_dir / TEXT_NAME)
    barrier()
    texts = load_text_embeddings(run_dir / TEXT_NAME)
    check_text_clip(embeddings, os.fspath(run_dir / TEXT_NAME), texts.clip, texts.embed_dim)
    return texts


def _optimiser(head: ViLDHead, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def _embed_dim(embeddings: CacheFolder | None, texts: TextEmbeddings | None) -> int:
    return embedding_dim(embeddings) if embeddings is not None else texts.embed_dim


def _text_identity(texts: TextEmbeddings | None) -> dict[str, Any] | None:
    if texts is None:
        return None
    digest = hashlib.sha256(texts.embeddings.float().numpy().tobytes()).hexdigest()[:16]
    return {"names": texts.names, "clip": texts.clip, "sha256": digest}


def _ground_truth(train_set: CocoDataset, image_ids: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """image id -> (base non-crowd GT boxes, 0-based base class index) for every cached image."""
    base_ids = np.array(train_set.split.base_ids, dtype=np.int64)
    ground_truth = {}
    for image_id in image_ids.tolist():
        try:
            boxes, category_ids, crowd = train_set.annotations_for(image_id)
        except KeyError:
            raise DataError(f"{train_set.path}: has no image {image_id} of the proposal cache") from None
        ground_truth[image_id] = (boxes[~crowd], np.searchsorted(base_ids, category_ids[~crowd]))
    return ground_truth


# --------------------------------------------------------------------------- one step

def _train_step(ddp_head: torch.nn.Module, head: ViLDHead, optimizer: torch.optim.Optimizer, batch: StepBatch,
                texts: torch.Tensor | None, config: dict[str, Any], device: torch.device) -> dict[str, float]:
    """One step; each loss is a mean over the global batch's rows (sum here, divided by the global count,
    times the world size because DDP averages the ranks' gradients)."""
    features = batch.features.to(device, non_blocking=True)
    labels = batch.labels.to(device)
    image_mask = batch.image_mask.to(device)
    text_rows = labels != NO_LABEL
    # On the device: NCCL reduces only CUDA tensors, and a 1-D CPU tensor cannot divide CUDA ones.
    local = torch.tensor([float(text_rows.sum()), float(image_mask.sum()), float(len(labels))], device=device)
    totals = all_reduce_sum(local)
    counts, rows = totals[:2].clamp(min=1.0), int(totals[2])
    world = dist.get_world_size() if dist.is_initialized() else 1

    regions = ddp_head(features)
    sums = []
    if texts is not None:
        sums.append(vild_text_loss(regions[text_rows], head.background_embedding(), texts, labels[text_rows],
                                   config["temperature"], reduction="sum"))
    else:
        sums.append(regions.new_zeros(()))
    if batch.emb is not None:
        sums.append(vild_image_loss(regions[image_mask], batch.emb.to(device)[image_mask], reduction="sum"))
    else:
        sums.append(regions.new_zeros(()))
    text_loss, image_loss = sums[0] / counts[0], sums[1] / counts[1]
    total = (text_loss + config["image_weight"] * image_loss) * world
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if config["clip_grad_norm"]:
        torch.nn.utils.clip_grad_norm_(head.parameters(), config["clip_grad_norm"])
    optimizer.step()

    means = all_reduce_sum(torch.stack([sums[0].detach(), sums[1].detach()])) / counts
    terms = {"text": float(means[0]) if texts is not None else None,
             "image": float(means[1]) if batch.emb is not None else None,
             "text_rois": int(counts[0]) if texts is not None else 0,
             "image_rois": int(counts[1]) if batch.emb is not None else 0, "rois": rows}
    terms["loss"] = (terms["text"] or 0.0) + config["image_weight"] * (terms["image"] or 0.0)
    if not math.isfinite(terms["loss"]):
        raise VildError(f"train-head: loss is not finite at step {batch.step + 1} ({terms}); lower the learning rate")
    return terms


def _metrics_record(step: int, terms: dict[str, Any], optimizer: torch.optim.Optimizer, seconds: float,
                    global_batch: int) -> dict[str, Any]:
    rois = terms["rois"]
    return {"step": step, "loss": terms["loss"], "text": terms["text"], "image": terms["image"],
            "lr": optimizer.param_groups[0]["lr"], "step_s": round(seconds, 4),
            "images_per_s": round(global_batch / seconds, 2) if seconds > 0 else None,
            "rois": rois, "text_rois": terms["text_rois"], "image_rois": terms["image_rois"],
            "rois_per_s": round(rois / seconds, 1) if seconds > 0 else None}


def _last_losses(path: Path, last: int = 20) -> dict[str, Any]:
    """Mean loss terms over the last `last` logged steps (the summary's view of where training ended)."""
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines()[-last:]]
    result = {}
    for name in ("loss", "text", "image"):
        values = [r[name] for r in records if r.get(name) is not None]
        if values:
            result[name] = round(float(np.mean(values)), 4)
    return result


def _head_info(config: dict[str, Any], step: int, proposals: CacheFolder, embeddings: CacheFolder | None,
               texts: TextEmbeddings | None, base_names: list[str], text, run_dir: Path) -> dict[str, Any]:
    clip = texts.clip if texts is not None else clip_identity(embeddings)
    return {
        "losses": config["losses"], "clip": clip, "embed_dim": config["head"]["embed_dim"], "step": step,
        "proposals": {"path": os.fspath(proposals.path), "fingerprint": proposals.fingerprint},
        "proposal_nms": proposals.config.get("nms_threshold"),   # detect's default for this head
        # The features' source, by content: detect and evaluate refuse a head with another detector's features.
        "detector": proposals.inputs.get("detector"),
        "embeddings": ({"path": os.fspath(embeddings.path), "fingerprint": embeddings.fingerprint}
                       if embeddings is not None else None),
        "text": ({"path": os.fspath(text) if text is not None else os.fspath(run_dir / TEXT_NAME),
                  **_text_identity(texts)} if texts is not None else None),
        "base_names": base_names, "temperature": config["temperature"], "config": config,
    }
