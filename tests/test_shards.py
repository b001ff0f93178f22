"""The sharded HDF5 cache library: round trips, atomic shards, manifests, locks, work splits, failures."""
import builtins
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import subprocess
import sys
import time
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from vild_pipe.errors import DataError, VildError
from vild_pipe.pipeline import shards
from vild_pipe.pipeline.shards import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    CacheFolder,
    RowField,
    ShardReader,
    ShardWriter,
    Worker,
    bytes_per_row,
    claim_shard,
    estimate_cache_bytes,
    format_bytes,
    parse_shard_option,
    shard_image_ranges,
    write_text_atomically,
)

from child_processes import dead_pid

FIELDS = {
    "boxes": RowField("float32", (4,), "xyxy in original image pixels"),
    "scores": RowField("float32", (), "objectness"),
    "is_gt": RowField("bool", (), "row is a ground-truth box"),
    "features": RowField("float16", (4, 3, 3), "RoIAlign features"),
}


def open_cache(path, *, config=None, inputs=None, num_shards=4, stage="dump-proposals", overwrite=False):
    return CacheFolder.open_or_create(
        path,
        stage=stage,
        config={"top_n": 5, "nms": 0.7} if config is None else config,
        inputs={"model": "rpn.pt", "weights_sha256": "ab" * 32} if inputs is None else inputs,
        fields=FIELDS,
        num_shards=num_shards,
        images_per_shard=3,
        overwrite=overwrite,
    )


def image_rows(rng, num_rows):
    return {
        "boxes": rng.uniform(0, 100, (num_rows, 4)),
        "scores": rng.uniform(0, 1, num_rows).astype(np.float32),
        "is_gt": rng.uniform(0, 1, num_rows) > 0.5,
        "features": rng.standard_normal((num_rows, 4, 3, 3)).astype(np.float32),
    }


def write_shard(folder, index, rows_per_image, seed=0, first_image_id=None):
    """Write shard `index` with one image per entry of rows_per_image; returns {image_id: rows}."""
    rng = np.random.default_rng(seed + index)
    first = index * 100 if first_image_id is None else first_image_id
    written = {}
    with ShardWriter(folder, index) as writer:
        for k, num_rows in enumerate(rows_per_image):
            written[first + k] = image_rows(rng, num_rows)
            writer.add_image(first + k, **written[first + k])
    return written


# ------------------------------------------------------------------------------------------------ round trip


def test_round_trip_with_empty_images_and_an_all_empty_shard(tmp_path):
    folder = open_cache(tmp_path / "cache")
    written = write_shard(folder, 0, [3, 0, 5])
    write_shard(folder, 1, [0, 0])
    write_shard(folder, 2, [])

    reader = folder.read_shard(0)
    assert reader.image_ids.tolist() == [0, 1, 2]
    assert reader.row_start.tolist() == [0, 3, 3, 8]
    for image_id, rows in written.items():
        got = reader.rows_for(image_id)
        np.testing.assert_array_equal(got["boxes"], rows["boxes"].astype(np.float32))
        np.testing.assert_array_equal(got["scores"], rows["scores"])
        np.testing.assert_array_equal(got["is_gt"], rows["is_gt"])
        np.testing.assert_array_equal(got["features"], rows["features"].astype(np.float16))
        assert got["features"].dtype == np.float16 and got["is_gt"].dtype == bool
    iterated = dict(iter(reader))
    assert sorted(iterated) == [0, 1, 2]
    np.testing.assert_array_equal(iterated[2]["boxes"], written[2]["boxes"].astype(np.float32))
    whole = reader.arrays()
    assert whole["features"].shape == (8, 4, 3, 3)
    with pytest.raises(KeyError):
        reader.rows_for(12345)
    reader.close()

    with folder.read_shard(1) as empty_images:
        assert empty_images.image_ids.tolist() == [100, 101] and empty_images.num_rows == 0
        assert empty_images.rows_for(101)["features"].shape == (0, 4, 3, 3)
    with folder.read_shard(2) as empty_shard:
        assert empty_shard.num_images == 0
        assert {name: a.shape for name, a in empty_shard.arrays().items()} == {
            "boxes": (0, 4), "scores": (0,), "is_gt": (0,), "features": (0, 4, 3, 3)
        }
    assert folder.complete_shards() == [0, 1, 2]


def test_plain_h5py_reads_a_shard_with_schema_attributes_and_bounded_uncompressed_chunks(tmp_path):
    big_fields = {"emb": RowField("float16", (512,), "CLIP embedding"), "scores": RowField("float32", ())}
    folder = CacheFolder.open_or_create(
        tmp_path / "emb", stage="cache-embeddings", config={}, inputs={}, fields=big_fields, num_shards=1,
        images_per_shard=4,
    )
    rng = np.random.default_rng(0)
    with ShardWriter(folder, 0) as writer:
        for image_id in range(4):
            writer.add_image(image_id, emb=rng.standard_normal((700, 512)), scores=rng.uniform(size=700))
    with h5py.File(folder.shard_path(0), "r") as h5:
        assert h5.attrs["schema_version"] == shards.SCHEMA_VERSION
        assert h5.attrs["cache_fingerprint"] == folder.fingerprint
        assert h5["emb"].attrs["description"] == "CLIP embedding"
        assert h5["row_start"][-1] == h5["emb"].shape[0] == 2800
        for name in ("emb", "scores"):
            dataset = h5[name]
            chunk_bytes = dataset.dtype.itemsize * np.prod(dataset.chunks)
            assert dataset.compression is None
            assert 10 * 1024 <= chunk_bytes <= 1 << 20, (name, dataset.chunks)


