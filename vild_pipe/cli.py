"""The `vild-pipe` command line: one thin command per stage. Parsing only; the stages do the work."""
import json
import logging
import os
import sys

import click

from vild_pipe import __version__
from vild_pipe.errors import VildError, log_to_stderr


class _Group(click.Group):
    """Turns a VildError anywhere below into one line on stderr and exit status 2, and gives every command the
    group's -v too (`vild-pipe info -v PATH` as well as `vild-pipe -v info PATH`)."""

    def add_command(self, cmd, name=None):
        cmd.params.append(click.Option(["-v", "--verbose"], is_flag=True, expose_value=False, callback=_debug_log,
                                       help="Debug-level log output on stderr (default: info)."))
        super().add_command(cmd, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VildError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


def _debug_log(ctx, param, verbose: bool) -> None:
    if verbose:
        logging.getLogger().setLevel(logging.DEBUG)


class _Path(click.Path):
    """click.Path whose failed checks read as every other input error, one line naming the path (click's own
    usage block is for a mistyped command, not for a missing file)."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as err:
            path = os.fspath(value)
            if not os.path.exists(path):
                problem = "no such file or directory"
            elif os.path.isdir(path) and not self.dir_okay:
                problem = "is a folder, a file is needed"
            elif not os.path.isdir(path) and not self.file_okay:
                problem = "is a file, a folder is needed"
            else:
                problem = err.format_message()
            name = param.opts[0] if isinstance(param, click.Option) else param.human_readable_name
            raise VildError(f"{path}: {problem} ({name})") from err


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vild-pipe")
@click.option("-v", "--verbose", is_flag=True, help="Debug-level log output on stderr (default: info).")
def main(verbose):
    """Open-vocabulary object detection the ViLD way: distil CLIP into a detector.

    Each stage is a separate command that caches its work on disk and resumes when rerun.
    Run `vild-pipe demo` to see every built stage on a generated world, offline, on a CPU.
    """
    log_to_stderr(logging.DEBUG if verbose else logging.INFO)


@main.command("make-synthetic")
@click.argument("out", type=_Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Same seed, byte-identical files.")
@click.option("--train-images", default=600, show_default=True, help="Images in the train split.")
@click.option("--val-images", default=150, show_default=True, help="Images in the val split.")
@click.option("--image-size", default=192, show_default=True, help="Side of the square images, pixels.")
@click.option("--workers", default=2, show_default=True, help="Processes drawing images.")
@click.option("--overwrite", is_flag=True, help="Replace a world made with other parameters.")
def make_synthetic(out, seed, train_images, val_images, image_size, workers, overwrite):
    """Generate the synthetic open-vocabulary world in OUT (COCO JSON + JPEG).

    15 shape categories on cluttered backgrounds: 10 base, 5 novel (four share no word with any base
    name). Writes OUT/train.json, OUT/val.json and OUT/train/, OUT/val/ images; rerunning is a no-op.
    """
    from vild_pipe.stages import make_synthetic as stage
    stage.run(out, seed=seed, train_images=train_images, val_images=val_images, image_size=image_size,
              workers=workers, overwrite=overwrite)


SPLIT_HELP = ("Base/novel split: auto, field, lvis, coco48-17, novel:NAME,NAME or novel-file:PATH "
              "(auto: field, else lvis, else coco48-17).")


@main.command("fit-teacher")
@click.argument("world", type=_Path(exists=True, file_okay=False))
@click.option("--out", type=_Path(dir_okay=False), help="Teacher file [default: WORLD/teacher.pt].")
@click.option("--steps", default=1800, show_default=True, help="Optimiser steps.")
@click.option("--batch-size", default=128, show_default=True, help="Crops per step.")
@click.option("--lr", default=3e-3, show_default=True, help="Peak AdamW learning rate.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=0, help="torch CPU threads (0: torch's default).")
@click.option("--checkpoint-every", default=200, show_default=True,
              help="Save the fit's state to <out stem>.fitting.pt every N steps.")
@click.option("--split", default="auto", show_default=True,
              help="Base/novel split of the report's val accuracy: " + SPLIT_HELP[len("Base/novel split: "):])
@click.option("--overwrite", is_flag=True, help="Refit even if a teacher (or a stopped fit) with another config is"
              " there.")
def fit_teacher(world, out, steps, batch_size, lr, seed, threads, checkpoint_every, split, overwrite):
    """Fit a small CLIP (OpenAI's architecture) on image–caption pairs of the synthetic WORLD.

    Captions name every category, novel ones included, as web captions did for real CLIP; no box reaches
    the detector from here. The file loads with `clip.load(path)`; val crop accuracy goes to
    <out stem>.json next to it (WORLD/teacher.json by default). Resumable: killed or stopped (SIGTERM,
    Ctrl-C), the same command continues from <out stem>.fitting.pt to the teacher an uninterrupted fit writes.
    """
    from vild_pipe.stages import fit_teacher as stage
    stage.run(world, out or f"{world}/teacher.pt", steps=steps, batch_size=batch_size, lr=lr,
              seed=seed, threads=threads, overwrite=overwrite, checkpoint_every=checkpoint_every, split=split)


@main.command()
@click.option("--out", default="vild-demo", show_default=True, type=_Path(file_okay=False),
              help="Folder for every stage's output.")
@click.option("--quick", is_flag=True, help="Tiny sizes: a smoke test of the wiring, not of quality.")
@click.option("--seed", default=0, show_default=True)
def demo(out, quick, seed):
    """Run the whole pipeline on the synthetic world, offline, on this machine, and print the results.

    make-synthetic → fit-teacher beside train-rpn (a process each) → dump-proposals (train, val) →
    cache-embeddings (train, val) → train-head (ViLD-text, ViLD-image, ViLD) → evaluate every mode → detect on
    a few val images, each through the same code as its own command, all in OUT. About 10 minutes on a 2-core
    CPU (each stage takes a GPU when there is one); rerunning resumes instead of redoing. The table it prints:
    box AP on the val split, base and novel categories apart.
    """
    from vild_pipe.stages import demo as stage
    stage.run(out, quick=quick, seed=seed)


@main.command("dump-proposals")
@click.argument("detector", type=_Path(exists=True))
@click.argument("annotations", type=_Path(exists=True, dir_okay=False))
@click.argument("out", type=_Path(file_okay=False))
@click.option("--images", type=_Path(exists=True, file_okay=False),
              help="Image folder [default: the annotation file's folder].")
@click.option("--split", default="auto", show_default=True, help=SPLIT_HELP)
@click.option("--top-n", default=300, show_default=True, help="Boxes kept per image after the box head's NMS.")
@click.option("--min-box-side", default=2.0, show_default=True, help="Drop boxes with a side below this (pixels).")
@click.option("--nms-threshold", type=float,
              help="IoU of the class-agnostic NMS after the box head [default: 0.7, as the RPN's: a lower one keeps"
                   " only one of two overlapping objects of different categories; a cache being resumed keeps its"
                   " own].")
@click.option("--add-gt/--no-add-gt", default=None,
              help="Append the image's base ground-truth boxes (is_gt) [default: on for the file the detector was"
                   " trained on (then with its split) or one named *train*; a cache being resumed keeps its own].")
@click.option("--images-per-shard", default=64, show_default=True, help="Images per HDF5 shard.")
@click.option("--batch-size", default=8, show_default=True, help="Images decoded and handed over together.")
@click.option("--shard", help="i/n: fill only this job's part of the shards (0 <= i < n), e.g. a Slurm array.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", default=2, show_default=True, help="Processes decoding images.")
@click.option("--fp16/--no-fp16", default=True, show_default=True,
              help="fp16 autocast of the backbone on CUDA (boxes stay fp32).")
@click.option("--threads", default=0, help="torch CPU threads (0: torch's default).")
@click.option("--skip-bad-images", is_flag=True, help="Record unreadable images in the manifest and go on.")
@click.option("--overwrite", is_flag=True, help="Replace a cache made with another config or detector.")
def dump_proposals(detector, annotations, out, **options):
    """Top-N class-agnostic boxes and their RoIAlign features for every image → sharded HDF5 cache OUT.

    DETECTOR is a train-rpn run folder or checkpoint. Each shard is written complete or not at all;
    rerunning skips complete shards; torchrun ranks and --shard split the work. The schema is in the README.
    """
    from vild_pipe.stages import dump_proposals as stage
    stage.run(detector, annotations, out, **options)


@main.command("cache-embeddings")
@click.argument("proposals", type=_Path(exists=True, file_okay=False))
@click.argument("annotations", type=_Path(exists=True, dir_okay=False))
@click.argument("out", type=_Path(file_okay=False))
@click.option("--clip", "clip_model", required=True,
              help="CLIP model: a name such as ViT-B/32 (downloads once) or a local file for clip.load.")
@click.option("--images", type=_Path(exists=True, file_okay=False),
              help="Image folder [default: the annotation file's folder].")
@click.option("--crop-method", type=click.Choice(["fast", "reference"]), default="fast", show_default=True,
              help="fast: one batched roi_align on the device; reference: CLIP's own preprocess per PIL crop.")
@click.option("--ensemble-only", is_flag=True, help="Store only the 1x+1.5x target `emb` (a third of the size).")
@click.option("--batch-size", type=int, help="Crops per encoder batch [default: 1024 on CUDA, 256 on the CPU].")
@click.option("--images-per-batch", default=8, show_default=True, help="Images decoded and cropped together.")
@click.option("--decode", type=click.Choice(["auto", "pil", "torchvision"]), default="auto", show_default=True,
              help="pil: in the loader workers; torchvision: batched on the device (nvJPEG on CUDA); auto picks "
                   "torchvision on CUDA.")
@click.option("--shard", help="i/n: fill only this job's part of the shards (0 <= i < n), e.g. a Slurm array.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", default=2, show_default=True,
              help="Processes decoding (and, for --crop-method reference or on a CPU, cropping, while the crops in"
                   " flight fit in 1 GiB and half of /dev/shm).")
@click.option("--threads", default=0, help="torch CPU threads (0: torch's default).")
@click.option("--overwrite", is_flag=True, help="Replace a cache made with another config, model or proposal cache.")
def cache_embeddings(proposals, annotations, out, clip_model, **options):
    """CLIP embeddings of every box of the proposal cache PROPOSALS, at 1x and 1.5x → sharded HDF5 cache OUT.

    ANNOTATIONS is the file the proposal cache was made from (its images are read once more). Per box:
    emb_1x, emb_15x and emb = normalise(emb_1x + emb_15x), the ViLD-image target, fp16, row-aligned with
    the proposal shards. Resumable and shardable like dump-proposals; a cache of another CLIP model or
    proposal cache is refused, never mixed.
    """
    from vild_pipe.stages import cache_embeddings as stage
    stage.run(proposals, annotations, out, clip_model, **options)


@main.command("embed-text")
@click.argument("out", type=_Path(dir_okay=False))
@click.option("--clip", "clip", required=True,
              help="CLIP model: a local file (e.g. the fitted teacher.pt) or a CLIP model name.")
@click.option("--annotations", type=_Path(exists=True, dir_okay=False),
              help="Take every category name of this COCO/LVIS annotation file (base and novel, id order).")
@click.option("--vocab", help="Comma-separated category names instead, e.g. 'kite,zebra,hollow square'.")
@click.option("--vocab-file", type=_Path(exists=True, dir_okay=False),
              help="A file of category names instead, one per line (# comments and blank lines skipped).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def embed_text(out, **options):
    """Category names → ViLD prompt-ensembled CLIP text embeddings (63 templates) in the file OUT.

    Give the names one way: --annotations, --vocab or --vocab-file. OUT keeps the names and the CLIP
    model's identity; rerunning with the same model and names reuses it, anything else recomputes it.
    Empty or duplicate names are refused.
    """
    from vild_pipe.stages import embed_text as stage
    stage.run(out, **options)


@main.command("train-head")
@click.argument("proposals", type=_Path(exists=True, file_okay=False))
@click.argument("embeddings", type=_Path(exists=True, file_okay=False))
@click.argument("annotations", type=_Path(exists=True, dir_okay=False))
@click.argument("run_dir", type=_Path(file_okay=False))
@click.option("--text", type=_Path(exists=True, dir_okay=False),
              help="embed-text file holding every base category name (its other names are ignored).")
@click.option("--clip",
              help="Or: CLIP model (file or name) to compute the base text embeddings → RUN_DIR/text_base.pt.")
@click.option("--losses", type=click.Choice(["text", "image", "text+image"]), default="text+image", show_default=True,
              help="ViLD-text, ViLD-image or both (ViLD): the ablation from the same caches.")
@click.option("--split", help="Category split [default: the one recorded in the proposal cache].")
@click.option("--iterations", default=20000, show_default=True, help="Training steps.")
@click.option("--batch-size", default=16, show_default=True,
              help="Images per global step, split over torchrun processes.")
@click.option("--lr", default=0.02, show_default=True, help="Peak learning rate.")
@click.option("--warmup", default=500, show_default=True, help="Linear warm-up steps.")
@click.option("--schedule", type=click.Choice(["cosine", "step"]), default="cosine", show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--momentum", default=0.9, show_default=True)
@click.option("--weight-decay", default=1e-4, show_default=True)
@click.option("--clip-grad-norm", default=1.0, show_default=True, help="Clip the gradient norm (0: off).")
@click.option("--representation-size", default=1024, show_default=True, help="Width of the box head's two FC layers.")
@click.option("--conv-layers", default=0, show_default=True,
              help="3x3 conv layers (GroupNorm, ReLU) before the FC layers; ViLD's own head has 4.")
@click.option("--image-weight", default=0.5, show_default=True, help="Weight w of the ViLD-image loss.")
@click.option("--image-rois", default=300, show_default=True, help="Top-M proposals per image for ViLD-image.")
@click.option("--sample-rois", default=512, show_default=True,
              help="RoIs sampled per image for ViLD-text (0: all rows).")
@click.option("--foreground-fraction", default=0.25, show_default=True, help="At most this share of them foreground.")
@click.option("--block-images", default=16, show_default=True, help="Images read together (one sequential slice).")
@click.option("--buffer-blocks", default=8, show_default=True, help="Blocks shuffled together in memory.")
@click.option("--checkpoint-every", default=500, show_default=True, help="Save RUN_DIR/last.pt every N steps.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", default=2, show_default=True, help="Loader processes reading the caches.")
@click.option("--threads", default=0, help="torch CPU threads (0: torch's default).")
def train_head(proposals, embeddings, annotations, run_dir, sample_rois, clip_grad_norm, **options):
    """Train the ViLD head from the caches alone: PROPOSALS (dump-proposals of the train split), EMBEDDINGS
    (cache-embeddings of it), ANNOTATIONS (the annotation file the proposals came from) → RUN_DIR/head.pt.

    ViLD-text: cosine logits against [learned background, base category texts] / 0.01, labels from
    IoU >= 0.5 with base boxes (novel categories never enter). ViLD-image: L1 to the cached 1x+1.5x CLIP
    embedding of the top proposals. Refuses caches and text embeddings that do not belong together.
    Checkpoints every N steps and on SIGTERM; rerunning the same command resumes to the same weights;
    under torchrun it trains with DDP on the same global batch.
    """
    from vild_pipe.stages import train_head as stage
    stage.run(proposals, embeddings, annotations, run_dir, sample_rois=sample_rois or None,
              clip_grad_norm=clip_grad_norm or None, **options)


EVALUATION_MODES = ["CLIP-on-crops", "ViLD-text", "ViLD-image", "ViLD", "ViLD-ensemble"]


@main.command()
@click.argument("proposals", type=_Path(exists=True, file_okay=False))
@click.argument("annotations", type=_Path(exists=True, dir_okay=False))
@click.argument("out", type=_Path(file_okay=False))
@click.option("--embeddings", type=_Path(exists=True, file_okay=False),
              help="cache-embeddings of PROPOSALS: enables CLIP-on-crops and ViLD-ensemble.")
@click.option("--head-text", type=_Path(exists=True),
              help="train-head run folder (or head.pt) trained with --losses text → ViLD-text.")
@click.option("--head-image", type=_Path(exists=True),
              help="Head trained with --losses image → ViLD-image.")
@click.option("--head-vild", type=_Path(exists=True),
              help="Head trained with --losses text+image → ViLD (and, with --embeddings, ViLD-ensemble).")
@click.option("--clip", help="CLIP model (file or name) to embed every category of ANNOTATIONS → OUT/text_all.pt.")
@click.option("--text", type=_Path(exists=True, dir_okay=False),
              help="Or: an embed-text file holding every category name of ANNOTATIONS.")
@click.option("--mode", "modes", multiple=True, type=click.Choice(EVALUATION_MODES),
              help="Evaluate only this mode (repeatable) [default: every mode whose inputs are given].")
@click.option("--split", default="auto", show_default=True, help=SPLIT_HELP)
@click.option("--ensemble-head", type=click.Choice(["ViLD", "ViLD-text", "ViLD-image"]), default="ViLD",
              show_default=True, help="Which head's probabilities ViLD-ensemble combines with CLIP's.")
@click.option("--base-text-weight", default=2 / 3, show_default="2/3",
              help="Ensemble: score = head^w * clip^(1-w) with this w on base categories.")
@click.option("--novel-text-weight", default=1 / 3, show_default="1/3", help="Ensemble: w on novel categories.")
@click.option("--max-detections", default=300, show_default=True, help="Detections kept per image after NMS.")
@click.option("--nms-threshold", default=0.5, show_default=True, help="IoU of the per-class NMS.")
@click.option("--protocol", type=click.Choice(["auto", "coco", "lvis"]), default="auto", show_default=True,
              help="lvis: LVIS' federated evaluation (a detection counts only for categories checked on its image,"
                   " 300 per image); coco: plain COCOeval; auto: lvis for files whose images list"
                   " neg_category_ids (LVIS), else coco.")
@click.option("--workers", default=0, show_default=True,
              help="Processes running COCOeval, categories split among them (0: by the size of the evaluation, at"
                   " most one per CPU, 8, and what half the free memory holds; small ones stay in one). Memory grows"
                   " with workers; the numbers do not depend on it.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", default=0, help="torch CPU threads (0: torch's default).")
def evaluate(proposals, annotations, out, embeddings, head_text, head_image, head_vild, modes, **options):
    """Box AP50 on base and novel categories of every ViLD variant, on the val caches PROPOSALS (and
    --embeddings) of ANNOTATIONS → OUT/results-<mode>.json, OUT/metrics.json, OUT/metrics.md.

    Every box is classified among ALL the categories of ANNOTATIONS (base and novel), by CLIP on its crop
    (CLIP-on-crops), by each head (ViLD-text, ViLD-image, ViLD), and by the ViLD head and CLIP together
    (ViLD-ensemble); a mode whose inputs are not given is skipped (refused if named with --mode). Per-class
    NMS at IoU 0.5, up to 300 detections per image, COCOeval on the written results files (LVIS' federated
    protocol on LVIS files).
    Heads of another CLIP model or detector and caches that do not belong together are refused.
    """
    from vild_pipe.pipeline.evaluation import metrics_table
    from vild_pipe.stages import evaluate as stage
    heads = {"ViLD-text": head_text, "ViLD-image": head_image, "ViLD": head_vild}
    results = stage.run(proposals, embeddings, annotations, out, heads=heads, modes=list(modes) or None, **options)
    click.echo(metrics_table(results), nl=False)


@main.command()
@click.argument("images", nargs=-1, required=True, type=_Path())
@click.option("--detector", required=True, type=_Path(exists=True), help="train-rpn run folder or checkpoint.")
@click.option("--head", required=True, type=_Path(exists=True), help="train-head run folder or head.pt.")
@click.option("--clip", required=True,
              help="The CLIP model (file or name) the head was trained against; another one is refused.")
@click.option("--vocab", help="Comma-separated names to detect, e.g. 'zebra, teapot, red car'.")
@click.option("--vocab-file", type=_Path(exists=True, dir_okay=False),
              help="Or: a file of names, one per line (# comments and blank lines skipped).")
@click.option("--out", default="detections", show_default=True, type=_Path(file_okay=False),
              help="Folder for detections.json and one <image stem>.png per image.")
@click.option("--ensemble/--no-ensemble", default=True, show_default=True,
              help="Combine the head with CLIP's embedding of each box's 1x and 1.5x crops (ViLD-ensemble).")
@click.option("--score-threshold", default=0.05, show_default=True, help="Keep detections scoring above this.")
@click.option("--top-k", default=100, show_default=True, help="At most this many detections per image.")
@click.option("--proposals", default=300, show_default=True, help="Detector boxes scored per image.")
@click.option("--proposal-nms", type=float,
              help="IoU of the detector's class-agnostic NMS [default: that of the proposals the head was trained"
                   " on (dump-proposals' --nms-threshold), which the head records; for an older head, its"
                   " training cache's, else 0.5].")
@click.option("--nms-threshold", default=0.5, show_default=True, help="IoU of the final per-class NMS.")
@click.option("--base-text-weight", default=2 / 3, show_default="2/3",
              help="Ensemble: head^w * clip^(1-w), w for the names among the head's base categories.")
@click.option("--novel-text-weight", default=1 / 3, show_default="1/3", help="Ensemble: w for every other name.")
@click.option("--skip-bad-images", is_flag=True,
              help="Go on past an unreadable image (one warning line each) instead of stopping at it.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--threads", default=0, help="torch CPU threads (0: torch's default).")
def detect(images, **options):
    """Detect any named objects in IMAGES (files, or folders of .jpg/.png/... files): boxes, names and scores
    → OUT/detections.json (COCO format) and OUT/<image stem>.png with the detections drawn.

    Give the names with --vocab or --vocab-file; names among the categories the head was trained on count
    as base in the ensemble, every other name as novel. An image is turned upright as its EXIF orientation
    tag says, so boxes are in the frame a viewer shows. Runs on the CPU or a GPU.
    """
    from vild_pipe.stages import detect as stage
    summary = stage.run(list(images), **options)
    for line in stage.found_lines(summary):
        click.echo(line)


@main.command("train-rpn")
@click.argument("annotations", type=_Path(exists=True, dir_okay=False))
@click.argument("run_dir", type=_Path(file_okay=False))
@click.option("--images", type=_Path(exists=True, file_okay=False),
              help="Image folder [default: the annotation file's folder].")
@click.option("--split", default="auto", show_default=True, help=SPLIT_HELP)
@click.option("--backbone", type=click.Choice(["resnet50-fpn", "small"]), default="resnet50-fpn", show_default=True,
              help="Detector preset; `small` trains in minutes on a CPU (the demo's).")
@click.option("--backbone-init", default="none", show_default=True,
              help="none, imagenet (torchvision's weights, downloads) or a local state-dict file.")
@click.option("--box-classes", type=click.Choice(["object", "base"]), default="object", show_default=True,
              help="What the box head learns: object vs background, or the base categories (gives a backbone "
                   "trained from scratch category features, as ViLD's end-to-end training does); the boxes "
                   "it outputs are class-agnostic either way.")
@click.option("--min-size", type=int, help="Image shorter side, pixels [preset: small 192, resnet50-fpn 800].")
@click.option("--max-size", type=int, help="Longer-side cap, pixels [preset: small 320, resnet50-fpn 1333].")
@click.option("--iterations", type=int, help="Training steps [preset: small 1600, resnet50-fpn 90000].")
@click.option("--batch-size", type=int,
              help="Global batch, split over torchrun processes [preset: small 4, resnet50-fpn 16].")
@click.option("--lr", type=float, help="Peak SGD learning rate [default: 0.02].")
@click.option("--warmup", type=int, help="Linear warm-up steps [preset: small 100, resnet50-fpn 1000].")
@click.option("--schedule", type=click.Choice(["cosine", "step"]),
              help="Decay after warm-up [preset: small cosine, resnet50-fpn step at 2/3 and 8/9].")
@click.option("--momentum", default=0.9, show_default=True)
@click.option("--weight-decay", default=1e-4, show_default=True)
@click.option("--clip-grad-norm", type=float, help="Clip the gradient norm [default: off].")
@click.option("--scale-jitter", nargs=2, type=float, default=(0.75, 1.25), show_default=True,
              help="Per-step image scale range.")
@click.option("--no-hflip", "hflip", flag_value=False, default=True, help="No random left-right flips.")
@click.option("--checkpoint-every", default=200, show_default=True, help="Save RUN_DIR/last.pt every N steps.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", default=2, show_default=True, help="DataLoader worker processes.")
@click.option("--no-amp", "amp", flag_value=False, default=True, help="No mixed precision (only used on CUDA).")
@click.option("--threads", default=0, help="torch CPU threads (0: torch's default).")
@click.option("--val", type=_Path(exists=True, dir_okay=False),
              help="Measure recall on this split at the end → RUN_DIR/recall.json.")
@click.option("--val-images", type=_Path(exists=True, file_okay=False), help="Image folder of --val.")
@click.option("--top-k", default=100, show_default=True, help="Boxes per image counted by recall.")
def train_rpn(annotations, run_dir, **options):
    """Train the class-agnostic Faster R-CNN on the BASE boxes of ANNOTATIONS into RUN_DIR.

    Every base box is "object" (with --box-classes base, the box head also learns its category); novel
    annotations are removed before training and never used.
    Checkpoints every N steps and on SIGTERM; rerunning the same command resumes and ends at the same
    weights. Under torchrun it trains with DDP (gloo on CPU, nccl on GPU) on the same global batch.
    """
    from vild_pipe.stages import train_rpn as stage
    stage.run(annotations, run_dir, **options)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the states as JSON (a list), for scripts.")
def info(paths, as_json):
    """Where caches and training runs stand, from their files alone (safe beside running jobs).

    A cache folder: shards complete of how many, images, rows and bytes, which shards are being written and by
    which process and host, which locks killed runs left, which shards are missing. A train-rpn or train-head
    run folder: the step reached of how many, the last checkpoint, whether a run holds it now, the final file.
    """
    from vild_pipe.stages import info as stage
    states = stage.run(paths)
    readable = [state for state in states if state["kind"] != "error"]
    if as_json or readable:
        click.echo(json.dumps(states, indent=1) if as_json else "\n".join(map(stage.format_state, readable)))
    errors = [state["error"] for state in states if state["kind"] == "error"]
    if errors:
        raise VildError("; ".join(errors))


@main.command()
@click.argument("detector", type=_Path(exists=True))
@click.argument("annotations", type=_Path(exists=True, dir_okay=False))
@click.option("--images", type=_Path(exists=True, file_okay=False),
              help="Image folder [default: the annotation file's folder].")
@click.option("--split", default="auto", show_default=True, help=SPLIT_HELP)
@click.option("--top-k", default=100, show_default=True, help="Boxes per image counted.")
@click.option("--source", type=click.Choice(["detections", "proposals"]), default="detections", show_default=True,
              help="Box-head output (what dump-proposals keeps) or raw RPN proposals.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--workers", default=0, show_default=True, help="DataLoader worker processes.")
@click.option("--out", type=_Path(dir_okay=False), help="Also write the result as JSON here.")
def recall(detector, annotations, **options):
    """Class-agnostic recall of DETECTOR's boxes on ANNOTATIONS, base and novel objects apart.

    AR@K at IoU 0.5 and averaged over IoU 0.5:0.95: novel recall says whether the proposals generalise
    to categories that were never boxed.
    """
    from vild_pipe.stages import train_rpn as stage
    stage.run_recall(detector, annotations, **options)
