"""detect on a real photograph (scikit-image's astronaut) with a free-text vocabulary, a tiny detector, a tiny
CLIP and an untrained head: the COCO JSON and the drawings, the ensemble's crop embeddings equal to what
cache-embeddings stores for the same boxes, and one-line errors for bad vocabularies, images and models."""
import json
import logging
import shutil

import numpy as np
import pytest
import skimage.data
import torch
from click.testing import CliRunner
from PIL import Image
from pycocotools.coco import COCO

from vild_pipe.cli import main
from vild_pipe.errors import DataError, VildError
from vild_pipe.pipeline.checkpoint import save_checkpoint
from vild_pipe.pipeline.detector import DetectorConfig, build_detector, load_detector, save_final_model
from vild_pipe.pipeline.embedding_cache import LEGACY_PROPOSAL_NMS
from vild_pipe.pipeline.head import HeadConfig, ViLDHead, load_head, save_head
from vild_pipe.pipeline.proposals import PROPOSAL_NMS_THRESHOLD, propose_with_features
from vild_pipe.pipeline.scoring import detections_from_scores, head_probabilities
from vild_pipe.pipeline.shards import CacheFolder, ShardWriter, sha256_file
from vild_pipe.pipeline.teacher import SmallClipConfig, load_teacher, save_clip
from vild_pipe.stages import cache_embeddings, detect
from vild_pipe.stages.dump_proposals import proposal_fields

TINY_DETECTOR = dict(small_widths=(8, 16, 16, 32), fpn_channels=16, min_size=96, max_size=96,
                     rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, representation_size=64)
TINY_CLIP = SmallClipConfig(embed_dim=32, image_resolution=32, vision_layers=(1, 1, 1, 1), vision_width=8,
                            transformer_width=64, transformer_layers=1)
VOCAB = "astronaut, american flag, red car, zebra"
NAMES = ["astronaut", "american flag", "red car", "zebra"]


pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_torchrun_env")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny detector, a tiny CLIP, an untrained head matching both (base names: zebra and a category
    outside the vocabulary), and the astronaut photograph as JPEG."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    config = DetectorConfig.preset("small", **TINY_DETECTOR)
    save_final_model(folder / "rpn", build_detector(config), config, step=0)
    clip_file = folder / "tiny-clip.pt"
    save_clip(TINY_CLIP.build(), clip_file)
    clip = {"model": clip_file.name, "sha256": sha256_file(clip_file), "embed_dim": 32, "input_resolution": 32}
    head = ViLDHead(HeadConfig(in_channels=16, representation_size=32, embed_dim=32))
    save_head(folder / "head.pt", head, {"losses": "text+image", "clip": clip, "embed_dim": 32, "step": 0,
                                         "base_names": ["Zebra", "kite"], "temperature": 0.01, "config": {}})
    photo = folder / "astronaut.jpg"
    Image.fromarray(skimage.data.astronaut()).save(photo, quality=90)
    return {"folder": folder, "detector": folder / "rpn", "clip": str(clip_file), "head": folder / "head.pt",
            "photo": photo}


def detect_kwargs(models, out, **overrides):
    return {"images": [models["photo"]], "detector": models["detector"], "head": models["head"], "out": out,
            "vocab": VOCAB, "clip": models["clip"], "score_threshold": 0.0, "top_k": 25, "device": "cpu",
            **overrides}