def test_manifest_records_identity_and_finalize_lists_every_shard_once(tmp_path):
    folder = open_cache(tmp_path / "cache", num_shards=3)
    manifest = json.loads((folder.path / "manifest.json").read_text())
    assert manifest["stage"] == "dump-proposals" and manifest["config"] == {"top_n": 5, "nms": 0.7}
    assert manifest["inputs"]["weights_sha256"] == "ab" * 32
    assert manifest["fields"]["features"] == {"dtype": "float16", "shape": [4, 3, 3]}
    assert manifest["field_descriptions"]["boxes"] == "xyxy in original image pixels"
    assert manifest["fingerprint"] == folder.fingerprint and manifest["complete"] is False

    write_shard(folder, 0, [2, 1])
    with ShardWriter(folder, 2) as writer:
        writer.add_image(7, **image_rows(np.random.default_rng(1), 4))
        writer.skip_image(8, "cannot decode JPEG")
    assert folder.finalize() is False
    with pytest.raises(DataError, match=r"1 of 3 shards missing \(shard-00001\)"):
        folder.require_complete()

    write_shard(folder, 1, [0])
    summary = folder.manifest_summary()
    assert summary["images"] == 4 and summary["rows"] == 7 and summary["complete_shards"] == 3
    assert summary["skipped_images"] == [{"image_id": 8, "reason": "cannot decode JPEG"}]
    assert folder.finalize() is True
    folder.require_complete()
    first = (folder.path / "manifest.json").read_bytes()
    assert folder.finalize() is True
    assert (folder.path / "manifest.json").read_bytes() == first
    finalized = json.loads(first)
    assert finalized["complete"] is True and [s["shard"] for s in finalized["shards"]] == [0, 1, 2]
    assert finalized["fingerprint"] == folder.fingerprint

    reader_view = CacheFolder.open(folder.path, stage="dump-proposals")
    assert reader_view.fingerprint == folder.fingerprint and reader_view.fields == FIELDS
    with pytest.raises(DataError, match="holds a dump-proposals cache, expected a cache-embeddings cache"):
        CacheFolder.open(folder.path, stage="cache-embeddings")
    with pytest.raises(DataError, match="not a vild-pipe cache"):
        CacheFolder.open(tmp_path / "nothing-here")


def test_add_image_rejects_rows_that_do_not_fit_the_fields(tmp_path):
    folder = open_cache(tmp_path / "cache")
    rows = image_rows(np.random.default_rng(0), 3)
    with ShardWriter(folder, 0) as writer:
        with pytest.raises(ValueError, match="fields"):
            writer.add_image(1, boxes=rows["boxes"])
        with pytest.raises(ValueError, match=r"boxes: rows of shape \(5,\)"):
            writer.add_image(1, **{**rows, "boxes": np.zeros((3, 5))})
        with pytest.raises(ValueError, match="different row counts"):
            writer.add_image(1, **{**rows, "scores": np.zeros(2, np.float32)})
        with pytest.raises(TypeError):
            writer.add_image(1, **{**rows, "is_gt": np.ones(3)})
        writer.add_image(1, **rows)
        with pytest.raises(ValueError, match="already added"):
            writer.add_image(1, **rows)
    assert folder.read_shard(0).image_ids.tolist() == [1]


# ------------------------------------------------------------------------------------------------ atomicity


def test_exception_mid_shard_leaves_no_shard_no_tmp_and_a_rerun_writes_it(tmp_path):
    folder = open_cache(tmp_path / "cache")
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        with ShardWriter(folder, 1) as writer:
            writer.add_image(5, **image_rows(np.random.default_rng(0), 2))
            raise RuntimeError("CUDA out of memory")
    assert sorted(os.listdir(folder.path)) == ["manifest.json"]
    assert folder.complete_shards() == []

    def fail_on_features(group, name, **kwargs):
        if name == "features":
            raise RuntimeError("h5py blew up halfway")
        return real_create(group, name, **kwargs)

    real_create = h5py.Group.create_dataset
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(h5py.Group, "create_dataset", fail_on_features)
        with pytest.raises(RuntimeError, match="halfway"):
            write_shard(folder, 1, [2])
    assert sorted(os.listdir(folder.path)) == ["manifest.json"]

    write_shard(folder, 1, [2])
    assert folder.complete_shards() == [1]


# ------------------------------------------------------------------------------------------------ fingerprints


