"""Trains and evaluates one experiment described by a config file.

  fettle-train --config=configs/lightgcn_baby.py [--config.key=value ...] [--workdir=DIR]
  fettle-train --config=lightgcn_baby ...      # a name in configs/, from any folder
  python run.py ...                            # the same, from a checkout

Writes `<workdir>/metrics.json` and Orbax checkpoints; rerunning with the same workdir
resumes where a killed run stopped. A mistake in the config (a missing file, an unknown
field, a value of the wrong type, an unknown backbone, alignment or mesh size, a data folder
without data) is one `error:` line and exit status 1, before any run folder is made. An
explicit --config.data.path wins over the config's built-in data set (data.prepare).

A grid of settings (float fields x seeds) trains in one compiled program (fettle_jax/grid.py):

  fettle-train --config=configs/bpr_ml100k.py --config.alignment=fettle \
      --sweep=fettle.alpha=1e-4,1e-3 --sweep=fettle.beta=1e-3,1e-2 --grid_seeds=0,1,2

Each setting gets its own folder under the workdir; a summary table (mean ± std over seeds,
the best mean validation row marked) is printed and written to `<workdir>/grid.txt`.
"""

import ctypes
import os
import shutil
import signal
import subprocess
import sys

from absl import app
from absl import flags
from absl import logging
import jax

from fettle_jax.errors import ConfigError
from fettle_jax.errors import REPORTED_ERRORS
from fettle_jax.errors import StopRequested
from fettle_jax import config_check
from fettle_jax import grid
from fettle_jax import programs
from fettle_jax import progress
from fettle_jax import sharding
from fettle_jax import train
from fettle_jax.tools import command as command_lib
from data_pipeline import wheels

DEFAULT_CONFIG = os.path.join(config_check.CONFIGS, "default.py")
# --config and its --config.FIELD=VALUE overrides are read by fettle_jax/config_check.py
# (in parse_command_line, before absl sees the other flags); this definition is its --help.
flags.DEFINE_string(
    "config", "configs/default.py", "Experiment config: a file (from the current directory or the "
    "repository root) or a name in configs/ (default: FREEDOM + FETTLE on ml100k). Fields "
    "are set with --config.FIELD=VALUE, e.g. --config.fettle.alpha=1e-3.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: metrics.json, checkpoints. "
                               "Default: runs/<config file name>.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "", "Persistent XLA compilation cache: a rerun of the same config "
    "(and shapes) loads its compiled programs instead of compiling, and its traced epoch and "
    "evaluation programs (DIR/programs) instead of tracing them. Default: "
    "<data cache root>/xla (the root is $FETTLE_JAX_DATA or ~/.cache/fettle_jax); "
    "'none' turns both off. A folder it creates is private (0700); the XLA cache holds "
    "compiled machine code, so share a folder only among people who trust each other.")
_SWEEP = flags.DEFINE_multi_string(
    "sweep", [], "Grid: FIELD=V1,V2,... over a float config field (repeatable; the grid is "
    "the cross product). With --sweep or --grid_seeds, every setting trains side by side in one "
    "compiled program, each in <workdir>/<setting name>/.")
_GRID_SEEDS = flags.DEFINE_list("grid_seeds", [], "Grid: seeds (default: config.seed).")
_GRID_CHUNK = flags.DEFINE_integer(
    "grid_chunk", None, "Grid: at most this many settings per compiled program (default: "
    "all; a chunk that exhausts device memory is split in two automatically).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process run: HOST:PORT of process 0, the same on "
    "every process (with --num_processes and --process_id). Without it, a SLURM / Open MPI "
    "/ multi-host TPU launcher's cluster is detected by jax.distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process run: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process run: this one, 0..N-1.")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", 120, "Seconds to wait for every process to join, and for a "
    "silent process's heartbeat, before the run ends with an error.")


# XLA's coordination service aborts a process whose peer stopped (a multi-line fatal log
# from C++, which Python cannot catch); the supervisor below turns it into one line. Which
# part notices first depends on timing: the heartbeat (coordination service), or a CPU
# collective whose socket to the dead peer closed (gloo, which may abort the process).
PEER_LOST_MARKERS = ("the JAX distributed service detected fatal errors", "gloo::",
                     "Connection closed by peer", "Connection reset by peer")
SUPERVISED_ENV = "FETTLE_JAX_SUPERVISED"


