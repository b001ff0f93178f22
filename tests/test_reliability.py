"""The pipeline's guarantees tested as a whole (issue 7): kill anywhere, shard anywhere, reject bad input.

Kill anywhere: each long stage runs in a child process, slowed down so that a kill lands anywhere (mid-step,
between two shards, while a temp file is half written), and is killed three times at seeded random points
(SIGKILL while a shard or checkpoint is being written, SIGKILL at a random point, SIGTERM at a random point),
rerun with the same arguments each time, then run to the end. A watcher opens every file a reader would take
as complete (shards, markers, manifests, checkpoints, metrics lines) while the child runs and after each
kill. The end result must equal an uninterrupted run's (caches array for array, training weights bit for
bit on CPU), each rerun must resume where the killed run left off (counted from its log and the files), and
each stale temp file or lock must be removed by the rerun with one log line.

Reject bad input: the catalogue cases that no per-stage test covers yet, run through the CLI: one
`error:` line naming the file and the problem, exit status 2, and every file that existed before unchanged
(the other cases are listed, with their tests, in the README's Reliability section).

Every process uses one torch thread: the CPU kernels partition work by thread, which moves the last bits.
"""
import builtins
import errno
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from vild_pipe.cli import main
from vild_pipe.pipeline import shards
from vild_pipe.pipeline.checkpoint import CHECKPOINT_NAME
from vild_pipe.pipeline.detector import MODEL_NAME, DetectorConfig, build_detector, save_final_model
from vild_pipe.pipeline.head import HEAD_NAME
from vild_pipe.pipeline.shard_work import CacheStopped, ClaimingSampler, ShardSequence
from vild_pipe.pipeline.shards import CacheFolder, RowField
from vild_pipe.pipeline.teacher import SmallClipConfig, save_clip
from vild_pipe.stages import cache_embeddings, dump_proposals, embed_text, make_synthetic, train_head, train_rpn

from child_processes import child_env

TRAIN_IMAGES = 10          # one image per shard: ten shards, enough for three kills and a final rerun
ITERATIONS = 30            # training steps, a checkpoint every CHECKPOINT_EVERY
CHECKPOINT_EVERY = 4
STEP_S = 0.12              # each unit of work (a training step, an image) takes at least this long in a child
WRITE_S = 0.04             # and each dataset of a shard, each checkpoint, this long while its temp file exists
TINY_DETECTOR = dict(small_widths=(8, 16, 16, 32), fpn_channels=16, representation_size=32, min_size=64,
                     max_size=64, rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=100,
                     rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=32)
TINY_CLIP = SmallClipConfig(embed_dim=16, image_resolution=32, vision_layers=(1, 1, 1, 1), vision_width=8,
                            transformer_width=64, transformer_layers=1)
SHARD_RE = re.compile(r"^shard-(\d{5})\.h5$")

# Runs one stage with its keyword arguments (JSON) the way the CLI does (a VildError: one `error:` line, exit 2),
# with each unit of work and each file write slowed down so that a kill can land anywhere.
DRIVER = '''
import importlib, json, logging, os, sys, time
import torch
from vild_pipe.errors import VildError
from vild_pipe.pipeline import shards

name, kwargs = sys.argv[1], json.loads(sys.argv[2])
stage = importlib.import_module("vild_pipe.stages." + name)
step_s, write_s = float(os.environ["RELIABILITY_STEP_S"]), float(os.environ["RELIABILITY_WRITE_S"])

def slowed(function, before, after=0.0):
    def wrapper(*args, **options):
        time.sleep(before)
        result = function(*args, **options)
        time.sleep(after)
        return result
    return wrapper

unit = {"train_rpn": "_train_step", "train_head": "_train_step", "dump_proposals": "propose_with_features",
        "cache_embeddings": "_crops_of"}[name]
setattr(stage, unit, slowed(getattr(stage, unit), step_s))
shards._create_dataset = slowed(shards._create_dataset, write_s)    # a shard's temp file, half written
torch.save = slowed(torch.save, 2 * write_s, 2 * write_s)        # a checkpoint's temp file, empty then whole
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
try:
    summary = stage.run(**kwargs)
except VildError as err:
    print(f"error: {err}", flush=True)
    sys.exit(2)
print("SUMMARY", json.dumps(summary, default=str), flush=True)
'''


# ------------------------------------------------------------------------------------------------ fixtures


pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_torchrun_env")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny world, detector, CLIP and text file, and one uninterrupted run of each long stage (the references;
    each stage's reference output is the next stage's input)."""
    root = tmp_path_factory.mktemp("pipeline")
    make_synthetic.run(root / "world", train_images=TRAIN_IMAGES, val_images=2, image_size=64, workers=1)
    torch.manual_seed(0)
    config = DetectorConfig.preset("small", **TINY_DETECTOR)
    save_final_model(root / "detector", build_detector(config), config, step=0)
    save_clip(TINY_CLIP.build(), root / "clip.pt")
    embed_text.run(root / "text.pt", str(root / "clip.pt"), annotations=root / "world" / "train.json", device="cpu")
    paths = {"root": root, "world": root / "world", "detector": root / "detector", "clip": root / "clip.pt",
             "text": root / "text.pt", "proposals": root / "ref" / "dump_proposals",
             "embeddings": root / "ref" / "cache_embeddings"}
    for stage in ("train_rpn", "dump_proposals", "cache_embeddings", "train_head"):
        STAGES[stage].module.run(**stage_kwargs(stage, paths, root / "ref" / stage))
    return paths


def stage_kwargs(stage: str, paths: dict, out: Path) -> dict:
    """The arguments of one run of `stage` writing to `out` (the same for every rerun: the same command)."""
    train = str(paths["world"] / "train.json")
    common = {"device": "cpu", "workers": 0, "threads": 1}
    if stage == "train_rpn":
        return {"annotations": train, "run_dir": str(out), "backbone": "small", "iterations": ITERATIONS,
                "batch_size": 2, "lr": 0.02, "warmup": 3, "checkpoint_every": CHECKPOINT_EVERY, "seed": 0,
                "detector_options": TINY_DETECTOR, **common}
    if stage == "dump_proposals":
        return {"detector": str(paths["detector"]), "annotations": train, "out": str(out), "top_n": 8,
                "images_per_shard": 1, "batch_size": 1, **common}
    if stage == "cache_embeddings":
        return {"proposals": str(paths["proposals"]), "annotations": train, "out": str(out),
                "clip": str(paths["clip"]), "batch_size": 64, "images_per_batch": 1, **common}
    return {"proposals": str(paths["proposals"]), "embeddings": str(paths["embeddings"]), "annotations": train,
            "run_dir": str(out), "text": str(paths["text"]), "iterations": ITERATIONS, "batch_size": 2,
            "lr": 0.05, "warmup": 2, "representation_size": 32, "image_rois": 6, "sample_rois": 8,
            "block_images": 2, "buffer_blocks": 2, "checkpoint_every": CHECKPOINT_EVERY, "seed": 0, **common}


@dataclass(frozen=True)
class Stage:
    module: object
    kind: str                 # "cache" or "training"
    final_file: str = ""      # a training stage's final model file


STAGES = {
    "train_rpn": Stage(train_rpn, "training", MODEL_NAME),
    "dump_proposals": Stage(dump_proposals, "cache"),
    "cache_embeddings": Stage(cache_embeddings, "cache"),
    "train_head": Stage(train_head, "training", HEAD_NAME),
}


# ------------------------------------------------------------------------------------------------ reading outputs


def read_cache(path: Path) -> dict[int, dict[str, np.ndarray]]:
    """{image_id: rows} of every shard, with plain h5py."""
    rows = {}
    for file in sorted(path.glob("shard-*.h5")):
        with h5py.File(file, "r") as h5:
            row_start = h5["row_start"][()]
            arrays = {name: h5[name][()] for name in h5 if name not in ("image_id", "row_start")}
            for k, image_id in enumerate(h5["image_id"][()]):
                assert int(image_id) not in rows, f"image {image_id} is in two shards"
                rows[int(image_id)] = {name: a[row_start[k]:row_start[k + 1]] for name, a in arrays.items()}
    return rows


def assert_same_cache(path: Path, expected_path: Path) -> None:
    got, expected = read_cache(path), read_cache(expected_path)
    assert sorted(got) == sorted(expected)
    for image_id, rows in expected.items():
        assert sorted(got[image_id]) == sorted(rows)
        for name, array in rows.items():
            assert got[image_id][name].dtype == array.dtype
            np.testing.assert_array_equal(got[image_id][name], array, err_msg=f"image {image_id} {name}")


def complete_shards(path: Path) -> dict[int, int]:
    """{shard index: inode of its .h5} of the complete shards (the .h5 and its done-marker both there)."""
    names = set(os.listdir(path)) if path.is_dir() else set()
    return {int(m.group(1)): os.stat(path / name).st_ino for name in names if (m := SHARD_RE.match(name))
            and name.replace(".h5", ".json") in names}


def checkpoint_step(run_dir: Path, _steps: dict = {}) -> int:
    """Step of run_dir/last.pt (0 if there is none), read once per version of the file."""
    path = run_dir / CHECKPOINT_NAME
    try:
        version = (os.fspath(path), os.stat(path).st_ino, os.stat(path).st_mtime_ns)
    except FileNotFoundError:
        return 0
    if version not in _steps:
        _steps[version] = int(torch.load(path, weights_only=True)["step"])
    return _steps[version]


def metric_steps(run_dir: Path) -> list[int]:
    """Steps of the whole lines of metrics.jsonl (each must be JSON)."""
    path = run_dir / train_rpn.METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().split("\n")[:-1]]


def stale_files(path: Path) -> list[str]:
    """Temp files and locks a killed run may leave behind."""
    return sorted(n for n in os.listdir(path) if n.endswith((".tmp", ".lock"))) if path.is_dir() else []


@dataclass
class Watcher:
    """Opens every file that a reader would take as complete, each version once, and asserts it is whole."""

    kind: str
    out: Path
    seen: set = field(default_factory=set)

    def check(self) -> None:
        try:
            names = sorted(os.listdir(self.out))
        except FileNotFoundError:
            return
        for name in names:
            path = self.out / name
            try:
                version = (name, os.stat(path).st_ino, os.stat(path).st_size)
            except FileNotFoundError:   # a temp file or lock, removed meanwhile: nothing a reader takes
                continue
            if version in self.seen or name.endswith((".tmp", ".lock")):
                continue
            if self.kind == "cache":
                self._check_cache_file(path, name)
            elif name.endswith(".pt"):
                state = torch.load(path, weights_only=True)
                assert "model" in state and "step" in state, name
            elif name == train_rpn.METRICS_NAME:
                steps = metric_steps(self.out)
                assert steps == list(range(1, len(steps) + 1)), f"{name}: steps {steps}"
            self.seen.add(version)

    def _check_cache_file(self, path: Path, name: str) -> None:
        if SHARD_RE.match(name):
            with h5py.File(path, "r") as h5:
                rows = int(h5["row_start"][-1])
                assert len(h5["row_start"]) == len(h5["image_id"]) + 1 and len(h5["image_id"]) > 0, name
                for dataset in h5:
                    if dataset not in ("image_id", "row_start"):
                        assert len(h5[dataset]) == rows, f"{name}: {dataset} has {len(h5[dataset])} of {rows} rows"
                assert f"shard-{h5.attrs['shard_index']:05d}.h5" == name
        elif name.endswith(".json"):
            record = json.loads(path.read_text())
            if name.startswith("shard-"):
                assert (path.parent / name.replace(".json", ".h5")).is_file(), f"{name} before its shard"
                assert record["file"] == name.replace(".json", ".h5")
            else:
                assert record["fingerprint"] and record["stage"]

    @property
    def published(self) -> int:
        """Versions of shards, markers, manifests and checkpoints checked so far."""
        return len([version for version in self.seen if not version[0].endswith(".jsonl")])


# ------------------------------------------------------------------------------------------------ kill anywhere


def start_child(tmp_path: Path, stage: str, kwargs: dict, log: Path, step_s: float = STEP_S) -> subprocess.Popen:
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = child_env(RELIABILITY_STEP_S=str(step_s), RELIABILITY_WRITE_S=str(WRITE_S))
    with open(log, "w") as output:
        return subprocess.Popen([sys.executable, str(script), stage, json.dumps(kwargs)], stdout=output,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


class Progress:
    """How far a stage's output has got: complete shards, or training steps logged by the current child."""

    def __init__(self, kind: str, out: Path):
        self.kind, self.out = kind, out
        metrics = out / train_rpn.METRICS_NAME
        # A resumed training run first rewrites metrics.jsonl (a new inode) without the steps it redoes.
        self.metrics_inode = os.stat(metrics).st_ino if metrics.is_file() else None
        self.start = self.now() if kind == "cache" else checkpoint_step(out)

    def now(self) -> int:
        if self.kind == "cache":
            return len(complete_shards(self.out))
        metrics = self.out / train_rpn.METRICS_NAME
        if not metrics.is_file() or os.stat(metrics).st_ino == self.metrics_inode:
            return self.start
        steps = metric_steps(self.out)
        return steps[-1] if steps else 0

    def writing(self, pid: int) -> bool:
        """Whether the child is writing its next shard or checkpoint after publishing one (a temp file is there)."""
        if self.kind == "cache":
            return self.now() > self.start and any(f".{pid}@" in n and n.startswith("shard-") and ".h5." in n
                                                    for n in stale_files(self.out))
        return checkpoint_step(self.out) > self.start and (self.out / f"{CHECKPOINT_NAME}.tmp").exists()


