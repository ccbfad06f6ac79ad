"""Encodes one text column of a CSV with all-MiniLM-L6-v2 into a float32 `.npy` matrix.

  fettle-featurize-text --csv=items.csv --column=title --out=text_feat.npy [--batch_size=64]
  (or: python -m data_pipeline.featurize_text --csv=items.csv --column=title ...)

Row k of the output is the unit-norm embedding of data row k (header excluded).
"""

import csv
import os
import sys

from absl import flags
import numpy as np

from data_pipeline.errors import DataError
from fettle_jax.tools import command


def read_column(csv_path: str, column: str) -> list[str]:
  """Returns the values of `column` in file order; DataError for any unreadable input."""
  if not os.path.exists(csv_path):
    raise DataError(f"{csv_path}: no such file")
  if not os.path.isfile(csv_path):
    raise DataError(f"{csv_path}: not a regular file")
  try:
    # utf-8-sig: spreadsheet exports often start with a BOM that would corrupt the first name.
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
      reader = csv.reader(f)
      header = next(reader, None)
      if header is None:
        raise DataError(f"{csv_path}: empty file (expected a header row)")
      if column not in header:
        raise DataError(f"{csv_path}: no column {column!r} (columns: {', '.join(header)})")
      index = header.index(column)
      values = []
      for row in reader:
        if not row:  # csv yields [] for blank lines; they are not items
          continue
        if index >= len(row):
          raise DataError(f"{csv_path}:{reader.line_num}: row has {len(row)} fields, "
                          f"column {column!r} is field {index + 1}")
        values.append(row[index])
  except UnicodeDecodeError as e:
    raise DataError(f"{csv_path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  except csv.Error as e:
    raise DataError(f"{csv_path}: malformed CSV ({e})") from None
  return values


def featurize(csv_path: str, column: str, out_path: str, batch_size: int = 64,
              progress: bool = True) -> np.ndarray:
  """Encodes the column and writes float32 [n_rows, 384] to out_path; returns the matrix."""
  texts = read_column(csv_path, column)  # before loading the model: bad input fails fast
  from data_pipeline.text_encoder import MiniLMEncoder  # deferred: importing JAX is slow
  encoder = MiniLMEncoder(batch_size=batch_size)
  features = encoder.encode(texts, progress=progress and bool(texts)).astype(np.float32)
  out_dir = os.path.dirname(os.path.abspath(out_path))
  os.makedirs(out_dir, exist_ok=True)
  tmp = out_path + ".tmp.npy"
  np.save(tmp, features)
  os.replace(tmp, out_path)  # atomic: a killed run never leaves a half-written matrix
  return features


def define_flags(flag_values=flags.FLAGS) -> None:
  """The command line's flags; defined by `cli`, not at import: other tools define --out."""
  flags.DEFINE_string("csv", None, "CSV file with a header row.", flag_values=flag_values)
  flags.DEFINE_string("column", None, "Name of the text column to encode.",
                      flag_values=flag_values)
  flags.DEFINE_string("out", None, "Output .npy path (float32 [rows, 384]).",
                      flag_values=flag_values)
  flags.DEFINE_integer("batch_size", 64, "Sentences per batch.", lower_bound=1,
                       flag_values=flag_values)


def main(argv, flag_values=flags.FLAGS) -> int:
  """Runs on parsed `flag_values`; returns the exit status (errors: one line, status 1)."""
  values = flag_values
  problem = None
  if len(argv) > 1:
    problem = f"unexpected arguments {argv[1:]} (the CSV file is --csv)"
  elif not (values.csv and values.column and values.out):
    problem = "--csv, --column and --out are required (see --help)"
  if problem is None:
    try:
      features = featurize(values.csv, values.column, values.out, values.batch_size)
    except (DataError, OSError) as e:
      problem = str(e)
  if problem is not None:
    print(f"featurize_text: error: {problem}", file=sys.stderr)
    return 1
  print(f"wrote {values.out}: {features.shape[0]} x {features.shape[1]} float32",
        file=sys.stderr)
  return 0


def cli():
  """The `fettle-featurize-text` console script."""
  define_flags()
  command.run_app(main, __name__)


if __name__ == "__main__":
  cli()
