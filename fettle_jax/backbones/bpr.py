"""BPR-MF (Rendle et al., UAI'09): matrix factorization trained with the BPR loss."""

from fettle_jax import blocks
from fettle_jax.types import Batch, DataInfo, Representations


def build_graph(train_pairs, n_users, n_items, features, config):
  del train_pairs, n_users, n_items, features, config
  return {}


def init(rng, data_info: DataInfo, config):
  return blocks.init_embedding_tables(rng, data_info.n_users, data_info.n_items,
                                      config.embedding_size)


def represent(params, graph, config) -> Representations:
  del graph, config
  return Representations(params["user_embedding"], params["item_embedding"], {})


def apply(params, graph, batch: Batch, rng, config):
  del rng
  reps = represent(params, graph, config)
  return reps, blocks.regularized_bpr_loss(reps.users, reps.items, batch, config.bpr.reg_weight)
