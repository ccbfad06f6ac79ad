"""Full-ranking evaluation (MMRec protocol, paper Sec 4.1).

Every user is scored against every item; the user's train items are masked; the top
max(K) items are compared with the user's held-out items. Metrics are averaged over users
with at least one held-out item. One compiled program scores all users in batches.

Memory is linear in the interactions: the train and held-out items are kept as sparse
(slot, item) pairs, never as [users, items] matrices. A batch's train pairs are scattered
into its [batch, items] block of scores as -inf before the top-k, and a ranked item is a
hit when it equals one of the batch's held-out pairs. Each split's pairs are stored once,
sorted by slot, in a flat int32 buffer padded by two windows (8 bytes per interaction plus
at most 2 x the largest batch's pairs); batch b reads the fixed-width window starting at its
first pair (static shapes, one compile, no host round trip per batch) and drops the
window's pairs that belong to later batches.
"""

from typing import Dict, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fettle_jax import sharding
from fettle_jax.sharding import DATA, MODEL
from fettle_jax.types import Array

METRICS = ("recall", "ndcg", "precision", "map")


# ------------------------------------------------------------------ sparse interaction rows
# A slot is a user's position in the padded evaluation order (batch b holds the slots
# b * batch .. (b + 1) * batch - 1); pairs are (slot, item), sorted by slot.


