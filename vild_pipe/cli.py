"""The `vild-pipe` command line: one thin command per stage. Parsing only; the stages do the work."""
import logging
import sys

import click

from vild_pipe import __version__
from vild_pipe.errors import VildError


class _Group(click.Group):
    """Turns a VildError anywhere below into one line on stderr and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except VildError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="vild-pipe")
@click.option("-v", "--verbose", is_flag=True, help="Debug-level log output on stderr (default: info).")
def main(verbose):
    """Open-vocabulary object detection the ViLD way: distil CLIP into a detector.

    Each stage is a separate command that caches its work on disk and resumes when rerun.
    Run `vild-pipe demo` to see every built stage on a generated world, offline, on a CPU.
    """
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@main.command("make-synthetic")
@click.argument("out", type=click.Path(file_okay=False))
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


@main.command("fit-teacher")
@click.argument("world", type=click.Path(exists=True, file_okay=False))
@click.option("--out", type=click.Path(dir_okay=False), help="Teacher file [default: WORLD/teacher.pt].")
@click.option("--steps", default=600, show_default=True, help="Optimiser steps.")
@click.option("--batch-size", default=128, show_default=True, help="Crops per step.")
@click.option("--lr", default=1e-3, show_default=True, help="Peak AdamW learning rate.")
@click.option("--views-per-object", default=4, show_default=True, help="Jittered crops cut per object.")
@click.option("--seed", default=0, show_default=True)
@click.option("--threads", default=0, help="torch CPU threads (0: torch's default).")
@click.option("--overwrite", is_flag=True, help="Refit even if a teacher with another config is there.")
def fit_teacher(world, out, steps, batch_size, lr, views_per_object, seed, threads, overwrite):
    """Fit a small CLIP (OpenAI's architecture) on image–caption pairs of the synthetic WORLD.

    Captions name every category, novel ones included, as web captions did for real CLIP; no box reaches
    the detector from here. The file loads with `clip.load(path)`; val crop accuracy goes to
    <out>.json next to it.
    """
    from vild_pipe.stages import fit_teacher as stage
    stage.run(world, out or f"{world}/teacher.pt", steps=steps, batch_size=batch_size, lr=lr,
              views_per_object=views_per_object, seed=seed, threads=threads, overwrite=overwrite)


@main.command()
@click.option("--out", default="vild-demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for every stage's output.")
@click.option("--quick", is_flag=True, help="Tiny sizes: a smoke test of the wiring, not of quality.")
@click.option("--seed", default=0, show_default=True)
def demo(out, quick, seed):
    """Run every built stage on the synthetic world, offline, on this machine, and print the results.

    make-synthetic → fit-teacher (→ the detector and head stages as they land). Rerunning resumes.
    """
    from vild_pipe.stages import demo as stage
    stage.run(out, quick=quick, seed=seed)
