"""What `detect` hands the user: the image with its detections drawn, and a COCO-format JSON of them.

Drawing aims at legibility on the synthetic world's 192-pixel images as much as on photos: the label font
and line width follow the image size, each label sits on a box of its class colour with black or white
text (whichever contrasts), above the box when there is room and inside it otherwise, never off the image.
Colours come from the label text, so a category has the same colour in every image of a run.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, features

from vild_pipe.pipeline.evaluation import xyxy_to_xywh
from vild_pipe.pipeline.shards import write_json_atomically

PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128),
)
"""Sasha Trubetskoy's distinct colours, less grey (lost on grey pictures); white and black are label text."""

MIN_FONT_SIZE = 10
MAX_FONT_SIZE = 28


def class_colour(label: str) -> tuple[int, int, int]:
    """The colour of `label`: stable across images and runs (CRC32 of the name, not Python's salted hash)."""
    return PALETTE[zlib.crc32(label.encode("utf-8")) % len(PALETTE)]


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at `size` pixels; its fixed 11-pixel bitmap where Pillow lacks FreeType."""
    if features.check("freetype2"):
        return ImageFont.load_default(size=size)
    return ImageFont.load_default()


def _as_array(values: torch.Tensor | np.ndarray | Sequence, dtype) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def draw_detections(image: Image.Image, boxes: torch.Tensor | np.ndarray | Sequence,
                    labels: Sequence[str], scores: torch.Tensor | np.ndarray | Sequence,
                    font_size: int | None = None, line_width: int | None = None) -> Image.Image:
    """A copy of `image` (RGB, same size) with each box (xyxy pixels), its label and score drawn.

    Lower scores are drawn first so the best detections stay on top where boxes overlap. `font_size` and
    `line_width` default to values that follow the image's shorter side.
    """
    boxes = _as_array(boxes, np.float64).reshape(-1, 4)
    scores = _as_array(scores, np.float64).reshape(-1)
    if not len(boxes) == len(labels) == len(scores):
        raise ValueError(f"{len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores do not match")
    canvas = image.convert("RGB")
    width, height = canvas.size
    short_side = min(width, height)
    if font_size is None:
        font_size = int(np.clip(round(short_side / 16), MIN_FONT_SIZE, MAX_FONT_SIZE))
    if line_width is None:
        line_width = max(1, round(short_side / 200))
    font = _font(font_size)
    draw = ImageDraw.Draw(canvas)
    for index in np.argsort(scores, kind="stable"):
        colour = class_colour(labels[index])
        x1, y1, x2, y2 = np.clip(boxes[index], 0, [width - 1, height - 1, width - 1, height - 1]).tolist()
        draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=colour, width=line_width)
        _draw_label(draw, f"{labels[index]} {scores[index]:.2f}", (x1, y1), colour, font, (width, height))
    return canvas


def _draw_label(draw: ImageDraw.ImageDraw, text: str, corner: tuple[float, float], colour: tuple[int, int, int],
                font, image_size: tuple[int, int]) -> None:
    """`text` on a filled box at the top-left `corner` of a detection: above it if it fits, else inside."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    text_width, text_height = right - left + 2, bottom - top + 2
    x, y = corner
    y = y - text_height if y - text_height >= 0 else y
    x = max(0.0, min(x, image_size[0] - text_width))
    y = max(0.0, min(y, image_size[1] - text_height))
    draw.rectangle([x, y, x + text_width, y + text_height], fill=colour)
    draw.text((x + 1 - left, y + 1 - top), text, fill=_text_colour(colour), font=font)


@dataclass
class ImageDetections:
    """One image's detections for the JSON of `detect`: boxes (N, 4) xyxy pixels, scores (N,), and
    class_index (N,) into the vocabulary."""

    file_name: str
    width: int
    height: int
    boxes: np.ndarray
    scores: np.ndarray
    class_index: np.ndarray


def detections_document(images: Sequence[ImageDetections], category_names: Sequence[str],
                        info: dict | None = None) -> dict:
    """A COCO-format dict of detections on images that have no ground truth.

    images (id 1..), categories (the vocabulary, id = index + 1), and annotations carrying `score` and
    `category_name` beside the usual id, image_id, category_id, bbox [x, y, w, h], area and iscrowd, so the
    file reads in pycocotools, in `CocoDataset.load`, and by eye. `info`, COCO's own header, says what made
    them (models and settings), so the file can be read and reproduced later.
    """
    document: dict = {
        **({"info": info} if info is not None else {}),
        "images": [],
        "categories": [{"id": index + 1, "name": name} for index, name in enumerate(category_names)],
        "annotations": [],
    }
    annotations = document["annotations"]
    for image_id, detections in enumerate(images, start=1):
        document["images"].append({"id": image_id, "file_name": detections.file_name,
                                   "width": int(detections.width), "height": int(detections.height)})
        xywh = np.round(xyxy_to_xywh(_as_array(detections.boxes, np.float64)), 2)
        scores = _as_array(detections.scores, np.float64).reshape(-1).tolist()
        classes = _as_array(detections.class_index, np.int64).reshape(-1).tolist()
        for box, score, class_index in zip(xywh.tolist(), scores, classes):
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": class_index + 1,
                "category_name": category_names[class_index],
                "bbox": box,
                "area": round(box[2] * box[3], 2),
                "iscrowd": 0,
                "score": score,
            })
    return document


def write_detections_json(path: str | os.PathLike, images: Sequence[ImageDetections],
                          category_names: Sequence[str], info: dict | None = None) -> None:
    """Write `detections_document(images, category_names, info)` to `path` atomically."""
    write_json_atomically(path, detections_document(images, category_names, info), indent=1)