def interrupt(tmp_path: Path, stage: str, kwargs: dict, out: Path, watcher: Watcher, how: signal.Signals,
              mid_write: bool, rng: random.Random, attempt: int) -> tuple[int, str]:
    """Run the stage in a child and signal it at a seeded random point; (exit status, its output)."""
    kind = STAGES[stage].kind
    progress = Progress(kind, out)
    units = rng.randint(1, 2) if kind == "cache" else rng.randint(2, 6)
    delay = rng.uniform(0, 2 * STEP_S)
    log = tmp_path / f"child-{attempt}.log"
    child = start_child(tmp_path, stage, kwargs, log)
    try:
        deadline = time.monotonic() + 120
        while not (progress.writing(child.pid) if mid_write else progress.now() >= progress.start + units):
            watcher.check()
            assert child.poll() is None, f"{stage} ended before the kill:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"{stage}: no progress within 120 s:\n{log.read_text()}"
            time.sleep(0.003)
        if not mid_write:
            until = time.monotonic() + delay
            while time.monotonic() < until:
                watcher.check()
                time.sleep(0.003)
        assert child.poll() is None, f"{stage} ended before the kill:\n{log.read_text()}"
        os.killpg(child.pid, how)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    watcher.check()
    return child.returncode, log.read_text()


