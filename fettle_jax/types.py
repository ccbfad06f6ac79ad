"""Data types shared by backbones, alignment losses and the training loop."""

from typing import Any, Dict, NamedTuple

import jax

Array = jax.Array
Params = Any  # a pytree of arrays


class DataInfo(NamedTuple):
  """Static facts about a data set that models need to build their parameters."""
  n_users: int
  n_items: int
  feature_dims: Dict[str, int]  # content modality name -> input feature width


class Batch(NamedTuple):
  """One BPR training batch: B (user, positive item, negative item) triples."""
  users: Array      # int32 [B]
  pos_items: Array  # int32 [B]
  neg_items: Array  # int32 [B]


class Representations(NamedTuple):
  """What a backbone exposes to the alignment plug-in and to evaluation (paper Sec 3).

  users: u, the backbone's final user representation, [n_users, L].
  items: i^ID, the backbone's final item representation, [n_items, L].
  modality_items: the backbone's own modality-specific item embeddings i^m,
    name -> [n_items, L]; empty for collaborative-filtering backbones (FETTLE
    then owns projectors from the raw content features).
  """
  users: Array
  items: Array
  modality_items: Dict[str, Array]
