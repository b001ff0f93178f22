"""CocoDataset: parsing, validation messages, the box policy, lazy image checks and the training view."""

import json
import logging
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from vild_pipe.data.coco import Category, CocoDataset, ImageRecord, read_rgb_image
from vild_pipe.data.splits import CategorySplit
from vild_pipe.errors import DataError

# Image 1 is 32x24, image 2 is 20x16, image 3 has no boxes.
IMAGES = [
    {"id": 1, "file_name": "images/000001.png", "width": 32, "height": 24},
    {"id": 2, "file_name": "images/000002.png", "width": 20, "height": 16},
    {"id": 3, "file_name": "images/000003.png", "width": 8, "height": 8},
]
CATEGORIES = [
    {"id": 7, "name": "zebra", "split": "novel"},
    {"id": 3, "name": "cat", "split": "base"},
    {"id": 5, "name": "dog", "split": "base"},
]
ANNOTATIONS = [
    {"id": 10, "image_id": 1, "category_id": 3, "bbox": [2, 4, 10, 6]},
    {"id": 11, "image_id": 2, "category_id": 7, "bbox": [1.5, 2.5, 4, 3]},
    {"id": 12, "image_id": 1, "category_id": 7, "bbox": [20, 0, 5, 5], "iscrowd": 1},
    {"id": 13, "image_id": 1, "category_id": 5, "bbox": [0, 0, 3, 3]},
    {"id": 14, "image_id": 2, "category_id": 5, "bbox": [5, 5, 2, 2], "iscrowd": 0},
]


def write_coco(folder: Path, images=None, annotations=None, categories=None, name="val.json") -> Path:
    doc = {
        "images": IMAGES if images is None else images,
        "annotations": ANNOTATIONS if annotations is None else annotations,
        "categories": CATEGORIES if categories is None else categories,
    }
    path = folder / name
    path.write_text(json.dumps(doc))
    return path


