"""The fast path's cluster-level terms: Sinkhorn codes (Eq. 7), L_ITV^CLA (Eq. 8) and
L_UI^CLA (Eq. 9), equal to `equations.py`'s (tests/test_fettle_reference.py).

What makes them fast, each exact: the codes are kept as Eq. 7's factors diag(r) K diag(s)
(`Codes`), so Sinkhorn's rounds are matrix-vector products and a target is formed as an
[n, P] array only where that is cheaper; the softmax's log-partition and the cross-entropy
have custom VJPs that read the [n, P] exps once more instead of writing new [n, P] arrays;
the prediction's exps give Sinkhorn's kernel where lambda_c / eps is a small integer; and
L_UI^CLA meets the codebook once per distinct user or item, weighting Sinkhorn by counts.
"""

from typing import Any, NamedTuple, Tuple

import jax
import jax.numpy as jnp

from fettle_jax.losses import l2_normalize, masked_mean
from fettle_jax.types import Array


class Codes(NamedTuple):
  """Sinkhorn codes (Eq. 7) in the form Eq. 7 writes them, diag(r) K diag(s): q_ip =
  row_i K_ip column_p. Consumers that need only each code's sum and q C^T
  (`code_mixture`) take them from the factors, so the [n, P] product is formed only where
  a dense target is cheaper (L_ITV^CLA on small arrays, `dense`): for L_UI^CLA's unique
  rows it saves the [B, P] gathers and sums of partner codes, for large arrays one [n, P]
  write and read per code set."""
  row: Array     # [n]
  kernel: Array  # [n, P] K = exp((s - 1) / eps)
  column: Array  # [P]

  def dense(self) -> Array:
    return self.row[:, None] * self.kernel * self.column[None, :]


def sinkhorn_scalings(scores: Array, n_iterations: int, epsilon: float,
                      sample_mask: Array = None, kernel: Array = None) -> Codes:
  """Codes q (Eq. 7), SwAV's Sinkhorn-Knopp, of [n, P] scores, as `Codes`.

  Q = exp(scores / eps)^T normalized to total mass 1, then N rounds of: prototypes (rows)
  sum to 1/P, samples (columns) sum to 1/n_valid; returned as (Q n_valid)^T, so each
  valid sample's code sums to 1. Masked samples get zero mass and are left out of every
  marginal (n_valid counts only real samples). Callers stop gradients (codes are targets).

  `sample_mask` may also hold counts: a row with count c stands for c identical samples
  (a batch's repeated user or item), which is exactly Sinkhorn over the repeated rows
  (identical rows get identical scalings), with n_valid = the sum of the counts.

  Eq. 7's form diag(r) K diag(s) is kept literally: the loop updates only the scaling
  vectors (two matrix-vector products per round, no [n, P] writes). Scores are cosines in
  [-1, 1] (larger values are clipped to 1): shifting them by the bound 1 is a scalar
  rescaling of K (undone exactly by the normalizations) that keeps every exp in
  [exp(-2 / eps), 1], far above float32 underflow for eps >= 0.03, and needs no pass over
  [n, P] to find the max. The tiny floors only guard the degenerate case.
  `kernel`: that K (bounded_exp(scores, epsilon)) where the caller already has it.
  """
  n_samples, _ = scores.shape
  if sample_mask is None:
    sample_mask = jnp.ones((n_samples,), bool)
  weight = sample_mask.astype(scores.dtype)
  n_prototypes = scores.shape[1]
  n_valid = jnp.maximum(jnp.sum(weight), 1.0)
  tiny = jnp.finfo(scores.dtype).tiny
  if kernel is None:
    kernel = bounded_exp(scores, epsilon)  # K, [n, P]

  def normalize_round(_, scalings):
    r, _ = scalings
    s = 1.0 / (jnp.maximum(r @ kernel, tiny) * n_prototypes)  # prototype marginals 1/P
    r = weight / (jnp.maximum(kernel @ s, tiny) * n_valid)   # sample marginals 1/n_valid
    return r, s

  r, s = jax.lax.fori_loop(0, n_iterations, normalize_round,
                           (weight, jnp.ones((n_prototypes,), scores.dtype)))
  if n_iterations == 0:  # no round has scaled the mass: Q / sum(Q), where SwAV starts
    r = r / jnp.maximum(jnp.sum(r * (kernel @ s)), tiny)
  per_sample = jnp.where(weight > 0, r * n_valid / jnp.maximum(weight, tiny), 0.0)
  return Codes(per_sample, kernel, s)


