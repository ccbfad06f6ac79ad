"""BM3-style bidirectional alignment, FETTLE's competitor (Sec 4.1; Zhou et al., WWW'23).

Pulls every pair of the batch's positive items' modality embeddings (ID, image, text, ...)
together by maximizing their cosine similarity, with gradients flowing both ways:
  L = weight * mean_{m<n} mean_{b in B} (1 - cos(i_b^m, i_b^n)).
The mean over B keeps repeated items (each pair of the batch counts, as BM3 does).
"""

import itertools
from typing import Dict, Tuple

import jax.numpy as jnp
import ml_collections

from fettle_jax.alignment.modalities import batch_modality_embeddings, modality_names
from fettle_jax.layers import init_feature_projectors
from fettle_jax.losses import cosine_distance
from fettle_jax.types import Array, Batch, DataInfo, Params, Representations


def default_config() -> ml_collections.ConfigDict:
  """BM3 alignment hyper-parameters (`config.bm3`); FETTLE's paper gives no values."""
  return ml_collections.ConfigDict({
      "weight": 0.1,  # float: loss weight; our default (BM3's terms are O(1), BPR is O(1))
      "use_backbone_modalities": True,  # bool: prefer reps.modality_items[m] over own projectors
  })


def cosine_alignment_loss(item_emb_by_modality: Array) -> Array:
  """mean over unordered modality pairs and rows of 1 - cos(i^m, i^n); [B, |M|, L] -> scalar."""
  n_modalities = item_emb_by_modality.shape[1]
  if n_modalities < 2:
    return jnp.zeros((), item_emb_by_modality.dtype)
  distances = [cosine_distance(item_emb_by_modality[:, m], item_emb_by_modality[:, n])
               for m, n in itertools.combinations(range(n_modalities), 2)]
  return jnp.mean(jnp.stack(distances))


def init(rng: Array, data_info: DataInfo, config) -> Params:
  return {"projectors": init_feature_projectors(rng, data_info.feature_dims, config.embedding_size)}


def loss(params: Params, reps: Representations, features: Dict[str, Array], batch: Batch,
         rng: Array, config) -> Tuple[Array, Dict[str, Array]]:
  del rng
  cfg = config.bm3
  names = modality_names(params["projectors"])
  embs = batch_modality_embeddings(params["projectors"], reps, features, batch.pos_items, names,
                                   cfg.use_backbone_modalities)
  alignment = cosine_alignment_loss(embs)
  return cfg.weight * alignment, {"bm3": alignment}