def assert_resumed(kind: str, out: Path, output: str, before: dict) -> None:
    """The rerun's log says it took up the earlier work, and names each stale file it removed exactly once."""
    if kind == "cache" and before["complete"]:
        assert f"resuming cache {out}: {len(before['complete'])} of {TRAIN_IMAGES} shards complete" in output
    elif kind == "training":
        expected = (f"resuming from {out / CHECKPOINT_NAME} at step {before['step']}" if before["step"]
                    else f"no checkpoint in {out}: starting at step 0")
        assert expected in output, output
    lines = output.splitlines()
    for name, content in before["stale"].items():
        # the whole name: a lock's name is also the start of its own temp file's name
        whole_name = re.compile(rf"(?<![\w.@-]){re.escape(name)}(?![\w.@-])")
        removed = [line for line in lines if whole_name.search(line) and "removed" in line]
        assert len(removed) == 1, f"{name}: {removed}"
        # gone, or a lock of the same shard taken since by the rerun (a temp file's name holds its writer's pid)
        assert not (out / name).exists() or (out / name).read_bytes() != content, f"{name} is still there"


def state_after_kill(kind: str, out: Path) -> dict:
    return {"complete": complete_shards(out) if kind == "cache" else {}, "step": checkpoint_step(out) if kind ==
            "training" else 0, "stale": {name: (out / name).read_bytes() for name in stale_files(out)}}


@pytest.mark.parametrize("stage", list(STAGES))
def test_killed_anywhere_then_rerun_ends_as_an_uninterrupted_run_and_redoes_nothing(stage, pipeline, tmp_path,
                                                                                     caplog):
    kind = STAGES[stage].kind
    out = tmp_path / "out"
    kwargs = stage_kwargs(stage, pipeline, out)
    rng = random.Random(f"reliability {stage}")
    watcher = Watcher(kind, out)
    plan = [(signal.SIGKILL, True), (signal.SIGKILL, False), (signal.SIGTERM, False)]
    states, kept_shards = [], {}
    for attempt, (how, mid_write) in enumerate(plan):
        status, output = interrupt(tmp_path, stage, kwargs, out, watcher, how, mid_write, rng, attempt)
        if states:
            assert_resumed(kind, out, output, states[-1])
        state = state_after_kill(kind, out)
        if how == signal.SIGTERM:
            errors = [line for line in output.splitlines() if line.startswith("error:")]
            assert status == 2 and len(errors) == 1 and "Traceback" not in output, output
            if kind == "training":
                assert f"stopped by SIGTERM after step {state['step']} and saved" in errors[0]
                assert metric_steps(out)[-1] == state["step"], "the stop lost no step"
            else:
                assert "stopped by SIGTERM; " in errors[0] and "rerun the same command to resume" in errors[0]
                assert not state["stale"], f"the stopped run left {sorted(state['stale'])}"
        else:
            assert status == -how, output
        if mid_write:
            assert state["stale"], f"the kill while writing left no temp file: {os.listdir(out)}"
        if kind == "cache":
            for index, inode in state["complete"].items():
                assert kept_shards.setdefault(index, inode) == inode, f"shard {index} was written again"
        elif states:
            assert state["step"] >= states[-1]["step"]
        states.append(state)
    assert any(s["step"] if kind == "training" else s["complete"] for s in states), "the kills made no progress"

    caplog.set_level(logging.INFO, logger="vild_pipe")
    summary = STAGES[stage].module.run(**kwargs)
    assert_resumed(kind, out, "\n".join(caplog.messages), states[-1])
    watcher.check()
    assert watcher.published >= 3, "the watcher saw next to nothing published"
    assert not stale_files(out)
    reference = pipeline["root"] / "ref" / stage
    if kind == "cache":
        missing = sorted(set(range(TRAIN_IMAGES)) - set(states[-1]["complete"]))
        assert sorted(summary["shards_written"]) == missing and summary["complete"]
        final = complete_shards(out)
        assert all(final[index] == inode for index, inode in kept_shards.items()), "a complete shard was rewritten"
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["complete"] and [s["shard"] for s in manifest["shards"]] == list(range(TRAIN_IMAGES))
        assert_same_cache(out, reference)
    else:
        assert summary["steps"] == ITERATIONS and summary["trained_steps"] == ITERATIONS - states[-1]["step"]
        assert metric_steps(out) == list(range(1, ITERATIONS + 1))
        assert checkpoint_step(out) == ITERATIONS
        final = STAGES[stage].final_file
        expected = torch.load(reference / final, weights_only=True)["model"]
        weights = torch.load(out / final, weights_only=True)["model"]
        assert weights.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(weights[name], tensor), name


