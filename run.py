"""Trains and evaluates one experiment described by a config file.

  python run.py --config=configs/lightgcn_baby.py [--config.key=value ...] [--workdir=DIR]

Writes `<workdir>/metrics.json` and Orbax checkpoints; rerunning with the same workdir
resumes where a killed run stopped.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# Make `configs` importable when run from elsewhere (configs import each other).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fettle_jax.errors import REPORTED_ERRORS  # pylint: disable=g-import-not-at-top
from fettle_jax import sharding  # pylint: disable=g-import-not-at-top
from fettle_jax import train  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py"),
    "Experiment config file (default: configs/default.py, FREEDOM + FETTLE on ml100k).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics.json, checkpoints. "
                               "Default: runs/<config file name>.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "", "Persistent XLA compilation cache: a rerun of the same config "
    "(and shapes) loads its compiled programs instead of compiling. Default: "
    "<data cache root>/xla (the root is $FETTLE_JAX_DATA or ~/.cache/fettle_jax); "
    "'none' turns it off.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process run: HOST:PORT of process 0, the same on "
    "every process (with --num_processes and --process_id). Without it, a SLURM / Open MPI "
    "/ multi-host TPU launcher's cluster is detected by jax.distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process run: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process run: this one, 0..N-1.")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 120, "Seconds to wait for every process to join, and for a "
    "silent process's heartbeat, before the run ends with an error.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # our progress lines, not Orbax's internals
  config = _CONFIG.value
  config_name = os.path.splitext(os.path.basename(config_flags.get_config_filename(
      flags.FLAGS["config"])))[0]
  workdir = _WORKDIR.value or os.path.join("runs", config_name)
  if _COMPILATION_CACHE.value != "none":
    train.enable_compilation_cache(_COMPILATION_CACHE.value or None)
  try:
    # Before anything touches a device: join the other processes of a multi-process run.
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                    _PROCESS_ID.value, _DISTRIBUTED_TIMEOUT.value)
    train.train_and_evaluate(config, workdir)
  except REPORTED_ERRORS as e:  # input/environment: one line; bugs keep their traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
