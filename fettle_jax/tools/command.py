"""`run_app`: absl's app.run for a console script, with a --help that shows the tool."""

import sys
import types

from absl import app
from absl import flags

from fettle_jax.errors import REPORTED_ERRORS

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
      sys.exit("error: " + " ".join(str(e).split("\n")))

  def parse(argv):
    if any(arg in HELP_ARGS for arg in argv[1:]):
      print(tool_help(module), flush=True)
      sys.exit(0)
    return app.parse_flags_with_usage(argv)

  app.run(reported, flags_parser=parse)
