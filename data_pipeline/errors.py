"""The one exception type for bad input data (run.py prints it as a single line), and the
id checks every reader shares."""

import numpy as np


class DataError(ValueError):
  """Bad or missing input data. The message names the file and the problem."""


MAX_ID = 2**31 - 1  # ids index int32 tables


def check_ids(file: str, column: str, values: np.ndarray) -> None:
  if len(values) and values.min() < 0:
    raise DataError(f"{file}: column {column} has a negative id ({values.min():.0f})")
  if len(values) and values.max() > MAX_ID:
    raise DataError(f"{file}: column {column} has an id too large for a table "
                    f"({values.max():.0f}); ids must be 0..n-1")
