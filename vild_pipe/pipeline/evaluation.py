"""COCO/LVIS-style box metrics of detections, with pycocotools' COCOeval (no torch here: see `scoring`).

Detections are held as columns (`Detections`) and become COCO results records only a part at a time.

Metrics: pycocotools' COCOeval (bbox), run over the evaluated categories (100 at a time); every reported
number is a mean of `eval['precision']` entries that are not -1, exactly as `COCOeval.summarize` and LVIS'
`_summarize` take them, so categories without ground truth in the evaluated images drop out of every mean.
Numbers are fractions in [0, 1]; None where a group has no category with ground truth. LVIS files are
evaluated federated, as lvis-api's LVISEval does, by handing COCOeval what that protocol counts
(`FederatedGroundTruth`).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from joblib import Parallel, delayed
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params
from tqdm import tqdm

from vild_pipe.errors import DataError, VildError, describe_error

log = logging.getLogger(__name__)

COCO_MAX_DETS = 100
"""COCOeval's standard detections-per-image for AP (its `maxDets[-1]`); see `evaluate_coco`."""
LVIS_MAX_DETS = 300
"""LVIS' cap: an image's 300 highest-scoring detections over all categories (lvis-api's LVISResults)."""
PROTOCOLS = ("auto", "coco", "lvis")
CATEGORIES_PER_RUN = 100
"""COCOeval runs on this many categories at a time: its per (image, category) records for all 1203 LVIS
categories on LVIS val would take 25-30 GiB; a category's precision does not depend on the others."""
PAIRS_PER_WORKER = 50_000
"""(image, category) pairs worth a COCOeval worker process (`workers_for`): at about 0.1 ms a pair (COCO val
shape, 300 detections an image) that is 5 s of work, against 0.3 s to start a worker and hand it its boxes."""
MAX_WORKERS = 8
BYTES_PER_PAIR = 1200
"""COCOeval's memory per (image, category) pair of a run: 0.33 GiB for 3,000 LVIS-shaped images x 100 categories
(bench/RESULTS.md), about 2.2 GiB for LVIS val's 19,809; workers each hold a run's worth at once."""

LVIS_FREQUENCIES = ("r", "c", "f")

