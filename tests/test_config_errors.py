"""Config mistakes (fettle_jax/config_check.py, run.py): each is one `error:` line and exit
1, found before a run folder, lock or data set exists; an explicit --config.data.path wins
over the config's built-in data set; --config=NAME finds configs/NAME.py from anywhere."""

import os
import subprocess
import sys

import pytest

from data_pipeline.errors import DataError
from fettle_jax import config_check
from fettle_jax.errors import ConfigError
from tests.conftest import ROOT

RUN = os.path.join(ROOT, "run.py")


def load(*arguments, spec="default", cwd=None):
  config, name, _ = config_check.config_from_command_line(
      ["run.py", *arguments], spec, cwd=cwd)
  return config, name


def test_a_missing_config_file_says_where_it_looked(tmp_path):
  with pytest.raises(ConfigError) as error:
    load("--config=configs/nope.py", cwd=str(tmp_path))
  message = str(error.value)
  assert "'configs/nope.py' not found" in message and "\n" not in message
  assert os.path.join(str(tmp_path), "configs", "nope.py") in message  # the current folder
  assert os.path.join(ROOT, "configs", "nope.py") in message           # the repository
  with pytest.raises(ConfigError, match="did you mean freedom_baby"):
    load("--config=fredom_baby")


def test_a_name_or_a_repository_path_finds_the_config_from_any_folder(tmp_path):
  for spec in ("freedom_ml100k", "freedom_ml100k.py", "configs/freedom_ml100k.py",
               os.path.join(ROOT, "configs", "freedom_ml100k.py")):
    config, name = load(f"--config={spec}", cwd=str(tmp_path))
    assert (name, config.model, config.data.prepare) == ("freedom_ml100k", "freedom", "ml100k")
  config, name = load("--config", "bpr_ml100k", cwd=str(tmp_path))  # `--config NAME`
  assert (name, config.model) == ("bpr_ml100k", "bpr")
  mine = tmp_path / "mine.py"  # a file of one's own, from the current folder
  mine.write_text("from configs import bpr_ml100k\n\ndef get_config():\n"
                  "  config = bpr_ml100k.get_config()\n  config.seed = 7\n  return config\n")
  config, name = load("--config=mine.py", cwd=str(tmp_path))
  assert (name, config.seed) == ("mine", 7)


def test_a_broken_config_file_is_one_line_naming_it(tmp_path):
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config():\n  return undefined_name\n")
  with pytest.raises(ConfigError, match=r"broken.py, line 2: cannot load the config "
                     r"\(NameError"):
    load(f"--config={broken}")
  (tmp_path / "empty.py").write_text("x = 1\n")
  with pytest.raises(ConfigError, match="defines no get_config"):
    load(f"--config={tmp_path / 'empty.py'}")


@pytest.mark.parametrize("argument, expected", [
    ("--config.fettle.alpah=1", r"config.fettle has no field 'alpah'; closest: "
                                r"--config.fettle.alpha"),
    ("--config.sed=1", r"the config has no field 'sed'; closest: --config.seed"),
    ("--config.fetle.alpha=1", r"the config has no field 'fetle'; closest: --config.fettle"),
    ("--config.seed.x=1", r"config.seed is a value, not a section"),
    ("--config.fettle=1", r"--config.fettle is a section; set its fields"),
    ("--config.fettle.alpha=abc", r"--config.fettle.alpha=abc: expected float"),
    ("--config.fettle.alpha=nan", r"expected float \(nan is not a finite number\)"),
    ("--config.seed=1.5", r"--config.seed=1.5: expected int"),
    ("--config.seed", r"--config.seed: expected int \(a value is needed"),
    ("--config.fettle.use_cla=maybe", r"expected bool"),
    ("--config.topk=5,a", r"expected tuple of int"),
    ("--config.topk=5,,10", r"expected tuple of int \(an empty element\)"),
    ("--noconfig.seed", r"expected int \(only a true/false field can be negated\)"),
    ("--config.grid_axis=x", r"config has no field 'grid_axis'"),
    ("--config.a..b=1", r"not a field name"),
    ("--config", r"--config needs a value"),
    ("--config.model=bprr", r"unknown backbone 'bprr'; valid: bpr, directau, dualgnn, "
                            r"freedom, grcn, lattice, lightgcn, ncl, sgl, slmrec, vbpr"),
    ("--config.alignment=fetle", r"unknown alignment 'fetle'; valid: fettle, bm3, none"),
    ("--config.mesh.data=0", r"config.mesh.data=0: valid values are a positive device "
                             r"count, or -1"),
    ("--config.mesh.model=-2", r"config.mesh.model=-2: valid values"),
])
def test_each_config_mistake_is_one_line(argument, expected):
  with pytest.raises(ConfigError, match=expected) as error:
    load(argument)
  assert "\n" not in str(error.value)


