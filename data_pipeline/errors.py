"""The one exception type for bad input data (run.py prints it as a single line), and the
id checks every reader shares."""

import numpy as np


class DataError(ValueError):
  """Bad or missing input data. The message names the file and the problem."""


def check_ids(file: str, column: str, values: np.ndarray) -> None:
  if len(values) and values.min() < 0:
    raise DataError(f"{file}: column {column} has a negative id ({values.min()})")