def write_images(folder: Path, images=IMAGES) -> None:
    for rec in images:
        path = folder / rec["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (rec["width"], rec["height"]), color=rec["id"] * 40).save(path)


def test_lvis_v1_records_find_their_images_under_a_coco_folder_by_coco_url(tmp_path):
    """LVIS v1 images have no file_name: coco_url's FOLDER/FILE under --images (LVIS val mixes both folders)."""
    coco = tmp_path / "coco"
    images = [{"id": 9, "coco_url": "http://images.cocodataset.org/train2017/000000000009.jpg", "width": 32,
               "height": 24, "neg_category_ids": [2], "not_exhaustive_category_ids": []},
              {"id": 25, "coco_url": "http://images.cocodataset.org/val2017/000000000025.jpg", "width": 20,
               "height": 16, "neg_category_ids": [], "not_exhaustive_category_ids": [1]}]
    categories = [{"id": 1, "name": "aerosol_can", "frequency": "c", "synonyms": ["aerosol_can", "spray_can"],
                   "def": "a dispenser that holds a substance under pressure", "synset": "aerosol.n.02",
                   "image_count": 64, "instance_count": 109},
                  {"id": 2, "name": "bolo_tie", "frequency": "r", "synonyms": ["bolo_tie"], "def": "a cord tie",
                   "synset": "bolo_tie.n.01", "image_count": 1, "instance_count": 1}]
    annotations = [{"id": 1, "image_id": 9, "category_id": 1, "bbox": [2, 3, 10, 8], "area": 80.0,
                    "segmentation": [[2, 3, 12, 3, 12, 11]]},
                   {"id": 2, "image_id": 25, "category_id": 2, "bbox": [1, 1, 5, 5], "area": 25.0,
                    "segmentation": [[1, 1, 6, 1, 6, 6]]}]
    path = write_coco(tmp_path, images, annotations, categories, name="lvis_v1_val.json")
    for rec, folder in zip(images, ("train2017", "val2017")):
        (coco / folder).mkdir(parents=True)
        Image.new("RGB", (rec["width"], rec["height"])).save(coco / folder / f"{rec['id']:012d}.jpg")

    ds = CocoDataset.load(path, image_dir=coco, check_images=True).with_split("auto")
    assert [r.file_name for r in ds.images] == ["train2017/000000000009.jpg", "val2017/000000000025.jpg"]
    assert ds.open_image(25).size == (20, 16)
    assert ds.split.spec == "lvis" and ds.split.novel_ids == (2,)
    training = ds.training_view()
    assert training.annotations_for(9)[1].tolist() == [1] and training.annotations_for(25)[1].tolist() == []


def test_load_reads_records_boxes_and_categories(tmp_path):
    ds = CocoDataset.load(write_coco(tmp_path))

    assert len(ds) == 3
    assert ds.image_dir == tmp_path
    assert [r.id for r in ds.images] == [1, 2, 3]
    assert ds.images[1] == ImageRecord(2, "images/000002.png", 20, 16, tmp_path / "images/000002.png")
    assert ds.categories == [Category(3, "cat", "base"), Category(5, "dog", "base"), Category(7, "zebra", "novel")]
    assert ds.category_names == ["cat", "dog", "zebra"]
    assert [ds.category_index(i) for i in (3, 5, 7)] == [0, 1, 2]
    np.testing.assert_array_equal(ds.category_indices(np.array([7, 3, 3])), [2, 0, 0])
    with pytest.raises(KeyError):
        ds.category_index(4)

    boxes, cat_ids, crowd = ds.annotations_for(1)
    assert boxes.dtype == np.float32 and boxes.shape == (3, 4)
    assert cat_ids.dtype == np.int64 and crowd.dtype == bool
    np.testing.assert_array_equal(boxes, [[2, 4, 12, 10], [20, 0, 25, 5], [0, 0, 3, 3]])
    np.testing.assert_array_equal(cat_ids, [3, 7, 5])
    np.testing.assert_array_equal(crowd, [False, True, False])

    boxes, cat_ids, _ = ds.annotations_for(2)
    np.testing.assert_allclose(boxes, [[1.5, 2.5, 5.5, 5.5], [5, 5, 7, 7]])
    np.testing.assert_array_equal(cat_ids, [7, 5])

    boxes, cat_ids, crowd = ds.annotations_for(3)
    assert boxes.shape == (0, 4) and cat_ids.shape == (0,) and crowd.shape == (0,)
    assert not hasattr(ds, "raw")  # the parsed JSON is not held: gigabytes for COCO or LVIS train


def test_annotations_for_returns_copies(tmp_path):
    ds = CocoDataset.load(write_coco(tmp_path))
    boxes, _, _ = ds.annotations_for(1)
    boxes[:] = -1
    assert ds.annotations_for(1)[0].min() >= 0


def test_explicit_image_dir(tmp_path):
    (tmp_path / "annotations").mkdir()
    ann = write_coco(tmp_path / "annotations")
    write_images(tmp_path / "pictures")
    ds = CocoDataset.load(ann, image_dir=tmp_path / "pictures")
    assert ds.images[0].path == tmp_path / "pictures/images/000001.png"
    assert ds.open_image(ds.images[0]).size == (32, 24)


def test_partly_outside_boxes_are_clipped(tmp_path):
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [-5, 10, 20, 20]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [30, -2, 10, 4]},
    ]
    ds = CocoDataset.load(write_coco(tmp_path, annotations=annotations))
    boxes, _, _ = ds.annotations_for(1)
    np.testing.assert_array_equal(boxes, [[0, 10, 15, 24], [30, 0, 32, 2]])
    assert ds.skipped_degenerate == 0


def test_degenerate_boxes_are_skipped_and_counted(tmp_path, caplog):
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 0, 5]},      # zero width
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [2, 2, 5, -1]},     # negative height
        {"id": 3, "image_id": 1, "category_id": 5, "bbox": [40, 2, 5, 5]},     # right of the image
        {"id": 4, "image_id": 2, "category_id": 5, "bbox": [-9, 1, 9, 5]},     # touches x=0 from outside
        {"id": 5, "image_id": 2, "category_id": 5, "bbox": [1, 1, 5, 5]},      # fine
        # Positive in float64 but not in the float32 boxes are kept in (train-rpn's Faster R-CNN asserted on it):
        {"id": 6, "image_id": 1, "category_id": 5, "bbox": [31.9999999, 2, 5, 5]},   # border box, float noise
        {"id": 7, "image_id": 1, "category_id": 5, "bbox": [3, 3, 1e-6, 5]},          # a millionth of a pixel
        {"id": 8, "image_id": 1, "category_id": 5, "bbox": [3, 3, 0.02, 5]},          # small but a box: kept
    ]
    with caplog.at_level(logging.WARNING, logger="vild_pipe.data.coco"):
        ds = CocoDataset.load(write_coco(tmp_path, annotations=annotations))
    assert ds.skipped_degenerate == 6
    assert ds.num_boxes == 2
    boxes = ds.annotations_for(1)[0]
    assert boxes.dtype == np.float32 and boxes.shape == (1, 4) and (boxes[:, 2:] > boxes[:, :2]).all()
    np.testing.assert_array_equal(ds.annotations_for(2)[0], [[1, 1, 6, 6]])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{tmp_path / 'val.json'}: skipped 6 degenerate boxes (a side under 0.01 px, or outside the"
                        " image): annotation id 1, 2, 3, 4, 6, and 1 more"]


