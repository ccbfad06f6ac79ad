"""Traced programs kept on disk: a rerun skips Python tracing and lowering.

XLA's persistent compilation cache (`train.enable_compilation_cache`) removes compilation
from a rerun, but its key is the lowered program, so JAX still traces and lowers the step
function first: for FREEDOM+FETTLE on ml100k 3-4 s of a 6-7 s first epoch. With `enable`,
`cached` stores each program, once traced, as a `jax.export` artifact (StableHLO plus its
input/output shardings) under a key of everything that shapes the trace; a rerun loads it
(~10 ms), calls it, and the compilation cache supplies the executable.

The key: the program's name and the caller's description of the run (config, data facts),
the arguments' tree, shapes, dtypes and shardings, the source of every module of the
package, the versions of JAX and the libraries traced through, the devices and JAX's own
settings. Anything else a trace could read (a monkeypatched function, a file) is not in it,
which is why only run.py turns this on, not the library by default. A file that cannot be
read or a program that cannot be exported costs one warning and a plain `jax.jit`.
"""

import contextlib
import functools
import hashlib
import importlib.metadata
import os
import pickle
import sys
from typing import Callable

import jax
from jax import export as jax_export

from fettle_jax import errors

_FORMAT = 1  # bump when the file layout below changes
_DIRECTORY = None
# Only the same JAX, jaxlib and device kind ever load an artifact, so the custom calls'
# cross-version compatibility (what export checks by default) does not matter here.
_EXPORT_CHECKS = [jax_export.DisabledSafetyCheck.custom_call("ALL")]
_TRACED_LIBRARIES = ("jax", "jaxlib", "optax", "flax", "chex", "numpy", "ml-collections")
# JAX settings that cannot change a traced program (where caches live, logging).
_UNKEYED_SETTINGS = ("cache", "log", "traceback", "profil", "debug_log")


def enable(directory: str) -> str:
  """Stores and loads traced programs under `directory` (created if missing)."""
  global _DIRECTORY
  os.makedirs(directory, exist_ok=True)
  _DIRECTORY = directory
  return directory


def disable() -> None:
  global _DIRECTORY
  _DIRECTORY = None


def enabled() -> bool:
  # One process only: in a multi-process run every process must run the same program,
  # and they would race to write it; they trace as before.
  return _DIRECTORY is not None and jax.process_count() == 1


@functools.lru_cache(maxsize=None)
def _source_digest() -> str:
  """sha256 of every .py file of the package (path and bytes)."""
  root = os.path.dirname(os.path.abspath(__file__))
  digest = hashlib.sha256()
  for folder, subfolders, files in os.walk(root):
    subfolders.sort()
    for name in sorted(f for f in files if f.endswith(".py")):
      path = os.path.join(folder, name)
      digest.update(os.path.relpath(path, root).encode())
      with open(path, "rb") as f:
        digest.update(f.read())
  return digest.hexdigest()


def _version(library: str) -> str:
  try:
    return importlib.metadata.version(library)
  except importlib.metadata.PackageNotFoundError:
    return "-"


def _environment() -> str:
  settings = sorted((name, repr(value)) for name, value in jax.config.values.items()
                    if not any(word in name for word in _UNKEYED_SETTINGS))
  devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
  return repr((_FORMAT, sys.version, [(lib, _version(lib)) for lib in _TRACED_LIBRARIES],
               devices, jax.process_count(), settings, _source_digest()))


def _placement(x) -> str:
  """Which part of x each device holds: equal for equivalent shardings (a 1-device mesh's
  P('model') and P() alike, which a program's outputs do not keep apart)."""
  sharding = getattr(x, "sharding", None)
  if sharding is None:
    return "-"
  parts = sorted((d.id, repr(index)) for d, index in
                 sharding.devices_indices_map(tuple(x.shape)).items())
  return repr((parts, sharding.memory_kind))


def _argument_signature(leaves, tree) -> str:
  return repr((str(tree), [(tuple(x.shape), str(x.dtype), _placement(x)) for x in leaves]))


def program_key(name: str, description: str, leaves, tree, environment: str = None) -> str:
  environment = _environment() if environment is None else environment
  text = "\n".join((name, description, _argument_signature(leaves, tree), environment))
  return hashlib.sha256(text.encode()).hexdigest()[:32]


def _warn(message: str) -> None:
  print(f"warning: program cache: {message}", file=sys.stderr, flush=True)


def _load(path: str):
  with open(path, "rb") as f:
    stored = pickle.load(f)
  if stored.get("format") != _FORMAT:
    raise ValueError(f"format {stored.get('format')}, expected {_FORMAT}")
  return jax_export.deserialize(bytearray(stored["exported"])), stored["out_tree"]


