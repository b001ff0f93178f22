"""The class-agnostic detector (build, save/load, seeded sampling, inference) and the recall computation."""
import hashlib
import json

import numpy as np
import pytest
import torch
from torchvision.models import resnet50
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from vild_pipe.data.splits import CategorySplit
from vild_pipe.errors import DataError, VildError
from vild_pipe.pipeline.checkpoint import CHECKPOINT_NAME, save_checkpoint
from vild_pipe.pipeline.detector import (
    MODEL_NAME, DetectorConfig, RoIPool, SeededSampler, build_detector, check_fits_detector, detector_training_data,
    feature_channels, load_detector, predict_boxes, resized_size, save_final_model, set_sampling_seeds,
)
from vild_pipe.pipeline.recall import IOU_THRESHOLDS, RecallAccumulator, best_overlaps

# A small preset shrunk so a step takes milliseconds.
TINY = dict(small_widths=(8, 16, 32, 32), fpn_channels=16, representation_size=32, min_size=96, max_size=96,
            rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=200, rpn_pre_nms_top_n_test=100,
            rpn_post_nms_top_n_test=100, box_batch_size_per_image=64)


def tiny_batch(n=2, size=96, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=generator) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0], [50.0, 40.0, 90.0, 80.0]]),
                "labels": torch.ones(2, dtype=torch.int64)} for _ in range(n)]
    return images, targets


def test_config_round_trips_through_json_and_refuses_bad_values():
    config = DetectorConfig.preset("small", fpn_channels=32)
    as_json = json.loads(json.dumps(config.to_dict()))
    assert DetectorConfig.from_dict(as_json) == config
    assert config.anchor_sizes == ((16,), (32,), (64,), (128,)) and config.fpn_channels == 32
    assert DetectorConfig() == DetectorConfig.preset("resnet50-fpn")
    assert DetectorConfig().rpn_nms_thresh == 0.7
    assert (DetectorConfig().box_batch_size_per_image, DetectorConfig().box_positive_fraction) == (512, 0.25)
    with pytest.raises(DataError, match="unknown fields"):
        DetectorConfig.from_dict({**as_json, "colour": "red"})
    with pytest.raises(VildError, match="4 FPN levels but anchor_sizes gives 5"):
        DetectorConfig.preset("small", anchor_sizes=((8,), (16,), (32,), (64,), (128,)))
    with pytest.raises(VildError, match="unknown backbone"):
        DetectorConfig.preset("vgg16")


