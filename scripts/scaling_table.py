"""Predicted per-device memory of FREEDOM+FETTLE on a ('data', 'model') mesh, from shapes only.

  python scripts/scaling_table.py [--config=configs/freedom_baby.py] [--json=PATH]

Nothing is allocated: parameter shapes come from `jax.eval_shape` on the backbone's and the
alignment's `init(rng, DataInfo, config)`, optimizer-state shapes from `jax.eval_shape` on
`train.make_optimizer(config).init`, and each leaf's per-device share from the same
partition rules the real placement uses (`sharding.spec_for` on the leaf's tree path,
sharded dimensions padded up to a multiple of their shard count, as `sharding.padded_shape`).

Columns (bytes per device; the table prints MiB):
- params: parameters (and the backbone's model state: none for FREEDOM's default
  prune_every='step'), STATE_RULES: ID tables by rows over 'model', codebooks along P.
- opt_state: Adam's mu and nu (sharded like their parameters) and its int32 step count.
- static: StaticInputs under STATIC_RULES: content features [n_items, d_m] f32 by rows over
  'model'; everything else replicated: train pairs, the negative-sampling index, and
  FREEDOM's graphs, whose edge counts are *approximated from the counts* (the real ones
  depend on the data): user-item graph 2 * n_train edges (int32 sender, int32 receiver,
  f32 weight), the prunable edge list 5 int32/f32 arrays of n_train, and the kNN item-item
  graph n_items * knn_k * (number of modalities) edges, its upper bound (the real graph
  merges edges that two modalities share), with its transposed edge list (5 int32 arrays).
- step_activation: the largest single training temporary we count, ONE [B, P_UI] f32
  FETTLE score/kernel matrix, its batch rows split over 'data' (several such matrices may
  be live at once inside a step; how many is up to XLA, so this is a floor, not a peak).
- eval_scores: one evaluation batch's scores [eval_batch_size, n_items] f32, users over
  'data' (the batch rounded up to a multiple of it, as train.build_eval_data), items over
  'model'.
- total: params + opt_state + static + max(step_activation, eval_scores): training and
  evaluation are separate programs, so only the larger of the two temporaries counts.

`predict(...)` is importable by the other scripts (`import scaling_table`: a script's own
folder is first on its sys.path), e.g. scripts/benchmark_steps.py prints a prediction next
to a measurement.
"""

import json
import os
import sys
from typing import Dict, Mapping, Sequence, Tuple

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import synthetic
from fettle_jax import alignment as alignment_lib
from fettle_jax import graphs
from fettle_jax import sampling
from fettle_jax import sharding
from fettle_jax import train
from fettle_jax import backbones as backbone_contract
from fettle_jax import workdir as workdir_lib
from fettle_jax.backbones import get_backbone
from fettle_jax.types import DataInfo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FlagValues()  # this tool's own flags (benchmark_steps.py imports it)
_CONFIG = flags.DEFINE_string(
    "config", os.path.join(ROOT, "configs", "freedom_baby.py"),
    "Config file with get_config() (default: FREEDOM+FETTLE, the paper's settings).",
    flag_values=FLAGS)
_JSON = flags.DEFINE_string("json", "", "Also write every row (bytes) to this file.",
                            flag_values=FLAGS)

COLUMNS = ("params", "opt_state", "static", "step_activation", "eval_scores", "total")
MESHES = ((1, 1), (8, 1), (4, 2), (2, 4), (1, 8), (1, 64))
# Share of a data set's interactions in the train split. MMRec's Amazon splits are 8:1:1;
# PAPER_COUNTS hold all interactions, so n_train is estimated (the synthetic twins: ~73%).
TRAIN_SHARE = 0.8


def shard_bytes(shape: Sequence[int], dtype, spec, axis_sizes: Mapping[str, int]) -> int:
  """Bytes one device holds of a [shape] `dtype` array laid out by PartitionSpec `spec` on a
  mesh with these axis sizes: the real placement's rule (`sharding.shard_shape`: sharded
  dimensions padded up to a multiple of their shard count, then divided by it)."""
  local = sharding.shard_shape(tuple(int(n) for n in shape), spec, axis_sizes)
  return int(np.prod(local, dtype=np.int64)) * np.dtype(dtype).itemsize


