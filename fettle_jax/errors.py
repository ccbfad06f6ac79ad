"""Exceptions that mean a problem with the input or the environment, not a bug: run.py
prints them as one `error:` line and exits 1. Everything else (a shape bug in a new
backbone, say) keeps its traceback.
"""

from data_pipeline.errors import DataError  # noqa: F401  (bad or missing data files)


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the fix."""


class OtherRunError(ConfigError):
  """The workdir holds a run of another config: resuming it would mix the two runs."""


class WorkdirWriteError(OSError):
  """A file of the run could not be written (full disk, quota, size limit)."""


class CheckpointWriteError(WorkdirWriteError):
  """A checkpoint could not be written; the earlier checkpoints are intact."""


class NoReadableCheckpointError(RuntimeError):
  """Every checkpoint in the workdir failed to restore."""


class WorkdirInUseError(RuntimeError):
  """Another live process is training in the same workdir."""


class DistributedError(RuntimeError):
  """A multi-process run could not start (coordinator unreachable, a process missing)."""


class StopRequested(Exception):
  """The run was asked to stop from outside (fettle-train's SIGTERM / SIGINT handler) and
  stopped after an epoch, with a checkpoint of it to resume from."""

  def __init__(self, message: str, signal_name: str):
    super().__init__(message)
    self.signal_name = signal_name


REPORTED_ERRORS = (DataError, ConfigError, FloatingPointError, WorkdirWriteError,
                   NoReadableCheckpointError, WorkdirInUseError, DistributedError)
