"""Kills a training run with SIGKILL at random moments, restarts it each time, and checks
that it ends with exactly the metrics of an uninterrupted run.

  python scripts/kill_loop.py --kills=8 -- --config=configs/freedom_ml100k.py \
      --config.alignment=fettle --config.max_epochs=8

Everything after `--` goes to run.py. Both runs checkpoint every epoch; the killed run
shares one workdir across its restarts. Kill moments are uniform over [--min_delay,
--max_delay] seconds after each start (import, compilation, epochs and checkpoint saves
alike).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import List

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_KILLS = flags.DEFINE_integer("kills", 8, "SIGKILLs before the run may finish.")
_MIN_DELAY = flags.DEFINE_float("min_delay", 1.0, "Earliest kill, seconds after a start.")
_MAX_DELAY = flags.DEFINE_float("max_delay", 20.0, "Latest kill, seconds after a start.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the kill moments.")
_ROOT_DIR = flags.DEFINE_string("loop_dir", "", "Folder for both runs (default: a temp dir).")


def run_command(run_args: List[str], workdir: str) -> List[str]:
  return [sys.executable, os.path.join(ROOT, "run.py"), *run_args, f"--workdir={workdir}",
          "--config.checkpoint_every_epochs=1"]


def kill_loop(run_args: List[str], root: str, kills: int, min_delay: float, max_delay: float,
              seed: int, log=print) -> dict:
  """Returns {'uninterrupted': metrics, 'killed': metrics, 'kills': [(delay, finished)]}."""
  rng = random.Random(seed)
  reference_dir, killed_dir = os.path.join(root, "uninterrupted"), os.path.join(root, "killed")
  subprocess.run(run_command(run_args, reference_dir), check=True, capture_output=True)
  history = []
  for k in range(kills):
    delay = rng.uniform(min_delay, max_delay)
    proc = subprocess.Popen(run_command(run_args, killed_dir), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(delay)
    finished = proc.poll() is not None
    if not finished:
      proc.send_signal(signal.SIGKILL)
    proc.wait()
    history.append((round(delay, 2), finished))
    log(f"kill {k + 1}/{kills}: after {delay:.1f} s "
        f"({'had already finished' if finished else 'SIGKILL'})")
  subprocess.run(run_command(run_args, killed_dir), check=True, capture_output=True)
  metrics = {}
  for name, folder in (("uninterrupted", reference_dir), ("killed", killed_dir)):
    with open(os.path.join(folder, "metrics.json")) as f:
      result = json.load(f)
    metrics[name] = {"valid": result["valid"], "test": result["test"],
                     "best_epoch": result["best_epoch"], "epochs": result["epochs"]}
  metrics["kills"] = history
  return metrics


def main(argv):
  run_args = argv[1:]
  root = _ROOT_DIR.value or tempfile.mkdtemp(prefix="kill_loop_")
  shutil.rmtree(os.path.join(root, "killed"), ignore_errors=True)
  shutil.rmtree(os.path.join(root, "uninterrupted"), ignore_errors=True)
  result = kill_loop(run_args, root, _KILLS.value, _MIN_DELAY.value, _MAX_DELAY.value,
                     _SEED.value)
  same = result["killed"] == result["uninterrupted"]
  print(json.dumps(result, indent=1))
  print("identical final metrics" if same else "METRICS DIFFER")
  sys.exit(0 if same else 1)


if __name__ == "__main__":
  app.run(main)
