"""Exceptions that mean bad input, not a bug: run.py prints them as one `error:` line.

Everything else (a shape bug in a new backbone, say) keeps its traceback.
"""

from data_pipeline.errors import DataError  # noqa: F401  (bad or missing data files)


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the fix."""


INPUT_ERRORS = (DataError, ConfigError, FloatingPointError)