def _drop(record, key):
    return {k: v for k, v in record.items() if k != key}


def _first_annotation(**changes):
    """A mutation: the file holds only the first annotation, with `changes` applied."""
    return lambda doc: {**doc, "annotations": [{**ANNOTATIONS[0], **changes}]}


BAD_FILES = {
    "top level not an object": (lambda d: [d], "top level is a JSON list"),
    "missing categories": (lambda d: _drop(d, "categories"), "missing top-level key(s) 'categories'"),
    "images not a list": (lambda d: {**d, "images": {}}, "top-level 'images' is a JSON dict"),
    "image missing width": (
        lambda d: {**d, "images": [_drop(IMAGES[0], "width")] + IMAGES[1:]}, "image id 1: missing key(s) 'width'"),
    "image bad height": (
        lambda d: {**d, "images": IMAGES[:1] + [{**IMAGES[1], "height": 0}] + IMAGES[2:]},
        "image id 2: height must be a positive integer"),
    "image width NaN": (lambda d: {**d, "images": [{**IMAGES[0], "width": math.nan}] + IMAGES[1:]},
                        "image id 1: width must be a positive integer, got nan"),
    "image height 1e400": (lambda d: {**d, "images": [{**IMAGES[0], "height": math.inf}] + IMAGES[1:]},
                           "image id 1: height must be a positive integer, got inf"),
    "image width past float64": (lambda d: {**d, "images": [{**IMAGES[0], "width": 10 ** 400}] + IMAGES[1:]},
                                 "image id 1: width must be a positive integer"),
    "image not an object": (lambda d: {**d, "images": IMAGES + [3]}, "images[3]: is a JSON int"),
    "image without file_name": (lambda d: {**d, "images": [_drop(IMAGES[0], "file_name")] + IMAGES[1:]},
                                "image id 1: missing key 'file_name' (or LVIS's 'coco_url')"),
    "image bad coco_url": (lambda d: {**d, "images": [{**_drop(IMAGES[0], "file_name"), "coco_url": "x.jpg"}]},
                           "image id 1: coco_url must end in FOLDER/FILE, got 'x.jpg'"),
    "duplicate image id": (lambda d: {**d, "images": IMAGES + [{**IMAGES[0], "file_name": "x.png"}]},
                           "image id 1: duplicate image id"),
    "image id past int64": (lambda d: {**d, "images": IMAGES + [{**IMAGES[0], "id": 2**64 + 5}]},
                            f"image id {2**64 + 5}: id {2**64 + 5} does not fit in 64 bits"),
    "category id past int64": (lambda d: {**d, "categories": CATEGORIES + [{"id": 2**63, "name": "horse"}]},
                               f"category id {2**63}: id {2**63} does not fit in 64 bits"),
    "annotation missing bbox": (
        lambda d: {**d, "annotations": [_drop(ANNOTATIONS[0], "bbox")]}, "annotation id 10: missing key(s) 'bbox'"),
    "annotation without id": (
        lambda d: {**d, "annotations": ANNOTATIONS + [_drop(ANNOTATIONS[0], "id")]},
        "annotations[5]: missing key(s) 'id'"),
    "duplicate annotation id": (
        lambda d: {**d, "annotations": ANNOTATIONS + [{**ANNOTATIONS[1], "image_id": 3}]},
        "annotation id 11: duplicate annotation id"),
    "unknown image_id": (_first_annotation(image_id=99), "annotation id 10: unknown image_id 99"),
    "unknown category_id": (_first_annotation(category_id=4), "annotation id 10: unknown category_id 4"),
    "bbox nan": (_first_annotation(bbox=[1, 2, math.nan, 3]), "annotation id 10: bbox has a non-finite value"),
    "bbox inf": (_first_annotation(bbox=[1, math.inf, 3, 3]), "annotation id 10: bbox has a non-finite value"),
    "bbox past float64": (_first_annotation(bbox=[1, 2, 10 ** 400, 3]), "annotation id 10: bbox has a non-finite"),
    "iscrowd a string": (_first_annotation(iscrowd="0"), "annotation id 10: iscrowd must be 0 or 1, got '0'"),
    "iscrowd 2": (_first_annotation(iscrowd=2), "annotation id 10: iscrowd must be 0 or 1, got 2"),
    "bbox three numbers": (_first_annotation(bbox=[1, 2, 3]), "annotation id 10: bbox must be 4 numbers"),
    "bbox string": (_first_annotation(bbox=[1, 2, "3", 4]), "annotation id 10: bbox must be 4 numbers"),
    "category missing name": (
        lambda d: {**d, "categories": CATEGORIES + [{"id": 9}]}, "category id 9: missing key(s) 'name'"),
    "duplicate category id": (
        lambda d: {**d, "categories": CATEGORIES + [{"id": 5, "name": "horse"}]},
        "category id 5: duplicate category id"),
    "duplicate category name": (
        lambda d: {**d, "categories": CATEGORIES + [{"id": 9, "name": "Dog"}]},
        "category id 9: duplicate category name 'Dog' (also category id 5)"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_annotation_file_names_file_and_record(tmp_path, case):
    mutate, expected = BAD_FILES[case]
    doc = mutate({"images": IMAGES, "annotations": ANNOTATIONS, "categories": CATEGORIES})
    path = tmp_path / "val.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError) as info:
        CocoDataset.load(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert expected in message


def test_unreadable_and_non_json_files(tmp_path):
    with pytest.raises(DataError) as caught:
        CocoDataset.load(tmp_path / "missing.json")
    assert str(caught.value) == f"{tmp_path / 'missing.json'}: cannot read annotation file (no such file or directory)"
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON \(line 1 column 13"):
        CocoDataset.load(broken)
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match=r"binary\.json: "):
        CocoDataset.load(binary)


def test_open_image_decodes_rgb(tmp_path):
    write_images(tmp_path)
    ds = CocoDataset.load(write_coco(tmp_path))
    image = ds.open_image(ds.images[1])
    assert image.mode == "RGB" and image.size == (20, 16)
    assert np.asarray(image)[0, 0].tolist() == [80, 80, 80]
    assert ds.open_image(3).size == (8, 8)


@pytest.mark.parametrize("file_name, pillow_mode", [("grey16.png", None), ("grey16.tif", None),
                                                    ("grey16.png", "I")])
def test_sixteen_bit_grey_images_read_as_their_eight_bit_levels(tmp_path, monkeypatch, file_name, pillow_mode):
    """PIL's convert("RGB") clips 16-bit grey at 255, which made such a PNG or TIFF almost all white."""
    if pillow_mode:  # Pillow < 10.3 opens a 16-bit grey PNG as mode I (int32), not I;16
        monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), (pillow_mode, "I;16B"))
    levels = np.arange(32 * 24, dtype=np.uint16).reshape(24, 32) % 256
    Image.fromarray(levels * 257).save(tmp_path / file_name)
    with Image.open(tmp_path / file_name) as stored:
        # Pillow < 10.3 opens the PNG as "I" unpatched too: then the first case is the third one
        assert stored.mode == (pillow_mode or "I;16") or (file_name.endswith(".png") and stored.mode == "I")
    image = read_rgb_image(tmp_path / file_name)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), np.repeat(levels[..., None], 3, axis=2))


