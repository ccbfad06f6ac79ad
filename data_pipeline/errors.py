"""The one exception type for bad input data; run.py prints it as a single line."""


class DataError(ValueError):
  """Bad or missing input data. The message names the file and the problem."""
