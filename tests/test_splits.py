"""Category splits: every spec source, auto-detection, and the one-line errors."""

import json
import re

import numpy as np
import pytest

from vild_pipe.data.coco import Category, CocoDataset
from vild_pipe.data.splits import COCO_OV_BASE_NAMES, COCO_OV_NOVEL_NAMES, CategorySplit, resolve_split
from vild_pipe.errors import DataError

OUTSIDE_COCO_OV = ["traffic light", "fire hydrant", "hair drier"]


def coco_categories(drop=()):
    """The 65 COCO OV names plus some of the 15 left out, with ids in a shuffled order and COCO-ish casing."""
    names = [n for n in COCO_OV_NOVEL_NAMES + COCO_OV_BASE_NAMES if n not in drop] + OUTSIDE_COCO_OV
    rng = np.random.default_rng(0)
    ids = rng.permutation(len(names)) + 1
    return [Category(int(i), n.upper() if n == "tv" else n) for i, n in zip(ids, names)]


def simple_categories(**fields):
    """cat/dog/zebra/okapi with ids 1..4; `fields` maps a field name to its four values."""
    cats = []
    for index, name in enumerate(["cat", "dog", "zebra", "okapi"]):
        extra = {key: values[index] for key, values in fields.items()}
        cats.append(Category(index + 1, name, **extra))
    return cats


def test_coco48_17():
    cats = coco_categories()
    split = resolve_split(cats, "coco48-17")
    id_of = {c.name.lower(): c.id for c in cats}
    assert len(split.base_ids) == 48 and len(split.novel_ids) == 17
    assert split.is_novel(id_of["couch"]) and not split.is_base(id_of["couch"])
    assert split.is_base(id_of["tv"]) and not split.is_novel(id_of["tv"])
    for name in OUTSIDE_COCO_OV:
        assert not split.is_base(id_of[name]) and not split.is_novel(id_of[name])
    assert set(split.novel_names(cats)) == set(COCO_OV_NOVEL_NAMES)
    assert "TV" in split.base_names(cats)
    assert split.base_ids == tuple(sorted(split.base_ids))
    assert split.spec == "coco48-17"


def test_coco48_17_needs_all_65_names():
    with pytest.raises(DataError, match=r"val\.json: category split 'coco48-17' needs .* 2 missing: tv, couch$"):
        resolve_split(coco_categories(drop=("couch", "tv")), "coco48-17", source="val.json")


def test_lvis_frequency():
    split = resolve_split(simple_categories(frequency=["f", "c", "r", "r"]), "lvis")
    assert split == CategorySplit(base_ids=(1, 2), novel_ids=(3, 4))
    assert split.spec == "lvis"
    with pytest.raises(DataError, match=r"lvis\.json: category id 2 \('dog'\): no 'frequency' field"):
        resolve_split(simple_categories(frequency=["f", None, "r", "r"]), "lvis", source="lvis.json")
    with pytest.raises(DataError, match=r"category id 3 \('zebra'\): unknown LVIS frequency 'x'"):
        resolve_split(simple_categories(frequency=["f", "c", "x", "r"]), "lvis")


def test_split_field():
    split = resolve_split(simple_categories(split=["base", "novel", "Base", "novel"]), "field")
    assert split == CategorySplit(base_ids=(1, 3), novel_ids=(2, 4))
    with pytest.raises(DataError, match=r"category id 4 \('okapi'\): no 'split' field"):
        resolve_split(simple_categories(split=["base", "novel", "base", None]), "field")
    with pytest.raises(DataError, match=r"category id 1 \('cat'\): 'split' is 'seen', expected base or novel"):
        resolve_split(simple_categories(split=["seen", "novel", "base", "base"]), "field")


def test_novel_name_list():
    split = resolve_split(simple_categories(), "novel: Zebra ,okapi,zebra")
    assert split == CategorySplit(base_ids=(1, 2), novel_ids=(3, 4))
    assert split.novel_names(simple_categories()) == ["zebra", "okapi"]
    with pytest.raises(DataError, match=r"unknown category names: unicorn, yeti$"):
        resolve_split(simple_categories(), "novel:zebra,unicorn,yeti")
    with pytest.raises(DataError, match=r"no novel category names given"):
        resolve_split(simple_categories(), "novel:")
    with pytest.raises(DataError, match=r"leaves no base category"):
        resolve_split(simple_categories(), "novel:cat,dog,zebra,okapi")


