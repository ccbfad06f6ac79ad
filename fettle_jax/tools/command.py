"""`run_app`: absl's app.run for a console script, with a --help that shows the tool; the
SIGTERM / SIGINT handlers that let a training tool stop after an epoch."""

import os
import signal
import sys
import types

from absl import app
from absl import flags
from absl import logging

from fettle_jax.errors import REPORTED_ERRORS, StopRequested

HELP_ARGS = ("-h", "--help", "-help")


def tool_help(module: types.ModuleType, flag_values=flags.FLAGS) -> str:
  """The tool's docstring and the flags it defines (absl's own --help shows those of
  `__main__`, which for an installed console script is pip's wrapper: no text, no flags)."""
  return (module.__doc__ or "").strip() + "\n\nflags:\n" + flag_values.module_help(module)


def run_app(main, module_name: str) -> None:
  """app.run(main) for the tool in module `module_name` (pass `__name__`): --help prints
  its docstring and flags, exit status 0; a problem with the input or the environment
  (errors.REPORTED_ERRORS) is one `error:` line, exit status 1."""
  module = sys.modules[module_name]

  def reported(argv):
    try:
      return main(argv)
    except REPORTED_ERRORS as e:
      exit_with_error(e)
    except StopRequested as e:
      exit_stopped(e)

  def parse(argv):
    if any(arg in HELP_ARGS for arg in argv[1:]):
      print(tool_help(module), flush=True)
      sys.exit(0)
    return app.parse_flags_with_usage(argv)

  app.run(reported, flags_parser=parse)


def exit_with_error(message) -> None:
  """One `error:` line on stderr (a message's own line breaks joined) and exit status 1."""
  print("error: " + " ".join(str(message).split("\n")), file=sys.stderr)
  sys.exit(1)


def install_stop_handlers() -> None:
  """For a single-process training tool: SIGTERM and SIGINT (a scheduler's preemption,
  Ctrl-C) stop the run after the epoch in progress, with a checkpoint of it to resume
  from (train.request_stop); the same signal again stops at once."""
  from fettle_jax import train  # pylint: disable=g-import-not-at-top  # JAX: training tools only

  def stop_after_the_epoch(number, _frame) -> None:
    if train.stop_requested():
      signal.signal(number, signal.SIG_DFL)
      os.kill(os.getpid(), number)
      return
    name = signal.Signals(number).name
    train.request_stop(name)
    # os.write, not logging: a handler may run while the main thread holds logging's lock.
    os.write(2, f"{name}: stopping after the epoch in progress, with a checkpoint to "
                f"resume from ({name} again stops at once)\n".encode())

  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, stop_after_the_epoch)


def exit_stopped(stop: StopRequested) -> None:
  """Says where a rerun resumes; exits with the status the signal would have given."""
  logging.warning(str(stop))
  sys.exit(128 + signal.Signals[stop.signal_name].value)
