"""train-head on a tiny synthetic cache pair: both losses fall, --losses switches terms off, refusals, exact
resume after SIGKILL, torchrun with two processes trains what one process trains, and the loader's order."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

from vild_pipe.errors import DataError, VildError
from vild_pipe.pipeline.cache_loader import (
    CacheIndex, RowSelection, StepLoader, StepOrder, WindowReader, window_bytes,
)
from vild_pipe.pipeline.checkpoint import CHECKPOINT_NAME, load_checkpoint
from vild_pipe.pipeline.embedding_cache import embedding_fields
from vild_pipe.pipeline.head import HEAD_NAME, load_head
from vild_pipe.pipeline.shards import CacheFolder, ShardLock, ShardWriter, sha256_file
from vild_pipe.pipeline.text_embeddings import TextEmbeddings, load_text_embeddings
from vild_pipe.pipeline.training_run import RUN_LOCK_NAME, run_folder_lock
from vild_pipe.stages import train_head
from vild_pipe.stages.dump_proposals import proposal_fields

from child_processes import free_port, run_to_end

IMAGES, PROPOSALS, CHANNELS, DIM, PER_SHARD = 24, 10, 4, 16, 5
CLIP = {"model": "tiny-clip", "sha256": "a" * 64, "embed_dim": DIM, "input_resolution": 32}
SPLIT = {"spec": "field", "base_ids": [1, 2, 3], "novel_ids": [4]}
DETECTOR = {"checkpoint": "model.pt", "sha256": "c" * 64, "step": 100}

DRIVER = '''
import json, sys
from vild_pipe.pipeline.checkpoint import TrainingStopped
from vild_pipe.stages import train_head
try:
    train_head.run(**json.loads(sys.argv[1]))
except TrainingStopped as stopped:
    print("STOPPED", stopped.step, flush=True)
    sys.exit(3)
'''


pytestmark = pytest.mark.usefixtures("one_torch_thread", "no_torchrun_env")


def write_world(folder, seed=0, add_gt=True, novel_only=False):
    """Annotations, a proposal cache with GT rows (unless not `add_gt`), its embedding cache and text embeddings,
    where the features carry the class of the object under the box and the CLIP target is a fixed function of
    the features. `novel_only`: every object is of the novel category."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    patterns = rng.standard_normal((5, CHANNELS, 7, 7))          # background, 3 base, 1 novel
    projection = rng.standard_normal((CHANNELS * 49, DIM))
    images, annotations, per_image = [], [], []
    for image_id in range(1, IMAGES + 1):
        xy = rng.uniform(0, 60, (3, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(15, 30, (3, 2))], 1)
        classes = rng.integers(1, 5, 3)                            # class 4 is novel
        if novel_only:
            classes[:] = 4
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 100, "height": 100})
        for box, label in zip(boxes, classes):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": int(label),
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "iscrowd": 0})
        picks = rng.integers(0, 3, PROPOSALS)
        proposal_boxes = boxes[picks] + rng.normal(0, 2, (PROPOSALS, 4))
        proposal_classes = classes[picks].copy()
        proposal_boxes[-3:] = [[80, 80, 95, 95]] * 3              # background boxes
        proposal_classes[-3:] = 0
        base = (classes != 4) & add_gt
        rows_boxes = np.concatenate([proposal_boxes, boxes[base]]).astype(np.float32)
        rows_classes = np.concatenate([proposal_classes, classes[base]])
        features = patterns[rows_classes] + 0.3 * rng.standard_normal((len(rows_classes), CHANNELS, 7, 7))
        emb = features.reshape(len(features), -1) @ projection
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        is_gt = np.arange(len(rows_classes)) >= PROPOSALS
        per_image.append((image_id, rows_boxes, is_gt, features.astype(np.float16), emb.astype(np.float16)))
    categories = [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}, {"id": 3, "name": "star"},
                  {"id": 4, "name": "moon"}]
    annotation_file = folder / "train.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    shards = -(-IMAGES // PER_SHARD)
    proposals = CacheFolder.open_or_create(
        folder / "proposals", stage="dump-proposals", config={"top_n": PROPOSALS, "add_gt": add_gt,
                                                      "split": SPLIT if add_gt else None},
        inputs={"annotations": {"file": "train.json", "sha256": sha256_file(annotation_file)},
                "detector": DETECTOR},
        fields=proposal_fields((CHANNELS, 7, 7)), num_shards=shards, images_per_shard=PER_SHARD)
    embeddings = CacheFolder.open_or_create(
        folder / "embeddings", stage="cache-embeddings", config={},
        inputs={"clip": CLIP, "proposals": {"path": str(proposals.path), "fingerprint": proposals.fingerprint}},
        fields=embedding_fields(DIM), num_shards=shards, images_per_shard=PER_SHARD)
    for shard in range(shards):
        with ShardWriter(proposals, shard) as pw, ShardWriter(embeddings, shard) as ew:
            for image_id, boxes, is_gt, features, emb in per_image[shard * PER_SHARD:(shard + 1) * PER_SHARD]:
                pw.add_image(image_id, boxes=boxes, scores=np.linspace(1, 0, len(boxes), dtype=np.float32),
                             is_gt=is_gt, features=features)
                ew.add_image(image_id, emb_1x=emb, emb_15x=emb, emb=emb)
    proposals.finalize()
    embeddings.finalize()
    texts = torch.nn.functional.normalize(torch.randn(4, DIM, generator=torch.Generator().manual_seed(seed)), dim=-1)
    TextEmbeddings([c["name"] for c in categories], texts, CLIP).save(folder / "text.pt")
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("cache"))