def test_small_detector_is_class_agnostic_and_trains(one_torch_thread):
    config = DetectorConfig.preset("small", **TINY)
    torch.manual_seed(0)
    model = build_detector(config)
    assert model.roi_heads.box_predictor.cls_score.out_features == 2          # background, object
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 8
    assert model.backbone.out_channels == feature_channels(config) == 16
    assert model.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2"]

    images, targets = tiny_batch()
    set_sampling_seeds(model, seed=0, step=0, positions=[0, 1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    totals = []
    for _ in range(20):
        losses = model(images, targets)
        assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert np.mean(totals[-3:]) < 0.5 * np.mean(totals[:3])

    model.eval()
    features = model.backbone(torch.rand(1, 3, 96, 96))
    pooled = model.roi_heads.box_roi_pool(features, [torch.tensor([[10.0, 10.0, 60.0, 70.0]])], [(96, 96)])
    assert pooled.shape == (1, 16, 7, 7)


def test_base_class_box_head_learns_categories_and_answers_object_vs_background(one_torch_thread):
    config = DetectorConfig.preset("small", **TINY, box_classes=3)
    torch.manual_seed(0)
    model = build_detector(config)
    predictor = model.roi_heads.box_predictor
    assert predictor.cls_score.out_features == 4                                # background + 3 base categories
    images, targets = tiny_batch()
    for target in targets:
        target["labels"] = torch.tensor([1, 3])
    set_sampling_seeds(model, seed=0, step=0, positions=[0, 1])
    losses = model(images, targets)                                             # trains on 4 classes
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}

    features = torch.randn(5, config.representation_size)
    predictor.train()
    logits, deltas = predictor(features)
    assert logits.shape == (5, 4) and deltas.shape == (5, 16)
    assert torch.equal(deltas[:, :4], deltas[:, 12:])                          # one regression for every class
    predictor.eval()
    agnostic, agnostic_deltas = predictor(features)
    assert agnostic.shape == (5, 2) and agnostic_deltas.shape == (5, 8)
    object_probability = agnostic.softmax(1)[:, 1]
    torch.testing.assert_close(object_probability, 1 - logits.softmax(1)[:, 0])

    model.eval()
    boxes, scores = predict_boxes(model, [torch.rand(3, 96, 96)])[0]
    assert len(boxes) == len(scores) and (scores <= 1).all()


def test_resnet50_fpn_matches_torchvision_layout_and_loads_a_local_backbone_file(tmp_path, one_torch_thread):
    config = DetectorConfig(min_size=64, max_size=64)
    scratch = build_detector(config)
    assert feature_channels(config) == scratch.backbone.out_channels == 256
    assert scratch.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    assert len(scratch.rpn.anchor_generator.sizes) == 5
    assert isinstance(scratch.backbone.body.bn1, torch.nn.GroupNorm)   # from scratch: GroupNorm, all trainable
    assert all(p.requires_grad for p in scratch.backbone.parameters())

    torch.manual_seed(1)
    imagenet_like = resnet50(weights=None)
    weights_file = tmp_path / "r50.pth"
    torch.save(imagenet_like.state_dict(), weights_file)
    pretrained = build_detector(DetectorConfig(backbone_init=str(weights_file), min_size=64, max_size=64))
    body = pretrained.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d)
    assert torch.equal(body.layer3[0].conv1.weight, imagenet_like.layer3[0].conv1.weight)
    assert not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad
    pretrained.eval()
    (boxes, scores), = predict_boxes(pretrained, [torch.rand(3, 80, 64)])
    assert boxes.shape[1] == 4 and len(boxes) == len(scores) <= 100

    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(DataError, match="wrong.pth: does not fit"):
        build_detector(DetectorConfig(backbone_init=str(tmp_path / "wrong.pth")))
    with pytest.raises(VildError) as caught:
        build_detector(DetectorConfig.preset("small", backbone_init="imagenet"))
    assert str(caught.value) == ("--backbone-init imagenet: the small backbone has no ImageNet weights;"
                                 " use --backbone-init none or a state-dict file")


def test_training_roi_pool_matches_torchvision_roi_align_values_and_gradients():
    generator = torch.Generator().manual_seed(0)
    features = {name: torch.randn(2, 8, side, side, generator=generator, requires_grad=True)
                for name, side in (("0", 48), ("1", 24), ("2", 12))}
    image_shapes = [(192, 180), (170, 192)]
    boxes = []
    for (height, width), count in zip(image_shapes, (60, 40)):
        corner = torch.rand(count, 2, generator=generator) * torch.tensor([width, height]) * 0.9
        size = torch.rand(count, 2, generator=generator) * 250 + 0.3   # from sub-pixel to beyond the image
        box = torch.cat([corner, corner + size], dim=1)
        box[:, 0::2] = box[:, 0::2].clamp(max=width)                  # clipped, as proposals and GT are
        box[:, 1::2] = box[:, 1::2].clamp(max=height)
        boxes.append(box)
    torchvision_pool = MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=1)
    pool = RoIPool(["0", "1", "2"], output_size=7, sampling_ratio=1)
    expected = torchvision_pool(features, boxes, image_shapes)
    pooled = pool(features, boxes, image_shapes)
    assert torchvision_pool.map_levels(boxes).unique().numel() >= 2     # more than one level exercised
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-4)
    weights = torch.randn(expected.shape, generator=generator)
    expected_grads = torch.autograd.grad((expected * weights).sum(), list(features.values()), allow_unused=True)
    grads = torch.autograd.grad((pooled * weights).sum(), list(features.values()), allow_unused=True)
    for feature, grad, expected_grad in zip(features.values(), grads, expected_grads):
        zeros = torch.zeros_like(feature)
        torch.testing.assert_close(zeros if grad is None else grad,
                                   zeros if expected_grad is None else expected_grad, rtol=1e-4, atol=1e-4)
    pool.eval()                                       # inference: torchvision's roi_align itself
    assert torch.equal(pool(features, boxes, image_shapes), expected)


def test_seeded_sampler_depends_on_its_seeds_only():
    matched = [torch.tensor([1, 0, 0, 2, 0, 0, 0, -1, 0, 1, 0, 0] * 10)]
    sampler = SeededSampler(batch_size_per_image=16, positive_fraction=0.25)

    def picks(seed):
        sampler.generators = [torch.Generator().manual_seed(seed)]
        pos, neg = sampler(matched)
        return pos[0].nonzero().flatten().tolist(), neg[0].nonzero().flatten().tolist()

    torch.manual_seed(0)
    first = picks(5)
    torch.manual_seed(1)   # the global RNG plays no part
    assert picks(5) == first
    assert picks(6) != first
    positives, negatives = first
    assert len(positives) == 4 and len(negatives) == 12
    assert all(matched[0][i] >= 1 for i in positives) and all(matched[0][i] == 0 for i in negatives)


