"""The synthetic open-vocabulary world: shapes on cluttered, textured backgrounds, split into base and novel.

No dataset can be downloaded here, so the project makes its own. Each category is a silhouette; colour, fill,
outline, size, aspect and pose vary per instance, and the background carries texture and thin clutter, so a
detector has to learn form rather than colour. Four novel names (moon, bolt, flower, hourglass) share no word
with any base name: a text embedding alone cannot reach them, only visual knowledge distilled from a teacher
can, which is what ViLD is meant to show. "hollow square" shares "square" with a base name (the
compositional case).

Everything an image holds follows from one `numpy.random.Generator` (see `image_rng`), so a world is
reproducible image by image, in any order, on any number of workers.
"""

from __future__ import annotations

import colorsys
import math
import zlib
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Bump when anything below changes the pixels or boxes, so a stored world is never mistaken for a new one.
WORLD_VERSION = 5   # 4 was a dropped experiment (rare novel categories, bench/RESULTS.md)

# A shape is a list of parts drawn in order: a polygon in unit coordinates ([-1, 1] on both axes, y down)
# and whether it adds to the shape (True) or cuts a hole (False).
Part = tuple[np.ndarray, bool]

MIN_OBJECTS, MAX_OBJECTS = 6, 12   # v3: 2-6 gave a detector trained from scratch too few boxes (~160 a category)
MIN_SIDE, MAX_SIDE = 0.10, 0.42          # nominal side length, as a fraction of the image side
ASPECT_JITTER = 1.15                      # width/height stretched by up to this factor either way
MAX_HIDDEN = 0.2                          # at most this fraction of an object's pixels may be covered (v5: was 0.4)
MAX_BOX_IOU = 0.5                         # boxes of one image overlap less than this
MAX_OUTSIDE = 0.15                        # fraction of the nominal side that may lie outside the image
SUPERSAMPLE = 4                           # shapes are drawn at 4x and box-filtered down: clean edges