def test_detections_json_and_drawings_of_a_photograph(models, tmp_path, caplog):
    second = tmp_path / "copy" / "astronaut.jpg"
    second.parent.mkdir()
    second.write_bytes(models["photo"].read_bytes())
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger=detect.__name__):
        summary = detect.run(**detect_kwargs(models, out, images=[models["photo"], second]))
    assert f"{second} is drawn as astronaut-2.png (another image is astronaut.png)" in caplog.text

    coco = COCO(str(out / "detections.json"))
    assert [coco.cats[k]["name"] for k in sorted(coco.cats)] == NAMES
    assert [image["file_name"] for image in coco.dataset["images"]] == [str(models["photo"]), str(second)]
    annotations = coco.dataset["annotations"]
    assert summary["detections"] == len(annotations) == 2 * 25  # threshold 0: every image fills its top-k
    boxes = np.array([a["bbox"] for a in annotations])
    assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= 512 + 1e-6).all()
    assert all(a["category_name"] == NAMES[a["category_id"] - 1] and 0 <= a["score"] <= 1 for a in annotations)
    first_image = [a for a in annotations if a["image_id"] == 1]
    second_image = [a for a in annotations if a["image_id"] == 2]
    assert [a["score"] for a in first_image] == [a["score"] for a in second_image]  # the same pixels
    made_by = coco.dataset["info"]            # what made the file, to read and reproduce it later
    assert made_by["head"]["sha256"] == sha256_file(models["head"]) and made_by["detector"] == summary["detector"]
    assert made_by["settings"]["proposal_nms"] == summary["proposal_nms"] and made_by["settings"]["top_k"] == 25
    assert made_by["clip"]["sha256"] == sha256_file(models["clip"])

    assert sorted(p.name for p in out.glob("*.png")) == ["astronaut-2.png", "astronaut.png"]
    photo = np.asarray(Image.open(models["photo"]).convert("RGB")).astype(int)
    drawn = np.asarray(Image.open(out / "astronaut.png").convert("RGB")).astype(int)
    assert drawn.shape == photo.shape
    best = max(first_image, key=lambda a: a["score"])  # drawn last: nothing covers its box
    x, y, width, height = best["bbox"]
    edge = (int(round(y + height / 2)), int(np.clip(round(x), 0, 511)))
    assert np.abs(drawn[edge] - photo[edge]).max() > 0
    assert np.abs(drawn - photo).max(axis=2).astype(bool).mean() < 0.9  # boxes drawn, not the picture replaced


def test_the_command_prints_each_images_count_and_best_detections_once(models, tmp_path):
    photo, empty = models["photo"], tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    result = CliRunner().invoke(main, ["detect", str(photo), str(empty), "--skip-bad-images",
                                       "--detector", str(models["detector"]), "--head", str(models["head"]),
                                       "--clip", models["clip"], "--vocab", VOCAB, "--score-threshold", "0",
                                       "--top-k", "7", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "detections.json").read_text())["annotations"]
    best = sorted(written, key=lambda a: -a["score"])[:5]
    assert [line for line in result.output.splitlines() if str(photo) in line] == [
        f"{photo}: 7 detections: " + ", ".join(f"{a['category_name']} {a['score']:.2f}" for a in best) + ", ..."]
    assert len([line for line in result.output.splitlines() if "7 detections" in line]) == 1


def test_a_folder_stands_for_its_image_files(models, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "b.jpg").write_bytes(models["photo"].read_bytes())
    Image.open(models["photo"]).save(folder / "a.PNG")
    (folder / "c.jfif").write_bytes(models["photo"].read_bytes())
    (folder / "readme.txt").write_text("not an image")
    (folder / "nested.jpg").mkdir()
    summary = detect.run(**detect_kwargs(models, tmp_path / "out", images=[folder], top_k=2))
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert summary["images"] == 3
    assert [image["file_name"] for image in written["images"]] == [str(folder / name)
                                                                   for name in ("a.PNG", "b.jpg", "c.jfif")]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["a.png", "b.png", "c.png"]

    # A file given with its folder, or twice, is one image, not another drawn as b-2.png.
    again = detect.run(**detect_kwargs(models, tmp_path / "again", images=[folder / "b.jpg", folder,
                                                                          folder / ".." / "photos" / "b.jpg"], top_k=2))
    written = json.loads((tmp_path / "again" / "detections.json").read_text())
    assert again["images"] == 3 and [image["file_name"] for image in written["images"]] == [
        str(folder / name) for name in ("b.jpg", "a.PNG", "c.jfif")]
    assert sorted(p.name for p in (tmp_path / "again").glob("*.png")) == ["a.png", "b.png", "c.png"]


