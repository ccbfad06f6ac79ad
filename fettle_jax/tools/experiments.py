"""The paper's Table 2 and Table 3 on any data set, end to end (tuned, trained, tabulated).

  fettle-experiments --out=runs/ml100k_table [--seeds=0,1,2] [--backbones=...]
  fettle-experiments --out=runs/baby_table --data=DIR --configs=baby \\
      [--ablation=freedom,lightgcn]

(`python scripts/experiments.py ...` runs the same.)

Data: the embedded ml100k (default) or `--data=DIR`, any folder the loaders read (MMRec
`<name>.inter` + features, or the LATTICE JSON split). Each run starts from
`configs/<backbone>_<--configs>.py` (ml100k: codebooks scaled to the data; baby: the paper's
settings), pointed at --data when given.

1. Tuning (validation only, seed 0): for each backbone, a coordinate search over the
   paper's grids (Sec 4.1), starting at the paper's best FREEDOM/Baby setting (Sec 4.6):
   beta, then alpha, then lambda_f, then lambda_c; each coordinate keeps the
   value with the best validation Recall@20 (--tune_coordinates visits a subset). Tuning
   runs stop at --tune_max_epochs.
   Writes `tuning_<backbones>.md`.
2. Table 2: every (backbone, variant, seed) cell trained to early stop with
   `train_and_evaluate`; +FETTLE uses the tuned values. Table 3, the ablation (+ILA, +CLA,
   +ILA&CLA, +ILA&CLA&DT), on each --ablation backbone that is also in --backbones, at
   the paper's best setting. Writes `table_<backbones>.md`: test Recall@10/20 and
   NDCG@10/20 (the paper's Table 2 metrics) as mean +- std over seeds, each at the best
   *validation* epoch, each row's Delta Imp. (R@20 over vanilla, %) and the paper's
   "Avg Delta Imp." rows over the backbones with every seed of all three variants; and
   `table_<backbones>.csv`, every metric's mean and std per cell.

--settings=bpr:<tag> re-trains a backbone's table at a setting an earlier tuning chose
(skipping the search); --variants=vanilla,+BM3 trains and tabulates only those rows.

Every run lives in its own folder under --out, named by its settings; a finished run is
reused, so the script resumes where it stopped. Several processes may share one --out:
each claims a run before training it and skips runs claimed by another live process (run
the script once more, or with --only_table, to collect them).
"""

import importlib
import importlib.util
import os
import statistics
import time

from absl import app
from absl import flags
from absl import logging

from configs import base
from fettle_jax import train
from fettle_jax import workdir as workdir_lib
from fettle_jax.tools import command

_OUT = flags.DEFINE_string("out", "runs/ml100k_table",
                           "Folder for runs, tuning_*.md and table_*.md.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds per table cell.")
_BACKBONES = flags.DEFINE_list(
    "backbones", base.backbone_names(),
    "Backbones (each needs configs/<name>_<--configs>.py); default: every one in "
    "fettle_jax/backbones/.")
_DATA = flags.DEFINE_string("data", "", "Data folder (MMRec or LATTICE format); default: "
                            "what the configs name (ml100k: the embedded data set).")
_CONFIGS = flags.DEFINE_string("configs", "ml100k", "Config set: configs/<backbone>_<this>.py.")
_ABLATION = flags.DEFINE_list("ablation", ["freedom"], "Backbones that get the Table 3 "
                              "ablation rows (those also in --backbones).")
_MAX_EPOCHS = flags.DEFINE_integer("max_epochs", 1000, "Upper bound on epochs per table run.")
_TUNE_MAX_EPOCHS = flags.DEFINE_integer("tune_max_epochs", 100, "Epoch cap of tuning runs.")
_TUNE = flags.DEFINE_bool("tune", True, "Tune FETTLE; False uses the paper's best setting.")
_SETTINGS = flags.DEFINE_list(
    "settings", [], "Backbones whose FETTLE setting is given instead of tuned, as "
    "backbone:tag with the tag of a tuning table, e.g. bpr:b0.01_a0.0001_tf0.2_tc0.1 (to "
    "re-train a table from an earlier tuning without repeating it).")
_VARIANTS = flags.DEFINE_list(
    "variants", [], "Table rows to train and tabulate, by label (vanilla, +BM3, +FETTLE, "
    "+ILA, +CLA, +ILA&CLA, +ILA&CLA&DT); default: all.")
_FEEDBACK = flags.DEFINE_enum(
    "feedback", "dot", ["dot", "cosine"], "Eq. 2's feedback score in every FETTLE run "
    "(config.fettle.feedback); cosine runs' folders end in _fcosine, so both share one --out.")
