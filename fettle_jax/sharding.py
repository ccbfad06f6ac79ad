"""The device mesh, the partition rules and the placement of every array: the one module
that knows about devices. Backbones and alignment losses never see a mesh.

Mesh: two axes, ('data', 'model'), in Auto mode: we pin the shardings of the state, the
static inputs, the batches and the outputs, and XLA's SPMD partitioner derives the rest
(including the gradient all-reduce over 'data'). `config.mesh.data` x `config.mesh.model`
devices, -1 meaning every remaining device; the default (-1, 1) is pure data parallelism.

Partition rules: (regular expression over a leaf's '/'-joined tree path, PartitionSpec),
first match wins (big_vision style). Optax's Adam moments repeat the parameter paths under
`opt_state/0/mu/` and `.../nu/`, so the rules shard each moment like its parameter.

Uneven dimensions: a jax.Array's sharded dimension must divide by its number of shards
(ml100k's 1,682 items over 4 devices do not). Such a leaf is stored padded with zero rows to
the next multiple, and every compiled function first slices it back to its logical shape
(`Placement.logical`): backbones see the data's true sizes, the padded rows get zero
gradients and stay zero. Checkpoints hold the logical shapes (`Placement.storage`), so a
run saved on one mesh resumes on any other.
"""

import os
import re
import socket
import time
from typing import Any, NamedTuple, Sequence, Tuple

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from fettle_jax.errors import ConfigError, DistributedError

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)

# Parameters, optimizer state and model state (TrainState paths).
STATE_RULES = (
    (r"(^|/)(user_embedding|item_embedding)$", P(MODEL, None)),  # ID tables: by rows
    (r"(^|/)codebook_(item|user)$", P(None, MODEL)),  # FETTLE's C^ITV, C^UI [L, P]: along P
    (r".*", P()),  # projectors, FFNs, Adam's count, graphs in the model state
)
# StaticInputs paths.
STATIC_RULES = (
    (r"^features/", P(MODEL, None)),  # content features [n_items, d_m]: by item rows
    (r".*", P()),  # train pairs, negative-sampling index, graphs (small; read everywhere)
)
# A step's batch inside the epoch's [n_batches, B] arrays: B over 'data'.
BATCHES_SPEC = P(None, DATA)


def default_config() -> ml_collections.ConfigDict:
  """`config.mesh`."""
  return ml_collections.ConfigDict({
      "data": -1,  # int: devices along 'data' (batch, evaluated users); -1 = all remaining
      "model": 1,  # int: devices along 'model' (table rows, codebook prototypes, items ranked)
  })


