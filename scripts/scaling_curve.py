"""How each stage's cost grows with the data: per-stage wall time and peak RSS of training
on MMRec-format sets of growing size, a CSV, a log-log PNG and a fitted slope per stage.

  nice python scripts/scaling_curve.py --sizes=0.25,1,4 --out=/work/scale_data/curve

Sets: `--sizes` million interactions each, power-law item and user degrees, users and
items growing with the interactions at Amazon-like ratios (--per_user interactions per user,
--per_item per item: 10 and 50 give the 500k x 100k x 5M set); 80/10/10 train/valid/test
labels, every user's first interaction in train; no content features (LightGCN). Each set
is written once under --out (`generate`, also importable, and `--generate_only`).

Stages, each configuration in its own child process (so each peak RSS is its own), each
timed in wall seconds (`<stage>_s`) and process CPU seconds (`<stage>_cpu_s`, plotted):
load (train.load_data), host (create_train_state: graphs, sampling index, placement),
compile (the first epoch's compilation, from jit's lower+compile), epoch (one compiled
epoch, after compilation), rank (one valid+test ranking pass, compiled first), and the
child's peak RSS. The slope per stage is the least-squares fit of log(time) against
log(interactions) over the sizes measured: 1 is linear growth.

Batch size: --steps_per_epoch (default 64) fixes the number of steps per epoch, so the batch
grows with the train interactions (a multiple of 1024, never below the config's) and Adam's
learning rate follows the square-root rule lr = lr_0 * sqrt(B / B_0) (`config.steps_per_epoch`,
`train.scaled_batch`).
LightGCN-style backbones propagate the whole graph every step, so a fixed batch size makes
an epoch cost (interactions / B) x graph size, quadratic in the data; a fixed step count
makes it linear.
"""

import json
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np


_SIZES = flags.DEFINE_list("sizes", ["0.25", "1", "4"], "Million interactions per set.")
_OUT = flags.DEFINE_string("out", "/work/scale_data/curve", "Folder for the sets and results.")
_CONFIGS = flags.DEFINE_list("configs", ["lightgcn_baby"], "configs/<name>.py to run.")
_PER_USER = flags.DEFINE_float("per_user", 10.0, "Interactions per user.")
_PER_ITEM = flags.DEFINE_float("per_item", 50.0, "Interactions per item.")
_OVERRIDES = flags.DEFINE_list("overrides", [], "name=value config overrides (Python "
                               "literals), e.g. batch_size=8192.")
_GENERATE_ONLY = flags.DEFINE_bool("generate_only", False, "Only write the sets.")
_FEATURES = flags.DEFINE_list("features", [], "name:dims of content features to add (e.g. "
                              "image:64,text:32; random, for cost only): the sets then live "
                              "in set_<M>M_f<dims> folders, for the multi-modal configs.")
_RANK_FRACTION = flags.DEFINE_float(
    "rank_fraction", 1.0, "Rank this fraction of the users with held-out items (a fixed "
    "sample) and scale the rank stage by its inverse: ranking costs the same per user, so "
    "the largest sets need not be ranked whole. Rows say the fraction.")
_GATHER_PROBE = flags.DEFINE_bool("gather_probe", False, "Only time LightGCN's graph product "
                                   "on each size's users x items graph (ns per edge).")
_APPEND = flags.DEFINE_bool("append", True, "Keep --out's earlier results.csv rows (other "
                            "sizes or configs); rows measured now replace equal ones.")
_CHILD = flags.DEFINE_string("child", "", "Internal: 'config,data_dir' to measure.")
_SEED = flags.DEFINE_integer("seed", 0, "Generator seed.")

STAGES = ("load_s", "host_s", "compile_s", "epoch_s", "rank_s")
ITEM_EXPONENT, USER_EXPONENT = 0.8, 0.5  # Zipf exponents of item and user popularity


def zipf_ids(rng: np.random.Generator, n_ids: int, n_draws: int, exponent: float) -> np.ndarray:
  """n_draws ids in [0, n_ids) with P(id) proportional to (rank + 1)^-exponent, the ranks
  shuffled over the ids (popularity unrelated to the id)."""
  weights = np.arange(1, n_ids + 1, dtype=np.float64) ** -exponent
  cdf = np.cumsum(weights)
  ranks = np.searchsorted(cdf, rng.random(n_draws) * cdf[-1], side="right")
  return rng.permutation(n_ids)[np.minimum(ranks, n_ids - 1)].astype(np.int64)


