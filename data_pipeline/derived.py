"""Structures a backbone derives from a data set's train split (e.g. DualGNN's user
co-occurrence graph), computed once on the host and cached next to the data.

The backbone states the computation (`cached_structures(train_pairs, n_users, n_items,
config) -> {name: array}`, pure); this module owns the files. A cache entry is keyed by the
backbone, its config section, the sizes and the bytes of the train split, so a changed split
or hyper-parameter never reads a stale entry. Entries go to `<data folder>/derived/`, or to
`<data cache root>/derived/` when the data folder is read-only.
"""

import hashlib
import json
import os
import zipfile
from typing import Callable, Dict

import numpy as np

from data_pipeline import wheels


def cache_folder(data_path: str) -> str:
  """`<data_path>/derived` if the data folder is writable, else the data cache root's."""
  if data_path and os.path.isdir(data_path) and os.access(data_path, os.W_OK):
    return os.path.join(data_path, "derived")
  return os.path.join(wheels.cache_root(), "derived")


def structure_key(model: str, section: dict, train_pairs: np.ndarray, n_users: int,
                  n_items: int) -> str:
  digest = hashlib.sha256()
  digest.update(json.dumps({"model": model, "section": section, "n_users": int(n_users),
                            "n_items": int(n_items)}, sort_keys=True, default=str).encode())
  digest.update(np.ascontiguousarray(train_pairs, np.int64).tobytes())
  return f"{model}-{digest.hexdigest()[:20]}"


def cached_arrays(folder: str, key: str, compute: Callable[[], Dict[str, np.ndarray]],
                  log: Callable[[str], None] = print) -> Dict[str, np.ndarray]:
  """`compute()`'s arrays, read from `<folder>/<key>.npz` when a previous run left them.

  An unreadable entry (a run killed mid-write on a file system without atomic rename, disk
  corruption) is recomputed and rewritten, with a note; a folder that cannot be written
  only costs the cache.
  """
  path = os.path.join(folder, f"{key}.npz")
  if os.path.exists(path):
    try:
      with np.load(path, allow_pickle=False) as stored:
        return {name: stored[name] for name in stored.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
      log(f"note: derived cache {path} is unreadable ({type(e).__name__}); recomputing")
  arrays = {name: np.asarray(value) for name, value in compute().items()}
  try:
    os.makedirs(folder, exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"  # atomic: another process never reads half a file
    with open(partial, "wb") as f:
      np.savez(f, **arrays)
    os.replace(partial, path)
  except OSError as e:
    log(f"note: could not cache derived structures in {folder} ({e.strerror or e}); "
        "they will be recomputed next run")
  return arrays


def backbone_structures(backbone, config, data, log: Callable[[str], None] = print):
  """The backbone's `cached_structures` on `data`'s train split, through the cache."""
  section = config[config.model].to_dict() if config.model in config else {}
  key = structure_key(config.model, section, data.train, data.n_users, data.n_items)
  compute = lambda: backbone.cached_structures(data.train, data.n_users, data.n_items, config)
  return cached_arrays(cache_folder(data.path), key, compute, log)
