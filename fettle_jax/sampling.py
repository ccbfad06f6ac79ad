"""Training batches and uniform negative sampling, entirely on device.

Who-interacted-with-what is a bit matrix [n_users, ceil(n_items / 32)] of uint32 words:
17 MB for Amazon Baby, one gather per membership test, and the same matrix masks seen
items during evaluation.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fettle_jax.types import Array, Batch

# Rejection rounds for negatives: a uniform draw hits one of the user's own items with
# probability deg(u) / n_items (~0.1% on Baby), so 8 rounds leave ~1e-24 collisions.
NEGATIVE_SAMPLING_ROUNDS = 8


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


def sample_negatives(rng: Array, bitmask: Array, users: Array, n_items: int) -> Array:
  """Uniform items each user has not interacted with in train (rejection sampling)."""
  def redraw(k, items):
    fresh = jax.random.randint(jax.random.fold_in(rng, k + 1), users.shape, 0, n_items)
    return jnp.where(has_interaction(bitmask, users, items), fresh, items)
  first = jax.random.randint(jax.random.fold_in(rng, 0), users.shape, 0, n_items)
  return jax.lax.fori_loop(0, NEGATIVE_SAMPLING_ROUNDS, redraw, first)


def num_batches(n_train: int, batch_size: int) -> int:
  return -(-n_train // batch_size)


def epoch_batches(rng: Array, train_pairs: Array, bitmask: Array, n_items: int,
                  batch_size: int) -> Batch:
  """A shuffled epoch of BPR triples, stacked as [n_batches, batch_size] arrays.

  The last batch is filled up with interactions from the start of the shuffled order so
  every batch has the same static shape (one compiled step); at most batch_size - 1
  interactions are seen twice in an epoch.
  """
  n_train = train_pairs.shape[0]
  n_batch = num_batches(n_train, batch_size)
  perm_rng, neg_rng = jax.random.split(rng)
  order = jax.random.permutation(perm_rng, n_train)
  order = jnp.concatenate([order, order[: n_batch * batch_size - n_train]])
  pairs = train_pairs[order]
  users, pos = pairs[:, 0], pairs[:, 1]
  neg = sample_negatives(neg_rng, bitmask, users, n_items)
  shape = (n_batch, batch_size)
  return Batch(users.reshape(shape), pos.reshape(shape), neg.reshape(shape))
