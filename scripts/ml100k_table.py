"""Table 2/3-style comparison on the embedded ml100k data set, produced end to end.

  python scripts/ml100k_table.py --out=runs/ml100k_table [--seeds=0,1,2] [--backbones=...]

Trains every (backbone, variant, seed) cell with `train_and_evaluate` (cells already
finished in --out are reused, so the script resumes), then writes `table.md` with test
Recall@20 / NDCG@20 as mean +- std over seeds, each at the best *validation* epoch.
Variants: vanilla, +BM3, +FETTLE; on FREEDOM also the Table 3 ablation.
"""

import importlib
import json
import os
import statistics
import sys

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fettle_jax import train  # pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string("out", "runs/ml100k_table", "Folder for runs and table.md.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per cell.")
_BACKBONES = flags.DEFINE_list("backbones", ["bpr", "lightgcn", "vbpr", "freedom"], "Backbones.")
_MAX_EPOCHS = flags.DEFINE_integer("max_epochs", 1000, "Upper bound on epochs per run.")
_ONLY_TABLE = flags.DEFINE_bool("only_table", False, "Do not train; tabulate what exists.")

# name -> (alignment, fettle overrides)
VARIANTS = {
    "vanilla": ("none", {}),
    "+BM3": ("bm3", {}),
    "+FETTLE": ("fettle", {}),
}
ABLATION = {  # Table 3 on FREEDOM; "+ILA&CLA&DT" is +FETTLE
    "+ILA": ("fettle", {"use_ila": True, "use_cla": False, "use_dt": False}),
    "+CLA": ("fettle", {"use_ila": False, "use_cla": True, "use_dt": False}),
    "+ILA&CLA": ("fettle", {"use_ila": True, "use_cla": True, "use_dt": False}),
}
METRICS = ("recall@20", "ndcg@20")


def cell_dir(backbone, variant, seed):
  safe = variant.replace("+", "").replace("&", "_") or "vanilla"
  return os.path.join(_OUT.value, f"{backbone}_{safe}_s{seed}")


def run_cell(backbone, variant, alignment, overrides, seed):
  workdir = cell_dir(backbone, variant, seed)
  metrics_file = os.path.join(workdir, "metrics.json")
  if not os.path.exists(metrics_file):
    if _ONLY_TABLE.value:
      return None
    config = importlib.import_module(f"configs.{backbone}_ml100k").get_config()
    config.alignment = alignment
    config.seed = seed
    config.max_epochs = _MAX_EPOCHS.value
    for key, value in overrides.items():
      config.fettle[key] = value
    print(f"=== {backbone} {variant} seed {seed} -> {workdir}", flush=True)
    train.train_and_evaluate(config, workdir)
  with open(metrics_file) as f:
    return json.load(f)


def mean_std(values, digits=4):
  if not values:
    return "n/a"
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rows = []
  for backbone in _BACKBONES.value:
    variants = dict(VARIANTS)
    if backbone == "freedom":
      variants.update(ABLATION)
    for variant, (alignment, overrides) in variants.items():
      results = [run_cell(backbone, variant, alignment, overrides, int(s)) for s in _SEEDS.value]
      results = [r for r in results if r is not None]
      rows.append((backbone, variant, len(results),
                   [mean_std([r["test"][m] for r in results]) for m in METRICS],
                   mean_std([r["valid"]["recall@20"] for r in results]),
                   mean_std([r["best_epoch"] for r in results], digits=0)))
  lines = ["| backbone | variant | seeds | test R@20 | test N@20 | valid R@20 | best epoch |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  lines += [f"| {b} | {v} | {n} | {m[0]} | {m[1]} | {val} | {ep} |"
            for b, v, n, m, val, ep in rows]
  table = "\n".join(lines)
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "table.md"), "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  app.run(main)
