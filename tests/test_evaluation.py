import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from vild_pipe.errors import DataError, VildError
from vild_pipe.pipeline import evaluation
from vild_pipe.pipeline.evaluation import (
    Detections, evaluate_coco, federated_ground_truth, load_ground_truth, metrics_table,
)
from vild_pipe.pipeline.scoring import (
    crop_probabilities, detections_from_scores, ensemble_probabilities, head_probabilities, nms_per_class,
)

import cocoeval_reference
from child_processes import child_env

# id: (name, split, LVIS frequency). "yak" has no ground truth; "kite" is outside the split.
CATEGORIES = {1: ("cat", "base", "f"), 2: ("dog", "base", "c"), 3: ("zebra", "novel", "r"),
              4: ("yak", "novel", "r"), 5: ("kite", None, "f")}
BASE_IDS, NOVEL_IDS = [1, 2], [3, 4]
# image id -> [(category id, [x, y, w, h])]
GROUND_TRUTH = {
    1: [(1, [10, 10, 40, 30]), (2, [60, 50, 30, 40]), (3, [5, 60, 25, 25])],
    2: [(1, [20, 20, 50, 50]), (1, [100, 100, 40, 60]), (5, [0, 0, 30, 30])],
    3: [(2, [30, 40, 60, 60]), (3, [120, 10, 50, 40])],
}


def gt_dataset(with_area: bool = True) -> dict:
    annotations = []
    for image_id, objects in GROUND_TRUTH.items():
        for category_id, bbox in objects:
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category_id, "bbox": bbox}
            if with_area:
                ann.update(area=bbox[2] * bbox[3], iscrowd=0)
            annotations.append(ann)
    return {
        "images": [{"id": i, "file_name": f"{i}.png", "width": 192, "height": 192} for i in GROUND_TRUTH],
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "split": split, "frequency": freq}
                       for cid, (name, split, freq) in CATEGORIES.items()],
    }


@pytest.fixture
def gt_file(tmp_path):
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt_dataset()))
    return path


def perfect_results(category_ids) -> list[dict]:
    return [{"image_id": image_id, "category_id": cid, "bbox": bbox, "score": 0.9}
            for image_id, objects in GROUND_TRUTH.items() for cid, bbox in objects if cid in category_ids]


def noisy_results(seed: int = 0) -> list[dict]:
    """Jittered true boxes with random scores, some wrong labels, and random false positives."""
    rng = np.random.default_rng(seed)
    results = []
    for image_id, objects in GROUND_TRUTH.items():
        for cid, bbox in objects:
            for _ in range(3):
                jitter = rng.normal(0, 4, 4) * [1, 1, 0.5, 0.5]
                label = cid if rng.random() < 0.8 else int(rng.integers(1, 6))
                results.append({"image_id": image_id, "category_id": label,
                                "bbox": np.maximum(np.array(bbox, float) + jitter, 1).round(2).tolist(),
                                "score": float(rng.random())})
        for _ in range(6):
            x, y = rng.uniform(0, 150, 2)
            results.append({"image_id": image_id, "category_id": int(rng.integers(1, 6)),
                            "bbox": [round(x, 2), round(y, 2), 30.0, 30.0], "score": float(rng.random() * 0.5)})
    return results


# ------------------------------------------------------------------------------------------ scoring


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def test_crop_probabilities_softmax_of_cosines_over_all_categories():
    rng = np.random.default_rng(1)
    crops, texts = rng.normal(size=(6, 8)) * 3.0, rng.normal(size=(4, 8)) * 0.5  # not unit length
    probs = crop_probabilities(crops.astype(np.float16), torch.tensor(texts, dtype=torch.float32), temperature=0.1)
    expected = softmax(unit(crops.astype(np.float16).astype(np.float64)) @ unit(texts).T / 0.1)
    assert probs.shape == (6, 4)
    np.testing.assert_allclose(probs.numpy(), expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probs.sum(dim=1).numpy(), 1.0, rtol=1e-5)


def test_crop_probabilities_pick_the_nearest_text():
    texts = torch.eye(3, 5)
    crops = texts[[2, 0, 1]] + 0.05
    assert crop_probabilities(crops, texts).argmax(dim=1).tolist() == [2, 0, 1]