def settings(world, run_dir, **overrides):
    return {"proposals": str(world / "proposals"), "embeddings": str(world / "embeddings"),
            "annotations": str(world / "train.json"), "run_dir": str(run_dir), "text": str(world / "text.pt"),
            "iterations": 40, "batch_size": 4, "lr": 0.05, "warmup": 2, "representation_size": 32,
            "image_rois": 6, "sample_rois": 8, "block_images": 2, "buffer_blocks": 2, "checkpoint_every": 4,
            "workers": 0, "threads": 1, "seed": 0, "device": "cpu", **overrides}


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / train_head.METRICS_NAME).read_text().splitlines()]


def head_weights(run_dir):
    return torch.load(run_dir / HEAD_NAME, weights_only=True)["model"]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    return run_dir, train_head.run(**settings(world, run_dir))


def test_both_losses_fall_and_the_head_is_saved_with_its_identities(world, reference):
    run_dir, summary = reference
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 41))
    first, last = records[:4], records[-4:]
    for term in ("text", "image"):
        assert np.mean([r[term] for r in last]) < 0.8 * np.mean([r[term] for r in first]), term
    head, info = load_head(run_dir)
    assert info["losses"] == "text+image" and info["clip"] == CLIP and info["embed_dim"] == DIM
    assert info["step"] == 40 and info["base_names"] == ["circle", "square", "star"]
    assert info["proposals"]["fingerprint"] == CacheFolder.open(world / "proposals").fingerprint
    assert info["detector"] == DETECTOR   # detect and evaluate refuse the head with another detector
    assert info["embeddings"]["fingerprint"] == CacheFolder.open(world / "embeddings").fingerprint
    assert info["config"]["data"]["text"]["names"] == ["circle", "square", "star"]   # the novel name never enters
    assert summary["steps"] == 40 and summary["trained_steps"] == 40


