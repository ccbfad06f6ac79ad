"""LATTICE's JSON split format (`train.json`, `val.json`, `test.json`: {"user": [items]}).

`python -m data_pipeline.convert` turns it into MMRec's format.
"""

import json
import os
import shutil
from typing import Optional

import numpy as np

from data_pipeline.errors import DataError, check_ids
from data_pipeline import mmrec
from data_pipeline import mmrec_writer

SPLIT_FILES = {"train": "train.json", "valid": "val.json", "test": "test.json"}


def read_split_file(file: str) -> np.ndarray:
  if not os.path.exists(file):
    raise DataError(f"{file}: split file not found")
  try:
    with open(file, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None
  except UnicodeDecodeError as e:
    raise DataError(f"{file}: not UTF-8 text (byte {e.start}); expected JSON") from None
  if not isinstance(data, dict):
    raise DataError(f"{file}: expected an object {{\"user\": [items]}}")
  users, items = [], []
  for user, user_items in data.items():
    try:
      u = int(user)
    except ValueError:
      raise DataError(f"{file}: user id {user!r} is not an integer") from None
    if not isinstance(user_items, list):
      raise DataError(f"{file}: items of user {user} are not a list")
    for item in user_items:
      if isinstance(item, bool) or not isinstance(item, int):
        raise DataError(f"{file}: user {user} has a non-integer item id {item!r}")
      users.append(u)
      items.append(item)
  for column, values in (("user", users), ("item", items)):
    check_ids(file, column, np.array(values, np.float64))  # before int64 can overflow
  pairs = np.array([users, items], np.int64).T.reshape(-1, 2)
  return pairs


def read_splits(path: str, name: Optional[str] = None):
  """Returns (name, {split: int [n, 2] (user, item)}); id ranges are checked by the caller."""
  splits = {s: read_split_file(os.path.join(path, f)) for s, f in SPLIT_FILES.items()}
  everything = np.concatenate(list(splits.values()))
  if len(everything) == 0:
    raise DataError(f"{path}: the split files hold no interactions")
  name = name or os.path.basename(os.path.normpath(path))
  return name, splits


MMREC_LABELS = {"train": mmrec_writer.TRAIN, "valid": mmrec_writer.VALID,
                "test": mmrec_writer.TEST}  # MMRec's x_label of each split


def _pairs_and_labels(splits):
  """All (user, item) pairs in split order and their MMRec x_label."""
  pairs = np.concatenate([splits[s] for s in MMREC_LABELS])
  labels = np.concatenate([np.full(len(splits[s]), l) for s, l in MMREC_LABELS.items()])
  return pairs, labels


def convert_to_mmrec(src: str, out: str, name: str) -> str:
  """Writes the LATTICE split at `src` as `<out>/<name>.inter`, copying feature files along."""
  _, splits = read_splits(src, name)
  pairs, split_labels = _pairs_and_labels(splits)
  mmrec_writer.write_mmrec(out, name, pairs[:, 0], pairs[:, 1], split_labels)
  for file in sorted(os.listdir(src)):
    if file.endswith("_feat.npy"):
      shutil.copyfile(os.path.join(src, file), os.path.join(out, file))
  return out


def remap_to_mmrec(src: str, out: str, name: str) -> str:
  """Renumbers the users and items of an MMRec or LATTICE folder to 0..n-1 (see convert)."""
  if os.path.exists(os.path.join(src, "train.json")):
    _, splits = read_splits(src, name)
  else:
    _, splits = mmrec.read_inter(src, None)
  pairs, split_labels = _pairs_and_labels(splits)
  users, new_users = np.unique(pairs[:, 0], return_inverse=True)
  items, new_items = np.unique(pairs[:, 1], return_inverse=True)
  features = {}
  for file in sorted(os.listdir(src)):
    if file.endswith("_feat.npy"):
      matrix = np.load(os.path.join(src, file), mmap_mode="r", allow_pickle=False)
      if matrix.ndim != 2 or items[-1] >= matrix.shape[0]:
        raise DataError(f"{os.path.join(src, file)}: no feature row for item id {items[-1]} "
                        f"(shape {matrix.shape})")
      features[file[:-len("_feat.npy")]] = np.asarray(matrix[items])
  mmrec_writer.write_mmrec(out, name, new_users.reshape(-1), new_items.reshape(-1), split_labels,
                           features)
  for what, ids in (("user", users), ("item", items)):
    np.savetxt(os.path.join(out, f"{what}_ids.txt"), ids, fmt="%d")
  return out