def _save(path: str, exported, out_tree) -> None:
  temporary = f"{path}.{os.getpid()}.tmp"
  with open(temporary, "wb") as f:
    pickle.dump({"format": _FORMAT, "exported": bytes(exported.serialize()),
                 "out_tree": out_tree}, f)
  os.replace(temporary, path)  # readers see the whole file or none


def _flat_program(jitted: Callable, leaves, tree, donated_leaves, mesh):
  """`jitted` on flat arguments and outputs (so any pytree node types serialize), jitted
  with each argument's sharding (one not on the mesh, such as a key made on one device, is
  replicated over it); and a list that receives the output tree when it is traced."""
  out_tree = []

  def flat(*flat_leaves):
    outputs = jitted(*jax.tree_util.tree_unflatten(tree, flat_leaves))
    out_leaves, structure = jax.tree_util.tree_flatten(outputs)
    out_tree.append(structure)
    return out_leaves

  in_shardings = tuple(_on_mesh(x.sharding, mesh) for x in leaves)
  return jax.jit(flat, in_shardings=in_shardings, donate_argnums=donated_leaves), out_tree


def _on_mesh(sharding, mesh):
  if mesh is None or sharding.device_set == set(mesh.devices.flat):
    return sharding
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def cached(call: Callable, name: str, description: str, donate_argnums=(),
           mesh=None) -> Callable:
  """`call(*args)`, its traced program loaded from / saved to the cache when enabled.

  call: a `jax.jit` function with its shardings, or `train.under_mesh`'s wrapper of one
  (its `.jitted` is traced); donate_argnums: its donated positional arguments;
  description: what else decides the trace (the config, the data); mesh: the mesh it runs
  under, if any. Each distinct argument signature gets its own program, as with `jax.jit`.
  Returns `call` itself when the cache is off.
  """
  if not enabled():
    return call
  jitted = getattr(call, "jitted", call)
  donate_argnums = (donate_argnums,) if isinstance(donate_argnums, int) else donate_argnums
  loaded = {}  # key -> (jitted flat program, output tree)
  # Per call only a cheap signature is looked up (the full key costs ~10 ms of Python:
  # versions, settings, shard maps); the environment is read once per wrapped function.
  environment = _environment()
  keys = {}  # (tree, shapes, dtypes, shardings) -> key

  def program_for(args):
    leaves, tree = jax.tree_util.tree_flatten(args)
    signature = (tree, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves))
    if signature not in keys:
      keys[signature] = program_key(name, description, leaves, tree, environment)
    key = keys[signature]
    if key not in loaded:
      donated = _donated_leaves(args, donate_argnums)
      path = os.path.join(_DIRECTORY, f"{name}-{key}.exported")
      exported = out_tree = None
      if os.path.exists(path):
        try:
          exported, out_tree = _load(path)
        except Exception as e:  # pylint: disable=broad-except
          _warn(f"{path} unreadable ({type(e).__name__}: {e}); tracing again")
      if exported is None:
        flat, traced_tree = _flat_program(jitted, leaves, tree, donated, mesh)
        try:
          exported = jax_export.export(flat, disabled_checks=_EXPORT_CHECKS)(*leaves)
        except Exception as e:  # pylint: disable=broad-except
          if not traced_tree or isinstance(e, errors.REPORTED_ERRORS):
            raise  # the trace itself failed: the caller's error, not the cache's
          # Traced but not exportable: the traced program runs as with a plain jit.
          _warn(f"{name} not stored ({type(e).__name__}: {str(e)[:200]})")
          loaded[key] = (flat, traced_tree[0])
          return key, leaves
        out_tree = traced_tree[0]
        try:
          _save(path, exported, out_tree)
        except (OSError, ImportError) as e:  # a full disk; no flatbuffers to serialize
          _warn(f"{path} not written ({type(e).__name__}: {e})")
      loaded[key] = (jax.jit(exported.call, donate_argnums=donated), out_tree)
    return key, leaves

  def cached_call(*args):
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
      key, leaves = program_for(args)
      program, out_tree = loaded[key]
      return jax.tree_util.tree_unflatten(out_tree, program(*leaves))

  return cached_call


def _donated_leaves(args, donate_argnums) -> tuple:
  """The flat leaf positions of the donated positional arguments."""
  donated, start = [], 0
  for position, argument in enumerate(args):
    size = len(jax.tree_util.tree_leaves(argument))
    if position in donate_argnums:
      donated.extend(range(start, start + size))
    start += size
  return tuple(donated)
