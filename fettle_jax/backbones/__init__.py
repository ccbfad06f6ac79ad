"""Recommender backbones. Each is one module exposing the same pure functions (contract v2):

  default_config() -> ConfigDict        its own hyper-parameters (`config.<name>`);
  build_graph(train_pairs, n_users, n_items, features, config) -> pytree of arrays
      built once per data set on the host (graphs, neighbour lists); never a copy of the
      features, which every function reads from `static.features`;
  init(rng, data_info, config) -> params;
  apply(params, model_state, static, batch, rng, config) -> (Representations, loss)
      one training step;
  represent(params, model_state, static, config) -> Representations   for evaluation.

Optional:
  check_config(section) -> None   one-line ConfigErrors for `config.<name>`, before data loads;
  cached_structures(train_pairs, n_users, n_items, config) -> {name: np.ndarray}
      an expensive, pure host computation on the train split (DualGNN's user graph); the
      train loop caches it next to the data (data_pipeline/derived.py, keyed by the split
      and the backbone's config section) and merges it into build_graph's dict;
  init_state(rng, static, info, config) -> model_state     non-trainable state (default {}),
      checkpointed and resumed with the parameters;
  epoch_start(params, model_state, static, info, rng, config) -> model_state
      called at the start of every epoch inside the compiled epoch (per-epoch graph views,
      k-means prototypes, pruned graphs, ...).

`info` is the data set's DataInfo (n_users, n_items, feature widths: static Python ints).
`static` is the train loop's StaticInputs (train_pairs, seen, features, graph), one pytree
on device; `config` is the whole experiment ConfigDict (the backbone reads its own section
and the shared `config.embedding_size`).
"""

import importlib
import types
from fettle_jax.errors import ConfigError

# The epoch hook's random stream: fold_in(epoch rng, EPOCH_HOOK_STREAM), apart from the
# batch and step streams (split(epoch rng)), so adding a hook changes no other draw.
EPOCH_HOOK_STREAM = 0x5EED


def get_backbone(name: str) -> types.ModuleType:
  try:
    return importlib.import_module(f"fettle_jax.backbones.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"fettle_jax.backbones.{name}":
      raise
    raise ConfigError(f"unknown backbone {name!r}") from None


def init_state(backbone: types.ModuleType, rng, static, info, config):
  """The backbone's initial non-trainable state; {} for backbones that keep none."""
  if hasattr(backbone, "init_state"):
    return backbone.init_state(rng, static, info, config)
  return {}