def test_a_photo_stored_sideways_is_turned_upright_as_its_exif_tag_says(models, tmp_path):
    """A phone stores a portrait photograph as a landscape bitmap tagged "turn 90° clockwise" (orientation 6):
    detect gives the detections, sizes and drawing of the upright image, as if the file held it upright."""
    upright = Image.fromarray(skimage.data.astronaut()[:, 64:448])  # 384 x 512: portrait
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png", exif=exif.tobytes())
    assert Image.open(tmp_path / "sideways.png").size == (512, 384)

    detect.run(**detect_kwargs(models, tmp_path / "out", images=[tmp_path / "upright.png",
                                                                 tmp_path / "sideways.png"], top_k=5))
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [(image["width"], image["height"]) for image in written["images"]] == [(384, 512), (384, 512)]
    per_image = [[(a["bbox"], a["score"], a["category_id"]) for a in written["annotations"] if a["image_id"] == k]
                 for k in (1, 2)]
    assert len(per_image[0]) == 5 and per_image[0] == per_image[1]
    drawings = [np.asarray(Image.open(tmp_path / "out" / name)) for name in ("upright.png", "sideways.png")]
    assert drawings[0].shape == (512, 384, 3) and np.array_equal(drawings[0], drawings[1])


def test_head_only_scores_are_the_heads_probabilities(models, tmp_path):
    summary = detect.run(**detect_kwargs(models, tmp_path, ensemble=False, top_k=10))
    assert not summary["ensemble"] and summary["detections"] == 10

    model, _, _ = load_detector(models["detector"])
    head, _ = load_head(models["head"])
    texts = load_teacher(models["clip"]).text_embeddings(NAMES)
    pixels = torch.from_numpy(np.asarray(Image.open(models["photo"]).convert("RGB")).copy()).permute(2, 0, 1)
    proposed = propose_with_features(model, [pixels], nms_threshold=summary["proposal_nms"])[0]
    with torch.no_grad():
        probs = head_probabilities(head(proposed.features), texts, head.background_embedding())
    _, scores, classes = detections_from_scores(proposed.boxes, probs, max_detections=10)
    written = json.loads((tmp_path / "detections.json").read_text())["annotations"]
    assert [a["score"] for a in written] == pytest.approx(scores.tolist(), rel=1e-5)
    assert [a["category_id"] - 1 for a in written] == classes.tolist()


def test_ensemble_crops_are_what_cache_embeddings_stores_and_zebra_is_base(models, tmp_path):
    """The same boxes through cache-embeddings (a hand-written one-image proposal cache) give the same `emb`."""
    model, _, _ = load_detector(models["detector"])
    pixels = torch.from_numpy(np.asarray(Image.open(models["photo"]).convert("RGB")).copy()).permute(2, 0, 1)
    boxes = propose_with_features(model, [pixels], top_n=40)[0].boxes.numpy()
    annotation_file = tmp_path / "one.json"
    annotation_file.write_text(json.dumps({
        "images": [{"id": 3, "file_name": str(models["photo"]), "width": 512, "height": 512}],
        "annotations": [], "categories": [{"id": 1, "name": "astronaut"}]}))
    proposals = CacheFolder.open_or_create(
        tmp_path / "proposals", stage="dump-proposals", config={},
        inputs={"annotations": {"file": "one.json", "sha256": sha256_file(annotation_file)}},
        fields=proposal_fields((16, 7, 7)), num_shards=1, images_per_shard=1)
    with ShardWriter(proposals, 0) as writer:
        writer.add_image(3, boxes=boxes, scores=np.ones(len(boxes), np.float32), is_gt=np.zeros(len(boxes), bool),
                         features=np.zeros((len(boxes), 16, 7, 7), np.float16))
    proposals.finalize()
    cache_embeddings.run(proposals.path, annotation_file, tmp_path / "embeddings", models["clip"], device="cpu",
                         workers=0)
    with CacheFolder.open(tmp_path / "embeddings").read_shard(0) as reader:
        cached = reader.rows_for(3)["emb"]

    teacher = load_teacher(models["clip"])
    computed = detect.crop_embeddings(teacher, pixels, boxes)
    assert computed.dtype == torch.float16
    np.testing.assert_array_equal(computed.numpy(), cached)
    assert detect._novel_names(["zebra", "red car", " ZEBRA ", "teddy bear", "Teddy_Bear"],
                               {"base_names": ["Zebra", "teddy_bear"]}).tolist() == [False, True, False, False, False]


