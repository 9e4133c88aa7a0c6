"""``python -m loadgen``: the same as ``tandem loadgen``."""

import sys

from loadgen.cli import main

sys.exit(main(prog="python -m loadgen"))
