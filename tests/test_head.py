"""The ViLD head's losses against hand-computed values, label assignment, RoI sampling, save/load."""
import math

import numpy as np
import pytest
import torch

from vild_pipe.errors import VildError
from vild_pipe.pipeline.head import (
    TEMPERATURE, HeadConfig, ViLDHead, assign_labels, load_head, sample_rois, save_head, text_logits,
    vild_image_loss, vild_text_loss,
)


def test_temperature_is_vilds():
    assert TEMPERATURE == 0.01


def test_text_loss_matches_hand_computation_with_background_column_and_temperature():
    s = 1 / math.sqrt(2)
    regions = torch.tensor([[1.0, 0.0], [s, s]])
    background = torch.tensor([0.0, 1.0])
    texts = torch.tensor([[1.0, 0.0], [-s, s]])
    labels = torch.tensor([1, 0])   # region 0 is base class 0, region 1 background
    # cosines: region 0 -> [bg 0, t1 1, t2 -s]; region 1 -> [bg s, t1 s, t2 0]
    cosines = [[0.0, 1.0, -s], [s, s, 0.0]]
    expected = []
    for row, label in zip(cosines, [1, 0]):
        logits = [c / 0.01 for c in row]
        top = max(logits)
        expected.append(-(logits[label] - top - math.log(sum(math.exp(v - top) for v in logits))))
    got = vild_text_loss(regions, background, texts, labels)
    assert got.item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert text_logits(regions, background, texts)[1, 0].item() == pytest.approx(s / 0.01, rel=1e-5)
    # at τ = 1 the same cosines give soft probabilities and a much larger loss: the temperature is applied
    assert vild_text_loss(regions, background, texts, labels, temperature=1.0) > 1.5 * got


def test_image_loss_is_the_mean_l1_distance_to_the_normalised_target():
    regions = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    targets = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.6, 0.8]], dtype=torch.float16)   # first not unit length
    # region 0 vs (0, 1, 0): |1| + |-1| + 0 = 2; region 1 equals its target: 0
    assert vild_image_loss(regions, targets).item() == pytest.approx(1.0, abs=1e-3)
    assert vild_image_loss(regions, targets, reduction="none").tolist() == pytest.approx([2.0, 0.0], abs=1e-3)


def test_labels_come_from_iou_with_base_gt_and_disjoint_boxes_are_background():
    gt_boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=np.float32)
    gt_labels = np.array([3, 0])
    boxes = np.array([
        [0, 0, 10, 10],     # a GT row: IoU 1 -> class 3
        [0, 0, 10, 5],      # IoU 0.5 exactly -> class 3
        [0, 0, 10, 4],      # IoU 0.4 -> background
        [21, 21, 30, 30],   # IoU 0.81 with the second box -> class 0
        [50, 50, 60, 60],   # disjoint from every GT box (a negative overlap must not count) -> background
    ], dtype=np.float32)
    labels = assign_labels(boxes, gt_boxes, gt_labels)
    assert labels.tolist() == [4, 4, 0, 1, 0]
    assert assign_labels(boxes, np.zeros((0, 4)), np.zeros(0)).tolist() == [0] * 5


def test_sampling_caps_foreground_and_fills_with_background():
    labels = np.array([1] * 10 + [0] * 30)
    chosen = sample_rois(labels, 16, 0.25, np.random.default_rng(0))
    assert len(chosen) == 16 and (labels[chosen] != 0).sum() == 4
    assert np.all(np.diff(chosen) > 0)
    few_background = np.array([2] * 10 + [0] * 3)
    chosen = sample_rois(few_background, 512, 0.25, np.random.default_rng(0))
    assert (few_background[chosen] != 0).sum() == 10 and (few_background[chosen] == 0).sum() == 3
    again = sample_rois(labels, 16, 0.25, np.random.default_rng(0))
    assert np.array_equal(sample_rois(labels, 16, 0.25, np.random.default_rng(0)), again)


@pytest.mark.parametrize("conv_layers", [0, 2])
def test_head_outputs_unit_embeddings_and_round_trips(tmp_path, conv_layers):
    head = ViLDHead(HeadConfig(in_channels=8, resolution=7, representation_size=32, embed_dim=16,
                               conv_layers=conv_layers))
    convs = [m for m in head.box_head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == conv_layers
    features = torch.randn(5, 8, 7, 7).half()
    regions = head(features)
    assert regions.shape == (5, 16)
    assert torch.allclose(regions.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert head.background_embedding().norm().item() == pytest.approx(1.0, abs=1e-6)
    save_head(tmp_path / "head.pt", head, {"losses": "text", "clip": {"model": "x"}, "embed_dim": 16, "step": 3})
    loaded, info = load_head(tmp_path)
    assert info["losses"] == "text" and info["step"] == 3 and info["head_config"]["embed_dim"] == 16
    with torch.no_grad():
        assert torch.equal(loaded(features), head(features))
    with pytest.raises(VildError):
        load_head(tmp_path / "missing")
