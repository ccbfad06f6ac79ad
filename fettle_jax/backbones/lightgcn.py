"""LightGCN (He et al., SIGIR'20): linear propagation on the normalized user-item graph.

e^(k+1) = D^-1/2 A D^-1/2 e^(k); final representation = mean of e^(0..K) (their Eq. 3-4).
The L2 penalty applies to the batch's ego (layer-0) embeddings, as in the paper.
"""

import jax.numpy as jnp
import ml_collections

from fettle_jax import graphs
from fettle_jax import layers
from fettle_jax import losses
from fettle_jax.types import Batch, DataInfo, Representations


def default_config() -> ml_collections.ConfigDict:
  """`config.lightgcn`."""
  return ml_collections.ConfigDict({
      "n_layers": 2,        # int: propagation layers K
      "reg_weight": 1e-4,   # float: L2 on the batch's ego embeddings
  })


def build_graph(train_pairs, n_users, n_items, features, config):
  del features, config
  return {"user_item": graphs.user_item_graph(train_pairs[:, 0], train_pairs[:, 1],
                                              n_users, n_items)}


def init(rng, data_info: DataInfo, config):
  return layers.init_embedding_tables(rng, data_info.n_users, data_info.n_items,
                                      config.embedding_size)


def layer_mean_representations(params, graph, n_layers: int) -> Representations:
  """Users and items as the mean of LightGCN layers 0..K on `graph` (their Eq. 4); shared
  with the backbones built on LightGCN (SGL, NCL, DirectAU's graph encoder)."""
  users, items = params["user_embedding"], params["item_embedding"]
  n_users = users.shape[0]
  final = graphs.mean_of_layers(graph, jnp.concatenate([users, items], axis=0), n_layers)
  return Representations(final[:n_users], final[n_users:], {})


def bpr_with_ego_l2(params, reps: Representations, batch: Batch, reg_weight: float):
  """BPR on the final representations + reg_weight * L2 of the batch's ego (layer-0) rows."""
  users, items = params["user_embedding"], params["item_embedding"]
  loss = losses.bpr_loss(reps.users[batch.users], reps.items[batch.pos_items],
                         reps.items[batch.neg_items])
  reg = losses.embedding_l2(users[batch.users], items[batch.pos_items], items[batch.neg_items])
  return loss + reg_weight * reg


def represent(params, model_state, static, config) -> Representations:
  del model_state
  return layer_mean_representations(params, static.graph["user_item"],
                                    config.lightgcn.n_layers)


def apply(params, model_state, static, batch: Batch, rng, config):
  del rng
  reps = represent(params, model_state, static, config)
  return reps, bpr_with_ego_l2(params, reps, batch, config.lightgcn.reg_weight)