METRIC_LABELS: dict[str, str] = {
    "AP50_novel": "novel AP50",
    "AP50_base": "base AP50",
    "AP50": "AP50",
    "AP": "AP",
    "AP_novel": "novel AP",
    "AP_base": "base AP",
    "AP_r": "AP_r",
    "AP_c": "AP_c",
    "AP_f": "AP_f",
}
"""Headline metrics in table order, with their column headings."""


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """(N, 4) [x1, y1, x2, y2] -> COCO [x, y, width, height]."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def _numpy(values: Any) -> np.ndarray:
    """`values` (an array, a sequence, or a torch tensor on any device) as a numpy array, without importing torch."""
    return np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)


@dataclass
class Detections:
    """Detections as the columns of a COCO results file. A detection takes 56 bytes here and about 450 as a
    results record (a Python dict): 0.3 vs 2.6 GiB for one mode on LVIS val (5.9M detections). Records are
    made only for what needs them, a part at a time: a slice of the JSON file, one COCOeval run's categories."""

    image_ids: np.ndarray      # (n,) int64
    category_ids: np.ndarray   # (n,) int64
    boxes: np.ndarray          # (n, 4) float64 COCO [x, y, width, height]
    scores: np.ndarray         # (n,) float64

    @classmethod
    def of_images(cls, per_image: Iterable[tuple[int, Any, Any, Any]], category_ids: Sequence[int]) -> Detections:
        """From (image_id, xyxy boxes, scores, class indices) per image; `category_ids[i]` is class index i's id.
        Boxes are rounded to 1/100 pixel (no effect on IoU worth measuring, a third off the file size)."""
        ids = np.asarray(category_ids, dtype=np.int64)
        columns: tuple[list, list, list, list] = ([np.zeros(0, np.int64)], [np.zeros(0, np.int64)],
                                                  [np.zeros((0, 4))], [np.zeros(0)])
        for image_id, boxes, scores, classes in per_image:
            scores = _numpy(scores).astype(np.float64)
            columns[0].append(np.full(len(scores), int(image_id), dtype=np.int64))
            columns[1].append(ids[_numpy(classes).astype(np.int64)])
            columns[2].append(np.round(xyxy_to_xywh(_numpy(boxes)), 2))
            columns[3].append(scores)
        return cls(*(np.concatenate(column) for column in columns))

    @classmethod
    def of_records(cls, records: Sequence[Mapping[str, Any]]) -> Detections:
        """From COCO results records (e.g. a results file read back)."""
        return cls(np.array([r["image_id"] for r in records], dtype=np.int64),
                   np.array([r["category_id"] for r in records], dtype=np.int64),
                   np.array([r["bbox"] for r in records], dtype=np.float64).reshape(-1, 4),
                   np.array([r["score"] for r in records], dtype=np.float64))

    def __len__(self) -> int:
        return len(self.scores)

    def rows(self, rows: slice | np.ndarray) -> Detections:
        """The detections of `rows` (a slice, indices or a boolean mask)."""
        return Detections(self.image_ids[rows], self.category_ids[rows], self.boxes[rows], self.scores[rows])

    def of_categories(self, category_ids: Sequence[int]) -> Detections:
        return self.rows(np.isin(self.category_ids, category_ids))

    def records(self, rows: slice | np.ndarray = slice(None)) -> list[dict]:
        """COCO results records {image_id, category_id, bbox, score} of `rows`, as plain Python numbers."""
        return [{"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}
                for image_id, category_id, box, score in zip(self.image_ids[rows].tolist(),
                                                             self.category_ids[rows].tolist(),
                                                             self.boxes[rows].tolist(), self.scores[rows].tolist())]

    def json_chunks(self, records_per_chunk: int = 100_000) -> Iterator[bytes]:
        """`json.dumps(self.records())` encoded, in pieces, never holding more than a piece's records."""
        yield b"["
        for start in range(0, len(self), records_per_chunk):
            text = json.dumps(self.records(slice(start, start + records_per_chunk)))[1:-1]
            yield (", " + text if start else text).encode()
        yield b"]"


# ---------------------------------------------------------------------------------------------- metrics


def _quiet(verbose: bool):
    """pycocotools prints progress on stdout; swallow it unless asked for."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())


def load_ground_truth(gt: str | os.PathLike | Mapping | COCO, verbose: bool = False) -> COCO:
    """A pycocotools COCO over `gt` (annotation file, parsed JSON, or COCO), with `area` and `iscrowd` filled
    in where annotations lack them (COCOeval needs both; files written by hand or by tools often omit them).

    A COCO passed in is used as is when complete, else copied; the caller's data is never changed.
    """
    if isinstance(gt, COCO):
        dataset = gt.dataset
    elif isinstance(gt, Mapping):
        dataset = gt
    else:
        where = os.fspath(gt)
        try:
            with open(where, encoding="utf-8") as f:
                dataset = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{where}: cannot read ground-truth annotation file ({describe_error(exc)})") from exc
    annotations = dataset.get("annotations", [])
    complete = all("area" in ann and "iscrowd" in ann for ann in annotations)
    if isinstance(gt, COCO) and complete:
        return gt
    dataset = dict(dataset, annotations=[_with_area(ann) for ann in annotations])
    coco = COCO()
    coco.dataset = dataset
    with _quiet(verbose):
        coco.createIndex()
    return coco


def _with_area(ann: dict) -> dict:
    if "area" in ann and "iscrowd" in ann:
        return ann
    ann = dict(ann)
    ann.setdefault("iscrowd", 0)
    ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
    return ann


def _load_results(gt: COCO, records: list[dict], verbose: bool = False) -> COCO:
    """pycocotools results object over `records` (loadRes writes into them: pass records made for it); an empty
    list gives a results object with no detections (loadRes itself fails on one)."""
    if not records:
        detections = COCO()
        detections.dataset = {"images": list(gt.dataset["images"]),
                              "categories": copy.deepcopy(gt.dataset["categories"]), "annotations": []}
        with _quiet(verbose):
            detections.createIndex()
        return detections
    with _quiet(verbose):
        return gt.loadRes(records)


@dataclass
class Precision:
    """COCOeval's accumulated precision for the area range "all" at the last maxDets: (T IoU thresholds,
    R recall points, K categories), -1 where a category has no ground truth; and what its axes are."""

    values: np.ndarray
    category_ids: list[int]
    image_ids: list[int]
    iou_thresholds: np.ndarray


def run_cocoeval(gt: COCO, results: Detections, category_ids: Sequence[int],
                 image_ids: Sequence[int] | None = None, max_dets: int = COCO_MAX_DETS,
                 categories_per_run: int = CATEGORIES_PER_RUN, workers: int = 1, verbose: bool = False,
                 progress: str | None = None) -> Precision:
    """COCOeval (bbox) over `category_ids`, evaluated and accumulated, for the area range "all" only.

    The small/medium/large ranges are not reported and would cost three quarters of the run time (COCOeval
    matches every image x category x area); "all" gives the same numbers as a default COCOeval's. COCOeval
    runs on at most `categories_per_run` categories at a time, each run on those categories' results only; a
    category's precision is the same either way (it is computed from that category's matches alone).
    `workers` > 1: the runs go to that many processes, at least two runs a worker, each process handed only
    its run's boxes (COCOeval is pure Python, one core a run). Every detection must be on an image of `gt`
    (`evaluate_coco` checks). `progress`: a progress bar's label, counting categories (LVIS takes minutes).
    """
    category_ids = sorted(int(c) for c in category_ids)
    image_ids = sorted({int(i) for i in image_ids} if image_ids is not None else gt.getImgIds())
    runs = _category_runs(category_ids, categories_per_run, workers)
    if workers > 1 and len(runs) > 1:
        parts = Parallel(n_jobs=min(workers, len(runs)), return_as="generator")(
            delayed(_precision_of_run)(_ground_truth_of(gt, chosen), results.of_categories(chosen), chosen,
                                       image_ids, max_dets, verbose) for chosen in runs)
    else:
        parts = (_precision_of_run(gt, results.of_categories(chosen), chosen, image_ids, max_dets, verbose)
                 for chosen in runs)
    with tqdm(total=len(category_ids), desc=progress, unit="category", disable=None if progress else True) as bar:
        done = []
        for chosen, part in zip(runs, parts):
            done.append(part)
            bar.update(len(chosen))
    return Precision(np.concatenate(done, axis=2), category_ids, image_ids, np.asarray(Params("bbox").iouThrs))


def workers_for(num_images: int, num_categories: int, requested: int = 0) -> int:
    """COCOeval processes for `run_cocoeval`: `requested` if > 0, else one per PAIRS_PER_WORKER (image,
    category) pairs, at most one per CPU of this process, MAX_WORKERS, and as many as half the memory now
    available holds at BYTES_PER_PAIR for a run of up to CATEGORIES_PER_RUN categories (small runs stay here)."""
    if requested > 0:
        return requested
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_worker = BYTES_PER_PAIR * num_images * min(num_categories, CATEGORIES_PER_RUN)
    available = _available_memory()
    fit = available // 2 // max(1, per_worker) if available is not None else MAX_WORKERS
    return max(1, min(num_images * num_categories // PAIRS_PER_WORKER, cpus, MAX_WORKERS, fit))


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), else None."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _category_runs(category_ids: list[int], categories_per_run: int, workers: int) -> list[list[int]]:
    """Consecutive runs of at most `categories_per_run` categories, at least 2 x `workers` when parallel (a run
    takes time in proportion to its boxes, which vary by category: smaller runs even out the workers)."""
    count = max(math.ceil(len(category_ids) / max(1, categories_per_run)), 2 * workers if workers > 1 else 1)
    return [run.tolist() for run in np.array_split(np.array(category_ids, dtype=np.int64),
                                                   max(1, min(count, len(category_ids))))]


def _ground_truth_of(gt: COCO, category_ids: list[int]) -> dict[str, list]:
    """What a bbox COCOeval of `category_ids` reads of `gt`: every image's id, those categories, their boxes
    (no masks): a run's share of LVIS val pickles to a worker in a few megabytes."""
    keys = ("id", "image_id", "category_id", "bbox", "area", "iscrowd", "ignore")
    chosen = set(category_ids)
    return {"images": [{"id": image_id} for image_id in gt.getImgIds()], "categories": gt.loadCats(category_ids),
            "annotations": [{key: ann[key] for key in keys if key in ann}
                            for ann in gt.dataset["annotations"] if ann["category_id"] in chosen]}


