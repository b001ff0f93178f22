"""Class-agnostic recall of a detector's boxes, for base and novel ground truth apart.

Novel recall is the question an open-vocabulary detector's proposals must answer: the detector never saw a
novel box (they were negatives in its training images), yet the head can only name what a proposal covers.

Definition (proposal recall, as in Hosang et al. 2016 and Detectron's `evaluate_box_proposals`, not COCO's
one-to-one AR): a ground-truth box is recalled at IoU t if any of the image's top-k boxes overlaps it with
IoU >= t. Recall@0.5 is the recalled fraction at t = 0.5; AR is the mean of the recalled fraction over
t = 0.50, 0.55, ..., 0.95. Crowd boxes are left out; so are categories outside the split (in neither list).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.ops import box_iou
from torchvision.transforms.functional import pil_to_tensor
from tqdm import tqdm

from vild_pipe.data.coco import CocoDataset
from vild_pipe.data.splits import CategorySplit
from vild_pipe.pipeline.detector import predict_boxes
from vild_pipe.pipeline.distributed import loader_workers

log = logging.getLogger(__name__)

IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
GROUPS = ("base", "novel", "all")


def best_overlaps(boxes: torch.Tensor, gt_boxes: torch.Tensor) -> np.ndarray:
    """For each ground-truth box, its highest IoU with any of `boxes` (0 where there are no boxes)."""
    if len(gt_boxes) == 0:
        return np.zeros(0, dtype=np.float64)
    if len(boxes) == 0:
        return np.zeros(len(gt_boxes), dtype=np.float64)
    iou = box_iou(gt_boxes.to(torch.float64), boxes.to(device=gt_boxes.device, dtype=torch.float64))
    return iou.max(dim=1).values.cpu().numpy()


class RecallAccumulator:
    """Collects each ground-truth object's best overlap with the top-k boxes of its image, by group."""

    def __init__(self, split: CategorySplit, top_k: int = 100):
        if top_k < 1:
            raise ValueError(f"top_k must be positive, got {top_k}")
        self.split = split
        self.top_k = top_k
        self._overlaps: dict[str, list[np.ndarray]] = {"base": [], "novel": []}
        self.images = 0

    def add(self, boxes: torch.Tensor, gt_boxes: np.ndarray | torch.Tensor, gt_category_ids: np.ndarray,
            gt_iscrowd: np.ndarray | None = None) -> None:
        """One image: `boxes` best first (only the first top_k count), its ground truth in the same pixels."""
        gt_boxes = torch.as_tensor(np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4))
        gt_category_ids = np.asarray(gt_category_ids, dtype=np.int64)
        counted = np.ones(len(gt_category_ids), dtype=bool) if gt_iscrowd is None else ~np.asarray(gt_iscrowd, bool)
        overlaps = best_overlaps(boxes[: self.top_k], gt_boxes)
        self._overlaps["base"].append(overlaps[counted & self.split.base_mask(gt_category_ids)])
        self._overlaps["novel"].append(overlaps[counted & self.split.novel_mask(gt_category_ids)])
        self.images += 1

    def overlaps(self, group: str) -> np.ndarray:
        """Best overlaps of every counted object of `group` ("base", "novel" or "all")."""
        parts = self._overlaps["base"] + self._overlaps["novel"] if group == "all" else self._overlaps[group]
        return np.concatenate(parts) if parts else np.zeros(0)

    def summary(self) -> dict[str, Any]:
        """{"top_k", "images", and per group: objects, recall@0.5, AR@0.5:0.95, recall_by_iou}; None where a
        group has no objects."""
        result: dict[str, Any] = {"top_k": self.top_k, "images": self.images}
        for group in GROUPS:
            overlaps = self.overlaps(group)
            if len(overlaps) == 0:
                result[group] = {"objects": 0, "recall@0.5": None, "AR@0.5:0.95": None, "recall_by_iou": None}
                continue
            by_iou = {f"{t:.2f}": float(np.mean(overlaps >= t)) for t in IOU_THRESHOLDS}
            result[group] = {
                "objects": int(len(overlaps)),
                "recall@0.5": by_iou["0.50"],
                "AR@0.5:0.95": float(np.mean(list(by_iou.values()))),
                "recall_by_iou": by_iou,
            }
        return result


def format_recall(summary: dict[str, Any]) -> str:
    """One line for logs: recall@0.5 and AR per group."""
    parts = []
    for group in GROUPS:
        stats = summary[group]
        if stats["objects"]:
            parts.append(f"{group} recall@0.5 {stats['recall@0.5']:.3f} AR {stats['AR@0.5:0.95']:.3f} "
                         f"({stats['objects']} objects)")
    return f"top-{summary['top_k']} boxes on {summary['images']} images: " + ("; ".join(parts) or "no objects to find")


class ImageTensors(Dataset):
    """Every image of a dataset as float RGB in [0, 1] (C x H x W), with its id: for inference."""

    def __init__(self, dataset: CocoDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        record = self.dataset.images[index]
        return pil_to_tensor(self.dataset.open_image(record)).float().div_(255), record.id


@torch.no_grad()
def measure_recall(model: torch.nn.Module, dataset: CocoDataset, split: CategorySplit, top_k: int = 100,
                   source: str = "detections", device: str | torch.device = "cpu", batch_size: int = 8,
                   workers: int = 0) -> dict[str, Any]:
    """Run `model` (eval mode) over every image of `dataset` and summarise its class-agnostic recall.

    For "detections" the box head keeps up to `top_k` boxes per image (its NMS and score threshold come
    from the model's config); for "proposals" the RPN's first `top_k`.
    """
    roi_heads = model.roi_heads
    kept_detections = roi_heads.detections_per_img
    roi_heads.detections_per_img = max(kept_detections, top_k)
    accumulator = RecallAccumulator(split, top_k)
    loader = DataLoader(ImageTensors(dataset), batch_size=batch_size, collate_fn=list, **loader_workers(workers))
    try:
        for batch in tqdm(loader, desc="recall", unit="batch", disable=None, leave=False):
            images = [image.to(device) for image, _ in batch]
            for (image, image_id), (boxes, _) in zip(batch, predict_boxes(model, images, source)):
                gt_boxes, gt_categories, gt_crowd = dataset.annotations_for(image_id)
                accumulator.add(boxes.cpu(), gt_boxes, gt_categories, gt_crowd)
    finally:
        roi_heads.detections_per_img = kept_detections
    return accumulator.summary()
