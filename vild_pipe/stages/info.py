"""vild-pipe info: where a cache or a training run stands, read from its files alone.

For the cache of a job array: how many shards are complete, which are being written and by whom, which locks
killed jobs left, what is on disk. For a train-rpn or train-head run folder: the step reached of how many,
the last checkpoint, whether a run holds the folder now, whether the final weights are written. Nothing is
changed, so it is safe beside running jobs: a stale lock is named, and the next run of the stage removes it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from vild_pipe.errors import DataError, counted, first_few
from vild_pipe.pipeline.checkpoint import CHECKPOINT_NAME, load_checkpoint
from vild_pipe.pipeline.detector import MODEL_NAME
from vild_pipe.pipeline.head import HEAD_NAME
from vild_pipe.pipeline.shards import (
    MANIFEST_NAME, CacheFolder, describe_lock_holder, format_bytes, live_lock_holder, shard_name,
)
from vild_pipe.pipeline.training_run import METRICS_NAME, RUN_LOCK_NAME

MISSING_SHOWN = 8


def run(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """What `describe` says of each path; a path it cannot read is {"path", "kind": "error", "error"}, so that
    one wrong path among many does not hide what the others say."""
    states = []
    for path in paths:
        try:
            states.append(describe(Path(path)))
        except DataError as err:
            states.append({"path": os.fspath(path), "kind": "error", "error": str(err)})
    return states


def describe(path: Path) -> dict[str, Any]:
    """A cache folder's or a run folder's state, as plain JSON-ready values; DataError for anything else."""
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise DataError(f"{path}: is a file, a cache or run folder is needed")
    if (path / MANIFEST_NAME).is_file():
        return describe_cache(path)
    if any((path / name).is_file() for name in (CHECKPOINT_NAME, METRICS_NAME, MODEL_NAME, HEAD_NAME, RUN_LOCK_NAME)):
        return describe_run(path)
    raise DataError(f"{path}: neither a vild-pipe cache (no {MANIFEST_NAME}) nor a training run folder (no"
                    f" {CHECKPOINT_NAME}, {METRICS_NAME}, {MODEL_NAME}, {HEAD_NAME} or {RUN_LOCK_NAME})")


def describe_cache(path: Path) -> dict[str, Any]:
    folder = CacheFolder.open(path)
    totals = folder.manifest_summary()
    locks = folder.shard_locks()
    missing = folder.missing_shards()
    return {
        "path": os.fspath(path), "kind": "cache", "stage": folder.stage, "fingerprint": folder.fingerprint,
        "complete": not missing, "shards": folder.num_shards, "complete_shards": totals["complete_shards"],
        "images": totals["images"], "rows": totals["rows"], "bytes": totals["bytes"],
        "skipped_images": len(totals["skipped_images"]),
        "writing": [{"shard": shard_name(index), "by": describe_lock_holder(holder)}
                    for index, holder, stale in locks if stale is None],
        "stale_locks": [{"shard": shard_name(index), "why": stale} for index, _, stale in locks if stale is not None],
        "missing": [shard_name(index) for index in missing],
        "config": folder.config,
    }


def describe_run(path: Path) -> dict[str, Any]:
    checkpoint = load_checkpoint(path / CHECKPOINT_NAME, remove_stale_tmp=False, mmap=True)
    config = checkpoint["config"] if checkpoint is not None else {}
    last = _last_logged_record(path / METRICS_NAME)
    head = (path / HEAD_NAME).is_file() or "losses" in config or "text" in (last or {})  # train-head's loss terms
    rpn = (path / MODEL_NAME).is_file() or "detector" in config or "loss_objectness" in (last or {})
    final = path / (HEAD_NAME if head else MODEL_NAME)
    holder = live_lock_holder(path / RUN_LOCK_NAME)
    held_by = describe_lock_holder(holder) if holder is not None else None
    return {
        "path": os.fspath(path), "kind": "run",
        "stage": "train-head" if head else "train-rpn" if rpn else None,   # None: a run in its first seconds
        "losses": config.get("losses"), "step": last["step"] if last is not None else None,
        "iterations": config.get("iterations"),
        "checkpoint_step": int(checkpoint["step"]) if checkpoint is not None else None,
        "running": held_by, "final": os.fspath(final) if final.is_file() else None,
    }


def _last_logged_record(metrics: Path) -> dict[str, Any] | None:
    """The last whole line of the metrics file (a line is written in one piece), its step an int."""
    try:
        lines = metrics.read_text().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
            return {**record, "step": int(record["step"])}
        except (ValueError, KeyError, TypeError):
            continue
    return None


def format_state(state: dict[str, Any]) -> str:
    """A few lines for a person: the headline, then only what needs a look."""
    if state["kind"] == "run":
        return _format_run(state)
    done = (f"complete, {counted(state['shards'], 'shard')}" if state["complete"]
            else f"{state['complete_shards']} of {counted(state['shards'], 'shard')} complete")
    lines = [f"{state['path']}: {state['stage']} cache, {done} ({counted(state['images'], 'image')},"
             f" {counted(state['rows'], 'row')}, {format_bytes(state['bytes'])})"]
    if state["writing"]:
        lines.append("  being written: " + ", ".join(f"{lock['shard']} ({lock['by']})" for lock in state["writing"]))
    if state["stale_locks"]:
        lines.append("  left by killed runs (the next run removes them): "
                     + ", ".join(f"{lock['shard']} ({lock['why']})" for lock in state["stale_locks"]))
    missing = state["missing"]
    if missing:
        lines.append(f"  missing: {first_few(missing, MISSING_SHOWN)}; rerun {state['stage']} to fill them")
    if state["skipped_images"]:
        lines.append(f"  skipped images (--skip-bad-images): {state['skipped_images']}")
    return "\n".join(lines)


def _format_run(state: dict[str, Any]) -> str:
    kind = (state["stage"] or "training") + (f" ({state['losses']})" if state["losses"] else "")
    of = f" of {state['iterations']:,}" if state["iterations"] else ""
    step = f"step {state['step']:,}{of}" if state["step"] is not None else "no step logged yet"
    checkpoint = f", last checkpoint at step {state['checkpoint_step']:,}" if state["checkpoint_step"] else ""
    if state["running"]:
        now = f"running now ({state['running']})"
    elif state["final"]:
        now = f"finished: {state['final']}"
    elif state["checkpoint_step"]:
        now = f"not running; rerun its command to go on from step {state['checkpoint_step']:,}"
    else:   # the metric lines of a run stopped before its first checkpoint: the rerun starts over
        now = "not running, no checkpoint yet; rerun its command to start it over"
    return f"{state['path']}: {kind} run, {step}{checkpoint}; {now}"