def test_bad_vocabularies_images_and_models_are_one_line_errors(models, tmp_path):
    def error(exception, **overrides):
        with pytest.raises(exception) as raised:
            detect.run(**detect_kwargs(models, tmp_path / "out", **overrides))
        message = str(raised.value)
        assert "\n" not in message
        return message

    assert "empty category name" in error(VildError, vocab="")
    assert "duplicate category name 'zebra'" in error(VildError, vocab="zebra, red car, zebra")
    no_names = "give the category names one way: --vocab NAME,NAME,... or --vocab-file FILE"
    assert error(VildError, vocab=None) == no_names
    names_file = tmp_path / "names.txt"
    names_file.write_text("zebra\n")
    assert error(VildError, vocab_file=names_file) == no_names  # and --vocab too
    missing = tmp_path / "nowhere" / "missing.jpg"
    assert error(VildError, images=[models["photo"], missing]) == f"{missing}: no such image file or folder"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    assert error(VildError, images=[tmp_path / "empty"]) == (
        f"{tmp_path / 'empty'}: no image files in this folder ({', '.join(detect.IMAGE_SUFFIXES)})")
    assert "--clip is required" in error(VildError, clip=None)
    other_clip = tmp_path / "other-clip.pt"
    torch.manual_seed(1)
    save_clip(TINY_CLIP.build(), other_clip)
    assert "was trained against CLIP tiny-clip.pt" in error(DataError, clip=str(other_clip))
    assert error(VildError, clip="nope.pt") == "--clip nope.pt: no such file"
    gone = tmp_path / "gone" / "clip"
    assert error(VildError, clip=str(gone)) == f"--clip {gone}: no such file"
    assert "was trained against CLIP tiny-clip.pt" in error(DataError, clip="ViT-B/32")  # a name, not a path
    assert error(VildError, head=models["detector"]) == (
        f"{models['detector']}: a train-rpn run folder, not a train-head one; give a train-head run folder or its"
        " head.pt")
    unfinished = tmp_path / "rpn-unfinished"
    unfinished.mkdir()
    save_checkpoint(unfinished / "last.pt", {"step": 3, "config": {"detector": {"backbone": "small"}}})
    assert error(VildError, head=unfinished).startswith(f"{unfinished}: a train-rpn run folder, not a train-head one")
    assert error(VildError, detector=unfinished) == (
        f"{unfinished}: train-rpn has not finished (step 3; model.pt is written at its end); rerun train-rpn to finish"
        f" it, or pass {unfinished / 'last.pt'} to use its last checkpoint as it is")
    head_run = tmp_path / "head-text"     # the reverse mistake: a train-head run folder given as the detector
    head_run.mkdir()
    shutil.copy(models["head"], head_run / "head.pt")
    save_checkpoint(head_run / "last.pt", {"step": 4, "config": {"losses": "text", "head": {"in_channels": 16}}})
    assert error(VildError, detector=head_run) == (
        f"{head_run}: a train-head run folder, not a train-rpn one; give a train-rpn run folder or its model.pt")
    assert error(DataError, detector=models["head"]) == (
        f"{models['head']}: a train-head checkpoint, not a detector; give a train-rpn run folder or its model.pt")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    assert error(DataError, images=[tmp_path / "broken.jpg"]) == (
        f"{tmp_path / 'broken.jpg'}: cannot decode image (truncated or not an image)")
    assert not (tmp_path / "out" / "detections.json").exists()


