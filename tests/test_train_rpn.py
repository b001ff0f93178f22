"""train-rpn on a tiny synthetic world: targets, resumption after SIGKILL and SIGTERM, refused config changes,
torchrun equivalence, and the recall stage."""
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from urllib.error import URLError

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from vild_pipe.cli import main
from vild_pipe.data.coco import CocoDataset
from vild_pipe.errors import DataError, VildError
from vild_pipe.pipeline.checkpoint import CHECKPOINT_NAME, load_checkpoint
from vild_pipe.pipeline.detector import MODEL_NAME, DetectorConfig, detector_training_data, load_detector
from vild_pipe.pipeline.shards import sha256_file
from vild_pipe.pipeline.recall import format_recall
from vild_pipe.pipeline.training_run import check_schedule, lr_factor_schedule
from vild_pipe.stages import make_synthetic, train_rpn
from vild_pipe.stages.train_rpn import (
    METRICS_NAME, RECALL_NAME, TrainingImages, image_flip, resize_for_training, step_scale,
)

from child_processes import free_port, run_to_end

TINY = dict(small_widths=(8, 16, 32, 32), fpn_channels=16, representation_size=32, min_size=96, max_size=96,
            rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=200, rpn_pre_nms_top_n_test=100,
            rpn_post_nms_top_n_test=100, box_batch_size_per_image=64)
ITERATIONS = 30