def _die_with_parent() -> None:
  """Linux: the child gets SIGKILL when the supervisor dies (even by SIGKILL)."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except OSError:
    pass


def supervise() -> int:
  """Runs this same command as a child and relays its output, except XLA's fatal report of
  a lost peer, which becomes one `error:` line (exit 1). SIGTERM/SIGINT go to the child."""
  child = subprocess.Popen([sys.executable] + sys.argv, env=dict(os.environ, **{
      SUPERVISED_ENV: "1"}), stderr=subprocess.PIPE, text=True, errors="replace",
                           preexec_fn=_die_with_parent)
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda number, _: child.send_signal(number))
  peer_lost, held = False, []
  for line in child.stderr:
    peer_lost = peer_lost or any(marker in line for marker in PEER_LOST_MARKERS)
    # A lost peer shows as a failed collective's traceback and XLA's coordination errors,
    # then the fatal marker: hold those back until it is clear which it is.
    if held or line.startswith("Traceback") or "coordination" in line.lower():
      held.append(line)
    elif not peer_lost:
      sys.stderr.write(line)
  code = child.wait()
  if not peer_lost:
    sys.stderr.writelines(held)
  if peer_lost and code != 0:
    print(f"error: process {_PROCESS_ID.value if _PROCESS_ID.value is not None else '?'}: "
          "another process of the multi-process run stopped (no heartbeat within "
          f"{_DISTRIBUTED_TIMEOUT.value} s); rerun every process with the same --workdir to "
          "resume from the last checkpoint", file=sys.stderr)
    return 1
  return code if code >= 0 else 128 - code


def run_grid(config, workdir: str) -> None:
  """--sweep/--grid_seeds: trains the grid and prints (and writes) its summary table."""
  sweeps = dict(grid.parse_sweep(text) for text in _SWEEP.value)
  if len(sweeps) != len(_SWEEP.value):
    raise ConfigError(f"--sweep names a field twice: {_SWEEP.value}")
  try:
    seeds = [int(seed) for seed in _GRID_SEEDS.value] or [config.seed]
  except ValueError:
    raise ConfigError(f"--grid_seeds={','.join(_GRID_SEEDS.value)}: expected integers, e.g. "
                      "--grid_seeds=0,1,2") from None
  settings = grid.grid_settings(sweeps, seeds)
  results = grid.train_grid(config, settings, workdir, _GRID_CHUNK.value)
  lines = grid.summary_lines(settings, results, config.selection_metric)
  with open(os.path.join(workdir, "grid.txt"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


_RUN = {}  # parse_command_line's result: "config", "config_name", "notes"


def parse_command_line(argv):
  """absl's flags, then the experiment config (--config, --config.FIELD=VALUE: found,
  overridden and checked by config_check). A mistake in either is one `error:` line and
  exit 1, before a run folder, lock, cache or data set exists."""
  if any(arg in command_lib.HELP_ARGS for arg in argv[1:]):
    print(command_lib.tool_help(sys.modules[__name__]), flush=True)
    sys.exit(0)
  try:
    argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
    command = config_check.split_arguments(argv)
    rest = flags.FLAGS(command.rest)  # --help and friends print and exit here
    config, name, _ = config_check.config_from_command_line(argv, DEFAULT_CONFIG)
  except flags.Error as e:
    command_lib.exit_with_error(e)
  except REPORTED_ERRORS as e:
    command_lib.exit_with_error(e)
  _RUN.update(config=config, config_name=name,
              notes=config_check.unread_overrides(config, command.overrides))
  return rest


def compilation_cache_directory() -> str:
  """--compilation_cache, else <data cache root>/xla; a folder it creates is private."""
  path = _COMPILATION_CACHE.value or os.path.join(wheels.cache_root(), "xla")
  return programs.private_directory(path)


def remove_if_unused(workdir: str, existed: bool) -> None:
  """A run folder this command created and left holding nothing but its lock (the run
  stopped before writing anything) is removed again."""
  if existed or not os.path.isdir(workdir) or not train.is_primary():
    return
  if set(os.listdir(workdir)) <= {".lock"}:
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  multi_process = _COORDINATOR.value is not None or sharding.detected_cluster()
  if multi_process and not os.environ.get(SUPERVISED_ENV):
    sys.exit(supervise())
  progress.show_progress_lines()  # our timestamped progress lines, not Orbax's internals
  for note in _RUN["notes"]:
    logging.warning(note)
  config = _RUN["config"]
  workdir = _WORKDIR.value or os.path.join("runs", _RUN["config_name"])
  existed = os.path.exists(workdir)
  try:
    if _COMPILATION_CACHE.value != "none":
      train.enable_compilation_cache(compilation_cache_directory(), traced_programs=True)
    # Before anything touches a device: join the other processes of a multi-process run.
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                    _PROCESS_ID.value, _DISTRIBUTED_TIMEOUT.value)
    train.check_config(config)  # the checks that need the devices, before the run folder
    if jax.process_count() == 1:  # processes of a multi-process run could stop out of step
      command_lib.install_stop_handlers()
    if _SWEEP.value or _GRID_SEEDS.value:
      run_grid(config, workdir)
    else:
      train.train_and_evaluate(config, workdir)
  except REPORTED_ERRORS as e:  # input/environment: one line; bugs keep their traceback
    remove_if_unused(workdir, existed)
    command_lib.exit_with_error(e)
  except StopRequested as e:
    command_lib.exit_stopped(e)


def cli() -> None:
  """The `fettle-train` console script (and `python run.py`)."""
  app.run(main, flags_parser=parse_command_line)


if __name__ == "__main__":
  cli()