def test_same_settings_resume_different_settings_are_refused_naming_the_keys(tmp_path):
    folder = open_cache(tmp_path / "cache")
    write_shard(folder, 0, [1, 2])
    resumed = open_cache(tmp_path / "cache", config={"nms": 0.7, "top_n": 5})
    assert resumed.fingerprint == folder.fingerprint and resumed.complete_shards() == [0]
    as_tuple = open_cache(tmp_path / "tuple", config={"top_n": 5, "nms": 0.7, "sizes": (1, 2)})
    as_list = open_cache(tmp_path / "tuple", config={"top_n": 5, "nms": 0.7, "sizes": [1, 2]})
    assert as_list.fingerprint == as_tuple.fingerprint
    reworded = CacheFolder.open_or_create(
        tmp_path / "cache", stage="dump-proposals", config={"top_n": 5, "nms": 0.7},
        inputs={"model": "rpn.pt", "weights_sha256": "ab" * 32},
        fields={**FIELDS, "scores": RowField("float32", (), "reworded")}, num_shards=4, images_per_shard=3,
    )
    assert reworded.fingerprint == folder.fingerprint, "descriptions are documentation, not identity"

    with pytest.raises(VildError) as caught:
        other_weights = {"model": "rpn.pt", "weights_sha256": "cd" * 32}
        open_cache(tmp_path / "cache", config={"top_n": 9, "nms": 0.7}, inputs=other_weights)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(tmp_path / "cache"))
    assert message == (f"{tmp_path / 'cache'}: cache was made with a different config or inputs (config.top_n: 5 -> 9;"
                       " inputs.weights_sha256: abababababab -> cdcdcdcdcdcd); use another folder or --overwrite")
    with pytest.raises(VildError, match=r"\(num_shards: 4 -> 5\)"):
        open_cache(tmp_path / "cache", num_shards=5)
    with pytest.raises(VildError) as caught:  # a long value is cut between items
        open_cache(tmp_path / "cache", config={"top_n": 5, "nms": 0.7, "classes": list("abcdefghijklmnop")})
    assert '(config.classes: (absent) -> ["a", "b", "c", "d", "e", "f", "g", ...);' in str(caught.value)
    assert folder.complete_shards() == [0]


def test_an_input_copied_renamed_or_linked_elsewhere_is_the_same_input(tmp_path):
    """Inputs are known by their content hash; their names are where they were read (a node's local copy)."""
    def inputs(checkpoint, sha256, annotations="train.json"):
        return {"detector": {"checkpoint": checkpoint, "sha256": sha256, "step": 9},
                "annotations": {"file": annotations, "sha256": "12" * 32},
                "clip": {"model": "ViT-B/32", "sha256": None}}
    folder = open_cache(tmp_path / "cache", inputs=inputs("model.pt", "ab" * 32))
    write_shard(folder, 0, [1, 2])
    copied = open_cache(tmp_path / "cache", inputs=inputs("best.pt", "ab" * 32, annotations="train-link.json"))
    assert copied.fingerprint == folder.fingerprint and copied.complete_shards() == [0]
    assert copied.inputs["detector"]["checkpoint"] == "model.pt", "the manifest keeps the first run's names"
    assert open_cache(tmp_path / "elsewhere", inputs=inputs("best.pt", "ab" * 32)).fingerprint == folder.fingerprint

    with pytest.raises(VildError) as caught:
        open_cache(tmp_path / "cache", inputs=inputs("model.pt", "cd" * 32))
    assert "(inputs.detector.sha256: abababababab -> cdcdcdcdcdcd)" in str(caught.value)
    named = {**inputs("model.pt", "ab" * 32), "clip": {"model": "RN50", "sha256": None}}
    with pytest.raises(VildError, match=r"inputs\.clip\.model: \"ViT-B/32\" -> \"RN50\""):
        open_cache(tmp_path / "cache", inputs=named)   # without a hash the name is what identifies it


def test_a_cache_whose_fingerprint_still_covers_its_input_names_is_resumed(tmp_path):
    """Caches made before names left the fingerprint match by content, and keep their fingerprint."""
    folder = open_cache(tmp_path / "cache", inputs={"detector": {"checkpoint": "model.pt", "sha256": "ab" * 32}})
    manifest = json.loads((folder.path / MANIFEST_NAME).read_text())
    manifest["fingerprint"] = "0" * 32
    (folder.path / MANIFEST_NAME).write_text(json.dumps(manifest))
    resumed = open_cache(tmp_path / "cache", inputs={"detector": {"checkpoint": "copy.pt", "sha256": "ab" * 32}})
    assert resumed.fingerprint == "0" * 32


def test_overwrite_replaces_only_cache_files_and_never_a_matching_cache_or_another_stage(tmp_path):
    folder = open_cache(tmp_path / "cache")
    write_shard(folder, 0, [1])
    (folder.path / "notes.txt").write_text("mine")
    assert open_cache(tmp_path / "cache", overwrite=True).complete_shards() == [0]

    replaced = open_cache(tmp_path / "cache", config={"top_n": 9, "nms": 0.7}, overwrite=True)
    assert replaced.fingerprint != folder.fingerprint and replaced.complete_shards() == []
    assert sorted(os.listdir(folder.path)) == ["manifest.json", "notes.txt"]
    assert json.loads((folder.path / "manifest.json").read_text())["config"]["top_n"] == 9

    with pytest.raises(VildError, match="holds a dump-proposals cache, not a cache-embeddings one"):
        open_cache(tmp_path / "cache", stage="cache-embeddings", overwrite=True)