def _precision_of_run(gt: COCO | Mapping, results: Detections, category_ids: list[int], image_ids: list[int],
                      max_dets: int, verbose: bool) -> np.ndarray:
    """One COCOeval run's precision (T IoUs, R recalls, K categories) for the area range "all" at `max_dets`."""
    gt = gt if isinstance(gt, COCO) else load_ground_truth(gt, verbose)
    with _no_garbage_collection():
        evaluator = COCOeval(gt, _load_results(gt, results.records(), verbose), iouType="bbox")
        evaluator.params.catIds = category_ids
        evaluator.params.imgIds = image_ids
        evaluator.params.maxDets = [1, 10, max_dets]
        evaluator.params.areaRng = [[0.0, 1e10]]
        evaluator.params.areaRngLbl = ["all"]
        with _quiet(verbose):
            evaluator.evaluate()
            evaluator.accumulate()
    return evaluator.eval["precision"][:, :, :, 0, -1]  # (T IoUs, R recalls, K, A areas, M maxDets)


@contextlib.contextmanager
def _no_garbage_collection():
    """COCOeval makes millions of small dicts and arrays: the cycle collector's passes over them (and over
    everything else the process holds) took 20-40% of a run's time (bench/evaluate_workers.py)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def mean_precision(precision: Precision, category_ids: Sequence[int] | None = None,
                   iou: float | None = None) -> float | None:
    """Mean of COCOeval's precision over `category_ids` (None: all evaluated) at IoU `iou` (None: every
    threshold .50:.95), -1 entries (no ground truth) left out; None if nothing is left.

    The same number `COCOeval.summarize` prints for AP / AP50 with params.catIds restricted to those ids.
    """
    if category_ids is None:
        positions = list(range(len(precision.category_ids)))
    else:
        where = {cat: k for k, cat in enumerate(precision.category_ids)}
        missing = [c for c in category_ids if int(c) not in where]
        if missing:
            raise ValueError(f"categories {missing[:5]} were not evaluated")
        positions = [where[int(c)] for c in category_ids]
    values = precision.values[:, :, positions]
    if iou is not None:
        thresholds = np.flatnonzero(np.isclose(precision.iou_thresholds, iou))
        if thresholds.size == 0:
            raise ValueError(f"IoU {iou} is not among the evaluated thresholds {precision.iou_thresholds.tolist()}")
        values = values[thresholds]
    values = values[values > -1]
    return float(values.mean()) if values.size else None


def is_federated(gt: COCO) -> bool:
    """Whether `gt` is federated like LVIS: every image lists the categories checked absent from it and those
    whose boxes there are not all drawn."""
    images = gt.dataset.get("images", [])
    return bool(images) and all("neg_category_ids" in image and "not_exhaustive_category_ids" in image
                                for image in images)


def resolve_protocol(gt: COCO, protocol: str, source: str = "the ground truth") -> str:
    """"coco" or "lvis" for `protocol` ("auto": "lvis" when `gt` is federated); DataError naming `source` when
    "lvis" is asked of a file without LVIS' per-image lists."""
    if protocol not in PROTOCOLS:
        raise VildError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "auto":
        return "lvis" if is_federated(gt) else "coco"
    if protocol == "lvis" and not is_federated(gt):
        raise DataError(f"{source}: --protocol lvis needs images that list neg_category_ids and"
                        " not_exhaustive_category_ids (LVIS files do); use --protocol coco")
    return protocol