def sinkhorn_knopp(scores: Array, n_iterations: int, epsilon: float,
                   sample_mask: Array = None) -> Array:
  """Codes q (Eq. 7) as an [n, P] array (`sinkhorn_scalings`, formed)."""
  return sinkhorn_scalings(scores, n_iterations, epsilon, sample_mask).dense()


def prototype_scores(embeddings: Array, codebook: Array) -> Array:
  """Cosine of each embedding with each prototype column c_p: [..., L] x [L, P] -> [..., P]."""
  return l2_normalize(embeddings) @ l2_normalize(codebook, axis=0)


def cluster_codes(scores: Array, sample_mask: Array, n_iterations: int,
                  epsilon: float, kernel: Array = None) -> Codes:
  """Sinkhorn codes as fixed targets: no gradient flows into q (SwAV)."""
  if kernel is not None:
    kernel = jax.lax.stop_gradient(kernel)
  return sinkhorn_scalings(jax.lax.stop_gradient(scores), n_iterations, epsilon, sample_mask,
                           kernel)


class ClusterPrediction(NamedTuple):
  """SoftMax(x C / lambda_c) (Eq. 8-9) of unit rows x against unit prototype columns C,
  kept as x, C, 1 / lambda_c and the log-partition lse(x C / lambda_c): neither the logits
  nor log p is materialized as its own [n, P] array."""
  rows: Array                 # [n, L] unit rows x
  codebook: Array             # [L, P] unit columns C
  inverse_temperature: float  # 1 / lambda_c
  log_partition: Array        # [n]


def bounded_exp(scores: Array, temperature: float) -> Array:
  """exp((s - 1) / T) for cosines s <= 1 (larger values clipped): in [exp(-2 / T), 1], no
  max pass needed. Sinkhorn's kernel and the prediction's softmax share this form
  (`prediction_and_codes` computes it once for both).

  The clip is a guard against rounding (a cosine exceeds 1 by a few ulps at most), written
  so that its gradient is that of exp((s - 1) / T) everywhere: the backward pass then needs
  only the exps, not another read of the [n, P] cosines to locate the clipped entries."""
  overshoot = jax.lax.stop_gradient(jnp.maximum(scores - 1.0, 0.0))
  return jnp.exp((scores - 1.0 - overshoot) / temperature)


def cluster_prediction(rows: Array, codebook: Array, temperature: float,
                       exps: Array = None) -> ClusterPrediction:
  """log-partition lse(s / T) = 1 / T + log sum_p exp((s_p - 1) / T), s = rows @ codebook
  (unit rows and columns): one pass, no max. `exps`: bounded_exp(s, T) where the caller
  already has it."""
  if exps is None:
    exps = bounded_exp(rows @ codebook, temperature)
  log_partition = _log_partition(rows, codebook, jax.lax.stop_gradient(exps),
                                 jnp.asarray(1.0 / temperature, exps.dtype))
  return ClusterPrediction(rows, codebook, 1.0 / temperature, log_partition)


@jax.custom_vjp
def _log_partition(rows: Array, codebook: Array, exps: Array, inverse_temperature: Array):
  """1 / T + log sum_p exps for exps = bounded_exp(rows @ codebook, T), differentiated with
  respect to rows and codebook through the exps (the caller passes them stopped).

  Its gradient, softmax / T per row, meets the codebook in two products that read the exps
  themselves, with the per-row weight g / (Z T) moved outside: d rows = diag(w) E C^T,
  d C = (diag(w) x)^T E. Autodiff would first write the [n, P] array diag(w) E and then
  read it twice (one [n, P] write fewer per prediction)."""
  return inverse_temperature + jnp.log(jnp.sum(exps, axis=-1))


