"""``python -m msd ...``: the ``msd`` command line (see :mod:`msd.cli`)."""

import sys

from msd.cli import main

sys.exit(main())