# Runs one training in a fresh process (threads=1 like the in-process runs, so the arithmetic is the same).
DRIVER = '''
import json, sys
from vild_pipe.pipeline.checkpoint import TrainingStopped
from vild_pipe.stages import train_rpn
try:
    train_rpn.run(**json.loads(sys.argv[1]))
except TrainingStopped as stopped:
    print("STOPPED", stopped.step, flush=True)
    sys.exit(3)
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    make_synthetic.run(out, train_images=8, val_images=4, image_size=96, workers=1)
    return out


def settings(world, run_dir, **overrides):
    return {"annotations": str(world / "train.json"), "run_dir": str(run_dir), "backbone": "small",
            "iterations": ITERATIONS, "batch_size": 4, "lr": 0.02, "warmup": 3, "checkpoint_every": 4,
            "workers": 0, "threads": 1, "seed": 0, "detector_options": TINY, **overrides}


def train(world, run_dir, **overrides):
    threads = torch.get_num_threads()
    try:
        return train_rpn.run(**settings(world, run_dir, **overrides))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """One uninterrupted run: what every interrupted one must end up as."""
    run_dir = tmp_path_factory.mktemp("reference")
    summary = train(world, run_dir)
    return run_dir, summary


def final_weights(run_dir):
    return torch.load(run_dir / MODEL_NAME, weights_only=True)["model"]


def assert_same_weights(run_dir, reference_dir):
    expected = final_weights(reference_dir)
    weights = final_weights(run_dir)
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name


def metric_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / METRICS_NAME).read_text().splitlines()]


def start_driver(tmp_path, arguments):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), json.dumps(arguments)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)


def wait_for_metric_lines(process, run_dir, count, timeout=60):
    deadline = time.monotonic() + timeout
    path = run_dir / METRICS_NAME
    while time.monotonic() < deadline:
        if path.is_file() and len(path.read_text().splitlines()) >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"training ended before step {count}:\n{process.stdout.read()}")
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    pytest.fail(f"no step {count} within {timeout} s:\n{process.communicate()[0]}")


# --------------------------------------------------------------------------- data

def test_training_targets_hold_base_boxes_only_all_labelled_object(world):
    full = CocoDataset.load(world / "train.json").with_split("auto")
    view = full.training_view()
    images = TrainingImages(view, min_size=96, max_size=96, seed=0, scale_jitter=(1.0, 1.0), hflip=False)
    novel_seen = 0
    for sample, record in enumerate(view.images):
        image, target, position = images[(0, 5, sample)]
        boxes, categories, _ = full.annotations_for(record.id)
        base = full.split.base_mask(categories)
        novel_seen += int((~base).sum())
        assert position == 5 and image.shape == (3, 96, 96)
        assert torch.equal(target["labels"], torch.ones(int(base.sum()), dtype=torch.int64))
        np.testing.assert_allclose(target["boxes"].numpy(), boxes[base], atol=1e-4)
    assert novel_seen > 0   # the world has novel objects in these images; none reached a target

    by_category = TrainingImages(view, min_size=96, max_size=96, seed=0, scale_jitter=(1.0, 1.0), hflip=False,
                                 box_classes=len(view.split.base_ids))
    base_index = {c: k for k, c in enumerate(view.split.base_ids)}
    for sample, record in enumerate(view.images[:5]):
        _, target, _ = by_category[(0, 0, sample)]
        boxes, categories, _ = full.annotations_for(record.id)
        expected = [1 + base_index[int(c)] for c in categories[full.split.base_mask(categories)]]
        assert target["labels"].tolist() == expected


def test_flip_and_scale_are_functions_of_seed_step_and_position(world):
    view = CocoDataset.load(world / "train.json").training_view("auto")
    images = TrainingImages(view, min_size=96, max_size=96, seed=4, scale_jitter=(0.5, 1.5), hflip=True)
    flips = [image_flip(4, step, 0) for step in range(40)]
    assert 5 < sum(flips) < 35
    step = flips.index(True)
    scale = step_scale(4, step, (0.5, 1.5))
    assert scale == step_scale(4, step, (0.5, 1.5)) and 0.5 <= scale <= 1.5
    image, target, _ = images[(step, 0, 1)]
    again, target_again, _ = images[(step, 0, 1)]
    assert torch.equal(image, again) and torch.equal(target["boxes"], target_again["boxes"])
    side = round(96 * scale)
    assert image.shape == (3, side, side)
    original, _, _ = view.annotations_for(view.images[1].id)
    expected = original * side / 96
    expected[:, [0, 2]] = side - expected[:, [2, 0]]      # flipped left-right
    np.testing.assert_allclose(target["boxes"].numpy(), expected, rtol=1e-4, atol=1e-3)


def test_resize_matches_torchvision_transform_at_scale_one():
    transform = GeneralizedRCNNTransform(min_size=64, max_size=100, image_mean=[0.0] * 3, image_std=[1.0] * 3).eval()
    image = torch.rand(3, 50, 90)
    boxes = torch.tensor([[5.0, 6.0, 40.0, 45.0], [60.0, 0.0, 90.0, 50.0]])
    expected_image, expected_target = transform.resize(image, {"boxes": boxes.clone()})
    resized, resized_boxes = resize_for_training(image, boxes, 64, 100, 1.0)
    assert torch.equal(resized, expected_image)
    assert torch.allclose(resized_boxes, expected_target["boxes"])


def test_lr_warms_up_then_decays():
    cosine = lr_factor_schedule({"iterations": 100, "warmup": 10, "schedule": "cosine"})
    assert cosine(0) == pytest.approx(0.001) and cosine(5) == pytest.approx(0.5005) and cosine(10) == 1.0
    assert cosine(55) == pytest.approx(0.5) and cosine(100) == pytest.approx(0.0)
    step = lr_factor_schedule({"iterations": 90, "warmup": 0, "schedule": "step"})
    assert [step(s) for s in (0, 59, 60, 79, 80)] == [1.0, 1.0, 0.1, 0.1, 0.01]


# --------------------------------------------------------------------------- training and resumption

def test_training_lowers_the_loss_and_writes_the_run_folder(world, reference):
    run_dir, summary = reference
    assert summary["steps"] == ITERATIONS == summary["trained_steps"]
    assert sorted(p.name for p in run_dir.iterdir()) == [CHECKPOINT_NAME, METRICS_NAME, MODEL_NAME]
    records = [json.loads(line) for line in (run_dir / METRICS_NAME).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, ITERATIONS + 1))
    assert {"loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "lr", "step_s",
            "images_per_s"} <= records[0].keys()
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-5:]) < 0.75 * np.mean(losses[:5])
    model, config, identity = load_detector(run_dir)
    assert identity["step"] == ITERATIONS and identity["checkpoint"] == MODEL_NAME
    assert config.fpn_channels == TINY["fpn_channels"]
    assert detector_training_data(run_dir)["annotations_sha256"] == sha256_file(world / "train.json")  # for add_gt


def test_rerun_of_a_finished_run_is_a_no_op_and_a_config_change_is_refused(world, reference):
    run_dir, _ = reference
    before = (run_dir / MODEL_NAME).read_bytes()
    again = train(world, run_dir)
    assert again["trained_steps"] == 0 and again["steps"] == ITERATIONS
    assert (run_dir / MODEL_NAME).read_bytes() == before
    novel = [category.name for category in CocoDataset.load(world / "train.json").categories
             if category.split == "novel"]
    assert train(world, run_dir, split="novel:" + ",".join(novel))["trained_steps"] == 0   # the split named otherwise
    with pytest.raises(VildError, match=r"another config \(lr: 0.02 -> 0.03\)"):
        train(world, run_dir, lr=0.03)
    with pytest.raises(VildError, match="detector.fpn_channels: 16 -> 24"):
        train(world, run_dir, detector_options={**TINY, "fpn_channels": 24})


def test_imagenet_init_offline_is_one_line_and_leaves_no_run_folder(world, tmp_path, monkeypatch):
    """No network: torch.hub's download fails as it does offline; the user gets the option and the way round it."""
    def offline(*args, **kwargs):
        raise URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))

    monkeypatch.setattr(torch.hub, "urlopen", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no weights cached from an earlier download
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["train-rpn", str(world / "train.json"), str(run_dir), "--backbone-init",
                                       "imagenet", "--iterations", "1", "--workers", "0", "--device", "cpu"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "Downloading" not in result.output  # torch.hub's own line, printed before it fails
    assert errors == ["error: --backbone-init imagenet: could not download torchvision's ResNet-50 ImageNet weights"
                      " (network error: name or service not known); give a local state-dict file with"
                      " --backbone-init PATH"]
    assert not run_dir.exists()


def test_a_missing_image_is_found_before_training_and_leaves_no_run_folder(world, tmp_path):
    """Training opens images lazily; a missing one must stop the command at once, not at the step that draws it."""
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    missing = copy / "train" / "000003.jpg"
    missing.unlink()
    run_dir = tmp_path / "runs" / "rpn"
    command = ["train-rpn", str(copy / "train.json"), str(run_dir), "--backbone", "small", "--iterations", "1",
               "--workers", "0", "--device", "cpu"]

    def error_line(*extra):
        result = CliRunner().invoke(main, [*command, *extra])
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
        assert not run_dir.parent.exists()
        return errors[0]

    assert error_line() == (f"error: {missing}: missing image file (image id 3 of {copy / 'train.json'}; images are"
                            " looked for beside the annotation file; give --images FOLDER)")
    assert error_line("--images", str(copy)) == (
        f"error: {missing}: missing image file (image id 3 of {copy / 'train.json'})")
    shutil.copy(world / "train" / "000003.jpg", missing)
    missing_val = sorted((copy / "val").glob("*.jpg"))[0]
    missing_val.unlink()
    assert error_line("--val", str(copy / "val.json")).startswith(
        f"error: {missing_val}: missing image file (image id ")
    assert error_line("--val", str(copy / "val.json")).endswith(
        "; images are looked for beside the annotation file; give --val-images FOLDER)")


def test_a_file_without_base_boxes_is_refused_and_a_val_file_without_objects_says_so(world, reference, tmp_path):
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    annotations = json.loads((copy / "train.json").read_text())
    novel = {c["id"] for c in annotations["categories"] if c.get("split") == "novel"}
    annotations["annotations"] = [a for a in annotations["annotations"] if a["category_id"] in novel]
    (copy / "train.json").write_text(json.dumps(annotations))
    with pytest.raises(DataError, match=r"train.json: no base boxes to train the detector on \(split field: \d+ base"
                                        r" categories, none annotated\)$"):
        train(world, tmp_path / "rpn", annotations=str(copy / "train.json"))
    assert not (tmp_path / "rpn").exists()
    val = json.loads((copy / "val.json").read_text())
    (copy / "val.json").write_text(json.dumps({**val, "annotations": []}))
    recall = train_rpn.run_recall(reference[0], copy / "val.json", device="cpu")
    assert format_recall(recall["recall"]).endswith(f"boxes on {len(val['images'])} images: no objects to find")


def test_an_image_too_elongated_for_the_detector_is_found_before_any_work(world, reference, tmp_path):
    """The lowest scale of the jitter is the one checked in training; recall checks at the model's own size."""
    copy = tmp_path / "world"
    shutil.copytree(world, copy)
    annotations = json.loads((copy / "train.json").read_text())
    Image.new("RGB", (300, 4), "white").save(copy / "train" / "line.png")   # 4 px: 1 px at scale 1, 0 at 0.75
    annotations["images"].append({"id": 999, "file_name": "train/line.png", "width": 300, "height": 4})
    (copy / "train.json").write_text(json.dumps(annotations))
    run_dir = tmp_path / "runs" / "rpn"
    command = ["train-rpn", str(copy / "train.json"), str(run_dir), "--backbone", "small", "--min-size", "96",
               "--max-size", "96", "--iterations", "1", "--workers", "0", "--device", "cpu"]
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [
        f"error: {copy / 'train' / 'line.png'}: a 300x4 image is too elongated for the detector: resized to a"
        " shorter side of 72 and a longer side of at most 72 pixels, its shorter side is 0 pixels; crop it into"
        f" parts, or pad it (image id 999 of {copy / 'train.json'})"]
    assert not run_dir.parent.exists()
    recall = train_rpn.run_recall(reference[0], copy / "train.json", device="cpu")   # at scale 1 it fits
    assert recall["recall"]["all"]["objects"] > 0
    annotations["images"][-1].update(width=300, height=2)
    Image.new("RGB", (300, 2), "white").save(copy / "train" / "line.png")
    (copy / "train.json").write_text(json.dumps(annotations))
    with pytest.raises(DataError, match="line.png: a 300x2 image is too elongated for the detector"):
        train_rpn.run_recall(reference[0], copy / "train.json", device="cpu")


def test_recall_of_a_file_that_is_not_a_checkpoint_is_one_short_line(world, reference):
    metrics = reference[0] / METRICS_NAME
    result = CliRunner().invoke(main, ["recall", str(metrics), str(world / "val.json"), "--device", "cpu"])
    assert result.exit_code == 2 and "weights_only" not in result.output, result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [
        f"error: {metrics}: not a readable checkpoint (not a PyTorch file, it looks like JSON)"]


def test_inference_settings_may_change_on_a_finished_run(world, reference, tmp_path):
    run_dir = tmp_path / "copy"
    run_dir.mkdir()
    for name in (CHECKPOINT_NAME, MODEL_NAME):
        (run_dir / name).write_bytes((reference[0] / name).read_bytes())
    summary = train(world, run_dir, detector_options={**TINY, "box_nms_thresh": 0.6})
    assert summary["trained_steps"] == 0
    _, config, _ = load_detector(run_dir)
    assert config.box_nms_thresh == 0.6
    assert_same_weights(run_dir, reference[0])


def test_sigkill_at_a_random_step_then_rerun_gives_identical_weights(world, reference, tmp_path):
    run_dir = tmp_path / "killed"
    process = start_driver(tmp_path, settings(world, run_dir))
    wait_for_metric_lines(process, run_dir, random.Random(7).randint(5, ITERATIONS - 8))
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    saved = load_checkpoint(run_dir / CHECKPOINT_NAME)     # a complete checkpoint or none, never half of one
    assert saved is not None and 4 <= saved["step"] < ITERATIONS
    assert not (run_dir / MODEL_NAME).exists()
    unfinished = (f"{run_dir}: train-rpn has not finished (step {saved['step']} of {ITERATIONS}; model.pt is written"
                  f" at its end); rerun train-rpn to finish it, or pass {run_dir / CHECKPOINT_NAME} to use its last"
                  " checkpoint as it is")
    with pytest.raises(VildError) as refused:               # the folder alone does not stand for a half-trained model
        load_detector(run_dir)
    assert str(refused.value) == unfinished
    result = CliRunner().invoke(main, ["recall", str(run_dir), str(world / "val.json"), "--device", "cpu"])
    assert result.exit_code == 2 and result.output.splitlines()[-1] == f"error: {unfinished}", result.output
    _, _, identity = load_detector(run_dir / CHECKPOINT_NAME)   # named, the training checkpoint is used as it is
    assert identity["checkpoint"] == CHECKPOINT_NAME and identity["step"] == saved["step"]

    summary = train(world, run_dir)
    assert summary["steps"] == ITERATIONS and summary["trained_steps"] == ITERATIONS - saved["step"]
    assert metric_steps(run_dir) == list(range(1, ITERATIONS + 1))
    assert_same_weights(run_dir, reference[0])


def test_sigterm_saves_and_the_rerun_finishes(world, reference, tmp_path):
    run_dir = tmp_path / "stopped"
    # Data-loader workers too: they must leave the signal to the main process, which saves and stops.
    process = start_driver(tmp_path, settings(world, run_dir, workers=1, checkpoint_every=1000))
    wait_for_metric_lines(process, run_dir, 3)
    os.killpg(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 3, output
    stopped_at = int(output.split("STOPPED")[1].split()[0])
    assert 3 <= stopped_at < ITERATIONS
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["step"] == stopped_at

    summary = train(world, run_dir)
    assert summary["steps"] == ITERATIONS
    assert_same_weights(run_dir, reference[0])


def test_torchrun_two_processes_train_what_one_process_trains(world, tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    short = dict(iterations=4, device="cpu")
    single = tmp_path / "single"
    train(world, single, **short)

    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(script), json.dumps(settings(world, tmp_path / "ddp", **short))]
    run_to_end(command)

    expected = final_weights(single)
    weights = final_weights(tmp_path / "ddp")
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert metric_steps(tmp_path / "ddp") == [1, 2, 3, 4]


# --------------------------------------------------------------------------- recall

def test_recall_stage_counts_base_and_novel_objects_and_reuses_its_result(world, reference):
    run_dir, _ = reference
    out = run_dir.parent / "recall-test.json"
    result = train_rpn.run_recall(run_dir, world / "val.json", top_k=20, device="cpu", out=out)
    val = json.loads((world / "val.json").read_text())
    base_ids = {c["id"] for c in val["categories"] if c["split"] == "base"}
    base = sum(a["category_id"] in base_ids for a in val["annotations"])
    recall = result["recall"]
    assert recall["top_k"] == 20 and recall["images"] == 4
    assert recall["base"]["objects"] == base and recall["novel"]["objects"] == len(val["annotations"]) - base
    for group in ("base", "novel", "all"):
        assert 0.0 <= recall[group]["AR@0.5:0.95"] <= recall[group]["recall@0.5"] <= 1.0
    assert result["detector"]["step"] == ITERATIONS
    assert json.loads(out.read_text()) == result
    assert train_rpn.run_recall(run_dir, world / "val.json", top_k=20, device="cpu", out=out) == result
    proposals = train_rpn.run_recall(run_dir, world / "val.json", top_k=20, device="cpu", source="proposals")
    assert proposals["recall"]["all"]["objects"] == recall["all"]["objects"]
    for not_a_report in ("[1, 2]", "some notes"):   # a user's file of that name: named, kept, not replaced
        out.write_text(not_a_report)
        with pytest.raises(DataError, match="recall-test.json: not a recall report"):
            train_rpn.run_recall(run_dir, world / "val.json", top_k=20, device="cpu", out=out)
        assert out.read_text() == not_a_report


def test_train_with_val_writes_recall_json(world, reference, tmp_path):
    run_dir = tmp_path / "with-val"
    run_dir.mkdir()
    for name in (CHECKPOINT_NAME, MODEL_NAME):
        (run_dir / name).write_bytes((reference[0] / name).read_bytes())
    summary = train(world, run_dir, val=str(world / "val.json"), top_k=50)
    written = json.loads((run_dir / RECALL_NAME).read_text())
    assert summary["recall"] == written and written["recall"]["top_k"] == 50


def test_a_warm_up_as_long_as_the_run_is_named_in_a_warning(caplog):
    """A short run on a small dataset with the default warm-up would never reach its lr, with no word said."""
    hyper = {"iterations": 10, "batch_size": 4, "lr": 0.02, "warmup": 500, "schedule": "cosine"}
    with caplog.at_level(logging.WARNING, logger="vild_pipe.pipeline.training_run"):
        check_schedule(hyper)
        assert "--warmup 500 is not shorter than --iterations 10: the lr never reaches --lr 0.02" in caplog.text
        caplog.clear()
        check_schedule({**hyper, "warmup": 2})
    assert not caplog.text


def test_a_resnet50_step_the_cpu_memory_cannot_hold_is_warned_of(monkeypatch, caplog):
    """The preset's defaults are a GPU's: 16 images of 800 px need ~31 GB a step on the CPU (measured), and the
    kernel kills such a run at its first step without a word."""
    monkeypatch.setattr(train_rpn, "_physical_memory", lambda: 24 * 2**30)
    r50, small = DetectorConfig.preset("resnet50-fpn"), DetectorConfig.preset("small")
    with caplog.at_level(logging.WARNING, logger=train_rpn.__name__):
        train_rpn._warn_of_cpu_memory(r50, 16, torch.device("cpu"))
        assert len(caplog.records) == 1
        message = caplog.records[0].getMessage()
        assert message.startswith("train-rpn: a resnet50-fpn step of 16 images at 800 px on the CPU needs about 28.")
        assert "more than this machine's 24.0 GiB" in message and "--batch-size 10 fits" in message
        caplog.clear()
        train_rpn._warn_of_cpu_memory(r50, 8, torch.device("cpu"))
        train_rpn._warn_of_cpu_memory(small, 64, torch.device("cpu"))
        train_rpn._warn_of_cpu_memory(r50, 16, torch.device("cuda"))
    assert not caplog.records
