"""What a training run reports while it runs: timestamped lines, a bar, TensorBoard scalars.

- Lines go through `absl.logging` (INFO; warnings as WARNING), from process 0 only: under
  `run.py` (absl's app) each line carries a timestamp. A library caller sees them once
  logging is configured (e.g. `absl.logging.set_verbosity(absl.logging.INFO)` and
  `absl.logging.use_absl_handler()`).
- A tqdm bar over the epochs, only when stdout is a terminal: redirected output (log files,
  batch jobs) gets the lines alone, never a bar's carriage returns.
- TensorBoard scalars (`config.tensorboard`): the epoch's losses and every validation
  metric, per epoch, through tensorboardX (the package extra `tensorboard`), written to
  `<run folder>/tensorboard`. Without tensorboardX installed the run logs one line and goes
  on without them.
"""

import logging as python_logging
import os
import sys
from typing import Dict, Optional

from absl import logging
import jax

import data_pipeline

# Source folders whose INFO lines a command line shows (other libraries': warnings only).
OWN_SOURCES = (os.path.dirname(os.path.abspath(__file__)),
               os.path.dirname(os.path.abspath(data_pipeline.__file__)))


def is_primary() -> bool:
  """Process 0: the one that reports and writes the run folder (every process trains)."""
  return jax.process_index() == 0


class _OwnInfoLines(python_logging.Filter):
  """Passes warnings and errors from anyone, INFO lines from this project's sources only
  (Orbax and JAX log their internals at INFO through the same absl handler)."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    return (record.levelno >= python_logging.WARNING
            or os.path.abspath(record.pathname).startswith(OWN_SOURCES))


def show_progress_lines() -> None:
  """For command lines under absl's app: this project's INFO lines (the progress) are
  shown, timestamped; other libraries' only from WARNING up."""
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OwnInfoLines) for f in handler.filters):
    handler.addFilter(_OwnInfoLines())


def log(message: str) -> None:
  if is_primary():
    logging.info("%s", message)


def warn(message: str) -> None:
  if is_primary():
    logging.warning("%s", message)


def duration(seconds: float) -> str:
  """'0.42s', '12.3s', '4m05s', '1h02m03s'."""
  if seconds < 10:
    return f"{seconds:.2f}s"
  if seconds < 60:
    return f"{seconds:.1f}s"
  minutes, secs = divmod(int(round(seconds)), 60)
  if minutes < 60:
    return f"{minutes}m{secs:02d}s"
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m{secs:02d}s"


def epoch_line(epoch: int, max_epochs: int, body: str, patience: str, train_seconds: float,
               eval_seconds: Optional[float], elapsed: float, eta: float) -> str:
  """One epoch's progress line, e.g.
  'epoch   3/400 | loss 0.69 (...) | valid recall@20 0.0712 * | patience 20/20 |
   train 0.87s eval 0.66s | elapsed 3.20s, ETA <= 5m47s'.
  `body` says what trained and what validation found; `patience`: validation passes left
  before early stopping, of config.patience; `eta`: time to max_epochs at the recent epoch
  rate, an upper bound (early stopping may end the run sooner)."""
  width = len(str(max_epochs))
  timing = f"train {train_seconds:.2f}s" + (
      f" eval {eval_seconds:.2f}s" if eval_seconds is not None else "")
  return (f"epoch {epoch:>{width}}/{max_epochs} | {body} | patience {patience} | {timing} | "
          f"elapsed {duration(elapsed)}, ETA <= {duration(eta)}")


class EpochBar:
  """A tqdm bar over the epochs when stdout is a terminal (otherwise nothing): `line`
  logs through absl with the bar cleared first and redrawn after, so neither garbles the
  other."""

  def __init__(self, max_epochs: int, done_epochs: int, enabled: Optional[bool] = None):
    if enabled is None:
      enabled = is_primary() and sys.stdout.isatty()
    self._bar = None
    if enabled:
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=max_epochs, initial=done_epochs, unit="epoch",
                            file=sys.stdout, dynamic_ncols=True, leave=False)

  def line(self, message: str, epochs_done: Optional[int] = None, status: str = "") -> None:
    if self._bar is None:
      log(message)
      return
    self._bar.clear()
    log(message)
    if status:
      self._bar.set_postfix_str(status, refresh=False)
    if epochs_done is not None:
      self._bar.n = epochs_done
    self._bar.refresh()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


class Scalars:
  """Per-epoch TensorBoard scalars of one run folder (no-op when disabled or not process 0):
  'train/loss', 'train/backbone_loss', 'train/alignment_loss' every epoch and
  'valid/<metric>_<K>' (e.g. 'valid/recall_20') after every validation pass."""

  def __init__(self, directory: str, enabled: bool):
    self._writer = None
    if not (enabled and is_primary()):
      return
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    except ImportError:
      warn("note: config.tensorboard is set but tensorboardX is not installed (pip install "
           "'fettle-jax[tensorboard]'); training goes on without TensorBoard scalars")
      return
    self._writer = SummaryWriter(logdir=directory)

  def epoch(self, epoch: int, losses, valid: Optional[Dict[str, float]]) -> None:
    if self._writer is None:
      return
    for name, value in (("loss", float(losses[0] + losses[1])),
                        ("backbone_loss", float(losses[0])),
                        ("alignment_loss", float(losses[1]))):
      self._writer.add_scalar(f"train/{name}", value, epoch)
    for name, value in sorted((valid or {}).items()):
      # TensorBoard tags allow no '@': 'recall@20' -> 'valid/recall_20'.
      self._writer.add_scalar(f"valid/{name.replace('@', '_')}", value, epoch)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
