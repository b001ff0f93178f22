"""vild-pipe info: a half-made cache with a shard being written and a lock a killed run left, a run folder
being trained and a finished one, and the command line's text and JSON; nothing in the folders changes."""
import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from vild_pipe.cli import main
from vild_pipe.errors import DataError
from vild_pipe.pipeline import shards
from vild_pipe.pipeline.checkpoint import CHECKPOINT_NAME, save_checkpoint
from vild_pipe.pipeline.shards import CacheFolder, RowField, ShardLock, ShardWriter, claim_shard
from vild_pipe.pipeline.training_run import METRICS_NAME, RUN_LOCK_NAME
from vild_pipe.stages import info

from child_processes import dead_pid

FIELDS = {"boxes": RowField("float32", (4,)), "scores": RowField("float32", ())}


def snapshot(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture
def half_made_cache(tmp_path):
    """Shards 0 and 3 complete, shard 1 being written by this process, shard 2 locked by a process that is gone."""
    folder = CacheFolder.open_or_create(tmp_path / "cache", stage="dump-proposals", config={"top_n": 2}, inputs={},
                                        fields=FIELDS, num_shards=5, images_per_shard=2)
    for index in (0, 3):
        with ShardWriter(folder, index) as writer:
            for image_id in (2 * index, 2 * index + 1):
                writer.add_image(image_id, boxes=np.zeros((2, 4), np.float32), scores=np.ones(2, np.float32))
    lock = claim_shard(folder, 1)[0]
    holder = {"pid": dead_pid(), "host": shards._HOST, "since": "2026-11-27T09:00:00+00:00", "token": "00"}
    folder.lock_path(2).write_text(json.dumps(holder))
    yield folder, holder
    lock.release()


def test_a_half_made_cache_says_what_is_done_written_left_and_missing(half_made_cache):
    folder, dead = half_made_cache
    before = snapshot(folder.path)
    state = info.describe(folder.path)
    assert snapshot(folder.path) == before, "info changes nothing, stale locks included"
    assert {key: state[key] for key in ("kind", "stage", "complete", "shards", "complete_shards", "images", "rows",
                                        "missing")} == {
        "kind": "cache", "stage": "dump-proposals", "complete": False, "shards": 5, "complete_shards": 2,
        "images": 4, "rows": 8, "missing": ["shard-00001", "shard-00002", "shard-00004"]}
    assert state["writing"] == [{"shard": "shard-00001", "by": f"pid {os.getpid()} on {shards._HOST} since "
                                 + json.loads(folder.lock_path(1).read_text())["since"]}]
    assert state["stale_locks"] == [{"shard": "shard-00002",
                                     "why": f"pid {dead['pid']} on {shards._HOST} is no longer running"}]
    lines = info.format_state(state).splitlines()
    assert lines[0].startswith(f"{folder.path}: dump-proposals cache, 2 of 5 shards complete (4 images, 8 rows, ")
    assert lines[1] == f"  being written: shard-00001 ({state['writing'][0]['by']})"
    assert lines[2] == ("  left by killed runs (the next run removes them): shard-00002 (pid"
                        f" {dead['pid']} on {shards._HOST} is no longer running)")
    assert lines[3] == "  missing: shard-00001, shard-00002, shard-00004; rerun dump-proposals to fill them"


def test_a_complete_cache_of_one_shard_says_shard(tmp_path):
    folder = CacheFolder.open_or_create(tmp_path / "cache", stage="dump-proposals", config={"top_n": 2}, inputs={},
                                        fields=FIELDS, num_shards=1, images_per_shard=2)
    with ShardWriter(folder, 0) as writer:
        writer.add_image(7, boxes=np.zeros((2, 4), np.float32), scores=np.ones(2, np.float32))
    assert info.format_state(info.describe(folder.path)).startswith(
        f"{folder.path}: dump-proposals cache, complete, 1 shard (1 image, 2 rows, ")


def test_a_run_folder_says_its_step_checkpoint_and_whether_it_runs(tmp_path):
    run_dir = tmp_path / "head"
    run_dir.mkdir()
    save_checkpoint(run_dir / CHECKPOINT_NAME, {"format": 1, "step": 500, "config": {"losses": "text+image",
                                                                                   "iterations": 20000}})
    (run_dir / METRICS_NAME).write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 613)))
    lock, _ = ShardLock.acquire(run_dir / RUN_LOCK_NAME)
    with lock:
        state = info.describe(run_dir)
        assert (state["stage"], state["step"], state["iterations"], state["checkpoint_step"], state["final"]) == (
            "train-head", 612, 20000, 500, None)
        assert info.format_state(state) == (f"{run_dir}: train-head (text+image) run, step 612 of 20,000, last"
                                            f" checkpoint at step 500; running now ({state['running']})")
        assert state["running"].startswith(f"pid {os.getpid()} on ")
    assert info.format_state(info.describe(run_dir)).endswith("not running; rerun its command to go on from step 500")
    (run_dir / "head.pt").write_bytes(b"weights")
    starting = tmp_path / "starting"   # a run in its first seconds: only its lock
    starting.mkdir()
    lock, _ = ShardLock.acquire(starting / RUN_LOCK_NAME)
    with lock:
        assert info.format_state(info.describe(starting)).startswith(
            f"{starting}: training run, no step logged yet; running now (pid {os.getpid()} on ")
    assert info.format_state(info.describe(run_dir)).endswith(f"; finished: {run_dir / 'head.pt'}")


