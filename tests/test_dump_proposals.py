"""dump-proposals: proposals + RoIAlign features per image into the sharded cache, on a tiny world and detector.

The single-process run below is the reference every other way of filling the cache must match array for
array: a run killed with SIGKILL and resumed, one stopped with SIGTERM and resumed, torchrun with two ranks,
two `--shard i/n` jobs, a job whose shard another run held, other batch sizes and DataLoader worker counts.
Every run uses one CPU thread (torchrun's default): the CPU kernels partition matmuls by thread, so the thread
count moves results in the last bits.
"""
import inspect
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from vild_pipe.cli import main
from vild_pipe.data.coco import CocoDataset
from vild_pipe.data.splits import CategorySplit
from vild_pipe.errors import DataError, VildError
from vild_pipe.pipeline.checkpoint import CHECKPOINT_NAME, save_checkpoint
from vild_pipe.pipeline.detector import DetectorConfig, build_detector, load_detector, save_final_model
from vild_pipe.pipeline.proposals import (
    PROPOSAL_NMS_THRESHOLD, dump_settings, feature_shape, features_for_boxes, propose_with_features,
)
from vild_pipe.pipeline.shard_work import ShardsHeldElsewhere
from vild_pipe.pipeline.shards import FOREIGN_STALE_S, CacheFolder, sha256_file
from vild_pipe.stages import dump_proposals, make_synthetic

from child_processes import child_env, driver_command, run_to_end

TINY_DETECTOR = dict(small_widths=(8, 16, 16, 32), fpn_channels=16, min_size=96, max_size=96,
                     rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, representation_size=64)
TOP_N = 20
IMAGES_PER_SHARD = 2
TRAIN_IMAGES = 8
FIELDS = ("boxes", "scores", "is_gt", "features")

# Runs the stage in a child process (plain, under torchrun, or to be killed) and reports a VildError as the CLI
# does (one `error:` line, exit 2). DUMP_TEST_SLOW_S slows each batch down so that a test can act between two
# shards; once the file DUMP_TEST_STALL_WHEN exists, each batch creates DUMP_TEST_STALLED and stalls, so that
# a test can signal the stage while it computes a shard.
DRIVER = '''
import json, logging, os, sys, time
from pathlib import Path
from vild_pipe.errors import VildError
from vild_pipe.stages import dump_proposals

slow = float(os.environ.get("DUMP_TEST_SLOW_S", "0"))
stall_when = os.environ.get("DUMP_TEST_STALL_WHEN")
if slow or stall_when:
    propose = dump_proposals.propose_with_features
    def slowed(*args, **kwargs):
        time.sleep(slow)
        if stall_when and os.path.exists(stall_when):
            Path(os.environ["DUMP_TEST_STALLED"]).touch()
            time.sleep(120)
        return propose(*args, **kwargs)
    dump_proposals.propose_with_features = slowed
logging.basicConfig(level=logging.INFO)
try:
    summary = dump_proposals.run(**json.loads(sys.argv[1]))
except VildError as err:
    print(f"error: {err}", flush=True)
    sys.exit(2)
print("SUMMARY", json.dumps(summary))
'''


# ------------------------------------------------------------------------------------------------ fixtures


pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_torchrun_env")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    path = tmp_path_factory.mktemp("world")
    make_synthetic.run(path, train_images=TRAIN_IMAGES, val_images=4, image_size=96, workers=1)
    return path


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    torch.manual_seed(0)
    config = DetectorConfig.preset("small", **TINY_DETECTOR)
    run_dir = tmp_path_factory.mktemp("rpn")
    save_final_model(run_dir, build_detector(config), config, step=0)
    return run_dir


def stage_kwargs(world, detector, out, **overrides):
    kwargs = dict(detector=str(detector), annotations=str(world / "train.json"), out=str(out), top_n=TOP_N,
                  images_per_shard=IMAGES_PER_SHARD, batch_size=3, device="cpu", workers=0, threads=1)
    return {**kwargs, **overrides}