def mesh_shape(mesh_config, n_devices: int) -> Tuple[int, int]:
  """(data, model) from the config; -1 takes the devices the other axis leaves."""
  data, model = int(mesh_config.data), int(mesh_config.model)
  for name, size in ((DATA, data), (MODEL, model)):
    if size == 0 or size < -1:
      raise ConfigError(f"config.mesh.{name} must be a positive device count or -1, got {size}")
  if data == -1 and model == -1:
    raise ConfigError("config.mesh.data and config.mesh.model cannot both be -1")
  if data == -1 or model == -1:
    known = model if data == -1 else data
    if n_devices % known:
      raise ConfigError(f"config.mesh: {n_devices} devices do not split into groups of "
                        f"{known}; pass both config.mesh.data and config.mesh.model")
    data, model = (n_devices // known, known) if data == -1 else (known, n_devices // known)
  if data * model > n_devices:
    raise ConfigError(f"config.mesh {data}x{model} needs {data * model} devices, "
                      f"{n_devices} are visible")
  if jax.process_count() > 1 and data * model != n_devices:
    raise ConfigError(f"config.mesh {data}x{model}: a multi-process run must use all "
                      f"{n_devices} devices")
  return data, model


def make_mesh(mesh_config, devices: Sequence[Any] = None) -> jax.sharding.Mesh:
  """The run's mesh over the first data x model devices (all of them by default)."""
  devices = list(jax.devices() if devices is None else devices)
  data, model = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh((data, model), MESH_AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices[:data * model])


# Environment variables of launchers whose clusters jax.distributed.initialize() detects by
# itself (SLURM, Open MPI, multi-host Cloud TPU): with one of them set, run.py joins the
# cluster without flags.
CLUSTER_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def detected_cluster() -> bool:
  for name in CLUSTER_ENV:
    value = os.environ.get(name, "")
    if (value.isdigit() and int(value) > 1) or "," in value:
      return True
  return False


def wait_for_coordinator(address: str, timeout_seconds: float) -> None:
  """Retries a TCP connection to HOST:PORT until it opens or the timeout passes."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ConfigError(f"--coordinator_address must be HOST:PORT, got {address!r}")
  deadline = time.monotonic() + timeout_seconds
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise DistributedError(
            f"cannot reach the coordinator {address} within {timeout_seconds} s "
            f"({e.strerror or e}); start process 0 there first, or check the address") from None
      time.sleep(0.5)


def initialize_distributed(coordinator_address: str = None, num_processes: int = None,
                           process_id: int = None, timeout_seconds: int = 120) -> bool:
  """Joins a multi-process run before JAX touches a device; returns whether it did.

  With an address, every process passes the same address and count and its own id; with
  none, a cluster launcher's environment (CLUSTER_ENV) lets JAX detect them. A coordinator
  that cannot be reached within `timeout_seconds` raises DistributedError (one line); once
  running, a process whose heartbeat stops for `timeout_seconds` ends the others.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if all(v is None for v in explicit) and not detected_cluster():
    return False
  if any(v is None for v in explicit) and not all(v is None for v in explicit):
    raise ConfigError("--coordinator_address, --num_processes and --process_id go together "
                      f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
  if coordinator_address is not None and process_id != 0:
    # XLA aborts the process (a multi-line fatal log) when the coordinator cannot be
    # reached; probe it first so that case is one line.
    wait_for_coordinator(coordinator_address, timeout_seconds)
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_seconds,
                               heartbeat_timeout_seconds=timeout_seconds)
  except Exception as e:  # pylint: disable=broad-except  # XLA's errors carry no type
    first = (str(e).strip().splitlines() or [""])[0][:300]
    where = coordinator_address or "the detected cluster"
    raise DistributedError(
        f"could not join the multi-process run at {where} as process {process_id} within "
        f"{timeout_seconds} s ({type(e).__name__}: {first}); check the address and that "
        "every process was started") from None
  return True


def path_name(path) -> str:
  """'params/backbone/user_embedding' for a tree_flatten_with_path key path."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


def spec_for(name: str, ndim: int, rules) -> P:
  for pattern, spec in rules:
    if re.search(pattern, name):
      return P(*tuple(spec)[:ndim]) if len(spec) > ndim else spec
  return P()


def padded_shape(shape: Tuple[int, ...], spec: P, axis_sizes) -> Tuple[int, ...]:
  """`shape` with each dimension that `spec` shards rounded up to a multiple of its shard
  count (`axis_sizes`: mesh axis name -> size, e.g. `mesh.shape`)."""
  out = list(shape)
  for dim, axes in enumerate(spec):
    if axes is not None:
      out[dim] = round_up(shape[dim], shard_count(axes, axis_sizes))
  return tuple(out)


def shard_count(axes, axis_sizes) -> int:
  return int(np.prod([axis_sizes[a] for a in np.atleast_1d(axes)]))


def shard_shape(shape: Tuple[int, ...], spec: P, axis_sizes) -> Tuple[int, ...]:
  """The block of a (padded) `shape` array that one device holds."""
  return tuple(n if axes is None else n // shard_count(axes, axis_sizes)
               for n, axes in zip(padded_shape(shape, spec, axis_sizes),
                                  tuple(spec) + (None,) * (len(shape) - len(spec))))


def padded_for(shape: Tuple[int, ...], named: NamedSharding) -> Tuple[int, ...]:
  return padded_shape(shape, named.spec, named.mesh.shape)


def slice_to_shapes(tree, shapes):
  """Inside a compiled function: each leaf sliced back to its logical shape."""
  return jax.tree.map(lambda x, s: x if x.shape == s.shape else
                      x[tuple(slice(0, n) for n in s.shape)], tree, shapes)


class Placement(NamedTuple):
  """Where each leaf of one pytree lives: its sharding and its logical (unpadded) shape."""
  shardings: Any  # the tree's structure, NamedSharding leaves
  shapes: Any     # the tree's structure, jax.ShapeDtypeStruct leaves (logical shapes)

  @property
  def padded(self) -> bool:
    return any(padded_for(s.shape, sh) != s.shape for s, sh in
               zip(jax.tree.leaves(self.shapes), jax.tree.leaves(self.shardings)))

  def place(self, tree):
    """Host (or local-device) leaves -> global arrays, padded and sharded. Every process
    passes the same values and contributes the shards its devices hold."""

    def one(x, sharding):
      x = np.asarray(jax.device_get(x))
      target = padded_for(x.shape, sharding)
      if target != x.shape:
        x = np.pad(x, [(0, t - n) for t, n in zip(target, x.shape)])
      return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(one, tree, self.shardings)

  def logical(self, tree):
    """Inside a compiled function: each leaf sliced back to its logical shape."""
    return slice_to_shapes(tree, self.shapes)

  def storage(self):
    """(shardings, to_storage, from_storage) of the checkpoint layout: logical shapes; a
    padded leaf is stored unpadded, split along a dimension that divides evenly (or
    replicated), and padded again on restore. Identity functions when nothing is padded."""
    if not self.padded:
      return self.shardings, None, None

    def storage_sharding(shape, sharding):
      if padded_for(shape.shape, sharding) == shape.shape:
        return sharding
      mesh = sharding.mesh
      for axis in (MODEL, DATA):  # a dimension the axis divides, else replicated
        for dim, n in enumerate(shape.shape):
          if mesh.shape[axis] > 1 and n % mesh.shape[axis] == 0:
            spec = [None] * len(shape.shape)
            spec[dim] = axis
            return NamedSharding(mesh, P(*spec))
      return NamedSharding(mesh, P())

    shardings = jax.tree.map(storage_sharding, self.shapes, self.shardings)
    to_storage = jax.jit(self.logical, out_shardings=shardings)

    def pad_leaf(x, sharding):
      target = padded_for(x.shape, sharding)
      if target == x.shape:
        return x
      return jax.numpy.pad(x, [(0, t - n) for t, n in zip(target, x.shape)])

    pad = lambda tree: jax.tree.map(pad_leaf, tree, self.shardings)
    from_storage = jax.jit(pad, out_shardings=self.shardings)
    return shardings, to_storage, from_storage


def placement(tree, rules, mesh: jax.sharding.Mesh) -> Placement:
  """The Placement of `tree` (arrays or ShapeDtypeStructs) under `rules` on `mesh`."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  shardings, shapes = [], []
  for path, leaf in leaves:
    shape = tuple(np.shape(leaf))
    spec = spec_for(path_name(path), len(shape), rules)
    shardings.append(NamedSharding(mesh, spec))
    shapes.append(jax.ShapeDtypeStruct(shape, jax.numpy.result_type(leaf)))
  return Placement(jax.tree_util.tree_unflatten(treedef, shardings),
                   jax.tree_util.tree_unflatten(treedef, shapes))


class Layout(NamedTuple):
  """A run's mesh and the placements of its train state and static inputs."""
  mesh: jax.sharding.Mesh
  state: Placement
  static: Placement

  @property
  def data_size(self) -> int:
    return self.mesh.shape[DATA]

  @property
  def model_size(self) -> int:
    return self.mesh.shape[MODEL]

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def constrain_batches(self, batches):
    """Inside the epoch: each step's batch split over 'data'."""
    sharding = NamedSharding(self.mesh, BATCHES_SPEC)
    return jax.tree.map(lambda b: jax.lax.with_sharding_constraint(b, sharding), batches)


def model_axis_size() -> int:
  """Size of the 'model' axis of the mesh being traced under (1 outside any mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or MODEL not in mesh.axis_names:
    return 1
  return mesh.shape[MODEL]


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def per_device_bytes(arrays) -> int:
  """Bytes the first device holds of these (global) arrays: measured from their shards."""
  device = jax.devices()[0]
  total = 0
  for x in jax.tree.leaves(arrays):
    for shard in x.addressable_shards:
      if shard.device == device:
        total += shard.data.nbytes
  return total


# ------------------------------------------------------------------------ graph row blocks
# Graph propagation with node rows split over 'model' (graphs.propagate_row_blocks): the
# shard_map lives here, with every other device decision.


def map_model_row_blocks(local, rows, *replicated):
  """Runs `local(rows_block, *replicated)` on each device of the traced mesh's 'model' axis:
  `rows` [N, d] (N a multiple of the axis size) is split by rows, the other arguments are
  whole on every device, and the [N / model, d] blocks come back as one [N, d] array split
  by rows. `local` may use collectives over 'model' (e.g. all_gather the full input)."""
  return jax.shard_map(local, in_specs=(P(MODEL, None),) + (P(),) * len(replicated),
                       out_specs=P(MODEL, None), check_vma=False)(rows, *replicated)


# ------------------------------------------------------------------------ stacked settings
# A grid (fettle_jax/grid.py) stacks its settings' train states on a new leading axis.


def stacked(placement: Placement, n: int) -> Placement:
  """The placement of `n` trees like `placement`'s stacked on a new leading axis: each
  leaf keeps its sharding on its own dimensions; the settings axis is not split."""
  shardings = jax.tree.map(lambda sh: NamedSharding(sh.mesh, P(None, *sh.spec)),
                           placement.shardings)
  shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct((n,) + tuple(s.shape), s.dtype),
                        placement.shapes)
  return Placement(shardings, shapes)


# ------------------------------------------------------------------ evaluation over item blocks


def map_over_user_and_item_blocks(fn, mesh: jax.sharding.Mesh, user_rows, item_rows,
                                  *replicated):
  """fn(user_rows, item_rows, *replicated) on every device of `mesh`, the user rows split
  over 'data' and the item rows over 'model', the other arguments whole on each device;
  the [users, ...] result split over 'data' (fn returns the same on every 'model' shard)."""
  in_specs = (P(DATA, None), P(MODEL, None)) + (P(),) * len(replicated)
  user_rows = jax.lax.with_sharding_constraint(user_rows, NamedSharding(mesh, P(DATA, None)))
  item_rows = jax.lax.with_sharding_constraint(item_rows, NamedSharding(mesh, P(MODEL, None)))
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(DATA, None),
                       check_vma=False)(user_rows, item_rows, *replicated)