def test_a_palette_png_with_transparent_entries_reads_its_colours_without_a_warning(tmp_path, recwarn):
    """Transparent pixels keep the colour stored under them, as for RGBA; PIL's advice to convert such palettes
    (two lines per process) is not the user's concern."""
    index = np.zeros((8, 8), np.uint8)
    index[:4], index[4:, :4] = 1, 2
    image = Image.fromarray(index, "P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0])
    image.save(tmp_path / "palette.png", transparency=bytes([255, 0, 128]))
    pixels = np.asarray(read_rgb_image(tmp_path / "palette.png"))
    assert pixels[0, 0].tolist() == [255, 0, 0] and pixels[5, 0].tolist() == [0, 255, 0]
    assert pixels[5, 5].tolist() == [0, 0, 0] and not [w for w in recwarn if "Palette" in str(w.message)]


def test_image_problems_are_found_lazily(tmp_path):
    write_images(tmp_path)
    (tmp_path / IMAGES[0]["file_name"]).unlink()
    (tmp_path / IMAGES[1]["file_name"]).write_bytes(b"")
    ds = CocoDataset.load(write_coco(tmp_path))  # loading does not look at image files

    with pytest.raises(DataError, match=r"images/000001\.png: missing image file \(images are looked for beside"
                                        r" the annotation file; give --images FOLDER\)$"):
        ds.open_image(ds.images[0])
    with pytest.raises(DataError, match=r"images/000002\.png: zero-byte image file$"):
        ds.open_image(ds.images[1])
    assert ds.open_image(ds.images[2]).size == (8, 8)


def test_corrupt_and_truncated_images(tmp_path):
    write_images(tmp_path)
    (tmp_path / IMAGES[0]["file_name"]).write_bytes(b"this is not an image at all")
    good = (tmp_path / IMAGES[1]["file_name"]).read_bytes()
    (tmp_path / IMAGES[1]["file_name"]).write_bytes(good[: len(good) // 2])
    ds = CocoDataset.load(write_coco(tmp_path))

    for record in ds.images[:2]:
        with pytest.raises(DataError, match=r"\.png: cannot decode image \(truncated or not an image\)$"):
            ds.open_image(record)


def test_image_size_must_match_annotation_file(tmp_path):
    write_images(tmp_path)
    Image.new("RGB", (24, 32)).save(tmp_path / IMAGES[0]["file_name"])
    ds = CocoDataset.load(write_coco(tmp_path))
    with pytest.raises(DataError, match=r"000001\.png: image is 24x32 pixels but .*val\.json says 32x24 for image id"):
        ds.open_image(ds.images[0])


def test_a_size_mismatch_from_an_exif_turn_says_so(tmp_path):
    """Annotations made on the upright view of a file stored sideways: the message names the EXIF tag and the
    fix, since vild-pipe, like pycocotools-based tools, reads pixels as stored."""
    write_images(tmp_path)
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (24, 32)).save(tmp_path / IMAGES[0]["file_name"], exif=exif.tobytes())
    Image.new("RGB", (16, 20)).save(tmp_path / IMAGES[1]["file_name"])  # swapped too, but no tag: no hint
    ds = CocoDataset.load(write_coco(tmp_path))
    with pytest.raises(DataError, match=r"000001\.png: image is 24x32 pixels but .*says 32x24 for image id 1; the"
                                        r" file's EXIF orientation tag \(8\) turns it to 32x24, .*exiftran -ai"):
        ds.open_image(ds.images[0])
    with pytest.raises(DataError, match=r"000002\.png: image is 16x20 pixels but .*says 20x16 for image id 2$"):
        ds.open_image(ds.images[1])


def test_a_tiff_is_read_upright_as_pil_reads_it_and_never_turned_twice(tmp_path):
    """PIL applies a TIFF's own orientation tag when it decodes one (Pillow before 10.1 left the tag for
    exif_transpose to apply again): a TIFF comes upright either way, and its size mismatch blames no EXIF turn."""
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = np.arange(24 * 32 * 3, dtype=np.uint8).reshape(24, 32, 3)
    write_images(tmp_path)
    path = tmp_path / "images" / "000001.tif"
    Image.fromarray(stored).save(path, exif=exif)
    upright = np.rot90(stored, -1)
    np.testing.assert_array_equal(np.asarray(read_rgb_image(path)), upright)
    np.testing.assert_array_equal(np.asarray(read_rgb_image(path, upright=True)), upright)
    ds = CocoDataset.load(write_coco(tmp_path, [{**IMAGES[0], "file_name": "images/000001.tif"}, *IMAGES[1:]]))
    with pytest.raises(DataError, match=r"000001\.tif: image is 24x32 pixels but .*says 32x24 for image id 1$"):
        ds.open_image(ds.images[0])


def test_a_photo_whose_exif_pil_cannot_write_back_is_turned_upright_without_warnings(tmp_path, recwarn):
    """A camera's EXIF with a tag of the wrong type (ResolutionUnit as a fraction): ImageOps.exif_transpose
    fails rewriting it (struct.error), though the orientation reads fine."""
    entries = [(0x0112, 3, struct.pack("<IHH", 1, 6, 0)), (0x0128, 5, struct.pack("<II", 1, 38))]
    ifd = b"".join(struct.pack("<HH", tag, kind) + value for tag, kind, value in entries)
    exif = b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, len(entries)) + ifd + struct.pack("<III", 0, 2, 1)
    Image.new("RGB", (40, 20), (200, 10, 10)).save(tmp_path / "camera.jpg", exif=exif)
    assert read_rgb_image(tmp_path / "camera.jpg").size == (40, 20)
    assert read_rgb_image(tmp_path / "camera.jpg", upright=True).size == (20, 40)
    assert not recwarn.list


def test_check_images_up_front(tmp_path):
    ann = write_coco(tmp_path)
    write_images(tmp_path)
    assert len(CocoDataset.load(ann, check_images=True)) == 3

    (tmp_path / IMAGES[2]["file_name"]).write_bytes(b"")
    with pytest.raises(DataError, match=r"000003\.png: zero-byte image file \(image id 3 of .*val\.json\)$"):
        CocoDataset.load(ann, check_images=True)

    (tmp_path / IMAGES[0]["file_name"]).unlink()
    with pytest.raises(DataError, match=r"000001\.png: missing image file \(image id 1 of .*; 1 more images"):
        CocoDataset.load(ann, check_images=True)


def test_a_missing_image_hints_at_the_images_option_only_where_no_folder_was_given(tmp_path):
    """Forgetting --images is the usual first mistake: the default folder (the annotation file's) is named."""
    ann = write_coco(tmp_path)
    write_images(tmp_path)
    (tmp_path / IMAGES[0]["file_name"]).unlink()
    hint = "images are looked for beside the annotation file; give --val-images FOLDER"
    defaulted = CocoDataset.load(ann, images_option="--val-images").training_view("auto")  # views keep the hint
    with pytest.raises(DataError) as lazily:
        defaulted.open_image(defaulted.images[0])
    with pytest.raises(DataError) as up_front:
        CocoDataset.load(ann, check_images=True, images_option="--val-images")
    assert str(lazily.value) == f"{tmp_path / IMAGES[0]['file_name']}: missing image file ({hint})"
    assert str(up_front.value) == (f"{tmp_path / IMAGES[0]['file_name']}: missing image file (image id 1 of {ann};"
                                   f" {hint})")

    given = CocoDataset.load(ann, image_dir=tmp_path)
    with pytest.raises(DataError, match=r"000001\.png: missing image file$"):
        given.open_image(given.images[0])
    with pytest.raises(DataError, match=r"000001\.png: missing image file \(image id 1 of [^;]*\)$"):
        CocoDataset.load(ann, image_dir=tmp_path, check_images=True)
    (tmp_path / IMAGES[1]["file_name"]).write_bytes(b"")
    empty_only = CocoDataset.load(ann)   # found, but empty: where it was looked for is not the problem
    with pytest.raises(DataError, match=r"000002\.png: zero-byte image file$"):
        empty_only.open_image(empty_only.images[1])


def test_training_view_drops_novel_annotations_and_keeps_images(tmp_path):
    ds = CocoDataset.load(write_coco(tmp_path))
    train = ds.training_view("field")

    assert train.split == CategorySplit(base_ids=(3, 5), novel_ids=(7,))
    assert len(train) == len(ds) and train.images is ds.images
    assert train.categories == ds.categories
    boxes, cat_ids, crowd = train.annotations_for(1)
    np.testing.assert_array_equal(cat_ids, [3, 5])
    np.testing.assert_array_equal(boxes, [[2, 4, 12, 10], [0, 0, 3, 3]])
    assert not crowd.any()
    np.testing.assert_array_equal(train.annotations_for(2)[1], [5])
    assert train.num_boxes == 3

    # the full dataset is untouched
    assert ds.num_boxes == 5
    np.testing.assert_array_equal(ds.annotations_for(2)[1], [7, 5])


def test_training_view_removes_categories_outside_the_split(tmp_path):
    ds = CocoDataset.load(write_coco(tmp_path))
    split = CategorySplit(base_ids=(3,), novel_ids=(7,))  # dog (5) is in neither list
    train = ds.training_view(split)
    assert set(np.concatenate([train.annotations_for(i)[1] for i in (1, 2, 3)]).tolist()) == {3}


def test_with_split_keeps_every_annotation(tmp_path):
    ds = CocoDataset.load(write_coco(tmp_path))
    full = ds.with_split()  # "auto" finds the split fields
    assert full.split.novel_ids == (7,)
    assert full.num_boxes == ds.num_boxes
    np.testing.assert_array_equal(full.annotations_for(1)[1], [3, 7, 5])
    assert full.training_view().num_boxes == 3

    with pytest.raises(DataError, match=r"val\.json: a training view needs a category split"):
        ds.training_view()
    with pytest.raises(DataError, match=r"val\.json: category split names category ids \[99\]"):
        ds.with_split(CategorySplit(base_ids=(3, 99), novel_ids=()))