def generate(n_inter: int, per_user: float, per_item: float, seed: int = 0):
  """(users, items, labels) int64: every user and item id used, pairs distinct, degrees
  power-law; labels 0/1/2 with probability 0.8/0.1/0.1, each user's first pair train."""
  rng = np.random.default_rng(seed)
  n_users, n_items = int(n_inter / per_user), int(n_inter / per_item)
  # Every id once (the id rule: ids 0..n-1 all occur), then power-law draws.
  cover = max(n_users, n_items)
  n_draws = int((n_inter - cover) * 1.2)  # spare draws: repeated pairs are dropped
  users = np.concatenate([np.arange(cover) % n_users,
                          zipf_ids(rng, n_users, n_draws, USER_EXPONENT)])
  items = np.concatenate([rng.permutation(cover) % n_items,
                          zipf_ids(rng, n_items, n_draws, ITEM_EXPONENT)])
  keys = users * n_items + items
  _, first = np.unique(keys, return_index=True)
  first = np.sort(first)[:n_inter]  # the covering pairs come first and are all kept
  users, items = users[first], items[first]
  labels = rng.choice(3, size=len(users), p=(0.8, 0.1, 0.1))
  _, first_of_user = np.unique(users, return_index=True)
  labels[first_of_user] = 0
  # A user's only item in train would leave valid/test users without train: first is train.
  return users, items, labels


def write_inter(folder: str, name: str, users, items, labels, rows_per_chunk: int = 1 << 20):
  """`<folder>/<name>.inter`: header userID itemID x_label, tab-separated, in chunks."""
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f"{name}.inter")
  with open(path + ".tmp", "w") as f:
    f.write("userID\titemID\tx_label\n")
    for start in range(0, len(users), rows_per_chunk):
      end = start + rows_per_chunk
      f.write("".join(f"{u}\t{i}\t{l}\n" for u, i, l in zip(
          users[start:end].tolist(), items[start:end].tolist(), labels[start:end].tolist())))
  os.replace(path + ".tmp", path)
  return path


def dataset_dir(millions: float) -> str:
  dims = "_".join(f.split(":")[1] for f in _FEATURES.value)
  return os.path.join(_OUT.value, f"set_{millions:g}M" + (f"_f{dims}" if dims else ""))


def write_features(folder: str, n_items: int, seed: int) -> None:
  """--features as <name>_feat.npy (MMRec's names), standard normal float32 rows."""
  rng = np.random.default_rng(seed + 1)
  os.makedirs(folder, exist_ok=True)
  for entry in _FEATURES.value:
    name, dims = entry.split(":")
    np.save(os.path.join(folder, f"{name}_feat.npy"),
            rng.standard_normal((n_items, int(dims)), dtype=np.float32))


def ensure_set(millions: float) -> str:
  folder = dataset_dir(millions)
  if not os.path.exists(os.path.join(folder, "scale.inter")):
    users, items, labels = generate(int(millions * 1e6), _PER_USER.value, _PER_ITEM.value,
                                    _SEED.value)
    write_features(folder, int(items.max()) + 1, _SEED.value)
    write_inter(folder, "scale", users, items, labels)
  return folder


class StageTimer:
  """Records `<stage>_s` (wall) and `<stage>_cpu_s` (this process's CPU, all threads: the
  figure that a shared, loaded machine distorts least) into `out`."""

  def __init__(self, out: dict, stage: str):
    self.out, self.stage = out, stage

  def __enter__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()

  def __exit__(self, *exc):
    self.out[f"{self.stage}_s"] = time.perf_counter() - self.wall
    self.out[f"{self.stage}_cpu_s"] = time.process_time() - self.cpu


def load_config(config_name: str, overrides):
  """configs/<config_name>.py with name=value overrides (Python literals)."""
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{config_name}").get_config()
  for item in overrides:
    name, value = item.split("=", 1)
    target = config
    *parents, leaf = name.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = type(target[leaf])(json.loads(value)) if not isinstance(
        target[leaf], str) else value
  return config


def predicted_gib(row: dict) -> float:
  """scripts/scaling_table.py's prediction from shapes (one device) for a results row: the
  measured peak RSS's counterpart (the host also holds the data set and XLA's own buffers)."""
  import scaling_table  # pylint: disable=g-import-not-at-top  # this script's folder
  name, _, rest = row["config"].partition("[")
  overrides = [o for o in rest.rstrip("]").split(",") if o and not o.startswith("steps_")]
  config = load_config(name, overrides)
  config.batch_size = int(row["batch_size"])
  dims = {k[len("feature_"):]: int(v) for k, v in row.items() if k.startswith("feature_")}
  bytes_ = scaling_table.predict(config, int(row["n_users"]), int(row["n_items"]),
                                 int(row["n_train"]), dims, 1, 1)
  return bytes_["total"] / 2**30