def test_novel_name_file(tmp_path):
    names = tmp_path / "novel.txt"
    names.write_text("# rare animals\n\nzebra\n  okapi  \n")
    split = resolve_split(simple_categories(), f"novel-file:{names}")
    assert split == CategorySplit(base_ids=(1, 2), novel_ids=(3, 4))

    names.write_text("zebra\nunicorn\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(names))}: unknown category names: unicorn$"):
        resolve_split(simple_categories(), f"novel-file:{names}")
    with pytest.raises(DataError) as caught:
        resolve_split(simple_categories(), f"novel-file:{tmp_path / 'absent.txt'}")
    assert str(caught.value) == (f"{tmp_path / 'absent.txt'}: cannot read the novel-name file (no such file or"
                                 " directory)")
    names.write_bytes("\ufeffzebra\r\nokapi\r\n".encode("utf-8"))   # a Windows editor's file: BOM, CRLF
    assert resolve_split(simple_categories(), f"novel-file:{names}").novel_ids == (3, 4)


def test_auto_prefers_field_then_lvis_then_coco():
    both = simple_categories(split=["novel", "base", "base", "base"], frequency=["f", "f", "r", "r"])
    assert resolve_split(both, "auto").novel_ids == (1,)
    assert resolve_split(both, "auto").spec == "field"

    some_split = simple_categories(split=["novel", None, None, None], frequency=["f", "f", "r", "r"])
    assert resolve_split(some_split, "auto") == CategorySplit(base_ids=(1, 2), novel_ids=(3, 4))

    split = resolve_split(coco_categories())
    assert split.spec == "coco48-17" and len(split.novel_ids) == 17


def test_auto_explains_when_nothing_fits():
    cats = simple_categories(split=["novel", None, None, None])
    with pytest.raises(DataError) as info:
        resolve_split(cats, "auto", source="mine.json")
    message = str(info.value)
    assert message.startswith("mine.json: cannot choose a category split automatically")
    names = [c.name for c in cats]
    assert f"1 of 4 categories have a 'split' field (not category id 2, {names[1]!r})" in message
    assert message.endswith("give a split: coco48-17, lvis, field, novel:NAME,NAME,..., novel-file:PATH")


def test_unknown_spec():
    with pytest.raises(DataError, match=r"unknown category split 'coco80'.*use one of"):
        resolve_split(simple_categories(), "coco80")


def test_category_split_value_behaviour():
    split = CategorySplit(base_ids=(5, 2, 2), novel_ids=(9,), spec="field")
    assert split.base_ids == (2, 5)
    np.testing.assert_array_equal(split.novel_mask(np.array([9, 2, 7])), [True, False, False])
    np.testing.assert_array_equal(split.base_mask(np.array([9, 2, 5])), [False, True, True])
    restored = CategorySplit.from_json(json.loads(json.dumps(split.to_json())))
    assert restored == split and restored.spec == "field"
    with pytest.raises(DataError, match=r"ids \[2\] are both base and novel"):
        CategorySplit(base_ids=(1, 2), novel_ids=(2,))
    with pytest.raises(DataError, match=r"novel category ids \[9\] are not among"):
        split.novel_names(simple_categories())


def test_dataset_split_errors_name_the_annotation_file(tmp_path):
    doc = {
        "images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],
        "annotations": [],
        "categories": [{"id": 1, "name": "cat", "frequency": "f"}, {"id": 2, "name": "dog"}],
    }
    path = tmp_path / "val.json"
    path.write_text(json.dumps(doc))
    ds = CocoDataset.load(path)
    assert ds.categories[0] == Category(1, "cat", None, "f")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: category id 2 \('dog'\): no 'frequency' field"):
        ds.with_split("lvis")
    assert ds.with_split("novel:dog").split == CategorySplit(base_ids=(1,), novel_ids=(2,))
