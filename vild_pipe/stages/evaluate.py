"""vild-pipe evaluate: box AP of every ViLD variant on the validation caches, base and novel apart.

Reads the val proposal cache (boxes + RoIAlign features), its embedding cache (the teacher's 1x+1.5x crop
embedding `emb` of every box) and the annotation file they were made from, and scores every box against the
text embeddings of ALL the file's categories, base and novel (DESIGN.md §2, §4):

- CLIP-on-crops: the teacher alone, softmax over the categories of cos(crop embedding, text) / τ;
- ViLD-text, ViLD-image, ViLD: the heads trained with losses text, image and text+image; softmax over
  [the head's background, categories] of cos(head(features), ·) / τ, background dropped;
- ViLD-ensemble: one head's probabilities (the ViLD head's by default) and the CLIP-on-crops ones combined
  geometrically, text-heavy on base and image-heavy on novel categories (`ensemble_probabilities`).

Each mode's detections (per-class NMS at IoU 0.5, at most 300 per image, score threshold 0: AP needs the
tail) go to OUT/results-<mode>.json, a COCO results file, and are scored by pycocotools' COCOeval on the
very records written (`evaluation.evaluate_coco`), so the printed numbers are what COCOeval gives on the file.
OUT/metrics.json holds every number per mode with the inputs that made them; OUT/metrics.md the table.

The caches are read once for all modes, one image at a time (a shard's features are never all in memory);
the detections are kept as arrays (`evaluation.Detections`) and become COCO records only a part at a time (a
slice of the results file, one COCOeval run's categories), which bounds the memory of COCO- and LVIS-sized
runs. Ground-truth rows (`is_gt`, only in training caches) are never scored.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from vild_pipe.data.coco import CocoDataset
from vild_pipe.data.splits import CategorySplit, normalised_name
from vild_pipe.errors import DataError, VildError, require_at_least, require_between
from vild_pipe.pipeline.detector import check_head_detector
from vild_pipe.pipeline.distributed import pick_device, use_threads
from vild_pipe.pipeline.embedding_cache import (
    ENSEMBLE_FIELD, annotation_json_of, check_same_rows, check_text_clip, open_caches, training_detector,
    training_proposal_nms,
)
from vild_pipe.pipeline.evaluation import (
    PROTOCOLS, Detections, evaluate_coco, federated_ground_truth, load_ground_truth, metrics_table, resolve_protocol,
    workers_for,
)
from vild_pipe.pipeline.head import TEMPERATURE, ViLDHead, load_head, resolve_head_file
from vild_pipe.pipeline.scoring import (
    BASE_TEXT_WEIGHT, MAX_DETECTIONS, NMS_IOU_THRESHOLD, NOVEL_TEXT_WEIGHT, crop_probabilities, detections_from_scores,
    ensemble_probabilities, head_probabilities,
)
from vild_pipe.pipeline.shards import (
    CacheFolder, make_output_folder, write_bytes_atomically, write_json_atomically, write_text_atomically,
)
from vild_pipe.pipeline.text_embeddings import (
    TextEmbeddings, describe_clip, embed_text, load_text_rows, reusable_text_embeddings, same_clip,
)

log = logging.getLogger(__name__)

CLIP_ON_CROPS = "CLIP-on-crops"
ENSEMBLE = "ViLD-ensemble"
HEAD_MODES = {"ViLD-text": "text", "ViLD-image": "image", "ViLD": "text+image"}
"""Each head mode and the losses its head is expected to have been trained with."""
HEAD_OPTIONS = {"ViLD-text": "--head-text", "ViLD-image": "--head-image", "ViLD": "--head-vild"}
MODES = (CLIP_ON_CROPS, *HEAD_MODES, ENSEMBLE)
TEXT_NAME = "text_all.pt"
METRICS_NAME = "metrics.json"
TABLE_NAME = "metrics.md"


def results_name(mode: str) -> str:
    return f"results-{mode}.json"


@dataclass
class _LoadedHead:
    head: ViLDHead
    info: dict[str, Any]
    file: Path

    @property
    def temperature(self) -> float:
        return float(self.info.get("temperature", TEMPERATURE))


def run(proposals: str | os.PathLike, embeddings: str | os.PathLike | None, annotations: str | os.PathLike,
        out: str | os.PathLike, heads: Mapping[str, str | os.PathLike | None] | None = None, clip: str | None = None,
        text: str | os.PathLike | None = None, modes: Sequence[str] | None = None,
        split: str | CategorySplit = "auto",
        ensemble_head: str = "ViLD", base_text_weight: float = BASE_TEXT_WEIGHT,
        novel_text_weight: float = NOVEL_TEXT_WEIGHT, max_detections: int = MAX_DETECTIONS,
        nms_threshold: float = NMS_IOU_THRESHOLD, protocol: str = "auto", max_dets: int | None = None,
        workers: int = 0, device: str = "auto", threads: int = 0) -> dict[str, dict[str, Any]]:
    """Score the val caches in every mode whose inputs are given; write OUT/results-<mode>.json,
    OUT/metrics.json and OUT/metrics.md; return {mode: metrics} (see `evaluation.evaluate_coco`).

    `heads` maps "ViLD-text", "ViLD-image", "ViLD" to a train-head run folder or head file; `embeddings`
    (the embedding cache of `proposals`) feeds CLIP-on-crops and the ensemble, which combines it with the
    head of mode `ensemble_head`. Text embeddings of every category of `annotations` come from `text` (an
    embed-text file holding them all) or are computed with `clip` into OUT/text_all.pt. `modes` picks modes
    (default: all, a mode whose inputs are missing skipped with one log line; a mode named here without its
    inputs is refused). `split` is the base/novel split of `annotations` (a data.splits spec or a
    CategorySplit); categories outside it are
    neither classified nor evaluated. `protocol` and `max_dets` are `evaluation.evaluate_coco`'s (LVIS'
    federated protocol for LVIS files, COCO's otherwise); `max_detections` the detections kept per image.
    `workers`: processes for COCOeval (0: by the evaluation's size, `evaluation.workers_for`).
    """
    started = time.monotonic()
    use_threads(threads)
    heads = {mode: path for mode, path in (heads or {}).items() if path is not None}
    wanted = _check_options(modes, heads, ensemble_head, base_text_weight, novel_text_weight, max_detections,
                            nms_threshold, protocol, max_dets, workers)
    torch_device = pick_device(device)
    out = Path(out)

    proposal_folder, embedding_folder = open_caches(proposals, embeddings)
    parsed_json = annotation_json_of(proposal_folder, annotations)   # parsed once, for the dataset and COCOeval
    dataset = CocoDataset.load(annotations, parsed_json=parsed_json)
    category_split = _category_split(dataset, split, heads)
    ground_truth = load_ground_truth(parsed_json)
    del parsed_json
    protocol = resolve_protocol(ground_truth, protocol, os.fspath(annotations))
    if protocol == "lvis":
        ground_truth = federated_ground_truth(ground_truth)    # once for every mode
    active = _active_modes(wanted, heads, embedding_folder is not None, ensemble_head, named=modes is not None)

    texts, unsaved = _text_embeddings(text, clip, dataset.category_names, out, torch_device)
    loaded = _load_heads(heads, active, ensemble_head, texts, proposal_folder, category_split, dataset, torch_device)
    if embedding_folder is not None and any(mode in active for mode in (CLIP_ON_CROPS, ENSEMBLE)):
        check_text_clip(embedding_folder, os.fspath(text) if text is not None else f"--clip {clip}", texts.clip,
                        texts.embed_dim)
        for index in range(proposal_folder.num_shards):
            with proposal_folder.read_shard(index) as boxes, embedding_folder.read_shard(index) as crops:
                check_same_rows(boxes, crops)
    make_output_folder(out)
    if unsaved:
        texts.save(out / TEXT_NAME)
        log.info("wrote the text embeddings of %d categories to %s", len(texts.names), out / TEXT_NAME)
    log.info("evaluate: %s on %s (%d categories: %d base, %d novel), on %s, %s protocol", ", ".join(active),
             proposal_folder.path, len(dataset.categories), len(category_split.base_ids),
             len(category_split.novel_ids), torch_device, "LVIS' federated" if protocol == "lvis" else "COCO's")

    category_ids = _classified_categories(dataset, category_split)
    classifier = texts.embeddings[dataset.category_indices(np.array(category_ids))].to(torch_device)
    scorer = _Scorer(active, loaded, classifier, category_split.novel_mask(category_ids), ensemble_head,
                     base_text_weight, novel_text_weight, max_detections, nms_threshold)
    detections, image_ids = _score_caches(proposal_folder, embedding_folder, scorer, torch_device)
    missing = sorted({record.id for record in dataset.images} - set(image_ids))
    if missing:
        log.warning("%s: %d of its images are not in the proposal cache (skipped when it was made?): they are"
                    " left out of the evaluation", os.fspath(annotations), len(missing))

    workers = workers_for(len(image_ids), len(category_ids), workers)
    log.info("COCOeval in %s", f"{workers} processes" if workers > 1 else "this process")
    results: dict[str, dict[str, Any]] = {}
    for mode in active:
        found = Detections.of_images(detections[mode], category_ids)
        detections[mode] = []
        write_bytes_atomically(out / results_name(mode), found.json_chunks())
        log.info("%s: %d detections -> %s", mode, len(found), out / results_name(mode))
        results[mode] = evaluate_coco(ground_truth, found, category_split.base_ids, category_split.novel_ids,
                                      image_ids=image_ids, max_dets=max_dets, protocol=protocol, workers=workers,
                                      progress=f"COCOeval {mode}")

    earlier = sorted(path.name for path in out.glob(results_name("*")) if path.name not in map(results_name, active))
    if earlier:
        log.warning("%s also holds %s of an earlier run: %s and %s cover this run's modes only", out,
                    ", ".join(earlier), METRICS_NAME, TABLE_NAME)
    table = metrics_table(results)
    document = {
        "annotations": {"path": os.fspath(annotations), "sha256": proposal_folder.inputs["annotations"]["sha256"]},
        "split": category_split.to_json(),
        "proposals": {"path": os.fspath(proposal_folder.path), "fingerprint": proposal_folder.fingerprint},
        "embeddings": ({"path": os.fspath(embedding_folder.path), "fingerprint": embedding_folder.fingerprint}
                       if embedding_folder is not None else None),
        "text": {"names": texts.names, "clip": texts.clip},
        "heads": {mode: {"path": os.fspath(head.file), "losses": head.info.get("losses"),
                         "step": head.info.get("step")} for mode, head in loaded.items()},
        "settings": {"ensemble_head": ensemble_head, "base_text_weight": base_text_weight,
                     "novel_text_weight": novel_text_weight, "max_detections": max_detections,
                     "nms_threshold": nms_threshold, "protocol": protocol, "max_dets": max_dets},
        "images_not_in_cache": missing,
        "seconds": round(time.monotonic() - started, 1),
        "modes": results,
    }
    write_json_atomically(out / METRICS_NAME, document, indent=1)
    write_text_atomically(out / TABLE_NAME, table)
    log.info("evaluate: %d images, %d modes in %.0f s -> %s and %s", len(image_ids), len(results), document["seconds"],
             out / METRICS_NAME, out / TABLE_NAME)
    return results


# --------------------------------------------------------------------------- inputs and their identities

def _check_options(modes, heads, ensemble_head, base_text_weight, novel_text_weight, max_detections, nms_threshold,
                   protocol, max_dets, workers) -> list[str]:
    """The modes asked for, in table order; VildError for unknown modes, head keys or bad numbers."""
    wanted = list(MODES) if modes is None else list(dict.fromkeys(modes))
    unknown = [mode for mode in wanted if mode not in MODES]
    if unknown or not wanted:
        raise VildError(f"unknown evaluation mode {unknown[0] if unknown else '(none)'}: use {', '.join(MODES)}")
    unknown_heads = [mode for mode in heads if mode not in HEAD_MODES]
    if unknown_heads:
        raise VildError(f"a head for {unknown_heads[0]!r}: heads are given for {', '.join(HEAD_MODES)}")
    if ensemble_head not in HEAD_MODES:
        raise VildError(f"--ensemble-head {ensemble_head}: use one of {', '.join(HEAD_MODES)}")
    require_between("--base-text-weight", base_text_weight, 0, 1)
    require_between("--novel-text-weight", novel_text_weight, 0, 1)
    if protocol not in PROTOCOLS:
        raise VildError(f"--protocol {protocol}: use one of {', '.join(PROTOCOLS)}")
    require_at_least("--max-detections", max_detections)
    require_at_least("max_dets", max_dets)
    require_between("--nms-threshold", nms_threshold, 0, 1, low_open=True)
    require_at_least("--workers", workers, 0)
    return [mode for mode in MODES if mode in wanted]


def _active_modes(wanted: list[str], heads: Mapping[str, Any], have_embeddings: bool, ensemble_head: str,
                  named: bool) -> list[str]:
    """The wanted modes whose inputs are there. By default a mode without its inputs is skipped with one info
    line; a mode the user `named` (--mode) without them is refused."""
    embeddings = [] if have_embeddings else ["the embedding cache (--embeddings)"]
    needs = {CLIP_ON_CROPS: embeddings,
             ENSEMBLE: embeddings + ([] if ensemble_head in heads else [_head_needed(ensemble_head)])}
    for mode in HEAD_MODES:
        needs[mode] = [] if mode in heads else [_head_needed(mode)]
    missing = {mode: " and ".join(needs[mode]) for mode in wanted if needs[mode]}
    if named and missing:
        mode = next(iter(missing))
        raise VildError(f"--mode {mode} needs {missing[mode]}")
    for mode, what in missing.items():
        log.info("%s: skipped (needs %s)", mode, what)
    active = [mode for mode in wanted if mode not in missing]
    if not active:
        raise VildError("nothing to evaluate: give the embedding cache (--embeddings: CLIP-on-crops), a head"
                        " (--head-text, --head-image, --head-vild), or both (ViLD-ensemble)")
    return active


def _head_needed(mode: str) -> str:
    return f"a {mode} head ({HEAD_OPTIONS[mode]})"


def _classified_categories(dataset: CocoDataset, category_split: CategorySplit) -> list[int]:
    """The categories boxes are classified among: base and novel, in id order. A split that leaves some out
    (COCO's 48/17 leaves 15) leaves them out of the classifier too, as the protocol's evaluation does."""
    category_ids = sorted(category_split.base_ids + category_split.novel_ids)
    if len(category_ids) < len(dataset.categories):
        log.info("%d categories of %s are outside split %r: neither classified nor evaluated",
                 len(dataset.categories) - len(category_ids), os.fspath(dataset.path), category_split.spec)
    return category_ids


def _text_embeddings(text, clip: str | None, names: list[str], out: Path, device: torch.device
                     ) -> tuple[TextEmbeddings, bool]:
    """Text embeddings of every category, rows in the annotation file's category (id) order, and whether they
    are still to be written to OUT (after every check: a refused run leaves no output folder behind)."""
    if text is not None and clip is not None:
        raise VildError("give either --text (an embed-text file) or --clip (to compute the text embeddings), not both")
    if text is None and clip is None:
        raise VildError("the categories' text embeddings are needed: give --clip (the CLIP model) or --text")
    if text is not None:
        return load_text_rows(text, names), False
    reused = reusable_text_embeddings(out / TEXT_NAME, clip, names)
    if reused is not None:
        log.info("text embeddings of %d categories reused from %s", len(names), out / TEXT_NAME)
        return reused, False
    return embed_text(clip, names, device=str(device)), True


def _category_split(dataset: CocoDataset, split: str | CategorySplit, heads: Mapping[str, Any]) -> CategorySplit:
    """The file's base/novel split. Where `auto` finds none in the file itself (no 'split' fields, neither
    COCO's nor LVIS' categories), the categories a given head was trained on are base and the others novel:
    the head knows which categories it saw boxes of."""
    try:
        return dataset.resolve_split(split)
    except DataError as err:
        if split != "auto" or not heads or any(c.split is not None for c in dataset.categories):
            raise   # a split the file gives, wrongly, is the user's to mend
        not_in_file = err
    file = resolve_head_file(heads[next(mode for mode in HEAD_MODES if mode in heads)])
    base_names = {normalised_name(name) for name in load_head(file)[1].get("base_names") or []}
    base = tuple(c.id for c in dataset.categories if normalised_name(c.name) in base_names)
    if not base:
        raise not_in_file
    novel = tuple(c.id for c in dataset.categories if c.id not in base)
    log.info("split: the %d categories head %s was trained on are base, the other %d novel (the file names no"
             " split)", len(base), file, len(novel))
    return CategorySplit(base_ids=base, novel_ids=novel, spec=f"base: the categories of {file}")


def _load_heads(heads: Mapping[str, Any], active: list[str], ensemble_head: str, texts: TextEmbeddings,
                proposals: CacheFolder, category_split: CategorySplit, dataset: CocoDataset,
                device: torch.device) -> dict[str, _LoadedHead]:
    """Each needed head, loaded once per file and checked against the text embeddings and the features."""
    needed = {mode for mode in active if mode in HEAD_MODES}
    if ENSEMBLE in active:
        needed.add(ensemble_head)
    by_file: dict[Path, _LoadedHead] = {}
    loaded = {}
    for mode in (mode for mode in HEAD_MODES if mode in needed):
        file = resolve_head_file(heads[mode])
        if file not in by_file:
            head, info = load_head(file, device)
            by_file[file] = _LoadedHead(head, info, file)
            _check_head(by_file[file], texts, proposals)
            _warn_of_other_proposals(by_file[file], proposals)
        loaded[mode] = by_file[file]
        losses = loaded[mode].info.get("losses")
        if losses != HEAD_MODES[mode]:
            log.warning("%s: the %s head was trained with losses %r, not %r", file, mode, losses, HEAD_MODES[mode])
        base_names = loaded[mode].info.get("base_names")
        here = category_split.base_names(dataset.categories)
        if base_names is not None and sorted(map(normalised_name, base_names)) != sorted(map(normalised_name, here)):
            log.warning("%s: the head's base categories differ from the base categories of split %r here",
                        file, category_split.spec)
    return loaded


def _check_head(loaded: _LoadedHead, texts: TextEmbeddings, proposals: CacheFolder) -> None:
    """DataError for a head of another CLIP model or embedding size, or trained on other features."""
    info, config, file = loaded.info, loaded.head.config, loaded.file
    head_clip = info.get("clip") or {}
    if not same_clip(head_clip, texts.clip) or config.embed_dim != texts.embed_dim:
        trained = describe_clip({**head_clip, "embed_dim": config.embed_dim})
        raise DataError(f"{file}: head was trained against CLIP {trained}, the text embeddings are of"
                        f" {describe_clip(texts.clip)}; use one model")
    channels, height, width = proposals.fields["features"].shape
    if (config.in_channels, config.resolution, config.resolution) != (channels, height, width):
        raise DataError(f"{file}: head takes {config.in_channels}x{config.resolution}x{config.resolution} RoI features,"
                        f" the proposal cache {proposals.path} holds {channels}x{height}x{width}; use the detector"
                        " the head was trained on")
    _check_same_detector(loaded, proposals)


def _warn_of_other_proposals(loaded: _LoadedHead, proposals: CacheFolder) -> None:
    """A warning when the val proposals were made with another class-agnostic NMS than the head's training
    ones (a cache resumed at an old default beside a new one, say): the head then scores boxes of a kind it
    was not trained on."""
    here = proposals.config.get("nms_threshold")
    trained = training_proposal_nms(loaded.info)
    if here is not None and not math.isclose(here, trained):
        log.warning("%s: the head was trained on proposals made with class-agnostic NMS %g, the proposal cache %s"
                    " was made with %g; dump-proposals --nms-threshold %g makes them alike", loaded.file, trained,
                    proposals.path, here, trained)


def _check_same_detector(loaded: _LoadedHead, proposals: CacheFolder) -> None:
    """DataError when the head was trained on features of another detector than the one `proposals` came from
    (they mean nothing to the head). The head records that detector's sha256; a head written before it did is
    checked through its training cache when that is still where it was, else not at all."""
    check_head_detector(loaded.file, training_detector(loaded.info),
                        proposals.inputs.get("detector") or {}, f"the proposal cache {proposals.path} comes from",
                        "dump proposals with the head's detector, or use a head trained on this detector's proposals")


# --------------------------------------------------------------------------- scoring

class _Scorer:
    """One image's cached rows -> each active mode's detections (boxes, scores, class index), on `device`."""

    def __init__(self, active: list[str], heads: dict[str, _LoadedHead], texts: torch.Tensor, is_novel: np.ndarray,
                 ensemble_head: str, base_text_weight: float, novel_text_weight: float, max_detections: int,
                 nms_threshold: float):
        self.active = active
        self.heads = heads
        self.texts = texts
        self.is_novel = is_novel
        self.ensemble_head = ensemble_head
        self.weights = (base_text_weight, novel_text_weight)
        self.max_detections = max_detections
        self.nms_threshold = nms_threshold
        self.needs_features = any(mode in HEAD_MODES or mode == ENSEMBLE for mode in active)
        self.needs_crops = any(mode in (CLIP_ON_CROPS, ENSEMBLE) for mode in active)

    @torch.no_grad()
    def __call__(self, boxes: torch.Tensor, features: torch.Tensor | None, crops: torch.Tensor | None
                 ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        head_probs: dict[Path, torch.Tensor] = {}

        def probabilities_of(mode: str) -> torch.Tensor:
            loaded = self.heads[mode]
            if loaded.file not in head_probs:
                regions = loaded.head(features)
                head_probs[loaded.file] = head_probabilities(regions, self.texts, loaded.head.background_embedding(),
                                                             loaded.temperature)
            return head_probs[loaded.file]

        crop_probs = crop_probabilities(crops, self.texts) if crops is not None else None
        detections = {}
        for mode in self.active:
            if mode == CLIP_ON_CROPS:
                probs = crop_probs
            elif mode == ENSEMBLE:
                probs = ensemble_probabilities(probabilities_of(self.ensemble_head), crop_probs, self.is_novel,
                                               *self.weights)
            else:
                probs = probabilities_of(mode)
            kept_boxes, scores, classes = detections_from_scores(boxes, probs, self.nms_threshold, self.max_detections)
            detections[mode] = (kept_boxes.cpu().numpy(), scores.cpu().numpy(), classes.cpu().numpy())
        return detections


def _score_caches(proposals: CacheFolder, embeddings: CacheFolder | None, scorer: _Scorer, device: torch.device
                  ) -> tuple[dict[str, list], list[int]]:
    """One pass over the caches: per mode a list of (image_id, boxes, scores, class_index); the image ids seen."""
    detections: dict[str, list] = {mode: [] for mode in scorer.active}
    image_ids: list[int] = []
    names = ["boxes", "is_gt"] + (["features"] if scorer.needs_features else [])
    total = sum(proposals.read_marker(i)["images"] for i in range(proposals.num_shards))
    gt_rows = 0
    with tqdm(total=total, desc="evaluate", unit="img", disable=None) as progress:
        for index in range(proposals.num_shards):
            with proposals.read_shard(index) as reader:
                crop_reader = embeddings.read_shard(index) if embeddings is not None and scorer.needs_crops else None
                try:
                    for position, image_id in enumerate(reader.image_ids.tolist()):
                        rows = reader.image_rows(position, names)
                        keep = ~rows["is_gt"].astype(bool)
                        gt_rows += int((~keep).sum())
                        image_ids.append(int(image_id))
                        progress.update(1)
                        if not keep.any():
                            continue
                        boxes = torch.from_numpy(rows["boxes"][keep]).to(device)
                        features = (torch.from_numpy(rows["features"][keep]).to(device)
                                    if scorer.needs_features else None)
                        crops = (torch.from_numpy(crop_reader.image_rows(position, [ENSEMBLE_FIELD])[ENSEMBLE_FIELD]
                                                  [keep]).to(device) if crop_reader is not None else None)
                        for mode, (kept_boxes, scores, classes) in scorer(boxes, features, crops).items():
                            detections[mode].append((int(image_id), kept_boxes, scores, classes))
                finally:
                    if crop_reader is not None:
                        crop_reader.close()
    if gt_rows:
        log.warning("%s: left out %d ground-truth rows (is_gt): a training cache? evaluate a val cache",
                    proposals.path, gt_rows)
    return detections, image_ids