def test_a_cache_of_a_newer_schema_is_refused_with_upgrade_advice_and_many_changes_are_cut(tmp_path):
    folder = open_cache(tmp_path / "cache")
    manifest = json.loads((folder.path / MANIFEST_NAME).read_text())
    manifest.update(schema_version=SCHEMA_VERSION + 1, config={**manifest["config"], "new_setting": 1})
    (folder.path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(VildError, match=rf"cache was made by a newer vild-pipe \(cache schema {SCHEMA_VERSION + 1};"
                                        rf" this one reads {SCHEMA_VERSION}\): upgrade vild-pipe to resume it; use"):
        open_cache(tmp_path / "cache")

    open_cache(tmp_path / "many")
    with pytest.raises(VildError) as caught:
        open_cache(tmp_path / "many", config={f"k{i}": i for i in range(6)})
    assert caught.value.args[0].endswith("config.k3: (absent) -> 3; and 4 more); use another folder or --overwrite")


def test_overwrite_refuses_while_a_shard_of_the_old_cache_is_being_written(tmp_path):
    folder = open_cache(tmp_path / "cache")
    lock = claim_shard(folder, 2)[0]
    with lock, pytest.raises(VildError, match=r"shard-00002.lock: pid \d+ on .* is writing this shard"):
        open_cache(tmp_path / "cache", config={"top_n": 1}, overwrite=True)
    assert json.loads((folder.path / "manifest.json").read_text())["fingerprint"] == folder.fingerprint


def test_a_shard_finished_after_its_cache_was_replaced_is_discarded(tmp_path):
    folder = open_cache(tmp_path / "cache")
    writer = ShardWriter(folder, 0)
    writer.add_image(1, **image_rows(np.random.default_rng(0), 2))
    open_cache(tmp_path / "cache", config={"top_n": 1}, overwrite=True)
    with pytest.raises(VildError, match="the cache was replaced by another run"):
        writer.close()
    assert sorted(os.listdir(folder.path)) == ["manifest.json"]


def test_shards_without_a_manifest_are_refused(tmp_path):
    folder = open_cache(tmp_path / "cache")
    write_shard(folder, 0, [1])
    (folder.path / "manifest.json").unlink()
    with pytest.raises(VildError, match="left without its manifest.json"):
        open_cache(tmp_path / "cache")
    assert open_cache(tmp_path / "cache", overwrite=True).complete_shards() == []


# ------------------------------------------------------------------------------------------------ corrupt files


def test_truncated_or_corrupt_shards_raise_data_error_not_h5py_tracebacks(tmp_path):
    folder = open_cache(tmp_path / "cache")
    write_shard(folder, 0, [40, 2])
    write_shard(folder, 1, [3])
    path = folder.shard_path(0)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)
    with pytest.raises(DataError) as caught:
        folder.read_shard(0)
    message = str(caught.value)
    assert message.startswith(str(path)) and "truncated or corrupt HDF5 shard" in message
    assert "delete it and rerun" in message and "\n" not in message

    path.write_bytes(b"not an hdf5 file" * 64)
    with pytest.raises(DataError, match="truncated or corrupt HDF5 shard"):
        folder.read_shard(0)

    with h5py.File(folder.shard_path(1), "r+") as h5:
        h5["row_start"][-1] = 99
    with pytest.raises(DataError, match=r"dataset \w+ has 3 rows, row_start ends at 99"):
        folder.read_shard(1)
    with h5py.File(folder.shard_path(1), "r+") as h5:
        h5["row_start"][-1] = 3
        del h5["features"]
    with pytest.raises(DataError, match="dataset features missing"):
        folder.read_shard(1)
    with h5py.File(folder.shard_path(1), "r+") as h5:
        h5["features"] = np.zeros((3, 4, 3, 3), np.float32)
    with pytest.raises(DataError, match=r"dataset features is float32 rows .* the manifest says float16"):
        folder.read_shard(1)
    with pytest.raises(DataError, match="shard is not complete"):
        folder.read_shard(3)
    with pytest.raises(DataError, match="shard file missing"):
        ShardReader(tmp_path / "nope.h5")


# ------------------------------------------------------------------------------------------------ locks


def test_a_live_lock_excludes_other_writers_until_released(tmp_path, caplog):
    folder = open_cache(tmp_path / "cache")
    lock = claim_shard(folder, 1)[0]
    assert lock is not None and folder.lock_path(1).exists()
    holder = json.loads(folder.lock_path(1).read_text())
    assert holder["pid"] == os.getpid()
    with caplog.at_level(logging.INFO, logger=shards.__name__):
        assert claim_shard(folder, 1)[0] is None
    assert f"skipping shard-00001: another run is writing it (pid {os.getpid()}" in caplog.text
    with lock, ShardWriter(folder, 1) as writer:
        writer.add_image(3, **image_rows(np.random.default_rng(0), 1))
    assert not folder.lock_path(1).exists()
    assert claim_shard(folder, 1)[0] is None, "a complete shard is not handed out again"
    again = claim_shard(folder, 2)[0]
    assert again is not None
    again.release()


