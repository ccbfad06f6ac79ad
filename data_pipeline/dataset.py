"""The in-memory data set every model trains on, and the format-detecting loader.

Two on-disk formats are read (see README): MMRec's (`<name>.inter` + `<modality>_feat.npy`)
and LATTICE's JSON split (`train.json`, `val.json`, `test.json`). Every check raises
`DataError` with a one-line message that names the file and the problem.
"""

import dataclasses
import glob
import os
from typing import Dict, Optional, Sequence

from absl import logging
import numpy as np

from data_pipeline import lattice
from data_pipeline import mmrec
from data_pipeline.errors import DataError


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Interactions as int32 [n, 2] (user, item) arrays per split, plus item content features."""
  name: str
  path: str
  n_users: int
  n_items: int
  train: np.ndarray
  valid: np.ndarray
  test: np.ndarray
  features: Dict[str, np.ndarray]  # modality -> float32 [n_items, d], sorted by name

  def summary(self) -> str:
    feats = ", ".join(f"{k} {v.shape[1]}-d" for k, v in self.features.items()) or "none"
    return (f"{self.name}: {self.n_users} users, {self.n_items} items, "
            f"{len(self.train)}/{len(self.valid)}/{len(self.test)} train/valid/test interactions, "
            f"features: {feats}")


def detect_format(path: str) -> str:
  """'lattice' if the folder has train.json, 'mmrec' if it has a `.inter` file."""
  if not os.path.isdir(path):
    raise DataError(f"{path}: data folder does not exist (set --config.data.path=DIR to an "
                    "MMRec or LATTICE folder)")
  if os.path.exists(os.path.join(path, "train.json")):
    return "lattice"
  if glob.glob(os.path.join(path, "*.inter")):
    return "mmrec"
  raise DataError(f"{path}: no `<name>.inter` (MMRec format) or `train.json` (LATTICE format) found")


def load_dataset(path: str, name: Optional[str] = None,
                 modalities: Optional[Sequence[str]] = None) -> Dataset:
  """Loads and validates a data set folder in either supported format.

  modalities: content modalities to keep (e.g. ['image', 'text']); None keeps all found.
  Every feature file found is validated, whatever is kept.
  """
  fmt = detect_format(path)
  if fmt == "lattice":
    name, splits = lattice.read_splits(path, name)
  else:
    name, splits = mmrec.read_inter(path, name)
  source = path if fmt == "lattice" else os.path.join(path, f"{name}.inter")
  n_users, n_items = id_ranges(source, splits, feature_rows(path))
  features = load_features(path, n_items)
  if modalities is not None:
    missing = sorted(set(modalities) - set(features))
    if missing:
      raise DataError(f"{path}: modality {missing[0]!r} requested but "
                      f"{missing[0]}_feat.npy is missing (found: {sorted(features) or 'none'})")
    features = {k: features[k] for k in sorted(modalities)}
  return finalize(name, path, n_users, n_items, splits, features)


REMAP_HINT = ("renumber them 0..n-1 with `python -m data_pipeline.convert --src DIR --out NEW "
              "--name NAME --remap` (features follow their items)")


def feature_rows(path: str) -> Optional[int]:
  """Rows of the folder's first `<modality>_feat.npy` (header only), None if there is none."""
  files = sorted(glob.glob(os.path.join(path, "*_feat.npy")))
  if not files:
    return None
  try:
    shape = np.load(files[0], mmap_mode="r", allow_pickle=False).shape
  except Exception as e:  # pylint: disable=broad-except  # any unreadable file: one line
    raise DataError(f"{files[0]}: cannot read as a .npy array ({e})") from None
  if len(shape) != 2:
    raise DataError(f"{files[0]}: expected a 2-D [n_items, d] matrix, got shape {shape}")
  return shape[0]


def id_ranges(source: str, splits: Dict[str, np.ndarray], n_feature_rows: Optional[int]):
  """(n_users, n_items) under the id rule: ids are 0..n-1, as in MMRec's files.

  Every user id 0..max must occur in the interactions; so must every item id, unless
  feature files fix the catalogue (n_items = their rows, items without interactions
  allowed, every id below it). A sparse id range (one typo'd id 2,000,000,000 among 80
  items) is refused here, before anything is sized by it.
  """
  pairs = np.concatenate([splits[s] for s in ("train", "valid", "test")])
  sizes = []
  for column, what in ((0, "user"), (1, "item")):
    ids = pairs[:, column]
    largest = int(ids.max()) if len(ids) else -1
    if what == "item" and n_feature_rows is not None:
      if largest >= n_feature_rows:
        raise DataError(f"{source}: item id {largest} is out of range: the feature files have "
                        f"{n_feature_rows} rows (row k is item k); {REMAP_HINT}")
      sizes.append(n_feature_rows)
      continue
    distinct = len(mmrec.distinct(ids))
    if distinct != largest + 1:
      raise DataError(f"{source}: {what} ids are not 0..n-1 ({distinct} distinct ids, largest "
                      f"{largest}); {REMAP_HINT}")
    sizes.append(largest + 1)
  return tuple(sizes)