def measure(config_name: str, data_dir: str, overrides, steps_per_epoch: int,
            rank_fraction: float = 1.0) -> dict:
  """In this process: the stages' seconds and the peak RSS (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top
  from fettle_jax import train  # pylint: disable=g-import-not-at-top
  config = load_config(config_name, overrides)
  config.data.path, config.data.prepare = data_dir, ""
  # Rows of other settings than the default 64 steps keep apart in the CSV and the slopes.
  labels = list(overrides) + ([f"steps_per_epoch={steps_per_epoch}"]
                              if steps_per_epoch != _STEPS.default else [])
  out = {"config": config_name + (f"[{','.join(labels)}]" if labels else "")}
  with StageTimer(out, "load"):
    data = train.load_data(config)
  out.update(n_users=data.n_users, n_items=data.n_items, n_train=len(data.train),
             n_inter=len(data.train) + len(data.valid) + len(data.test),
             **{f"feature_{k}": v.shape[1] for k, v in data.features.items()})
  config.steps_per_epoch = steps_per_epoch
  with StageTimer(out, "host"):
    run = train.create_train_state(config, data)
    splits = [data.valid, data.test]
    if rank_fraction < 1.0:  # a fixed sample of the users with held-out items
      held = np.unique(np.concatenate([data.valid[:, 0], data.test[:, 0]]))
      sample = np.random.default_rng(0).choice(held, max(1, int(rank_fraction * len(held))),
                                               replace=False)
      splits = [split[np.isin(split[:, 0], sample)] for split in splits]
    eval_data = train.build_eval_data(data, run.config, run.layout, splits)
    jax.block_until_ready((run.state, run.static, eval_data))
  out.update(batch_size=run.config.batch_size, learning_rate=run.config.learning_rate)
  out["rss_after_host_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  del data
  epoch = train.make_train_epoch(run.backbone, run.alignment, run.config, run.optimizer,
                                 run.info, run.layout)
  rng = jax.random.fold_in(run.train_rng, 1)
  with StageTimer(out, "compile"):
    compiled = epoch.lower(run.state, rng, run.static).compile()
  with StageTimer(out, "epoch"), jax.set_mesh(run.layout.mesh):
    state, losses = compiled(run.state, rng, run.static)
    jax.block_until_ready((state, losses))
  out["loss"] = float(jax.device_get(losses)[0])
  evaluate = train.make_evaluate(run.backbone, run.config, run.layout)
  with StageTimer(out, "rank_compile"):
    ranker = evaluate.lower(state.params, state.model_state, run.static, eval_data).compile()
  with StageTimer(out, "rank"), jax.set_mesh(run.layout.mesh):
    metrics = jax.device_get(ranker(state.params, state.model_state, run.static, eval_data))
  out["rank_fraction"] = rank_fraction
  for key in ("rank_s", "rank_cpu_s"):
    out[key] /= rank_fraction
  out["test_recall@20"] = float(metrics["recall@20"][1])
  out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  return out


CPU_STAGES = tuple(s.replace("_s", "_cpu_s") for s in STAGES)


def fitted_slopes(rows, stages=STAGES + CPU_STAGES + ("peak_rss_gib",)) -> dict:
  """Least-squares slope of log(stage) against log(interactions), per stage (needs 2 sizes)."""
  slopes = {}
  for stage in stages:
    points = [(r["n_inter"], r[stage]) for r in rows if r.get(stage, 0) > 0]
    if len(points) >= 2:
      x, y = np.log([p[0] for p in points]), np.log([p[1] for p in points])
      slopes[stage] = float(np.polyfit(x, y, 1)[0])
  return slopes


def write_outputs(rows, out_dir: str) -> None:
  """results.csv (one row per configuration and size), slopes.json, scaling.png."""
  import csv  # pylint: disable=g-import-not-at-top
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  for row in rows:
    if "predicted_gib" not in row:
      row["predicted_gib"] = predicted_gib(row)
  keys = sorted({k for r in rows for k in r})
  with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
  slopes = {c: fitted_slopes([r for r in rows if r["config"] == c])
            for c in sorted({r["config"] for r in rows})}
  with open(os.path.join(out_dir, "slopes.json"), "w") as f:
    json.dump(slopes, f, indent=2)
  fig, axes = plt.subplots(1, len(slopes), figsize=(6 * len(slopes), 4.5), squeeze=False)
  for ax, (config, slope) in zip(axes[0], slopes.items()):
    mine = sorted((r for r in rows if r["config"] == config), key=lambda r: r["n_inter"])
    for stage in CPU_STAGES + ("peak_rss_gib",):
      x = [r["n_inter"] for r in mine if r.get(stage, 0) > 0]
      y = [r[stage] for r in mine if r.get(stage, 0) > 0]
      label = f"{stage} (slope {slope[stage]:.2f})" if stage in slope else stage
      ax.loglog(x, y, "o-", label=label)
    ax.set_xlabel("interactions")
    ax.set_ylabel("CPU seconds (peak RSS: GiB)")
    ax.set_title(config)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "scaling.png"), dpi=120)


def gather_probe(sizes) -> list:
  """ns per edge of LightGCN's graph product (`graphs.propagate_symmetric`: the CSR kernel,
  64-d float32 rows) on each size's users x items graph with uniform random train edges:
  whether the per-edge cost stays flat as the table outgrows the CPU caches
  (--gather_probe)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fettle_jax import graphs  # pylint: disable=g-import-not-at-top
  rows = []
  for millions in sizes:
    n_users, n_items = int(millions * 1e6 / _PER_USER.value), int(millions * 1e6 / _PER_ITEM.value)
    n_train = int(0.8 * millions * 1e6)
    rng = np.random.default_rng(0)
    graph = graphs.user_item_graph(rng.integers(0, n_users, n_train),
                                   rng.integers(0, n_items, n_train), n_users, n_items)
    table = jnp.asarray(rng.standard_normal((n_users + n_items, 64), dtype=np.float32))
    product = jax.jit(graphs.propagate_symmetric)
    jax.block_until_ready(product(graph, table))
    start = time.process_time()
    for _ in range(3):
      jax.block_until_ready(product(graph, table))
    seconds = (time.process_time() - start) / 3
    rows.append({"millions": millions, "table_rows": n_users + n_items,
                 "table_mib": (n_users + n_items) * 256 / 2**20,
                 "ns_per_edge": seconds / (2 * n_train) * 1e9})
    print(json.dumps(rows[-1]), flush=True)
  return rows


