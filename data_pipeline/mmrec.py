"""Reader of MMRec's interaction file `<name>.inter` (tab-separated, with a header).

Columnar: NumPy's C parser (np.loadtxt) reads every column as int64 (float64 where a field
is not an integer literal) straight into one [rows, columns] array, 8 bytes per field and no
Python object per value. A file it cannot
read as one numeric table (a text column, a short row, a bad byte, no rows) is read again
by the line-by-line reader, which names the first bad line or value; the two agree on
every file both accept (tests/test_data.py).
"""

import glob
import os
from typing import Optional
import warnings

import numpy as np

from data_pipeline.errors import DataError, check_ids

REQUIRED_COLUMNS = ("userID", "itemID", "x_label")
SPLIT_OF_LABEL = {0: "train", 1: "valid", 2: "test"}


def distinct(values: np.ndarray) -> np.ndarray:
  """np.unique(values) by one sort: NumPy 2's hash-based np.unique is ~50x slower on
  millions of int64 keys."""
  ordered = np.sort(values, kind="stable")
  return ordered[np.concatenate([[True], ordered[1:] != ordered[:-1]])] if len(ordered) else ordered


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
  return check_int_column(file, column, values)


def check_int_column(file: str, column: str, values: np.ndarray) -> np.ndarray:
  """int64 ids from float64 values: finite, whole and in the id range, else DataError."""
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


def read_header(file: str):
  try:
    with open(file, encoding="utf-8") as f:
      return f.readline().rstrip("\n").split("\t")
  except UnicodeDecodeError as e:
    raise DataError(f"{file}: not UTF-8 text (byte {e.start}); expected tab-separated "
                    "userID, itemID, x_label") from None


def numeric_table(file: str, n_header: int) -> Optional[np.ndarray]:
  """[rows, columns] of the body, int64 where every field is an integer literal (4x faster
  to parse) else float64, or None where np.loadtxt cannot read it as one table of at least
  the header's width (the line reader then says why, or reads it)."""
  for dtype in (np.int64, np.float64):
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty body warns; the line reader reports it
        table = np.loadtxt(file, dtype=dtype, delimiter="\t", skiprows=1, comments=None,
                           ndmin=2, encoding="utf-8")
    except (ValueError, OverflowError, UnicodeDecodeError):
      continue
    if table.shape[0] == 0 or table.shape[1] < n_header:
      return None
    return table
  return None


def read_inter(path: str, name: Optional[str] = None):
  """Returns (name, {split: int [n, 2] (user, item)}); id ranges are checked by the caller."""
  file = find_inter_file(path, name)
  name = os.path.basename(file)[:-len(".inter")]
  header = read_header(file)
  missing = [c for c in REQUIRED_COLUMNS if c not in header]
  table = None if missing else numeric_table(file, len(header))
  if table is None:
    return read_inter_lines(file, name)
  # The line reader's checks, on the same float64 values it would parse.
  users, items, labels = (check_int_column(file, c, table[:, header.index(c)].astype(np.float64))
                          for c in REQUIRED_COLUMNS)
  return name, split_pairs(file, users, items, labels)


def split_pairs(file: str, users: np.ndarray, items: np.ndarray, labels: np.ndarray):
  unknown = sorted(set(distinct(labels).tolist()) - set(SPLIT_OF_LABEL))
  if unknown:
    raise DataError(f"{file}: x_label must be 0 (train), 1 (valid) or 2 (test), found {unknown[0]}")
  pairs = np.stack([users, items], axis=1)
  return {split: pairs[labels == label] for label, split in SPLIT_OF_LABEL.items()}


def read_inter_lines(file: str, name: str):
  """The line-by-line reader: Python strings per field, the first bad line named."""
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
  return name, split_pairs(file, users, items, labels)
