"""Scoring regions against a vocabulary and turning the scores into detections (torch in, torch out).

Scoring (one image's boxes at a time; numpy accepted; every embedding is L2-normalised here in float32, so
float16 cache rows give true cosines):

- CLIP-on-crops: softmax over the categories of cos(crop embedding, text embedding) / tau.
- Head modes (ViLD-text, ViLD-image, ViLD): softmax over [background, categories] of cos / tau with the
  head's learned background embedding, background column dropped (not renormalised), as the official
  `GenericDetectionGenerator` does.
- ViLD-ensemble: per category, text^w * image^(1 - w), w = 2/3 on base and 1/3 on novel categories
  (DESIGN.md section 2). The product is used as it is, NOT renormalised over the categories: the official
  code (`projects/vild/ops/postprocess_ops.py`) takes `pow(text * image * third, 1/3)` and hands it
  straight to NMS, and renormalising each row would change how boxes rank against each other within a
  category, which is all that AP measures. (There the image side is a second distilled head branch; its
  `rare_mask` is 1 for the categories trained on and 0 for rare ones, the mask its training loss multiplies
  the logits by, so `third` is text on base and image on rare categories: the weights here, which are
  parameters.)

Detections: per-class NMS (as torchvision's `batched_nms`, IoU 0.5) over every (box, category) pair scoring
above the threshold, best `max_detections` kept per image; computed exactly on a top-k subset (see
`detections_from_scores`) so a 1203-category vocabulary costs no more than a small one. Their metrics are
`evaluation`'s, which imports no torch (its COCOeval runs go to worker processes that start in a blink).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchvision.ops import nms

from vild_pipe.pipeline.head import TEMPERATURE

BASE_TEXT_WEIGHT = 2.0 / 3.0
NOVEL_TEXT_WEIGHT = 1.0 / 3.0
NMS_IOU_THRESHOLD = 0.5
MAX_DETECTIONS = 300


def _normalised(embeddings: torch.Tensor | np.ndarray, device: torch.device | None = None) -> torch.Tensor:
    tensor = torch.as_tensor(embeddings)
    if device is not None:
        tensor = tensor.to(device)
    return torch.nn.functional.normalize(tensor.float(), dim=-1)


def crop_probabilities(crop_emb: torch.Tensor | np.ndarray, text_emb: torch.Tensor | np.ndarray,
                       temperature: float = TEMPERATURE) -> torch.Tensor:
    """(R, K) class probabilities of CLIP crop embeddings (R, D) over all K categories; rows sum to 1."""
    crops = _normalised(crop_emb)
    texts = _normalised(text_emb, crops.device)
    return torch.softmax(crops @ texts.T / temperature, dim=1)


def head_probabilities(region_emb: torch.Tensor | np.ndarray, text_emb: torch.Tensor | np.ndarray,
                       background_emb: torch.Tensor | np.ndarray, temperature: float = TEMPERATURE) -> torch.Tensor:
    """(R, K) text-branch probabilities: softmax over [background, K categories], background column dropped.

    Rows sum to 1 - p(background), so a box the head calls background scores low for every category.
    """
    regions = _normalised(region_emb)
    classifier = torch.cat([_normalised(background_emb, regions.device).reshape(1, -1),
                            _normalised(text_emb, regions.device)])
    return torch.softmax(regions @ classifier.T / temperature, dim=1)[:, 1:]


def ensemble_probabilities(head_probs: torch.Tensor | np.ndarray, crop_probs: torch.Tensor | np.ndarray,
                           is_novel: torch.Tensor | np.ndarray | Sequence[bool],
                           base_text_weight: float = BASE_TEXT_WEIGHT,
                           novel_text_weight: float = NOVEL_TEXT_WEIGHT) -> torch.Tensor:
    """ViLD-ensemble scores (R, K): head^w * crop^(1 - w), w per category from `is_novel` (K,); not renormalised.

    Categories outside the split (neither base nor novel) take the base weights.
    """
    for name, weight in (("base_text_weight", base_text_weight), ("novel_text_weight", novel_text_weight)):
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {weight}")
    head = torch.as_tensor(head_probs).float()
    crop = torch.as_tensor(crop_probs).to(head.device).float()
    if head.shape != crop.shape:
        raise ValueError(f"head probabilities {tuple(head.shape)} and crop probabilities {tuple(crop.shape)} differ")
    novel = torch.as_tensor(np.asarray(is_novel, dtype=bool)).to(head.device)
    if novel.shape != head.shape[1:]:
        raise ValueError(f"is_novel has shape {tuple(novel.shape)}, expected ({head.shape[1]},)")
    text_weight = torch.where(novel, novel_text_weight, base_text_weight).to(head.dtype)
    return head.pow(text_weight) * crop.pow(1.0 - text_weight)


# ---------------------------------------------------------------------------------------------- detections


def detections_from_scores(boxes: torch.Tensor | np.ndarray, probs: torch.Tensor | np.ndarray,
                           iou_threshold: float = NMS_IOU_THRESHOLD, max_detections: int = MAX_DETECTIONS,
                           score_threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class NMS over every (box, category) pair with score > `score_threshold`; best `max_detections`.

    boxes (R, 4) xyxy, probs (R, K). Returns (boxes (N, 4) float32, scores (N,), class_index (N,) int64),
    best first, N <= max_detections. Every box competes in every category (ViLD boxes are class-agnostic),
    so boxes that overlap may both survive under different categories.

    Greedy NMS keeps or drops a candidate looking only at higher-scoring candidates of its category, so NMS
    run on the top-k candidates by score keeps exactly the full run's survivors among them; k doubles until
    `max_detections` survive or every candidate is in, which keeps 1000 boxes x 1203 categories cheap.
    """
    if max_detections < 1:
        raise ValueError(f"max_detections must be positive, got {max_detections}")
    probs = torch.as_tensor(probs).float()
    boxes = torch.as_tensor(boxes).to(probs.device).float().reshape(-1, 4)
    if probs.ndim != 2 or probs.shape[0] != boxes.shape[0]:
        raise ValueError(f"probabilities {tuple(probs.shape)} do not match {boxes.shape[0]} boxes")
    flat_scores = probs.reshape(-1)
    candidates = torch.nonzero(flat_scores > score_threshold).squeeze(1)
    candidate_scores = flat_scores[candidates]
    num_classes = probs.shape[1]
    take = min(len(candidates), 4 * max_detections)
    while True:
        top_scores, order = torch.topk(candidate_scores, take)
        chosen = candidates[order]
        box_index, class_index = chosen // num_classes, chosen % num_classes
        keep = nms_per_class(boxes[box_index], top_scores, class_index, iou_threshold)
        if len(keep) >= max_detections or take == len(candidates):
            break
        take = min(len(candidates), 2 * take)
    keep = keep[:max_detections]
    return boxes[box_index[keep]], top_scores[keep], class_index[keep]


def nms_per_class(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_threshold: float
                  ) -> torch.Tensor:
    """torchvision's `batched_nms` as one `nms` call, each class's boxes moved to a region of their own.

    batched_nms loops over the classes on a CPU above 1000 boxes: 1200 candidates spread over 770 LVIS
    classes took 55 ms a box set that way, 3 ms this way. The shift is done in float64, so boxes shifted by
    up to 1203 classes x 1333 px keep their float32 coordinates exactly.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    boxes = boxes.double()
    shift = classes.to(boxes) * (boxes.max() - boxes.min() + 1)
    return nms(boxes + shift[:, None], scores.double(), iou_threshold)
