"""scripts/baseline_fettle.py (baseline_lib.py --baseline): another checkout's FETTLE
loaded beside this tree's."""

import importlib
import os
import shutil
import sys

from absl import app
import pytest

from fettle_jax import alignment as alignment_lib
import fettle_jax.alignment.fettle as our_fettle
from tests.conftest import ROOT, load_script

baseline_lib = load_script("baseline_fettle")
PACKAGE = baseline_lib.FETTLE_PACKAGE


def _checkout(tmp_path):
  """A checkout whose FETTLE package differs from ours by one marker in a submodule."""
  folder = tmp_path / "fettle_jax" / "alignment" / "fettle"
  shutil.copytree(os.path.join(ROOT, "fettle_jax", "alignment", "fettle"), folder,
                  ignore=shutil.ignore_patterns("__pycache__"))
  with open(folder / "shapes.py", "a") as f:
    f.write("\nBASELINE_MARKER = 'theirs'\n")
  return str(tmp_path)


def test_baseline_package_loads_beside_ours_and_is_used_only_inside_the_block(tmp_path):
  checkout = _checkout(tmp_path)
  ours_before = {n: m for n, m in sys.modules.items() if n.startswith(PACKAGE)}
  theirs = baseline_lib.load_baseline_fettle(checkout)
  assert set(theirs) >= {PACKAGE, f"{PACKAGE}.fast", f"{PACKAGE}.equations",
                         f"{PACKAGE}.shapes"}
  for name, module in theirs.items():
    assert module.__file__.startswith(checkout), name
  # Their package imported their submodules, not ours.
  assert theirs[f"{PACKAGE}.fast"].shapes is theirs[f"{PACKAGE}.shapes"]
  assert theirs[f"{PACKAGE}.shapes"].BASELINE_MARKER == "theirs"
  # Loading left this tree's modules in place.
  assert {n: m for n, m in sys.modules.items() if n.startswith(PACKAGE)} == ours_before
  assert baseline_lib.load_baseline_fettle(checkout) is theirs  # loaded once

  with baseline_lib.baseline_fettle(checkout):
    assert alignment_lib.get_alignment("fettle") is theirs[PACKAGE]
    assert alignment_lib.get_alignment("bm3").__name__ == "fettle_jax.alignment.bm3"
    # What their code imports on use while a step is traced resolves to theirs.
    assert importlib.import_module(f"{PACKAGE}.fast") is theirs[f"{PACKAGE}.fast"]
  assert alignment_lib.get_alignment("fettle") is our_fettle
  assert importlib.import_module(f"{PACKAGE}.shapes") is not theirs[f"{PACKAGE}.shapes"]
  assert not hasattr(importlib.import_module(f"{PACKAGE}.shapes"), "BASELINE_MARKER")


def test_single_file_baseline_and_bad_checkouts(tmp_path):
  single = tmp_path / "old" / "fettle_jax" / "alignment"
  single.mkdir(parents=True)
  (single / "fettle.py").write_text("ONE_FILE = True\n")
  theirs = baseline_lib.load_baseline_fettle(str(tmp_path / "old"))
  assert theirs[PACKAGE].ONE_FILE and list(theirs) == [PACKAGE]

  with pytest.raises(app.UsageError, match="no .*fettle"):
    baseline_lib.load_baseline_fettle(str(tmp_path / "empty"))
  broken = tmp_path / "broken" / "fettle_jax" / "alignment"
  broken.mkdir(parents=True)
  (broken / "fettle.py").write_text("from fettle_jax.blocks import linear\n")
  with pytest.raises(app.UsageError, match="fettle_jax.blocks"):
    baseline_lib.load_baseline_fettle(str(tmp_path / "broken"))
  assert sys.modules[PACKAGE] is our_fettle