def test_a_shard_completed_while_we_took_its_lock_is_not_handed_out(tmp_path, monkeypatch):
    folder = open_cache(tmp_path / "cache")
    real_acquire = shards.ShardLock.acquire.__func__

    def another_run_finishes_first(cls, path):
        write_shard(folder, 0, [1])
        return real_acquire(cls, path)

    monkeypatch.setattr(shards.ShardLock, "acquire", classmethod(another_run_finishes_first))
    assert claim_shard(folder, 0)[0] is None
    assert not folder.lock_path(0).exists()


def test_rewriting_a_small_file_removes_its_own_stale_temp_files_only(tmp_path, caplog):
    """A kill mid-write of metrics.md (or a drawing) leaves its temp file; the next write of it sweeps it."""
    host, gone = shards._HOST, dead_pid()
    stale = tmp_path / f"metrics.md.{gone}@{host}.tmp"
    live = tmp_path / f"metrics.md.{os.getppid()}@{host}.tmp"  # another process, still running
    other_file = tmp_path / f"metrics.json.{gone}@{host}.tmp"
    for temp in (stale, live, other_file):
        temp.write_bytes(b"half a table")
    with caplog.at_level(logging.INFO, logger=shards.__name__):
        write_text_atomically(tmp_path / "metrics.md", "| table |\n")
    assert (tmp_path / "metrics.md").read_text() == "| table |\n"
    assert f"removed stale metrics.md.{gone}@{host}.tmp from a killed run" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["metrics.md", live.name, other_file.name])


def test_stale_locks_and_tmp_files_of_killed_runs_are_removed(tmp_path, caplog):
    folder = open_cache(tmp_path / "cache")
    host, gone = shards._HOST, dead_pid()
    folder.lock_path(0).write_text(json.dumps({"pid": gone, "host": host, "since": "earlier", "token": "a"}))
    folder.lock_path(1).write_text(
        json.dumps({"pid": os.getpid(), "host": host, "pid_start": -5, "since": "earlier", "token": "b"})
    )
    folder.lock_path(2).write_text(json.dumps({"pid": 1, "host": "other-node", "since": "now", "token": "c"}))
    folder.lock_path(3).write_text(json.dumps({"pid": 1, "host": "other-node", "since": "earlier", "token": "d"}))
    hours_ago = time.time() - 7200
    os.utime(folder.lock_path(3), (hours_ago, hours_ago))
    stale_tmp = folder.path / f"shard-00000.h5.{gone}@{host}.tmp"
    live_tmp = folder.path / f"shard-00002.h5.{os.getpid()}@{host}.tmp"
    stale_tmp.write_bytes(b"half a shard")
    live_tmp.write_bytes(b"being written")

    with caplog.at_level(logging.INFO, logger=shards.__name__):
        reopened = open_cache(tmp_path / "cache")
    assert f"removed stale lock shard-00000.lock (pid {gone} on {host} is no longer running)" in caplog.text
    assert f"removed stale shard-00000.h5.{gone}@{host}.tmp from a killed run" in caplog.text
    assert "removed stale lock shard-00003.lock (pid 1 on other-node stopped refreshing it" in caplog.text
    remaining = set(os.listdir(folder.path))
    assert remaining == {"manifest.json", "shard-00002.lock", live_tmp.name}, "pid reuse (wrong start) is stale too"

    assert claim_shard(reopened, 2)[0] is None, "a fresh lock of another host is respected"
    for index in (0, 1, 3):
        lock = claim_shard(reopened, index)[0]
        assert lock is not None
        lock.release()


def test_a_writer_in_another_pid_namespace_of_this_host_name_is_not_taken_for_dead(tmp_path):
    """Containers run with --net=host share the host name, not the process ids: such a writer's pid means
    nothing here, so its lock and temp files stand until its heartbeat stops, as another machine's do."""
    folder = open_cache(tmp_path / "cache")
    name = shards._HOST.split("~")[0]
    assert shards._HOST != name or not os.path.exists("/proc/self/ns/pid")
    elsewhere = f"{name}~1"
    folder.lock_path(0).write_text(json.dumps({"pid": dead_pid(), "host": elsewhere, "since": "now", "token": "a"}))
    temp = folder.path / f"shard-00000.h5.{dead_pid()}@{elsewhere}.tmp"
    temp.write_bytes(b"being written in the other container")
    reopened = open_cache(tmp_path / "cache")
    assert claim_shard(reopened, 0)[0] is None and temp.exists()


def test_claims_remove_their_shards_stale_temp_files_from_one_listing_a_run(tmp_path, caplog, monkeypatch):
    """A run with many shards lists its folder once for the claims, not once a claim (quadratic)."""
    folder = open_cache(tmp_path / "cache")
    host, gone = shards._HOST, dead_pid()
    stale = [folder.path / f"shard-0000{index}.h5.{gone}@{host}.tmp" for index in (1, 3)]
    live = folder.path / f"shard-00002.json.{os.getpid()}@{host}.tmp"
    for temp in (*stale, live):
        temp.write_bytes(b"part of a shard")
    listings = []
    list_folder = folder._names
    monkeypatch.setattr(folder, "_names", lambda: listings.append(1) or list_folder())
    with caplog.at_level(logging.INFO, logger=shards.__name__):
        for index in range(4):
            claim_shard(folder, index)[0].release()
            if index == 1:
                assert not stale[0].exists() and stale[1].exists(), "removed as its own shard is claimed"
    assert len(listings) == 1
    assert [temp.exists() for temp in stale] == [False, False] and live.exists()
    assert caplog.text.count("from a killed run") == 2


