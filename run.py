"""`python run.py [flags]` from a checkout: the same as the installed `fettle-train`
(fettle_jax/tools/train.py, whose --help lists the flags)."""

import os
import sys

# A checkout run as `python run.py` from any folder finds its own package first.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fettle_jax.tools.train import *  # pylint: disable=g-import-not-at-top,wildcard-import
from fettle_jax.tools.train import cli, main  # pylint: disable=g-import-not-at-top,unused-import

if __name__ == "__main__":
  cli()