@pytest.fixture(scope="module")
def reference(world, detector, tmp_path_factory):
    """One uninterrupted single-process run over the train split, with DataLoader workers."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    summary = dump_proposals.run(**stage_kwargs(world, detector, out, workers=2))
    return out, summary


def read_cache(path) -> dict[int, dict[str, np.ndarray]]:
    """{image_id: rows} of every shard, read with plain h5py as the README tells a user to."""
    rows = {}
    for file in sorted(Path(path).glob("shard-*.h5")):
        with h5py.File(file, "r") as h5:
            row_start = h5["row_start"][()]
            arrays = {name: h5[name][()] for name in FIELDS}
            for k, image_id in enumerate(h5["image_id"][()]):
                assert int(image_id) not in rows, f"image {image_id} is in two shards"
                rows[int(image_id)] = {name: a[row_start[k]:row_start[k + 1]] for name, a in arrays.items()}
    return rows


def assert_same_cache(path, expected_path):
    got, expected = read_cache(path), read_cache(expected_path)
    assert sorted(got) == sorted(expected)
    for image_id, rows in expected.items():
        for name, array in rows.items():
            assert got[image_id][name].dtype == array.dtype
            np.testing.assert_array_equal(got[image_id][name], array, err_msg=f"image {image_id} {name}")


def load_images(world, ids, split="train"):
    dataset = CocoDataset.load(world / f"{split}.json")
    return [torch.from_numpy(np.array(dataset.open_image(i))).permute(2, 0, 1).contiguous() for i in ids]


# ------------------------------------------------------------------------------------------------ library


def test_propose_with_features_is_per_image_exact_and_restores_the_model(world, detector):
    model, config, _ = load_detector(detector, "cpu")
    images = load_images(world, [1, 2, 3])
    gt = [torch.tensor([[10.0, 12.0, 50.0, 61.0]]), torch.zeros((0, 4)), None]

    batch = propose_with_features(model, images, top_n=TOP_N, min_box_side=4.0, extra_boxes=gt)
    for k, image in enumerate(images):
        alone = propose_with_features(model, [image], top_n=TOP_N, min_box_side=4.0, extra_boxes=[gt[k]])[0]
        for name in ("boxes", "scores", "features"):
            assert torch.equal(getattr(alone, name), getattr(batch[k], name)), name
        result = batch[k]
        assert 0 < len(result.boxes) <= TOP_N
        assert result.boxes.dtype == torch.float32 and result.scores.dtype == torch.float32
        assert result.features.dtype == torch.float16 and result.features.shape[1:] == (16, 7, 7)
        assert torch.all(result.boxes >= 0) and torch.all(result.boxes[:, 2:] <= 96)
        assert torch.all(result.boxes[:, 2:] - result.boxes[:, :2] >= 4.0)
        assert torch.all(result.scores[:-1] >= result.scores[1:])
    assert batch[0].extra_features.shape == (1, 16, 7, 7) and batch[1].extra_features.shape == (0, 16, 7, 7)
    assert batch[2].extra_features is None

    # The features of a proposal are what features_for_boxes pools for its (original-pixel) box, and a
    # float image gives what its uint8 original gives.
    pooled = features_for_boxes(model, [images[0].float() / 255], [torch.cat([gt[0], batch[0].boxes[:3]])])[0]
    torch.testing.assert_close(pooled[0], batch[0].extra_features[0], rtol=0, atol=0)
    torch.testing.assert_close(pooled[1:].float(), batch[0].features[:3].float(), rtol=0, atol=2e-3)

    # The dump's own settings are undone: the model keeps its inference config and mode afterwards.
    assert (model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img) == (
        config.box_score_thresh, config.box_nms_thresh, config.box_detections_per_img)
    model.train()
    with dump_settings(model, 0.3):
        assert not model.training and model.roi_heads.nms_thresh == 0.3
    assert model.training and model.roi_heads.nms_thresh == config.box_nms_thresh
    assert feature_shape(model) == (16, 7, 7)


def test_two_overlapping_objects_both_stay_at_the_default_class_agnostic_nms():
    """A rider on a horse: two boxes at IoU 0.625 that the detector finds equally sure. At the default
    (0.7, as the RPN's) both reach the cache for the head to name; at 0.5 one would be gone before any
    category is known."""
    model = build_detector(DetectorConfig.preset("small", **TINY_DETECTOR)).eval()
    boxes = torch.tensor([[0.0, 0.0, 80.0, 80.0], [0.0, 0.0, 80.0, 50.0]])

    class FixedProposals(torch.nn.Module):
        def forward(self, images, features, targets=None):
            return [boxes.clone() for _ in images.image_sizes], {}

    class SureObject(torch.nn.Module):          # object logit high, box regression zero
        def forward(self, x):
            return torch.tensor([[-5.0, 5.0]]).expand(len(x), 2), torch.zeros(len(x), 8)

    model.rpn, model.roi_heads.box_predictor = FixedProposals(), SureObject()
    image = torch.zeros(3, 96, 96, dtype=torch.uint8)
    kept = propose_with_features(model, [image], top_n=10, nms_threshold=PROPOSAL_NMS_THRESHOLD)[0].boxes
    torch.testing.assert_close(kept, boxes)
    assert len(propose_with_features(model, [image], top_n=10, nms_threshold=0.5)[0].boxes) == 1
    assert inspect.signature(propose_with_features).parameters["nms_threshold"].default == PROPOSAL_NMS_THRESHOLD


def test_top_n_and_min_box_side_cut_the_list(world, detector):
    model, _, _ = load_detector(detector, "cpu")
    image = load_images(world, [4])
    full = propose_with_features(model, image, top_n=1000, min_box_side=0.0)[0]
    top = propose_with_features(model, image, top_n=5, min_box_side=0.0)[0]
    assert len(full.boxes) > 5 and torch.equal(top.boxes, full.boxes[:5])
    sides = (full.boxes[:, 2:] - full.boxes[:, :2]).min(dim=1).values
    cut = float(sides.median())
    large = propose_with_features(model, image, top_n=1000, min_box_side=cut)[0]
    assert torch.equal(large.boxes, full.boxes[sides >= cut])
    assert len(large.boxes) < len(full.boxes)


# ------------------------------------------------------------------------------------------------ the stage


def test_rows_per_image_gt_only_base_and_plain_h5py_read(world, detector, reference):
    out, summary = reference
    dataset = CocoDataset.load(world / "train.json")
    base_view = dataset.training_view("auto")
    model, _, identity = load_detector(detector, "cpu")
    rows = read_cache(out)
    assert sorted(rows) == [record.id for record in dataset.images]
    assert summary["complete"] and summary["images"] == TRAIN_IMAGES
    assert summary["num_shards"] == TRAIN_IMAGES // IMAGES_PER_SHARD
    novel_boxes_seen = 0
    for record in dataset.images:
        got = rows[record.id]
        proposals = ~got["is_gt"]
        assert 0 < proposals.sum() <= TOP_N and not got["is_gt"][:proposals.sum()].any()  # proposals come first
        assert np.all(got["boxes"] >= 0) and np.all(got["boxes"][:, [0, 2]] <= record.width)
        assert np.all(got["boxes"][:, [1, 3]] <= record.height)
        assert np.all(got["boxes"][proposals, 2:] - got["boxes"][proposals, :2] >= 2.0)
        assert np.all(np.diff(got["scores"][proposals]) <= 0)  # best first
        assert got["features"].dtype == np.float16 and got["features"].shape[1:] == (16, 7, 7)
        assert got["boxes"].dtype == np.float32 and got["scores"].dtype == np.float32

        base_boxes, _, _ = base_view.annotations_for(record.id)
        all_boxes, _, _ = dataset.annotations_for(record.id)
        novel_boxes_seen += len(all_boxes) - len(base_boxes)
        np.testing.assert_array_equal(got["boxes"][got["is_gt"]], base_boxes)
        assert np.all(got["scores"][got["is_gt"]] == 1.0)
        gt_features = features_for_boxes(model, load_images(world, [record.id]), [torch.from_numpy(base_boxes)])[0]
        np.testing.assert_array_equal(got["features"][got["is_gt"]], gt_features.numpy())
    assert novel_boxes_seen > 0, "the world should have novel boxes for this test to mean anything"

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and [s["shard"] for s in manifest["shards"]] == [0, 1, 2, 3]
    assert manifest["inputs"]["detector"] == identity
    assert manifest["inputs"]["annotations"] == {"file": "train.json", "sha256": sha256_file(world / "train.json")}
    assert manifest["config"]["add_gt"] is True and manifest["config"]["split"]["spec"] == "field"
    assert manifest["config"]["top_n"] == TOP_N and manifest["fields"]["features"]["shape"] == [16, 7, 7]
    assert summary["bytes_per_image"] == pytest.approx(sum(s["bytes"] for s in manifest["shards"]) / TRAIN_IMAGES)


def test_val_split_has_no_gt_rows_by_default_and_add_gt_is_explicit(world, detector, tmp_path):
    kwargs = stage_kwargs(world, detector, tmp_path / "val", annotations=str(world / "val.json"), top_n=5)
    dump_proposals.run(**kwargs)
    rows = read_cache(tmp_path / "val")
    assert len(rows) == 4 and not any(r["is_gt"].any() for r in rows.values())
    assert json.loads((tmp_path / "val" / "manifest.json").read_text())["config"]["split"] is None

    dump_proposals.run(**{**kwargs, "out": str(tmp_path / "val-gt"), "add_gt": True})
    base_view = CocoDataset.load(world / "val.json").training_view("auto")
    with_gt = read_cache(tmp_path / "val-gt")
    for image_id, got in with_gt.items():
        np.testing.assert_array_equal(got["boxes"][got["is_gt"]], base_view.annotations_for(image_id)[0])
        np.testing.assert_array_equal(got["features"][~got["is_gt"]], rows[image_id]["features"])


def test_the_file_the_detector_was_trained_on_gets_ground_truth_rows_of_its_split_whatever_its_name(
        world, tmp_path, caplog):
    """Users' own files seldom say "train"; train-rpn records the sha256 and split of the file it trained on,
    and the rows' positives are then the detector's own base categories, even where `auto` would differ."""
    shutil.copy(world / "train.json", tmp_path / "mine.json")
    auto = CocoDataset.load(tmp_path / "mine.json").resolve_split("auto")
    own = CategorySplit(auto.base_ids[1:], tuple(sorted((*auto.novel_ids, auto.base_ids[0]))), spec="novel:mine")
    config = DetectorConfig.preset("small", **TINY_DETECTOR)
    trained = {"data": {"annotations_sha256": sha256_file(tmp_path / "mine.json"), "split": own.to_json()}}
    save_final_model(tmp_path / "rpn", build_detector(config), config, step=0, training=trained)
    caplog.set_level(logging.INFO, logger="vild_pipe.stages.dump_proposals")
    kwargs = stage_kwargs(world, tmp_path / "rpn", tmp_path / "mine", annotations=str(tmp_path / "mine.json"),
                          images=str(world), top_n=3)
    dump_proposals.run(**kwargs)
    made = json.loads((tmp_path / "mine" / "manifest.json").read_text())["config"]
    assert made["add_gt"] is True and made["split"] == own.to_json()
    assert "appending ground-truth rows: the detector was trained on this annotation file" in caplog.text
    assert "the ground-truth rows follow split" not in caplog.text
    dump_proposals.run(**{**kwargs, "out": str(tmp_path / "auto"), "split": "auto"})   # auto: the detector's own
    assert "the ground-truth rows follow split" not in caplog.text
    dump_proposals.run(**{**kwargs, "out": str(tmp_path / "other-split"), "split": "field"})
    assert (f"mine.json: the detector was trained on this file with split novel:mine ({len(own.base_ids)} base"
            f" categories), the ground-truth rows follow split field ({len(auto.base_ids)})") in caplog.text
    rows = read_cache(tmp_path / "mine")
    for image_id, got in rows.items():
        expected = CocoDataset.load(tmp_path / "mine.json").training_view(own).annotations_for(image_id)[0]
        np.testing.assert_array_equal(got["boxes"][got["is_gt"]], expected)
    caplog.clear()
    dump_proposals.run(**{**kwargs, "annotations": str(world / "val.json"), "out": str(tmp_path / "val")})
    assert json.loads((tmp_path / "val" / "manifest.json").read_text())["config"]["add_gt"] is False
    assert "not appending ground-truth rows: the detector was not trained on this annotation file" in caplog.text


def test_settings_left_out_of_a_rerun_keep_the_values_of_the_cache_being_resumed(world, detector, tmp_path, caplog):
    """The same command resumes a cache made before a default changed (NMS 0.5 then, 0.7 now)."""
    kwargs = stage_kwargs(world, detector, tmp_path / "old", annotations=str(world / "val.json"), top_n=3)
    dump_proposals.run(**{**kwargs, "nms_threshold": 0.5, "add_gt": True})
    made = json.loads((tmp_path / "old" / "manifest.json").read_text())
    caplog.set_level(logging.INFO, logger="vild_pipe.stages.dump_proposals")
    summary = dump_proposals.run(**kwargs)
    assert json.loads((tmp_path / "old" / "manifest.json").read_text()) == made and summary["shards_written"] == []
    assert "class-agnostic NMS at 0.5, as the cache being resumed was made" in caplog.text
    assert "appending ground-truth rows: as in the cache being resumed" in caplog.text
    dump_proposals.run(**{**kwargs, "out": str(tmp_path / "new")})
    fresh = json.loads((tmp_path / "new" / "manifest.json").read_text())["config"]
    assert (fresh["nms_threshold"], fresh["add_gt"]) == (PROPOSAL_NMS_THRESHOLD, False)
    dump_proposals.run(**{**kwargs, "overwrite": True})
    assert json.loads((tmp_path / "old" / "manifest.json").read_text())["config"] == fresh


def test_killed_run_resumes_to_the_same_cache_and_never_shows_a_partial_shard(world, detector, reference, tmp_path):
    out = tmp_path / "cache"
    kwargs = stage_kwargs(world, detector, out, batch_size=1, workers=1)
    child = subprocess.Popen(driver_command(tmp_path, DRIVER, kwargs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=child_env(DUMP_TEST_SLOW_S="0.4"))
    checked = set()
    try:
        deadline = time.monotonic() + 60
        while not (out / "shard-00000.json").exists():
            assert child.poll() is None, child.stdout.read()
            assert time.monotonic() < deadline, "the first shard never completed"
            for name in os.listdir(out) if out.exists() else []:
                if re.fullmatch(r"shard-\d+\.h5", name):  # whatever a reader can see is a whole shard
                    with h5py.File(out / name, "r") as h5:
                        assert h5["row_start"][-1] == len(h5["boxes"]) == len(h5["features"]) > 0
                        assert len(h5["image_id"]) == IMAGES_PER_SHARD
                    checked.add(name)
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    folder = CacheFolder.open(out)
    done = folder.complete_shards()
    assert 0 in done and len(done) < folder.num_shards, "the kill should land between the first and the last shard"
    assert not (out / "manifest.json").read_text().count('"complete": true')
    first_shard_inode = os.stat(out / "shard-00000.h5").st_ino

    summary = dump_proposals.run(**stage_kwargs(world, detector, out, batch_size=4))
    assert summary["complete"] and 0 not in summary["shards_written"]
    assert os.stat(out / "shard-00000.h5").st_ino == first_shard_inode
    assert not [n for n in os.listdir(out) if n.endswith((".tmp", ".lock"))]
    assert_same_cache(out, reference[0])


def wait_for(path: Path, child: subprocess.Popen, seconds: float = 90) -> None:
    """Until `path` exists; a test failure with the child's output if it ends or takes too long first."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        if child.poll() is not None:
            pytest.fail(f"the stage ended before {path.name} appeared:\n{child.communicate()[0]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{path.name} did not appear within {seconds:.0f} s")
        time.sleep(0.01)


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_releases_every_lock_exits_with_one_line_and_the_rerun_completes_the_cache(world, detector,
                                                                                             reference, tmp_path):
    """A Slurm preemption: SIGTERM to the stage and its loader workers while it computes a shard. Nothing may
    hold a shard after it (a lock a requeued job on another node would respect for FOREIGN_STALE_S)."""
    out, stalled = tmp_path / "cache", tmp_path / "stalled"
    kwargs = stage_kwargs(world, detector, out, batch_size=1, workers=1)
    env = child_env(DUMP_TEST_STALL_WHEN=str(out / "shard-00000.json"), DUMP_TEST_STALLED=str(stalled))
    child = subprocess.Popen(driver_command(tmp_path, DRIVER, kwargs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, env=env, start_new_session=True)
    try:
        wait_for(stalled, child)
        os.killpg(child.pid, signal.SIGTERM)
        output, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    deadline = time.monotonic() + 30
    while process_group_alive(child.pid):
        assert time.monotonic() < deadline, "a loader worker outlived the stopped stage"
        time.sleep(0.05)

    folder = CacheFolder.open(out)
    done = folder.complete_shards()
    assert 0 in done and len(done) < folder.num_shards, done
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert child.returncode == 2 and "Traceback" not in output, output
    published = f"{len(done)} shard{'s' if len(done) > 1 else ''}"
    assert errors == [f"error: {out}: stopped by SIGTERM; {published} published by this run ({len(done)} of"
                      f" {folder.num_shards} complete), rerun the same command to resume"], output
    assert not [n for n in os.listdir(out) if n.endswith((".tmp", ".lock"))], os.listdir(out)
    assert sorted(n for n in os.listdir(out) if n.endswith(".h5")) == [f"shard-{i:05d}.h5" for i in done]

    summary = dump_proposals.run(**stage_kwargs(world, detector, out, batch_size=4))
    assert summary["complete"] and sorted(summary["shards_written"]) == sorted(set(range(4)) - set(done))
    assert_same_cache(out, reference[0])


def write_foreign_lock(folder: Path, index: int) -> Path:
    """A fresh lock of shard `index` as ShardLock writes it, held by a process of another host: live for
    FOREIGN_STALE_S, as a job killed there just now looks."""
    path = folder / f"shard-{index:05d}.lock"
    holder = {"pid": 4242, "host": "node7", "since": "2026-01-01T00:00:00+00:00", "pid_start": None, "token": "ab"}
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder))
    return path


