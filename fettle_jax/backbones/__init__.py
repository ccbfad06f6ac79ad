"""Recommender backbones. Each is one module exposing the same pure functions:

  build_graph(train_pairs, n_users, n_items, features, config) -> pytree of arrays
      built once per data set (graphs, features the backbone reads);
  init(rng, data_info, config) -> params;
  apply(params, graph, batch, rng, config) -> (Representations, backbone loss)
      for one training step;
  represent(params, graph, config) -> Representations   for evaluation.

`config` is the whole experiment ConfigDict; a backbone reads its own section
(`config.<name>`) and the shared `config.embedding_size`.
"""

import importlib
import types


def get_backbone(name: str) -> types.ModuleType:
  try:
    return importlib.import_module(f"fettle_jax.backbones.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"fettle_jax.backbones.{name}":
      raise
    raise ValueError(f"unknown backbone {name!r}") from None
