"""No alignment: the backbone trains on its own loss (the 'vanilla' rows of Table 2)."""

from typing import Dict, Tuple

import jax.numpy as jnp

from fettle_jax.types import Array, Batch, DataInfo, Params, Representations


def init(rng: Array, data_info: DataInfo, config) -> Params:
  del rng, data_info, config
  return {}


def loss(params: Params, reps: Representations, features: Dict[str, Array], batch: Batch,
         rng: Array, config) -> Tuple[Array, Dict[str, Array]]:
  del params, reps, features, batch, rng, config
  return jnp.zeros((), jnp.float32), {}