def _log_partition_fwd(rows, codebook, exps, inverse_temperature):
  partition = jnp.sum(exps, axis=-1)
  return (inverse_temperature + jnp.log(partition),
          (rows, codebook, exps, partition, inverse_temperature))


def _log_partition_bwd(residuals, cotangent):
  rows, codebook, exps, partition, inverse_temperature = residuals
  weight = cotangent * inverse_temperature / partition  # [n]
  return (weight[:, None] * (exps @ codebook.T), (rows * weight[:, None]).T @ exps, None,
          None)


_log_partition.defvjp(_log_partition_fwd, _log_partition_bwd)


def _small_integer_ratio(temperature, epsilon):
  """k = lambda_c / eps when it is an integer 1..4 (static config floats), else None."""
  if not all(isinstance(v, (int, float)) for v in (temperature, epsilon)):
    return None  # traced (a grid sweeping a temperature)
  ratio = temperature / epsilon
  power = round(ratio)
  return power if 1 <= power <= 4 and abs(ratio - power) < 1e-6 else None


def prediction_and_codes(rows: Array, codebook: Array, sample_mask: Array, temperature: float,
                         n_iterations: int, epsilon: float) -> Tuple[ClusterPrediction, Codes]:
  """SoftMax(s / lambda_c) (Eq. 8-9) and the Sinkhorn codes (Eq. 7) of the cosines
  s = rows @ codebook (unit rows, unit columns), from one exp pass where lambda_c / eps is
  an integer k <= 4: Sinkhorn's kernel exp((s - 1) / eps) = exp((s - 1) / lambda_c)^k,
  k - 1 multiplies instead of a second exp (k = 1: the paper's 0.05 / 0.05)."""
  scores = rows @ codebook
  exps = bounded_exp(scores, temperature)
  return (cluster_prediction(rows, codebook, temperature, exps),
          cluster_codes(scores, sample_mask, n_iterations, epsilon,
                        sinkhorn_kernel(exps, temperature, epsilon)))


def sinkhorn_kernel(exps: Array, temperature: float, epsilon: float) -> Any:
  """Sinkhorn's kernel exp((s - 1) / eps) from the prediction's exp((s - 1) / lambda_c) as
  its k-th power where lambda_c / eps is an integer k <= 4; else None (computed anew)."""
  power = _small_integer_ratio(temperature, epsilon)
  return None if power is None else jax.lax.integer_pow(exps, power)


def code_mixture(codes: Codes, codebook: Array) -> Array:
  """q C^T, [n, L]: each code's mix of the (unit) prototype vectors, from the factors as
  row * (K (C diag(column))^T): one [n, P] x [P, L] product reading K. The codes carry no
  gradient; the codebook does (q^T x, as through the [n, P] cross term)."""
  return codes.row[:, None] * (codes.kernel @ (codebook * codes.column[None, :]).T)


def code_mass(codes: Codes, sample_mask: Array, n_iterations: int) -> Array:
  """Each code's sum. Known without a pass over K after a Sinkhorn round: the last step
  scales every sample's row to sum 1 (Eq. 7's column constraint; 0 for masked samples)."""
  if n_iterations >= 1:
    return (sample_mask > 0).astype(codes.row.dtype)
  return codes.row * (codes.kernel @ codes.column)


def code_cross_entropy(target_mixture: Array, target_mass: Array,
                       prediction: ClusterPrediction) -> Array:
  """-q^T log p = lse(z) sum(q) - q^T z with z = x C / lambda_c, per row (the brackets of
  Eq. 8-9), for a target q given by its mixture q C^T (`code_mixture`, or a sum of them)
  and its sum: q^T (x C) = x . (q C^T), an [n, L] product instead of a pass over [n, P]."""
  return (prediction.log_partition * target_mass - prediction.inverse_temperature
          * jnp.sum(prediction.rows * target_mixture, axis=-1))