@pytest.mark.parametrize("stage", ["train_rpn", "train_head"])
def test_a_temp_file_of_a_final_model_left_by_a_kill_is_removed_with_one_line(stage, pipeline, tmp_path, caplog):
    """A run killed while it saved model.pt / head.pt (after its last checkpoint): the rerun only saves it."""
    reference, run_dir = pipeline["root"] / "ref" / stage, tmp_path / "run"
    run_dir.mkdir()
    for name in (CHECKPOINT_NAME, train_rpn.METRICS_NAME):
        shutil.copy(reference / name, run_dir / name)
    final = STAGES[stage].final_file
    (run_dir / f"{final}.tmp").write_bytes((reference / final).read_bytes()[:100])
    caplog.set_level(logging.INFO, logger="vild_pipe")
    summary = STAGES[stage].module.run(**stage_kwargs(stage, pipeline, run_dir))
    assert summary["trained_steps"] == 0
    assert len([m for m in caplog.messages if f"{final}.tmp" in m and "removed" in m]) == 1
    assert sorted(os.listdir(run_dir)) == sorted([CHECKPOINT_NAME, train_rpn.METRICS_NAME, final])
    expected = torch.load(reference / final, weights_only=True)["model"]
    weights = torch.load(run_dir / final, weights_only=True)["model"]
    assert all(torch.equal(weights[name], tensor) for name, tensor in expected.items())


def test_sigterm_while_a_shard_is_published_lets_it_finish_and_releases_every_lock(tmp_path, monkeypatch):
    """The shard loop signalled while the background thread writes the previous shard: that shard is complete,
    so it is published whole; the open one is dropped; no lock or temp file stays; the handler is put back."""
    folder = CacheFolder.open_or_create(tmp_path / "cache", stage="test", config={}, inputs={},
                                        fields={"x": RowField("float32", ())}, num_shards=3, images_per_shard=1)
    writing, may_finish = threading.Event(), threading.Event()
    create_dataset = shards._create_dataset

    def held_up(h5, name, data, description):
        if name == "x":
            writing.set()
            may_finish.wait(30)
        create_dataset(h5, name, data, description)

    monkeypatch.setattr(shards, "_create_dataset", held_up)
    handler = signal.getsignal(signal.SIGTERM)
    sampler = ClaimingSampler(folder, [0, 1, 2], lambda index: [index])
    with pytest.raises(CacheStopped) as stopped:
        with ShardSequence(sampler) as sequence:
            for index, image_id in sampler:
                sequence.shard(index).writer.add_image(image_id, x=np.ones(2, np.float32))
                if index == 1:
                    assert writing.wait(30), "shard 0 was never handed to the publisher"
                    threading.Timer(0.2, may_finish.set).start()   # the write ends after the signal
                    os.kill(os.getpid(), signal.SIGTERM)
                    time.sleep(30)
    assert str(stopped.value) == (f"{folder.path}: stopped by SIGTERM; 1 shard published by this run (1 of 3"
                                  " complete), rerun the same command to resume")
    assert folder.complete_shards() == [0]
    assert sorted(os.listdir(folder.path)) == ["manifest.json", "shard-00000.h5", "shard-00000.json"]
    with h5py.File(folder.shard_path(0), "r") as h5:
        assert h5["x"][()].tolist() == [1.0, 1.0]
    assert signal.getsignal(signal.SIGTERM) is handler


# ------------------------------------------------------------------------------------------------ shard anywhere