_ONLY_TABLE = flags.DEFINE_bool("only_table", False, "Do not train; tabulate what exists.")
_TUNE_COORDINATES = flags.DEFINE_list(
    "tune_coordinates", ["beta", "alpha", "temperature_feedback", "temperature_cluster"],
    "FETTLE settings the coordinate search visits, in order; the others keep the paper's "
    "best (a shorter search for a smaller CPU budget).")

# The paper's grids (Sec 4.1). Its sentence pairs lambda_c with {0.1, 0.2, 0.3} and lambda_f
# with {0.05, 0.1, 0.15}, yet its best values (Sec 4.6: lambda_f 0.10, lambda_c 0.05) and
# sweeps (lambda_f 0.1-0.5, lambda_c 0.05-0.25) fit the swapped pairing, which we use. For
# CF backbones it searches alpha, beta in {1, 10, 100}; our terms are means over the batch
# (not sums), and alpha = beta = 1 already outweighs BPR's loss ~75x and stops BPR from
# learning, so every backbone uses the multi-modal grid.
GRID = {
    "beta": (1e-4, 1e-3, 1e-2),
    "alpha": (1e-4, 1e-3, 1e-2),
    "temperature_feedback": (0.1, 0.2, 0.3),
    "temperature_cluster": (0.05, 0.1, 0.15),
}
PAPER_BEST = {"beta": 1e-3, "alpha": 1e-3, "temperature_feedback": 0.1,
              "temperature_cluster": 0.05}
SHORT = {"beta": "b", "alpha": "a", "temperature_feedback": "tf", "temperature_cluster": "tc"}

# (row label, run-folder stem, alignment, fettle switches, FETTLE setting: tuned or paper's)
VARIANTS = [
    ("vanilla", "vanilla", "none", {}, None),
    ("+BM3", "BM3", "bm3", {}, None),
    ("+FETTLE", "FETTLE", "fettle", {}, "tuned"),
]
# Table 3 (by default on FREEDOM), at the paper's best setting: the paper ablates one fixed
# setting, and a CPU budget cannot re-run the ablation at each backbone's tuned setting.
ABLATION = [
    ("+ILA", "ILA", "fettle", {"use_ila": True, "use_cla": False, "use_dt": False}, "paper"),
    ("+CLA", "CLA", "fettle", {"use_ila": False, "use_cla": True, "use_dt": False}, "paper"),
    ("+ILA&CLA", "ILA_CLA", "fettle", {"use_ila": True, "use_cla": True, "use_dt": False},
     "paper"),
    ("+ILA&CLA&DT", "FETTLE", "fettle", {}, "paper"),
]
# The paper's Table 2 metrics, in its column order.
METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")
METRIC_LABELS = {"recall@10": "R@10", "recall@20": "R@20", "ndcg@10": "N@10", "ndcg@20": "N@20"}


def setting_tag(setting):
  tag = "_".join(f"{SHORT[k]}{setting[k]:g}" for k in GRID)
  return tag + ("_fcosine" if _FEEDBACK.value == "cosine" else "")


def parse_setting_tag(tag):
  """Inverse of `setting_tag`: 'b0.01_a0.0001_tf0.2_tc0.1' -> {'beta': 0.01, ...}."""
  prefixes = {v: k for k, v in SHORT.items()}
  setting = {}
  for part in tag.removesuffix("_fcosine").split("_"):
    prefix = part.rstrip("0123456789.e-+")
    if prefix not in prefixes or prefix == part:
      raise app.UsageError(f"--settings: bad part {part!r} in {tag!r}; expected "
                           f"{'_'.join(v + '<value>' for v in SHORT.values())}")
    setting[prefixes[prefix]] = float(part[len(prefix):])
  if set(setting) != set(GRID):
    raise app.UsageError(f"--settings: {tag!r} must give all of {sorted(SHORT.values())}")
  return setting


def given_settings():
  """--settings as {backbone: setting}."""
  settings = {}
  for entry in _SETTINGS.value:
    backbone, sep, tag = entry.partition(":")
    if not sep:
      raise app.UsageError(f"--settings: {entry!r} is not backbone:tag")
    settings[backbone] = parse_setting_tag(tag)
  return settings


def check_flags():
  """Fails at start, not hours in, on a bad flag or a missing config; returns --settings."""
  unknown = sorted(set(_TUNE_COORDINATES.value) - set(GRID))
  if unknown:
    raise app.UsageError(f"--tune_coordinates: unknown {unknown}; known: {sorted(GRID)}")
  for backbone in _BACKBONES.value:
    experiment_config(backbone)
  labels = [v[0] for v in VARIANTS + ABLATION]
  if set(_VARIANTS.value) - set(labels):
    raise app.UsageError(f"--variants: unknown {sorted(set(_VARIANTS.value) - set(labels))}; "
                         f"known: {labels}")
  given = given_settings()
  if set(given) - set(_BACKBONES.value):
    raise app.UsageError(f"--settings names {sorted(set(given) - set(_BACKBONES.value))}, "
                         "not in --backbones")
  return given


