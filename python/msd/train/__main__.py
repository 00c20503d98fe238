"""``python -m msd.train ...`` = ``msd train ...``; the entry point for data-parallel runs:
``torchrun --nproc_per_node N -m msd.train --target ... --output-dir ...``."""

import sys

from msd.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