def test_values_are_read_as_their_fields_types():
  config, _ = load("--config.seed=0x10", "--config.fettle.alpha=1", "--noconfig.fettle.use_cla",
                   "--config.fettle.use_dt=false", "--config.topk=(5, 10)",
                   "--config.data.modalities=text,'kg'", "--config.slmrec.fac_order=[a, b]",
                   "--config.seed=3")  # the last of a field wins
  assert (config.seed, config.fettle.alpha) == (3, 1.0)
  assert (config.fettle.use_cla, config.fettle.use_dt) == (False, False)
  assert config.topk == (5, 10) and config.data.modalities == ("text", "kg")
  assert config.slmrec.fac_order == ("a", "b")
  unset = load("--config.data.modalities=text", "--config.data.modalities=None")[0]
  assert unset.data.modalities is None
  assert load("--config.fettle.use_cla")[0].fettle.use_cla is True


def test_overrides_of_sections_the_run_does_not_read_get_a_note():
  arguments = ["run.py", "--config=bpr_ml100k", "--config.fettle.feedback=cosine",
               "--config.lightgcn.n_layers=2", "--config.bpr.reg_weight=0.1",
               "--config.fettle_shapes.common_batch_items=8", "--config.seed=1"]
  config, _, _ = config_check.config_from_command_line(arguments, "default")
  overrides = config_check.split_arguments(arguments).overrides
  assert config_check.unread_overrides(config, overrides) == [
      "note: --config.fettle.feedback=cosine has no effect: config.alignment is 'none'",
      "note: --config.lightgcn.n_layers=2 has no effect: config.model is 'bpr'",
      "note: --config.fettle_shapes.common_batch_items=8 has no effect: config.alignment is 'none'"]
  config.alignment = "fettle"
  assert config_check.unread_overrides(config, overrides) == [
      "note: --config.lightgcn.n_layers=2 has no effect: config.model is 'bpr'"]


def test_an_explicit_data_path_wins_over_the_built_in_data_set(tiny_mmrec, tmp_path):
  config, _ = load()  # the default config prepares ml100k
  assert config.data.prepare == "ml100k"
  config, _ = load(f"--config.data.path={tiny_mmrec}")
  assert (config.data.path, config.data.prepare) == (tiny_mmrec, "")
  config, _ = load(f"--config.data.path={tiny_mmrec}", "--config.data.prepare=")
  assert config.data.prepare == ""
  with pytest.raises(ConfigError, match="both name the data; pass one of them"):
    load(f"--config.data.path={tiny_mmrec}", "--config.data.prepare=ml100k")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(DataError, match="no `<name>.inter`"):
    load(f"--config.data.path={empty}")
  with pytest.raises(DataError, match=f"{tmp_path}/data/baby: data folder does not exist"):
    load("--config=freedom_baby", cwd=str(tmp_path))


def run_command(arguments, cwd, timeout=300):
  return subprocess.run([sys.executable, RUN, *arguments], cwd=cwd, capture_output=True,
                        text=True, timeout=timeout, check=False)


@pytest.mark.parametrize("arguments", [
    ["--config=configs/nope.py"],
    ["--config.fettle.alpah=1"],
    ["--config.mesh.data=0"],
    ["--config.data.path=EMPTY"],
    ["--config=NAME_BABY", "--config.topk=5,10,100"],  # refused once the data is read
])
def test_run_py_refuses_with_one_line_and_leaves_no_run_folder(arguments, tmp_path,
                                                               tiny_mmrec):
  empty = tmp_path / "empty"
  empty.mkdir()
  arguments = [a.replace("EMPTY", str(empty)).replace("NAME_BABY", "lightgcn_baby")
               for a in arguments]
  if "--config.topk=5,10,100" in arguments:  # the tiny catalogue has 30 items
    arguments.append(f"--config.data.path={tiny_mmrec}")
  workdir = tmp_path / "run"
  result = run_command([*arguments, f"--workdir={workdir}", "--compilation_cache=none"],
                       cwd=str(tmp_path))
  assert result.returncode == 1, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
  assert not workdir.exists()