def _disc(cx: float = 0.0, cy: float = 0.0, r: float = 1.0, n: int = 64) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _regular_polygon(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + np.arange(n) * 2.0 * np.pi / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _poly(*points: tuple[float, float]) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


def _circle(rng: np.random.Generator) -> list[Part]:
    return [(_disc(), True)]


def _square(rng: np.random.Generator) -> list[Part]:
    return [(_poly((-1, -1), (1, -1), (1, 1), (-1, 1)), True)]


def _triangle(rng: np.random.Generator) -> list[Part]:
    return [(_poly((0, -1), (1, 0.9), (-1, 0.9)), True)]


def _star(rng: np.random.Generator) -> list[Part]:
    t = -np.pi / 2 + np.arange(10) * np.pi / 5
    radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return [(np.stack([radius * np.cos(t), 0.1 + radius * np.sin(t)], axis=1), True)]


def _cross(rng: np.random.Generator) -> list[Part]:
    a = 1.0 / 3.0
    return [(_poly((-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
                   (-1, -a), (-a, -a)), True)]


def _heart(rng: np.random.Generator) -> list[Part]:
    t = np.linspace(0.0, 2.0 * np.pi, 96, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    points = np.stack([x, y], axis=1)
    lo, hi = points.min(axis=0), points.max(axis=0)
    return [(2.0 * (points - lo) / (hi - lo) - 1.0, True)]


def _ring(rng: np.random.Generator) -> list[Part]:
    return [(_disc(), True), (_disc(r=0.5), False)]


def _arrow(rng: np.random.Generator) -> list[Part]:
    # A broad head on a short, thick shaft: a centre crop of its box (CLIP's preprocess) still shows the head.
    return [(_poly((-1, -0.28), (0.0, -0.28), (0.0, -0.85), (1, 0), (0.0, 0.85), (0.0, 0.28), (-1, 0.28)), True)]


def _diamond(rng: np.random.Generator) -> list[Part]:
    # Width : height = 1 : 1.6, so no rotation or stretch within the limits turns it into a square.
    return [(_poly((0, -1), (0.625, 0), (0, 1), (-0.625, 0)), True)]


def _tee(rng: np.random.Generator) -> list[Part]:
    return [(_poly((-1, -1), (1, -1), (1, -0.45), (0.3, -0.45), (0.3, 1), (-0.3, 1), (-0.3, -0.45),
                   (-1, -0.45)), True)]


def _moon(rng: np.random.Generator) -> list[Part]:
    offset = rng.uniform(0.45, 0.6)
    return [(_disc(), True), (_disc(cx=offset, cy=-0.1, r=0.85), False)]


def _bolt(rng: np.random.Generator) -> list[Part]:
    return [(_poly((0.15, -1), (0.65, -1), (0.15, -0.15), (0.6, -0.15), (-0.4, 1), (-0.05, 0.12),
                   (-0.5, 0.12)), True)]


def _flower(rng: np.random.Generator) -> list[Part]:
    petals = int(rng.integers(5, 7))
    phase = rng.uniform(0.0, 2.0 * np.pi)
    centres = _regular_polygon(petals, radius=0.66, phase=phase)
    return [(_disc(r=0.36), True)] + [(_disc(cx, cy, r=0.34, n=40), True) for cx, cy in centres]


def _hourglass(rng: np.random.Generator) -> list[Part]:
    return [(_poly((-0.8, -1), (0.8, -1), (0.07, 0), (0.8, 1), (-0.8, 1), (-0.07, 0)), True)]


def _hollow_square(rng: np.random.Generator) -> list[Part]:
    return [(_poly((-1, -1), (1, -1), (1, 1), (-1, 1)), True),
            (_poly((-0.55, -0.55), (0.55, -0.55), (0.55, 0.55), (-0.55, 0.55)), False)]


class ShapeCategory(NamedTuple):
    name: str
    split: str                                           # "base" or "novel"
    draw: Callable[[np.random.Generator], list[Part]]    # the silhouette, in unit coordinates
    max_rotation: float                                  # degrees either way


# Category id = position + 1. Square-like shapes rotate less so square, diamond and hollow square stay apart;
# arrow, moon and bolt look like themselves at any angle.
CATEGORIES: tuple[ShapeCategory, ...] = (
    ShapeCategory("circle", "base", _circle, 20.0),
    ShapeCategory("square", "base", _square, 15.0),
    ShapeCategory("triangle", "base", _triangle, 20.0),
    ShapeCategory("star", "base", _star, 20.0),
    ShapeCategory("cross", "base", _cross, 20.0),
    ShapeCategory("heart", "base", _heart, 20.0),
    ShapeCategory("ring", "base", _ring, 20.0),
    ShapeCategory("arrow", "base", _arrow, 180.0),
    ShapeCategory("diamond", "base", _diamond, 15.0),
    ShapeCategory("tee", "base", _tee, 20.0),
    ShapeCategory("moon", "novel", _moon, 180.0),
    ShapeCategory("bolt", "novel", _bolt, 180.0),
    ShapeCategory("flower", "novel", _flower, 20.0),
    ShapeCategory("hourglass", "novel", _hourglass, 20.0),
    ShapeCategory("hollow square", "novel", _hollow_square, 15.0),
)
BASE_IDS: tuple[int, ...] = tuple(i + 1 for i, c in enumerate(CATEGORIES) if c.split == "base")
NOVEL_IDS: tuple[int, ...] = tuple(i + 1 for i, c in enumerate(CATEGORIES) if c.split == "novel")


def coco_categories() -> list[dict]:
    """The COCO `categories` list of the world, each with its `split`."""
    return [{"id": i + 1, "name": c.name, "supercategory": "shape", "split": c.split}
            for i, c in enumerate(CATEGORIES)]


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator that decides everything in image `index` of `split`: independent of any other image."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(split.encode()), int(index)]))


@dataclass(frozen=True)
class DrawnObject:
    """One object as it ends up in the image: `mask` holds its visible pixels (later objects cut it)."""

    category_id: int
    mask: np.ndarray                               # (H, W) bool
    bbox: tuple[float, float, float, float]        # COCO x, y, w, h: the tight box of `mask`
    area: int                                      # pixels in `mask`
    hidden: float = 0.0                            # share of the shape's pixels that later objects cover


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight COCO box of a boolean mask: pixel i covers [i, i + 1)."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    return (float(xs[0]), float(ys[0]), float(xs[-1] + 1 - xs[0]), float(ys[-1] + 1 - ys[0]))


def shape_alpha(parts: list[Part], image_size: int, center: tuple[float, float], side: float,
                aspect: float = 1.0, angle_deg: float = 0.0) -> np.ndarray:
    """Anti-aliased coverage (H, W) in [0, 1] of a shape whose unit square maps to a `side`-pixel box.

    `aspect` stretches width over height (area kept); `angle_deg` turns it clockwise on screen.
    """
    half = side / 2.0
    scale = np.array([half * math.sqrt(aspect), half / math.sqrt(aspect)])
    theta = math.radians(angle_deg)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    placed = [((points * scale) @ rotation.T + np.asarray(center), add) for points, add in parts]
    everything = np.concatenate([points for points, _ in placed])
    x0, y0 = np.maximum(np.floor(everything.min(axis=0)).astype(int) - 1, 0)
    x1, y1 = np.minimum(np.ceil(everything.max(axis=0)).astype(int) + 1, image_size)
    alpha = np.zeros((image_size, image_size), dtype=np.float32)
    if x1 <= x0 or y1 <= y0:
        return alpha
    canvas = Image.new("L", ((x1 - x0) * SUPERSAMPLE, (y1 - y0) * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for points, add in placed:
        draw.polygon(((points - (x0, y0)) * SUPERSAMPLE).ravel().tolist(), fill=255 if add else 0)
    alpha[y0:y1, x0:x1] = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0
    return alpha


def _dilate(alpha: np.ndarray, radius: int) -> np.ndarray:
    """Grey dilation by a disc: the outline is the shape grown by `radius` pixels."""
    padded = np.pad(alpha, radius)
    height, width = alpha.shape
    out = alpha.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if 0 < dx * dx + dy * dy <= radius * radius + radius:
                np.maximum(out, padded[radius + dy:radius + dy + height, radius + dx:radius + dx + width], out=out)
    return out


def _random_colour(rng: np.random.Generator, saturation=(0.25, 1.0), value=(0.3, 1.0)) -> np.ndarray:
    if rng.random() < 0.15:
        saturation = (0.0, 0.12)
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value))
    return np.array(rgb, dtype=np.float32) * 255.0


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray, low: float = 70.0, high: float = 200.0,
                        avoid: np.ndarray | None = None, avoid_distance: float = 50.0) -> np.ndarray:
    """A colour at an RGB distance in [low, high] from `background` (good, not perfect, contrast)."""
    best, best_gap = None, math.inf
    for _ in range(24):
        colour = _random_colour(rng)
        distance = float(np.linalg.norm(colour - background))
        gap = max(low - distance, distance - high, 0.0)
        if avoid is not None:
            gap += max(avoid_distance - float(np.linalg.norm(colour - avoid)), 0.0)
        if gap < best_gap:
            best, best_gap = colour, gap
        if gap == 0.0:
            break
    return best


def _translucent_colour(rng: np.random.Generator, min_alpha: int, max_alpha: int) -> tuple[int, ...]:
    """RGBA for clutter: a random colour, partly see-through so it stays low-contrast."""
    return tuple(int(c) for c in _random_colour(rng)) + (int(rng.integers(min_alpha, max_alpha)),)


def _value_noise(rng: np.random.Generator, cells: int, size: int) -> np.ndarray:
    """Smooth noise in about [-1, 1]: a random (cells+1)^2 grid upsampled bicubically."""
    grid = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC))