def test_final_model_loads_with_identity_and_same_outputs(tmp_path, one_torch_thread):
    config = DetectorConfig.preset("small", **TINY)
    torch.manual_seed(0)
    model = build_detector(config).eval()
    save_final_model(tmp_path, model, config, step=7)
    assert not list(tmp_path.glob("*.tmp"))
    loaded, loaded_config, identity = load_detector(tmp_path)
    assert loaded_config == config and not loaded.training
    assert identity == {"checkpoint": MODEL_NAME, "step": 7,
                        "sha256": hashlib.sha256((tmp_path / MODEL_NAME).read_bytes()).hexdigest()}
    images, _ = tiny_batch(1)
    (expected, expected_scores), = predict_boxes(model, images)
    (boxes, scores), = predict_boxes(loaded, images)
    assert torch.equal(boxes, expected) and torch.equal(scores, expected_scores)
    empty_run = tmp_path / "empty-run"
    empty_run.mkdir()
    with pytest.raises(VildError, match="empty-run: no model.pt in this folder"):
        load_detector(empty_run)


def test_an_unfinished_run_folder_is_refused_and_its_last_checkpoint_used_only_when_named(tmp_path, one_torch_thread):
    """A folder's last.pt is a half-trained detector: using it must be a choice, made by naming the file."""
    config = DetectorConfig.preset("small", **TINY)
    run_dir = tmp_path / "rpn-int"
    run_dir.mkdir()
    data = {"annotations_sha256": "a" * 64}
    save_checkpoint(run_dir / CHECKPOINT_NAME, {"step": 62, "model": build_detector(config).state_dict(),
                                                "config": {"detector": config.to_dict(), "iterations": 300,
                                                           "data": data}})
    with pytest.raises(VildError) as refused:
        load_detector(run_dir)
    assert str(refused.value) == (
        f"{run_dir}: train-rpn has not finished (step 62 of 300; model.pt is written at its end); rerun train-rpn"
        f" to finish it, or pass {run_dir / CHECKPOINT_NAME} to use its last checkpoint as it is")
    assert detector_training_data(run_dir) == {}
    _, loaded_config, identity = load_detector(run_dir / CHECKPOINT_NAME)
    assert loaded_config == config and identity["checkpoint"] == CHECKPOINT_NAME and identity["step"] == 62
    assert detector_training_data(run_dir / CHECKPOINT_NAME) == data


def test_a_train_head_run_folder_or_head_given_as_the_detector_says_so(tmp_path):
    run_dir = tmp_path / "head-text"
    run_dir.mkdir()
    head_config = {"in_channels": 16, "embed_dim": 32}
    trained_on = {"checkpoint": "model.pt", "sha256": "0" * 64, "step": 8}   # heads name their detector
    save_checkpoint(run_dir / CHECKPOINT_NAME, {"step": 4, "model": {}, "config": {"losses": "text",
                                                                                   "head": head_config}})
    with pytest.raises(VildError) as unfinished:
        load_detector(run_dir)
    assert str(unfinished.value) == (f"{run_dir}: a train-head run folder, not a train-rpn one; give a train-rpn run"
                                     " folder or its model.pt")
    save_checkpoint(run_dir / "head.pt", {"kind": "vild-pipe head", "head_config": head_config, "model": {},
                                          "detector": trained_on, "config": {"losses": "text", "head": head_config}})
    with pytest.raises(VildError, match="head-text: a train-head run folder, not a train-rpn one"):
        load_detector(run_dir)
    for file in (run_dir / "head.pt", run_dir / CHECKPOINT_NAME):
        with pytest.raises(DataError) as named:
            load_detector(file)
        assert str(named.value) == (f"{file}: a train-head checkpoint, not a detector; give a train-rpn run folder"
                                    " or its model.pt")


