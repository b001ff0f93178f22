"""evaluate: every mode scored on hand-made val caches; the printed AP equals a fresh COCOeval on the results
file the stage wrote; a perfect teacher scores AP50 1; modes without inputs are skipped; mismatched inputs
are refused in one line.

The caches are written by hand: per object of the annotation file two proposals a pixel or two off its box,
plus background boxes away from every object. The "exact" embedding cache holds, for a box on an object,
the text embedding of the object's class (and for a background box a vector orthogonal to every text, so
it scores 1/K everywhere); the "noisy" one the same directions plus noise, for non-trivial AP.
"""
import json
import logging
import shutil

import h5py
import numpy as np
import pytest
import torch

from vild_pipe.data.coco import CocoDataset
from vild_pipe.data.splits import CategorySplit
from vild_pipe.errors import DataError, VildError
from vild_pipe.pipeline.embedding_cache import embedding_fields
from vild_pipe.pipeline.evaluation import evaluate_coco
from vild_pipe.pipeline.head import HeadConfig, ViLDHead, load_head, save_head
from vild_pipe.pipeline.scoring import (
    crop_probabilities, detections_from_scores, ensemble_probabilities, head_probabilities,
)
from vild_pipe.pipeline.shards import CacheFolder, ShardWriter, sha256_file
from vild_pipe.pipeline.teacher import SmallClipConfig, save_clip
from vild_pipe.pipeline.text_embeddings import TextEmbeddings, embed_text
from vild_pipe.stages import evaluate
from vild_pipe.stages.dump_proposals import proposal_fields

from cocoeval_reference import fresh_stats

TINY_CLIP = SmallClipConfig(embed_dim=32, image_resolution=32, vision_layers=(1, 1, 1, 1), vision_width=8,
                            transformer_width=64, transformer_layers=1)
DIM, CHANNELS, IMAGES, PER_SHARD = 32, 4, 10, 4
CATEGORIES = [{"id": 1, "name": "circle", "split": "base"}, {"id": 2, "name": "square", "split": "base"},
              {"id": 3, "name": "star", "split": "base"}, {"id": 5, "name": "crescent moon", "split": "novel"},
              {"id": 7, "name": "heart", "split": "novel"}]
BASE_IDS, NOVEL_IDS = [1, 2, 3], [5, 7]
ALL_HEADS = ("ViLD-text", "ViLD-image", "ViLD")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def orthogonal_to(texts: np.ndarray, rng) -> np.ndarray:
    vector = rng.standard_normal(texts.shape[1])
    basis, _ = np.linalg.qr(texts.T)
    vector -= basis @ (basis.T @ vector)
    return vector / np.linalg.norm(vector)