def dense_code_cross_entropy(rows: Array, codebook: Array, scores: Array, exps: Array,
                             target: Array, target_mass: Array, temperature) -> Array:
  """`code_cross_entropy` for a target given as an [n, P] array q (scores = rows @ codebook,
  exps = bounded_exp(scores, temperature)): lse(s / T) sum(q) - q^T s / T per row, with
  respect to rows and codebook only. Its gradient meets the codebook through one [n, P]
  array dS = (sum(q) softmax(s / T) - q) / T and two products (`_dense_cross_entropy`)."""
  stopped = jax.lax.stop_gradient
  return _dense_cross_entropy(rows, codebook, stopped(scores), stopped(exps), stopped(target),
                              stopped(target_mass), jnp.asarray(1.0 / temperature, exps.dtype))


@jax.custom_vjp
def _dense_cross_entropy(rows, codebook, scores, exps, target, target_mass, inverse_temperature):
  return _dense_cross_entropy_fwd(rows, codebook, scores, exps, target, target_mass,
                                  inverse_temperature)[0]


def _dense_cross_entropy_fwd(rows, codebook, scores, exps, target, target_mass,
                             inverse_temperature):
  partition = jnp.sum(exps, axis=-1)
  log_partition = inverse_temperature + jnp.log(partition)
  value = (log_partition * target_mass
           - inverse_temperature * jnp.sum(target * scores, axis=-1))
  return value, (rows, codebook, exps, partition, target, target_mass, inverse_temperature)


def _dense_cross_entropy_bwd(residuals, cotangent):
  rows, codebook, exps, partition, target, target_mass, inverse_temperature = residuals
  d_scores = (inverse_temperature * cotangent)[:, None] * (
      (target_mass / partition)[:, None] * exps - target)
  return (d_scores @ codebook.T, rows.T @ d_scores, None, None, None, None, None)


_dense_cross_entropy.defvjp(_dense_cross_entropy_fwd, _dense_cross_entropy_bwd)


# Up to this size of one modality's [U, P] cosines, L_ITV^CLA forms its targets as [U, P]
# arrays (fewer products: passes over cache-resident arrays are cheap); beyond it, as code
# mixtures (fewer passes over arrays that stream from memory).
_DENSE_TARGETS_MAX_BYTES = 8 << 20


def item_cluster_alignment_loss(item_emb_by_modality: Array, codebook: Array, valid: Array,
                                temperature: float, n_iterations: int,
                                epsilon: float, dense_targets: bool = None) -> Array:
  """L_ITV^CLA (Eq. 8): swapped code prediction across each item's modalities.

  item_emb_by_modality [U, |M|, L] for the batch's unique items, one shared codebook
  C^ITV [L, P]. Codes come from a separate Sinkhorn per modality over the valid items.
  Per item: sum over unordered pairs {m, n} of [CE(q^n, i^m) + CE(q^m, i^n)]; mean over
  valid items (1/|I|). CE is linear in the code, so the pairs regroup per predicting
  modality m as CE(sum_{n != m} q^n, i^m): |M| cross-entropies instead of |M|(|M|-1).
  (One product per modality: stacking them into one [|M| U, L] x [L, P] product and a
  vmapped Sinkhorn was 2x slower on XLA:CPU.) `dense_targets`: the targets as [U, P] arrays
  or as code mixtures (same values; None = by size, `_DENSE_TARGETS_MAX_BYTES`).
  """
  n_modalities = item_emb_by_modality.shape[1]
  if n_modalities < 2:
    return jnp.zeros((), item_emb_by_modality.dtype)
  unit_codebook = l2_normalize(codebook, axis=0)
  rows = [l2_normalize(item_emb_by_modality[:, m]) for m in range(n_modalities)]
  scores = [r @ unit_codebook for r in rows]
  exps = [bounded_exp(s, temperature) for s in scores]
  codes = [cluster_codes(s, valid, n_iterations, epsilon, sinkhorn_kernel(e, temperature, epsilon))
           for s, e in zip(scores, exps)]
  masses = [code_mass(c, valid, n_iterations) for c in codes]
  all_masses = sum(masses)
  if dense_targets is None:
    dense_targets = scores[0].size * scores[0].dtype.itemsize <= _DENSE_TARGETS_MAX_BYTES
  if dense_targets:
    # The modalities share their rows (the items), so the targets sum_{n != m} q^n are
    # plain [U, P] sums, formed where they are used.
    dense = [c.dense() for c in codes]
    all_codes = sum(dense)
    per_item = sum(dense_code_cross_entropy(
        rows[m], unit_codebook, scores[m], exps[m], all_codes - dense[m],
        all_masses - masses[m], temperature) for m in range(n_modalities))
  else:
    mixtures = [code_mixture(c, unit_codebook) for c in codes]
    all_mixtures = sum(mixtures)
    predictions = [cluster_prediction(r, unit_codebook, temperature, e)
                   for r, e in zip(rows, exps)]
    per_item = sum(code_cross_entropy(all_mixtures - mixtures[m], all_masses - masses[m],
                                      predictions[m]) for m in range(n_modalities))
  return masked_mean(per_item, valid)