def test_a_shard_another_live_run_holds_fails_its_worker_until_the_rerun_writes_it(world, detector, reference,
                                                                                   tmp_path, caplog):
    """The defect this guards against: a Slurm job requeued on another node within FOREIGN_STALE_S of its kill
    found its shard locked, skipped it, and exited 0 with the cache incomplete."""
    out = tmp_path / "cache"
    lock = write_foreign_lock(out, 2)
    other = dump_proposals.run(**stage_kwargs(world, detector, out, shard="1/2"))
    assert other["shards_written"] == [1, 3], "a lock of another worker's shard is no concern of this one"

    args = ["dump-proposals", detector, world / "train.json", out, "--top-n", TOP_N, "--images-per-shard",
            IMAGES_PER_SHARD, "--batch-size", 3, "--device", "cpu", "--workers", 0, "--threads", 1, "--shard", "0/2"]
    with caplog.at_level(logging.WARNING, logger="vild_pipe"):
        result = CliRunner().invoke(main, [str(arg) for arg in args])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, (result.output, result.exception)
    holder = "pid 4242 on node7 since 2026-01-01T00:00:00+00:00"
    assert errors[0] == (f"error: {out}: the cache is not complete: another run is writing shard-00002 ({holder});"
                         f" 1 shard published by this run. Rerun the same command when that run has finished (the"
                         f" lock of a run killed on another host counts as stale {FOREIGN_STALE_S / 60:.0f} min"
                         " after its last heartbeat)")
    assert f"shard-00002 of this worker is not complete: another run is writing it ({holder})" in caplog.messages
    assert CacheFolder.open(out).complete_shards() == [0, 1, 3] and lock.exists()

    with pytest.raises(ShardsHeldElsewhere, match="shard-00002"):   # the same until that run ends
        dump_proposals.run(**stage_kwargs(world, detector, out, shard="0/2"))
    lock.unlink()
    summary = dump_proposals.run(**stage_kwargs(world, detector, out, shard="0/2"))
    assert summary["shards_written"] == [2] and summary["complete"]
    assert_same_cache(out, reference[0])


