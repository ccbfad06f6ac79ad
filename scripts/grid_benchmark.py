"""A grid in one vmapped program (fettle_jax/grid.py) against the same settings run one
after another, side by side in one process: wall times and the largest metric difference.

  python scripts/grid_benchmark.py --out=runs/grid_benchmark \\
      --sweep=fettle.alpha=1e-4,1e-3,1e-2 --sweep=fettle.beta=1e-4,1e-3,1e-2 --seeds=0,1,2 \\
      [--config=configs/bpr_ml100k.py --alignment=fettle --max_epochs=2]

Both sides use a persistent compilation cache that starts empty under --out (as `run.py`
would: sequential runs of one setting's program with another seed load it instead of
compiling). Writes `<out>/benchmark.json` and prints a Markdown summary.
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

from fettle_jax import grid
from fettle_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "bpr_ml100k.py"), "Experiment config file.")
_ALIGNMENT = flags.DEFINE_string("alignment", "fettle", "config.alignment of every setting.")
_SWEEP = flags.DEFINE_multi_string("sweep", [], "FIELD=V1,V2,... (repeatable).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
_MAX_EPOCHS = flags.DEFINE_integer("max_epochs", 2, "Epochs per setting.")
_OUT = flags.DEFINE_string("out", "runs/grid_benchmark", "Output folder.")

METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


def largest_difference(a: dict, b: dict) -> float:
  """Max |a - b| over the valid/test metrics and the per-epoch losses and valid metric."""
  diffs = [abs(a[split][m] - b[split][m]) for split in ("valid", "test") for m in METRICS]
  for ha, hb in zip(a["history"], b["history"]):
    diffs += [abs(ha[k] - hb[k]) for k in ha if k in hb and k.startswith(("loss", "valid_"))]
  return max(diffs)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  config.alignment = _ALIGNMENT.value
  config.max_epochs = _MAX_EPOCHS.value
  config.patience = _MAX_EPOCHS.value + 1  # every setting trains every epoch
  train.enable_compilation_cache(os.path.join(_OUT.value, "xla_cache"))
  settings = grid.grid_settings(dict(grid.parse_sweep(s) for s in _SWEEP.value),
                                [int(s) for s in _SEEDS.value])
  start = time.perf_counter()
  grid_results = grid.train_grid(config, settings, os.path.join(_OUT.value, "grid"))
  grid_seconds = time.perf_counter() - start
  sequential_seconds, differences = [], []
  for setting, got in zip(settings, grid_results):
    start = time.perf_counter()
    want = train.train_and_evaluate(grid.concrete_config(config, setting), os.path.join(
        _OUT.value, "sequential", grid.setting_name(setting)))
    sequential_seconds.append(time.perf_counter() - start)
    differences.append(largest_difference(got, want))
    print(f"{grid.setting_name(setting)}: {sequential_seconds[-1]:.1f} s, largest "
          f"difference to the grid {differences[-1]:.2e}", flush=True)
  summary = {
      "settings": len(settings), "epochs": _MAX_EPOCHS.value,
      "config": f"{config.model} + {config.alignment}, {config.data.prepare or config.data.path}",
      "grid_seconds": grid_seconds, "sequential_seconds": sum(sequential_seconds),
      "speedup": sum(sequential_seconds) / grid_seconds,
      "largest_difference": max(differences),
      "median_difference": float(np.median(differences)),
      "per_setting_sequential_seconds": sequential_seconds,
  }
  with open(os.path.join(_OUT.value, "benchmark.json"), "w") as f:
    json.dump(summary, f, indent=2)
  print(f"| settings | epochs | grid (one program) | sequential | ratio | largest metric "
        f"difference |\n| --- | --- | --- | --- | --- | --- |\n| {len(settings)} | "
        f"{_MAX_EPOCHS.value} | {grid_seconds:.0f} s | {sum(sequential_seconds):.0f} s | "
        f"{summary['speedup']:.2f}x | {max(differences):.1e} |", flush=True)


if __name__ == "__main__":
  app.run(main)