def pairs_by_slot(pairs: np.ndarray, slot_of_user: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(slots, items) int32 of the pairs whose user has a slot (slot_of_user >= 0), sorted by
  slot (stable: a user's items keep their order)."""
  slots = slot_of_user[pairs[:, 0]]
  keep = slots >= 0
  slots, items = slots[keep], pairs[keep, 1]
  order = np.argsort(slots, kind="stable")
  return slots[order].astype(np.int32), items[order].astype(np.int32)


def widest_batch(slots: np.ndarray, batch_size: int, n_batches: int) -> int:
  """The most pairs any one batch holds (at least 1: a zero-width window has no shape)."""
  return max(1, int(np.bincount(slots // batch_size, minlength=n_batches).max(initial=0)))


def windows(slots: np.ndarray, items: np.ndarray, width: int,
            n_windows: int) -> Tuple[np.ndarray, np.ndarray]:
  """The sorted pairs in [n_windows, width] buffers, padded with slot -1 (no batch's) and item
  0: a window of `width` pairs starting at any pair's position fits inside."""
  flat_slots = np.full(n_windows * width, -1, np.int32)
  flat_items = np.zeros(n_windows * width, np.int32)
  flat_slots[:len(slots)] = slots
  flat_items[:len(items)] = items
  return flat_slots.reshape(n_windows, width), flat_items.reshape(n_windows, width)


def n_windows_for(n_pairs: int, width: int) -> int:
  return -(-n_pairs // width) + 1


def batch_starts(slots: np.ndarray, batch_size: int, n_batches: int) -> np.ndarray:
  """int32 [n_batches]: the position of each batch's first pair in the sorted pairs."""
  return np.searchsorted(slots, np.arange(n_batches) * batch_size).astype(np.int32)


def batch_pairs(slots: Array, items: Array, start: Array, batch: Array,
                batch_size: int) -> Tuple[Array, Array]:
  """(rows, items) of one batch's pairs, rows in [0, batch_size); pairs of other batches
  (and padding) get row batch_size, which every scatter below drops."""
  width = slots.shape[-1]
  window = jax.lax.dynamic_slice(slots.reshape(-1), (start,), (width,))
  picked = jax.lax.dynamic_slice(items.reshape(-1), (start,), (width,))
  rows = window - batch * batch_size
  inside = (window >= 0) & (rows >= 0) & (rows < batch_size)
  return jnp.where(inside, rows, batch_size), picked


def seen_rows(indptr: np.ndarray, indices: np.ndarray, users: np.ndarray,
              width: int) -> Tuple[np.ndarray, np.ndarray]:
  """(rows, items) int32 [width]: the CSR rows of `users` as (position in users, item) pairs,
  padded with row len(users) (dropped). `width` must be at least their total count."""
  starts, counts = indptr[users], indptr[users + 1] - indptr[users]
  total = int(counts.sum())
  if total > width:
    raise ValueError(f"{total} pairs do not fit a width of {width}")
  rows = np.full(width, len(users), np.int32)
  items = np.zeros(width, np.int32)
  rows[:total] = np.repeat(np.arange(len(users), dtype=np.int32), counts)
  offsets = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
  items[:total] = indices[np.repeat(starts, counts) + offsets]
  return rows, items


def csr_of_pairs(pairs: np.ndarray, n_users: int) -> Tuple[np.ndarray, np.ndarray]:
  """(indptr [n_users + 1], items) of the distinct pairs, each user's items ascending."""
  n_cols = int(pairs[:, 1].max(initial=0)) + 1
  keys = np.sort(pairs[:, 0].astype(np.int64) * n_cols + pairs[:, 1])
  keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if len(keys) else keys
  users, items = keys // n_cols, keys % n_cols
  indptr = np.zeros(n_users + 1, np.int64)
  np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
  return indptr, items.astype(np.int32)


class EvalData(NamedTuple):
  """Device arrays for evaluating one or more held-out splits in one ranking pass."""
  users: Array          # int32 [n_batches, batch]: users to rank, padded with user 0
  valid: Array          # bool [n_batches, batch]: False on padding slots
  train_start: Array    # int32 [n_batches]: each batch's first train pair
  train_slots: Array    # int32 [n_windows, width]: train pairs' slots, sorted (pad -1)
  train_items: Array    # int32 [n_windows, width]: their items
  heldout_start: Array  # int32 [n_splits, n_batches]
  heldout_slots: Array  # int32 [n_splits, n_windows, width]
  heldout_items: Array  # int32 [n_splits, n_windows, width]
  n_heldout: Array      # int32 [n_splits, n_users]


def build_eval_data(heldout_splits: Sequence[np.ndarray], train_pairs: np.ndarray,
                    n_users: int, n_items: int, batch_size: int) -> EvalData:
  """EvalData for ranking every user with a held-out item in any split, `batch_size` at a
  time; `train_pairs` [n, 2] (user, item) are masked out of the rankings."""
  del n_items  # the sparse rows need no catalogue size
  n_heldout = np.stack([np.bincount(s[:, 0], minlength=n_users) for s in heldout_splits])
  users = np.nonzero(n_heldout.sum(0) > 0)[0].astype(np.int32)
  n_batch = max(1, -(-len(users) // batch_size))
  # Padding slots rank user 0 again and get zero weight (static shapes: one compile).
  padded = np.zeros(n_batch * batch_size, np.int32)
  padded[: len(users)] = users
  valid = np.arange(n_batch * batch_size) < len(users)
  slot_of_user = np.full(n_users, -1, np.int64)
  slot_of_user[users] = np.arange(len(users))

  train_slots, train_items = pairs_by_slot(np.asarray(train_pairs).reshape(-1, 2), slot_of_user)
  width = widest_batch(train_slots, batch_size, n_batch)
  train_windows = windows(train_slots, train_items, width,
                          n_windows_for(len(train_slots), width))
  held = [pairs_by_slot(s, slot_of_user) for s in heldout_splits]
  held_width = max(widest_batch(s, batch_size, n_batch) for s, _ in held)
  held_n_windows = max(n_windows_for(len(s), held_width) for s, _ in held)
  held_windows = [windows(s, i, held_width, held_n_windows) for s, i in held]
  shape = (n_batch, batch_size)
  return EvalData(
      jnp.asarray(padded.reshape(shape)), jnp.asarray(valid.reshape(shape)),
      jnp.asarray(batch_starts(train_slots, batch_size, n_batch)),
      jnp.asarray(train_windows[0]), jnp.asarray(train_windows[1]),
      jnp.asarray(np.stack([batch_starts(s, batch_size, n_batch) for s, _ in held])),
      jnp.asarray(np.stack([w[0] for w in held_windows])),
      jnp.asarray(np.stack([w[1] for w in held_windows])),
      jnp.asarray(n_heldout.astype(np.int32)))


def eval_data_bytes(data: EvalData) -> int:
  """Bytes of all EvalData arrays (host or device alike)."""
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in data)


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


def top_items(user_emb: Array, item_emb: Array, users: Array, seen_rows: Array,
              seen_items: Array, max_k: int) -> Array:
  """Indices [len(users), max_k] of each user's best-scored items, seen items excluded: the
  pairs (seen_rows[j], seen_items[j]) (row = position in `users`; rows >= len(users) are
  padding and dropped) are set to -inf before the top-k.

  Ties go to the lower item index (lax.top_k is stable).
  """
  scores = user_emb[users] @ item_emb.T
  scores = scores.at[seen_rows, seen_items].set(-jnp.inf, mode="drop")
  return jax.lax.top_k(scores, max_k)[1]


def top_items_sharded(mesh, user_emb: Array, item_emb: Array, users: Array, seen_rows: Array,
                      seen_items: Array, max_k: int) -> Array:
  """top_items() with the items split over the mesh's 'model' axis and the users over
  'data': each device scores its block of items, masks the seen pairs that fall in its
  block, keeps its local top-k; the blocks' candidates, gathered in block order, go through
  one more top-k (two_stage_top_k's layout, exact with ties). No top_k or sort along a
  sharded axis. The catalogue is padded to a multiple of the shard count with -inf slots
  after every item; len(users) must divide by the 'data' size."""
  n_items = item_emb.shape[0]
  n_blocks = mesh.shape[MODEL]
  block = -(-n_items // n_blocks)
  k_local = min(max_k, block)
  items = jnp.pad(item_emb, ((0, n_blocks * block - n_items), (0, 0)))

  def local(rows, items, seen_rows, seen_items):
    first_row = jax.lax.axis_index(DATA) * rows.shape[0]
    first_item = jax.lax.axis_index(MODEL) * block
    ids = first_item + jnp.arange(block)
    row, col = seen_rows - first_row, seen_items - first_item
    mine = (row >= 0) & (row < rows.shape[0]) & (col >= 0) & (col < block)
    scores = jnp.where(ids >= n_items, -jnp.inf, rows @ items.T)
    scores = scores.at[jnp.where(mine, row, rows.shape[0]), col].set(-jnp.inf, mode="drop")
    values, index = jax.lax.top_k(scores, k_local)
    values = jax.lax.all_gather(values, MODEL, axis=1, tiled=True)  # block order
    index = jax.lax.all_gather(ids[index], MODEL, axis=1, tiled=True)
    _, chosen = jax.lax.top_k(values, max_k)
    return jnp.take_along_axis(index, chosen, axis=1)

  return sharding.map_over_user_and_item_blocks(local, mesh, user_emb[users], items,
                                                seen_rows, seen_items)


def hits_of(top: Array, rows: Array, items: Array) -> Array:
  """bool [batch, max_k]: is top[u, j] one of the held-out pairs (rows, items)? Rows >=
  batch are padding (dropped); nnz x max_k comparisons, no [batch, items] matrix."""
  match = top[jnp.minimum(rows, top.shape[0] - 1)] == items[:, None]
  return jnp.zeros(top.shape, bool).at[rows].max(match, mode="drop")


def evaluate_embeddings(user_emb: Array, item_emb: Array, data: EvalData,
                        ks: Sequence[int], mesh=None) -> Dict[str, Array]:
  """Mean metrics per split: {name: float32 [n_splits]}. Jit with `ks` static. With a
  `mesh` whose 'model' axis is > 1, items are ranked block-wise (`top_items_sharded`)."""
  max_k = max(ks)
  user_emb, item_emb = jnp.asarray(user_emb), jnp.asarray(item_emb)
  n_batch, batch_size = data.users.shape

  def batch_sums(args):
    users, valid, b, train_start, heldout_start = args
    rows, seen = batch_pairs(data.train_slots, data.train_items, train_start, b, batch_size)
    if mesh is None:
      top = top_items(user_emb, item_emb, users, rows, seen, max_k)
    else:
      top = top_items_sharded(mesh, user_emb, item_emb, users, rows, seen, max_k)
    sums = {}
    for s in range(data.heldout_slots.shape[0]):
      rows, held = batch_pairs(data.heldout_slots[s], data.heldout_items[s], heldout_start[s],
                               b, batch_size)
      hits = hits_of(top, rows, held)
      n_rel = data.n_heldout[s, users]
      per_user = ranking_metrics(hits, n_rel, ks)
      weight = ((n_rel > 0) & valid).astype(jnp.float32)
      for name, values in per_user.items():
        sums.setdefault(name, []).append(jnp.sum(values * weight))
    return {name: jnp.stack(v) for name, v in sums.items()}

  per_batch = jax.lax.map(batch_sums, (data.users, data.valid, jnp.arange(n_batch),
                                       data.train_start, data.heldout_start.T))
  n_users_per_split = jnp.sum(data.n_heldout > 0, axis=1).astype(jnp.float32)
  return {name: jnp.sum(v, axis=0) / n_users_per_split for name, v in per_batch.items()}
