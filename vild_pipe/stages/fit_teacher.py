"""vild-pipe fit-teacher: fit a small CLIP on the synthetic world's image–caption pairs.

Reads WORLD/train.json (every category: captions, never boxes, reach the teacher), fits a
`clip.model.CLIP`, saves it where `clip.load(path)` reads it, then loads it back through that same loader
and measures its crop classification accuracy on WORLD/val.json, base and novel apart.

The fit is resumable as train-rpn is: <out stem>.fitting.pt beside OUT holds the fit's state every
`checkpoint_every` steps and on SIGTERM/SIGINT; the same command rerun continues from it and writes the teacher
an uninterrupted fit writes, byte for byte, and the same report. It is removed once teacher and report are out.
<out stem>.fitting.lock is held while the command runs: the same command started twice is refused.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from vild_pipe.data.coco import CocoDataset
from vild_pipe.data.splits import CategorySplit
from vild_pipe.errors import VildError, describe_error, first_few, require_at_least
from vild_pipe.pipeline.checkpoint import config_differences, load_checkpoint
from vild_pipe.pipeline.distributed import use_threads
from vild_pipe.pipeline.shards import read_json_report, sha256_file, write_json_atomically
from vild_pipe.pipeline.teacher import SmallClipConfig, load_teacher, save_clip
from vild_pipe.pipeline.teacher_fitting import CaptionCropSampler, crop_accuracy, fit_small_clip
from vild_pipe.pipeline.training_run import run_lock

log = logging.getLogger(__name__)


def report_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".json")


def checkpoint_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".fitting.pt")


def lock_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".fitting.lock")


def run(world, out, steps: int = 1800, batch_size: int = 128, lr: float = 3e-3,
        seed: int = 0, model: SmallClipConfig = SmallClipConfig(), threads: int = 0, overwrite: bool = False,
        checkpoint_every: int = 200, split: str = "auto") -> dict:
    """Fit the teacher to `out` (or find it fitted) and return its report; `split` (a data.splits spec) groups
    the report's val accuracy into base and novel categories."""
    world, out = Path(world), Path(out)
    require_at_least("--steps", steps)
    require_at_least("--batch-size", batch_size)
    if not lr > 0:
        raise VildError(f"--lr must be positive, got {lr}")
    require_at_least("--checkpoint-every", checkpoint_every)
    use_threads(threads)
    train = CocoDataset.load(world / "train.json")
    val = CocoDataset.load(world / "val.json")
    category_split = val.resolve_split(split)
    weights_config = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                      "model": dataclasses.asdict(model)}
    # The checkpoint's config names the training captions: a fit resumed on another world fits neither. The
    # report's names the val file and split too: its accuracy is measured on them.
    fitting_config = _plain({**weights_config, "data": {"train_sha256": sha256_file(train.path)}})
    config = _plain({**fitting_config, "data": {**fitting_config["data"], "val_sha256": sha256_file(val.path)},
                     "split": category_split.spec})
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise VildError(f"{out.parent}: cannot create the folder ({describe_error(err)})") from err
    # Held from the first look at OUT to the last write: two fits to one OUT would overwrite each other's
    # checkpoint and report.
    with run_lock(lock_path(out), out, "is fitting this teacher"):
        return _fit(train, val, category_split, out, config, fitting_config, steps, batch_size, lr, seed, model,
                    overwrite, checkpoint_every)


def _plain(config: dict) -> dict:
    """The config as JSON gives it back (tuples as lists), so a recorded one compares equal."""
    return json.loads(json.dumps(config))


def _fit(train: CocoDataset, val: CocoDataset, split: CategorySplit, out: Path, config: dict, fitting_config: dict,
         steps: int, batch_size: int, lr: float, seed: int, model: SmallClipConfig, overwrite: bool,
         checkpoint_every: int) -> dict:
    report_file = report_path(out)
    checkpoint = checkpoint_path(out)
    if out.exists() and not overwrite:
        if not report_file.exists():
            raise VildError(f"{out}: a file is already there, with no fit-teacher report ({report_file.name}) beside"
                            " it; use another --out, or --overwrite to replace it")
        report = read_json_report(report_file, "a fit-teacher report", "use another --out or --overwrite")
        changes = _config_changes(report.get("config"), config)
        if changes:
            raise VildError(f"{out}: a teacher fitted with another config is already there"
                            f" ({first_few(changes, 3, '; ')}); use another --out or --overwrite")
        if "teacher" in report:
            if checkpoint.exists():
                checkpoint.unlink()
                log.info("removed %s, left by a fit stopped after its report", checkpoint)
            log.info("%s already fitted with this config; nothing to do", out)
            return report
        log.info("%s: the fit with this config was stopped before its report; fitting again", out)
    started = time.time() - _stopped_fit_seconds(checkpoint, fitting_config, overwrite)  # the report's seconds
    write_json_atomically(report_file, {"config": config}, indent=2)   # until the teacher is fitted: ours to redo

    sampler = CaptionCropSampler(train, model.image_resolution)
    log.info("fitting a %s on crops of %d objects of %d categories", model, len(sampler), len(train.category_names))
    torch.manual_seed(seed)  # the initial weights too: the same config gives the same teacher
    clip_model = model.build()
    losses = fit_small_clip(clip_model, sampler, train.category_names, steps, batch_size, lr, seed,
                            checkpoint=checkpoint, checkpoint_every=checkpoint_every, config=fitting_config,
                            started=started)
    save_clip(clip_model, out)

    teacher = load_teacher(str(out), device="cpu")
    accuracy = crop_accuracy(teacher, val, split)
    report = {"config": config, "teacher": teacher.identity, "val_crop_accuracy": accuracy,
              "final_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": round(time.time() - started, 1)}
    write_json_atomically(report_file, report, indent=2)
    checkpoint.unlink(missing_ok=True)
    figures = "; ".join(f"{crop} {accuracy[crop]['base']:.3f} / {accuracy[crop]['novel']:.3f}"
                        for crop in ("1x+1.5x", "1x", "1.5x"))
    log.info("teacher %s: val crop top-1, base / novel: %s (%d objects); %.0f s", out, figures,
             accuracy["crops"], report["seconds"])
    return report


def _config_changes(recorded: dict | None, config: dict) -> list[str]:
    """What differs between a report's config and this command's. A report written before reports named the
    world's files and the split is taken as it is on those ("data", "split")."""
    recorded = recorded if isinstance(recorded, dict) else {}
    return config_differences(recorded, config, [key for key in ("data", "split") if key not in recorded])


def _stopped_fit_seconds(checkpoint: Path, config: dict, overwrite: bool) -> float:
    """The seconds a stopped fit of this config had run (0 if there is none), which its resumption goes on
    counting. A checkpoint of another config (a stopped fit of another command to this --out) is never resumed:
    as the train stages do, the command is refused naming what differs; --overwrite starts this fit over."""
    saved = load_checkpoint(checkpoint, mmap=True)
    if saved is None:
        return 0.0
    differences = config_differences(saved.get("config", {}), config)
    if not differences:
        return float(saved.get("extra", {}).get("seconds", 0.0))
    if not overwrite:
        raise VildError(f"{checkpoint}: a stopped fit with another config ({'; '.join(differences)}); rerun its "
                        "command to finish it, or give --overwrite to start this one over")
    checkpoint.unlink()
    log.info("removed %s, a stopped fit with another config (%s)", checkpoint, "; ".join(differences))
    return 0.0
