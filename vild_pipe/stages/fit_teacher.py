"""vild-pipe fit-teacher: fit a small CLIP on the synthetic world's image–caption pairs.

Reads WORLD/train.json (every category: captions, never boxes, reach the teacher), fits a
`clip.model.CLIP`, saves it where `clip.load(path)` reads it, then loads it back through that same loader
and measures its crop classification accuracy on WORLD/val.json, base and novel apart.
"""
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from vild_pipe.data.coco import CocoDataset
from vild_pipe.data.splits import resolve_split
from vild_pipe.errors import VildError
from vild_pipe.pipeline.shards import read_json_report, write_json_atomically
from vild_pipe.pipeline.teacher import SmallClipConfig, load_teacher, save_clip
from vild_pipe.pipeline.teacher_fitting import CaptionCropSampler, crop_accuracy, fit_small_clip

log = logging.getLogger(__name__)


def report_path(out) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".json")


def run(world, out, steps: int = 1800, batch_size: int = 128, lr: float = 3e-3,
        seed: int = 0, model: SmallClipConfig = SmallClipConfig(), threads: int = 0, overwrite: bool = False) -> dict:
    world, out = Path(world), Path(out)
    config = json.loads(json.dumps({"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                                     "model": dataclasses.asdict(model)}))
    report_file = report_path(out)
    if out.exists() and not overwrite:
        if not report_file.exists():
            raise VildError(f"{out}: a file is already there, with no fit-teacher report ({report_file.name}) beside"
                            " it; use another --out, or --overwrite to replace it")
        report = read_json_report(report_file, "a fit-teacher report", "use another --out or --overwrite")
        if report.get("config") != config:
            raise VildError(f"{out}: a teacher fitted with another config is already there; "
                            "use another --out or --overwrite")
        if "teacher" in report:
            log.info("%s already fitted with this config; nothing to do", out)
            return report
        log.info("%s: the fit with this config was stopped before its report; fitting again", out)
    if threads:
        torch.set_num_threads(threads)
    started = time.time()
    write_json_atomically(report_file, {"config": config}, indent=2)   # until the teacher is fitted: ours to redo
    train = CocoDataset.load(world / "train.json")
    val = CocoDataset.load(world / "val.json")
    split = resolve_split(val.categories, "auto")

    sampler = CaptionCropSampler(train, model.image_resolution)
    log.info("fitting a %s on crops of %d objects of %d categories", model, len(sampler), len(train.category_names))
    torch.manual_seed(seed)  # the initial weights too: the same config gives the same teacher
    clip_model = model.build()
    losses = fit_small_clip(clip_model, sampler, train.category_names, steps, batch_size, lr, seed)
    save_clip(clip_model, out)

    teacher = load_teacher(str(out), device="cpu")
    accuracy = crop_accuracy(teacher, val, split)
    report = {"config": config, "teacher": teacher.identity, "val_crop_accuracy": accuracy,
              "final_loss": sum(losses[-20:]) / len(losses[-20:]), "seconds": round(time.time() - started, 1)}
    write_json_atomically(report_file, report, indent=2)
    figures = "; ".join(f"{crop} {accuracy[crop]['base']:.3f} / {accuracy[crop]['novel']:.3f}"
                        for crop in ("1x+1.5x", "1x", "1.5x"))
    log.info("teacher %s: val crop top-1, base / novel: %s (%d objects); %.0f s", out, figures,
             accuracy["crops"], report["seconds"])
    return report