def test_skip_bad_images_goes_on_past_an_unreadable_one(models, tmp_path, caplog):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(models["photo"], folder / "a.jpg")
    (folder / "b.jpg").write_bytes(b"")
    shutil.copy(models["photo"], folder / "c.jpg")
    with pytest.raises(DataError, match="b.jpg: cannot decode image"):
        detect.run(**detect_kwargs(models, tmp_path / "stopped", images=[folder]))
    caplog.set_level(logging.WARNING, logger=detect.__name__)
    summary = detect.run(**detect_kwargs(models, tmp_path / "out", images=[folder], skip_bad_images=True))
    assert summary["skipped"] == [str(folder / "b.jpg")] and summary["images"] == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"{folder / 'b.jpg'}: cannot decode image (truncated or not an image) (skipped: --skip-bad-images)"]
    written = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [image["file_name"] for image in written["images"]] == [str(folder / "a.jpg"), str(folder / "c.jpg")]

    # A run that stops part way leaves OUT as it was: no drawing of the images before the bad one, no temp file.
    assert list((tmp_path / "stopped").iterdir()) == []
    before = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()}
    (folder / "b.jpg").unlink()
    Image.new("RGB", (300, 2)).save(folder / "b.png")    # decodes, but is too elongated: stops after a.jpg
    with pytest.raises(DataError, match="b.png: a 300x2 image is too elongated"):
        detect.run(**detect_kwargs(models, tmp_path / "out", images=[folder], vocab="circle"))
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir()} == before


def test_the_proposals_nms_follows_the_heads_training_cache_unless_given(models, tmp_path, monkeypatch):
    """detect makes its proposals as dump-proposals made the ones the head was trained on: the value train-head
    records in the head, else the one in its training cache's manifest, else 0.5 (heads older than the record,
    whose caches had that default)."""
    used = []
    propose = detect.propose_with_features

    def recording(*args, nms_threshold, **kwargs):
        used.append(nms_threshold)
        return propose(*args, nms_threshold=nms_threshold, **kwargs)

    monkeypatch.setattr(detect, "propose_with_features", recording)
    cache = CacheFolder.open_or_create(tmp_path / "proposals", stage="dump-proposals", config={"nms_threshold": 0.65},
                                       inputs={}, fields=proposal_fields((16, 7, 7)), num_shards=1, images_per_shard=1)
    with ShardWriter(cache, 0):
        pass
    cache.finalize()
    head, info = load_head(models["head"])
    heads = {"recorded": {**info, "proposal_nms": 0.6}, "recorded as unknown": {**info, "proposal_nms": None},
             "older, cache found": {**info, "proposals": {"path": str(cache.path), "fingerprint": cache.fingerprint}},
             "older, cache moved": {**info, "proposals": {"path": str(tmp_path / "gone"), "fingerprint": "f"}}}
    for name, head_info in heads.items():
        save_head(tmp_path / f"{name}.pt", head, head_info)
    kwargs = detect_kwargs(models, tmp_path / "out", ensemble=False, top_k=2)
    chosen = {name: detect.run(**{**kwargs, "head": tmp_path / f"{name}.pt"})["proposal_nms"] for name in heads}
    assert chosen == {"recorded": 0.6, "recorded as unknown": PROPOSAL_NMS_THRESHOLD, "older, cache found": 0.65,
                      "older, cache moved": LEGACY_PROPOSAL_NMS}
    assert detect.run(**{**kwargs, "head": tmp_path / "recorded.pt", "proposal_nms": 0.9})["proposal_nms"] == 0.9
    assert used == [0.6, PROPOSAL_NMS_THRESHOLD, 0.65, 0.5, 0.9]
    with pytest.raises(VildError, match=r"^--proposal-nms must be in \(0, 1\], got 0.0$"):
        detect.run(**{**kwargs, "proposal_nms": 0.0})
    for option, message in (({"top_k": 0}, "--top-k must be at least 1, got 0"),
                            ({"score_threshold": -0.1}, "--score-threshold must be in [0, 1], got -0.1"),
                            ({"base_text_weight": 2.0}, "--base-text-weight must be in [0, 1], got 2.0")):
        with pytest.raises(VildError) as raised:
            detect.run(**{**kwargs, **option})
        assert str(raised.value) == message


