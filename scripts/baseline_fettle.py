"""Another checkout's FETTLE beside this tree's, for scripts/benchmark_steps.py --baseline:
its package (fettle_jax/alignment/fettle/) or an older single-file fettle.py, loaded under
FETTLE's own module names while they point at it, and swapped in only inside
`baseline_fettle` (no flags here, so tests can load it beside any tool)."""

import contextlib
import importlib
import importlib.util
import os
import pkgutil
import sys

from absl import app

from fettle_jax import alignment as alignment_lib

FETTLE_PACKAGE = "fettle_jax.alignment.fettle"
_baseline_modules = {}  # checkout -> {module name: module} of its FETTLE


def _fettle_entries() -> dict:
  return {name: module for name, module in sys.modules.items()
          if name == FETTLE_PACKAGE or name.startswith(FETTLE_PACKAGE + ".")}


def _swap_fettle_entries(modules: dict) -> dict:
  """Puts `modules` in sys.modules under FETTLE's names; returns the entries it replaced."""
  replaced = _fettle_entries()
  for name in replaced:
    del sys.modules[name]
  sys.modules.update(modules)
  return replaced


def load_baseline_fettle(checkout: str) -> dict:
  """That checkout's FETTLE (the package fettle_jax/alignment/fettle/ or an older
  single-file fettle.py), every submodule loaded under FETTLE's own module names while
  they point at it; all other imports resolve to this tree. Loaded once per checkout."""
  if checkout in _baseline_modules:
    return _baseline_modules[checkout]
  folder = os.path.join(checkout, "fettle_jax", "alignment", "fettle")
  if os.path.isfile(os.path.join(folder, "__init__.py")):
    path, search = os.path.join(folder, "__init__.py"), [folder]
  elif os.path.isfile(folder + ".py"):
    path, search = folder + ".py", None
  else:
    raise app.UsageError(f"--baseline: no {folder}/ or {folder}.py")
  ours = _swap_fettle_entries({})
  try:
    spec = importlib.util.spec_from_file_location(FETTLE_PACKAGE, path,
                                                  submodule_search_locations=search)
    sys.modules[FETTLE_PACKAGE] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for submodule in pkgutil.iter_modules(search or []):
      importlib.import_module(f"{FETTLE_PACKAGE}.{submodule.name}")
  except ImportError as e:
    raise app.UsageError(f"--baseline: {path} imports what this tree lacks: {e}") from e
  finally:
    theirs = _swap_fettle_entries(ours)
  _baseline_modules[checkout] = theirs
  return theirs


@contextlib.contextmanager
def baseline_fettle(checkout: str):
  """Inside the block FETTLE is `checkout`'s, for train.py's alignment lookup and for the
  imports its code makes while a step is traced (submodules imported on use)."""
  modules = load_baseline_fettle(checkout)
  ours = _swap_fettle_entries(modules)
  original = alignment_lib.get_alignment
  alignment_lib.get_alignment = (
      lambda name: modules[FETTLE_PACKAGE] if name == "fettle" else original(name))
  try:
    yield
  finally:
    alignment_lib.get_alignment = original
    _swap_fettle_entries(ours)
