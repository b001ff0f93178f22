import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from vild_pipe.data.coco import CocoDataset
from vild_pipe.pipeline.drawing import (
    ImageDetections,
    class_colour,
    detections_document,
    draw_detections,
    write_detections_json,
)


def grey_image(width: int = 192, height: int = 160) -> Image.Image:
    return Image.new("RGB", (width, height), (128, 128, 128))


def test_draw_detections_writes_a_png_of_the_right_size_with_box_edges(tmp_path):
    image = grey_image()
    boxes = torch.tensor([[40.0, 60.0, 120.0, 140.0], [100.0, 20.0, 180.0, 70.0]])
    drawn = draw_detections(image, boxes, ["cat", "zebra"], torch.tensor([0.91, 0.42]))
    path = tmp_path / "out.png"
    drawn.save(path)
    reloaded = np.asarray(Image.open(path).convert("RGB"))
    assert reloaded.shape == (160, 192, 3)
    assert np.asarray(image).min() == 128  # the input is left as it was

    changed = (reloaded != 128).any(axis=2)
    assert changed[100, 40] and changed[100, 120]  # left and right edges of the first box, below its label
    assert changed[140, 80]  # bottom edge
    assert not changed[100, 80] and not changed[150, 10]  # inside the box and far outside stay grey
    assert tuple(reloaded[100, 40]) == class_colour("cat")
    assert tuple(reloaded[60, 180]) == class_colour("zebra")  # second box's right edge


def test_labels_are_drawn_above_the_box_or_inside_at_the_top_edge():
    drawn = np.asarray(draw_detections(grey_image(), [[50, 80, 150, 150], [0, 0, 60, 60]], ["dog", "cat"],
                                       [0.5, 0.6]))
    changed = (drawn != 128).any(axis=2)
    assert changed[70:80, 52:70].sum() > 20  # label strip above the first box
    assert changed[2:10, 2:30].sum() > 20  # no room above the second: label inside it


def test_no_detections_leave_the_image_unchanged_and_lengths_must_match():
    image = grey_image(64, 48).convert("L")
    drawn = draw_detections(image, np.zeros((0, 4)), [], np.zeros(0))
    assert drawn.mode == "RGB" and drawn.size == (64, 48)
    assert np.asarray(drawn).min() == 128
    with pytest.raises(ValueError, match="do not match"):
        draw_detections(image, [[0, 0, 5, 5]], ["a", "b"], [0.5])


def test_class_colours_are_stable_and_distinguish_names():
    assert class_colour("cat") == class_colour("cat")
    assert len({class_colour(name) for name in ["cat", "dog", "zebra", "yak", "kite", "bus"]}) >= 4


def test_detection_json_for_images_without_ground_truth(tmp_path):
    images = [
        ImageDetections("a.png", 192, 160, np.array([[10.0, 20.0, 50.0, 80.0], [0, 0, 4, 4]]),
                        np.array([0.9, 0.25]), np.array([1, 0])),
        ImageDetections("b.jpg", 64, 64, np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=int)),
        ImageDetections("c.png", 100, 90, torch.tensor([[5.0, 5.0, 25.5, 15.0]]), torch.tensor([0.5]),
                        torch.tensor([1])),
    ]
    path = tmp_path / "detections.json"
    write_detections_json(path, images, ["cat", "zebra"])
    document = json.loads(path.read_text())
    assert document == detections_document(images, ["cat", "zebra"])
    assert [img["file_name"] for img in document["images"]] == ["a.png", "b.jpg", "c.png"]
    assert document["images"][0] == {"id": 1, "file_name": "a.png", "width": 192, "height": 160}
    first, second, third = document["annotations"]
    assert (first["category_name"], first["category_id"], first["bbox"], first["score"]) == (
        "zebra", 2, [10.0, 20.0, 40.0, 60.0], 0.9)
    assert (second["category_name"], second["image_id"]) == ("cat", 1)
    assert (third["image_id"], third["bbox"], third["area"]) == (3, [5.0, 5.0, 20.5, 10.0], 205.0)
    assert len({ann["id"] for ann in document["annotations"]}) == 3

    coco = COCO(str(path))  # readable as COCO ground truth / pseudo-labels
    assert len(coco.getAnnIds(imgIds=[1])) == 2
    dataset = CocoDataset.load(path)
    assert dataset.category_names == ["cat", "zebra"] and dataset.num_boxes == 3
