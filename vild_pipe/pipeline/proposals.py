"""Proposals and their RoIAlign features from a class-agnostic torchvision Faster R-CNN (DESIGN.md §2, §5).

ViLD's student head is trained from cached tensors only, so what the detector saw of each box must be
stored with it: the box after the box head's class-agnostic regression and NMS, its objectness, and the
RoIAlign features (C x 7 x 7) pooled from the FPN by the model's own `box_roi_pool`, exactly what the box
head would read at inference time.

Only the public parts of torchvision's `FasterRCNN` are used (`transform`, `backbone`, `rpn`, `roi_heads`),
so any such model works, whatever its backbone.

Each image goes through the network on its own, even when several are passed: on the CPU, batching changes
convolution and matmul results in the last bits (measured ~1e-6 for a batch of 6 vs one image), and
torchvision pads a batch to its largest image, which changes the features near the borders of the others.
One image at a time makes every array a function of the image and the weights only, whatever the batch
size, the number of workers or the sharding of a run. (The images are still decoded and moved in batches.)
What the bits do still depend on is the kind of device, the precision and, on the CPU, torch's thread count
(matmuls are split by thread). Measured on an H100 (random weights, 192 px images upscaled to 800): one
image at a time runs the R50-FPN dump at ~43 images/s against ~123 for torchvision's own batch-8 forward,
so batching by equal padded size is the lever if this stage ever limits a GPU run.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import clip_boxes_to_image

# What the dump asks of the box head's post-processing: keep every box (the score threshold is 0, AP and
# distillation need the tail) and cap nothing before the minimum-side filter; `top_n` is applied after it.
_KEEP_ALL_DETECTIONS = 1 << 30

PROPOSAL_NMS_THRESHOLD = 0.7
"""IoU of the class-agnostic NMS after the box head. The official ViLD has none there (its only class-agnostic
NMS is the RPN's, at 0.7; categories get a per-class NMS at 0.5 after scoring), but a cache of N boxes an
image needs the near-duplicates gone. At 0.7, as the RPN's, it keeps two overlapping objects of different
categories that a 0.5 would reduce to one before any category is known (a rider and a horse)."""


@dataclass
class ImageProposals:
    """The proposals of one image, on the CPU, sorted by decreasing score.

    boxes (R, 4) float32 xyxy in original image pixels, scores (R,) float32 objectness (class-1 probability),
    features (R, C, 7, 7) float16; extra_features (E, C, 7, 7) float16 for the `extra_boxes` passed in
    (e.g. the ground truth), None when none were asked for.
    """

    boxes: Tensor
    scores: Tensor
    features: Tensor
    extra_features: Tensor | None = None


def feature_shape(model: FasterRCNN) -> tuple[int, ...]:
    """Shape of one box's pooled features: (FPN channels, *pooler output size), e.g. (256, 7, 7)."""
    output_size = model.roi_heads.box_roi_pool.output_size
    if isinstance(output_size, int):
        output_size = (output_size, output_size)
    return (int(model.backbone.out_channels), *(int(side) for side in output_size))


@contextlib.contextmanager
def dump_settings(model: FasterRCNN, nms_threshold: float) -> Iterator[None]:
    """Eval mode and the box head's post-processing for a dump; the model's own settings are restored after."""
    roi_heads = model.roi_heads
    saved = (model.training, roi_heads.score_thresh, roi_heads.nms_thresh, roi_heads.detections_per_img)
    model.eval()
    roi_heads.score_thresh = 0.0
    roi_heads.nms_thresh = float(nms_threshold)
    roi_heads.detections_per_img = _KEEP_ALL_DETECTIONS
    try:
        yield
    finally:
        model.train(saved[0])
        roi_heads.score_thresh, roi_heads.nms_thresh, roi_heads.detections_per_img = saved[1:]


def _autocast(device: torch.device, fp16: bool):
    """fp16 autocast on CUDA when asked; a no-op context elsewhere (CPU runs in fp32)."""
    if fp16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _as_float_image(image: Tensor, device: torch.device) -> Tensor:
    """A CHW image as float in [0, 1] on `device` (uint8 images are scaled; float ones are taken as they are)."""
    if image.ndim != 3:
        raise ValueError(f"expected a CHW image tensor, got shape {tuple(image.shape)}")
    image = image.to(device, non_blocking=True)
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()


def _model_device(model: FasterRCNN) -> torch.device:
    return next(model.parameters()).device


def _fpn_features(model: FasterRCNN, image: Tensor, fp16: bool) -> tuple[ImageList, OrderedDict[str, Tensor]]:
    """The transformed (resized, normalised, padded) image and its backbone/FPN feature maps, as float32.

    `fp16` autocasts the backbone only, where nearly all the compute is: under autocast the RPN's anchors
    and the box regression would be fp16 too, rounding box corners to 0.5 px past 1024 px.
    """
    image_list, _ = model.transform([image])
    with _autocast(image.device, fp16):
        features = model.backbone(image_list.tensors)
    if isinstance(features, Tensor):
        features = OrderedDict([("0", features)])
    return image_list, OrderedDict((name, feature.float()) for name, feature in features.items())


def _to_transformed(boxes: Tensor, original_size: tuple[int, int], image_list: ImageList) -> Tensor:
    """Boxes in original pixels -> the transformed image's pixels, as the transform maps training targets."""
    return resize_boxes(boxes.float(), list(original_size), list(image_list.image_sizes[0]))


def _pool(model: FasterRCNN, features: OrderedDict[str, Tensor], boxes: Tensor, image_list: ImageList) -> Tensor:
    """RoIAlign features (R, C, 7, 7) of boxes given in the transformed image's pixels, as fp16 on the CPU."""
    pooled = model.roi_heads.box_roi_pool(features, [boxes.float()], image_list.image_sizes)
    return pooled.to(torch.float16).cpu()


@torch.no_grad()
def propose_with_features(
    model: FasterRCNN,
    images: Sequence[Tensor],
    top_n: int = 300,
    min_box_side: float = 2.0,
    nms_threshold: float = PROPOSAL_NMS_THRESHOLD,
    extra_boxes: Sequence[Tensor | None] | None = None,
    fp16: bool = False,
) -> list[ImageProposals]:
    """The top `top_n` boxes of each image after the box head's regression and NMS, with scores and features.

    Per image: transform -> backbone (FPN) -> RPN -> box head with score threshold 0 and class-agnostic
    NMS at `nms_threshold` -> boxes mapped back to original pixels and clipped -> boxes with a side below
    `min_box_side` (original pixels) removed -> the `top_n` best. Features are pooled from the FPN with the
    model's own `box_roi_pool` on the boxes in transformed-image coordinates, before the mapping back.
    `extra_boxes[i]` (xyxy, original pixels), e.g. ground truth, are pooled from the same feature maps.
    `fp16` runs the backbone under fp16 autocast on CUDA (ignored on the CPU); boxes are computed in fp32.
    """
    if extra_boxes is not None and len(extra_boxes) != len(images):
        raise ValueError(f"{len(extra_boxes)} extra box sets for {len(images)} images")
    device = _model_device(model)
    results = []
    with dump_settings(model, nms_threshold):
        for k, image in enumerate(images):
            image = _as_float_image(image, device)
            original_size = (int(image.shape[-2]), int(image.shape[-1]))
            image_list, features = _fpn_features(model, image, fp16)
            proposals, _ = model.rpn(image_list, features)
            detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
            boxes_t = detections[0]["boxes"].float()
            scores = detections[0]["scores"].float()

            mapped = model.transform.postprocess([{"boxes": boxes_t}], image_list.image_sizes, [original_size])
            boxes = clip_boxes_to_image(mapped[0]["boxes"].float(), original_size)
            sides = boxes[:, 2:] - boxes[:, :2]
            keep = torch.nonzero((sides >= min_box_side).all(dim=1)).flatten()[:top_n]
            boxes, scores, boxes_t = boxes[keep], scores[keep], boxes_t[keep]

            extra = extra_boxes[k] if extra_boxes is not None else None
            extra_features = None
            if extra is not None:
                extra_t = _to_transformed(extra.to(device), original_size, image_list)
                extra_features = _pool(model, features, extra_t, image_list)
            results.append(ImageProposals(
                boxes=boxes.cpu(), scores=scores.cpu(), features=_pool(model, features, boxes_t, image_list),
                extra_features=extra_features,
            ))
    return results


@torch.no_grad()
def features_for_boxes(
    model: FasterRCNN, images: Sequence[Tensor], boxes_per_image: Sequence[Tensor], fp16: bool = False
) -> list[Tensor]:
    """RoIAlign features (R, C, 7, 7) fp16 of given xyxy boxes in original pixels, one tensor per image.

    The same pooling as `propose_with_features` (same transform, FPN and `box_roi_pool`), without the RPN
    and the box head: for boxes that come from elsewhere, such as the ground truth.
    """
    if len(boxes_per_image) != len(images):
        raise ValueError(f"{len(boxes_per_image)} box sets for {len(images)} images")
    device = _model_device(model)
    pooled = []
    with dump_settings(model, model.roi_heads.nms_thresh):
        for image, boxes in zip(images, boxes_per_image):
            image = _as_float_image(image, device)
            original_size = (int(image.shape[-2]), int(image.shape[-1]))
            image_list, features = _fpn_features(model, image, fp16)
            boxes_t = _to_transformed(boxes.to(device), original_size, image_list)
            pooled.append(_pool(model, features, boxes_t, image_list))
    return pooled
