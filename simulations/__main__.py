"""``python -m simulations SCENARIO.toml ...``: the same as ``coordinator simulate``."""

import sys

from simulations.cli import main

sys.exit(main())
