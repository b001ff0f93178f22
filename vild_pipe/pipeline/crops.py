"""Box geometry and crops for the CLIP teacher.

The 1.5x box is the 1x box enlarged 1.5 times about its centre (x1' = 1.25·x1 − 0.25·x2), clipped to the
image (DESIGN.md §2). The reference crop is exactly what CLIP's own `preprocess` does to a PIL crop of the
box: resize the shorter side to the model's input size (bicubic), centre crop, normalise.
"""
import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
    return T.CenterCrop(size)(T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)(image))


def normalize_pixels(uint8_chw: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float, CLIP's mean/std normalisation."""
    mean = torch.tensor(CLIP_MEAN, device=uint8_chw.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=uint8_chw.device).view(3, 1, 1)
    return (uint8_chw.float() / 255.0 - mean) / std


def pil_to_uint8_chw(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)
