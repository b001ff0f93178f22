"""The class-agnostic detector of ViLD (DESIGN.md §2): torchvision's Faster R-CNN with two classes,
background and object, on a ResNet-50-FPN or a small FPN backbone, with RoIAlign (MultiScaleRoIAlign 7x7).

Two presets:

- ``resnet50-fpn``: torchvision's `fasterrcnn_resnet50_fpn` architecture (256-channel FPN P2-P6, anchors
  32-512, 800/1333 px images). With ImageNet weights (torchvision's weights enum, or a local state dict) the
  batch norms are frozen and the first two stages stay fixed, as torchvision does. From scratch, GroupNorm
  replaces BatchNorm: batch statistics of 2-4 images per GPU are too noisy to train on, and per-sample
  normalisation makes a DDP run equal to one process on the same global batch.
- ``small``: a GroupNorm conv net (strides 8-32, widths measured to train in minutes on 2 CPU cores) under
  torchvision's FeaturePyramidNetwork (64 channels, P3-P6, one anchor size per level 16-128), sized for the
  synthetic world (192 px images, objects 8-100 px); RoIAlign with one sample per bin (see `RoIPool`).

Training-time randomness that torchvision draws from the global RNG (the RPN's and the RoI head's
positive/negative sampling) is drawn here from per-image generators that the training loop seeds from
(seed, step, position in the global batch) with `set_sampling_seeds`, so a resumed run and a torchrun
run sample exactly what one uninterrupted process samples. In training the model does not resize images:
train-rpn's data pipeline has resized (and scale-jittered) them already, for the same reason.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from torch import nn
from torchvision.models import ResNet50_Weights, resnet50
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import MultiScaleRoIAlign, clip_boxes_to_image
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.ops.poolers import _setup_scales, initLevelMapper

from vild_pipe.errors import DataError, VildError, describe_error
from vild_pipe.pipeline.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from vild_pipe.pipeline.shards import sha256_file

NUM_CLASSES = 2  # background, object
MODEL_NAME = "model.pt"
MODEL_FORMAT = 1

log = logging.getLogger(__name__)

PRESETS = ("resnet50-fpn", "small")
SMALL_RETURNED_STAGES = ("stage2", "stage3", "stage4")  # strides 8, 16, 32; the FPN adds a max-pooled stride 64


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that defines the detector's architecture and its inference settings.

    The defaults are torchvision's `fasterrcnn_resnet50_fpn` except `box_score_thresh` 0 (proposals keep
    the tail), `box_nms_thresh` 0.7 (these boxes are proposals; 0.7 keeps more of the overlapping candidates
    that recall at high IoU needs) and the ViLD constants (RPN NMS 0.7; 512 RoIs per image, 25% foreground at
    IoU >= 0.5).
    Use `DetectorConfig.preset(name, **overrides)` for a preset's sizes.
    """

    backbone: str = "resnet50-fpn"
    backbone_init: str = "none"              # "none", "imagenet" (torchvision's weights enum) or a state-dict file
    trainable_backbone_layers: int = 3       # resnet50-fpn with pretrained weights: stages trained (0-5)
    small_widths: tuple[int, ...] = (32, 64, 128, 256)   # small: channels at strides 4, 8, 16, 32
    fpn_channels: int = 256
    min_size: int = 800                      # GeneralizedRCNNTransform: shorter side, pixels
    max_size: int = 1333                     # and the cap on the longer side
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    anchor_sizes: tuple[tuple[int, ...], ...] = ((32,), (64,), (128,), (256,), (512,))  # one tuple per FPN level
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_fg_iou_thresh: float = 0.7
    rpn_bg_iou_thresh: float = 0.3
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    box_fg_iou_thresh: float = 0.5
    box_bg_iou_thresh: float = 0.5
    representation_size: int = 1024          # TwoMLPHead width
    roi_sampling_ratio: int = 2              # RoIAlign sampling points per bin side (torchvision's 2)
    box_score_thresh: float = 0.0
    box_nms_thresh: float = 0.7              # class-agnostic: the head applies its own per-class NMS 0.5 later
    box_detections_per_img: int = 100
    box_classes: int = 1                     # classes the box head learns: 1 (object) or the K base categories

    def __post_init__(self) -> None:
        # Accept lists (JSON) and store tuples, so configs compare and hash alike however they were made.
        object.__setattr__(self, "small_widths", tuple(int(w) for w in self.small_widths))
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        object.__setattr__(self, "anchor_sizes", tuple(tuple(int(s) for s in level) for level in self.anchor_sizes))
        object.__setattr__(self, "aspect_ratios", tuple(float(r) for r in self.aspect_ratios))
        if self.backbone not in PRESETS:
            raise VildError(f"unknown backbone {self.backbone!r}: use one of {', '.join(PRESETS)}")
        levels = num_feature_levels(self)
        if len(self.anchor_sizes) != levels:
            raise VildError(f"backbone {self.backbone!r} has {levels} FPN levels but anchor_sizes gives "
                            f"{len(self.anchor_sizes)}: one tuple of sizes per level")
        if self.backbone == "resnet50-fpn" and self.fpn_channels != 256:
            raise VildError(f"resnet50-fpn has torchvision's 256-channel FPN; got fpn_channels={self.fpn_channels}")
        if self.backbone == "small" and len(self.small_widths) != 4:
            raise VildError(f"small_widths must give 4 stage widths, got {list(self.small_widths)}")
        if self.min_size < 32 or self.max_size < self.min_size:
            raise VildError("image sizes must satisfy 32 <= min_size <= max_size"
                            f" (got {self.min_size}, {self.max_size})")
        if self.box_classes < 1:
            raise VildError(f"box_classes must be at least 1, got {self.box_classes}")
        if not 0 <= self.trainable_backbone_layers <= 5:
            raise VildError(f"trainable_backbone_layers must be 0-5, got {self.trainable_backbone_layers}")

    @classmethod
    def preset(cls, backbone: str, **overrides: Any) -> DetectorConfig:
        """The preset's sizes, with `overrides` (field name -> value) on top."""
        if backbone not in PRESETS:
            raise VildError(f"unknown backbone {backbone!r}: use one of {', '.join(PRESETS)}")
        fields = {**_PRESET_FIELDS[backbone], **overrides}
        return cls(backbone=backbone, **fields)

    def to_dict(self) -> dict[str, Any]:
        """JSON types only (tuples become lists)."""
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DetectorConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DataError(f"detector config has unknown fields {unknown} (made by a newer vild-pipe?)")
        return cls(**values)