def test_torchrun_two_ranks_fill_the_same_cache_as_one_process(world, detector, reference, tmp_path):
    out = tmp_path / "cache"
    output = run_to_end(driver_command(tmp_path, DRIVER, stage_kwargs(world, detector, out), torchrun=True))
    assert output.count("SUMMARY") == 2
    assert_same_cache(out, reference[0])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and [s["shard"] for s in manifest["shards"]] == [0, 1, 2, 3]


def test_two_shard_jobs_fill_one_cache_and_the_last_one_finalizes_it(world, detector, reference, tmp_path, caplog):
    # Concurrent writers are the torchrun test's business; here the split of the work and the final manifest.
    out = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="vild_pipe"):
        first = dump_proposals.run(**stage_kwargs(world, detector, out, shard="1/2", batch_size=2))
    assert first["shards_written"] == [1, 3] and not first["complete"]
    measured = [r.getMessage() for r in caplog.records if "measured" in r.getMessage()]
    assert len(measured) == 1 and measured[0].startswith(f"{out}: 2 of 4 shards complete, ")
    assert measured[0].endswith("; the cache is finished when the other workers' shards are written")
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    local = tmp_path / "node-local"   # the second job reads its own copies: the same inputs by content
    local.mkdir()
    shutil.copy(detector / "model.pt", local / "rpn-copy.pt")
    (local / "train-link.json").symlink_to(world / "train.json")
    second = dump_proposals.run(**stage_kwargs(world, local / "rpn-copy.pt", out, shard="0/2", batch_size=5,
                                               annotations=str(local / "train-link.json"), images=str(world)))
    assert second["shards_written"] == [0, 2] and second["complete"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and [s["shard"] for s in manifest["shards"]] == [0, 1, 2, 3]
    assert_same_cache(out, reference[0])


def test_a_worker_dealt_no_shard_says_so(world, detector, tmp_path, caplog):
    out = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="vild_pipe"):
        summary = dump_proposals.run(**stage_kwargs(world, detector, out, shard="1/2", images_per_shard=100))
    assert summary["shards_written"] == [] and not summary["complete"]
    messages = [r.getMessage() for r in caplog.records]
    assert "job 1 of 2: no shards for this worker (the cache has 1)" in messages
    assert not [m for m in messages if "already complete" in m]


