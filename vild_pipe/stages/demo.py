"""vild-pipe demo: the whole pipeline, run for real on the synthetic world, in one output folder.

make-synthetic → fit-teacher beside train-rpn (two processes, half the cores each) → dump-proposals (train, val)
→ cache-embeddings (train, val) → train-head three times (ViLD-text, ViLD-image, ViLD) → evaluate every mode →
detect on a few val images.
Each step calls the same stage function its CLI command calls, so the demo is the pipeline a user runs;
each stage skips the work it finds done, so rerunning the demo resumes instead of redoing.
"""
import logging
import multiprocessing
import sys
import time
from pathlib import Path

import torch

from vild_pipe.data.coco import CocoDataset
from vild_pipe.errors import VildError, log_to_stderr
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
    demo_started = time.time()

    def timed(name, stage, *args, **kwargs):
        started = time.time()
        result = stage(*args, **kwargs)
        timings[name] = time.time() - started
        return result

    world = out / "world"
    timed("make-synthetic", make_synthetic.run, world, seed=seed, train_images=sizes["train_images"],
          val_images=sizes["val_images"], image_size=sizes["image_size"])
    teacher_file = out / "teacher.pt"
    # The teacher and the detector need nothing of each other: they are fitted side by side, each on half the
    # cores (two torch threads made train-rpn only 1.26 times faster than one; side by side the two took 6.6
    # minutes against 10.1 one after the other: bench/RESULTS.md).
    all_threads = torch.get_num_threads()
    threads = max(1, all_threads // 2)
    size = sizes["image_size"]
    log.info("demo: fit-teacher beside train-rpn, %d torch thread(s) each; the teacher's progress is in its log"
             " lines", threads)
    try:
        with StageBeside("fit-teacher", fit_teacher.run, world, teacher_file, steps=sizes["teacher_steps"],
                         seed=seed, threads=threads) as teacher_job:
            rpn = timed("train-rpn", train_rpn.run, world / "train.json", out / "rpn", backbone="small",
                        box_classes="base", iterations=sizes["rpn_iterations"], warmup=sizes["rpn_warmup"],
                        min_size=size, max_size=size, seed=seed, val=world / "val.json", workers=1, threads=threads)
            teacher = teacher_job.result()
    finally:
        torch.set_num_threads(all_threads)
    timings["fit-teacher (beside train-rpn)"] = teacher_job.seconds
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

    timings["total (wall)"] = time.time() - demo_started
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
    lines += ["", f"pictures: {out / 'detections'}/*.png; every number: {out / 'evaluation' / 'metrics.json'}"]
    return "\n".join(lines)


class StageBeside:
    """A stage run in a process of its own beside the stages of this one, for two stages that need nothing of
    each other. `result()` waits for it: its return value, or its VildError raised here; leaving the `with`
    block stops it (SIGTERM: a training stage saves its checkpoint first) if it still runs. The process is
    spawned, not forked: a fork of a process that has run torch's OpenMP threads may hang in them."""

    def __init__(self, name: str, stage, *args, **kwargs):
        context = multiprocessing.get_context("spawn")
        self.name, self.seconds = name, None
        self._results, sending = context.Pipe(duplex=False)
        self._process = context.Process(target=_run_beside, name=name, daemon=True,
                                        args=(sending, stage, args, kwargs, logging.getLogger().level))
        self._process.start()
        sending.close()

    def result(self):
        while not self._results.poll(0.2):
            if not self._process.is_alive() and not self._results.poll():
                raise VildError(f"{self.name}: its process ended (exit code {self._process.exitcode}) with no result;"
                                " its error is above")
        finished, value, self.seconds = self._results.recv()
        self._process.join()
        if not finished:
            raise VildError(value)
        return value

    def __enter__(self) -> "StageBeside":
        return self

    def __exit__(self, *exc_info) -> None:
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        self._results.close()


def _run_beside(results, stage, args, kwargs, log_level: int) -> None:
    """The body of a `StageBeside` process: the stage, its logs on stderr as the CLI writes them, and
    (finished, value or error message, seconds) sent back. Its progress bars are left out: they would be
    drawn over the main process's."""
    sys.stderr = _NotATerminal(sys.stderr)
    log_to_stderr(log_level)
    started = time.time()
    try:
        value = stage(*args, **kwargs)
    except VildError as err:
        results.send((False, str(err), time.time() - started))
        return
    results.send((True, value, time.time() - started))


class _NotATerminal:
    """A stream that says it is no terminal, so tqdm (`disable=None`) draws no bar on it."""

    def __init__(self, stream):
        self._stream = stream

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self._stream, name)