def test_head_probabilities_drop_the_background_column():
    rng = np.random.default_rng(2)
    regions, texts, background = rng.normal(size=(5, 8)), rng.normal(size=(3, 8)), rng.normal(size=8)
    probs = head_probabilities(regions, texts, background, temperature=0.2).numpy()
    classifier = unit(np.vstack([background, texts]))
    full = softmax(unit(regions) @ classifier.T / 0.2)
    np.testing.assert_allclose(probs, full[:, 1:], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probs.sum(axis=1) + full[:, 0], 1.0, rtol=1e-5)
    assert (probs.sum(axis=1) < 1.0).all()


def test_head_probabilities_are_low_for_a_region_on_the_background():
    texts, background = torch.eye(3, 6), torch.eye(6)[5]
    regions = torch.stack([background, texts[1]])
    probs = head_probabilities(regions, texts, background)
    assert probs[0].max() < 1e-6
    assert probs[1, 1] > 0.99


def test_ensemble_follows_the_geometric_formula():
    head = torch.tensor([[0.6, 0.2, 0.1], [0.05, 0.5, 0.4]])
    crop = torch.tensor([[0.3, 0.3, 0.4], [0.2, 0.2, 0.6]])
    is_novel = [False, True, True]
    scores = ensemble_probabilities(head, crop, is_novel).numpy()
    expected = np.empty((2, 3))
    for k, novel in enumerate(is_novel):
        weight = 1 / 3 if novel else 2 / 3
        expected[:, k] = head[:, k].numpy() ** weight * crop[:, k].numpy() ** (1 - weight)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert scores[0, 0] == pytest.approx(0.6 ** (2 / 3) * 0.3 ** (1 / 3), rel=1e-6)
    assert scores[1, 2] == pytest.approx(0.4 ** (1 / 3) * 0.6 ** (2 / 3), rel=1e-6)
    custom = ensemble_probabilities(head, crop, np.array(is_novel), base_text_weight=1.0, novel_text_weight=0.0)
    np.testing.assert_allclose(custom.numpy(), [[0.6, 0.3, 0.4], [0.05, 0.2, 0.6]], rtol=1e-6)


def test_ensemble_rejects_bad_weights_and_shapes():
    probs = torch.full((2, 3), 1 / 3)
    with pytest.raises(ValueError, match="base_text_weight"):
        ensemble_probabilities(probs, probs, [False] * 3, base_text_weight=1.5)
    with pytest.raises(ValueError, match="is_novel"):
        ensemble_probabilities(probs, probs, [False] * 2)
    with pytest.raises(ValueError, match="differ"):
        ensemble_probabilities(probs, probs[:1], [False] * 3)


# ------------------------------------------------------------------------------------------ detections


def test_nms_is_per_class():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60]], dtype=torch.float32)
    probs = torch.tensor([[0.9, 0.0], [0.0, 0.8], [0.0, 0.0]])
    kept_boxes, scores, classes = detections_from_scores(boxes, probs)
    assert classes.tolist() == [0, 1]  # overlapping boxes of different classes both survive
    assert scores.tolist() == pytest.approx([0.9, 0.8])
    assert kept_boxes.tolist() == boxes[:2].tolist()

    same_class = torch.tensor([[0.9, 0.0], [0.8, 0.0], [0.7, 0.0]])
    _, scores, classes = detections_from_scores(boxes, same_class)
    assert scores.tolist() == pytest.approx([0.9, 0.7])  # box 1 (IoU 0.82 with box 0) suppressed
    assert classes.tolist() == [0, 0]


def test_detections_cap_threshold_and_empty_input():
    rng = np.random.default_rng(3)
    corners = rng.uniform(0, 500, (40, 2))
    boxes = np.hstack([corners, corners + rng.uniform(5, 40, (40, 2))])
    probs = rng.uniform(0.01, 1.0, (40, 5))
    _, scores, _ = detections_from_scores(boxes, probs, max_detections=7)
    assert len(scores) == 7
    assert (np.diff(scores.numpy()) <= 0).all()
    _, scores, _ = detections_from_scores(boxes, probs, score_threshold=0.5)
    assert len(scores) > 0 and scores.min() > 0.5
    kept_boxes, scores, classes = detections_from_scores(np.zeros((0, 4)), np.zeros((0, 5)))
    assert kept_boxes.shape == (0, 4) and len(scores) == 0 and len(classes) == 0
    _, scores, _ = detections_from_scores(boxes, np.zeros((40, 5)))
    assert len(scores) == 0  # zero scores are not above the default threshold 0