def test_bad_image_names_the_file_keeps_earlier_shards_and_can_be_skipped(world, detector, reference, tmp_path):
    dataset = CocoDataset.load(world / "train.json")
    bad = dataset.images[3]  # second image of shard 1
    images = tmp_path / "images"
    (images / "train").mkdir(parents=True)
    for record in dataset.images:
        target = images / record.file_name
        if record.id == bad.id:
            target.write_bytes(b"not a jpeg")
        else:
            target.symlink_to(world / record.file_name)

    out = tmp_path / "cache"
    kwargs = stage_kwargs(world, detector, out, images=str(images), workers=1)
    with pytest.raises(DataError) as caught:
        dump_proposals.run(**kwargs)
    message = str(caught.value)
    assert str(images / bad.file_name) in message and "\n" not in message and "--skip-bad-images" in message
    assert CacheFolder.open(out).complete_shards() == [0]
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-00000.h5", "shard-00000.json"]
    expected = read_cache(reference[0])
    for image_id, rows in read_cache(out).items():
        np.testing.assert_array_equal(rows["features"], expected[image_id]["features"])

    summary = dump_proposals.run(**kwargs, skip_bad_images=True)
    assert summary["complete"] and summary["images"] == TRAIN_IMAGES - 1
    assert [s["image_id"] for s in summary["skipped_images"]] == [bad.id]
    manifest = json.loads((out / "manifest.json").read_text())
    skipped = [skip for shard in manifest["shards"] for skip in shard["skipped_images"]]
    assert [s["image_id"] for s in skipped] == [bad.id] and bad.file_name in skipped[0]["reason"]
    rows = read_cache(out)
    assert bad.id not in rows and len(rows) == TRAIN_IMAGES - 1