def test_predicted_boxes_are_in_input_pixels_and_sorted(one_torch_thread):
    torch.manual_seed(0)
    model = build_detector(DetectorConfig.preset("small", **{**TINY, "min_size": 64, "max_size": 64})).eval()
    image = torch.rand(3, 120, 150)     # resized to 64 x 80 inside the model; boxes come back in 120 x 150
    for source in ("detections", "proposals"):
        (boxes, scores), = predict_boxes(model, [image], source)
        assert len(boxes) > 0
        assert torch.all(boxes[:, 2] <= 150) and torch.all(boxes[:, 3] <= 120) and torch.all(boxes >= 0)
        assert boxes[:, 2].max() > 80      # not left in the resized image's pixels
        assert torch.all(scores[:-1] >= scores[1:])
    model.roi_heads.detections_per_img = 5
    (boxes, _), = predict_boxes(model, [image])
    assert len(boxes) <= 5


# --------------------------------------------------------------------------- recall

SPLIT = CategorySplit(base_ids=(1, 2), novel_ids=(3,))


def test_best_overlaps_uses_the_best_box_per_ground_truth():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 8.0], [50.0, 50.0, 60.0, 60.0]])
    np.testing.assert_allclose(best_overlaps(boxes, gt), [0.8, 0.0])
    np.testing.assert_allclose(best_overlaps(torch.zeros(0, 4), gt), [0.0, 0.0])


def test_recall_separates_base_and_novel_and_counts_thresholds():
    accumulator = RecallAccumulator(SPLIT, top_k=2)
    gt = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70], [80, 80, 90, 90]], float)
    categories = np.array([1, 3, 2, 3, 4])          # base, novel, base (crowd), novel, outside the split
    crowd = np.array([False, False, True, False, False])
    boxes = torch.tensor([
        [0.0, 0.0, 10.0, 6.0],       # IoU 0.6 with the base box
        [20.0, 20.0, 30.0, 28.0],    # IoU 0.8 with the first novel box
        [60.0, 60.0, 70.0, 70.0],    # exact on the second novel box, but third: beyond top_k
    ])
    accumulator.add(boxes, gt, categories, crowd)
    summary = accumulator.summary()
    assert summary["top_k"] == 2 and summary["images"] == 1
    assert summary["base"]["objects"] == 1 and summary["novel"]["objects"] == 2 and summary["all"]["objects"] == 3
    assert summary["base"]["recall@0.5"] == 1.0
    assert summary["base"]["recall_by_iou"]["0.60"] == 1.0 and summary["base"]["recall_by_iou"]["0.65"] == 0.0
    assert summary["base"]["AR@0.5:0.95"] == pytest.approx(3 / 10)        # thresholds 0.50, 0.55, 0.60
    assert summary["novel"]["recall@0.5"] == 0.5
    assert summary["novel"]["AR@0.5:0.95"] == pytest.approx(7 / 10 / 2)  # 0.50..0.80 for one of two
    assert summary["all"]["recall@0.5"] == pytest.approx(2 / 3)
    assert len(IOU_THRESHOLDS) == 10 and IOU_THRESHOLDS[0] == 0.5 and IOU_THRESHOLDS[-1] == 0.95


def test_recall_with_no_objects_of_a_group_is_none():
    accumulator = RecallAccumulator(SPLIT)
    accumulator.add(torch.zeros(0, 4), np.array([[0, 0, 5, 5]], float), np.array([1]))
    summary = accumulator.summary()
    assert summary["base"]["recall@0.5"] == 0.0
    assert summary["novel"] == {"objects": 0, "recall@0.5": None, "AR@0.5:0.95": None, "recall_by_iou": None}


def test_the_size_an_image_is_resized_to_is_the_models_and_a_side_of_0_pixels_is_named_first():
    """An image more elongated than max_size : 1 is resized to a side of 0 pixels, and torch then fails deep in
    the model; the check names the image instead."""
    model = build_detector(DetectorConfig.preset("small", **TINY)).eval()
    for height, width in ((50, 90), (96, 97), (4, 300), (1, 95), (700, 8)):
        resized = model.transform.resize(torch.zeros(3, height, width), None)[0]
        assert resized_size(height, width, 96, 96) == tuple(resized.shape[-2:])
    check_fits_detector("fits.png", 1, 95, 96, 96)
    with pytest.raises(RuntimeError):
        model.transform.resize(torch.zeros(3, 2, 300), None)
    with pytest.raises(DataError) as raised:
        check_fits_detector("line.png", 2, 300, 96, 96)
    assert str(raised.value) == ("line.png: a 300x2 image is too elongated for the detector: resized to a shorter"
                                 " side of 96 and a longer side of at most 96 pixels, its shorter side is 0 pixels;"
                                 " crop it into parts, or pad it")