_PRESET_FIELDS: dict[str, dict[str, Any]] = {
    "resnet50-fpn": {},
    # Measured on the synthetic world (2 CPU cores), see bench/RESULTS.md and stages/train_rpn.py.
    "small": {
        "small_widths": (32, 64, 128, 256),
        "fpn_channels": 64,
        "min_size": 192,
        "max_size": 320,
        "anchor_sizes": ((16,), (32,), (64,), (128,)),
        "rpn_pre_nms_top_n_train": 1000,
        "rpn_post_nms_top_n_train": 1000,
        "rpn_pre_nms_top_n_test": 1000,
        "rpn_post_nms_top_n_test": 500,
        "representation_size": 256,
        "roi_sampling_ratio": 1,
        # A synthetic image holds ~9 objects: of 512 sampled RoIs only ~8 were foreground and the box head
        # learned to call everything background (its category accuracy on GT boxes: 0.06); at 64 it learns the
        # base categories (0.41-0.83 with training length) and the steps are faster.
        "box_batch_size_per_image": 64,
    },
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def num_feature_levels(config: DetectorConfig) -> int:
    """FPN levels the RPN sees: P2-P6 for resnet50-fpn, P3-P6 for small."""
    return 5 if config.backbone == "resnet50-fpn" else len(SMALL_RETURNED_STAGES) + 1


def feature_channels(config: DetectorConfig) -> int:
    """Channels of the FPN maps, hence of the RoIAlign features (C of C x 7 x 7)."""
    return config.fpn_channels


def roi_feature_names(config: DetectorConfig) -> list[str]:
    """FPN maps RoIAlign pools from: every level but the max-pooled one, as torchvision does."""
    return [str(i) for i in range(num_feature_levels(config) - 1)]


def roi_feature_strides(config: DetectorConfig) -> list[int]:
    """Strides of the maps of `roi_feature_names`: 4, 8, 16, 32 for resnet50-fpn (P2-P5), 8, 16, 32 for small."""
    first = 4 if config.backbone == "resnet50-fpn" else 8
    return [first * 2 ** level for level in range(len(roi_feature_names(config)))]


# --------------------------------------------------------------------------- backbones

def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) if channels >= 8 else 1, channels)


