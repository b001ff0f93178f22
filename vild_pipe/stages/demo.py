"""vild-pipe demo: every built stage, run for real on the synthetic world, in one output folder.

Each step calls the same stage function its CLI command calls, so the demo is the pipeline a user runs;
each stage skips the work it finds done, so rerunning the demo resumes instead of redoing.
"""
import logging
import time
from pathlib import Path

from vild_pipe.pipeline.recall import format_recall
from vild_pipe.stages import dump_proposals, fit_teacher, make_synthetic, train_rpn

log = logging.getLogger(__name__)

FULL = {"train_images": 600, "val_images": 150, "image_size": 192, "teacher_steps": 1800,
        "rpn_iterations": None, "top_n": 100}
QUICK = {"train_images": 12, "val_images": 6, "image_size": 96, "teacher_steps": 3,
         "rpn_iterations": 4, "top_n": 20}


def run(out="vild-demo", quick: bool = False, seed: int = 0) -> dict:
    sizes = QUICK if quick else FULL
    out = Path(out)
    timings = {}

    started = time.time()
    world = out / "world"
    make_synthetic.run(world, seed=seed, train_images=sizes["train_images"], val_images=sizes["val_images"],
                       image_size=sizes["image_size"])
    timings["make-synthetic"] = time.time() - started

    started = time.time()
    teacher = fit_teacher.run(world, out / "teacher.pt", steps=sizes["teacher_steps"], seed=seed)
    timings["fit-teacher"] = time.time() - started

    started = time.time()
    size = sizes["image_size"]
    rpn = train_rpn.run(world / "train.json", out / "rpn", backbone="small", iterations=sizes["rpn_iterations"],
                        min_size=size, max_size=size, seed=seed, val=world / "val.json")
    timings["train-rpn"] = time.time() - started

    for split in ("train", "val"):
        started = time.time()
        dump_proposals.run(out / "rpn", world / f"{split}.json", out / "proposals" / split, top_n=sizes["top_n"])
        timings[f"dump-proposals {split}"] = time.time() - started

    accuracy = teacher["val_crop_accuracy"]
    lines = ["", "| teacher on val objects, 15-way, prompt ensemble | base top-1 | novel top-1 |", "| --- | --- | --- |"]
    lines += [f"| {crop} crop{' (ViLD target)' if '+' in crop else ''} | {accuracy[crop]['base']:.3f} | "
              f"{accuracy[crop]['novel']:.3f} |" for crop in ("1x+1.5x", "1x", "1.5x")]
    lines += ["", f"detector (small preset, base boxes only), val: {format_recall(rpn['recall']['recall'])}",
              "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()]
    print("\n".join(lines))
    return {"teacher": teacher, "rpn": rpn, "timings": timings}
