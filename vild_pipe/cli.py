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