def test_top_k_nms_equals_nms_over_every_candidate():
    rng = np.random.default_rng(4)
    corners = rng.uniform(0, 200, (300, 2))
    boxes = torch.tensor(np.hstack([corners, corners + rng.uniform(10, 80, (300, 2))]), dtype=torch.float32)
    probs = torch.softmax(torch.tensor(rng.normal(size=(300, 12)) * 3, dtype=torch.float32), dim=1)
    for max_detections in (5, 100, 3000):
        kept_boxes, scores, classes = detections_from_scores(boxes, probs, max_detections=max_detections)
        box_index, class_index = torch.meshgrid(torch.arange(300), torch.arange(12), indexing="ij")
        keep = batched_nms(boxes[box_index.reshape(-1)], probs.reshape(-1), class_index.reshape(-1), 0.5)
        keep = keep[:max_detections]
        assert scores.tolist() == probs.reshape(-1)[keep].tolist()
        assert classes.tolist() == class_index.reshape(-1)[keep].tolist()
        assert kept_boxes.tolist() == boxes[box_index.reshape(-1)[keep]].tolist()


def test_one_nms_call_equals_torchvisions_loop_over_classes_on_an_lvis_sized_vocabulary():
    """1203 classes, boxes up to 1333 px, scores tied within and across classes: the shifted single call keeps
    what batched_nms's per-class loop (its CPU path above 1000 boxes) keeps, in the same order."""
    rng = np.random.default_rng(5)
    corners = rng.uniform(-5, 1200, (3000, 2))
    boxes = torch.tensor(np.hstack([corners, corners + rng.uniform(1, 300, (3000, 2))]), dtype=torch.float32)
    scores = torch.tensor(rng.choice(np.linspace(0.01, 1, 50), 3000), dtype=torch.float32)
    classes = torch.tensor(rng.integers(0, 1203, 3000))
    classes[:600] = torch.tensor(rng.integers(0, 3, 600))  # some classes with many overlapping boxes
    expected = batched_nms(boxes, scores, classes, 0.5)
    kept = nms_per_class(boxes, scores, classes, 0.5)
    assert len(expected) < 3000
    assert sorted(kept.tolist()) == sorted(expected.tolist())
    assert scores[kept].tolist() == scores[expected].tolist()
    assert len(nms_per_class(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5)) == 0


def test_detections_give_coco_results_records_and_their_json_in_pieces():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 5.5, 4.25]])
    found = Detections.of_images([(7, boxes, torch.tensor([0.75, 0.5]), torch.tensor([2, 0])),
                                  (8, np.array([[1.004, 2, 3.5, 4]]), np.array([0.25]), np.array([1]))],
                                 category_ids=[11, 12, 13])
    records = found.records()
    assert records == [
        {"image_id": 7, "category_id": 13, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.75},
        {"image_id": 7, "category_id": 11, "bbox": [0.0, 0.0, 5.5, 4.25], "score": 0.5},
        {"image_id": 8, "category_id": 12, "bbox": [1.0, 2.0, 2.5, 2.0], "score": 0.25},   # 1/100 px
    ]
    assert found.records(np.array([2, 0])) == [records[2], records[0]]
    for per_chunk in (1, 2, 3, 100):
        assert b"".join(found.json_chunks(per_chunk)) == json.dumps(records).encode()
    assert Detections.of_records(records).records() == records
    for empty in (Detections.of_images([], [1]), Detections.of_images([(1, np.zeros((0, 4)), np.zeros(0),
                                                                       np.zeros(0, dtype=int))], [1])):
        assert len(empty) == 0 and empty.records() == [] and b"".join(empty.json_chunks()) == b"[]"


# ------------------------------------------------------------------------------------------ metrics


