"""Eight forced CPU devices for this process (set before JAX initializes; the parent
conftest imports no JAX). Run as its own pytest process: python -m pytest -q tests/multidevice
"""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
