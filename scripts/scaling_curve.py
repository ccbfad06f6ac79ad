"""How each stage's cost grows with the data: per-stage wall time and peak RSS of training
on MMRec-format sets of growing size, a CSV, a log-log PNG and a fitted slope per stage.

  nice python scripts/scaling_curve.py --sizes=0.25,1,4 --out=/work/scale_data/curve

Sets: `--sizes` million interactions each, power-law item and user degrees, users and
items growing with the interactions at Amazon-like ratios (--per_user interactions per user,
--per_item per item: 10 and 50 give the 500k x 100k x 5M set); 80/10/10 train/valid/test
labels, every user's first interaction in train; no content features (LightGCN). Each set
is written once under --out (`generate`, also importable, and `--generate_only`).

Stages, each configuration in its own child process (so each peak RSS is its own):
load (train.load_data), host (create_train_state: graphs, sampling index, placement),
compile (the first epoch's compilation, from jit's lower+compile), epoch (one compiled
epoch, after compilation), rank (one valid+test ranking pass, compiled first), and the
child's peak RSS. The slope per stage is the least-squares fit of log(time) against
log(interactions) over the sizes measured: 1 is linear growth.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SIZES = flags.DEFINE_list("sizes", ["0.25", "1", "4"], "Million interactions per set.")
_OUT = flags.DEFINE_string("out", "/work/scale_data/curve", "Folder for the sets and results.")
_CONFIGS = flags.DEFINE_list("configs", ["lightgcn_baby"], "configs/<name>.py to run.")
_PER_USER = flags.DEFINE_float("per_user", 10.0, "Interactions per user.")
_PER_ITEM = flags.DEFINE_float("per_item", 50.0, "Interactions per item.")
_OVERRIDES = flags.DEFINE_list("overrides", [], "name=value config overrides (Python "
                               "literals), e.g. batch_size=8192.")
_GENERATE_ONLY = flags.DEFINE_bool("generate_only", False, "Only write the sets.")
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
  return os.path.join(_OUT.value, f"set_{millions:g}M")


def ensure_set(millions: float) -> str:
  folder = dataset_dir(millions)
  if not os.path.exists(os.path.join(folder, "scale.inter")):
    users, items, labels = generate(int(millions * 1e6), _PER_USER.value, _PER_ITEM.value,
                                    _SEED.value)
    write_inter(folder, "scale", users, items, labels)
  return folder