KILLED_TAKING_A_LOCK = """
import os, signal, sys
from pathlib import Path
from vild_pipe.pipeline import shards
real_link, when = os.link, sys.argv[2]
def link_then_die(src, dst):
    if when == "after":
        real_link(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)
os.link = link_then_die
shards.ShardLock.acquire(Path(sys.argv[1]))
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_run_killed_while_taking_a_lock_does_not_hold_up_the_next_run(tmp_path, caplog, when):
    """The lock appears whole or not at all, so the rerun at once takes the shard instead of waiting it out."""
    folder = open_cache(tmp_path / "cache")
    child = subprocess.Popen([sys.executable, "-c", KILLED_TAKING_A_LOCK, str(folder.lock_path(4)), when])
    assert child.wait() == -9
    temp = f"shard-00004.lock.{child.pid}@{shards._HOST}.tmp"
    expected = {"manifest.json", temp} | ({"shard-00004.lock"} if when == "after" else set())
    assert set(os.listdir(folder.path)) == expected
    if when == "after":
        assert set(json.loads(folder.lock_path(4).read_text())) >= {"pid", "host", "token"}, "whole, never empty"

    with caplog.at_level(logging.INFO, logger=shards.__name__):
        lock = claim_shard(open_cache(tmp_path / "cache"), 4)[0]
    assert lock is not None
    lock.release()
    assert f"removed stale {temp} from a killed run" in caplog.text
    assert ("removed stale lock shard-00004.lock (pid" in caplog.text) == (when == "after")
    assert sorted(os.listdir(folder.path)) == ["manifest.json"]


def test_lock_heartbeat_refreshes_the_lock_file(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "LOCK_HEARTBEAT_S", 0.05)
    folder = open_cache(tmp_path / "cache")
    with claim_shard(folder, 0)[0]:
        os.utime(folder.lock_path(0), (0, 0))
        deadline = time.time() + 5
        while folder.lock_path(0).stat().st_mtime == 0 and time.time() < deadline:
            time.sleep(0.02)
        assert folder.lock_path(0).stat().st_mtime > time.time() - 60


# ------------------------------------------------------------------------------------------------ work split


@pytest.mark.parametrize("text, expected", [("0/1", (0, 1)), ("3/4", (3, 4)), (" 1 / 2 ", (1, 2))])
def test_parse_shard_option_accepts_zero_based_i_of_n(text, expected):
    assert parse_shard_option(text) == expected


@pytest.mark.parametrize("text", ["3/2", "2/2", "0/0", "-1/2", "a/b", "1", "1/2/3", ""])
def test_parse_shard_option_errors_are_one_line(text):
    with pytest.raises(VildError) as caught:
        parse_shard_option(text)
    assert str(caught.value).startswith(f"--shard {text}:") and "\n" not in str(caught.value)


@pytest.mark.parametrize("num_jobs", [1, 2, 3, 5])
@pytest.mark.parametrize("world_sizes", [(1,), (2,), (3,), (2, 1, 3)], ids=["W1", "W2", "W3", "W-differs-by-job"])
def test_jobs_and_their_ranks_cover_every_shard_exactly_once(num_jobs, world_sizes):
    """Whatever number of torchrun ranks each --shard job runs with (a job requeued on a smaller node)."""
    for num_shards in (0, 1, 7, 16, 31):
        taken = []
        for job in range(num_jobs):
            world_size = world_sizes[job % len(world_sizes)]
            for rank in range(world_size):
                taken += Worker.of((job, num_jobs), rank, world_size).shards(num_shards)
        assert sorted(taken) == list(range(num_shards))


def test_worker_arguments_are_checked_and_image_ranges_tile_the_input():
    assert Worker.of(None, 1, 2) == Worker(0, 1, 1, 2) and Worker.of(None, 1, 2).shards(5) == [1, 3]
    assert Worker.of((1, 2), 1, 2).shards(12) == [3, 7, 11]
    assert [str(Worker.of(*args)) for args in ((None,), ((1, 2),), (None, 1, 2), ((1, 2), 0, 3))] == [
        "the only worker", "job 1 of 2", "rank 1 of 2", "job 1 of 2, rank 0 of 3"]
    with pytest.raises(ValueError):
        Worker.of((0, 2), 3, 3)
    with pytest.raises(ValueError):
        Worker(2, 2)
    ranges = shard_image_ranges(10, 4)
    assert [(r.start, r.stop) for r in ranges] == [(0, 4), (4, 8), (8, 10)]
    assert shard_image_ranges(0, 4) == []
    with pytest.raises(VildError, match="at least 1"):
        shard_image_ranges(10, 0)


def test_cost_helpers():
    features = {"features": ("float16", (256, 7, 7))}
    assert bytes_per_row(features) == 25088
    assert format_bytes(bytes_per_row(features)) == "24.5 KiB"
    assert bytes_per_row(FIELDS) == 4 * 4 + 4 + 1 + 2 * 36
    assert estimate_cache_bytes(features, num_rows=300, num_images=1) == 300 * 25088 + 16


def test_the_size_estimate_holds_a_written_shard_with_a_little_to_spare(tmp_path):
    """The estimate logged before a cache is written is what its files take: arrays plus HDF5's own."""
    folder = open_cache(tmp_path / "cache", num_shards=1)
    rows = {"boxes": np.zeros((40, 4), np.float32), "scores": np.zeros(40, np.float32), "is_gt": np.zeros(40, bool),
            "features": np.ones((40, 4, 3, 3), np.float16)}
    with ShardWriter(folder, 0) as writer:
        for image_id in (1, 2, 3):
            writer.add_image(image_id, **rows)
    written = folder.shard_path(0).stat().st_size
    assert written <= estimate_cache_bytes(FIELDS, num_rows=120, num_images=3, num_shards=1) <= written * 1.25
    assert format_bytes(512) == "512 B"
    assert format_bytes(100_000 * 300 * 512 * 2) == "28.6 GiB"


