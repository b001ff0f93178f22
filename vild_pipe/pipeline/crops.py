"""Box geometry and crops for the CLIP teacher.

The 1.5x box is the 1x box enlarged 1.5 times about its centre (x1' = 1.25·x1 − 0.25·x2), clipped to the
image (DESIGN.md §2). The reference crop is exactly what CLIP's own `preprocess` does to a PIL crop of the
box: resize the shorter side to the model's input size (bicubic), centre crop, normalise. The fast crop
resamples the same central square of every box of a batch of images with one `roi_align` call, on the
device the images are on (DESIGN.md §6: on a GPU that is ~10x faster than the encoder; PIL is ~47x slower).
"""
import functools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.ops import roi_align

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_SCALES = (1.0, 1.5)   # ViLD's two crops of every box


def scale_boxes(boxes: np.ndarray, factor: float) -> np.ndarray:
    """Enlarge xyxy boxes `factor` times about their centres (not clipped)."""
    boxes = np.asarray(boxes, dtype=np.float64)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (factor / 2)
    return np.concatenate([centres - half, centres + half], axis=1)


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    boxes = np.array(boxes, dtype=np.float64, copy=True)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    return boxes


def crop_box_pil(image: Image.Image, box) -> Image.Image:
    """PIL crop of an xyxy box, at least one pixel on each side (zero-area boxes become a 1x1 crop)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    left, top = int(np.floor(x1)), int(np.floor(y1))
    right, bottom = max(int(np.ceil(x2)), left + 1), max(int(np.ceil(y2)), top + 1)
    return image.crop((left, top, right, bottom))


def centre_square_crop(image: Image.Image, size: int) -> Image.Image:
    """CLIP's preprocess geometry without the normalisation: shorter side to `size` (bicubic), centre crop.

    Uses the same torchvision transforms as `clip.clip._transform`, so the pixels are identical."""
    return _clip_geometry(size)(image)


@functools.lru_cache(maxsize=None)
def _clip_geometry(size: int) -> T.Compose:
    """Made once per size: building the two transforms (torch modules) cost more than applying them to a
    32-px crop, a third of fit-teacher's sampling time."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])


def normalize_pixels(uint8_chw: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float, CLIP's mean/std normalisation."""
    mean = torch.tensor(CLIP_MEAN, device=uint8_chw.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=uint8_chw.device).view(3, 1, 1)
    return (uint8_chw.float() / 255.0 - mean) / std


def pil_to_uint8_chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def enlarged_boxes(boxes: np.ndarray, factor: float, width: int, height: int) -> np.ndarray:
    """The ViLD crop box: `factor` times the box about its centre, clipped to the image (float64 xyxy)."""
    return clip_boxes(scale_boxes(boxes, factor), width, height)


def crop_boxes_1x_15x(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Every crop's box for one image: its R 1x boxes, then its R 1.5x boxes, all clipped to the image."""
    return np.concatenate([enlarged_boxes(boxes, scale, width, height) for scale in CROP_SCALES])


def centre_squares(boxes: torch.Tensor, min_side: float = 1.0) -> torch.Tensor:
    """The central square of each xyxy box, side min(w, h) but at least `min_side` pixels.

    This is the region CLIP's `preprocess` keeps of a crop (resize the shorter side, centre crop), so a
    square resampled to the model's input size is the fast path's version of the reference crop. The
    minimum side mirrors the reference path, which crops at least one pixel of a zero-area box.
    """
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    sides = (boxes[:, 2:] - boxes[:, :2]).min(dim=1).values.clamp(min=min_side)
    half = (sides / 2)[:, None]
    return torch.cat([centres - half, centres + half], dim=1)


def crop_squares(images: list[torch.Tensor], boxes: list[torch.Tensor], size: int, dtype=torch.float32) -> torch.Tensor:
    """Every box's central square of a batch of images, resampled to `size` x `size` and CLIP-normalised.

    Antialiasing the way mipmaps do it: each image is halved repeatedly (2x2 means), and each box is
    resampled by `roi_align` (bilinear, aligned=True: box coordinates are pixel edges, as the caches store
    them) from the level where its square is between 1 and 2 times `size`, with adaptive sampling (1-2
    samples a side per output pixel). Sampling the full-size image instead would cost up to (side/size)^2
    samples per output pixel: 15x15 for a 480 px box at 32 px. One `roi_align` call per pyramid level and
    distinct image size (one per level for a dataset of equal-sized images), never padding, so a box's crop
    depends on its own image only, bit for bit, whichever images share its batch.
    `images`: uint8 (3, H, W) on the target device; `boxes`: float (R_i, 4) xyxy. Returns (sum R_i, 3, S, S)
    in the order of the images and their boxes, as `dtype`; the pyramid, sampling and normalisation run in
    float32 whatever `dtype` is (in fp16, roi_align's sample points would round to 0.5 px past 1024 px).
    """
    device = images[0].device if images else torch.device("cpu")
    crops = torch.empty(sum(len(b) for b in boxes), 3, size, size, dtype=dtype, device=device)
    starts = np.cumsum([0] + [len(b) for b in boxes])
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1) * 255
    by_size: dict[tuple[int, int], list[int]] = {}
    for k, image in enumerate(images):
        if len(boxes[k]):
            by_size.setdefault(tuple(image.shape[1:]), []).append(k)
    for members in by_size.values():
        squares = [centre_squares(boxes[k].to(device=device, dtype=torch.float32)) for k in members]
        rows = torch.cat([torch.arange(starts[k], starts[k + 1], device=device) for k in members])
        image_index = torch.cat([torch.full((len(b),), n, device=device) for n, b in enumerate(squares)])
        squares = torch.cat(squares)
        sides = squares[:, 2] - squares[:, 0]
        levels = torch.log2(sides / size).floor().clamp(min=0).long()
        level_image = torch.stack([images[k] for k in members]).float()
        for level in range(int(levels.max()) + 1):
            if level:
                level_image = F.avg_pool2d(level_image, 2, ceil_mode=True)
            chosen = (levels == level).nonzero().squeeze(1)
            if not len(chosen):
                continue
            rois = torch.cat([image_index[chosen, None].float(), squares[chosen] / 2 ** level], dim=1)
            sampled = roi_align(level_image, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1,
                                aligned=True)
            crops[rows[chosen]] = ((sampled - mean) / std).to(dtype)
    return crops


def reference_crops(image: Image.Image, boxes: np.ndarray, preprocess) -> torch.Tensor:
    """CLIP's own `preprocess` applied to a PIL crop of each box, one at a time: the slow, exact path."""
    if not len(boxes):
        return torch.zeros(0, 3, 1, 1)
    return torch.stack([preprocess(crop_box_pil(image, box)) for box in boxes])