FEDERATED_IGNORE_BOX = [-1e6, -1e6, 2e6, 2e6]
"""A crowd box around any image: COCOeval ignores a detection that it covers and no real box matches."""


@dataclass
class FederatedGroundTruth:
    """LVIS' federated protocol (lvis-api's LVISEval, box AP) put in COCOeval's terms: the ground truth (`coco`)
    on which a plain COCOeval of `detections(results)` gives LVISEval's precision. Built once per file, for
    any number of result sets (`federated_ground_truth`).

    - An image keeps its `max_per_image` highest-scoring detections over all categories (LVISResults).
    - A detection counts only for a category that the image has boxes of or lists in `neg_category_ids`
      (the `checked` pairs): the others were never checked on that image, so a detection there is neither
      right nor wrong.
    - An unmatched detection of a category in the image's `not_exhaustive_category_ids` is ignored (not
      every box of it was drawn). COCOeval ignores a detection that matches no real box but falls on a
      crowd box, so each such (image, category) gets one crowd box covering any image.
    - Boxes of zero area, detected or annotated, are left out (after the cap), and `iscrowd` means nothing,
      as in lvis-api; its per-annotation `ignore` has no COCOeval equivalent and is refused.
    """

    coco: COCO
    checked: np.ndarray     # image_id * stride + category_id of every checked (image, category)
    stride: int

    def detections(self, results: Detections, max_per_image: int = LVIS_MAX_DETS) -> Detections:
        """The detections of `results` that the protocol counts."""
        count = len(results)
        order = np.lexsort((np.arange(count), -results.scores, results.image_ids))   # per image, best first
        image_of = results.image_ids[order]
        rank = np.empty(count, dtype=np.int64)
        rank[order] = np.arange(count) - np.searchsorted(image_of, image_of, side="left")
        keep = ((rank < max_per_image) & (results.boxes[:, 2] * results.boxes[:, 3] > 0)
                & np.isin(results.image_ids * self.stride + results.category_ids, self.checked))
        return results.rows(keep)


