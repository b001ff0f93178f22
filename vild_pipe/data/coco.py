"""COCO-format detection data: an annotation JSON (images, annotations, categories) and a folder of images.

Plain json + numpy; pycocotools is kept for evaluation. The whole file is validated when loaded, so a bad
record fails at once with one line naming the file and the record instead of deep inside a training step.

Box policy (what users of COCO tooling expect; torchvision's detection references do the same):
boxes are converted from COCO's [x, y, w, h] to xyxy in original image pixels and clipped to the image.
A box that is degenerate after clipping (width or height below MIN_BOX_SIDE, 0.01 px, in the float32 the
boxes are kept in, which includes boxes entirely outside the image) is SKIPPED, and the number skipped is
logged once per file. A bbox that is not 4 finite numbers
(NaN, inf, strings) is not degenerate but malformed, and is an error. ``iscrowd=1`` boxes are kept and
flagged, so training ignores them and evaluation can still match them.

Image files are checked lazily, when `CocoDataset.open_image` opens one (a missing, empty or undecodable
file raises `DataError` then), because a stat per file up front costs minutes on network file systems with
100k+ images. ``check_images=True`` checks every file up front instead (exists, non-zero size; no decode),
for a stage that would rather fail before hours of work than during them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from vild_pipe.data.splits import CategorySplit, resolve_split
from vild_pipe.errors import DataError, describe_error, first_few

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("id", "width", "height")  # and file_name, or LVIS's coco_url
ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")
CATEGORY_KEYS = ("id", "name")
MISSING_IMAGE = "missing image file"


@dataclass(frozen=True)
class ImageRecord:
    """One image of the annotation file; `path` is `image_dir / file_name`."""

    id: int
    file_name: str
    width: int
    height: int
    path: Path


@dataclass(frozen=True)
class Category:
    """One category. `split` ("base"/"novel") and `frequency` (LVIS "r"/"c"/"f") are read when present."""

    id: int
    name: str
    split: str | None = None
    frequency: str | None = None


class CocoDataset:
    """A validated COCO-format annotation file, optionally restricted to one category split.

    Build with `CocoDataset.load`. Boxes are stored once, grouped by image, as flat numpy arrays; views
    (`with_split`, `training_view`) share the image and category lists and hold filtered arrays. The parsed
    JSON is not kept: for COCO train it is 2.8 GiB of Python objects, for LVIS train 5.9 GiB (measured),
    in every process of every stage; pycocotools evaluation reads the file itself.
    """

    def __init__(
        self,
        *,
        path: Path,
        image_dir: Path,
        images: list[ImageRecord],
        categories: list[Category],
        boxes: np.ndarray,
        category_ids: np.ndarray,
        iscrowd: np.ndarray,
        box_image_pos: np.ndarray,
        split: CategorySplit | None = None,
        skipped_degenerate: int = 0,
        missing_image_hint: str = "",
    ) -> None:
        self.path = path
        self.image_dir = image_dir
        self.missing_image_hint = missing_image_hint  # where images were looked for, when no one said where
        self.images = images
        self.categories = categories
        self.split = split
        self.skipped_degenerate = skipped_degenerate
        self._boxes = boxes
        self._category_ids = category_ids
        self._iscrowd = iscrowd
        self._box_image_pos = box_image_pos
        counts = np.bincount(box_image_pos, minlength=len(images))
        self._row_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._image_pos = {rec.id: pos for pos, rec in enumerate(images)}
        self._category_pos = {cat.id: pos for pos, cat in enumerate(categories)}

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, ann_path: str | os.PathLike, image_dir: str | os.PathLike | None = None,
             check_images: bool = False, parsed_json: Any = None, images_option: str = "--images") -> CocoDataset:
        """Read and validate `ann_path`; images live in `image_dir` (default: the JSON's folder).
        `parsed_json`: the file's JSON, when the caller has parsed it already (`read_annotation_json`).
        `images_option`: the option that gives `image_dir`; a missing image found in the default folder names
        it, since a forgotten images folder is the usual cause.

        Raises `DataError` (one line naming the file and the record) for an unreadable or non-JSON file,
        missing top-level lists or record keys, duplicate ids or category names, annotations pointing at
        unknown images or categories, and bboxes that are not 4 finite numbers. Degenerate boxes are
        skipped (see the module docstring). With `check_images`, every image file must exist and be
        non-empty now; otherwise that is checked when an image is opened.
        """
        path = Path(ann_path)
        where = os.fspath(ann_path)
        raw = read_annotation_json(path) if parsed_json is None else parsed_json
        images_json, annotations_json, categories_json = _top_level_lists(raw, where)
        missing_image_hint = ("" if image_dir is not None else
                              f"images are looked for beside the annotation file; give {images_option} FOLDER")
        image_dir = Path(image_dir) if image_dir is not None else path.parent

        images = _parse_images(images_json, image_dir, where)
        categories = _parse_categories(categories_json, where)
        parsed = _parse_annotations(annotations_json, images, categories, where)
        ann_ids, ann_image_pos, ann_category_ids, ann_bbox_xywh, ann_iscrowd = parsed

        widths = np.array([rec.width for rec in images], dtype=np.float64)
        heights = np.array([rec.height for rec in images], dtype=np.float64)
        boxes, keep, clipped = clip_xywh_to_xyxy(ann_bbox_xywh, widths[ann_image_pos], heights[ann_image_pos])
        skipped = int((~keep).sum())
        if skipped:
            ids = first_few([ann_ids[k] for k in np.flatnonzero(~keep)], 5)
            logger.warning("%s: skipped %d degenerate boxes (a side under 0.01 px, or outside the image): annotation"
                           " id %s", where, skipped, ids)
        if clipped:
            logger.info("%s: clipped %d boxes to the image", where, clipped)

        order = np.argsort(ann_image_pos[keep], kind="stable")
        dataset = cls(
            path=path,
            image_dir=image_dir,
            images=images,
            categories=sorted(categories, key=lambda c: c.id),
            boxes=boxes[keep][order],
            category_ids=ann_category_ids[keep][order],
            iscrowd=ann_iscrowd[keep][order],
            box_image_pos=ann_image_pos[keep][order],
            skipped_degenerate=skipped,
            missing_image_hint=missing_image_hint,
        )
        if check_images:
            dataset.check_image_files()
        return dataset

    # ------------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        split = self.split.spec if self.split is not None else None
        return (f"CocoDataset({os.fspath(self.path)!r}: {len(self.images)} images, {len(self._boxes)} boxes, "
                f"{len(self.categories)} categories, split={split!r})")

    @property
    def category_names(self) -> list[str]:
        return [c.name for c in self.categories]

    @property
    def category_ids(self) -> list[int]:
        return [c.id for c in self.categories]

    @property
    def num_boxes(self) -> int:
        return len(self._boxes)

    def category_index(self, cat_id: int) -> int:
        """Position of category `cat_id` in `.categories` (sorted by id): the contiguous class index."""
        try:
            return self._category_pos[int(cat_id)]
        except KeyError:
            raise KeyError(f"{os.fspath(self.path)}: no category id {cat_id}") from None

    def category_indices(self, cat_ids: np.ndarray) -> np.ndarray:
        """Vectorised `category_index` (int64)."""
        sorted_ids = np.array(self.category_ids, dtype=np.int64)
        cat_ids = np.asarray(cat_ids, dtype=np.int64)
        pos = np.searchsorted(sorted_ids, cat_ids)
        if len(cat_ids) and (pos.max() >= len(sorted_ids) or not np.array_equal(sorted_ids[pos], cat_ids)):
            unknown = sorted(set(cat_ids.tolist()) - set(sorted_ids.tolist()))
            raise KeyError(f"{os.fspath(self.path)}: no category ids {unknown}")
        return pos.astype(np.int64)

    def image(self, image_id: int) -> ImageRecord:
        """The record of image `image_id`."""
        try:
            return self.images[self._image_pos[int(image_id)]]
        except KeyError:
            raise KeyError(f"{os.fspath(self.path)}: no image id {image_id}") from None

    def annotations_for(self, image_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes of one image: xyxy float32 (n, 4) in original pixels, category ids int64 (n,), iscrowd bool (n,).

        Copies, so callers may modify them.
        """
        try:
            pos = self._image_pos[int(image_id)]
        except KeyError:
            raise KeyError(f"{os.fspath(self.path)}: no image id {image_id}") from None
        rows = slice(self._row_start[pos], self._row_start[pos + 1])
        return self._boxes[rows].copy(), self._category_ids[rows].copy(), self._iscrowd[rows].copy()

    # ------------------------------------------------------------------ images

    def open_image(self, record: ImageRecord | int) -> Image.Image:
        """Decode one image as RGB; `DataError` for a missing, empty, undecodable or wrongly sized file."""
        if not isinstance(record, ImageRecord):
            record = self.image(record)
        path = record.path
        problem = _file_problem(path)
        if problem:
            hint = f" ({self.missing_image_hint})" if problem == MISSING_IMAGE and self.missing_image_hint else ""
            raise DataError(f"{os.fspath(path)}: {problem}{hint}")
        rgb = read_rgb_image(path)
        if rgb.size != (record.width, record.height):
            raise self.wrong_size_error(record, rgb.size)
        return rgb

    def wrong_size_error(self, record: ImageRecord, stored_size: tuple[int, int]) -> DataError:
        """The error for an image file of `stored_size` (width, height) that its record says is another size."""
        return DataError(
            f"{os.fspath(record.path)}: image is {stored_size[0]}x{stored_size[1]} pixels but {os.fspath(self.path)}"
            f" says {record.width}x{record.height} for image id {record.id}{_turned_hint(record, stored_size)}"
        )

    def check_image_files(self) -> None:
        """Check that every image file exists and is non-empty (a stat each, no decode)."""
        problems = []
        for rec in tqdm(self.images, desc="checking image files", unit="img", disable=None, leave=False):
            problem = _file_problem(rec.path)
            if problem:
                problems.append((rec, problem))
        if problems:
            rec, problem = problems[0]
            more = f"; {len(problems) - 1} more images missing or empty" if len(problems) > 1 else ""
            missing = any(reason == MISSING_IMAGE for _, reason in problems)
            hint = f"; {self.missing_image_hint}" if missing and self.missing_image_hint else ""
            raise DataError(f"{os.fspath(rec.path)}: {problem} (image id {rec.id} of {os.fspath(self.path)}{more}"
                            f"{hint})")

    # ------------------------------------------------------------------ views

    def resolve_split(self, split: CategorySplit | str = "auto") -> CategorySplit:
        """A `CategorySplit` for this file's categories: given one (checked), or resolved from a spec string."""
        if isinstance(split, str):
            return resolve_split(self.categories, split, source=os.fspath(self.path))
        unknown = sorted(set(split.base_ids + split.novel_ids) - set(self._category_pos))
        if unknown:
            raise DataError(f"{os.fspath(self.path)}: category split names category ids {unknown} "
                            f"that the file does not have")
        return split

    def with_split(self, split: CategorySplit | str = "auto") -> CocoDataset:
        """This dataset with a category split attached (`.split`); all annotations kept, e.g. for evaluation."""
        return self._view(self.resolve_split(split), keep=None)

    def training_view(self, split: CategorySplit | str | None = None) -> CocoDataset:
        """The dataset a detector may train on: only base-category annotations remain.

        Novel annotations are removed, never used; categories outside the split (the 15 COCO categories
        the 48/17 protocol leaves out) are removed too, as in that protocol's training set. Every image is
        kept: novel objects stay in the pixels, unlabelled, as in ViLD. `split` defaults to `.split`.
        """
        if split is None:
            if self.split is None:
                raise DataError(f"{os.fspath(self.path)}: a training view needs a category split")
            split = self.split
        split = self.resolve_split(split)
        return self._view(split, keep=split.base_mask(self._category_ids))

    def _view(self, split: CategorySplit, keep: np.ndarray | None) -> CocoDataset:
        boxes, category_ids, iscrowd, image_pos = self._boxes, self._category_ids, self._iscrowd, self._box_image_pos
        if keep is not None:
            boxes, category_ids, iscrowd, image_pos = boxes[keep], category_ids[keep], iscrowd[keep], image_pos[keep]
        return CocoDataset(
            path=self.path, image_dir=self.image_dir, images=self.images, categories=self.categories,
            boxes=boxes, category_ids=category_ids, iscrowd=iscrowd, box_image_pos=image_pos,
            split=split, skipped_degenerate=self.skipped_degenerate, missing_image_hint=self.missing_image_hint,
        )


MIN_BOX_SIDE = 0.01
"""Pixels: a box side below this, in float32, is degenerate. A side that rounds to 0 in float32 (a border box
with float noise: x 95.9999999 in a 96 px image) or to 0 when train-rpn rescales it stops torchvision's
Faster R-CNN with an assertion; no real object is a hundredth of a pixel wide."""


def clip_xywh_to_xyxy(bbox_xywh: np.ndarray, widths: np.ndarray, heights: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, int]:
    """COCO [x, y, w, h] -> xyxy float32 clipped to each box's image; returns (boxes, keep mask, number clipped).

    `keep` is False for degenerate boxes: a side below MIN_BOX_SIDE after clipping (so also boxes outside).
    """
    x1, y1 = bbox_xywh[:, 0], bbox_xywh[:, 1]
    x2, y2 = x1 + bbox_xywh[:, 2], y1 + bbox_xywh[:, 3]
    xyxy = np.stack([x1, y1, x2, y2], axis=1)
    upper = np.stack([widths, heights, widths, heights], axis=1)
    clipped = np.clip(xyxy, 0.0, upper)
    boxes = clipped.astype(np.float32)
    keep = (boxes[:, 2] - boxes[:, 0] >= MIN_BOX_SIDE) & (boxes[:, 3] - boxes[:, 1] >= MIN_BOX_SIDE)
    n_clipped = int((keep & (clipped != xyxy).any(axis=1)).sum())
    return boxes, keep, n_clipped


# ---------------------------------------------------------------------- parsing helpers


def read_annotation_json(path: str | os.PathLike) -> Any:
    """The parsed JSON of an annotation file; DataError naming the file when it cannot be read or parsed."""
    where = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: {describe_error(exc)}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not a UTF-8 JSON file ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise DataError(f"{where}: cannot read annotation file ({describe_error(exc)})") from exc


def _top_level_lists(raw: Any, where: str) -> tuple[list, list, list]:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: top level is a JSON {type(raw).__name__}, expected an object with "
                        f"'images', 'annotations' and 'categories'")
    missing = [k for k in ("images", "annotations", "categories") if k not in raw]
    if missing:
        raise DataError(f"{where}: missing top-level key(s) {', '.join(repr(k) for k in missing)}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(raw[key], list):
            raise DataError(f"{where}: top-level '{key}' is a JSON {type(raw[key]).__name__}, expected a list")
    return raw["images"], raw["annotations"], raw["categories"]


def _record_label(kind: str, plural: str, index: int, record: Any) -> str:
    """'annotation id 17' when the record has a usable id, else 'annotations[5]' (position in the list)."""
    if isinstance(record, dict) and isinstance(record.get("id"), (int, str)) and not isinstance(record["id"], bool):
        return f"{kind} id {record['id']}"
    return f"{plural}[{index}]"


def _check_record(record: Any, keys: Sequence[str], label: str, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: {label}: is a JSON {type(record).__name__}, expected an object")
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{where}: {label}: missing key(s) {', '.join(repr(k) for k in missing)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    """A number a float64 holds, neither NaN nor infinite (json reads NaN, Infinity and 1e400 without a word)."""
    try:
        return _is_number(value) and math.isfinite(value)
    except OverflowError:   # an integer past float64's range
        return False


def _claim_id(rec: dict, seen: set, kind: str, label: str, where: str) -> None:
    """Check that a record's id is an integer not seen before in its list, and remember it."""
    if not _is_int(rec["id"]):
        raise DataError(f"{where}: {label}: id must be an integer, got {rec['id']!r}")
    if not -2**63 <= rec["id"] < 2**63:
        raise DataError(f"{where}: {label}: id {rec['id']} does not fit in 64 bits (ids are kept as int64, as in the"
                        " caches)")
    if rec["id"] in seen:
        raise DataError(f"{where}: {label}: duplicate {kind} id")
    seen.add(rec["id"])


def _parse_images(images_json: list, image_dir: Path, where: str) -> list[ImageRecord]:
    images: list[ImageRecord] = []
    seen: set[int] = set()
    for index, rec in enumerate(images_json):
        label = _record_label("image", "images", index, rec)
        _check_record(rec, IMAGE_KEYS, label, where)
        _claim_id(rec, seen, "image", label, where)
        file_name = _image_file_name(rec, label, where)
        for key in ("width", "height"):
            value = rec[key]
            if not _is_finite_number(value) or value != int(value) or value <= 0:
                raise DataError(f"{where}: {label}: {key} must be a positive integer, got {value!r}")
        images.append(ImageRecord(id=rec["id"], file_name=file_name, width=int(rec["width"]),
                                  height=int(rec["height"]), path=image_dir / file_name))
    return images


def _image_file_name(rec: dict, label: str, where: str) -> str:
    """`file_name`; LVIS v1 has none, only `coco_url` (".../train2017/000000155379.jpg"), whose last two parts
    are the file's place under a COCO images folder (`--images coco`), as detectron2's LVIS loader reads it."""
    if "file_name" in rec:
        if not isinstance(rec["file_name"], str) or not rec["file_name"]:
            raise DataError(f"{where}: {label}: file_name must be a non-empty string, got {rec['file_name']!r}")
        return rec["file_name"]
    url = rec.get("coco_url")
    if url is None:
        raise DataError(f"{where}: {label}: missing key 'file_name' (or LVIS's 'coco_url')")
    parts = url.rstrip("/").split("/")[-2:] if isinstance(url, str) else []
    if len(parts) != 2 or not all(parts):
        raise DataError(f"{where}: {label}: coco_url must end in FOLDER/FILE, got {url!r}")
    return "/".join(parts)


def _parse_categories(categories_json: list, where: str) -> list[Category]:
    categories: list[Category] = []
    seen_ids: set[int] = set()
    seen_names: dict[str, int] = {}
    for index, rec in enumerate(categories_json):
        label = _record_label("category", "categories", index, rec)
        _check_record(rec, CATEGORY_KEYS, label, where)
        _claim_id(rec, seen_ids, "category", label, where)
        name = rec["name"]
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: {label}: name must be a non-empty string, got {name!r}")
        key = name.strip().lower()
        if key in seen_names:
            raise DataError(f"{where}: {label}: duplicate category name {name!r} (also category id {seen_names[key]})")
        seen_names[key] = rec["id"]
        categories.append(Category(id=rec["id"], name=name, split=rec.get("split"), frequency=rec.get("frequency")))
    return categories


def _parse_annotations(annotations_json: list, images: list[ImageRecord], categories: list[Category], where: str
                       ) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate every annotation; return (ids, image position, category id, bbox xywh float64, iscrowd arrays)."""
    image_pos = {rec.id: pos for pos, rec in enumerate(images)}
    category_ids = {cat.id for cat in categories}
    n = len(annotations_json)
    ann_image_pos = np.empty(n, dtype=np.int64)
    ann_category_ids = np.empty(n, dtype=np.int64)
    ann_bbox = np.empty((n, 4), dtype=np.float64)
    ann_iscrowd = np.zeros(n, dtype=bool)
    ann_ids = [ann.get("id") for ann in annotations_json]   # kept as JSON gave them: ids are not bounded
    seen: set[int] = set()
    for index, ann in enumerate(annotations_json):
        label = _record_label("annotation", "annotations", index, ann)
        _check_record(ann, ANNOTATION_KEYS, label, where)
        _claim_id(ann, seen, "annotation", label, where)
        image_id, category_id = ann["image_id"], ann["category_id"]
        if not _is_int(image_id) or image_id not in image_pos:
            raise DataError(f"{where}: {label}: unknown image_id {image_id!r}")
        if not _is_int(category_id) or category_id not in category_ids:
            raise DataError(f"{where}: {label}: unknown category_id {category_id!r}")
        bbox = ann["bbox"]
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            raise DataError(f"{where}: {label}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
        if not all(_is_finite_number(v) for v in bbox):
            raise DataError(f"{where}: {label}: bbox has a non-finite value {bbox!r}")
        iscrowd = ann.get("iscrowd", 0)
        if not _is_number(iscrowd) and not isinstance(iscrowd, bool) or iscrowd not in (0, 1):   # bool("0") is True
            raise DataError(f"{where}: {label}: iscrowd must be 0 or 1, got {iscrowd!r}")
        ann_image_pos[index] = image_pos[image_id]
        ann_category_ids[index] = category_id
        ann_bbox[index] = bbox
        ann_iscrowd[index] = bool(iscrowd)
    return ann_ids, ann_image_pos, ann_category_ids, ann_bbox, ann_iscrowd


EXIF_ORIENTATION = 0x0112
"""The EXIF tag saying how a camera's stored pixels are to be turned for viewing (1: as stored)."""
EXIF_TURNS = {2: Image.FLIP_LEFT_RIGHT, 3: Image.ROTATE_180, 4: Image.FLIP_TOP_BOTTOM, 5: Image.TRANSPOSE,
              6: Image.ROTATE_270, 7: Image.TRANSVERSE, 8: Image.ROTATE_90}
"""The turn of the stored pixels each orientation asks for, as ImageOps.exif_transpose makes it."""


def read_rgb_image(path: Path, upright: bool = False) -> Image.Image:
    """Decode an image file as RGB; DataError naming the file when it is not a decodable image.

    Pixels are read as stored, as pycocotools-based tools, torchvision and nvJPEG read them, since annotation
    boxes are in that frame; only a TIFF comes upright, as PIL applies a TIFF's orientation tag when decoding it.
    `upright` turns the image as its EXIF orientation tag says, as a viewer shows it: for detect on a phone's
    photographs, which are often stored sideways.
    """
    try:
        with Image.open(path) as image:
            stored_format = image.format
            turn = EXIF_TURNS.get(_exif_orientation(image)) if upright else None
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")  # the same pixels, without PIL's warning about such palettes
            rgb = _sixteen_bit_grey_to_eight(image, stored_format).convert("RGB")
            return rgb.transpose(turn) if turn is not None else rgb
    except Image.DecompressionBombError as exc:
        raise DataError(f"{os.fspath(path)}: image too large to decode safely ({exc})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{os.fspath(path)}: cannot decode image (truncated or not an image)") from exc


def _exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation of an opened image still to be applied: 1 when it has none, its EXIF is unreadable,
    or it is a TIFF (PIL applies a TIFF's orientation when decoding it). Read here, not by
    ImageOps.exif_transpose, which fails rewriting a camera's EXIF that holds a tag of the wrong type; PIL's
    warnings about such EXIF are about tags that do not matter here."""
    if image.format == "TIFF":
        return 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        except (OSError, SyntaxError, ValueError, struct.error):
            return 1
    return orientation if isinstance(orientation, int) else 1


def _turned_hint(record: ImageRecord, stored_size: tuple[int, int]) -> str:
    """Why the sizes differ when the file's EXIF orientation swaps them: the annotations were made upright."""
    if tuple(stored_size[::-1]) != (record.width, record.height):
        return ""
    try:
        with Image.open(record.path) as image:
            orientation = _exif_orientation(image)
    except (OSError, SyntaxError, ValueError):
        return ""
    if orientation not in (5, 6, 7, 8):  # the tags that turn the image a quarter
        return ""
    return (f"; the file's EXIF orientation tag ({orientation}) turns it to {record.width}x{record.height}, the"
            " annotations' frame, but vild-pipe reads pixels as stored: write the turn into the pixels"
            " (e.g. `exiftran -ai`, or PIL's ImageOps.exif_transpose) and keep the annotations")


def _sixteen_bit_grey_to_eight(image: Image.Image, file_format: str | None) -> Image.Image:
    """A 16-bit grey image (PNG, TIFF) as 8-bit grey, its high byte, as PIL reads 16-bit colour and libpng strips
    16 bits; other images as they are. PIL's convert("RGB") clips 16-bit levels at 255 instead, which turns all
    but the darkest 256 of 65536 levels white. Pillow before 10.3 opens a 16-bit grey PNG as mode I (int32)."""
    if not (image.mode.startswith("I;16") or (image.mode == "I" and file_format == "PNG")):
        return image
    levels = np.asarray(image).clip(0, 65535) >> 8
    return Image.fromarray(levels.astype(np.uint8), "L")


def _file_problem(path: Path) -> str | None:
    """Why an image file cannot be used before decoding it, or None."""
    try:
        status = path.stat()
    except FileNotFoundError:
        return MISSING_IMAGE
    except OSError as exc:
        return f"cannot read image file ({describe_error(exc)})"
    if not stat.S_ISREG(status.st_mode):
        return "not a regular file"
    if status.st_size == 0:
        return "zero-byte image file"
    return None