def test_two_runs_of_the_same_shards_at_once_write_each_shard_once(pipeline, tmp_path):
    """The same command twice at once into one folder (every shard overlaps): the per-shard locks give each shard
    one writer, the run that finds a shard taken says which run holds it, and the cache is the uninterrupted one.
    Whichever run is behind reaches the shard the other is computing and finds it locked. A run that ends while
    the other still writes one of the shards it left to it exits 2 saying so: its part is not done; the run
    that ends last finds every shard complete and exits 0."""
    out = tmp_path / "cache"
    kwargs = stage_kwargs("dump_proposals", pipeline, out)
    children = [start_child(tmp_path, "dump_proposals", kwargs, tmp_path / f"{name}.log", step_s=3 * STEP_S)
                for name in ("a", "b")]
    for child in children:
        child.wait(timeout=180)
    outputs = [(tmp_path / name).read_text() for name in ("a.log", "b.log")]
    assert sorted(child.returncode for child in children) in ([0, 0], [0, 2]), outputs
    written = []
    for output in outputs:
        if "SUMMARY " in output:
            written.append(len(json.loads(output.split("SUMMARY ", 1)[1])["shards_written"]))
        else:
            error = re.search(r"^error: .*: the cache is not complete: another run is writing shard-\d{5}.*; (\d+)"
                              r" shards? published by this run\. Rerun the same command when that run has finished",
                              output, re.MULTILINE)
            assert error, output
            written.append(int(error.group(1)))
    assert sum(written) == TRAIN_IMAGES, "a shard was written twice"
    skipped = re.findall(r"skipping shard-\d{5}: another run is writing it \(pid \d+ on \S+ since", "".join(outputs))
    assert skipped, outputs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and [s["shard"] for s in manifest["shards"]] == list(range(TRAIN_IMAGES))
    assert not stale_files(out)
    assert_same_cache(out, pipeline["proposals"])