def federated_ground_truth(gt: COCO, verbose: bool = False) -> FederatedGroundTruth:
    """`gt` (an LVIS file's COCO) prepared for the federated protocol; see `FederatedGroundTruth`."""
    if any(ann.get("ignore") for ann in gt.dataset["annotations"]):
        raise DataError("annotations marked 'ignore' cannot be evaluated with the LVIS protocol here")
    annotations = [ann if not ann.get("iscrowd") else dict(ann, iscrowd=0)
                   for ann in gt.dataset["annotations"] if ann["area"] > 0]
    images = gt.dataset["images"]
    stride = max([0, *gt.getCatIds()]) + 1
    checked = [int(ann["image_id"]) * stride + int(ann["category_id"]) for ann in annotations]
    checked += [int(image["id"]) * stride + int(c) for image in images for c in image["neg_category_ids"]]
    next_id = max([0, *gt.getAnnIds()]) + 1
    ignored = [{"id": next_id + k, "image_id": image_id, "category_id": category_id, "iscrowd": 1,
                "bbox": FEDERATED_IGNORE_BOX, "area": FEDERATED_IGNORE_BOX[2] * FEDERATED_IGNORE_BOX[3]}
               for k, (image_id, category_id) in enumerate(
                   (image["id"], c) for image in images for c in image["not_exhaustive_category_ids"])]
    with_ignored = COCO()
    with_ignored.dataset = dict(gt.dataset, annotations=annotations + ignored)
    with _quiet(verbose):
        with_ignored.createIndex()
    return FederatedGroundTruth(with_ignored, np.unique(np.array(checked, dtype=np.int64)), stride)