def load_features(path: str, n_items: int) -> Dict[str, np.ndarray]:
  """Reads and checks every `<modality>_feat.npy` in the folder."""
  features = {}
  for file in sorted(glob.glob(os.path.join(path, "*_feat.npy"))):
    modality = os.path.basename(file)[:-len("_feat.npy")]
    try:
      # Memory-mapped: a float32 file stays on disk (paged in by the checks below and by
      # the copy to devices) instead of one more [n_items, d] copy in host memory.
      matrix = np.load(file, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # pylint: disable=broad-except  # any unreadable file: one line
      raise DataError(f"{file}: cannot read as a .npy array ({e})") from None
    if matrix.ndim != 2:
      raise DataError(f"{file}: expected a 2-D [n_items, d] matrix, got shape {matrix.shape}")
    if matrix.shape[0] != n_items:
      raise DataError(f"{file}: has {matrix.shape[0]} rows but the catalogue has "
                      f"{n_items} items (row k must be item k)")
    if not (np.issubdtype(matrix.dtype, np.floating) or np.issubdtype(matrix.dtype, np.integer)):
      raise DataError(f"{file}: dtype {matrix.dtype} is not a real number type (float or int)")
    if matrix.dtype != np.float32:
      matrix = matrix.astype(np.float32)  # another dtype is converted in memory
    n_bad, bad_rows = non_finite_rows(matrix)
    if n_bad:
      raise DataError(f"{file}: {n_bad} NaN/inf values in {len(bad_rows)} rows "
                      f"(first: item {bad_rows[0]})")
    features[modality] = matrix
  return features


def non_finite_rows(matrix: np.ndarray, rows_per_chunk: int = 1 << 16):
  """(number of NaN/inf values, sorted rows holding one), reading `rows_per_chunk` rows at
  a time: a memory-mapped matrix is checked without a full-size temporary."""
  n_bad, rows = 0, []
  for start in range(0, matrix.shape[0], rows_per_chunk):
    bad = ~np.isfinite(matrix[start:start + rows_per_chunk])
    if bad.any():
      n_bad += int(bad.sum())
      rows.append(start + np.nonzero(bad.any(axis=1))[0])
  return n_bad, (np.concatenate(rows) if rows else np.zeros(0, np.int64))


def finalize(name: str, path: str, n_users: int, n_items: int, splits: Dict[str, np.ndarray],
             features: Dict[str, np.ndarray]) -> Dataset:
  """Shared rules of both formats: dedupe, drop cold valid/test users, reject empty splits."""
  seen = np.zeros(0, np.int64)  # sorted keys kept in earlier splits
  cleaned = {}
  for split in ("train", "valid", "test"):
    pairs = splits[split]
    keys = pairs[:, 0].astype(np.int64) * n_items + pairs[:, 1]
    _, first = np.unique(keys, return_index=True)
    keep = np.zeros(len(pairs), bool)
    keep[first] = True
    if len(seen):  # drop pairs an earlier split holds (sorted search, no Python set)
      at = np.minimum(np.searchsorted(seen, keys), len(seen) - 1)
      keep &= seen[at] != keys
    n_dup = len(pairs) - keep.sum()
    if n_dup:
      logging.warning("%s: dropped %d duplicate %s interactions", path, n_dup, split)
    pairs = pairs[keep]
    seen = mmrec.distinct(np.concatenate([seen, keys[keep]]))
    cleaned[split] = pairs
  train_users = np.zeros(n_users, bool)
  train_users[cleaned["train"][:, 0]] = True
  for split in ("valid", "test"):
    warm = train_users[cleaned[split][:, 0]]
    if (~warm).any():
      # As MMRec: users never seen in training cannot be ranked meaningfully.
      logging.warning("%s: dropped %d %s interactions of users absent from train",
                      path, (~warm).sum(), split)
    cleaned[split] = cleaned[split][warm]
  for split, pairs in cleaned.items():
    if len(pairs) == 0:
      raise DataError(f"{path}: the {split} split has no interactions")
  degree = np.bincount(cleaned["train"][:, 0], minlength=n_users)
  if degree.max() >= n_items:
    raise DataError(f"{path}: user {int(degree.argmax())} interacted with all {n_items} items "
                    "in train, so no negative item can be sampled")
  return Dataset(name=name, path=path, n_users=n_users, n_items=n_items,
                 train=cleaned["train"].astype(np.int32), valid=cleaned["valid"].astype(np.int32),
                 test=cleaned["test"].astype(np.int32), features=features)