def test_perfect_base_detections_and_a_missed_novel_class(gt_file, capsys):
    metrics = evaluate_coco(gt_file, perfect_results({1, 2}), BASE_IDS, NOVEL_IDS)
    assert capsys.readouterr().out == ""  # pycocotools kept quiet
    assert metrics["AP50_base"] == pytest.approx(1.0)
    assert metrics["AP_base"] == pytest.approx(1.0)
    assert metrics["AP50_novel"] == 0.0  # zebra has ground truth and no detection; yak has none: left out
    assert metrics["AP50"] == pytest.approx(2 / 3)  # cat, dog, zebra; kite is outside the split
    by_name = {row["name"]: row for row in metrics["per_category"]}
    assert set(by_name) == {"cat", "dog", "zebra", "yak"}
    assert by_name["yak"]["AP"] is None and by_name["yak"]["num_gt"] == 0
    assert by_name["cat"]["num_gt"] == 3 and by_name["cat"]["split"] == "base"
    assert (metrics["AP_f"], metrics["AP_c"], metrics["AP_r"]) == (pytest.approx(1.0), pytest.approx(1.0), 0.0)
    assert metrics["num_categories"] == 4 and metrics["num_categories_with_gt"] == 3
    assert metrics["num_detections"] == 5 and metrics["num_images"] == 3
    json.dumps(metrics)


def test_no_detections_at_all(gt_file):
    metrics = evaluate_coco(gt_file, [], BASE_IDS, NOVEL_IDS, frequencies={})
    assert metrics["AP"] == 0.0 and metrics["AP50_base"] == 0.0 and metrics["AP50_novel"] == 0.0
    assert metrics["num_detections"] == 0
    assert "AP_r" not in metrics


def test_without_a_split_every_category_counts(gt_file):
    metrics = evaluate_coco(gt_file, perfect_results({1, 2, 3, 5}), frequencies={})
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["num_categories"] == 5 and "AP50_novel" not in metrics


def test_numbers_equal_a_fresh_cocoeval_on_the_results_file(gt_file, tmp_path):
    results = noisy_results()
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))
    metrics = evaluate_coco(gt_file, json.loads(results_file.read_text()), BASE_IDS, NOVEL_IDS)

    def fresh_stats(category_ids):
        return cocoeval_reference.fresh_stats(gt_file, results_file, category_ids)

    everything = fresh_stats(BASE_IDS + NOVEL_IDS)
    assert 0.05 < metrics["AP50"] < 0.95  # a real, non-trivial case
    assert metrics["AP"] == pytest.approx(everything[0], rel=1e-12)
    assert metrics["AP50"] == pytest.approx(everything[1], rel=1e-12)
    assert metrics["AP75"] == pytest.approx(everything[2], rel=1e-12)
    base, novel = fresh_stats(BASE_IDS), fresh_stats(NOVEL_IDS)
    assert metrics["AP50_base"] == pytest.approx(base[1], rel=1e-12)
    assert metrics["AP_base"] == pytest.approx(base[0], rel=1e-12)
    assert metrics["AP50_novel"] == pytest.approx(novel[1], rel=1e-12)
    assert metrics["AP_r"] == pytest.approx(fresh_stats([3, 4])[0], rel=1e-12)
    assert metrics["AP_f"] == pytest.approx(fresh_stats([1])[0], rel=1e-12)
    assert metrics["AP_c"] == pytest.approx(fresh_stats([2])[0], rel=1e-12)


