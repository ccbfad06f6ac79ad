"""Training batches and exact uniform negative sampling, on device inside the compiled epoch."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fettle_jax.types import Array, Batch

# Binary-search steps when mapping a draw to the user's r-th unseen item: enough for
# users with up to 2^24 train items.
SEARCH_STEPS = 24


class SeenItems(NamedTuple):
  """Each user's sorted train items, in CSR form, for exact negative sampling.

  shifted[offsets[u] + j] = s_j - j where s_0 < s_1 < ... are u's items: the number of
  unseen items below s_j. It is non-decreasing within a user, so a binary search finds
  how many seen items precede the r-th unseen one.
  """
  offsets: Array  # int32 [n_users + 1]
  shifted: Array  # int32 [n_train]


def seen_items(pairs: np.ndarray, n_users: int) -> SeenItems:
  order = np.lexsort((pairs[:, 1], pairs[:, 0]))
  users, items = pairs[order, 0].astype(np.int64), pairs[order, 1].astype(np.int64)
  offsets = np.zeros(n_users + 1, np.int64)
  np.cumsum(np.bincount(users, minlength=n_users), out=offsets[1:])
  rank_in_user = np.arange(len(items)) - offsets[users]
  return SeenItems(jnp.asarray(offsets, jnp.int32), jnp.asarray(items - rank_in_user, jnp.int32))


def sample_negatives(rng: Array, seen: SeenItems, users: Array, n_items: int) -> Array:
  """Exactly uniform over the items each user has not interacted with in train.

  Draws r in [0, n_items - deg(u)) and returns the r-th unseen item: r plus the number of
  seen items s_j with s_j - j <= r (binary search in the user's CSR segment). No
  rejection, so no collision however dense a user is.
  """
  start, end = seen.offsets[users], seen.offsets[users + 1]
  n_unseen = n_items - (end - start)
  r = jnp.floor(jax.random.uniform(rng, users.shape) * n_unseen).astype(jnp.int32)
  r = jnp.minimum(r, n_unseen - 1)

  def search(_, bounds):
    lo, hi = bounds
    mid = (lo + hi) // 2
    active = lo < hi
    below = seen.shifted[jnp.where(active, mid, 0)] <= r
    return (jnp.where(active & below, mid + 1, lo), jnp.where(active & ~below, mid, hi))

  lo, _ = jax.lax.fori_loop(0, SEARCH_STEPS, search, (start, end))
  return r + (lo - start)


def num_batches(n_train: int, batch_size: int) -> int:
  return -(-n_train // batch_size)


def epoch_batches(rng: Array, train_pairs: Array, seen: SeenItems, n_items: int,
                  batch_size: int) -> Batch:
  """A shuffled epoch of BPR triples, stacked as [n_batches, batch_size] arrays.

  The last batch is filled up with interactions from the start of the shuffled order (wrapping
  around it as often as needed when there are fewer interactions than one batch) so every
  batch has the same static shape (one compiled step).
  """
  n_train = train_pairs.shape[0]
  n_batch = num_batches(n_train, batch_size)
  perm_rng, neg_rng = jax.random.split(rng)
  order = jax.random.permutation(perm_rng, n_train)
  order = order[jnp.arange(n_batch * batch_size) % n_train]
  pairs = train_pairs[order]
  users, pos = pairs[:, 0], pairs[:, 1]
  neg = sample_negatives(neg_rng, seen, users, n_items)
  shape = (n_batch, batch_size)
  return Batch(users.reshape(shape), pos.reshape(shape), neg.reshape(shape))