def table_variants(backbone):
  """The rows trained for `backbone`: Table 2's, Table 3's on --ablation backbones, as
  filtered by --variants."""
  variants = VARIANTS + (ABLATION if backbone in _ABLATION.value else [])
  return [v for v in variants if not _VARIANTS.value or v[0] in _VARIANTS.value]


def claim(workdir):
  """True if this process may train `workdir`: no other live process of ours holds it."""
  os.makedirs(workdir, exist_ok=True)
  claim_file = os.path.join(workdir, "claimed_by_pid")
  if os.path.exists(claim_file):
    with open(claim_file) as f:
      pid = int(f.read().strip() or 0)
    if pid != os.getpid() and os.path.exists(f"/proc/{pid}"):
      return False  # a live process trains it; this pass skips the run
  with open(claim_file, "w") as f:
    f.write(str(os.getpid()))
  return True


def experiment_config(backbone):
  """configs/<backbone>_<--configs>.py, pointed at --data when given."""
  name = f"{backbone}_{_CONFIGS.value}"
  if importlib.util.find_spec(f"configs.{name}") is None:
    raise app.UsageError(f"no config configs/{name}.py for backbone {backbone!r} "
                         f"(--configs={_CONFIGS.value})")
  config = importlib.import_module(f"configs.{name}").get_config()
  if _DATA.value:
    config.data.path, config.data.prepare = _DATA.value, ""
  return config


def run(workdir, backbone, alignment, fettle_overrides, seed, max_epochs, wait=False):
  """Trains one run unless its metrics.json exists; returns the metrics (None if absent).

  A run that another live process is training is skipped (None), or with `wait` (tuning
  needs the value) polled until it finishes. Interrupted runs resume from their checkpoint.
  """
  metrics_file = os.path.join(workdir, "metrics.json")
  while wait and not os.path.exists(metrics_file) and not claim(workdir):
    time.sleep(30)
  if not os.path.exists(metrics_file):
    if _ONLY_TABLE.value or not claim(workdir):
      return None
    config = experiment_config(backbone)
    config.alignment = alignment
    config.seed = seed
    config.max_epochs = max_epochs
    for key, value in fettle_overrides.items():
      config.fettle[key] = value
    if alignment == "fettle":
      config.fettle.feedback = _FEEDBACK.value
    print(f"=== {os.path.basename(workdir)}", flush=True)
    train.train_and_evaluate(config, workdir)
  return workdir_lib.read_metrics(workdir)


def tune(backbone, lines):
  """Coordinate search on validation Recall@20 (seed 0); returns the chosen setting."""
  best, best_value = dict(PAPER_BEST), None
  for key in _TUNE_COORDINATES.value:
    for value in GRID[key]:
      setting = dict(best, **{key: value})
      workdir = os.path.join(_OUT.value, "tune", f"{backbone}_{setting_tag(setting)}")
      result = run(workdir, backbone, "fettle", setting, 0, _TUNE_MAX_EPOCHS.value,
                   wait=not _ONLY_TABLE.value)
      if result is None:  # --only_table and not trained yet
        return None
      valid = result["valid"]["recall@20"]
      lines.append(f"| {backbone} | {key} | {setting_tag(setting)} | {valid:.4f} | "
                   f"{result['best_epoch']} |")
      if best_value is None or valid > best_value:
        best, best_value = setting, valid
  lines.append(f"| {backbone} | **chosen** | {setting_tag(best)} | {best_value:.4f} | |")
  return best


