"""Full-ranking evaluation (MMRec protocol, paper Sec 4.1).

Every user is scored against every item; the user's train items are masked; the top
max(K) items are compared with the user's held-out items. Metrics are averaged over users
with at least one held-out item. One compiled program scores all users in batches.
"""

from typing import Dict, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np

from fettle_jax.sharding import DATA, MODEL
from fettle_jax.types import Array

METRICS = ("recall", "ndcg", "precision", "map")


# ------------------------------------------------------------------ interaction bit matrices
# [n_users, ceil(n_items / 32)] uint32 words (17 MB for Amazon Baby): a user's train items
# are masked out of a ranking, and a ranked item is checked against the held-out items,
# with one gather per user row.


def interaction_bitmask(pairs: np.ndarray, n_users: int, n_items: int) -> np.ndarray:
  """Packs (user, item) pairs into a [n_users, ceil(n_items / 32)] uint32 bit matrix."""
  words = np.zeros((n_users, (n_items + 31) // 32), np.uint32)
  users, items = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
  np.bitwise_or.at(words, (users, items >> 5), (np.uint32(1) << (items & 31).astype(np.uint32)))
  return words


def has_interaction(bitmask: Array, users: Array, items: Array) -> Array:
  """Elementwise test (users and items broadcast together) of whether a pair is in the matrix."""
  words = bitmask[users, items >> 5]
  return ((words >> (items & 31).astype(jnp.uint32)) & 1).astype(bool)


def unpack_rows(bitmask: Array, users: Array, n_items: int) -> Array:
  """bool [len(users), n_items]: the rows of the bit matrix for these users."""
  items = jnp.arange(n_items)
  words = bitmask[users][:, items >> 5]
  return ((words >> (items & 31).astype(jnp.uint32)) & 1).astype(bool)


class EvalData(NamedTuple):
  """Device arrays for evaluating one or more held-out splits in one ranking pass."""
  users: Array         # int32 [n_batches, batch]: users to rank, padded with user 0
  valid: Array         # bool [n_batches, batch]: False on padding slots
  train_bitmask: Array  # uint32 [n_users, words]: items masked out of each ranking
  heldout_bitmask: Array  # uint32 [n_splits, n_users, words]
  n_heldout: Array     # int32 [n_splits, n_users]


def build_eval_data(heldout_splits: Sequence[np.ndarray], train_bitmask: np.ndarray,
                    n_users: int, n_items: int, batch_size: int) -> EvalData:
  n_heldout = np.stack([np.bincount(s[:, 0], minlength=n_users) for s in heldout_splits])
  users = np.nonzero(n_heldout.sum(0) > 0)[0].astype(np.int32)
  n_batch = -(-len(users) // batch_size)
  # Padding slots rank user 0 again and get zero weight (static shapes: one compile).
  padded = np.zeros(n_batch * batch_size, np.int32)
  padded[: len(users)] = users
  valid = np.arange(n_batch * batch_size) < len(users)
  heldout = np.stack([interaction_bitmask(s, n_users, n_items) for s in heldout_splits])
  shape = (n_batch, batch_size)
  return EvalData(jnp.asarray(padded.reshape(shape)), jnp.asarray(valid.reshape(shape)),
                  jnp.asarray(train_bitmask),
                  jnp.asarray(heldout), jnp.asarray(n_heldout.astype(np.int32)))


def ranking_metrics(hits: Array, n_relevant: Array, ks: Sequence[int]) -> Dict[str, Array]:
  """Per-user metrics from hits [U, max_k] (is the j-th ranked item held out?).

  recall@K = hits@K / n_relevant; precision@K = hits@K / K;
  ndcg@K = sum_j hits_j / log2(j + 2) over the ideal DCG of min(n_relevant, K) hits;
  map@K = sum_j precision@(j+1) * hits_j / min(n_relevant, K)   (MMRec's definitions).
  """
  hits = hits.astype(jnp.float32)
  max_k = hits.shape[1]
  positions = jnp.arange(max_k, dtype=jnp.float32)
  discounts = 1.0 / jnp.log2(positions + 2.0)
  cum_hits = jnp.cumsum(hits, axis=1)
  dcg = jnp.cumsum(hits * discounts, axis=1)
  ideal = jnp.cumsum(discounts)
  ap = jnp.cumsum(cum_hits / (positions + 1.0) * hits, axis=1)
  n_rel = jnp.maximum(n_relevant, 1).astype(jnp.float32)
  out = {}
  for k in ks:
    capped = jnp.minimum(n_rel, k)
    out[f"recall@{k}"] = cum_hits[:, k - 1] / n_rel
    out[f"precision@{k}"] = cum_hits[:, k - 1] / k
    out[f"ndcg@{k}"] = dcg[:, k - 1] / ideal[capped.astype(jnp.int32) - 1]
    out[f"map@{k}"] = ap[:, k - 1] / capped
  return out


def two_stage_top_k(scores: Array, k: int, n_blocks: int) -> Array:
  """Indices of lax.top_k(scores, k) (ties to the lower index), computed block-wise over the
  last axis: each of n_blocks contiguous item blocks keeps its local top-k, then the
  n_blocks * k candidates, in block order, go through one more top-k.

  The layout that evaluation over item-sharded tables needs (no top_k or sort along a
  sharded axis): each block is what one device holds. Exact, ties included: a block keeps
  its lowest-index ties, and candidates sit in global index order within equal values, so
  the second top-k resolves ties across blocks as one top-k over all items would. The last
  block is padded with -inf slots after every real item, so they lose every tie, -inf
  scores of masked items included.
  """
  n_items = scores.shape[-1]
  block = -(-n_items // n_blocks)
  k_local = min(k, block)
  padded = jnp.pad(scores, [(0, 0)] * (scores.ndim - 1) + [(0, n_blocks * block - n_items)],
                   constant_values=-jnp.inf)
  blocks = padded.reshape(scores.shape[:-1] + (n_blocks, block))
  values, local = jax.lax.top_k(blocks, k_local)  # [..., n_blocks, k_local]
  index = local + block * jnp.arange(n_blocks)[:, None]
  flat_values = values.reshape(scores.shape[:-1] + (n_blocks * k_local,))
  flat_index = index.reshape(scores.shape[:-1] + (n_blocks * k_local,))
  _, chosen = jax.lax.top_k(flat_values, k)
  return jnp.take_along_axis(flat_index, chosen, axis=-1)


def top_items(user_emb: Array, item_emb: Array, users: Array, train_bitmask: Array,
              max_k: int) -> Array:
  """Indices [len(users), max_k] of each user's best-scored items, train items excluded.

  Ties go to the lower item index (lax.top_k is stable).
  """
  scores = user_emb[users] @ item_emb.T
  seen = unpack_rows(train_bitmask, users, item_emb.shape[0])
  scores = jnp.where(seen, -jnp.inf, scores)
  return jax.lax.top_k(scores, max_k)[1]


def top_items_sharded(mesh, user_emb: Array, item_emb: Array, users: Array,
                      train_bitmask: Array, max_k: int) -> Array:
  """top_items() with the items split over the mesh's 'model' axis and the users over
  'data': each device scores its block of items, masks its users' train items, keeps its
  local top-k; the blocks' candidates, gathered in block order, go through one more top-k
  (two_stage_top_k's layout, exact with ties). No top_k or sort along a sharded axis. The
  catalogue is padded to a multiple of the shard count with -inf slots after every item;
  len(users) must divide by the 'data' size."""
  n_items = item_emb.shape[0]
  n_blocks = mesh.shape[MODEL]
  block = -(-n_items // n_blocks)
  k_local = min(max_k, block)
  items = jnp.pad(item_emb, ((0, n_blocks * block - n_items), (0, 0)))
  items = jax.lax.with_sharding_constraint(items, NamedSharding(mesh, P(MODEL, None)))
  rows = jax.lax.with_sharding_constraint(user_emb[users], NamedSharding(mesh, P(DATA, None)))

  def local(rows, items, users, bitmask):
    ids = jax.lax.axis_index(MODEL) * block + jnp.arange(block)
    seen = has_interaction(bitmask, users[:, None], jnp.minimum(ids, n_items - 1)[None, :])
    scores = jnp.where(seen | (ids >= n_items), -jnp.inf, rows @ items.T)
    values, index = jax.lax.top_k(scores, k_local)
    values = jax.lax.all_gather(values, MODEL, axis=1, tiled=True)  # block order
    index = jax.lax.all_gather(ids[index], MODEL, axis=1, tiled=True)
    _, chosen = jax.lax.top_k(values, max_k)
    return jnp.take_along_axis(index, chosen, axis=1)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(DATA, None), P(MODEL, None), P(DATA), P()),
                       out_specs=P(DATA, None), check_vma=False)(rows, items, users,
                                                                 train_bitmask)


def evaluate_embeddings(user_emb: Array, item_emb: Array, data: EvalData,
                        ks: Sequence[int], mesh=None) -> Dict[str, Array]:
  """Mean metrics per split: {name: float32 [n_splits]}. Jit with `ks` static. With a
  `mesh` whose 'model' axis is > 1, items are ranked block-wise (`top_items_sharded`)."""
  max_k = max(ks)
  user_emb, item_emb = jnp.asarray(user_emb), jnp.asarray(item_emb)

  def batch_sums(args):
    users, valid = args
    if mesh is None:
      top = top_items(user_emb, item_emb, users, data.train_bitmask, max_k)
    else:
      top = top_items_sharded(mesh, user_emb, item_emb, users, data.train_bitmask, max_k)
    sums = {}
    for s in range(data.heldout_bitmask.shape[0]):
      hits = has_interaction(data.heldout_bitmask[s], users[:, None], top)
      n_rel = data.n_heldout[s, users]
      per_user = ranking_metrics(hits, n_rel, ks)
      weight = ((n_rel > 0) & valid).astype(jnp.float32)
      for name, values in per_user.items():
        sums.setdefault(name, []).append(jnp.sum(values * weight))
    return {name: jnp.stack(v) for name, v in sums.items()}

  per_batch = jax.lax.map(batch_sums, (data.users, data.valid))
  n_users_per_split = jnp.sum(data.n_heldout > 0, axis=1).astype(jnp.float32)
  return {name: jnp.sum(v, axis=0) / n_users_per_split for name, v in per_batch.items()}
