"""Losses shared by backbones and alignment plug-ins (BPR, L2, InfoNCE, alignment/uniformity).

Pure functions of arrays; each names the paper it comes from. FETTLE's item-level InfoNCE
(Eq. 4), BM3's cosine alignment and the coming contrastive backbones (SGL, NCL, SLMRec,
DirectAU) all build on these, so each formula is written once.
"""

import jax
import jax.numpy as jnp

from fettle_jax.types import Array

_NORM_EPS = 1e-12


def l2_normalize(x: Array, axis: int = -1) -> Array:
  """x / max(||x||, eps), like torch's F.normalize (finite gradient at 0)."""
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS ** 2))


def masked_mean(values: Array, mask: Array) -> Array:
  """Mean over masked-in entries; `where`, not a product, so inf/nan in padding cannot leak."""
  total = jnp.sum(jnp.where(mask, values, 0.0))
  return total / jnp.maximum(jnp.sum(mask.astype(values.dtype)), 1.0)


def bpr_loss(user_vecs: Array, pos_vecs: Array, neg_vecs: Array) -> Array:
  """Bayesian Personalized Ranking (Rendle et al. 2009; FETTLE Eq. 10), batch mean."""
  margin = jnp.sum(user_vecs * (pos_vecs - neg_vecs), axis=-1)
  return jnp.mean(jax.nn.softplus(-margin))  # softplus(-x) = -log sigmoid(x), stable


def embedding_l2(*embeddings: Array) -> Array:
  """Squared L2 norm of the batch's ego embeddings, divided by the batch size (as MMRec)."""
  batch_size = embeddings[0].shape[0]
  return sum(jnp.sum(jnp.square(e)) for e in embeddings) / batch_size


def regularized_bpr_loss(users: Array, items: Array, batch, reg_weight: float) -> Array:
  """BPR on the batch's (user, positive, negative) rows plus reg_weight * their L2."""
  u, pos, neg = users[batch.users], items[batch.pos_items], items[batch.neg_items]
  return bpr_loss(u, pos, neg) + reg_weight * embedding_l2(u, pos, neg)


def info_nce_from_logits(logits: Array, positive_logit: Array) -> Array:
  """-log softmax at the positive: logsumexp over the last axis minus the positive's logit."""
  return jax.nn.logsumexp(logits, axis=-1) - positive_logit


# exp(x - bound) stays a normal float32 for x down to bound - 80 (exp(-87) is the smallest).
_BOUNDED_LSE_MAX_RANGE = 80.0


def log_sum_exp_below(logits: Array, upper_bound) -> Array:
  """logsumexp over the last axis of logits known to be <= upper_bound (and >= -upper_bound
  where they count), e.g. cosines / T: bound + log sum exp(x - bound), one pass over the
  logits instead of a max pass and an exp pass. Falls back to `jax.nn.logsumexp` when the
  range 2 * bound could underflow exp, or when the bound is traced (a grid over T)."""
  if not isinstance(upper_bound, (int, float)) or 2.0 * upper_bound > _BOUNDED_LSE_MAX_RANGE:
    return jax.nn.logsumexp(logits, axis=-1)
  return upper_bound + jnp.log(jnp.sum(jnp.exp(logits - upper_bound), axis=-1))


def info_nce_loss(queries: Array, keys: Array, positive_index: Array, key_mask: Array,
                  temperature: float) -> Array:
  """InfoNCE (van den Oord et al. 2018) with cosine similarity, per query:
  -log softmax_j(cos(q, k_j) / T) at j = positive_index; key_mask (None = all) drops keys."""
  logits = l2_normalize(queries) @ l2_normalize(keys).T / temperature
  if key_mask is not None:
    logits = jnp.where(key_mask[None, :], logits, -jnp.inf)
  positive = jnp.take_along_axis(logits, positive_index[:, None], axis=1)[:, 0]
  return info_nce_from_logits(logits, positive)


def distinct_ids(ids: Array, n_rows: int):
  """The distinct ids of a batch, ascending, padded to the static length min(B, n_rows), and
  a mask of the real ones (jnp.unique pads with the smallest id, which then repeats)."""
  unique = jnp.unique(ids, size=min(ids.shape[0], n_rows))
  return unique, jnp.concatenate([jnp.ones((1,), bool), unique[1:] > unique[:-1]])


def distinct_rows_info_nce(queries: Array, keys: Array, ids: Array, temperature: float) -> Array:
  """Sum over the batch's distinct ids i of InfoNCE(queries[i], keys[i]) against the keys of
  the batch's other distinct ids (SGL Eq. 10; NCL Eq. 5-6): a [min(B, n)]^2 logit matrix,
  not [B, B], and an id repeated in the batch counts once."""
  unique, real = distinct_ids(ids, queries.shape[0])
  q, k = l2_normalize(queries[unique]), l2_normalize(keys[unique])
  # Padding keys masked by an additive -inf bias, the positive (diagonal) logit as a row-wise
  # dot: no [U, U] select and no gather from the logit matrix, whose backward would scatter
  # into a second [U, U] buffer (17% of the term's forward + backward on Baby's U = 2048).
  logits = q @ k.T / temperature + jnp.where(real, 0.0, -jnp.inf)[None, :]
  per_query = info_nce_from_logits(logits, jnp.sum(q * k, axis=-1) / temperature)
  return jnp.sum(jnp.where(real, per_query, 0.0))


def cosine_distance(a: Array, b: Array) -> Array:
  """1 - cos(a, b) per row (BM3's alignment, Zhou et al. WWW'23)."""
  return 1.0 - jnp.sum(l2_normalize(a) * l2_normalize(b), axis=-1)


def alignment_loss(users: Array, items: Array, alpha: float = 2.0) -> Array:
  """DirectAU's alignment (Wang et al. KDD'22, Eq. 4): mean ||u~ - i~||^alpha over the
  positive pairs' L2-normalized representations."""
  diff = l2_normalize(users) - l2_normalize(items)
  return jnp.mean(jnp.sum(diff * diff, axis=-1) ** (alpha / 2.0))


def uniformity_loss(x: Array, t: float = 2.0) -> Array:
  """DirectAU's uniformity (Wang & Isola ICML'20; Wang et al. KDD'22, Eq. 5): log of the mean
  Gaussian potential exp(-t ||x~_a - x~_b||^2) over the distinct row pairs a < b."""
  unit = l2_normalize(x)
  sq_dist = jnp.maximum(2.0 - 2.0 * unit @ unit.T, 0.0)  # ||a - b||^2 of unit vectors
  n = x.shape[0]
  upper = jnp.triu(jnp.ones((n, n), bool), k=1)
  potential = jnp.where(upper, -t * sq_dist, -jnp.inf)
  return jax.nn.logsumexp(potential) - jnp.log(n * (n - 1) / 2.0)


def weight_decay_penalty(params) -> Array:
  """||theta||^2 / 2 over every parameter: wd times it adds wd * theta to each gradient, as
  torch Adam's weight_decay does (DirectAU, SLMRec)."""
  return 0.5 * sum(jnp.sum(jnp.square(p)) for p in jax.tree_util.tree_leaves(params))