def mean_std(values, digits=4):
  if not values:
    return "n/a"
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def write(name, lines):
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, name), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  command.install_stop_handlers()  # a run stops after an epoch, resumable
  given = check_flags()
  tuning_lines = [f"Coordinate search over {', '.join(_TUNE_COORDINATES.value)}, seed 0, "
                  f"validation Recall@20, runs capped at {_TUNE_MAX_EPOCHS.value} epochs.", "",
                  "| backbone | coordinate | setting | valid R@20 | best epoch |",
                  "| --- | --- | --- | --- | --- |"]
  rows, cells = [], {}  # cells[(backbone, label)] = [metrics.json of each seed]
  for backbone in _BACKBONES.value:
    if backbone in given:
      setting = given[backbone]
      tuning_lines.append(f"| {backbone} | **given** (--settings) | {setting_tag(setting)} "
                          "| | |")
    elif _TUNE.value and any(v[4] == "tuned" for v in table_variants(backbone)):
      setting = tune(backbone, tuning_lines)
    else:  # --notune, or no tuned row asked for
      setting = dict(PAPER_BEST)
    if _TUNE.value or backbone in given:
      write(f"tuning_{'_'.join(_BACKBONES.value)}.md", tuning_lines)
    for label, stem, alignment, switches, setting_source in table_variants(backbone):
      fettle_setting = {"tuned": setting, "paper": PAPER_BEST, None: {}}[setting_source]
      if fettle_setting is None:
        continue  # not tuned yet (--only_table)
      tag = setting_tag(fettle_setting) if fettle_setting else ""
      name = f"{backbone}_{stem}{'_' + tag if tag else ''}"
      results = [run(os.path.join(_OUT.value, f"{name}_s{seed}"), backbone, alignment,
                     dict(fettle_setting, **switches), int(seed), _MAX_EPOCHS.value)
                 for seed in _SEEDS.value]
      results = [r for r in results if r is not None]
      cells[(backbone, label)] = results
      rows.append((backbone, label, tag or "-", results))
  stem = f"table_{'_'.join(_BACKBONES.value)}"
  write(f"{stem}.md", table_lines(rows, cells))
  write(f"{stem}.csv", csv_lines(rows))


def mean_test_metrics(results):
  return {m: statistics.mean(r["test"][m] for r in results) for m in METRICS}


def improvement(cells, backbone, label):
  """Delta Imp. of the paper's Table 2: 100 (mean - vanilla mean) / vanilla mean per metric;
  None unless both cells have every seed's result."""
  vanilla, other = cells.get((backbone, "vanilla")), cells.get((backbone, label))
  if not vanilla or not other or len(vanilla) != len(_SEEDS.value) or len(other) != len(vanilla):
    return None
  vanilla, other = mean_test_metrics(vanilla), mean_test_metrics(other)
  return {m: 100.0 * (other[m] - vanilla[m]) / vanilla[m] for m in METRICS}


def table_lines(rows, cells):
  """Markdown: test metrics mean +- std over seeds (at the best valid epoch), the
  improvement over vanilla per row, and the paper's 'Avg Delta Imp.' rows over backbones."""
  metric_cols = " | ".join(f"test {METRIC_LABELS[m]}" for m in METRICS)
  lines = [f"| backbone | variant | FETTLE setting | seeds | {metric_cols} | valid R@20 "
           "| best epoch | Δ Imp. R@20 |",
           "| --- | --- | --- | --- | " + "--- | " * len(METRICS) + "--- | --- | --- |"]
  for backbone, label, tag, results in rows:
    delta = improvement(cells, backbone, label) if label != "vanilla" else None
    delta = "-" if delta is None else f"{delta['recall@20']:+.2f}%"
    lines.append(
        f"| {backbone} | {label} | {tag} | {len(results)} | "
        + " | ".join(mean_std([r["test"][m] for r in results]) for m in METRICS)
        + f" | {mean_std([r['valid']['recall@20'] for r in results])} | "
        f"{mean_std([r['best_epoch'] for r in results], digits=0)} | "
        f"{delta} |")
  lines += ["", "| Avg Δ Imp. over backbones | backbones | "
            + " | ".join(METRIC_LABELS[m] for m in METRICS) + " |",
            "| --- | --- | " + "--- | " * len(METRICS)]
  for label in [v[0] for v in VARIANTS[1:]]:
    deltas = {b: improvement(cells, b, label) for b in _BACKBONES.value}
    deltas = {b: d for b, d in deltas.items() if d is not None}
    if deltas:
      lines.append(f"| {label} | {len(deltas)} | " + " | ".join(
          f"{statistics.mean(d[m] for d in deltas.values()):+.2f}%" for m in METRICS) + " |")
  return lines


def csv_lines(rows):
  """One row per table cell: mean and std of every metric over its seeds."""
  header = ["backbone", "variant", "fettle_setting", "seeds"]
  for split in ("test", "valid"):
    for m in METRICS:
      header += [f"{split}_{m}_mean", f"{split}_{m}_std"]
  lines = [",".join(header)]
  for backbone, label, tag, results in rows:
    values = [backbone, label, tag, str(len(results))]
    for split in ("test", "valid"):
      for m in METRICS:
        xs = [r[split][m] for r in results]
        std = statistics.stdev(xs) if len(xs) > 1 else 0.0
        values += [f"{statistics.mean(xs):.6f}", f"{std:.6f}"] if xs else ["", ""]
    lines.append(",".join(values))
  return lines


def cli():
  """The `fettle-experiments` console script."""
  command.run_app(main, __name__)


if __name__ == "__main__":
  cli()