def test_losses_option_switches_each_term_off(world, tmp_path):
    text_only = train_head.run(**settings(world, tmp_path / "text", losses="text", embeddings=None, iterations=6))
    image_only = train_head.run(**settings(world, tmp_path / "image", losses="image", text=None, iterations=6))
    assert image_only["losses"] == "image"
    assert all(r["image"] is None and r["text"] > 0 for r in metrics(tmp_path / "text"))
    assert all(r["text"] is None and r["image"] > 0 for r in metrics(tmp_path / "image"))
    assert text_only["losses"] == "text" and load_head(tmp_path / "image")[1]["losses"] == "image"
    with pytest.raises(VildError, match="embedding cache"):
        train_head.run(**settings(world, tmp_path / "bad", losses="image", embeddings=None))
    with pytest.raises(VildError, match="--losses"):
        train_head.run(**settings(world, tmp_path / "bad", losses="both"))


def test_rerun_is_a_no_op_and_a_config_change_is_refused(world, reference):
    run_dir, _ = reference
    before = head_weights(run_dir)
    assert train_head.run(**settings(world, run_dir))["trained_steps"] == 0
    assert all(torch.equal(before[k], v) for k, v in head_weights(run_dir).items())
    with pytest.raises(VildError, match="another config"):
        train_head.run(**settings(world, run_dir, lr=0.1))
    texts = load_text_embeddings(world / "text.pt")
    TextEmbeddings(texts.names, texts.embeddings, {**texts.clip, "model": "teacher-copy.pt"}, texts.templates).save(
        run_dir.parent / "copied-clip-text.pt")
    assert train_head.run(**settings(world, run_dir, text=str(run_dir.parent / "copied-clip-text.pt")))[
        "trained_steps"] == 0, "the same CLIP under another file name is the same run"
    assert train_head.run(**settings(world, run_dir, split="novel:moon"))["trained_steps"] == 0, \
        "the cache's split (spec 'field') named otherwise is the same run"


def test_caches_that_do_not_belong_together_are_refused(world, tmp_path):
    other = write_world(tmp_path / "other", seed=1)
    with pytest.raises(DataError, match="another proposal cache") as err:
        train_head.run(**settings(world, tmp_path / "run", embeddings=str(other / "embeddings")))
    assert "\n" not in str(err.value)
    names = ["circle", "square", "star", "moon"]
    TextEmbeddings(names, torch.eye(4, DIM), {**CLIP, "sha256": "b" * 64}).save(tmp_path / "other_clip.pt")
    TextEmbeddings(["circle"], torch.eye(1, DIM), CLIP).save(tmp_path / "one-name.pt")
    with pytest.raises(DataError, match="use one model"):
        train_head.run(**settings(world, tmp_path / "run", text=str(tmp_path / "other_clip.pt")))
    with pytest.raises(DataError, match="another annotation file"):
        train_head.run(**settings(world, tmp_path / "run", annotations=str(other / "train.json")))
    with pytest.raises(DataError, match="lacks the categories"):
        train_head.run(**settings(world, tmp_path / "run", text=str(tmp_path / "one-name.pt")))
    with pytest.raises(DataError, match=r"^--clip \S+text\.pt: text embeddings are from CLIP text\.pt"):
        train_head.run(**settings(world, tmp_path / "run", text=None, clip=str(world / "text.pt")))  # not this CLIP
    assert not (tmp_path / "run").exists(), "a refused run leaves no run folder"


def test_a_cache_without_ground_truth_rows_needs_a_split_and_is_named_in_a_warning(tmp_path, caplog):
    """dump-proposals appends GT rows by default only for the detector's training file or one named like a
    training file; a cache made without them trains ViLD-text on proposals alone, which the user should hear
    of."""
    world = write_world(tmp_path / "no-gt", add_gt=False)
    with pytest.raises(VildError, match="records no category split"):
        train_head.run(**settings(world, tmp_path / "run", losses="text"))
    caplog.set_level(logging.WARNING, logger="vild_pipe.stages.train_head")
    train_head.run(**settings(world, tmp_path / "run", losses="text", split="novel:moon", iterations=2))
    assert "no ground-truth rows" in caplog.text and "--add-gt" in caplog.text
    caplog.clear()
    train_head.run(**settings(world, tmp_path / "run-image", losses="image", split="novel:moon", iterations=2))
    assert "no ground-truth rows" not in caplog.text     # ViLD-image never uses them


