"""The fast path's static branch sizes: speed only, never results.

`config.fettle_shapes` (`default_shape_hints`) is the one place they live, apart from
`config.fettle` (the paper's hyper-parameters and switches). `fit_static_shapes` fills it
from the training data before compiling (train.py calls it); every value, hand-set ones
included, gives the same losses and gradients, only a different speed. The reference path
(`equations.py`) reads none of it.
"""

from typing import List, NamedTuple, Tuple

import ml_collections
import numpy as np

SECTION = "fettle_shapes"  # the top-level config section


def default_shape_hints() -> ml_collections.ConfigDict:
  """Static sizes of the fast path's branches (`buckets`); 0 = from the data."""
  return ml_collections.ConfigDict({
      # int: distinct items / users that every sampled batch fits (the typical branch)
      "typical_batch_items": 0,
      "typical_batch_users": 0,
      # int: the same for a smaller first branch that the median batch fits; a size >= the
      # typical one adds no branch
      "common_batch_items": 0,
      "common_batch_users": 0,
  })


def shape_hints(config) -> ml_collections.ConfigDict:
  """config.fettle_shapes, or all-zero hints (no branch from the data) where it is absent."""
  return config[SECTION] if SECTION in config else default_shape_hints()


def bucket_sizes(capacity: int, n_buckets: int = 4, multiple: int = 64) -> List[int]:
  """Static prefix sizes ~k/n_buckets of capacity (k = 1..n_buckets), rounded up to `multiple`."""
  sizes = set()
  for k in range(1, n_buckets + 1):
    size = -(-capacity * k // n_buckets)  # ceil(capacity k / n_buckets)
    sizes.add(min(-(-size // multiple) * multiple, capacity))
  return sorted(sizes)


class Bucket(NamedTuple):
  """One static branch: the first `items` unique-item slots and `users` unique-user rows."""
  items: int
  users: int


def buckets(item_capacity: int, user_capacity: int, typical_items: int = 0,
            typical_users: int = 0, common_items: int = 0,
            common_users: int = 0) -> List[Bucket]:
  """The branches, smallest first; the last holds every slot (so every batch has one).

  Without hints: `bucket_sizes` of the item buffer, all user rows. With the distinct items
  / users that every sampled batch fits (typical) and that the median batch fits (common,
  `fit_static_shapes`), up to three branches: the common size, the typical size, the whole
  buffer. A batch's distinct count varies little around its median, so almost every step
  runs on ~its true size, and the rare larger batch pays a larger branch once, rather than
  every run compiling the quarter sizes in between (each branch is a compiled copy of every
  term and its gradient). The common branch pays where the terms grow with the rows: ILA's
  [U, U] logits.
  """
  if not 0 < typical_items < item_capacity:
    return [Bucket(size, user_capacity) for size in bucket_sizes(item_capacity)]

  def users(size):
    return min(size or user_capacity, user_capacity)

  typical = Bucket(typical_items, users(typical_users))
  common = Bucket(common_items, users(common_users or typical_users))
  ladder = [typical, Bucket(item_capacity, user_capacity)]
  if (0 < common.items <= typical.items and common.users <= typical.users
      and common != typical):
    ladder.insert(0, common)
  return ladder


def static_bucket_hints(hints, unique_users: bool) -> Tuple[int, int, int, int]:
  """`buckets`' size hints (`shape_hints`); user sizes only where users are unique rows."""
  return (hints.typical_batch_items, hints.typical_batch_users if unique_users else 0,
          hints.common_batch_items, hints.common_batch_users if unique_users else 0)


def fit_static_shapes(config, train_pairs: np.ndarray, n_users: int, n_items: int,
                      n_samples: int = 16, seed: int = 0):
  """Fills config.fettle_shapes' zero fields from the training data, before compiling;
  returns the config (adding the section where it is absent).

  Samples `n_samples` batches as an epoch draws them (config.batch_size pairs without
  replacement); typical: the largest distinct count plus 2%, common: the median plus 2%,
  each rounded up to 32. Only the speed depends on them: a batch with more distinct rows
  takes a larger, exact branch.
  """
  if SECTION not in config:
    with config.unlocked():
      config[SECTION] = default_shape_hints()
  hints = config[SECTION]
  rng = np.random.default_rng(seed)
  batch_size = min(config.batch_size, len(train_pairs))
  samples = [train_pairs[rng.choice(len(train_pairs), batch_size, replace=False)]
             for _ in range(n_samples)]
  for side, column, capacity in (("items", 1, n_items), ("users", 0, n_users)):
    distinct = [len(np.unique(sample[:, column])) for sample in samples]
    for field, count in ((f"typical_batch_{side}", max(distinct)),
                         (f"common_batch_{side}", np.median(distinct))):
      if hints[field] == 0:
        hints[field] = min(capacity, -(-int(np.ceil(count * 1.02)) // 32) * 32)
  return config