# ------------------------------------------------------------------------------------------------ reject bad input


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`."""
    return {os.fspath(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(result, *expected: str) -> str:
    """Exit status 2, exactly one `error:` line, holding every expected text (the file and the problem)."""
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output, result.output
    for text in expected:
        assert text.lower() in errors[0].lower(), errors[0]
    return errors[0]


def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def copy_world(pipeline: dict, target: Path) -> Path:
    shutil.copytree(pipeline["world"], target)
    return target


def partial_copy(cache: Path, target: Path, keep: int) -> Path:
    """A copy of a complete cache as a killed run leaves it: manifest, shards 0..keep-1 and their markers."""
    target.mkdir(parents=True)
    manifest = json.loads((cache / "manifest.json").read_text())
    (target / "manifest.json").write_text(json.dumps({**manifest, "complete": False, "shards": []}))
    for index in range(keep):
        for suffix in (".h5", ".json"):
            shutil.copy(cache / f"shard-{index:05d}{suffix}", target / f"shard-{index:05d}{suffix}")
    return target


def train_rpn_args(world: Path, run_dir: Path, *extra) -> list:
    """Five steps of two images: every image of the world is drawn once."""
    return ["train-rpn", world / "train.json", run_dir, "--backbone", "small", "--min-size", 64, "--max-size", 64,
            "--iterations", TRAIN_IMAGES // 2, "--batch-size", 2, "--threads", 1, "--device", "cpu", *extra]


def train_head_args(pipeline: dict, proposals: Path, embeddings: Path, run_dir: Path, *extra) -> list:
    return ["train-head", proposals, embeddings, pipeline["world"] / "train.json", run_dir, "--text",
            pipeline["text"], "--iterations", 4, "--batch-size", 2, "--representation-size", 32, "--image-rois", 6,
            "--sample-rois", 8, "--threads", 1, "--device", "cpu", "--workers", 0, *extra]


def test_missing_image_under_loader_workers_is_one_line(pipeline, tmp_path):
    """dump-proposals reads images in DataLoader workers, which wrap errors in a worker traceback (train-rpn
    checks every image file before it starts: see test_train_rpn.py)."""
    world = copy_world(pipeline, tmp_path / "world")
    missing = sorted((world / "train").glob("*.jpg"))[4]
    missing.unlink()
    before = snapshot(tmp_path)
    result = invoke("dump-proposals", pipeline["detector"], world / "train.json", tmp_path / "cache", "--top-n", 8,
                    "--images-per-shard", 2, "--batch-size", 1, "--threads", 1, "--device", "cpu", "--workers", 2)
    assert_one_line_error(result, f"{missing}: missing image file (images are looked for beside the annotation"
                          " file; give --images FOLDER)", "--skip-bad-images")
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before


def test_truncated_hdf5_shard_is_one_line_and_loses_nothing(pipeline, tmp_path):
    """A truncated proposal shard stops cache-embeddings (resuming a half-made cache) and train-head alike."""
    proposals = tmp_path / "proposals"
    shutil.copytree(pipeline["proposals"], proposals)
    shard = proposals / "shard-00006.h5"
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size // 2)
    embeddings = partial_copy(pipeline["embeddings"], tmp_path / "embeddings", keep=6)
    before = snapshot(tmp_path)

    result = invoke("cache-embeddings", proposals, pipeline["world"] / "train.json", embeddings, "--clip",
                    pipeline["clip"], "--images-per-batch", 1, "--threads", 1, "--device", "cpu", "--workers", 0)
    assert_one_line_error(result, f"{shard}: truncated or corrupt HDF5 shard")
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before
    assert not stale_files(embeddings), "the claim on the shard that could not be read was released"

    full_embeddings = tmp_path / "full-embeddings"
    shutil.copytree(pipeline["embeddings"], full_embeddings)
    before = snapshot(tmp_path)
    result = invoke(*train_head_args(pipeline, proposals, full_embeddings, tmp_path / "run"))
    assert_one_line_error(result, f"{shard}: truncated or corrupt HDF5 shard")
    assert snapshot(tmp_path) == before


def test_disk_full_while_a_stage_writes_a_shard_is_one_line_and_loses_nothing(pipeline, tmp_path, monkeypatch):
    """ENOSPC in the background writer of shard 3 (a cache resumed at shard 2): one line, the complete shards
    stay, no temp file or lock is left, and the rerun finishes the cache."""
    out = partial_copy(pipeline["proposals"], tmp_path / "cache", keep=2)
    before = snapshot(tmp_path)
    create_dataset = h5py.Group.create_dataset

    def disk_full_on_shard_3(group, name, *args, **kwargs):
        if "shard-00003.h5" in group.file.filename:
            raise OSError(errno.ENOSPC, "No space left on device")
        return create_dataset(group, name, *args, **kwargs)

    args = ["dump-proposals", pipeline["detector"], pipeline["world"] / "train.json", out, "--top-n", 8,
            "--images-per-shard", 1, "--batch-size", 1, "--threads", 1, "--device", "cpu", "--workers", 0]
    with monkeypatch.context() as patch:
        patch.setattr(h5py.Group, "create_dataset", disk_full_on_shard_3)
        result = invoke(*args)
    assert_one_line_error(result, f"{out / 'shard-00003.h5'}: cannot write cache shard (no space left on device)")
    assert {k: v for k, v in snapshot(tmp_path).items() if k in before} == before
    assert not stale_files(out) and 3 not in complete_shards(out)

    assert invoke(*args).exit_code == 0
    assert_same_cache(out, pipeline["proposals"])


@pytest.fixture
def read_only(monkeypatch):
    """Make writes under a folder fail with EROFS, as on a read-only mount (chmod does not stop root)."""
    real = {"os.open": os.open, "open": builtins.open, "io.open": io.open, "mkdir": os.mkdir, "h5": h5py.File,
            "Path.mkdir": Path.mkdir}

    def make(root: Path):
        root = os.fspath(root)

        def refuse(path):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

        def under(path) -> bool:
            return isinstance(path, (str, os.PathLike)) and os.path.abspath(os.fspath(path)).startswith(root)

        def guarded_os_open(path, flags, *args, **kwargs):
            if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                refuse(path)
            return real["os.open"](path, flags, *args, **kwargs)

        def guarded(opener):
            def guarded_open(path, mode="r", *args, **kwargs):
                if under(path) and set(mode) & set("wax+"):
                    refuse(path)
                return opener(path, mode, *args, **kwargs)
            return guarded_open

        def guarded_mkdir(path, *args, **kwargs):
            if under(path):
                if os.path.isdir(path):
                    raise FileExistsError(errno.EEXIST, "File exists", os.fspath(path))
                refuse(path)
            return real["mkdir"](path, *args, **kwargs)

        def guarded_path_mkdir(path, mode=0o777, parents=False, exist_ok=False):
            """Python < 3.11's Path.mkdir calls the os.mkdir pathlib bound at import, not the patched one."""
            if under(path) and not (exist_ok and path.is_dir()):
                refuse(path)
            return real["Path.mkdir"](path, mode, parents, exist_ok)

        def guarded_h5_file(name, mode="r", *args, **kwargs):
            if under(name) and mode != "r":
                refuse(name)
            return real["h5"](name, mode, *args, **kwargs)

        monkeypatch.setattr(os, "open", guarded_os_open)
        monkeypatch.setattr(builtins, "open", guarded(real["open"]))
        monkeypatch.setattr(io, "open", guarded(real["io.open"]))
        monkeypatch.setattr(os, "mkdir", guarded_mkdir)
        monkeypatch.setattr(Path, "mkdir", guarded_path_mkdir)
        monkeypatch.setattr(h5py, "File", guarded_h5_file)

    return make


@pytest.mark.parametrize("stage", ["train-rpn", "train-head", "evaluate", "detect"])
def test_read_only_output_folder_is_one_line_and_loses_nothing(stage, pipeline, tmp_path, read_only):
    """An existing output folder on a read-only file system (or a new one under it): one line naming the file."""
    out = tmp_path / "readonly" / "out"
    out.mkdir(parents=True)
    (out / "earlier.txt").write_text("an earlier result")
    if stage == "train-rpn":
        args, expected = train_rpn_args(pipeline["world"], out, "--workers", 0), f"{out / 'run.lock'}: cannot create"
    elif stage == "train-head":
        args = train_head_args(pipeline, pipeline["proposals"], pipeline["embeddings"], out)
        expected = f"{out / 'run.lock'}: cannot create"
    elif stage == "evaluate":
        args = ["evaluate", pipeline["proposals"], pipeline["world"] / "train.json", out / "new",
                "--embeddings", pipeline["embeddings"], "--text", pipeline["text"], "--mode", "CLIP-on-crops",
                "--device", "cpu", "--threads", 1]
        expected = f"{out / 'new'}: cannot create the output folder"
    else:
        image = sorted((pipeline["world"] / "train").glob("*.jpg"))[0]
        args = ["detect", image, "--detector", pipeline["detector"], "--head", pipeline["root"] / "ref" / "train_head",
                "--clip", pipeline["clip"], "--vocab", "circle,star", "--out", out, "--device", "cpu", "--threads", 1]
        expected = f"{out / (image.stem + '.png')}: cannot write"
    before = snapshot(tmp_path)
    read_only(tmp_path / "readonly")
    result = invoke(*args)
    assert_one_line_error(result, expected, "read-only file system")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args, expected", [
    (["dump-proposals", "{detector}", "{train}", "{out}", "--shard", "3/2"],
     "--shard 3/2: expected i/n with 0 <= i < n"),
    (["dump-proposals", "{detector}", "{train}", "{out}", "--shard", "1/0"], "--shard 1/0"),
    (["cache-embeddings", "{proposals}", "{train}", "{out}", "--clip", "{clip}", "--shard", "two/4"], "--shard two/4"),
    (["dump-proposals", "{detector}", "{train}", "{out}", "--images-per-shard", "0"],
     "--images-per-shard must be at least 1, got 0"),
    (["dump-proposals", "{detector}", "{train}", "{out}", "--top-n", "0"], "--top-n"),
    (["train-rpn", "{train}", "{out}", "--backbone", "small", "--checkpoint-every", "0"],
     "--checkpoint-every must be at least 1, got 0"),
    (["train-head", "{proposals}", "{embeddings}", "{train}", "{out}", "--text", "{text}", "--batch-size", "0"],
     "--batch-size must be at least 1, got 0"),
    (["train-head", "{proposals}", "{embeddings}", "{train}", "{out}", "--text", "{text}", "--checkpoint-every", "0"],
     "--checkpoint-every must be at least 1, got 0"),
    (["train-head", "{proposals}", "{embeddings}", "{train}", "{out}", "--text", "{text}", "--foreground-fraction",
      "1.5"], "--foreground-fraction must be in (0, 1], got 1.5"),
    (["train-rpn", "{train}", "{out}", "--backbone", "small", "--workers", "-1"],
     "--workers must be at least 0, got -1"),
    (["recall", "{detector}", "{train}", "--out", "{out}", "--workers", "-1"], "--workers must be at least 0, got -1"),
    (["dump-proposals", "{detector}", "{train}", "{out}", "--workers", "-1"], "--workers must be at least 0, got -1"),
    (["cache-embeddings", "{proposals}", "{train}", "{out}", "--clip", "{clip}", "--workers", "-1"],
     "--workers must be at least 0, got -1"),
    (["train-head", "{proposals}", "{embeddings}", "{train}", "{out}", "--text", "{text}", "--clip-grad-norm=-1"],
     "--clip-grad-norm must be 0 or more (0: off), got -1.0"),
    (["train-head", "{proposals}", "{embeddings}", "{train}", "{out}", "--text", "{text}", "--weight-decay", "-1"],
     "--weight-decay must be 0 or more, got -1.0"),
    (["train-rpn", "{train}", "{out}", "--backbone", "small", "--momentum", "-1"],
     "--momentum must be in [0, 1), got -1.0"),
    (["dump-proposals", "{detector}", "{train}", "{out}", "--threads", "-1"], "--threads must be at least 0, got -1"),
], ids=["shard-3/2", "shard-1/0", "shard-not-a-number", "images-per-shard-0", "top-n-0", "checkpoint-every-0",
        "batch-size-0", "head-checkpoint-every-0", "foreground-fraction-1.5", "rpn-workers--1", "recall-workers--1",
        "proposals-workers--1", "embeddings-workers--1", "head-clip-grad-norm--1", "head-weight-decay--1",
        "rpn-momentum--1", "proposals-threads--1"])
def test_impossible_options_are_one_line_and_write_nothing(args, expected, pipeline, tmp_path):
    paths = {"detector": pipeline["detector"], "train": pipeline["world"] / "train.json", "out": tmp_path / "out",
             "proposals": pipeline["proposals"], "embeddings": pipeline["embeddings"], "clip": pipeline["clip"],
             "text": pipeline["text"]}
    before = snapshot(pipeline["root"])
    result = invoke(*[arg.format(**{k: os.fspath(v) for k, v in paths.items()}) for arg in args], "--device", "cpu")
    assert_one_line_error(result, expected)
    assert not (tmp_path / "out").exists()
    assert snapshot(pipeline["root"]) == before
