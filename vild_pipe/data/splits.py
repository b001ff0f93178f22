"""Which categories are base (boxes seen in training) and which are novel (never seen), and where that comes from.

A split is a pair of disjoint id lists. It need not cover every category: the COCO open-vocabulary protocol
(48 base / 17 novel) leaves the other 15 COCO categories out of both, and those are neither trained on
nor evaluated. Names are matched exactly after lower-casing and stripping (COCO spells "tv", "couch",
"motorcycle"; no aliases are guessed).

`resolve_split` takes a spec string, the form a user types on the command line:

- ``coco48-17``            the built-in COCO open-vocabulary split (all 65 names must be present)
- ``lvis``                 each category's ``frequency``: "r" novel, "c"/"f" base
- ``field``                each category's ``split`` field: "base" or "novel"
- ``novel:NAME,NAME,...``  those names novel, every other category base
- ``novel-file:PATH``      the same, one name per line (blank lines and lines starting with ``#`` ignored)
- ``auto``                 ``field`` if every category has ``split``, else ``lvis`` if every category has
                           ``frequency``, else ``coco48-17`` if all 65 names are present
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from vild_pipe.errors import DataError, describe_error

if TYPE_CHECKING:
    from vild_pipe.data.coco import Category

COCO_OV_BASE_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse", "sheep",
    "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis", "kite", "surfboard",
    "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "pizza",
    "donut", "chair", "bed", "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven", "toaster",
    "refrigerator", "book", "clock", "vase", "toothbrush",
)
COCO_OV_NOVEL_NAMES: tuple[str, ...] = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard", "skateboard", "cup",
    "knife", "cake", "couch", "keyboard", "sink", "scissors",
)

LVIS_NOVEL_FREQUENCIES = frozenset({"r"})
LVIS_BASE_FREQUENCIES = frozenset({"c", "f"})
SPLIT_FIELD_VALUES = ("base", "novel")

SPEC_HELP = "use one of: auto, coco48-17, lvis, field, novel:NAME,NAME,..., novel-file:PATH"


@dataclass(frozen=True)
class CategorySplit:
    """Base and novel category ids (sorted, disjoint). Categories in neither list are outside the protocol.

    `spec` records where the split came from (the resolved spec, e.g. "lvis" for "auto" on LVIS); it is
    kept for manifests and messages and does not take part in equality.
    """

    base_ids: tuple[int, ...]
    novel_ids: tuple[int, ...]
    spec: str = dataclasses.field(default="", compare=False)
    _novel_set: frozenset = dataclasses.field(init=False, repr=False, compare=False)
    _base_set: frozenset = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        base = tuple(sorted({int(i) for i in self.base_ids}))
        novel = tuple(sorted({int(i) for i in self.novel_ids}))
        both = set(base) & set(novel)
        if both:
            raise DataError(f"category split {self.spec or '(unnamed)'}: ids {sorted(both)} are both base and novel")
        object.__setattr__(self, "base_ids", base)
        object.__setattr__(self, "novel_ids", novel)
        object.__setattr__(self, "_base_set", frozenset(base))
        object.__setattr__(self, "_novel_set", frozenset(novel))

    def is_novel(self, cat_id: int) -> bool:
        return int(cat_id) in self._novel_set

    def is_base(self, cat_id: int) -> bool:
        return int(cat_id) in self._base_set

    def novel_mask(self, cat_ids: np.ndarray) -> np.ndarray:
        """Vectorised `is_novel` over an array of category ids."""
        return np.isin(np.asarray(cat_ids), np.asarray(self.novel_ids, dtype=np.int64))

    def base_mask(self, cat_ids: np.ndarray) -> np.ndarray:
        """Vectorised `is_base` over an array of category ids."""
        return np.isin(np.asarray(cat_ids), np.asarray(self.base_ids, dtype=np.int64))

    def base_names(self, categories: Iterable[Category]) -> list[str]:
        """Names of the base categories, in id order."""
        return _names_for(self.base_ids, categories, "base")

    def novel_names(self, categories: Iterable[Category]) -> list[str]:
        """Names of the novel categories, in id order."""
        return _names_for(self.novel_ids, categories, "novel")

    def to_json(self) -> dict:
        return {"spec": self.spec, "base_ids": list(self.base_ids), "novel_ids": list(self.novel_ids)}

    @classmethod
    def from_json(cls, obj: dict) -> CategorySplit:
        return cls(base_ids=tuple(obj["base_ids"]), novel_ids=tuple(obj["novel_ids"]), spec=obj.get("spec", ""))


def _names_for(ids: Sequence[int], categories: Iterable[Category], which: str) -> list[str]:
    name_by_id = {c.id: c.name for c in categories}
    unknown = [i for i in ids if i not in name_by_id]
    if unknown:
        raise DataError(f"category split: {which} category ids {unknown} are not among the dataset's categories")
    return [name_by_id[i] for i in ids]


def normalised_name(name: str) -> str:
    """A category name as names are matched: case and surrounding spaces do not count."""
    return name.strip().lower()


def resolve_split(categories: Sequence[Category], spec: str = "auto", *, source: str | None = None) -> CategorySplit:
    """Turn a spec string (see the module docstring) into a `CategorySplit` over `categories`.

    `source` (the annotation file) prefixes error messages so they name the file. Every split must leave
    at least one base category: without one there is nothing to train the detector on.
    """
    prefix = f"{source}: " if source else ""
    spec = spec.strip()
    if spec == "auto":
        split = _resolve_auto(categories, prefix)
    elif spec == "coco48-17":
        split = _split_coco48_17(categories, prefix)
    elif spec == "lvis":
        split = _split_lvis(categories, prefix)
    elif spec == "field":
        split = _split_field(categories, prefix)
    elif spec.startswith("novel:"):
        names = [n for n in spec[len("novel:"):].split(",") if n.strip()]
        split = _split_novel_names(categories, names, prefix, spec, f"novel list {spec!r}")
    elif spec.startswith("novel-file:"):
        path = spec[len("novel-file:"):]
        split = _split_novel_names(categories, read_name_file(path), prefix, spec, path)
    else:
        raise DataError(f"{prefix}unknown category split {spec!r}: {SPEC_HELP}")
    if not split.base_ids:
        raise DataError(f"{prefix}category split {split.spec!r} leaves no base category to train on")
    return split


def _resolve_auto(categories: Sequence[Category], prefix: str) -> CategorySplit:
    with_split = sum(c.split is not None for c in categories)
    with_frequency = sum(c.frequency is not None for c in categories)
    if categories and with_split == len(categories):
        return _split_field(categories, prefix)
    if categories and with_frequency == len(categories):
        return _split_lvis(categories, prefix)
    missing = _missing_coco_ov_names(categories)
    if not missing:
        return _split_coco48_17(categories, prefix)
    lacking = next((c for c in categories if c.split is None), None) if with_split else None
    which = f" (not category id {lacking.id}, {lacking.name!r})" if lacking is not None else ""
    raise DataError(
        f"{prefix}cannot choose a category split automatically: {with_split} of {len(categories)} categories "
        f"have a 'split' field{which}, {with_frequency} have an LVIS 'frequency', and {len(missing)} of the 65 "
        f"COCO open-vocabulary names are missing; add 'split': 'base'|'novel' to every category or give a split:"
        f" {SPEC_HELP.removeprefix('use one of: auto, ')}"
    )


def _ids_by_name(categories: Sequence[Category], prefix: str) -> dict[str, int]:
    ids: dict[str, int] = {}
    for c in categories:
        key = normalised_name(c.name)
        if key in ids:
            raise DataError(f"{prefix}category names {c.name!r} (id {ids[key]}) and id {c.id} match the same name")
        ids[key] = c.id
    return ids


def _missing_coco_ov_names(categories: Sequence[Category]) -> list[str]:
    present = {normalised_name(c.name) for c in categories}
    return [n for n in COCO_OV_BASE_NAMES + COCO_OV_NOVEL_NAMES if n not in present]


def _split_coco48_17(categories: Sequence[Category], prefix: str) -> CategorySplit:
    missing = _missing_coco_ov_names(categories)
    if missing:
        raise DataError(
            f"{prefix}category split 'coco48-17' needs the 65 COCO open-vocabulary names; "
            f"{len(missing)} missing: {', '.join(missing)}"
        )
    ids = _ids_by_name(categories, prefix)
    return CategorySplit(
        base_ids=tuple(ids[n] for n in COCO_OV_BASE_NAMES),
        novel_ids=tuple(ids[n] for n in COCO_OV_NOVEL_NAMES),
        spec="coco48-17",
    )


def _split_lvis(categories: Sequence[Category], prefix: str) -> CategorySplit:
    base, novel = [], []
    for c in categories:
        freq = c.frequency
        if freq in LVIS_NOVEL_FREQUENCIES:
            novel.append(c.id)
        elif freq in LVIS_BASE_FREQUENCIES:
            base.append(c.id)
        elif freq is None:
            raise DataError(f"{prefix}category id {c.id} ({c.name!r}): no 'frequency' field for the 'lvis' split")
        else:
            raise DataError(
                f"{prefix}category id {c.id} ({c.name!r}): unknown LVIS frequency {freq!r} (expected r, c or f)"
            )
    return CategorySplit(base_ids=tuple(base), novel_ids=tuple(novel), spec="lvis")


def _split_field(categories: Sequence[Category], prefix: str) -> CategorySplit:
    base, novel = [], []
    for c in categories:
        value = c.split.strip().lower() if isinstance(c.split, str) else c.split
        if value == "base":
            base.append(c.id)
        elif value == "novel":
            novel.append(c.id)
        elif value is None:
            raise DataError(f"{prefix}category id {c.id} ({c.name!r}): no 'split' field for the 'field' split")
        else:
            raise DataError(f"{prefix}category id {c.id} ({c.name!r}): 'split' is {c.split!r}, expected base or novel")
    return CategorySplit(base_ids=tuple(base), novel_ids=tuple(novel), spec="field")


def _split_novel_names(
    categories: Sequence[Category], names: Sequence[str], prefix: str, spec: str, where: str
) -> CategorySplit:
    if not names:
        raise DataError(f"{prefix}{where}: no novel category names given")
    ids = _ids_by_name(categories, prefix)
    wanted = list(dict.fromkeys(normalised_name(n) for n in names))
    unknown = [n for n in wanted if n not in ids]
    if unknown:
        raise DataError(f"{prefix}{where}: unknown category names: {', '.join(unknown)}")
    novel = {ids[n] for n in wanted}
    base = [c.id for c in categories if c.id not in novel]
    return CategorySplit(base_ids=tuple(base), novel_ids=tuple(novel), spec=spec)


def read_name_file(path: str | os.PathLike, what: str = "novel-name file") -> list[str]:
    """The names of a file of one name a line; blank lines and lines starting with # are left out, and so is a
    UTF-8 byte-order mark (Windows editors write one: kept, it became part of the first name)."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{os.fspath(path)}: cannot read the {what} ({describe_error(exc)})") from exc
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]