def test_sha256_file_identifies_weights_and_names_an_unreadable_file(tmp_path):
    weights = tmp_path / "rpn.pt"
    weights.write_bytes(bytes(range(256)) * 50_000)
    assert shards.sha256_file(weights) == hashlib.sha256(weights.read_bytes()).hexdigest()
    with pytest.raises(VildError) as caught:
        shards.sha256_file(tmp_path / "missing.pt")
    assert str(caught.value) == f"{tmp_path / 'missing.pt'}: cannot read (no such file or directory)"


def test_sha256_file_reads_a_file_once_until_it_changes(tmp_path, monkeypatch):
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"a" * 1000)
    written_long_ago = time.time_ns() - 60 * 10**9
    os.utime(weights, ns=(written_long_ago, written_long_ago))
    first = shards.sha256_file(weights)
    bytes_read = []
    real_open = builtins.open

    def counted_open(*args, **kwargs):
        handle = real_open(*args, **kwargs)
        real_read = handle.read
        handle.read = lambda *a: bytes_read.append(len(block := real_read(*a))) or block
        return handle

    monkeypatch.setattr(builtins, "open", counted_open)
    assert shards.sha256_file(tmp_path / "." / "clip.pt") == first and bytes_read == []  # the same file
    weights.write_bytes(b"b" * 1000)  # same size, new content: read again
    assert shards.sha256_file(weights) == hashlib.sha256(b"b" * 1000).hexdigest() and sum(bytes_read) == 1000


def test_sha256_file_sees_a_rewrite_that_leaves_inode_size_and_times_alike(tmp_path, monkeypatch):
    """File times tick coarsely (a clock tick on Linux before 6.13, 1 or 2 s on some file systems): a file rewritten
    in place within one tick keeps its inode, size and times. Such a file is hashed again, not taken from memory."""
    weights = tmp_path / "clip.pt"
    weights.write_bytes(b"a" * 1000)
    stamped = os.stat(weights)
    real_fstat = os.fstat

    def one_tick_fstat(fd):
        status = real_fstat(fd)
        if status.st_ino != stamped.st_ino:
            return status
        return SimpleNamespace(st_dev=status.st_dev, st_ino=status.st_ino, st_size=status.st_size,
                               st_mtime_ns=stamped.st_mtime_ns, st_ctime_ns=stamped.st_ctime_ns)

    monkeypatch.setattr(os, "fstat", one_tick_fstat)
    assert shards.sha256_file(weights) == hashlib.sha256(b"a" * 1000).hexdigest()
    weights.write_bytes(b"b" * 1000)
    assert shards.sha256_file(weights) == hashlib.sha256(b"b" * 1000).hexdigest()


# ------------------------------------------------------------------------------------------------ two processes


def _fill_shards(path, assigned, results):
    folder = open_cache(path, num_shards=12)
    written = []
    for index in assigned:
        lock = claim_shard(folder, index)[0]
        if lock is None:
            continue
        with lock, ShardWriter(folder, index) as writer:
            writer.add_image(index, **image_rows(np.random.default_rng(index), index % 3))
            time.sleep(0.02)
        written.append(index)
    folder.finalize()
    results.put(written)


@pytest.mark.parametrize(
    "assignments",
    [
        [Worker(0, 2).shards(12), Worker(1, 2).shards(12)],
        [list(range(0, 9)), list(range(3, 12))],
        [list(range(12)), list(range(11, -1, -1))],
    ],
    ids=["disjoint", "overlapping", "opposite-orders"],
)
def test_two_processes_fill_one_folder_and_write_each_shard_once(tmp_path, assignments):
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_fill_shards, args=(tmp_path / "cache", a, results)) for a in assignments]
    for worker in workers:
        worker.start()
    written = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert sorted(written[0] + written[1]) == list(range(12))

    folder = CacheFolder.open(tmp_path / "cache")
    manifest = json.loads((folder.path / "manifest.json").read_text())
    assert manifest["complete"] is True and [s["shard"] for s in manifest["shards"]] == list(range(12))
    assert [s["rows"] for s in manifest["shards"]] == [i % 3 for i in range(12)]
    assert not [name for name in os.listdir(folder.path) if name.endswith((".tmp", ".lock"))]
    for index in range(12):
        with folder.read_shard(index) as reader:
            assert reader.image_ids.tolist() == [index]


