"""`python -m vild_pipe ...`, the same as `vild-pipe ...` (for `torchrun -m vild_pipe` and for environments
whose scripts folder is not on PATH)."""
from vild_pipe.cli import main

main(prog_name="vild-pipe")