def test_an_unfinished_detector_run_folder_is_refused_and_its_checkpoint_used_when_named(world, detector, tmp_path):
    """A train-rpn run stopped before its end has last.pt but no model.pt: its folder is refused with the way on,
    before anything is made; the file itself, named, is used as it is."""
    finished = torch.load(detector / "model.pt", weights_only=True)
    run_dir = tmp_path / "rpn-int"
    run_dir.mkdir()
    save_checkpoint(run_dir / CHECKPOINT_NAME, {"step": 62, "model": finished["model"],
                                                "config": {"detector": finished["detector"], "iterations": 300}})
    out = tmp_path / "cache"
    options = [str(world / "val.json"), str(out), "--top-n", "4", "--device", "cpu", "--workers", "0",
               "--threads", "1"]
    result = CliRunner().invoke(main, ["dump-proposals", str(run_dir), *options])
    assert result.exit_code == 2 and result.output.splitlines() == [
        f"error: {run_dir}: train-rpn has not finished (step 62 of 300; model.pt is written at its end); rerun"
        f" train-rpn to finish it, or pass {run_dir / CHECKPOINT_NAME} to use its last checkpoint as it is"]
    assert not out.exists()
    result = CliRunner().invoke(main, ["dump-proposals", str(run_dir / CHECKPOINT_NAME), *options])
    assert result.exit_code == 0, result.output
    assert CacheFolder.open(out).inputs["detector"]["checkpoint"] == CHECKPOINT_NAME


