"""The console scripts setup.cfg installs: each names a function that exists, and its --help
prints the tool's docstring and its own flags with exit status 0. absl app.run tools run in
a child Python whose __main__ is not the tool's module, as under pip's wrapper script."""

import configparser
import importlib
import os
import subprocess
import sys

from absl import flags

from tests.conftest import ROOT, subprocess_env


def console_scripts() -> dict:
  """{command: (module, function)} from setup.cfg's [options.entry_points]."""
  parser = configparser.ConfigParser()
  parser.read(os.path.join(ROOT, "setup.cfg"))
  scripts = {}
  for line in parser["options.entry_points"]["console_scripts"].strip().splitlines():
    command, target = (part.strip() for part in line.split("="))
    module, function = target.split(":")
    scripts[command] = (module, function)
  return scripts


def check_help(command: str, module, out: str) -> None:
  assert out.splitlines()[0] == module.__doc__.strip().splitlines()[0], (command, out)
  assert "  --" in out.split("\nflags:\n", 1)[1], (command, out)  # the tool's own flags
  assert command in out, (command, out)  # the usage lines name the installed command


def test_every_console_script_prints_its_help(capsys):
  scripts = console_scripts()
  assert {"fettle-recommend", "fettle-export", "fettle-experiments", "fettle-figures",
          "fettle-prepare", "fettle-synthetic", "fettle-featurize-text"} <= set(scripts)
  children = {}
  for command, (name, function) in scripts.items():
    module = importlib.import_module(name)  # the tools import side by side: no flag clashes
    assert callable(getattr(module, function)), command
    if getattr(module, "FLAGS", flags.FLAGS) is not flags.FLAGS:
      # Its own FlagValues and help text: `cli` is sys.exit(main(sys.argv)).
      assert module.main([command, "--help"]) == 0
      check_help(command, module, capsys.readouterr().out)
      continue
    # absl's app.run and the global flags: run it as the installed wrapper does.
    code = (f"import sys; sys.argv = [{command!r}, '--help']; "
            f"from {name} import {function}; {function}()")
    children[command] = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  assert len(children) >= 4
  for command, child in children.items():
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, (command, err[-2000:])
    check_help(command, importlib.import_module(scripts[command][0]), out)


def test_a_reported_error_in_an_app_run_tool_is_one_line(tmp_path):
  """run_app: a problem with the input (here a data folder that does not exist, met when
  fettle-experiments starts its first run) is one `error:` line and exit status 1."""
  code = ("import sys; sys.argv = ['fettle-experiments', '--out=" + str(tmp_path) + "', "
          "'--backbones=bpr', '--variants=vanilla', '--notune', '--seeds=0', "
          "'--data=" + str(tmp_path / "missing") + "']; "
          "from fettle_jax.tools.experiments import cli; cli()")
  child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(),
                         text=True, capture_output=True, timeout=300)
  assert child.returncode == 1, child.stderr[-2000:]
  lines = [line for line in child.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and "missing" in lines[0], child.stderr[-2000:]
  assert "Traceback" not in child.stderr
