"""Prepares an embedded data set once into a cache folder and prints where it is.

  fettle-prepare ml100k [--root=DIR]      (or: python -m data_pipeline.prepare ml100k)

The root is --root, else $FETTLE_JAX_DATA, else ~/.cache/fettle_jax; the data set lands in
<root>/<name>/ and downloads are kept in <root>/downloads/. A data set is built in a private
folder, marked complete last and then renamed into place, so a killed run leaves nothing that
looks finished and the next run starts over; a complete one is never rebuilt.
"""

import os
import shutil
import sys
import time
from typing import Callable, Optional

from absl import flags

from data_pipeline import ml100k
from data_pipeline import wheels
from data_pipeline.errors import DataError
from fettle_jax.tools import command

COMPLETE = ".complete"
DOWNLOADS = "downloads"
# name -> build(out_dir, cache_dir, encoder, log) -> metadata dict
BUILDERS = {ml100k.NAME: ml100k.build}


def data_root(root: Optional[str] = None) -> str:
  """--root if given, else $FETTLE_JAX_DATA, else ~/.cache/fettle_jax (absolute)."""
  return wheels.cache_root(root or "")


def is_complete(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, COMPLETE))


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_stale(root: str, name: str) -> None:
  """Deletes build folders left by killed runs (their process is gone)."""
  prefix = f".{name}.tmp-"
  for entry in os.listdir(root):
    if entry.startswith(prefix):
      try:
        pid = int(entry[len(prefix):])
      except ValueError:
        continue
      if pid != os.getpid() and not _pid_alive(pid):
        shutil.rmtree(os.path.join(root, entry), ignore_errors=True)


def prepare(name: str, root: Optional[str] = None, encoder=None,
            log: Callable[[str], None] = print) -> str:
  """Builds data set `name` under the data root unless already complete; returns its folder.

  encoder: object with `encode(sentences, progress=False) -> float32 [n, d]`; default MiniLM.
  """
  if name not in BUILDERS:
    raise DataError(f"unknown data set {name!r}; available: {', '.join(sorted(BUILDERS))}")
  root = data_root(root)
  out = os.path.join(root, name)
  if is_complete(out):
    log(f"{out}: already prepared")
    return out
  os.makedirs(root, exist_ok=True)
  _remove_stale(root, name)
  tmp = os.path.join(root, f".{name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  start = time.time()
  try:
    BUILDERS[name](tmp, os.path.join(root, DOWNLOADS), encoder=encoder, log=log)
    with open(os.path.join(tmp, COMPLETE), "w") as f:  # last file written: the folder is whole
      f.write("complete\n")
    if os.path.exists(out):  # an unfinished or foreign folder: replaced, never merged
      shutil.rmtree(out)
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  log(f"prepared {name} in {time.time() - start:.1f} s")
  return out


FLAGS = flags.FLAGS


def main(argv):
  names = argv[1:]
  if len(names) != 1:
    sys.exit(f"usage: fettle-prepare NAME [--root=DIR]; NAME is one of: "
             f"{', '.join(sorted(BUILDERS))}")
  try:
    out = prepare(names[0], FLAGS.root)
  except DataError as e:
    sys.exit(f"error: {e}")
  print(out)


def cli():
  """The `fettle-prepare` console script."""
  # Defined here, not at import: a program importing prepare() may define its own --root.
  flags.DEFINE_string("root", None, f"Data root (default: ${wheels.ENV_ROOT}, else {wheels.DEFAULT_ROOT}).")
  command.run_app(main, __name__)


if __name__ == "__main__":
  cli()