def tree_bytes(tree, rules, axis_sizes: Mapping[str, int]) -> int:
  """Per-device bytes of a pytree of arrays / ShapeDtypeStructs under partition `rules`."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    shape = tuple(np.shape(leaf))
    spec = sharding.spec_for(sharding.path_name(path), len(shape), rules)
    total += shard_bytes(shape, jnp.result_type(leaf), spec, axis_sizes)
  return total


def state_shapes(config, info: DataInfo, static_shapes=None):
  """TrainState of ShapeDtypeStructs: params, Adam state and model state, never allocated."""
  backbone = get_backbone(config.model)
  alignment = alignment_lib.get_alignment(config.alignment)
  rng = jax.random.PRNGKey(0)
  params = {"backbone": jax.eval_shape(lambda r: backbone.init(r, info, config), rng),
            "alignment": jax.eval_shape(lambda r: alignment.init(r, info, config), rng)}
  opt_state = jax.eval_shape(train.make_optimizer(config).init, params)
  model_state = {}
  if static_shapes is not None:
    model_state = jax.eval_shape(
        lambda r, s: backbone_contract.init_state(backbone, r, s, info, config), rng, static_shapes)
  return train.TrainState(params, opt_state, model_state)


def _sds(shape, dtype=jnp.int32):
  return jax.ShapeDtypeStruct(tuple(int(n) for n in shape), dtype)


def graph_shapes(config, n_items: int, n_train: int, n_modalities: int):
  """The backbone's build_graph() output as ShapeDtypeStructs, sized from the counts (the
  real edge counts depend on the data: see the module docstring); {} for graph-free ones."""
  user_item_edges = 2 * n_train
  user_item = graphs.Graph(_sds([user_item_edges]), _sds([user_item_edges]),
                           _sds([user_item_edges], jnp.float32))
  if config.model == "lightgcn":
    return {"user_item": user_item}
  if config.model == "freedom":
    knn_edges = n_items * min(int(config.freedom.knn_k), n_items) * n_modalities
    return {"user_item": user_item,
            "edges": graphs.BipartiteEdges(*[_sds([n_train])] * 4, _sds([n_train], jnp.float32)),
            "item_item": graphs.Graph(_sds([knn_edges]), _sds([knn_edges]),
                                      _sds([knn_edges], jnp.float32)),
            "item_item_edges": graphs.EdgeList(*[_sds([knn_edges])] * 5)}
  return {}


def static_shapes(config, n_users: int, n_items: int, n_train: int,
                  feature_dims: Mapping[str, int]) -> train.StaticInputs:
  """StaticInputs of ShapeDtypeStructs for `config.model` on data of these counts."""
  return train.StaticInputs(
      _sds([n_train, 2]),
      sampling.SeenItems(_sds([n_users + 1]), _sds([n_train])),
      {name: _sds([n_items, dim], jnp.float32) for name, dim in sorted(feature_dims.items())},
      graph_shapes(config, n_items, n_train, len(feature_dims)))


def predict(config, n_users: int, n_items: int, n_train: int,
            feature_dims: Mapping[str, int], data: int, model: int) -> Dict[str, int]:
  """Predicted bytes per device of each column (COLUMNS) on a data x model mesh."""
  axis_sizes = {sharding.DATA: int(data), sharding.MODEL: int(model)}
  info = DataInfo(int(n_users), int(n_items), dict(feature_dims))
  static = static_shapes(config, n_users, n_items, n_train, feature_dims)
  state = state_shapes(config, info, static)
  params = (tree_bytes(state.params, sharding.STATE_RULES, axis_sizes)
            + tree_bytes(state.model_state, sharding.STATE_RULES, axis_sizes))
  opt_state = tree_bytes(state.opt_state, sharding.STATE_RULES, axis_sizes)
  static_bytes = tree_bytes(static, sharding.STATIC_RULES, axis_sizes)
  # create_train_state trains on one batch of everything when n_train < batch_size.
  batch = min(int(config.batch_size), int(n_train))
  p_ui = int(config.fettle.prototypes_user) if config.alignment == "fettle" else 0
  step = shard_bytes((batch, p_ui), jnp.float32, sharding.P(sharding.DATA, None), axis_sizes)
  eval_users = sharding.round_up(int(config.eval_batch_size), int(data))
  scores = shard_bytes((eval_users, n_items), jnp.float32,
                       sharding.P(sharding.DATA, sharding.MODEL), axis_sizes)
  return {"params": params, "opt_state": opt_state, "static": static_bytes,
          "step_activation": step, "eval_scores": scores,
          "total": params + opt_state + static_bytes + max(step, scores)}


def datasets() -> Dict[str, Tuple[int, int, int]]:
  """name -> (n_users, n_items, n_train): the paper's three and a 100x Baby catalogue."""
  out = {}
  for name, (users, items, interactions) in synthetic.PAPER_COUNTS.items():
    out[name.capitalize()] = (users, items, int(round(TRAIN_SHARE * interactions)))
  users, items, interactions = synthetic.PAPER_COUNTS["baby"]
  out["Baby x100"] = (100 * users, 100 * items, int(round(TRAIN_SHARE * 100 * interactions)))
  return out


def load_config(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("scaling_table_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def table(config, meshes=None, feature_dims=None) -> list:
  """One row per (data set, mesh): counts, mesh and predicted bytes per column."""
  meshes = MESHES if meshes is None else meshes
  feature_dims = dict(synthetic.DIMS if feature_dims is None else feature_dims)
  rows = []
  for name, (n_users, n_items, n_train) in datasets().items():
    for data, model in meshes:
      rows.append({"dataset": name, "n_users": n_users, "n_items": n_items,
                   "n_train": n_train, "data": data, "model": model,
                   **predict(config, n_users, n_items, n_train, feature_dims, data, model)})
  return rows


def markdown(rows) -> str:
  mib = lambda b: f"{b / 2**20:.1f}"
  lines = ["| data set | mesh (data x model) | params | Adam state | static inputs | "
           "[B, P_UI] step matrix | eval scores | total |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(f"| {r['dataset']} | {r['data']}x{r['model']} | "
                 + " | ".join(mib(r[c]) for c in COLUMNS) + " |")
  return "\n".join(lines)


def main(argv) -> int:
  """The command line; returns the exit status."""
  if not workdir_lib.parse_flags(FLAGS, argv, __doc__, required=()):
    return 0
  config = load_config(_CONFIG.value)
  rows = table(config)
  print(f"Per-device MiB, FREEDOM+FETTLE: L={config.embedding_size}, B={config.batch_size}, "
        f"P_ITV={config.fettle.prototypes_item}, P_UI={config.fettle.prototypes_user}, "
        f"eval batch {config.eval_batch_size}, features "
        + ", ".join(f"{k} {v}-d" for k, v in sorted(synthetic.DIMS.items()))
        + f"; n_train = {TRAIN_SHARE:g} x interactions.\n")
  print(markdown(rows))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"columns": COLUMNS, "unit": "bytes per device", "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
