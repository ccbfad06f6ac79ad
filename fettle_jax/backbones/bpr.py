"""BPR-MF (Rendle et al., UAI'09): matrix factorization trained with the BPR loss."""

import jax

from fettle_jax import blocks
from fettle_jax.types import Batch, DataInfo, Representations


def build_graph(train_pairs, n_users, n_items, features, config):
  del train_pairs, n_users, n_items, features, config
  return {}


def init(rng, data_info: DataInfo, config):
  user_rng, item_rng = jax.random.split(rng)
  size = config.embedding_size
  return {"user_embedding": blocks.xavier_uniform(user_rng, (data_info.n_users, size)),
          "item_embedding": blocks.xavier_uniform(item_rng, (data_info.n_items, size))}


def represent(params, graph, config) -> Representations:
  del graph, config
  return Representations(params["user_embedding"], params["item_embedding"], {})


def apply(params, graph, batch: Batch, rng, config):
  del rng
  reps = represent(params, graph, config)
  u, pos, neg = reps.users[batch.users], reps.items[batch.pos_items], reps.items[batch.neg_items]
  loss = blocks.bpr_loss(u, pos, neg) + config.bpr.reg_weight * blocks.embedding_l2(u, pos, neg)
  return reps, loss
