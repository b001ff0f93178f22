"""The ViLD head: cached RoI features -> L2-normalised region embeddings in CLIP's space, and its two losses.

DESIGN.md §2: RoIAlign features -> box head (torchvision's TwoMLPHead, or N 3x3 convs + two FCs as in ViLD's
official config) -> linear projection to the CLIP embedding size -> L2 normalisation; a learned background
embedding. ViLD-text classifies a region by cosine similarity with [background, base category texts] at
temperature τ = 0.01; ViLD-image pulls the region embedding to the CLIP embedding of the same box with an L1
distance. Novel categories never appear here.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, TwoMLPHead
from torchvision.ops import box_iou

from vild_pipe.errors import DataError, VildError
from vild_pipe.pipeline.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from vild_pipe.pipeline.detector import MODEL_NAME as DETECTOR_MODEL_NAME

TEMPERATURE = 0.01          # ViLD's τ: cosine logits are divided by it
IMAGE_LOSS_WEIGHT = 0.5     # ViLD's w for the ViLD-image term
FOREGROUND_IOU = 0.5        # a box is of a base class when its IoU with that class's GT box is at least this
BACKGROUND = 0              # label of background; base category k (0-based) has label k + 1
HEAD_NAME = "head.pt"
HEAD_FORMAT = 1


@dataclass(frozen=True)
class HeadConfig:
    """Shape of a ViLDHead: input features (channels x resolution²), hidden width, CLIP embedding size, and
    how many 3x3 conv layers (GroupNorm, ReLU) come before the two FC layers (ViLD's official head has 4)."""

    in_channels: int
    resolution: int = 7
    representation_size: int = 1024
    embed_dim: int = 512
    conv_layers: int = 0

    def __post_init__(self) -> None:
        if self.conv_layers < 0:
            raise VildError(f"--conv-layers must be 0 or more, got {self.conv_layers}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class ViLDHead(nn.Module):
    """Region features (R, C, 7, 7) -> (R, D) unit-length region embeddings; plus a learned background."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        self.box_head = _box_head(config)
        self.projection = nn.Linear(config.representation_size, config.embed_dim)
        # Any direction will do; it is normalised before use, so its scale only sets its learning speed.
        self.background = nn.Parameter(F.normalize(torch.randn(config.embed_dim), dim=0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.box_head(features.float())), dim=-1)

    def background_embedding(self) -> torch.Tensor:
        return F.normalize(self.background, dim=0)


def _box_head(config: HeadConfig) -> nn.Module:
    """torchvision's TwoMLPHead, or its conv + FC head (GroupNorm: batch-independent, so DDP changes nothing)."""
    if config.conv_layers == 0:
        return TwoMLPHead(config.in_channels * config.resolution ** 2, config.representation_size)
    return FastRCNNConvFCHead((config.in_channels, config.resolution, config.resolution),
                              [config.in_channels] * config.conv_layers, [config.representation_size] * 2,
                              norm_layer=lambda channels: nn.GroupNorm(math.gcd(8, channels), channels))


def text_logits(regions: torch.Tensor, background: torch.Tensor, texts: torch.Tensor,
                temperature: float = TEMPERATURE) -> torch.Tensor:
    """(R, 1 + K) logits: cosine with [background, text_1..text_K] over τ (all inputs already unit length)."""
    classifier = torch.cat([background[None], texts.to(regions.dtype)], dim=0)
    return regions @ classifier.T / temperature


def vild_text_loss(regions: torch.Tensor, background: torch.Tensor, texts: torch.Tensor, labels: torch.Tensor,
                   temperature: float = TEMPERATURE, reduction: str = "mean") -> torch.Tensor:
    """ViLD-text: softmax cross-entropy of the cosine logits with labels (0 background, k + 1 base class k)."""
    return F.cross_entropy(text_logits(regions, background, texts, temperature), labels, reduction=reduction)


def vild_image_loss(regions: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """ViLD-image: L1 distance ||e_r - e_clip||_1 (summed over the embedding) per region; mean over regions.

    Both sides are unit length (the CLIP target is re-normalised here, fp16 storage loses a little)."""
    differences = (regions - F.normalize(targets.to(regions.dtype), dim=-1)).abs()
    if reduction == "sum":
        return differences.sum()
    distances = differences.sum(dim=-1)
    if reduction == "none":
        return distances
    return distances.mean() if len(distances) else distances.sum()


def assign_labels(boxes: np.ndarray | torch.Tensor, gt_boxes: np.ndarray | torch.Tensor,
                  gt_labels: np.ndarray | torch.Tensor, iou_threshold: float = FOREGROUND_IOU) -> torch.Tensor:
    """Per box: 1 + the base class of the GT box it overlaps most if that IoU >= threshold, else 0 (background).

    `gt_labels` are 0-based base class indices. GT rows of the cache overlap their own box with IoU 1, so
    they are positives. Novel objects have no GT here: boxes on them are background, as in ViLD.
    """
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)
    gt_labels = torch.as_tensor(gt_labels, dtype=torch.int64).reshape(-1)
    labels = torch.full((len(boxes),), BACKGROUND, dtype=torch.int64)
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return labels
    best_iou, best_gt = box_iou(boxes, gt_boxes).max(dim=1)
    foreground = best_iou >= iou_threshold
    labels[foreground] = gt_labels[best_gt[foreground]] + 1
    return labels


def sample_rois(labels: np.ndarray | torch.Tensor, num_rois: int, foreground_fraction: float,
                rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted) of at most `num_rois` boxes, at most `foreground_fraction` of them foreground.

    torchvision's/Detectron's balanced sampler: all foreground up to the quota, background fills the rest.
    """
    labels = np.asarray(labels)
    foreground = np.flatnonzero(labels != BACKGROUND)
    background = np.flatnonzero(labels == BACKGROUND)
    num_fg = min(len(foreground), int(num_rois * foreground_fraction))
    num_bg = min(len(background), num_rois - num_fg)
    chosen = np.concatenate([rng.permutation(foreground)[:num_fg], rng.permutation(background)[:num_bg]])
    return np.sort(chosen).astype(np.int64)


def save_head(path: str | os.PathLike, head: ViLDHead, info: dict[str, Any]) -> Path:
    """Write the final head (weights + HeadConfig + `info`: losses, clip identity, caches, config) atomically."""
    state = {"format": HEAD_FORMAT, "kind": "vild-pipe head", "head_config": head.config.to_dict(),
             "model": {k: v.detach().cpu() for k, v in head.state_dict().items()}, **info}
    return save_checkpoint(path, state)


def resolve_head_file(path: str | os.PathLike) -> Path:
    """RUN/head.pt for a train-head run folder, the path itself for a file."""
    path = Path(path)
    if path.is_dir():
        if (path / HEAD_NAME).is_file():
            return path / HEAD_NAME
        if _is_train_rpn_folder(path):
            raise VildError(f"{path}: a train-rpn run folder, not a train-head one; give a train-head run folder"
                            f" or its {HEAD_NAME}")
        hint = " (training not finished: rerun train-head)" if (path / CHECKPOINT_NAME).is_file() else ""
        raise VildError(f"{path}: no {HEAD_NAME} in this run folder{hint}")
    if not path.is_file():
        raise VildError(f"{path}: no such head file or train-head run folder")
    return path


def _is_train_rpn_folder(path: Path) -> bool:
    """Whether a folder without a head is train-rpn's: its final detector, or a checkpoint of a detector's
    training (train-rpn's config has a "detector" section, train-head's none)."""
    if (path / DETECTOR_MODEL_NAME).is_file():
        return True
    try:
        state = load_checkpoint(path / CHECKPOINT_NAME, remove_stale_tmp=False)
    except VildError:
        return False
    config = (state or {}).get("config")
    return isinstance(config, dict) and "detector" in config


def load_head(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ViLDHead, dict[str, Any]]:
    """(head in eval mode on `device`, info) from a train-head run folder or head file.

    info holds "losses", "clip", "embed_dim", "step", "proposals", "detector" (the identity of the detector whose
    features the head was trained on; absent from heads written before it was recorded), "embeddings", "text",
    "config", "head_config".
    """
    file = resolve_head_file(path)
    state = load_checkpoint(file, remove_stale_tmp=False)
    if state is None or state.get("kind") != "vild-pipe head" or "head_config" not in state:
        raise DataError(f"{file}: not a head written by vild-pipe train-head")
    head = ViLDHead(HeadConfig(**state["head_config"]))
    try:
        head.load_state_dict(state["model"])
    except RuntimeError as err:
        raise DataError(f"{file}: head weights do not fit its config ({str(err).splitlines()[0]})") from err
    head.to(device).eval()
    info = {key: value for key, value in state.items() if key not in ("model", "format", "kind")}
    return head, info