def user_cluster_alignment_loss(user_emb_b: Array, id_item_emb_b: Array, codebook: Array,
                                temperature: float, n_iterations: int,
                                epsilon: float) -> Array:
  """L_UI^CLA (Eq. 9): -1/|B| sum_{(u,i) in B} [CE(q^i, u) + CE(q^u, i^ID)] with codebook C^UI."""
  pairs = ClusterSide(user_emb_b, None, None)
  return grouped_user_cluster_alignment_loss(pairs, pairs._replace(embeddings=id_item_emb_b),
                                             codebook, temperature, n_iterations, epsilon)


class ClusterSide(NamedTuple):
  """One side (users or items) of the batch's pairs in L_UI^CLA, as rows.

  of_pair None: row b is pair b. Otherwise rows are the side's unique ids (a batch's
  repeated user or item meets the codebook once) and pair b is row of_pair[b].
  """
  embeddings: Array  # [n_rows, L]
  of_pair: Any       # int32 [B] or None
  counts: Any        # int32 [n_rows] pairs per row (0 = padding), or None


def _at_pairs(row_values: Array, side: ClusterSide) -> Array:
  """Each pair's row of `row_values` ([n_rows, ...] -> [B, ...])."""
  return row_values if side.of_pair is None else row_values[side.of_pair]


def grouped_user_cluster_alignment_loss(users: ClusterSide, items: ClusterSide, codebook: Array,
                                        temperature: float, n_iterations: int,
                                        epsilon: float) -> Array:
  """L_UI^CLA (Eq. 9) with each side on pair rows or on its unique rows.

  On unique rows, Sinkhorn weighs a row by its number of pairs (= Sinkhorn over the
  repeated rows), and each pair's cross-entropy reads its rows' log-partitions, unit
  embeddings and code mixtures ([B] and [B, L] gathers: no [B, P] array is formed). Exact;
  cuts the [rows, P] work where the batch repeats users or items.
  """
  unit_codebook = l2_normalize(codebook, axis=0)

  def side_terms(side):
    counts = side.counts if side.counts is not None else jnp.ones(
        side.embeddings.shape[:1], jnp.int32)
    prediction, codes = prediction_and_codes(l2_normalize(side.embeddings), unit_codebook,
                                             counts, temperature, n_iterations, epsilon)
    pair_prediction = prediction._replace(rows=_at_pairs(prediction.rows, side),
                                          log_partition=_at_pairs(prediction.log_partition, side))
    return (pair_prediction, _at_pairs(code_mixture(codes, unit_codebook), side),
            _at_pairs(code_mass(codes, counts, n_iterations), side))

  user_prediction, user_mixture, user_mass = side_terms(users)
  item_prediction, item_mixture, item_mass = side_terms(items)
  n_pairs = user_mass.shape[0]
  return (jnp.sum(code_cross_entropy(item_mixture, item_mass, user_prediction))
          + jnp.sum(code_cross_entropy(user_mixture, user_mass, item_prediction))) / n_pairs