def test_other_config_is_refused_and_overwrite_replaces_the_cache(world, detector, tmp_path):
    out = tmp_path / "cache"
    kwargs = stage_kwargs(world, detector, out, annotations=str(world / "val.json"), top_n=4)
    dump_proposals.run(**kwargs)
    before = read_cache(out)
    with pytest.raises(VildError) as caught:
        dump_proposals.run(**{**kwargs, "top_n": 2})
    assert str(caught.value) == (f"{out}: cache was made with a different config or inputs (config.top_n: 4 -> 2);"
                                 " use another folder or --overwrite")

    other = tmp_path / "other-rpn"
    config = DetectorConfig.preset("small", **TINY_DETECTOR)
    torch.manual_seed(1)
    save_final_model(other, build_detector(config), config, step=0)
    with pytest.raises(VildError) as caught:
        dump_proposals.run(**{**kwargs, "detector": str(other)})
    old, new = sha256_file(detector / "model.pt")[:12], sha256_file(other / "model.pt")[:12]
    assert f"(inputs.detector.sha256: {old} -> {new})" in str(caught.value)

    dump_proposals.run(**{**kwargs, "top_n": 2, "overwrite": True})
    after = read_cache(out)
    assert sorted(after) == sorted(before)
    for image_id, rows in after.items():
        assert len(rows["boxes"]) == 2
        np.testing.assert_array_equal(rows["boxes"], before[image_id]["boxes"][:2])
    assert json.loads((out / "manifest.json").read_text())["config"]["top_n"] == 2