def test_ground_truth_without_area_or_iscrowd():
    dataset = gt_dataset(with_area=False)
    gt = load_ground_truth(dataset)
    assert all(ann["area"] > 0 and ann["iscrowd"] == 0 for ann in gt.dataset["annotations"])
    assert "area" not in dataset["annotations"][0]  # the caller's dict is untouched
    metrics = evaluate_coco(dataset, perfect_results({1, 2, 3}), BASE_IDS, NOVEL_IDS)
    assert metrics["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_cocoeval_a_few_categories_at_a_time_gives_every_metric_of_one_run(gt_file, seed):
    """LVIS-sized runs go 100 categories at a time (COCOeval's all-pairs records would not fit in memory)."""
    results = noisy_results(seed)
    whole = evaluate_coco(gt_file, results, BASE_IDS, NOVEL_IDS, categories_per_run=1000)
    for per_run in (1, 2, 3):
        assert evaluate_coco(gt_file, results, BASE_IDS, NOVEL_IDS, categories_per_run=per_run) == whole
    assert whole["AP50_novel"] > 0 and whole["AP_r"] is not None and whole["num_detections"] > 0


@pytest.mark.parametrize("protocol", ["coco", "lvis"])
def test_cocoeval_runs_in_worker_processes_give_every_metric_of_one_run_here(protocol, monkeypatch):
    """Each worker gets only its categories' boxes (with LVIS' ignore boxes: the last detection falls on one),
    one category a run here."""
    dataset = lvis_dataset() if protocol == "lvis" else gt_dataset()
    results = noisy_results(0) + [{"image_id": 1, "category_id": 3, "bbox": [150, 150, 30, 30], "score": 1.0}]
    here = evaluate_coco(dataset, results, BASE_IDS, NOVEL_IDS, protocol=protocol, categories_per_run=1000)
    handed = []
    ground_truth_of = evaluation._ground_truth_of
    monkeypatch.setattr(evaluation, "_ground_truth_of",
                        lambda gt, ids: handed.append(ids) or ground_truth_of(gt, ids))
    assert evaluate_coco(dataset, results, BASE_IDS, NOVEL_IDS, protocol=protocol, workers=2) == here
    assert handed == [[c] for c in sorted(BASE_IDS + NOVEL_IDS)]
    assert here["AP50_novel"] > 0 and here["num_detections"] > 0


def test_workers_follow_the_size_the_cpus_and_the_memory(monkeypatch):
    monkeypatch.setattr(evaluation.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(evaluation, "_available_memory", lambda: 64 * 2**30)
    assert [evaluation.workers_for(*size) for size in ((150, 15), (5000, 65), (19809, 1203))] == [1, 6, 8]
    monkeypatch.setattr(evaluation, "_available_memory", lambda: 8 * 2**30)   # LVIS val: 2.4 GB a run of 100
    assert evaluation.workers_for(19809, 1203) == 1 and evaluation.workers_for(5000, 65) == 6
    assert evaluation.workers_for(150, 15, requested=3) == 3


def test_the_metrics_module_imports_no_torch():
    """COCOeval's worker processes import it: with torch each would take seconds and 0.65 GB to start."""
    check = "import sys, vild_pipe.pipeline.evaluation; print(sorted({'torch', 'torchvision'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=child_env(), timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_evaluation_does_not_change_the_results_records(gt_file):
    results = perfect_results({1})
    before = json.dumps(results)
    evaluate_coco(gt_file, results, BASE_IDS, NOVEL_IDS)
    assert json.dumps(results) == before


def lvis_dataset() -> dict:
    """The ground truth with LVIS' per-image lists: checked-absent categories and not exhaustively drawn ones."""
    dataset = gt_dataset()
    lists = {1: ([4], [3]), 2: ([2], []), 3: ([], [])}   # image: (neg_category_ids, not_exhaustive_category_ids)
    for image in dataset["images"]:
        image["neg_category_ids"], image["not_exhaustive_category_ids"] = lists[image["id"]]
    return dataset


def category_ap(metrics, category_id):
    return next(row["AP"] for row in metrics["per_category"] if row["id"] == category_id)


def test_lvis_files_are_evaluated_federated_as_lvis_api_does():
    """Image 2 has boxes of cats 1 and 5 and lists cat 2 as absent: cat 3 was never checked there. Image 1 lists
    cat 3 (zebra) as not exhaustively drawn."""
    dataset = lvis_dataset()
    perfect = perfect_results({1, 2, 3, 5})
    wrong = {"unchecked": {"image_id": 2, "category_id": 3, "bbox": [150, 150, 30, 30], "score": 1.0},
             "checked absent": {"image_id": 2, "category_id": 2, "bbox": [150, 150, 30, 30], "score": 1.0},
             "not exhaustive": {"image_id": 1, "category_id": 3, "bbox": [150, 150, 30, 30], "score": 1.0},
             "zero area": {"image_id": 2, "category_id": 1, "bbox": [150, 150, 0, 30], "score": 1.0}}
    lvis = {name: evaluate_coco(dataset, perfect + [record]) for name, record in wrong.items()}
    coco = {name: evaluate_coco(dataset, perfect + [record], protocol="coco") for name, record in wrong.items()}
    assert all(metrics["protocol"] == "lvis" and metrics["max_dets"] == 300 for metrics in lvis.values())
    assert category_ap(lvis["unchecked"], 3) == pytest.approx(1.0)        # neither right nor wrong
    assert category_ap(lvis["not exhaustive"], 3) == pytest.approx(1.0)   # an unmatched one is ignored
    assert category_ap(lvis["checked absent"], 2) < 0.99                  # a false positive
    assert category_ap(lvis["zero area"], 1) == pytest.approx(1.0)        # lvis-api leaves it out
    assert lvis["unchecked"]["num_detections"] == len(perfect)
    assert category_ap(coco["unchecked"], 3) < 0.99 and category_ap(coco["not exhaustive"], 3) < 0.99
    assert category_ap(coco["zero area"], 1) < 0.99
    assert evaluate_coco(gt_dataset(), perfect)["protocol"] == "coco"


def test_ground_truth_prepared_once_for_the_federated_protocol_gives_every_result_sets_metrics():
    """evaluate prepares an LVIS file's federated ground truth once for all its modes."""
    dataset = lvis_dataset()
    prepared = federated_ground_truth(load_ground_truth(dataset))
    perfect = perfect_results({1, 2, 3, 5})
    for extra in ([], [{"image_id": 2, "category_id": 2, "bbox": [150, 150, 30, 30], "score": 1.0}],
                  [{"image_id": 1, "category_id": 3, "bbox": [150, 150, 30, 30], "score": 1.0}]):
        assert evaluate_coco(prepared, perfect + extra, [1, 2, 3], [5]) == evaluate_coco(dataset, perfect + extra,
                                                                                         [1, 2, 3], [5])
    assert evaluate_coco(prepared, perfect[:2], max_dets=1)["max_dets"] == 1
    with pytest.raises(VildError, match="prepared for LVIS' federated protocol cannot be evaluated as 'coco'"):
        evaluate_coco(prepared, perfect, protocol="coco")


def test_lvis_keeps_the_300_best_detections_of_an_image_over_all_categories_before_anything_else():
    """LVISResults cuts an image's detections before the federated filter: 300 of an unchecked category
    scoring above the only detection of cat 5 push it out."""
    dataset = lvis_dataset()
    fillers = [{"image_id": 2, "category_id": 3, "bbox": [150, 150, 30, 30], "score": 0.5}] * 300
    results = perfect_results({1, 2, 3}) + [{"image_id": 2, "category_id": 5, "bbox": [0, 0, 30, 30], "score": 0.1}]
    assert category_ap(evaluate_coco(dataset, results + fillers), 5) == 0.0
    on_image = sum(record["image_id"] == 2 for record in results + fillers)             # 2 + 1 + 300
    assert category_ap(evaluate_coco(dataset, results + fillers, max_dets=on_image - 1), 5) == 0.0
    assert category_ap(evaluate_coco(dataset, results + fillers, max_dets=on_image), 5) == pytest.approx(1.0)
    with pytest.raises(VildError, match="protocol"):
        evaluate_coco(dataset, results, protocol="pascal")
    with pytest.raises(DataError, match="neg_category_ids"):
        evaluate_coco(gt_dataset(), results, protocol="lvis")


def test_bad_inputs_are_one_line_errors(gt_file, tmp_path):
    with pytest.raises(DataError, match="image ids absent"):
        evaluate_coco(gt_file, [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}])
    with pytest.raises(DataError, match=r"split category ids \[42\]"):
        evaluate_coco(gt_file, [], base_ids=[1, 42])
    missing = tmp_path / "missing.json"
    with pytest.raises(DataError, match="missing.json"):
        evaluate_coco(missing, [])


def test_metrics_table():
    table = metrics_table({
        "ViLD": {"AP50_novel": 0.276, "AP50_base": 0.595, "AP50": 0.513, "AP": 0.3},
        "CLIP-on-crops": {"AP50_novel": None, "AP50_base": 0.1, "AP50": 0.05, "AP": 0.02},
    })
    lines = table.strip().splitlines()
    assert lines[0] == "| mode | novel AP50 | base AP50 | AP50 | AP |"
    assert lines[2] == "| ViLD | 27.6 | 59.5 | 51.3 | 30.0 |"
    assert lines[3] == "| CLIP-on-crops | – | 10.0 | 5.0 | 2.0 |"
    assert len(lines) == 4
    only = metrics_table({"ViLD": {"AP_r": 0.161, "AP": 0.225}}, metrics=["AP_r", "AP"])
    assert only.splitlines()[2] == "| ViLD | 16.1 | 22.5 |"