# ------------------------------------------------------------------------------------------------ disk full


def test_disk_full_while_writing_a_shard_is_a_vild_error_and_earlier_shards_stay(tmp_path, monkeypatch):
    folder = open_cache(tmp_path / "cache")
    written = write_shard(folder, 0, [2])

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(shards.os, "replace", no_space)
        with pytest.raises(VildError) as caught:
            write_shard(folder, 1, [3])
    assert str(caught.value) == f"{folder.shard_path(1)}: cannot write cache shard (no space left on device)"

    with monkeypatch.context() as patch:
        patch.setattr(h5py.Group, "create_dataset", no_space)
        with pytest.raises(VildError, match="shard-00001.h5: cannot write cache shard \\(no space left on device\\)"):
            write_shard(folder, 1, [3])

    assert sorted(os.listdir(folder.path)) == ["manifest.json", "shard-00000.h5", "shard-00000.json"]
    with folder.read_shard(0) as reader:
        np.testing.assert_array_equal(reader.rows_for(0)["boxes"], written[0]["boxes"].astype(np.float32))


@pytest.fixture
def read_only(monkeypatch):
    """Make writes under a folder fail with EROFS, as on a read-only mount (chmod does not stop root)."""

    def make(root):
        root = str(root)
        write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT

        def refuse(path):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

        def guarded_os_open(path, flags, *args, **kwargs):
            if str(path).startswith(root) and flags & write_flags:
                refuse(path)
            return real_os_open(path, flags, *args, **kwargs)

        def guarded_open(path, mode="r", *args, **kwargs):
            if isinstance(path, (str, os.PathLike)) and str(path).startswith(root) and set(mode) & set("wax+"):
                refuse(path)
            return real_open(path, mode, *args, **kwargs)

        def guarded_mkdir(path, *args, **kwargs):
            if str(path).startswith(root):
                refuse(path)
            return real_mkdir(path, *args, **kwargs)

        def guarded_path_mkdir(path, mode=0o777, parents=False, exist_ok=False):
            """Python < 3.11's Path.mkdir calls the os.mkdir pathlib bound at import, not the patched one."""
            if str(path).startswith(root) and not (exist_ok and path.is_dir()):
                refuse(path)
            return real_path_mkdir(path, mode, parents, exist_ok)

        def guarded_h5_file(name, mode="r", *args, **kwargs):
            if str(name).startswith(root) and mode != "r":
                refuse(name)
            return real_h5_file(name, mode, *args, **kwargs)

        real_os_open, real_open, real_mkdir, real_h5_file = os.open, builtins.open, os.mkdir, h5py.File
        real_path_mkdir = pathlib.Path.mkdir
        monkeypatch.setattr(os, "open", guarded_os_open)
        monkeypatch.setattr(builtins, "open", guarded_open)
        monkeypatch.setattr(os, "mkdir", guarded_mkdir)
        monkeypatch.setattr(pathlib.Path, "mkdir", guarded_path_mkdir)
        monkeypatch.setattr(h5py, "File", guarded_h5_file)

    return make


def test_read_only_folder_is_a_vild_error_naming_the_file(tmp_path, read_only):
    folder = open_cache(tmp_path / "cache")
    write_shard(folder, 0, [1])
    (tmp_path / "empty").mkdir()
    read_only(tmp_path)

    with pytest.raises(VildError, match=r"cache/shard-00001.lock: cannot create lock \(read-only file system\)"):
        claim_shard(folder, 1)[0]
    with pytest.raises(VildError, match=r"cache/shard-00001.h5: cannot write cache shard \(read-only file system\)"):
        write_shard(folder, 1, [2])
    with pytest.raises(VildError, match=r"new: cannot create the cache folder \(read-only file system\)"):
        open_cache(tmp_path / "new")
    with pytest.raises(VildError, match=r"empty/manifest.json: cannot write \(read-only file system\)"):
        open_cache(tmp_path / "empty")
    assert open_cache(tmp_path / "cache").complete_shards() == [0], "an existing cache can still be read"
    assert sorted(os.listdir(folder.path)) == ["manifest.json", "shard-00000.h5", "shard-00000.json"]


def test_made_with_is_compared_on_what_the_first_run_recorded(tmp_path):
    """A setting recorded only since (a cache begun by an older vild-pipe) is unknown for the first run: no
    warning; one the first run recorded and this run changes is named."""
    def reopen(made_with):
        return CacheFolder.open_or_create(tmp_path / "cache", stage="dump-proposals", config={"top_n": 5}, inputs={},
                                          fields=FIELDS, num_shards=2, images_per_shard=3, made_with=made_with)

    assert reopen({"device": "cpu"}).made_otherwise == []
    assert reopen({"device": "cpu", "threads": 2}).made_otherwise == []
    assert reopen({"device": "cuda: H100", "threads": 2}).made_otherwise == ['device: "cpu" -> "cuda: H100"']
