"""vild-pipe demo: the whole pipeline, run for real on the synthetic world, in one output folder.

make-synthetic → fit-teacher → train-rpn → dump-proposals (train, val) → cache-embeddings (train, val) →
train-head three times (ViLD-text, ViLD-image, ViLD) → evaluate every mode → detect on a few val images.
Each step calls the same stage function its CLI command calls, so the demo is the pipeline a user runs;
each stage skips the work it finds done, so rerunning the demo resumes instead of redoing.
"""
import logging
import time
from pathlib import Path

from vild_pipe.data.coco import CocoDataset
from vild_pipe.pipeline.evaluation import metrics_table
from vild_pipe.pipeline.recall import format_recall
from vild_pipe.stages import (
    cache_embeddings, detect, dump_proposals, evaluate, fit_teacher, make_synthetic, train_head, train_rpn,
)

log = logging.getLogger(__name__)

# Measured on the 2-core machine (bench/RESULTS.md): 2000 detector steps instead of the small preset's 1600,
# heads of 1000 steps of 16 images instead of 600 of 8, and 1200 train images instead of 600 (base AP50 +3 to
# +6 for ~1 minute; 2000 images fitted a worse teacher in the same steps) bought the most per second.
FULL = {"train_images": 1200, "val_images": 150, "image_size": 192, "teacher_steps": 1800,
        "rpn_iterations": 2000, "rpn_warmup": None, "top_n": 20, "head_iterations": 1000, "head_warmup": 60,
        "head_batch_size": 16, "detect_images": 4}
QUICK = {"train_images": 12, "val_images": 6, "image_size": 96, "teacher_steps": 3,
         "rpn_iterations": 4, "rpn_warmup": 1, "top_n": 20, "head_iterations": 4, "head_warmup": 1,
         "head_batch_size": 4, "detect_images": 2}
PROPOSAL_NMS = 0.5
"""The demo's class-agnostic NMS for its 20 boxes an image (the stages' default is 0.7): on the world's val
split, heads unchanged, 0.7 at 20 boxes let near-duplicates take places and gave ViLD 52.6 / 84.9 novel / base
AP50 against 0.5's 55.4 / 85.2 (bench/RESULTS.md); the world has few overlapping objects of two categories."""
HEAD_SETTINGS = {"optimizer": "adamw", "lr": 1e-3, "representation_size": 512, "workers": 1}
HEADS = {"ViLD-text": "text", "ViLD-image": "image", "ViLD": "text+image"}


def run(out="vild-demo", quick: bool = False, seed: int = 0) -> dict:
    sizes = QUICK if quick else FULL
    out = Path(out)
    timings = {}

    def timed(name, stage, *args, **kwargs):
        started = time.time()
        result = stage(*args, **kwargs)
        timings[name] = time.time() - started
        return result

    world = out / "world"
    timed("make-synthetic", make_synthetic.run, world, seed=seed, train_images=sizes["train_images"],
          val_images=sizes["val_images"], image_size=sizes["image_size"])
    teacher_file = out / "teacher.pt"
    teacher = timed("fit-teacher", fit_teacher.run, world, teacher_file, steps=sizes["teacher_steps"], seed=seed)
    size = sizes["image_size"]
    rpn = timed("train-rpn", train_rpn.run, world / "train.json", out / "rpn", backbone="small",
                box_classes="base", iterations=sizes["rpn_iterations"], warmup=sizes["rpn_warmup"], min_size=size,
                max_size=size, seed=seed, val=world / "val.json", workers=1)
    for split in ("train", "val"):
        timed(f"dump-proposals {split}", dump_proposals.run, out / "rpn", world / f"{split}.json",
              out / "proposals" / split, top_n=sizes["top_n"], nms_threshold=PROPOSAL_NMS)
    for split in ("train", "val"):
        timed(f"cache-embeddings {split}", cache_embeddings.run, out / "proposals" / split, world / f"{split}.json",
              out / "embeddings" / split, str(teacher_file))
    heads = {}
    for mode, losses in HEADS.items():
        heads[mode] = out / "heads" / losses.replace("+", "-")
        timed(f"train-head {losses}", train_head.run, out / "proposals" / "train", out / "embeddings" / "train",
              world / "train.json", heads[mode], clip=str(teacher_file), losses=losses,
              iterations=sizes["head_iterations"], warmup=sizes["head_warmup"], batch_size=sizes["head_batch_size"],
              seed=seed, **HEAD_SETTINGS)
    metrics = timed("evaluate", evaluate.run, out / "proposals" / "val", out / "embeddings" / "val",
                    world / "val.json", out / "evaluation", heads=heads, clip=str(teacher_file))
    val = CocoDataset.load(world / "val.json")
    vocabulary = ", ".join(category.name for category in val.categories)
    timed("detect", detect.run, [record.path for record in val.images[:sizes["detect_images"]]], out / "rpn",
          heads["ViLD"], out / "detections", vocab=vocabulary, clip=str(teacher_file), score_threshold=0.5, top_k=10,
          proposal_nms=PROPOSAL_NMS)

    print(_report(teacher, rpn, metrics, timings, out))
    return {"teacher": teacher, "rpn": rpn, "metrics": metrics, "timings": timings}


def _report(teacher: dict, rpn: dict, metrics: dict, timings: dict, out: Path) -> str:
    accuracy = teacher["val_crop_accuracy"]
    lines = ["", "Open-vocabulary detection on the synthetic world's val split (box AP, %; novel categories"
             " never boxed in training):", "", metrics_table(metrics).rstrip(), "",
             "| teacher on val objects, 15-way, prompt ensemble | base top-1 | novel top-1 |", "| --- | --- | --- |"]
    lines += [f"| {crop} crop{' (ViLD target)' if '+' in crop else ''} | {accuracy[crop]['base']:.3f} | "
              f"{accuracy[crop]['novel']:.3f} |" for crop in ("1x+1.5x", "1x", "1.5x")]
    lines += ["", f"detector (small preset, base boxes only), val: {format_recall(rpn['recall']['recall'])}",
              "", "| stage | seconds |", "| --- | --- |"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in timings.items()]
    lines += [f"| total | {sum(timings.values()):.1f} |", "",
              f"pictures: {out / 'detections'}/*.png; every number: {out / 'evaluation' / 'metrics.json'}"]
    return "\n".join(lines)
