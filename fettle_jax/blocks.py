"""Building blocks every backbone reuses: initializers, projectors, graphs, propagation.

Graphs are edge lists propagated with gathers and `jax.ops.segment_sum`, never dense
adjacency matrices: Baby's user-item graph has 26k nodes but only 240k directed edges.
"""

from typing import NamedTuple

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


class Graph(NamedTuple):
  """A weighted directed graph as edge arrays, sorted by receiver for fast segment sums."""
  senders: Array    # int32 [E]
  receivers: Array  # int32 [E], non-decreasing
  weights: Array    # float32 [E]


def propagate(graph: Graph, x: Array) -> Array:
  """One message-passing step: out[r] = sum_{(s, r)} w_sr * x[s]."""
  messages = x[graph.senders] * graph.weights[:, None]
  return jax.ops.segment_sum(messages, graph.receivers, num_segments=x.shape[0],
                             indices_are_sorted=True)


def sort_edges_by_receiver(senders: np.ndarray, receivers: np.ndarray,
                           weights: np.ndarray) -> Graph:
  order = np.lexsort((senders, receivers))
  return Graph(jnp.asarray(senders[order], jnp.int32), jnp.asarray(receivers[order], jnp.int32),
               jnp.asarray(weights[order], jnp.float32))


def symmetric_normalized_weights(senders, receivers, n_nodes: int, xp=np):
  """w_sr = 1 / sqrt(deg(s) deg(r)): the LightGCN normalization D^-1/2 A D^-1/2."""
  degree = xp.zeros((n_nodes,), xp.float32)
  if xp is np:
    degree = np.bincount(receivers, minlength=n_nodes).astype(np.float32)
  else:
    degree = jax.ops.segment_sum(jnp.ones_like(receivers, jnp.float32), receivers, n_nodes)
  inv_sqrt = xp.where(degree > 0, 1.0 / xp.sqrt(xp.maximum(degree, 1.0)), 0.0)
  return inv_sqrt[senders] * inv_sqrt[receivers]


def user_item_graph(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> Graph:
  """Symmetric-normalized bipartite graph over n_users + n_items nodes (items offset by n_users)."""
  users = np.asarray(users, np.int64)
  items = np.asarray(items, np.int64) + n_users
  senders = np.concatenate([users, items])
  receivers = np.concatenate([items, users])
  weights = symmetric_normalized_weights(senders, receivers, n_users + n_items)
  return sort_edges_by_receiver(senders, receivers, weights)


def mean_of_layers(graph: Graph, x: Array, n_layers: int) -> Array:
  """LightGCN's layer combination: mean of x, Ax, ..., A^K x (He et al. 2020, Eq. 4)."""
  total, h = x, x
  for _ in range(n_layers):
    h = propagate(graph, h)
    total = total + h
  return total / (n_layers + 1)


def bpr_loss(user_vecs: Array, pos_vecs: Array, neg_vecs: Array) -> Array:
  """Bayesian Personalized Ranking (paper Eq. 10), averaged over the batch."""
  margin = jnp.sum(user_vecs * (pos_vecs - neg_vecs), axis=-1)
  return jnp.mean(jax.nn.softplus(-margin))  # softplus(-x) = -log sigmoid(x), stable


def embedding_l2(*embeddings: Array) -> Array:
  """Squared L2 norm of the batch's ego embeddings, divided by the batch size (as MMRec)."""
  batch_size = embeddings[0].shape[0]
  return sum(jnp.sum(jnp.square(e)) for e in embeddings) / batch_size
