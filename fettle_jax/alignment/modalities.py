"""The modality set M = {ID} + content modalities, and the items' embedding in each.

Shared by every alignment plug-in (FETTLE, BM3): a content modality's i^m comes from the
backbone when it has its own modality embeddings, else from the plug-in's projector of the
raw features (FETTLE Sec 3, "pre-processing the input").
"""

from typing import List, Sequence

import jax.numpy as jnp

from fettle_jax.layers import linear
from fettle_jax.types import Array, Representations, item_rows

ID_MODALITY = "id"


def modality_names(content_modalities: Sequence[str]) -> List[str]:
  """M = [ID] + sorted content modalities; the list index is the tie-break order of Eq. 5."""
  return [ID_MODALITY] + sorted(content_modalities)


def batch_modality_embeddings(projectors: dict, reps: Representations, features: dict,
                              item_ids: Array, names: Sequence[str],
                              use_backbone_modalities: bool) -> Array:
  """i^m for the given items and every m in `names`, stacked to [len(item_ids), |M|, L].

  ID is reps.items; a content modality comes from reps.modality_items[m] when the backbone
  provides it (and use_backbone_modalities), else from our projector of features[m].
  Gathering features before projecting keeps the cost at O(|ids| d_m L), not O(n_items d_m L).
  """
  per_modality = []
  for name in names:
    if name == ID_MODALITY:
      per_modality.append(reps.items[item_ids])
    elif use_backbone_modalities and name in reps.modality_items:
      per_modality.append(item_rows(reps.modality_items[name], item_ids))
    else:
      per_modality.append(linear(projectors[name], features[name][item_ids]))
  return jnp.stack(per_modality, axis=1)


def all_item_modality_embeddings(projectors: dict, reps: Representations, features: dict,
                                 names: Sequence[str], use_backbone_modalities: bool) -> Array:
  """i^m for all items, [n_items, |M|, L]."""
  return batch_modality_embeddings(projectors, reps, features, jnp.arange(reps.items.shape[0]),
                                   names, use_backbone_modalities)