def _frequencies_from_gt(gt: COCO) -> dict[int, str]:
    return {int(c["id"]): c["frequency"] for c in gt.dataset["categories"] if c.get("frequency") in LVIS_FREQUENCIES}


def evaluate_coco(gt: str | os.PathLike | Mapping | COCO | FederatedGroundTruth, results: Detections | Sequence[dict],
                  base_ids: Sequence[int] = (), novel_ids: Sequence[int] = (),
                  frequencies: Mapping[int, str] | None = None, image_ids: Sequence[int] | None = None,
                  max_dets: int | None = None, protocol: str = "auto",
                  categories_per_run: int = CATEGORIES_PER_RUN, workers: int = 1, verbose: bool = False,
                  progress: str | None = None) -> dict[str, Any]:
    """Box metrics of `results` (Detections, or COCO results records) against the ground truth `gt`.

    Evaluated categories: base + novel when a split is given (the COCO open-vocabulary protocol leaves the
    other 15 COCO categories out of "all"), else every category of `gt`. `frequencies` (id -> "r"/"c"/"f")
    default to the categories' LVIS `frequency` fields; pass {} for none. `image_ids` restricts the images
    (default: all of `gt`'s).

    `protocol` "coco": COCOeval as it is, `max_dets` (default 100) detections per image and category.
    "lvis": LVIS' federated protocol (`FederatedGroundTruth`), `max_dets` (default 300) detections per image
    over all categories. "auto" (default): "lvis" when every image of `gt` lists its `neg_category_ids` and
    `not_exhaustive_category_ids` (LVIS files do), else "coco". A `gt` already prepared for the federated
    protocol (`federated_ground_truth`, for evaluating several result sets against one file) means "lvis".

    Returns plain JSON-ready values: AP, AP50, AP75 (all evaluated categories), AP50_base / AP_base,
    AP50_novel / AP_novel, AP_r / AP_c / AP_f (only with frequencies), counts, and "per_category" rows
    {id, name, split, frequency, num_gt, AP, AP50}. A metric is None when its group has no ground truth.
    AP_r etc. follow LVIS: the mean, over the categories of that frequency with ground truth, of each
    category's AP at IoU .50:.95. pycocotools' own prints are swallowed unless `verbose`. `workers`: processes
    for the COCOeval runs (`run_cocoeval`); the numbers do not depend on it. `progress`: the label of a
    progress bar over the categories evaluated.
    """
    prepared = gt if isinstance(gt, FederatedGroundTruth) else None
    gt = prepared.coco if prepared is not None else load_ground_truth(gt, verbose=verbose)
    if not isinstance(results, Detections):
        results = Detections.of_records(results)
    unknown = np.setdiff1d(results.image_ids, np.array(gt.getImgIds(), dtype=np.int64))
    if len(unknown):
        raise DataError(f"detection results name {len(unknown)} image ids absent from the ground truth "
                        f"(first: {unknown[:5].tolist()})")
    protocol = resolve_protocol(gt, protocol)
    if prepared is not None and protocol != "lvis":
        raise VildError(f"ground truth prepared for LVIS' federated protocol cannot be evaluated as {protocol!r}")
    if protocol == "lvis":
        max_dets = LVIS_MAX_DETS if max_dets is None else max_dets
        prepared = prepared or federated_ground_truth(gt, verbose)
        gt, results = prepared.coco, prepared.detections(results, max_dets)
    elif max_dets is None:
        max_dets = COCO_MAX_DETS
    base_ids = [int(c) for c in base_ids]
    novel_ids = [int(c) for c in novel_ids]
    known = set(gt.getCatIds())
    unknown = sorted(set(base_ids + novel_ids) - known)
    if unknown:
        raise DataError(f"split category ids {unknown[:5]} are not among the ground truth's categories")
    evaluated = sorted(set(base_ids + novel_ids)) if (base_ids or novel_ids) else sorted(known)
    evaluated_set = set(evaluated)
    if frequencies is None:
        frequencies = _frequencies_from_gt(gt)
    frequencies = {int(c): f for c, f in frequencies.items() if int(c) in evaluated_set}

    precision = run_cocoeval(gt, results, evaluated, image_ids=image_ids, max_dets=max_dets,
                             categories_per_run=categories_per_run, workers=workers, verbose=verbose,
                             progress=progress)

    metrics: dict[str, Any] = {
        "AP": mean_precision(precision),
        "AP50": mean_precision(precision, iou=0.5),
        "AP75": mean_precision(precision, iou=0.75),
    }
    for group, ids in (("base", base_ids), ("novel", novel_ids)):
        if ids:
            metrics[f"AP50_{group}"] = mean_precision(precision, ids, iou=0.5)
            metrics[f"AP_{group}"] = mean_precision(precision, ids)
    per_category = _per_category(precision, gt, set(base_ids), set(novel_ids), frequencies)
    if frequencies:
        for frequency in LVIS_FREQUENCIES:
            aps = [row["AP"] for row in per_category if row["frequency"] == frequency and row["AP"] is not None]
            metrics[f"AP_{frequency}"] = float(np.mean(aps)) if aps else None
    metrics.update({
        "num_images": len(precision.image_ids),
        "num_detections": int((np.isin(results.category_ids, evaluated)
                               & np.isin(results.image_ids, precision.image_ids)).sum()),
        "num_categories": len(evaluated),
        "num_categories_with_gt": sum(row["num_gt"] > 0 for row in per_category),
        "protocol": protocol,
        "max_dets": max_dets,
        "per_category": per_category,
    })
    log.info("evaluated %d detections on %d images, %d categories (%d with ground truth): AP50 %s",
             metrics["num_detections"], metrics["num_images"], len(evaluated), metrics["num_categories_with_gt"],
             _percent(metrics["AP50"]))
    return metrics