def test_a_file_without_base_boxes_is_refused_for_the_text_loss(tmp_path):
    """ViLD-text would learn the background alone; ViLD-image needs no boxes."""
    world = write_world(tmp_path / "novel-only", novel_only=True)
    with pytest.raises(DataError) as raised:
        train_head.run(**settings(world, tmp_path / "run", losses="text+image"))
    assert str(raised.value) == (f"{world / 'train.json'}: no base boxes (split field) to label the RoIs: the"
                                 " ViLD-text loss would learn the background alone; give a file with base annotations,"
                                 " or --losses image")
    assert not (tmp_path / "run").exists()
    assert train_head.run(**settings(world, tmp_path / "image", losses="image", text=None, iterations=2))["steps"] == 2


def test_order_is_a_function_of_seed_and_step_and_covers_each_epoch(world):
    from vild_pipe.pipeline.shards import CacheFolder as Folder
    index = CacheIndex.build(Folder.open(world / "proposals"))
    order = StepOrder(index, 4, seed=0, block_images=2, buffer_blocks=2)
    epoch = np.concatenate([order.global_images(step) for step in range(IMAGES // 4)])
    assert sorted(epoch.tolist()) == list(range(IMAGES))
    assert not np.array_equal(epoch, np.arange(IMAGES))
    again = StepOrder(index, 4, seed=0, block_images=2, buffer_blocks=2)
    assert np.array_equal(again.global_images(9), order.global_images(9))
    assert not np.array_equal(StepOrder(index, 4, seed=1).global_images(0), order.global_images(0))
    halves = [StepOrder(index, 4, 0, 2, 2, rank=r, world_size=2) for r in range(2)]
    selection = RowSelection(text=True, image=False, sample_rois=None)
    ground_truth = {int(i): (np.zeros((0, 4), np.float32), np.zeros(0, np.int64)) for i in index.image_ids}
    single = [b.features for b in StepLoader(order, selection, ground_truth, 3, 8, workers=0)]
    for workers in (0, 2):
        parts = [[b.features for b in StepLoader(h, selection, ground_truth, 3, 8, workers=workers)] for h in halves]
        assert all(torch.equal(torch.cat([a, b]), s) for a, b, s in zip(*parts, single))


def test_loader_workers_that_would_overfill_shared_memory_are_not_started(world, monkeypatch, caplog):
    """Windows travel from the workers through /dev/shm; too little of it lost them and hung the step."""
    index = CacheIndex.build(CacheFolder.open(world / "proposals"), CacheFolder.open(world / "embeddings"))
    order = StepOrder(index, 4, seed=0, block_images=2, buffer_blocks=2)
    selection = RowSelection(text=True, image=True, sample_rois=None)
    ground_truth = {int(i): (np.zeros((0, 4), np.float32), np.zeros(0, np.int64)) for i in index.image_ids}
    sent = [sum(array.nbytes for array in arrays.values())
            for _, _, arrays in WindowReader(order, selection, ground_truth, 0, IMAGES // 4)]
    estimate = window_bytes(order, selection)
    assert 0.8 * np.mean(sent) < estimate < 1.25 * np.mean(sent)

    expected = [b.features for b in StepLoader(order, selection, ground_truth, 0, 3, workers=0)]
    for free, started in ((2 * 3 * estimate + 1, 2), (3 * estimate, 1), (2 * estimate, 0)):   # prefetch 2 + 1
        monkeypatch.setattr("shutil.disk_usage", lambda folder: SimpleNamespace(free=int(free)))
        caplog.clear()
        loader = StepLoader(order, selection, ground_truth, 0, 3, workers=2, prefetch=2)
        assert loader.loader.num_workers == started
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == (started < 2) and all(m.startswith("/dev/shm: ") for m in warned)
        assert all(torch.equal(a.features, b) for a, b in zip(loader, expected))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")   # two torchrun processes of the node share it: half each
    monkeypatch.setattr("shutil.disk_usage", lambda folder: SimpleNamespace(free=int(2 * 2 * 3 * estimate + 2)))
    assert StepLoader(order, selection, ground_truth, 0, 3, workers=2, prefetch=2).loader.num_workers == 2
    monkeypatch.setattr("shutil.disk_usage", lambda folder: SimpleNamespace(free=int(2 * 3 * estimate + 2)))
    assert StepLoader(order, selection, ground_truth, 0, 3, workers=2, prefetch=2).loader.num_workers == 1


def test_each_rank_reads_only_the_rows_of_its_own_images(world, monkeypatch):
    """Under torchrun a window's images are spread over the ranks: reading whole blocks made W ranks read the
    cache W times. Every dataset read is recorded; a rank's reads must cover exactly its images' rows, once."""
    index = CacheIndex.build(CacheFolder.open(world / "proposals"), CacheFolder.open(world / "embeddings"))
    selection = RowSelection(text=True, image=True, sample_rois=None)
    ground_truth = {int(i): (np.zeros((0, 4), np.float32), np.zeros(0, np.int64)) for i in index.image_ids}
    shard_of = {str(folder.shard_path(s)): s for folder in (index.proposals, index.embeddings)
                for s in range(folder.num_shards)}
    reads = []
    original = h5py.Dataset.__getitem__

    def recording(dataset, key):
        reads.append((dataset.name, shard_of[dataset.file.filename], key))
        return original(dataset, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    steps = IMAGES // 4
    for world_size in (1, 2):
        for rank in range(world_size):
            order = StepOrder(index, 4, 0, 2, 2, rank=rank, world_size=world_size)
            reads.clear()
            assert len(list(StepLoader(order, selection, ground_truth, 0, steps, workers=0))) == steps
            positions = np.arange(steps * 4)
            mine = [order.image_at(p) for p in positions[order.is_mine(positions)]]
            expected = sorted((int(index.shard[i]), int(index.row_starts[index.shard[i]][index.position[i]]) + row)
                              for i in mine for row in range(index.rows(i)))
            for name in ("/features", "/emb"):
                rows = sorted((shard, row) for dataset, shard, key in reads if dataset == name
                              for row in range(key.start, key.stop))
                assert rows == expected, (name, rank, world_size)


def start_driver(tmp_path, arguments):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    return subprocess.Popen([sys.executable, str(script), json.dumps(arguments)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            start_new_session=True)


def test_sigkill_then_rerun_gives_the_weights_of_an_uninterrupted_run(world, reference, tmp_path):
    run_dir = tmp_path / "killed"
    process = start_driver(tmp_path, settings(world, run_dir, workers=1))
    deadline = time.monotonic() + 60
    path = run_dir / train_head.METRICS_NAME
    while not (path.is_file() and len(path.read_text().splitlines()) >= 10):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no step 10 within 60 s"
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    saved = load_checkpoint(run_dir / CHECKPOINT_NAME)
    assert saved is not None and 8 <= saved["step"] < 40
    assert (run_dir / RUN_LOCK_NAME).is_file()  # the killed run's, taken over as stale
    summary = train_head.run(**settings(world, run_dir))
    assert summary["trained_steps"] == 40 - saved["step"] and not (run_dir / RUN_LOCK_NAME).exists()
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 41))
    expected = head_weights(reference[0])
    assert all(torch.equal(expected[k], v) for k, v in head_weights(run_dir).items())


def test_a_second_run_of_a_folder_being_trained_is_refused(world, tmp_path):
    """The same command started twice would interleave checkpoints and metric lines: the second is refused while
    the first lives, naming it."""
    run_dir = tmp_path / "busy"
    process = start_driver(tmp_path, settings(world, run_dir, iterations=100_000, checkpoint_every=100_000))
    deadline = time.monotonic() + 60
    while not ((run_dir / train_head.METRICS_NAME).is_file() and (run_dir / RUN_LOCK_NAME).is_file()):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "no first step within 60 s"
        time.sleep(0.01)
    try:
        with pytest.raises(VildError) as refused:
            train_head.run(**settings(world, run_dir, iterations=100_000, checkpoint_every=100_000))
        assert str(refused.value).startswith(f"{run_dir}: pid {process.pid} on ")
        assert "is training in this run folder; wait for it to end or stop it" in str(refused.value)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.communicate()
    assert not (run_dir / RUN_LOCK_NAME).exists()   # a stopped run lets go of the folder


def test_a_run_folder_held_from_another_host_says_when_a_killed_runs_lock_is_taken_over(tmp_path):
    """A node that died with its run leaves the lock, which no pid check can clear from here: the refusal says how
    long it holds, so a requeued job knows when to come back. Ranks other than the main one take no lock."""
    holder = {"pid": 4242, "host": "node-elsewhere", "since": "2026-11-27T09:00:00+00:00", "token": "00"}
    (tmp_path / RUN_LOCK_NAME).write_text(json.dumps(holder))
    with pytest.raises(VildError) as refused, run_folder_lock(tmp_path):
        pass
    assert str(refused.value) == (
        f"{tmp_path}: pid 4242 on node-elsewhere since 2026-11-27T09:00:00+00:00 is training in this run folder;"
        f" wait for it to end or stop it (should it have been killed, the next run takes over"
        f" {tmp_path / RUN_LOCK_NAME}: on its host at once, elsewhere 10 min after its last heartbeat)")
    with run_folder_lock(tmp_path, main_process=False):
        assert json.loads((tmp_path / RUN_LOCK_NAME).read_text()) == holder


def test_under_torchrun_a_held_run_folder_stops_every_rank_with_its_one_line(world, tmp_path):
    """Only rank 0 takes the run folder; the others learn that it could not, and stop with a line of their own
    rather than failing in their next collective."""
    run_dir = tmp_path / "ddp"
    run_dir.mkdir()
    script = tmp_path / "driver.py"
    # One write a line (under PIPE_BUF, so atomic): the two ranks share the pipe, and print() with
    # PYTHONUNBUFFERED writes its pieces apart.
    refusing = DRIVER.replace("except TrainingStopped", "except VildError as refused:\n"
                              "    sys.stdout.write(f'REFUSED {refused}\\n')\n    sys.exit(2)\nexcept TrainingStopped")
    script.write_text(refusing.replace("import TrainingStopped",
                                       "import TrainingStopped\nfrom vild_pipe.errors import VildError"))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(script), json.dumps(settings(world, run_dir, iterations=6))]
    lock, _ = ShardLock.acquire(run_dir / RUN_LOCK_NAME)
    with lock:
        process = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ,
                                                                                           "OMP_NUM_THREADS": "1"})
    refusals = sorted(line for line in process.stdout.splitlines() if line.startswith("REFUSED"))
    assert process.returncode != 0 and len(refusals) == 2, process.stdout + process.stderr
    assert refusals[0].startswith(f"REFUSED {run_dir}: pid {os.getpid()} on ")   # rank 0
    assert refusals[1] == f"REFUSED {run_dir}: the main process could not take run.lock (its error says why)"
    assert list(run_dir.iterdir()) == []   # the refused run wrote nothing; our lock is released


def test_torchrun_two_processes_train_what_one_process_trains(world, tmp_path):
    short = dict(iterations=6)
    train_head.run(**settings(world, tmp_path / "single", **short))
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(script), json.dumps(settings(world, tmp_path / "ddp", **short))]
    run_to_end(command)
    expected = head_weights(tmp_path / "single")
    for name, tensor in head_weights(tmp_path / "ddp").items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    ddp, single = metrics(tmp_path / "ddp"), metrics(tmp_path / "single")
    assert [r["step"] for r in ddp] == list(range(1, 7))
    assert [r["rois"] for r in ddp] == [r["rois"] for r in single]
