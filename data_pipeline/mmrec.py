"""Reader of MMRec's interaction file `<name>.inter` (tab-separated, with a header)."""

import glob
import os
from typing import Optional

import numpy as np

from data_pipeline.errors import DataError, check_ids

REQUIRED_COLUMNS = ("userID", "itemID", "x_label")
SPLIT_OF_LABEL = {0: "train", 1: "valid", 2: "test"}


def find_inter_file(path: str, name: Optional[str]) -> str:
  if name:
    file = os.path.join(path, f"{name}.inter")
    if not os.path.exists(file):
      raise DataError(f"{file}: interaction file not found")
    return file
  files = sorted(glob.glob(os.path.join(path, "*.inter")))
  if len(files) != 1:
    raise DataError(f"{path}: found {len(files)} .inter files; set --config.data.name to pick one")
  return files[0]


def parse_int_column(file: str, column: str, raw: np.ndarray) -> np.ndarray:
  try:
    values = raw.astype(np.float64)
  except ValueError:
    bad = str(next(v for v in raw if not _is_number(v)))
    raise DataError(f"{file}: column {column} has a non-integer value {bad!r}") from None
  if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
    bad = float(values[~np.isfinite(values) | (values != np.round(values))][0])
    raise DataError(f"{file}: column {column} has a non-integer value {bad!r}")
  check_ids(file, column, values)
  values = values.astype(np.int64)
  return values


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def read_inter(path: str, name: Optional[str] = None):
  """Returns (name, {split: int [n, 2] (user, item)}); id ranges are checked by the caller."""
  file = find_inter_file(path, name)
  name = os.path.basename(file)[:-len(".inter")]
  try:
    with open(file, encoding="utf-8") as f:
      header = f.readline().rstrip("\n").split("\t")
      rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
  except UnicodeDecodeError as e:
    raise DataError(f"{file}: not UTF-8 text (byte {e.start}); expected tab-separated "
                    "userID, itemID, x_label") from None
  missing = [c for c in REQUIRED_COLUMNS if c not in header]
  if missing:
    raise DataError(f"{file}: missing column {missing[0]!r} (header: {header})")
  if not rows:
    raise DataError(f"{file}: no interactions")
  widths = {len(r) for r in rows}
  if min(widths) < len(header):
    line = next(k for k, r in enumerate(rows) if len(r) < len(header)) + 2
    raise DataError(f"{file}: line {line} has fewer fields than the header")
  table = np.array([[r[header.index(c)] for c in REQUIRED_COLUMNS] for r in rows])
  users, items, labels = (parse_int_column(file, c, table[:, k])
                          for k, c in enumerate(REQUIRED_COLUMNS))
  unknown = sorted(set(np.unique(labels).tolist()) - set(SPLIT_OF_LABEL))
  if unknown:
    raise DataError(f"{file}: x_label must be 0 (train), 1 (valid) or 2 (test), found {unknown[0]}")
  pairs = np.stack([users, items], axis=1)
  splits = {split: pairs[labels == label] for label, split in SPLIT_OF_LABEL.items()}
  return name, splits
