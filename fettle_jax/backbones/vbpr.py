"""VBPR (He & McAuley, AAAI'16): BPR-MF whose item factor is extended by projected content.

Score x_ui = <gamma_u, [gamma_i ; E f_i]> (their Eq. 2, without the bias terms, as in the MMRec
benchmark): gamma_i a free item ID factor, f_i the item's content features and E a learned
linear map. As in MMRec, f_i concatenates every content modality (here in sorted name order:
image, text) and E is a Linear layer with bias; the loss is BPR + reg_weight * L2 of the batch's
user and (full, ID + content) item representations.

Width: MMRec uses ID 64 + content 64 = 128-d items and 128-d users. The backbone contract
wants users, items and modality embeddings of one width, config.embedding_size, so the VBPR
configs set embedding_size = 128 and we split it in half: ID half, content half.
`modality_items` is {}: VBPR has no per-modality item embedding of full width, so an alignment
plug-in projects the raw features itself.

Differences from MMRec: the L2 term is the squared norm (VBPR's lambda ||Theta||^2, and this
repo's `losses.embedding_l2`) where MMRec's EmbLoss sums un-squared Frobenius norms, so
reg_weight values do not transfer one to one; every weight is Xavier-uniform (FETTLE Sec 4.1).
"""

import jax
import jax.numpy as jnp
import ml_collections

from fettle_jax import layers
from fettle_jax import losses
from fettle_jax.types import Batch, DataInfo, Representations
from fettle_jax.errors import ConfigError


def _half(config) -> int:
  size = config.embedding_size
  if size % 2:
    raise ConfigError(f"VBPR splits embedding_size into ID and content halves; got odd {size}")
  return size // 2


def default_config() -> ml_collections.ConfigDict:
  """`config.vbpr`."""
  return ml_collections.ConfigDict({
      # float: weight of the squared L2 on the batch's user / item reps; MMRec grids
      # {2, 1, 0.1, ..., 1e-5} for an un-squared norm, 1e-5 here as for BPR-MF (tune).
      "reg_weight": 1e-5,
  })


def build_graph(train_pairs, n_users, n_items, features, config):
  del train_pairs, n_users, n_items, config
  if not features:
    raise ConfigError("VBPR needs at least one content modality")
  return {}


def init(rng, data_info: DataInfo, config):
  user_rng, item_rng, proj_rng = jax.random.split(rng, 3)
  half = _half(config)
  content_dim = sum(data_info.feature_dims.values())
  return {"user_embedding": layers.xavier_uniform(user_rng, (data_info.n_users, 2 * half)),
          "item_embedding": layers.xavier_uniform(item_rng, (data_info.n_items, half)),
          "content_projector": layers.init_linear(proj_rng, content_dim, half)}


def project_content(projector: dict, features: dict):
  """E f_i with f_i the sorted modalities' features concatenated (MMRec's VBPR), computed as
  sum_m f_i^m E_m over E's row blocks: no concatenated copy of the features is kept."""
  content, offset = projector["bias"], 0
  for name in sorted(features):
    width = features[name].shape[1]
    content = content + features[name] @ projector["kernel"][offset:offset + width]
    offset += width
  return content


def represent(params, model_state, static, config) -> Representations:
  del model_state, config
  content = project_content(params["content_projector"], static.features)
  items = jnp.concatenate([params["item_embedding"], content], axis=1)
  return Representations(params["user_embedding"], items, {})


def apply(params, model_state, static, batch: Batch, rng, config):
  del rng
  reps = represent(params, model_state, static, config)
  return reps, losses.regularized_bpr_loss(reps.users, reps.items, batch, config.vbpr.reg_weight)
