"""Parameter initializers and dense layers every backbone and plug-in reuses."""

import jax
import jax.numpy as jnp
import numpy as np

from fettle_jax.types import Array


def xavier_uniform(rng: Array, shape, dtype=jnp.float32) -> Array:
  """Glorot & Bengio (2010) uniform init, as the paper uses for every parameter (Sec 4.1)."""
  fan_in, fan_out = shape[0], shape[-1]
  limit = np.sqrt(6.0 / (fan_in + fan_out))
  return jax.random.uniform(rng, shape, dtype, -limit, limit)


def init_linear(rng: Array, in_dim: int, out_dim: int) -> dict:
  return {"kernel": xavier_uniform(rng, (in_dim, out_dim)),
          "bias": jnp.zeros((out_dim,), jnp.float32)}


def linear(params: dict, x: Array) -> Array:
  return x @ params["kernel"] + params["bias"]


def init_feature_projectors(rng: Array, feature_dims: dict, out_dim: int) -> dict:
  """One linear projector per content modality: raw feature width -> embedding size L."""
  names = sorted(feature_dims)
  rngs = jax.random.split(rng, max(len(names), 1))
  return {name: init_linear(r, feature_dims[name], out_dim) for name, r in zip(names, rngs)}


def project_features(projectors: dict, features: dict) -> dict:
  return {name: linear(projectors[name], features[name]) for name in projectors}


def init_embedding_tables(rng: Array, n_users: int, n_items: int, size: int) -> dict:
  """Xavier-initialized ID embedding tables {user_embedding, item_embedding}."""
  user_rng, item_rng = jax.random.split(rng)
  return {"user_embedding": xavier_uniform(user_rng, (n_users, size)),
          "item_embedding": xavier_uniform(item_rng, (n_items, size))}