def earlier_rows(path: str) -> list:
  """results.csv's rows, numbers as numbers (empty if absent)."""
  import csv  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    return []
  def value(text):
    try:
      return float(text) if any(c in text for c in ".e") else int(text)
    except ValueError:
      return text
  with open(path, newline="") as f:
    return [{k: value(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


_STEPS = flags.DEFINE_integer("steps_per_epoch", 64, "Batch size = train interactions / this "
                              "(square-root learning-rate rule); 0 keeps the config's.")


def main(argv):
  del argv
  if _CHILD.value:
    config_name, data_dir = _CHILD.value.split(",", 1)
    print("RESULT " + json.dumps(measure(config_name, data_dir, _OVERRIDES.value,
                                         _STEPS.value, _RANK_FRACTION.value)), flush=True)
    return
  os.makedirs(_OUT.value, exist_ok=True)
  if _GATHER_PROBE.value:
    gather_probe([float(m) for m in _SIZES.value])
    return
  rows = earlier_rows(os.path.join(_OUT.value, "results.csv")) if _APPEND.value else []
  machine = f"{os.cpu_count()} CPUs, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"
  for millions in (float(s) for s in _SIZES.value if s):
    start = time.perf_counter()
    folder = ensure_set(millions)
    print(f"set {millions:g}M: {folder} ({time.perf_counter() - start:.0f} s)", flush=True)
    if _GENERATE_ONLY.value:
      continue
    for config_name in _CONFIGS.value:
      command = [sys.executable, os.path.abspath(__file__), f"--child={config_name},{folder}",
                 f"--steps_per_epoch={_STEPS.value}", f"--overrides={','.join(_OVERRIDES.value)}",
                 f"--rank_fraction={_RANK_FRACTION.value}"]
      child = subprocess.run(command, capture_output=True, text=True, check=False)
      lines = [l for l in child.stdout.splitlines() if l.startswith("RESULT ")]
      if child.returncode or not lines:
        print(f"{config_name} at {millions:g}M failed (exit {child.returncode}):\n"
              f"{child.stderr[-2000:]}", flush=True)
        continue
      row = dict(json.loads(lines[-1][len("RESULT "):]), millions=millions, machine=machine)
      rows = [r for r in rows if (r["config"], r["millions"]) != (row["config"], millions)]
      rows.append(row)
      print(json.dumps(row), flush=True)
      write_outputs(rows, _OUT.value)
  if rows:
    write_outputs(rows, _OUT.value)  # also redraws earlier rows (e.g. --sizes= alone)
    print(json.dumps({c: fitted_slopes([r for r in rows if r["config"] == c])
                      for c in sorted({r["config"] for r in rows})}, indent=2))


if __name__ == "__main__":
  app.run(main)