def _stripe_patch(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Faint stripes under a soft Gaussian window: texture with no edge that could read as a shape."""
    cx, cy = rng.uniform(0, size, 2)
    sigma_x, sigma_y = rng.uniform(0.06, 0.16, 2) * size
    window = np.exp(-((xx - cx) ** 2 / (2 * sigma_x ** 2) + (yy - cy) ** 2 / (2 * sigma_y ** 2)))
    phi = rng.uniform(0, np.pi)
    period = rng.uniform(3.0, 9.0) * size / 192
    stripes = np.sin(2 * np.pi * (xx * math.cos(phi) + yy * math.sin(phi)) / period)
    return (rng.uniform(12, 30) * window * stripes)[..., None] * rng.uniform(0.6, 1.0, 3)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gradient + multi-scale value noise + stripe patches + thin curves, blobs and specks; (H, W, 3) float."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    low_colour = _random_colour(rng, saturation=(0.05, 0.6), value=(0.25, 0.95))
    high_colour = _random_colour(rng, saturation=(0.05, 0.6), value=(0.25, 0.95))
    phi = rng.uniform(0, 2 * np.pi)
    ramp = xx * math.cos(phi) + yy * math.sin(phi)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    image = low_colour + (high_colour - low_colour) * ramp[..., None]

    texture = rng.uniform(0.5, 1.3)
    luminance = sum(amplitude * _value_noise(rng, cells, size)
                    for cells, amplitude in ((3, 30.0), (7, 20.0), (16, 12.0), (40, 8.0)))
    chroma = np.stack([_value_noise(rng, 5, size) for _ in range(3)], axis=-1) * 14.0
    image = image + texture * (luminance[..., None] + chroma)
    for _ in range(rng.binomial(2, 0.4)):
        image = image + _stripe_patch(rng, size, yy, xx)

    base = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB").convert("RGBA")
    overlay = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    unit = size / 192
    for _ in range(rng.integers(3, 13)):
        point = rng.uniform(0, size, 2)
        heading = rng.uniform(0, 2 * np.pi)
        step = rng.uniform(0.015, 0.04) * size
        points = [tuple(point)]
        for _ in range(rng.integers(6, 25)):
            heading += rng.normal(0.0, 0.35)
            point = point + step * np.array([math.cos(heading), math.sin(heading)])
            points.append(tuple(point))
        colour = _translucent_colour(rng, 70, 200)
        width = max(1, round(unit * rng.choice([1, 1, 2])))
        draw.line(points, fill=colour, width=width, joint="curve")
    for _ in range(rng.integers(6, 21)):
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.008, 0.03, 2) * size
        draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=_translucent_colour(rng, 35, 90))
    specks = rng.uniform(0, size, (int(rng.integers(30, 121)), 2))
    for x, y in specks:
        draw.point((float(x), float(y)), fill=_translucent_colour(rng, 80, 200))
    return np.asarray(Image.alpha_composite(base, overlay).convert("RGB"), dtype=np.float32)


@dataclass
class _Placement:
    category_id: int
    alpha: np.ndarray          # coverage of fill and outline together
    fill_alpha: np.ndarray
    mask: np.ndarray
    box: np.ndarray            # x0, y0, x1, y1 of `mask`
    outline: bool


def _sample_placement(rng: np.random.Generator, category_id: int, size: int) -> _Placement | None:
    category = CATEGORIES[category_id - 1]
    side = size * math.exp(rng.uniform(math.log(MIN_SIDE), math.log(MAX_SIDE)))
    aspect = math.exp(rng.uniform(-math.log(ASPECT_JITTER), math.log(ASPECT_JITTER)))
    angle = rng.uniform(-category.max_rotation, category.max_rotation)
    slack = MAX_OUTSIDE * side
    center = tuple(rng.uniform(side / 2 - slack, size - side / 2 + slack, 2))
    fill_alpha = shape_alpha(category.draw(rng), size, center, side, aspect, angle)
    outline_width = max(1, round(size / 192)) if rng.random() < 0.35 else 0
    alpha = _dilate(fill_alpha, outline_width) if outline_width else fill_alpha
    mask = alpha >= 0.5
    if mask.sum() < 6:
        return None
    x, y, w, h = mask_box(mask)
    return _Placement(category_id, alpha, fill_alpha, mask, np.array([x, y, x + w, y + h]), outline_width > 0)


def _box_area(box: np.ndarray) -> float:
    return float((box[2] - box[0]) * (box[3] - box[1]))


def _box_intersection(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return width * height


def _visible_masks(placements: list[_Placement], depth: list[int]) -> list[np.ndarray]:
    """Each object's pixels not covered by an object drawn later (higher depth)."""
    visible = []
    for i, placement in enumerate(placements):
        covered = np.zeros_like(placement.mask)
        for j, other in enumerate(placements):
            if depth[j] > depth[i]:
                covered |= other.mask
        visible.append(placement.mask & ~covered)
    return visible


def _fits(candidate: _Placement, depth: int, placements: list[_Placement], depths: list[int]) -> bool:
    for other, other_depth in zip(placements, depths):
        inter = _box_intersection(candidate.box, other.box)
        if inter >= MAX_BOX_IOU * (_box_area(candidate.box) + _box_area(other.box) - inter):
            return False
        lower = other if other_depth < depth else candidate
        if inter > MAX_HIDDEN * _box_area(lower.box):
            return False
    trial = placements + [candidate]
    visible = _visible_masks(trial, depths + [depth])
    return all(v.sum() >= (1.0 - MAX_HIDDEN) * p.mask.sum() for v, p in zip(visible, trial))


def _choose_categories(rng: np.random.Generator) -> list[int]:
    """6-12 categories, at least one base; each other one novel with a chance that makes 1/3 of all novel."""
    count = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    p_novel = count / (3.0 * (count - 1))
    ids = [int(rng.choice(BASE_IDS))]
    ids += [int(rng.choice(NOVEL_IDS if rng.random() < p_novel else BASE_IDS)) for _ in range(count - 1)]
    return ids


def _layout(rng: np.random.Generator, size: int) -> tuple[list[_Placement], list[int]]:
    """Objects placed one by one, the guaranteed base object first; each gets a random drawing depth.

    A candidate is rejected when its box overlaps another's at IoU >= 0.5, when it and an object drawn
    before it share more than 20% of the earlier one's box, or when, after it, any object (it included)
    would have more than 20% of its pixels covered by later ones (boxes alone miss a pile-up of several);
    an object that finds no place in 40 tries is left out. The first object always fits, so every image
    keeps a base object.
    """
    category_ids = _choose_categories(rng)
    draw_order = rng.permutation(len(category_ids)).tolist()
    placements: list[_Placement] = []
    depths: list[int] = []
    for category_id, depth in zip(category_ids, draw_order):
        for _ in range(40):
            candidate = _sample_placement(rng, category_id, size)
            if candidate is not None and _fits(candidate, depth, placements, depths):
                placements.append(candidate)
                depths.append(depth)
                break
    return placements, depths


def _fill(rng: np.random.Generator, shape: tuple[int, int], background: np.ndarray) -> np.ndarray:
    """The object's paint over its window: solid (lightly shaded), striped or two-tone."""
    height, width = shape
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    first = _contrasting_colour(rng, background)
    style = rng.choice(["solid", "solid", "stripes", "two-tone"])
    phi = rng.uniform(0, 2 * np.pi)
    along = xx * math.cos(phi) + yy * math.sin(phi)
    if style == "solid":
        shade = rng.uniform(-0.15, 0.15) * (along - along.mean()) / max(float(np.ptp(along)), 1.0)
        return np.clip(first * (1.0 + shade[..., None]), 0, 255)
    second = _contrasting_colour(rng, background, low=60.0, high=230.0, avoid=first)
    if style == "stripes":
        period = rng.uniform(3.0, 8.0) * max(1.0, (height + width) / 100)
        wave = np.sin(2 * np.pi * along / period)
        mix = np.clip(wave * 1.5 + 0.5, 0.0, 1.0)
    else:
        mix = np.clip(along - along.mean() + rng.uniform(-0.2, 0.2) * np.ptp(along) + 0.5, 0.0, 1.0)
    return first + (second - first) * mix[..., None]


def render_image(rng: np.random.Generator, image_size: int) -> tuple[Image.Image, list[DrawnObject]]:
    """One image of the world and its objects (in drawing order), all decided by `rng`."""
    canvas = _background(rng, image_size)
    placements, depths = _layout(rng, image_size)
    order = sorted(range(len(placements)), key=depths.__getitem__)
    placements = [placements[i] for i in order]
    depths = [depths[i] for i in order]

    for placement in placements:
        x0, y0, w, h = mask_box(placement.alpha > 0)
        x0, y0, x1, y1 = int(x0), int(y0), int(x0 + w), int(y0 + h)
        window = canvas[y0:y1, x0:x1]
        fill = _fill(rng, window.shape[:2], window.reshape(-1, 3).mean(axis=0))
        if placement.outline:
            dark = _random_colour(rng, saturation=(0.0, 0.6), value=(0.0, 0.18))
            edge = placement.alpha[y0:y1, x0:x1, None]
            window[:] = window * (1.0 - edge) + dark * edge
        cover = placement.fill_alpha[y0:y1, x0:x1, None]
        window[:] = window * (1.0 - cover) + fill * cover

    if rng.random() < 0.3:
        canvas = canvas + rng.normal(0.0, rng.uniform(2.0, 6.0), canvas.shape)
    image = Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.25:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8) * image_size / 192))

    objects = []
    for placement, visible in zip(placements, _visible_masks(placements, depths)):
        area = int(visible.sum())
        objects.append(DrawnObject(placement.category_id, visible, mask_box(visible), area,
                                   1.0 - area / int(placement.mask.sum())))
    return image, objects
