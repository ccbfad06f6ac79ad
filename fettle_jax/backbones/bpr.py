"""BPR-MF (Rendle et al., UAI'09): matrix factorization trained with the BPR loss."""

import ml_collections

from fettle_jax import layers
from fettle_jax import losses
from fettle_jax.types import Batch, DataInfo, Representations


def default_config() -> ml_collections.ConfigDict:
  """`config.bpr`."""
  return ml_collections.ConfigDict({"reg_weight": 1e-5})  # float: L2 on batch embeddings


def build_graph(train_pairs, n_users, n_items, features, config):
  del train_pairs, n_users, n_items, features, config
  return {}


def init(rng, data_info: DataInfo, config):
  return layers.init_embedding_tables(rng, data_info.n_users, data_info.n_items,
                                      config.embedding_size)


def represent(params, model_state, static, config) -> Representations:
  del model_state, static, config
  return Representations(params["user_embedding"], params["item_embedding"], {})


def apply(params, model_state, static, batch: Batch, rng, config):
  del rng
  reps = represent(params, model_state, static, config)
  return reps, losses.regularized_bpr_loss(reps.users, reps.items, batch, config.bpr.reg_weight)