def write_caches(folder, clip_file, texts: np.ndarray, seed=0, lvis=False):
    """val.json, a proposal cache over it, and its "exact" and "noisy" embedding caches. With `lvis`, val.json's
    images carry LVIS' lists of the categories checked absent and not exhaustively drawn."""
    rng = np.random.default_rng(seed)
    images, annotations, per_image = [], [], []
    for image_id in range(1, IMAGES + 1):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 120, "height": 120})
        if lvis:
            images[-1].update(neg_category_ids=[CATEGORIES[image_id % len(CATEGORIES)]["id"]],
                              not_exhaustive_category_ids=[CATEGORIES[image_id % 3]["id"]])
        classes = rng.integers(0, len(CATEGORIES), 2)
        corners = np.array([[5.0, 5.0], [60.0, 60.0]]) + rng.uniform(0, 10, (2, 2))
        boxes = np.concatenate([corners, corners + rng.uniform(22, 40, (2, 2))], axis=1)
        for box, label in zip(boxes, classes):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": CATEGORIES[label]["id"], "iscrowd": 0,
                                "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                                "area": float((box[2] - box[0]) * (box[3] - box[1]))})
        proposals = np.concatenate([boxes, boxes]) + rng.uniform(-1.5, 1.5, (4, 4))
        background = np.array([[70.0, 5.0, 110.0, 40.0], [5.0, 75.0, 40.0, 115.0]])
        row_classes = np.concatenate([classes, classes, [-1, -1]])
        per_image.append((image_id, np.concatenate([proposals, background]).astype(np.float32), row_classes))
    annotation_file = folder / "val.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))

    shards = -(-IMAGES // PER_SHARD)
    proposals = CacheFolder.open_or_create(
        folder / "proposals", stage="dump-proposals",
        config={"top_n": 6, "add_gt": False, "split": None, "nms_threshold": 0.7},
        inputs={"annotations": {"file": "val.json", "sha256": sha256_file(annotation_file)},
                "detector": {"checkpoint": "model.pt", "sha256": "d" * 64, "step": 1}},
        fields=proposal_fields((CHANNELS, 7, 7)), num_shards=shards, images_per_shard=PER_SHARD)
    clip = {"model": clip_file.name, "sha256": sha256_file(clip_file), "embed_dim": DIM, "input_resolution": 32}
    background_direction = orthogonal_to(texts, rng)
    caches = {}
    for kind in ("exact", "noisy"):
        caches[kind] = CacheFolder.open_or_create(
            folder / f"embeddings-{kind}", stage="cache-embeddings", config={"kind": kind},
            inputs={"clip": clip, "proposals": {"fingerprint": proposals.fingerprint}},
            fields=embedding_fields(DIM), num_shards=shards, images_per_shard=PER_SHARD)
    for shard in range(shards):
        with ShardWriter(proposals, shard) as pw, ShardWriter(caches["exact"], shard) as ew, \
                ShardWriter(caches["noisy"], shard) as nw:
            for image_id, boxes, row_classes in per_image[shard * PER_SHARD:(shard + 1) * PER_SHARD]:
                rows = len(boxes)
                pw.add_image(image_id, boxes=boxes, scores=np.linspace(1, 0.2, rows, dtype=np.float32),
                             is_gt=np.zeros(rows, bool),
                             features=rng.standard_normal((rows, CHANNELS, 7, 7)).astype(np.float16))
                exact = np.where(row_classes[:, None] >= 0, texts[row_classes], background_direction)
                noisy = exact + 0.25 * rng.standard_normal(exact.shape)
                noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
                for writer, emb in ((ew, exact), (nw, noisy)):
                    emb = emb.astype(np.float16)
                    writer.add_image(image_id, emb_1x=emb, emb_15x=emb, emb=emb)
    for cache in (proposals, *caches.values()):
        cache.finalize()
    return clip


def write_head(path, clip, losses, in_channels=CHANNELS, embed_dim=DIM, seed=0, trained_on=None, detector=None,
               proposal_nms=0.7):
    torch.manual_seed(seed)
    head = ViLDHead(HeadConfig(in_channels, representation_size=16, embed_dim=embed_dim))
    save_head(path, head, {"losses": losses, "clip": clip, "embed_dim": embed_dim, "step": 0,
                           "proposals": trained_on, "detector": detector, "embeddings": None,
                           "proposal_nms": proposal_nms,
                           "base_names": ["circle", "square", "star"], "temperature": 0.01, "config": {}})
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("val")
    torch.manual_seed(0)
    clip_file = folder / "tiny-clip.pt"
    save_clip(TINY_CLIP.build(), clip_file)
    texts = embed_text(str(clip_file), [c["name"] for c in CATEGORIES], out=folder / "text.pt")
    clip = write_caches(folder, clip_file, texts.embeddings.numpy())
    heads = {mode: write_head(folder / f"head-{mode}.pt", clip, losses, seed=k)
             for k, (mode, losses) in enumerate(evaluate.HEAD_MODES.items())}
    return {"folder": folder, "clip_file": clip_file, "clip": clip, "heads": heads, "texts": texts.embeddings.numpy()}


def settings(world, out, embeddings="noisy", **overrides):
    folder = world["folder"]
    return {"proposals": folder / "proposals", "annotations": folder / "val.json", "out": out, "device": "cpu",
            "embeddings": folder / f"embeddings-{embeddings}" if embeddings else None,
            "clip": str(world["clip_file"]), "heads": dict(world["heads"]), **overrides}


@pytest.fixture(scope="module")
def every_mode(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("every-mode")
    return out, evaluate.run(**settings(world, out))


def test_the_printed_numbers_equal_a_fresh_cocoeval_on_each_results_file(world, every_mode):
    out, metrics = every_mode
    assert list(metrics) == list(evaluate.MODES)
    annotation_file = world["folder"] / "val.json"
    for mode, numbers in metrics.items():
        results_file = out / f"results-{mode}.json"
        records = json.loads(results_file.read_text())
        per_image = np.bincount([r["image_id"] for r in records])
        assert per_image.max() <= 300 and {r["category_id"] for r in records} <= set(BASE_IDS + NOVEL_IDS)
        everything = fresh_stats(annotation_file, results_file, BASE_IDS + NOVEL_IDS)
        assert numbers["AP"] == pytest.approx(everything[0], rel=1e-12, abs=1e-15), mode
        assert numbers["AP50"] == pytest.approx(everything[1], rel=1e-12, abs=1e-15), mode
        assert numbers["AP75"] == pytest.approx(everything[2], rel=1e-12, abs=1e-15), mode
        base, novel = fresh_stats(annotation_file, results_file, BASE_IDS), fresh_stats(annotation_file, results_file,
                                                                                          NOVEL_IDS)
        assert numbers["AP50_base"] == pytest.approx(base[1], rel=1e-12, abs=1e-15), mode
        assert numbers["AP50_novel"] == pytest.approx(novel[1], rel=1e-12, abs=1e-15), mode
        assert numbers["AP_novel"] == pytest.approx(novel[0], rel=1e-12, abs=1e-15), mode
    assert 0.05 < metrics["CLIP-on-crops"]["AP50"] < 0.95  # a real, non-trivial case

    document = json.loads((out / "metrics.json").read_text())
    assert document["modes"] == json.loads(json.dumps(metrics))
    assert document["split"]["novel_ids"] == NOVEL_IDS
    assert document["settings"]["protocol"] == "coco" and {m["protocol"] for m in metrics.values()} == {"coco"}
    table = (out / "metrics.md").read_text()
    assert all(f"| {mode} |" in table for mode in evaluate.MODES)
    assert f"{100 * metrics['CLIP-on-crops']['AP50_novel']:.1f}" in table


def test_ensemble_is_the_vild_head_and_the_crops_combined_with_base_and_novel_weights(world, every_mode):
    """Image 1 scored by hand from the cached rows equals its detections in results-ViLD-ensemble.json."""
    out, _ = every_mode
    folder = world["folder"]
    proposals = CacheFolder.open(folder / "proposals")
    embeddings = CacheFolder.open(folder / "embeddings-noisy")
    with proposals.read_shard(0) as reader, embeddings.read_shard(0) as crops:
        rows, emb = reader.rows_for(1), crops.rows_for(1)["emb"]
    head, _ = load_head(world["heads"]["ViLD"])
    texts = torch.load(out / "text_all.pt", weights_only=True)["embeddings"]
    with torch.no_grad():
        head_probs = head_probabilities(head(torch.from_numpy(rows["features"])), texts, head.background_embedding())
    novel = np.array([c["split"] == "novel" for c in CATEGORIES])
    probs = ensemble_probabilities(head_probs, crop_probabilities(emb, texts), novel)
    assert not torch.allclose(probs, ensemble_probabilities(head_probs, crop_probabilities(emb, texts), ~novel))
    _, scores, classes = detections_from_scores(rows["boxes"], probs)
    records = [r for r in json.loads((out / "results-ViLD-ensemble.json").read_text()) if r["image_id"] == 1]
    assert [r["score"] for r in records] == pytest.approx(scores.tolist(), rel=1e-5)
    assert [r["category_id"] for r in records] == [CATEGORIES[k]["id"] for k in classes.tolist()]


def test_clip_on_crops_with_the_true_class_text_scores_ap50_one(world, tmp_path):
    metrics = evaluate.run(**settings(world, tmp_path, embeddings="exact", modes=["CLIP-on-crops"], clip=None,
                                      text=world["folder"] / "text.pt"))
    assert list(metrics) == ["CLIP-on-crops"]
    numbers = metrics["CLIP-on-crops"]
    assert numbers["AP50"] == 1.0 and numbers["AP50_base"] == 1.0 and numbers["AP50_novel"] == 1.0
    assert not (tmp_path / "text_all.pt").exists()  # the given text file is used as it is


def test_categories_outside_the_split_are_neither_classified_nor_evaluated(world, tmp_path):
    split = CategorySplit(base_ids=(1, 2), novel_ids=(7,), spec="three of five")
    metrics = evaluate.run(**settings(world, tmp_path, heads=None, split=split))["CLIP-on-crops"]
    records = json.loads((tmp_path / "results-CLIP-on-crops.json").read_text())
    assert {r["category_id"] for r in records} == {1, 2, 7}
    assert metrics["num_categories"] == 3 and [row["id"] for row in metrics["per_category"]] == [1, 2, 7]
    assert json.loads((tmp_path / "metrics.json").read_text())["split"]["base_ids"] == [1, 2]


def test_modes_whose_inputs_are_missing_are_skipped_with_one_line_each(world, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="vild_pipe.stages.evaluate")
    metrics = evaluate.run(**settings(world, tmp_path / "text-only", embeddings=None,
                                      heads={"ViLD-text": world["heads"]["ViLD-text"]}))
    assert list(metrics) == ["ViLD-text"]
    assert sorted(p.name for p in (tmp_path / "text-only").glob("results-*.json")) == ["results-ViLD-text.json"]
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 4
    assert "ViLD-ensemble: skipped (needs the embedding cache (--embeddings) and a ViLD head (--head-vild))" in skipped

    caplog.clear()
    metrics = evaluate.run(**settings(world, tmp_path / "text-only", heads=None, modes=["CLIP-on-crops"]))
    assert list(metrics) == ["CLIP-on-crops"] and "skipped" not in caplog.text
    assert (f"{tmp_path / 'text-only'} also holds results-ViLD-text.json of an earlier run: metrics.json and"
            " metrics.md cover this run's modes only") in caplog.text
    with pytest.raises(VildError, match=r"^--mode ViLD-ensemble needs a ViLD head \(--head-vild\)$"):
        evaluate.run(**settings(world, tmp_path / "named", heads=None, modes=["CLIP-on-crops", "ViLD-ensemble"]))
    assert not (tmp_path / "named").exists()

    with pytest.raises(VildError, match="nothing to evaluate: give the embedding cache"):
        evaluate.run(**settings(world, tmp_path / "nothing", embeddings=None, heads=None))
    with pytest.raises(VildError, match="unknown evaluation mode ViLD-txt"):
        evaluate.run(**settings(world, tmp_path / "typo", modes=["ViLD-txt"]))
    with pytest.raises(DataError, match=r"val\.json: --protocol lvis needs images that list neg_category_ids"):
        evaluate.run(**settings(world, tmp_path / "not-lvis", protocol="lvis"))
    assert not (tmp_path / "not-lvis").exists()


def test_an_lvis_file_is_evaluated_federated_with_its_ground_truth_prepared_once_for_every_mode(
        world, tmp_path, monkeypatch):
    """The stage prepares LVIS' federated ground truth once for all modes; each mode's numbers must equal those
    of the library evaluating the results file it wrote against the annotation file alone."""
    folder = tmp_path / "lvis"
    folder.mkdir()
    write_caches(folder, world["clip_file"], world["texts"], lvis=True)
    lvis_world = dict(world, folder=folder)
    prepared = []
    prepare = evaluate.federated_ground_truth
    monkeypatch.setattr(evaluate, "federated_ground_truth", lambda *args: prepared.append(1) or prepare(*args))
    metrics = evaluate.run(**settings(lvis_world, tmp_path / "out"))
    assert list(metrics) == list(evaluate.MODES) and len(prepared) == 1
    for mode, numbers in metrics.items():
        records = json.loads((tmp_path / "out" / f"results-{mode}.json").read_text())
        alone = evaluate_coco(folder / "val.json", records, BASE_IDS, NOVEL_IDS)
        assert numbers == alone and numbers["protocol"] == "lvis", mode
    coco = evaluate.run(**settings(lvis_world, tmp_path / "coco", modes=["CLIP-on-crops"], protocol="coco"))
    assert coco["CLIP-on-crops"]["protocol"] == "coco"
    assert coco["CLIP-on-crops"]["AP50"] != metrics["CLIP-on-crops"]["AP50"]   # the lists change what counts


def test_a_file_without_a_split_takes_the_heads_training_categories_as_base(world, tmp_path, caplog):
    """Users' own val files seldom say which categories are novel; the head knows which it was trained on."""
    dataset = json.loads((world["folder"] / "val.json").read_text())
    for category in dataset["categories"]:
        del category["split"]
    (tmp_path / "val.json").write_text(json.dumps(dataset))
    val = CocoDataset.load(tmp_path / "val.json")
    caplog.set_level(logging.INFO, logger="vild_pipe.stages.evaluate")
    split = evaluate._category_split(val, "auto", {"ViLD": world["heads"]["ViLD"]})
    assert (split.base_ids, split.novel_ids) == (tuple(BASE_IDS), tuple(NOVEL_IDS))
    assert "the 3 categories head" in caplog.text and "are base, the other 2 novel" in caplog.text
    with pytest.raises(DataError, match="cannot choose a category split automatically"):
        evaluate._category_split(val, "auto", {})
    assert evaluate._category_split(val, "novel:heart", {"ViLD": world["heads"]["ViLD"]}).novel_ids == (7,)
    dataset["categories"][2]["split"] = "unseen"   # a split the file gives wrongly is not replaced by the head's
    (tmp_path / "val.json").write_text(json.dumps(dataset))
    with pytest.raises(DataError, match="cannot choose a category split automatically"):
        evaluate._category_split(CocoDataset.load(tmp_path / "val.json"), "auto", {"ViLD": world["heads"]["ViLD"]})


def test_cocoeval_in_worker_processes_gives_the_same_numbers(world, every_mode, tmp_path, caplog):
    _, metrics = every_mode
    caplog.set_level(logging.INFO, logger="vild_pipe.stages.evaluate")
    again = evaluate.run(**settings(world, tmp_path, modes=["CLIP-on-crops", "ViLD"], workers=2))
    assert again == {mode: metrics[mode] for mode in ("CLIP-on-crops", "ViLD")}
    assert "COCOeval in 2 processes" in caplog.text
    with pytest.raises(VildError, match="^--workers must be at least 0, got -1$"):
        evaluate.run(**settings(world, tmp_path / "bad", workers=-1))


@pytest.mark.parametrize("option, message", [
    ({"max_detections": 0}, "--max-detections must be at least 1, got 0"),
    ({"nms_threshold": 0.0}, "--nms-threshold must be in (0, 1], got 0.0"),
    ({"novel_text_weight": 1.5}, "--novel-text-weight must be in [0, 1], got 1.5"),
])
def test_an_impossible_option_is_named_alone(world, tmp_path, option, message):
    with pytest.raises(VildError) as raised:
        evaluate.run(**settings(world, tmp_path / "bad", **option))
    assert str(raised.value) == message and not (tmp_path / "bad").exists()


def test_a_head_trained_on_another_detectors_features_is_refused_from_any_folder(world, tmp_path, monkeypatch):
    """The head records its detector's sha256: the check needs no training cache, wherever evaluate runs from
    (the training cache's path, as typed, leads nowhere from here)."""
    trained_on = {"path": "cache/prop-train", "fingerprint": "0" * 32}
    other = {"checkpoint": "model.pt", "sha256": "f" * 64, "step": 9}
    head = write_head(tmp_path / "head.pt", world["clip"], "text", trained_on=trained_on, detector=other)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(DataError) as raised:
        evaluate.run(**settings(world, tmp_path / "out", embeddings=None, heads={"ViLD-text": head}))
    message = str(raised.value)
    assert message.startswith(f"{head}: head was trained on features of detector model.pt (ffffffffffff),")
    assert f"the proposal cache {world['folder'] / 'proposals'} comes from model.pt (dddddddddddd)" in message
    assert "\n" not in message

    same = write_head(tmp_path / "same.pt", world["clip"], "text", trained_on=trained_on,
                      detector={**other, "sha256": "d" * 64})
    results = evaluate.run(**settings(world, tmp_path / "same", embeddings=None, modes=["ViLD-text"],
                                      heads={"ViLD-text": same}))
    assert list(results) == ["ViLD-text"]


def test_heads_caches_and_files_that_do_not_belong_together_are_refused(world, tmp_path, caplog):
    folder, clip = world["folder"], world["clip"]
    other_detector = CacheFolder.open_or_create(
        tmp_path / "train-proposals", stage="dump-proposals", config={},
        inputs={"detector": {"checkpoint": "model.pt", "sha256": "f" * 64, "step": 9}},
        fields=proposal_fields((CHANNELS, 7, 7)), num_shards=1, images_per_shard=1)
    cases = {
        "other detector": write_head(tmp_path / "detector.pt", clip, "text", trained_on={
            "path": str(other_detector.path), "fingerprint": other_detector.fingerprint}),
        "embed dim": write_head(tmp_path / "dim.pt", {**clip, "embed_dim": 16}, "text", embed_dim=16),
        "other CLIP": write_head(tmp_path / "clip.pt", {**clip, "sha256": "e" * 64}, "text"),
        "other channels": write_head(tmp_path / "channels.pt", clip, "text", in_channels=8),
    }
    messages = {}
    for case, head in cases.items():
        with pytest.raises(DataError) as raised:
            evaluate.run(**settings(world, tmp_path / "out", heads={"ViLD-text": head}))
        messages[case] = str(raised.value)
    assert "dim 16)," in messages["embed dim"] and messages["embed dim"].count(", dim ") == 2
    assert "use one model" in messages["other CLIP"]
    assert "4x7x7" in messages["other channels"] and "8x7x7" in messages["other channels"]
    assert "trained on features of detector model.pt (ffffffffffff)" in messages["other detector"]
    assert all("\n" not in message and str(tmp_path) in message for message in messages.values())
    assert not (tmp_path / "out").exists(), "a refused run leaves no output folder"
    earlier = tmp_path / "earlier"   # an output folder whose text_all.pt another CLIP made: kept as it is
    TextEmbeddings(["circle"], torch.eye(1, DIM), {**clip, "sha256": "9" * 64}).save(earlier / "text_all.pt")
    before = (earlier / "text_all.pt").read_bytes()
    with pytest.raises(DataError, match="use one model"):
        evaluate.run(**settings(world, earlier, heads={"ViLD-text": cases["other CLIP"]}))
    assert (earlier / "text_all.pt").read_bytes() == before

    other = CacheFolder.open_or_create(
        tmp_path / "other-embeddings", stage="cache-embeddings", config={},
        inputs={"clip": clip, "proposals": {"fingerprint": "not-this-one"}}, fields=embedding_fields(DIM),
        num_shards=3, images_per_shard=PER_SHARD)
    with pytest.raises(DataError, match=r"made from another proposal cache \(fingerprint not-this-one\), not from"):
        evaluate.run(**settings(world, tmp_path / "out", embeddings=None) | {"embeddings": other.path})

    edited = json.loads((folder / "val.json").read_text())
    edited["annotations"] = edited["annotations"][1:]
    (tmp_path / "val.json").write_text(json.dumps(edited))
    with pytest.raises(DataError, match="not the annotation file the proposal cache"):
        evaluate.run(**settings(world, tmp_path / "out") | {"annotations": tmp_path / "val.json"})

    TextEmbeddings(["circle"], torch.eye(1, DIM), clip).save(tmp_path / "one-name.pt")
    with pytest.raises(DataError, match="lacks the categories square, star"):
        evaluate.run(**settings(world, tmp_path / "out", clip=None, text=tmp_path / "one-name.pt"))
    other_text = tmp_path / "other-clip-text.pt"
    TextEmbeddings([c["name"] for c in CATEGORIES], torch.eye(5, DIM), {**clip, "sha256": "9" * 64}).save(other_text)
    with pytest.raises(DataError) as raised:   # the crops' CLIP and the texts' must be one model
        evaluate.run(**settings(world, tmp_path / "out", heads=None, clip=None, text=other_text))
    assert str(raised.value).startswith(f"{other_text}: text embeddings are from CLIP {clip['model']} (999999999999,")
    assert str(raised.value).endswith("; use one model")
    assert not (tmp_path / "out").exists()

    caplog.set_level(logging.WARNING, logger="vild_pipe.stages.evaluate")
    evaluate.run(**settings(world, tmp_path / "swapped", embeddings=None, modes=["ViLD-image"],
                            heads={"ViLD-image": world["heads"]["ViLD-text"]}))
    assert any("trained with losses 'text', not 'image'" in r.getMessage() for r in caplog.records)
    assert "class-agnostic NMS" not in caplog.text

    head_05 = write_head(tmp_path / "head-05.pt", world["clip"], "text+image", proposal_nms=0.5)
    evaluate.run(**settings(world, tmp_path / "other-nms", embeddings=None, modes=["ViLD"], heads={"ViLD": head_05}))
    assert (f"{head_05}: the head was trained on proposals made with class-agnostic NMS 0.5, the proposal cache"
            f" {world['folder'] / 'proposals'} was made with 0.7; dump-proposals --nms-threshold 0.5 makes them alike"
            in caplog.text)


def test_an_embedding_cache_whose_rows_no_longer_match_the_proposals_is_refused(world, tmp_path):
    """Embeddings belong to boxes by position: a shard whose images are the same but whose rows are split
    otherwise (a proposal shard rebuilt since) would give boxes others' crop embeddings, so it is refused."""
    embeddings = tmp_path / "embeddings"
    shutil.copytree(world["folder"] / "embeddings-noisy", embeddings)
    with h5py.File(embeddings / "shard-00000.h5", "r+") as h5:
        row_start = h5["row_start"][()]
        h5["row_start"][1] = row_start[1] - 1    # the same images and rows in all, one row moved to the next image
    with pytest.raises(DataError, match="shard-00000.h5: images or rows differ from .*shard-00000.h5; rebuild"):
        evaluate.run(**settings(world, tmp_path / "out", embeddings=None) | {"embeddings": embeddings})
    assert not (tmp_path / "out").exists()