def _conv_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        _group_norm(out_channels),
        nn.ReLU(inplace=True),
    )


class _ResidualBlock(nn.Module):
    """Two 3x3 convs with GroupNorm and an identity shortcut (ResNet's basic block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = _conv_block(channels, channels, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = _group_norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.norm2(self.conv2(self.conv1(x))))


class SmallBackbone(nn.Sequential):
    """stem (stride 2) then four stages, each a strided conv and a residual block: strides 4, 8, 16, 32.

    A plain Sequential of named stages so torchvision's IntermediateLayerGetter can tap them for the FPN.
    """

    def __init__(self, widths: Sequence[int]):
        stem_width = max(16, widths[0] // 2)
        stages: list[tuple[str, nn.Module]] = [("stem", _conv_block(3, stem_width, 2))]
        previous = stem_width
        for index, width in enumerate(widths, start=1):
            stages.append((f"stage{index}", nn.Sequential(_conv_block(previous, width, 2), _ResidualBlock(width))))
            previous = width
        super().__init__(OrderedDict(stages))


def _load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise VildError(f"{path}: backbone weights file not found (--backbone-init takes none, imagenet or a file)")
    state = load_checkpoint(path, remove_stale_tmp=False)
    if state is not None and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: not a state dict of tensors")
    return state


def _load_backbone_weights(module: nn.Module, path: str, ignore_prefixes: Sequence[str] = ()) -> None:
    """Load a local state dict into `module`; every weight of the module must be found (extra keys are ignored)."""
    state = _load_state_dict_file(path)
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as err:
        mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise DataError(f"{path}: does not fit the {type(module).__name__} backbone ({mismatch})") from err
    if result.missing_keys:
        shown = ", ".join(result.missing_keys[:3])
        raise DataError(f"{path}: does not fit the {type(module).__name__} backbone "
                        f"({len(result.missing_keys)} weights missing, e.g. {shown})")
    unexpected = [k for k in result.unexpected_keys if not k.startswith(tuple(ignore_prefixes))]
    if unexpected:
        raise DataError(f"{path}: holds weights the backbone does not have, e.g. {', '.join(unexpected[:3])}")


def _imagenet_resnet50_weights() -> dict[str, torch.Tensor]:
    """torchvision's ResNet-50 ImageNet weights (downloaded once into torch's hub cache); offline, one line
    saying so and how to give them as a file instead. The download is made here, not by torch.hub, which
    prints its own "Downloading:" line on stdout before it fails."""
    weights = ResNet50_Weights.IMAGENET1K_V1
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    try:
        if not cached.is_file():
            log.info("downloading torchvision's ResNet-50 ImageNet weights from %s into %s", weights.url, cached.parent)
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, os.fspath(cached), progress=True)
        return weights.get_state_dict(progress=True)
    except Exception as err:  # URLError offline, OSError on a read-only cache, RuntimeError on a bad hash
        raise VildError(f"--backbone-init imagenet: could not download torchvision's ResNet-50 ImageNet weights"
                        f" ({describe_error(err)}); give a local state-dict file with --backbone-init PATH") from err


def _resnet50_fpn_backbone(config: DetectorConfig, init_weights: bool) -> BackboneWithFPN:
    pretrained = config.backbone_init != "none"
    body = resnet50(weights=None, norm_layer=FrozenBatchNorm2d if pretrained else (lambda c: nn.GroupNorm(32, c)))
    if pretrained and init_weights:
        if config.backbone_init == "imagenet":
            body.load_state_dict(_imagenet_resnet50_weights())
        else:
            _load_backbone_weights(body, config.backbone_init, ignore_prefixes=("fc.",))
    trainable = config.trainable_backbone_layers if pretrained else 5
    return _resnet_fpn_extractor(body, trainable)


def _small_fpn_backbone(config: DetectorConfig, init_weights: bool) -> BackboneWithFPN:
    body = SmallBackbone(config.small_widths)
    if config.backbone_init == "imagenet":
        raise VildError("--backbone-init imagenet: the small backbone has no ImageNet weights;"
                        " use --backbone-init none or a state-dict file")
    if config.backbone_init != "none" and init_weights:
        _load_backbone_weights(body, config.backbone_init)
    widths = dict(zip((f"stage{i}" for i in range(1, 5)), config.small_widths))
    return BackboneWithFPN(
        body,
        return_layers={name: str(i) for i, name in enumerate(SMALL_RETURNED_STAGES)},
        in_channels_list=[widths[name] for name in SMALL_RETURNED_STAGES],
        out_channels=config.fpn_channels,
        extra_blocks=LastLevelMaxPool(),
    )


# --------------------------------------------------------------------------- RoI pooling

class RoIPool(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign, with a faster CPU training path for sampling_ratio 1.

    torchvision's CPU roi_align backward is serial and recomputes the bilinear weights per channel: it took a
    third of a small-preset training step. With one sample per bin, RoIAlign (aligned=False) is bilinear
    sampling at the bin centres, which `grid_sample` (border padding, align_corners=True) computes with the
    same values for boxes inside the image (all boxes here are clipped) and a vectorised backward, about 3x
    faster. Inference, other sampling ratios and GPUs use torchvision's roi_align unchanged.
    """

    def forward(self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes: list[tuple[int, int]]
                ) -> torch.Tensor:
        features = [x[name] for name in self.featmap_names]
        if not (self.training and self.sampling_ratio == 1 and features[0].device.type == "cpu"):
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:  # a pool built outside `build_detector`
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(boxes)])
        levels = self.map_levels(boxes) if len(features) > 1 else torch.zeros(len(rois), dtype=torch.int64)
        result = features[0].new_zeros((len(rois), features[0].shape[1]) + tuple(self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            in_level = torch.where(levels == level)[0]
            if len(in_level):
                result[in_level] = grid_roi_align(feature, rois[in_level], self.output_size, scale)
        return result


def grid_roi_align(feature: torch.Tensor, rois: torch.Tensor, output_size: Sequence[int], scale: float
                   ) -> torch.Tensor:
    """roi_align(feature, rois, output_size, scale, sampling_ratio=1, aligned=False) by grid_sample, for rois
    (batch index, x1, y1, x2, y2) inside the image."""
    out_h, out_w = output_size
    height, width = feature.shape[-2:]
    image_index = rois[:, 0].long()
    x1, y1, x2, y2 = (rois[:, 1:] * scale).unbind(dim=1)
    bin_w = (x2 - x1).clamp(min=1.0) / out_w
    bin_h = (y2 - y1).clamp(min=1.0) / out_h
    xs = x1[:, None] + (torch.arange(out_w, dtype=rois.dtype, device=rois.device) + 0.5) * bin_w[:, None]
    ys = y1[:, None] + (torch.arange(out_h, dtype=rois.dtype, device=rois.device) + 0.5) * bin_h[:, None]
    grid_x = xs * (2.0 / max(width - 1, 1)) - 1.0
    grid_y = ys * (2.0 / max(height - 1, 1)) - 1.0
    grid = torch.stack(torch.broadcast_tensors(grid_x[:, None, :], grid_y[:, :, None]), dim=-1).to(feature.dtype)
    pooled = feature.new_empty((len(rois), feature.shape[1], out_h, out_w))
    parts, order = [], []
    for image in torch.unique(image_index).tolist():
        rows = torch.where(image_index == image)[0]
        sampled = torch.nn.functional.grid_sample(
            feature[image:image + 1], grid[rows].reshape(1, len(rows) * out_h, out_w, 2),
            mode="bilinear", padding_mode="border", align_corners=True)
        parts.append(sampled.reshape(feature.shape[1], len(rows), out_h, out_w).transpose(0, 1))
        order.append(rows)
    if not parts:
        return pooled
    return torch.cat(parts)[torch.argsort(torch.cat(order))]


# --------------------------------------------------------------------------- the detector

class SeededSampler(BalancedPositiveNegativeSampler):
    """torchvision's balanced positive/negative sampler, drawing from one generator per image when set.

    `generators` (one per image of the batch, in order) is set by `set_sampling_seeds` before each training
    forward; without it the sampler draws from the global RNG like torchvision's.
    """

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        super().__init__(batch_size_per_image, positive_fraction)
        self.generators: list[torch.Generator] | None = None

    def __call__(self, matched_idxs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.generators is None:
            return super().__call__(matched_idxs)
        if len(self.generators) != len(matched_idxs):
            raise RuntimeError(f"{len(self.generators)} sampling generators set for a batch of"
                               f" {len(matched_idxs)} images")
        pos_masks, neg_masks = [], []
        for matched, generator in zip(matched_idxs, self.generators):
            positive = torch.where(matched >= 1)[0]
            negative = torch.where(matched == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            pos_pick = torch.randperm(positive.numel(), generator=generator)[:num_pos].to(matched.device)
            neg_pick = torch.randperm(negative.numel(), generator=generator)[:num_neg].to(matched.device)
            pos_mask = torch.zeros_like(matched, dtype=torch.uint8)
            neg_mask = torch.zeros_like(matched, dtype=torch.uint8)
            pos_mask[positive[pos_pick]] = 1
            neg_mask[negative[neg_pick]] = 1
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks


def sampling_seed(seed: int, step: int, position: int, purpose: int) -> int:
    """A 63-bit seed that depends on (seed, step, position in the global batch, purpose) only.

    The shift is on a Python int: numpy 1.x has no `uint64 >> int` (it casts both to float64)."""
    return int(np.random.SeedSequence([seed, step, position, purpose]).generate_state(2, dtype=np.uint64)[0]) >> 1


def set_sampling_seeds(model: nn.Module, seed: int, step: int, positions: Sequence[int] | None) -> None:
    """Seed the RPN's and the RoI head's samplers for one training batch; `positions` None: back to global RNG."""
    for purpose, sampler in enumerate((model.rpn.fg_bg_sampler, model.roi_heads.fg_bg_sampler)):
        if positions is None:
            sampler.generators = None
        else:
            sampler.generators = [torch.Generator().manual_seed(sampling_seed(seed, step, int(p), purpose))
                                  for p in positions]


class BaseClassPredictor(nn.Module):
    """A box classifier that learns the K base categories and answers class-agnostically.

    ViLD trains its detector end to end with the ViLD losses, so its backbone learns what tells the base
    categories apart. Here the head trains on cached features of a frozen detector, so the detector must
    learn that itself: in training this predictor classifies [background, K base categories] (novel boxes
    are still never seen) with one box regression shared by all classes; in eval mode it returns two
    classes, background and object, with the object logit logsumexp(category logits), so softmax gives
    p(object) = 1 - p(background) and every consumer of a class-agnostic detector works unchanged.
    """

    def __init__(self, in_channels: int, num_base_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, 1 + num_base_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(start_dim=1)
        logits = self.cls_score(x)
        deltas = self.bbox_pred(x)
        if self.training:
            return logits, deltas.repeat(1, logits.shape[1])
        agnostic = torch.stack([logits[:, 0], torch.logsumexp(logits[:, 1:], dim=1)], dim=1)
        return agnostic, deltas.repeat(1, NUM_CLASSES)


def box_predictor(config: DetectorConfig) -> nn.Module:
    """torchvision's 2-class predictor (object vs background), or the base-category one (`box_classes` > 1)."""
    if config.box_classes == 1:
        return FastRCNNPredictor(config.representation_size, NUM_CLASSES)
    return BaseClassPredictor(config.representation_size, config.box_classes)


def build_detector(config: DetectorConfig, init_backbone: bool = True) -> FasterRCNN:
    """A class-agnostic Faster R-CNN (num_classes=2) for `config`, in training mode.

    `init_backbone` loads `config.backbone_init` weights (ImageNet downloads on a connected machine);
    `load_detector` passes False since a checkpoint holds every weight.
    """
    if config.backbone == "resnet50-fpn":
        backbone = _resnet50_fpn_backbone(config, init_backbone)
    else:
        backbone = _small_fpn_backbone(config, init_backbone)
    anchors = AnchorGenerator(sizes=config.anchor_sizes,
                              aspect_ratios=(config.aspect_ratios,) * len(config.anchor_sizes))
    roi_pool = RoIPool(featmap_names=roi_feature_names(config), output_size=7, sampling_ratio=config.roi_sampling_ratio)
    # The strides are known: torchvision would infer them from the first batch it pools, rounding feature size /
    # image size to a power of two, which for images under ~75 px (padding to a multiple of 32 is then a large
    # part of the size) gives a wrong scale and makes the whole process depend on its first batch.
    strides = roi_feature_strides(config)
    roi_pool.scales = [1.0 / stride for stride in strides]
    roi_pool.map_levels = initLevelMapper(int(math.log2(strides[0])), int(math.log2(strides[-1])),
                                          canonical_scale=roi_pool.canonical_scale,
                                          canonical_level=roi_pool.canonical_level)
    box_head = TwoMLPHead(config.fpn_channels * 7 * 7, config.representation_size)
    model = FasterRCNN(
        backbone,
        min_size=config.min_size,
        max_size=config.max_size,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=config.rpn_pre_nms_top_n_train,
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train=config.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
        rpn_nms_thresh=config.rpn_nms_thresh,
        rpn_fg_iou_thresh=config.rpn_fg_iou_thresh,
        rpn_bg_iou_thresh=config.rpn_bg_iou_thresh,
        rpn_batch_size_per_image=config.rpn_batch_size_per_image,
        rpn_positive_fraction=config.rpn_positive_fraction,
        box_roi_pool=roi_pool,
        box_head=box_head,
        box_predictor=box_predictor(config),
        box_score_thresh=config.box_score_thresh,
        box_nms_thresh=config.box_nms_thresh,
        box_detections_per_img=config.box_detections_per_img,
        box_fg_iou_thresh=config.box_fg_iou_thresh,
        box_bg_iou_thresh=config.box_bg_iou_thresh,
        box_batch_size_per_image=config.box_batch_size_per_image,
        box_positive_fraction=config.box_positive_fraction,
        _skip_resize=True,  # torchvision's switch: in training, images arrive resized by the data pipeline
    )
    model.rpn.fg_bg_sampler = SeededSampler(config.rpn_batch_size_per_image, config.rpn_positive_fraction)
    model.roi_heads.fg_bg_sampler = SeededSampler(config.box_batch_size_per_image, config.box_positive_fraction)
    return model


# Config fields that act only at inference: a finished or resumed run may change them.
INFERENCE_FIELDS = ("rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test", "box_score_thresh", "box_nms_thresh",
                    "box_detections_per_img")


# --------------------------------------------------------------------------- saving and loading

def save_final_model(run_dir: str | os.PathLike, model: nn.Module, config: DetectorConfig, step: int,
                     training: dict[str, Any] | None = None) -> Path:
    """Write RUN/model.pt (weights + detector config, no optimiser state), atomically."""
    state = {
        "format": MODEL_FORMAT,
        "kind": "vild-pipe class-agnostic detector",
        "detector": config.to_dict(),
        "step": int(step),
        "model": model.state_dict(),
    }
    if training is not None:
        state["training"] = training
    return save_checkpoint(Path(run_dir) / MODEL_NAME, state)


def resolve_detector_file(path: str | os.PathLike) -> Path:
    """The file a detector path names: a file as given; a train-rpn run folder's model.pt. A folder whose
    training has not finished is refused rather than read for its half-trained last.pt: using that one is a
    choice the caller makes by naming the file."""
    path = Path(path)
    if path.is_dir():
        if (path / MODEL_NAME).is_file():
            return path / MODEL_NAME
        checkpoint = path / CHECKPOINT_NAME
        state = load_checkpoint(checkpoint, remove_stale_tmp=False, mmap=True) if checkpoint.is_file() else None
        config = _run_config(state or {})
        if "detector" in config:
            iterations = f" of {config['iterations']}" if isinstance(config.get("iterations"), int) else ""
            raise VildError(f"{path}: train-rpn has not finished (step {int(state.get('step', 0))}{iterations};"
                            f" {MODEL_NAME} is written at its end); rerun train-rpn to finish it, or pass"
                            f" {checkpoint} to use its last checkpoint as it is")
        if "head" in config:    # train-head's run config names its head; train-rpn's never does
            raise VildError(f"{path}: a train-head run folder, not a train-rpn one; give a train-rpn run folder"
                            f" or its {MODEL_NAME}")
        raise VildError(f"{path}: no {MODEL_NAME} in this folder (run train-rpn first)")
    if not path.is_file():
        raise VildError(f"{path}: no such detector checkpoint or train-rpn run folder")
    return path


def resized_size(height: int, width: int, min_size: float, max_size: float) -> tuple[int, int]:
    """The (height, width) torchvision's GeneralizedRCNNTransform (and train-rpn's `resize_for_training`)
    resizes an image to: shorter side to `min_size`, longer side at most `max_size`, floored by interpolate."""
    factor = min(min_size / min(height, width), max_size / max(height, width))
    return math.floor(height * factor), math.floor(width * factor)


def check_fits_detector(name: str | os.PathLike, height: int, width: int, min_size: float, max_size: float) -> None:
    """DataError for an image so elongated that resizing it for the detector leaves a side of 0 pixels
    (torch's interpolate would fail with a traceback deep in the model): one line naming it."""
    problem = _too_elongated(height, width, min_size, max_size)
    if problem:
        raise DataError(f"{os.fspath(name)}: {problem}")


def check_images_fit_detector(dataset, min_size: float, max_size: float) -> None:
    """`check_fits_detector` for every image of an annotation file by its recorded size, before any work: the
    first one named, with its id and how many more there are."""
    problems = [(record, problem) for record in dataset.images
                if (problem := _too_elongated(record.height, record.width, min_size, max_size))]
    if problems:
        first, problem = problems[0]
        more = f"; {len(problems) - 1} more such images" if len(problems) > 1 else ""
        raise DataError(f"{os.fspath(first.path)}: {problem} (image id {first.id} of {os.fspath(dataset.path)}{more})")


def _too_elongated(height: int, width: int, min_size: float, max_size: float) -> str | None:
    """What is wrong with an image the detector's resize leaves a side of 0 pixels; None for any other."""
    if min(resized_size(height, width, min_size, max_size)) >= 1:
        return None
    return (f"a {width}x{height} image is too elongated for the detector: resized to a shorter side of {min_size:g}"
            f" and a longer side of at most {max_size:g} pixels, its shorter side is 0 pixels; crop it into parts,"
            " or pad it")


def model_sizes(model: FasterRCNN) -> tuple[int, int]:
    """The (min_size, max_size) a detector resizes its input images to at inference."""
    return int(model.transform.min_size[-1]), int(model.transform.max_size)


def load_detector(path: str | os.PathLike, device: str | torch.device = "cpu"
                  ) -> tuple[FasterRCNN, DetectorConfig, dict[str, Any]]:
    """(model in eval mode on `device`, its DetectorConfig, identity) from a train-rpn run folder or a file.

    A folder gives its final model.pt (see `resolve_detector_file`); a last.pt is read only when named.
    identity = {"checkpoint": file name, "sha256": of the file, "step": training steps}: what a cache records
    to refuse another detector.
    """
    file = resolve_detector_file(path)
    state = load_checkpoint(file, remove_stale_tmp=False)  # a reader must not delete a save in progress
    if state is None:
        raise VildError(f"{file}: no such detector checkpoint")
    if "head_config" in state or "head" in _run_config(state):   # (a head names its detector under "detector")
        raise DataError(f"{file}: a train-head checkpoint, not a detector; give a train-rpn run folder or its"
                        f" {MODEL_NAME}")
    if "detector" in state:
        detector_dict = state["detector"]
    elif "detector" in _run_config(state):
        detector_dict = _run_config(state)["detector"]  # a train-rpn last.pt
    else:
        raise DataError(f"{file}: not a vild-pipe detector checkpoint (no detector config inside)")
    if "model" not in state:
        raise DataError(f"{file}: not a vild-pipe detector checkpoint (no weights inside)")
    try:
        config = DetectorConfig.from_dict(detector_dict)
    except (VildError, TypeError, ValueError) as err:
        raise DataError(f"{file}: unusable detector config ({err})") from err
    model = build_detector(config, init_backbone=False)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise DataError(f"{file}: weights do not fit the detector its config describes ({first})") from err
    model.to(device).eval()
    identity = {"checkpoint": file.name, "sha256": sha256_file(file), "step": int(state.get("step", 0))}
    return model, config, identity


def _run_config(state: dict[str, Any]) -> dict[str, Any]:
    """The train-rpn run config a detector checkpoint carries: model.pt's "training", last.pt's "config"."""
    config = state.get("training") or state.get("config")
    return config if isinstance(config, dict) else {}


def detector_training_data(path: str | os.PathLike) -> dict[str, Any]:
    """What a train-rpn detector was trained on (its annotation file's sha256, its split, ...); {} where the
    checkpoint does not say. Reads it memory-mapped: the weights are not loaded (load_detector does that)."""
    try:
        state = load_checkpoint(resolve_detector_file(path), remove_stale_tmp=False, mmap=True) or {}
    except VildError:
        return {}   # an unreadable file is load_detector's to report
    data = _run_config(state).get("data")
    return data if isinstance(data, dict) else {}


def describe_detector(identity: dict[str, Any]) -> str:
    """A detector identity in a message: checkpoint name and the start of its sha256."""
    return f"{identity.get('checkpoint')} ({str(identity.get('sha256'))[:12]})"


def check_head_detector(head_file: str | os.PathLike, trained_on: dict[str, Any], ours: dict[str, Any],
                        ours_named: str, remedy: str) -> None:
    """DataError when both detectors are known by sha256 and differ: another detector's features, even of the
    same shape, mean nothing to a head. `ours_named` says where ours comes from, `remedy` what to do."""
    if trained_on.get("sha256") and ours.get("sha256") and trained_on["sha256"] != ours["sha256"]:
        raise DataError(f"{os.fspath(head_file)}: head was trained on features of detector"
                        f" {describe_detector(trained_on)}, {ours_named} {describe_detector(ours)}; {remedy}")


# --------------------------------------------------------------------------- inference

@torch.no_grad()
def predict_boxes(model: FasterRCNN, images: list[torch.Tensor], source: str = "detections"
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Class-agnostic boxes per image, best first, xyxy in the input images' pixels (clipped), with scores.

    `images` are float RGB in [0, 1], C x H x W, on the model's device. "detections": after the box head's
    regression and NMS (what dump-proposals keeps); "proposals": the RPN's boxes before the box head
    (score = objectness probability).
    """
    if model.training:
        raise RuntimeError("predict_boxes needs the model in eval mode")
    if source == "detections":
        return [(clip_boxes_to_image(out["boxes"], tuple(image.shape[-2:])), out["scores"])
                for out, image in zip(model(images), images)]
    if source != "proposals":
        raise VildError(f"unknown box source {source!r}: use detections or proposals")
    original_sizes = [tuple(image.shape[-2:]) for image in images]
    batch, _ = model.transform(images)
    features = model.backbone(batch.tensors)
    objectness, deltas = model.rpn.head(list(features.values()))
    anchors = model.rpn.anchor_generator(batch, list(features.values()))
    levels = [o[0].numel() for o in objectness]
    flat_objectness, flat_deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = model.rpn.box_coder.decode(flat_deltas.detach(), anchors).view(len(anchors), -1, 4)
    boxes, scores = model.rpn.filter_proposals(proposals, flat_objectness, batch.image_sizes, levels)
    results = []
    for image_boxes, image_scores, size, original in zip(boxes, scores, batch.image_sizes, original_sizes):
        order = torch.argsort(image_scores, descending=True, stable=True)
        boxes_in_input = clip_boxes_to_image(resize_boxes(image_boxes[order], size, original), original)
        results.append((boxes_in_input, image_scores[order]))
    return results