def test_a_run_before_its_first_checkpoint_is_told_apart_by_its_metric_lines(tmp_path):
    """Until the first checkpoint only metrics.jsonl is there: train-head's lines hold the text and image losses,
    train-rpn's the detector's."""
    for stage, record in (("train-head", {"loss": 1.0, "text": 0.6, "image": None}),
                          ("train-rpn", {"loss": 1.0, "loss_objectness": 0.3, "loss_classifier": 0.7})):
        run_dir = tmp_path / stage
        run_dir.mkdir()
        (run_dir / METRICS_NAME).write_text("".join(json.dumps({"step": s, **record}) + "\n" for s in range(1, 38)))
        state = info.describe(run_dir)
        assert (state["stage"], state["step"], state["checkpoint_step"]) == (stage, 37, None)
        assert info.format_state(state) == (f"{run_dir}: {stage} run, step 37; not running, no checkpoint yet; rerun"
                                            " its command to start it over")


def test_the_command_prints_each_folder_or_json_and_names_a_folder_it_cannot_read(half_made_cache, tmp_path):
    folder, _ = half_made_cache
    rpn = tmp_path / "rpn"
    rpn.mkdir()
    (rpn / "model.pt").write_bytes(b"weights")
    result = CliRunner().invoke(main, ["info", str(folder.path), str(rpn)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == f"{rpn}: train-rpn run, no step logged yet; finished: {rpn / 'model.pt'}"
    states = json.loads(CliRunner().invoke(main, ["info", "--json", str(folder.path), str(rpn)]).output)
    assert [state["kind"] for state in states] == ["cache", "run"] and states[0]["complete_shards"] == 2
    result = CliRunner().invoke(main, ["info", str(folder.path), str(tmp_path), str(rpn)])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-2:] == [
        f"{rpn}: train-rpn run, no step logged yet; finished: {rpn / 'model.pt'}",
        f"error: {tmp_path}: neither a vild-pipe cache (no manifest.json) nor a training run folder (no last.pt,"
        " metrics.jsonl, model.pt, head.pt or run.lock)"], "the readable folders are described all the same"
    assert result.output.startswith(f"{folder.path}: dump-proposals cache")
    with pytest.raises(DataError):
        info.describe(tmp_path)
    result = CliRunner().invoke(main, ["info", str(tmp_path / "not-yet"), str(rpn), str(rpn / "model.pt")])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        f"{rpn}: train-rpn run, no step logged yet; finished: {rpn / 'model.pt'}",
        f"error: {tmp_path / 'not-yet'}: no such file or directory; {rpn / 'model.pt'}: is a file, a cache or run"
        " folder is needed"], "a folder a job has not made yet hides nothing either"