def _per_category(precision: Precision, gt: COCO, base: set[int], novel: set[int],
                  frequencies: Mapping[int, str]) -> list[dict[str, Any]]:
    num_gt = _count_ground_truth(gt, precision.image_ids)
    return [{
        "id": cat,
        "name": gt.cats[cat]["name"],
        "split": "base" if cat in base else "novel" if cat in novel else None,
        "frequency": frequencies.get(cat),
        "num_gt": num_gt.get(cat, 0),
        "AP": mean_precision(precision, [cat]),
        "AP50": mean_precision(precision, [cat], iou=0.5),
    } for cat in precision.category_ids]


def _count_ground_truth(coco: COCO, image_ids: Sequence[int]) -> dict[int, int]:
    """Non-crowd annotations per category on `image_ids`, in one pass (getAnnIds per category is quadratic on LVIS)."""
    counts: dict[int, int] = {}
    for image_id in image_ids:
        for ann in coco.imgToAnns.get(int(image_id), ()):
            if not ann.get("iscrowd", 0):
                counts[ann["category_id"]] = counts.get(ann["category_id"], 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------- reporting


def metrics_table(rows: Mapping[str, Mapping[str, Any]], metrics: Sequence[str] | None = None) -> str:
    """Markdown table, one row per mode, metrics as percentages with one decimal ("–" where undefined).

    `metrics` picks and orders the columns (keys of the metrics dicts); default: the headline metrics of
    METRIC_LABELS that at least one row has.
    """
    if metrics is None:
        metrics = [key for key in METRIC_LABELS if any(key in row for row in rows.values())]
    header = "| mode | " + " | ".join(METRIC_LABELS.get(key, key) for key in metrics) + " |"
    rule = "|---|" + "---:|" * len(metrics)
    lines = [header, rule]
    for mode, row in rows.items():
        cells = [_percent(row.get(key)) for key in metrics]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _percent(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100.0 * float(value):.1f}"
