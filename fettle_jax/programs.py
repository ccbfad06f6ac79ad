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

A stored program is data only: one line of JSON (format version, the output tree described
as nested dicts/lists/tuples/NamedTuples, the size and sha256 of what follows), then the
bytes of `Exported.serialize()`. Reading one never unpickles and never imports: a
NamedTuple in the tree must be a class already loaded. The folder is created private to
the user (0700) and each file readable by its owner only; anyone who can write the folder
can still change what the programs compute (as with XLA's compiled-code cache beside it),
so share a cache folder only among people who trust each other.
"""

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import os
import sys
from typing import Any, Callable

import jax
from jax import export as jax_export

from fettle_jax import errors

_FORMAT = 2  # bump when the file layout below changes
_SUFFIX = ".program"
_MAX_HEADER = 1 << 20  # bytes: the JSON line of a stored program is far shorter
_DIRECTORY = None
# Only the same JAX, jaxlib and device kind ever load an artifact, so the custom calls'
# cross-version compatibility (what export checks by default) does not matter here.
_EXPORT_CHECKS = [jax_export.DisabledSafetyCheck.custom_call("ALL")]
_TRACED_LIBRARIES = ("jax", "jaxlib", "optax", "flax", "chex", "numpy", "ml-collections")
# JAX settings that cannot change a traced program (where caches live, logging).
_UNKEYED_SETTINGS = ("cache", "log", "traceback", "profil", "debug_log")


def private_directory(path: str) -> str:
  """`path`, created readable and writable by this user only (0700) if it is missing; a
  folder that exists keeps its mode (the user chose it, e.g. a team's shared cache)."""
  os.makedirs(path, mode=0o700, exist_ok=True)
  return path


def enable(directory: str) -> str:
  """Stores and loads traced programs under `directory` (created private if missing)."""
  global _DIRECTORY
  private_directory(directory)
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


def describe_tree(tree) -> Any:
  """A JSON-able description of a pytree structure: "*" a leaf, null None, and
  {"tuple"|"list": [...]}, {"dict": [[key, ...], ...]}, {"namedtuple": [module, name],
  "fields": [...]}. Other node types raise TypeError (the program is then not stored)."""
  if jax.tree_util.treedef_is_leaf(tree) and tree.node_data() is None:
    return "*"
  node_type, data = tree.node_data()
  children = [describe_tree(child) for child in tree.children()]
  if node_type is type(None):
    return None
  if node_type in (tuple, list):
    return {node_type.__name__: children}
  if node_type is dict:
    if not all(isinstance(k, str) or (isinstance(k, int) and not isinstance(k, bool))
               for k in data):
      raise TypeError(f"dict keys {list(data)[:3]} are neither str nor int")
    return {"dict": [[key, child] for key, child in zip(data, children)]}
  if issubclass(node_type, tuple) and hasattr(node_type, "_fields"):
    return {"namedtuple": [node_type.__module__, node_type.__qualname__],
            "fields": children}
  raise TypeError(f"pytree node {node_type.__name__} has no description")


def _loaded_namedtuple(module: str, qualname: str) -> type:
  """A NamedTuple class that is already loaded: nothing is imported for a cache file."""
  owner = sys.modules.get(module)
  if owner is None:
    raise ValueError(f"module {module} is not loaded")
  found = owner
  for part in qualname.split("."):
    found = getattr(found, part, None)
  if not (isinstance(found, type) and issubclass(found, tuple) and hasattr(found, "_fields")):
    raise ValueError(f"{module}.{qualname} is not a NamedTuple")
  return found


def _placeholder(description):
  """A pytree with the described structure (every leaf 0)."""
  if description == "*":
    return 0
  if description is None:
    return None
  if not isinstance(description, dict) or len(description) not in (1, 2):
    raise ValueError(f"bad tree description {str(description)[:80]}")
  if "tuple" in description:
    return tuple(_placeholder(child) for child in description["tuple"])
  if "list" in description:
    return [_placeholder(child) for child in description["list"]]
  if "dict" in description:
    return {key: _placeholder(child) for key, child in description["dict"]}
  if "namedtuple" in description:
    cls = _loaded_namedtuple(*description["namedtuple"])
    return cls(*[_placeholder(child) for child in description["fields"]])
  raise ValueError(f"bad tree description {str(description)[:80]}")


def rebuild_tree(description):
  """The pytree structure `describe_tree` described."""
  return jax.tree_util.tree_structure(_placeholder(description))


def _load(path: str):
  """(Exported, output tree) of a stored program; ValueError/OSError if it is not one."""
  with open(path, "rb") as f:
    header = json.loads(f.readline(_MAX_HEADER).decode("utf-8"))
    payload = f.read()
  if not isinstance(header, dict) or header.get("format") != _FORMAT:
    raise ValueError(f"format {header.get('format') if isinstance(header, dict) else '?'}, "
                     f"expected {_FORMAT}")
  if len(payload) != header.get("size") or (
      hashlib.sha256(payload).hexdigest() != header.get("sha256")):
    raise ValueError("program bytes do not match the header (a torn or changed file)")
  out_tree = rebuild_tree(header.get("out_tree"))
  exported = jax_export.deserialize(bytearray(payload))
  if out_tree.num_leaves != len(exported.out_avals):
    raise ValueError(f"output tree has {out_tree.num_leaves} leaves, the program "
                     f"{len(exported.out_avals)}")
  return exported, out_tree


def _check_inputs(exported, leaves) -> None:
  """The stored program takes exactly these arguments (a file under a wrong name does not)."""
  expected = [(tuple(a.shape), str(a.dtype)) for a in exported.in_avals]
  given = [(tuple(x.shape), str(x.dtype)) for x in leaves]
  if expected != given:
    raise ValueError("the program's inputs differ from the call's")


def _save(path: str, exported, out_tree) -> None:
  payload = bytes(exported.serialize())
  header = {"format": _FORMAT, "out_tree": describe_tree(out_tree), "size": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest()}
  temporary = f"{path}.{os.getpid()}.tmp"
  # Owner-only from the start (O_EXCL: never through a file or link someone placed there).
  descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
  try:
    with os.fdopen(descriptor, "wb") as f:
      f.write(json.dumps(header).encode("utf-8") + b"\n")
      f.write(payload)
    os.replace(temporary, path)  # readers see the whole file or none
  except BaseException:
    if os.path.exists(temporary):
      os.remove(temporary)
    raise


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
      path = os.path.join(_DIRECTORY, f"{name}-{key}{_SUFFIX}")
      exported = out_tree = None
      if os.path.exists(path):
        try:
          exported, out_tree = _load(path)
          _check_inputs(exported, leaves)
        except Exception as e:  # pylint: disable=broad-except  # any bad file: trace again
          exported = out_tree = None
          reason = (str(e).splitlines() or [""])[0][:200]
          _warn(f"{path} unreadable ({type(e).__name__}: {reason}); tracing again")
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
        except (OSError, ImportError, TypeError) as e:  # a full disk; no flatbuffers to
          # serialize; an output tree node without a description
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