def test_an_image_too_elongated_for_the_detector_is_one_line_and_can_be_skipped(world, detector, tmp_path):
    """torch would fail deep in the model (a side resized to 0 pixels) with a traceback, --skip-bad-images or not."""
    annotations = json.loads((world / "val.json").read_text())
    (tmp_path / "val").symlink_to(world / "val")
    Image.new("RGB", (300, 2), "white").save(tmp_path / "line.png")
    annotations["images"].append({"id": 999, "file_name": "line.png", "width": 300, "height": 2})
    (tmp_path / "val.json").write_text(json.dumps(annotations))
    kwargs = stage_kwargs(world, detector, tmp_path / "cache", annotations=str(tmp_path / "val.json"), workers=1)
    with pytest.raises(DataError) as raised:
        dump_proposals.run(**kwargs)
    assert str(raised.value).startswith(f"{tmp_path / 'line.png'}: a 300x2 image is too elongated for the"
                                        " detector") and "\n" not in str(raised.value)
    summary = dump_proposals.run(**kwargs, skip_bad_images=True)
    assert summary["complete"] and [s["image_id"] for s in summary["skipped_images"]] == [999]


def test_the_same_split_named_otherwise_resumes_the_cache(world, detector, tmp_path):
    """The split's record keeps the first run's naming (a novel-file's path): a copy of the file, or the names
    listed, give the same categories and resume; another split is refused."""
    dataset = CocoDataset.load(world / "train.json")
    novel = [category.name for category in dataset.categories if category.split == "novel"]
    names = tmp_path / "novel.txt"
    names.write_text("\n".join(novel) + "\n")
    out = tmp_path / "cache"
    dump_proposals.run(**stage_kwargs(world, detector, out, split=f"novel-file:{names}", shard="0/2"))
    summary = dump_proposals.run(**stage_kwargs(world, detector, out, split=f"novel:{','.join(reversed(novel))}",
                                                shard="1/2"))
    assert summary["complete"]
    assert json.loads((out / "manifest.json").read_text())["config"]["split"]["spec"] == f"novel-file:{names}"
    with pytest.raises(VildError, match="config.split.base_ids"):
        dump_proposals.run(**stage_kwargs(world, detector, out, split=f"novel:{','.join(novel[1:])}"))


def test_a_cache_resumed_with_another_thread_count_says_its_shards_may_differ(world, detector, tmp_path, caplog):
    """On the CPU torch's thread count splits the arithmetic (torchrun sets one thread a rank): the manifest
    records it, and a run resuming with another one warns that its shards may differ in their last bits."""
    out = tmp_path / "cache"
    threads = torch.get_num_threads()
    try:
        dump_proposals.run(**stage_kwargs(world, detector, out, shard="0/2", threads=1))
        with caplog.at_level(logging.WARNING, logger="vild_pipe"):
            dump_proposals.run(**stage_kwargs(world, detector, out, shard="1/2", threads=2))
    finally:
        torch.set_num_threads(threads)
    assert json.loads((out / "manifest.json").read_text())["made_with"] == {"device": "cpu", "threads": 1}
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"{out}: begun with other settings than this run's (threads: 1 -> 2): the shards this run writes may differ"
        " from the others in their last bits; resume with the first run's settings for a cache equal bit for bit to"
        " one run's"]
