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


class ProjectedRows(NamedTuple):
  """Item embeddings W x_i + b of a linear projection of content features, formed only for
  the rows a consumer gathers (`take`): an alignment loss reading a batch's items then
  projects those rows, not the whole catalogue (Baby: 7,050 x 4096-d image rows per step).
  """
  features: Array   # [n_items, d]
  projector: dict   # {"kernel": [d, L], "bias": [L]}

  def take(self, ids: Array) -> Array:
    return self.features[ids] @ self.projector["kernel"] + self.projector["bias"]

  def materialize(self) -> Array:
    return self.features @ self.projector["kernel"] + self.projector["bias"]


def item_rows(table, ids: Array) -> Array:
  """Rows `ids` of an [n_items, L] array or of ProjectedRows."""
  return table.take(ids) if isinstance(table, ProjectedRows) else table[ids]


class Representations(NamedTuple):
  """What a backbone exposes to the alignment plug-in and to evaluation (paper Sec 3).

  users: u, the backbone's final user representation, [n_users, L].
  items: i^ID, the backbone's final item representation, [n_items, L].
  modality_items: the backbone's own modality-specific item embeddings i^m,
    name -> [n_items, L] array or ProjectedRows (read rows with `item_rows`); empty for
    collaborative-filtering backbones (FETTLE then owns projectors from the raw content
    features).
  """
  users: Array
  items: Array
  modality_items: Dict[str, Array]