def test_a_head_trained_on_another_detectors_features_is_refused_from_any_folder(models, tmp_path, monkeypatch):
    """Both detectors give 16x7x7 features, so only the sha256 train-head records tells them apart."""
    torch.manual_seed(2)
    config = DetectorConfig.preset("small", **TINY_DETECTOR)
    save_final_model(tmp_path / "other-rpn", build_detector(config), config, step=0)
    other = load_detector(tmp_path / "other-rpn")[2]
    ours = load_detector(models["detector"])[2]
    head, info = load_head(models["head"])
    (tmp_path / "trained").mkdir()
    save_head(tmp_path / "trained" / "head.pt", head, {**info, "detector": other})
    monkeypatch.chdir(tmp_path / "trained")

    with pytest.raises(DataError) as raised:
        detect.run(**detect_kwargs(models, tmp_path / "out", head="head.pt", ensemble=False))
    message = str(raised.value)
    assert message.startswith("head.pt: head was trained on features of detector") and "\n" not in message
    assert f"model.pt ({other['sha256'][:12]})" in message and f"model.pt ({ours['sha256'][:12]})" in message
    assert other["sha256"] != ours["sha256"] and not (tmp_path / "out").exists()

    summary = detect.run(**detect_kwargs(models, tmp_path / "out", head="head.pt", detector=tmp_path / "other-rpn",
                                         ensemble=False, top_k=3))
    assert summary["detections"] == 3 and summary["detector"] == other


def test_an_older_heads_detector_is_read_from_its_training_cache_where_that_is_found(models, tmp_path):
    """A head written before train-head recorded its detector: the manifest of its training proposal cache names
    it, as evaluate reads it; a head whose cache has moved away is not checked (nothing to check against)."""
    other = {"checkpoint": "model.pt", "sha256": "f" * 64, "step": 9}
    cache = CacheFolder.open_or_create(tmp_path / "proposals", stage="dump-proposals", config={},
                                       inputs={"detector": other}, fields=proposal_fields((16, 7, 7)), num_shards=1,
                                       images_per_shard=1)
    head, info = load_head(models["head"])
    assert "detector" not in info
    save_head(tmp_path / "older.pt", head, {**info, "proposals": {"path": str(cache.path),
                                                                   "fingerprint": cache.fingerprint}})
    with pytest.raises(DataError, match=r"older\.pt: head was trained on features of detector model\.pt \(ffffff"):
        detect.run(**detect_kwargs(models, tmp_path / "out", head=tmp_path / "older.pt", ensemble=False))
    save_head(tmp_path / "moved.pt", head, {**info, "proposals": {"path": str(tmp_path / "gone"), "fingerprint": "f"}})
    assert detect.run(**detect_kwargs(models, tmp_path / "out", head=tmp_path / "moved.pt", ensemble=False,
                                      top_k=1))["detections"] == 1


def test_an_image_too_elongated_for_the_detector_is_one_line_and_can_be_skipped(models, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(models["photo"], folder / "a.jpg")
    Image.new("RGB", (300, 2), "white").save(folder / "line.png")    # a 2-pixel side after the resize: 0 pixels
    with pytest.raises(DataError) as raised:
        detect.run(**detect_kwargs(models, tmp_path / "stopped", images=[folder]))
    assert str(raised.value).startswith(f"{folder / 'line.png'}: a 300x2 image is too elongated for the detector")
    summary = detect.run(**detect_kwargs(models, tmp_path / "out", images=[folder], skip_bad_images=True))
    assert summary["skipped"] == [str(folder / "line.png")] and summary["images"] == 1
