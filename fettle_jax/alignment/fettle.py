"""FETTLE: feedback-oriented multi-modal alignment (Li et al., SIGIR'24, Sec 3, Eq. 2-11).

Plug-in contract: `init(rng, data_info, config) -> params` and
`loss(params, reps, features, batch, rng, config) -> (weighted_loss, aux)`, where the
weighted loss is Eq. 11 without L^BPR. `config` is the top-level ConfigDict: we read
`config.embedding_size` (L) and `config.fettle.*` (see `default_config`).

Modalities are M = [ID] + sorted(content modalities of data_info.feature_dims); index 0 is
ID (`reps.items`). Everything is written for any |M|; with |M| < 2 the item-level terms
(ILA, DT, CLA_ITV) are 0 and FETTLE reduces to CLA_UI.

Choices where the paper is ambiguous (each also noted at the code):
- Batch statistics live on the batch's *unique* positive items, a fixed-size buffer of
  U = min(B, n_items) slots (`jnp.unique(..., size=U)`) with a validity mask; every "sum
  over items" is a mean over the valid unique items (|I| = their number), so loss scales
  do not grow with B. Every term runs on the smallest of a few static prefixes of that
  buffer that holds every valid slot (`alignment_terms`, exact; the first prefix is sized
  from the data by `fit_static_shapes`), with the gradient of the weighted total (Eq. 11's
  alpha, beta) taken inside the chosen branch (`jax.custom_vjp`: reverse-mode only; the
  per-term values in `aux` are for reporting and refuse to be differentiated).
- Ties in Eq. 5: on s_i^m == s_i^n the modality with the lower index in M is the lower
  one, so every unordered pair gets exactly one direction.
- Eq. 4 is printed without a minus sign; we minimize -log softmax (InfoNCE).
- Cosine similarity / L2 normalization everywhere an embedding meets a codebook (SwAV).
- DT (Eq. 6) has no stop-gradient: gradients reach users, modality embeddings and the
  residual projectors, as the equation is written. It scores cos(u, i^{m->n}) by default
  (`dt_similarity`): the printed u^T i^{m->n} is unbounded and diverged in our runs.
"""

import itertools
from typing import Any, Dict, List, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fettle_jax.alignment.modalities import (all_item_modality_embeddings,
                                             batch_modality_embeddings, modality_names)
from fettle_jax.layers import init_feature_projectors, init_linear, linear, xavier_uniform
from fettle_jax.losses import l2_normalize, log_sum_exp_below, masked_mean
from fettle_jax.types import Array, Batch, DataInfo, Params, Representations
from fettle_jax.errors import ConfigError

# ILA's minority rows (at most U // 2) in this many chunks, all but the first run only when
# occupied (`item_level_alignment_loss`; 4 chunks of U // 8 were slower than 2).
_MINORITY_CHUNKS = 2
_MASKED_LOGIT = -1e30  # a key left out of a softmax: exp(-1e30 / T) == 0 in float32


def default_config() -> ml_collections.ConfigDict:
  """FETTLE hyper-parameters (`config.fettle`); paper values from Sec 4.1 and 4.6."""
  return ml_collections.ConfigDict({
      "alpha": 1e-3,  # float: weight of the cluster-level terms L_UI + L_ITV (Eq. 11)
      "beta": 1e-3,  # float: weight of the item-level terms L_ILA + L_DT (Eq. 11)
      "temperature_feedback": 0.1,  # float: lambda_f of the ILA InfoNCE (Eq. 4); paper best 0.10
      "temperature_cluster": 0.05,  # float: lambda_c of the CLA softmax (Eq. 8-9); paper best 0.05
      "prototypes_item": 10240,  # int: P of the item codebook C^ITV (Eq. 7-8); paper 10240
      "prototypes_user": 20480,  # int: P of the user-item codebook C^UI (Eq. 9); paper 20480
      "sinkhorn_iterations": 3,  # int: N Sinkhorn-Knopp rounds (Eq. 7); paper 3
      "sinkhorn_epsilon": 0.05,  # float: tau, the Sinkhorn softmax temperature (Eq. 7); SwAV 0.05
      "directions": "pairwise",  # str: 'pairwise' (paper) or 'topmost' directions (Sec 3.2)
      "ila_negatives": "batch",  # str: ILA negatives: 'batch' unique items or 'all' items (Eq. 4)
      "bidirectional_threshold": -1.0,  # float: theta of Sec 4.4; <0 = off (paper sweeps 0..0.99)
      # str: Eq. 2's s_i^m from 'dot' = u^T i^m (as printed) or 'cosine' = cos(u, i^m); it
      # drives Eq. 5's directions and the bidirectional threshold theta alike.
      "feedback": "dot",
      "use_ila": True,  # bool: item-level alignment L_ILA (Table 3 ablation)
      "use_dt": True,  # bool: direction tuning L_DT (Table 3 ablation)
      # str: 'cosine' (default) scores DT with cos(u, i^{m->n}); 'dot' is Eq. 6 as printed
      # (u^T i^{m->n}), unbounded: it inflates embedding norms and diverged on ml100k.
      "dt_similarity": "cosine",
      "use_cla": True,  # bool: cluster-level alignment L_UI + L_ITV (Table 3 ablation)
      "projector_hidden": 64,  # int: hidden width of each residual FFN f^{m->n} (Eq. 3)
      "use_backbone_modalities": True,  # bool: prefer reps.modality_items[m] over own projectors
      # int: static sizes of the branch that every sampled batch's distinct items / users fit
      # (speed only; results are exact whatever they are); 0 = set from the data by
      # fit_static_shapes.
      "typical_batch_items": 0,
      "typical_batch_users": 0,
      # int: the same for a smaller first branch that most batches fit (the median batch);
      # 0 = from the data; a size >= the typical one adds no branch.
      "common_batch_items": 0,
      "common_batch_users": 0,
  })


# ----------------------------------------------------------------------------- helpers


def ordered_pairs(n_modalities: int) -> List[Tuple[int, int]]:
  """All |M|(|M|-1) ordered modality pairs (m, n), m != n."""
  return [(m, n) for m, n in itertools.permutations(range(n_modalities), 2)]


def direction_name(names: Sequence[str], m: int, n: int) -> str:
  return f"{names[m]}->{names[n]}"


def init_residual_ffn(rng: Array, dim: int, hidden: int) -> dict:
  """f^{m->n} of Eq. 3: Linear(L, H) -> ReLU -> Linear(H, L), Xavier-uniform weights."""
  r1, r2 = jax.random.split(rng)
  return {"hidden": init_linear(r1, dim, hidden), "output": init_linear(r2, hidden, dim)}


def residual_ffn(params: dict, x: Array) -> Array:
  """i^{m->n} = i^m + f^{m->n}(i^m) (Eq. 3): the residual says what m must gain to match n."""
  return x + linear(params["output"], jax.nn.relu(linear(params["hidden"], x)))


class BatchItems(NamedTuple):
  """The batch's unique positive items in a fixed-size buffer of B slots (sorted by id)."""
  ids: Array          # int32 [B]; padding slots repeat the smallest id (safe to gather)
  inverse: Array      # int32 [B]; pair b -> its item's slot
  counts: Array       # int32 [B]; pairs per slot, 0 on padding
  valid: Array        # bool [B]; slot holds a real item


# Up to this many catalogue ids per batch pair, a pass over the catalogue beats sorting the
# batch (XLA:CPU, 2,048 ids: sort 0.57-0.80 ms, count over 943-19,445 ids 0.12-0.32 ms).
_CATALOGUE_PASS_MAX_IDS_PER_PAIR = 16


def unique_batch_items(batch_items: Array, n_items: int = None) -> BatchItems:
  """`jnp.unique(batch_items, size=min(B, n_items))` with inverse and counts (same values,
  same padding); ids must lie in [0, n_items)."""
  # A batch holds at most min(B, n_items) distinct items: a static bound that shrinks every
  # [U, U] ILA matrix on catalogues smaller than the batch (ml100k: 1682 < 2048).
  batch_size = batch_items.shape[0]
  size = batch_size if n_items is None else min(batch_size, n_items)
  if n_items is None or n_items > _CATALOGUE_PASS_MAX_IDS_PER_PAIR * batch_size:
    ids, inverse, counts = jnp.unique(batch_items, size=size, return_inverse=True,
                                      return_counts=True)
    return BatchItems(ids, inverse.reshape(-1), counts, counts > 0)
  # Without a sort: count each catalogue id, number the present ones in id order.
  count_of_id = jax.ops.segment_sum(jnp.ones_like(batch_items), batch_items,
                                    num_segments=n_items)
  present = count_of_id > 0
  slot_of_id = jnp.cumsum(present.astype(jnp.int32)) - 1
  ids = jnp.nonzero(present, size=size)[0].astype(batch_items.dtype)
  valid = jnp.arange(size) <= slot_of_id[-1]
  ids = jnp.where(valid, ids, ids[0])
  return BatchItems(ids, slot_of_id[batch_items], jnp.where(valid, count_of_id[ids], 0), valid)


def segment_mean(values: Array, segment_ids: Array, counts: Array) -> Array:
  """Mean of `values` rows per segment; 0 for empty (padding) segments."""
  sums = jax.ops.segment_sum(values, segment_ids, num_segments=counts.shape[0])
  denom = jnp.maximum(counts, 1).astype(values.dtype)
  return sums / denom.reshape((-1,) + (1,) * (values.ndim - 1))


# ------------------------------------------------------------- Eq. 2, 5: feedback, directions


def estimated_feedback(user_emb_b: Array, item_emb_by_modality: Array,
                       items: BatchItems) -> Tuple[Array, Array]:
  """s_i^m = avg_{(u,i) in B} u^T i^m (Eq. 2), for the batch's unique items.

  user_emb_b: [B, L] users of the batch's pairs; item_emb_by_modality: [U, |M|, L] the
  unique items' modality embeddings (slots of `items`). The average of u^T i^m over an
  item's pairs is (the mean of its batch users)^T i^m, so each item meets each modality
  once. Returns scores [U, |M|] (0 on padding slots) and the mean users [U, L].
  """
  mean_users = segment_mean(user_emb_b, items.inverse, items.counts)
  return jnp.einsum("ul,uml->um", mean_users, item_emb_by_modality), mean_users


def _lower_than(scores: Array) -> Array:
  """below[i, m, n]: m ranks below n for item i; exact ties go to the lower index in M."""
  n_modalities = scores.shape[-1]
  s_m, s_n = scores[:, :, None], scores[:, None, :]
  lower_index = np.arange(n_modalities)[:, None] < np.arange(n_modalities)[None, :]
  return (s_m < s_n) | ((s_m == s_n) & lower_index)


def pairwise_directions(scores: Array, valid: Array) -> Array:
  """D^{m->n} = {i | s_i^m < s_i^n} (Eq. 5) as a mask [U, |M|, |M|]; one direction per pair."""
  return _lower_than(scores) & valid[:, None, None]


def topmost_directions(scores: Array, valid: Array) -> Array:
  """Sec 3.2's 'topmost' variant: every other modality -> the top-scored one (|M|-1 per item)."""
  below = _lower_than(scores)
  n_modalities = scores.shape[-1]
  is_top = jnp.sum(below, axis=1) == n_modalities - 1  # [U, |M|]: all others rank below n
  off_diagonal = ~np.eye(n_modalities, dtype=bool)
  return is_top[:, None, :] & off_diagonal & valid[:, None, None]


def add_bidirectional(directions: Array, scores: Array, threshold: float) -> Array:
  """Sec 4.4: for i in D^{m->n} with s_i^m > theta, also put i in D^{n->m}.

  The compared score is that of the direction's source m (the lower-scored modality), so a
  pair becomes bidirectional only when both its modalities exceed theta.
  """
  reverse = jnp.swapaxes(directions, 1, 2)  # reverse[i, a, b] = directions[i, b, a]
  # `threshold >= 0` is a Python bool for a config value, a traced one under a grid sweep
  # of theta (fettle_jax/grid.py), where a negative value must still mean one-way.
  return directions | (reverse & (scores[:, None, :] > threshold) & (threshold >= 0))


def bidirectional_off(threshold) -> bool:
  """Statically one-way: a negative config value. A traced theta (a grid sweeping it) keeps
  the reverse rows in the program and switches them per setting."""
  return isinstance(threshold, (int, float)) and threshold < 0


def alignment_directions(scores: Array, valid: Array, mode: str,
                         bidirectional_threshold: float) -> Array:
  if mode == "pairwise":
    directions = pairwise_directions(scores, valid)
  elif mode == "topmost":
    directions = topmost_directions(scores, valid)
  else:
    raise ConfigError(f"fettle.directions must be 'pairwise' or 'topmost', got {mode!r}")
  if not bidirectional_off(bidirectional_threshold):
    directions = add_bidirectional(directions, scores, bidirectional_threshold)
  return directions


# ------------------------------------------------------------------ Eq. 3, 4, 6: ILA and DT


class DirectionQueries(NamedTuple):
  """The aligned embeddings i^{m->n} that the item-level terms actually use, grouped by
  unordered modality pair: row r holds, for every item, one direction of pair (m_r, n_r).

  Under 'pairwise' (and 'topmost') an item has at most one direction per unordered pair,
  so one row per pair suffices; only bidirectional alignment (Sec 4.4) adds a second row
  per pair for the reverse direction. Computing just these (instead of all |M|(|M|-1)
  ordered directions and masking half away) halves ILA's [U, K] logits.
  """
  queries: Array     # [R, U, L] i^{m->n} of the chosen direction (Eq. 3)
  to_second: Array   # bool [R, U]: the direction is m_r -> n_r (target n_r), else n_r -> m_r
  active: Array      # bool [R, U]: the item has this direction
  pairs: Tuple[Tuple[int, int], ...]  # static (m_r, n_r), m_r < n_r


def direction_queries(ffn_params: dict, item_emb_by_modality: Array, directions: Array,
                      names: Sequence[str], both_ways: bool) -> DirectionQueries:
  """i^{m->n} = i^m + f^{m->n}(i^m) (Eq. 3) for the directions of `directions` [U, |M|, |M|].

  both_ways: a pair may hold both directions (bidirectional alignment); adds reverse rows.
  """
  queries, to_second, active, pairs = [], [], [], []
  for m, n in itertools.combinations(range(len(names)), 2):
    forward = residual_ffn(ffn_params[direction_name(names, m, n)], item_emb_by_modality[:, m])
    backward = residual_ffn(ffn_params[direction_name(names, n, m)], item_emb_by_modality[:, n])
    m_to_n, n_to_m = directions[:, m, n], directions[:, n, m]
    queries.append(jnp.where(m_to_n[:, None], forward, backward))
    to_second.append(m_to_n)
    active.append(m_to_n | n_to_m)
    pairs.append((m, n))
    if both_ways:  # the reverse n -> m of items that align both ways
      queries.append(backward)
      to_second.append(jnp.zeros_like(m_to_n))
      active.append(m_to_n & n_to_m)
      pairs.append((m, n))
  return DirectionQueries(jnp.stack(queries), jnp.stack(to_second), jnp.stack(active),
                          tuple(pairs))


def item_level_alignment_loss(directed: DirectionQueries, target_keys: Array,
                              positive_index: Array, key_mask: Array, valid: Array,
                              temperature: float) -> Array:
  """L^ILA (Eq. 4): InfoNCE from i^{m->n} to sg(i^n) over the negatives j in `target_keys`.

  target_keys [K, |M|, L] (K = the batch's unique items or all items) with positive_index
  [U] into K and key_mask [K] (None = all keys real). Eq. 4 drops the minus sign; we
  minimize -log softmax. Per item: average over its directions ("avg_{m->n}"); then the
  mean (not the printed sum) over the valid items.

  A row of pair (m, n) targets n or m per item, so its logits need two key sets. The
  keys of the pair's majority target meet every row ([U, L] x [L, K]); the rows of the
  minority target, at most U // 2 of them, are gathered and meet theirs ([U // 2, L] x
  [L, K]): 1.5 U K L multiply-adds per pair instead of the 2 U K L of both key sets for
  every row (timings: RESULTS.md, 2026-12-03 third session). Each row reads its
  log-partition from the product that holds its own target. (Bidirectional reverse rows
  all target m, so their minority product is empty work.) The minority rows are taken in
  `_MINORITY_CHUNKS` static chunks, each after the first run only when rows reach it: in
  training the minority side soon holds a few percent of the rows (RESULTS.md, 2026-12-03
  fourth and fifth sessions), and its second half is skipped.
  """
  keys = l2_normalize(jax.lax.stop_gradient(target_keys))  # sg(j^n): only the source moves
  # A masked key's logit is -1e30: its exp is exactly 0, as with -inf (the add fuses into
  # the exp pass).
  bias = 0.0 if key_mask is None else jnp.where(key_mask, 0.0, _MASKED_LOGIT).astype(keys.dtype)
  # 1/T rides on the [U, L] queries: the products yield the logits, with no division pass
  # over [U, K]; they are cosines / T <= 1/T, so the log-partition needs no max pass.
  inverse_temperature = 1.0 / temperature
  scaled = l2_normalize(directed.queries) * inverse_temperature  # [R, U, L]
  n_rows = scaled.shape[1]
  minority_capacity = max(n_rows // 2, 1)
  nce = []
  for r, (m, n) in enumerate(directed.pairs):
    to_second = directed.to_second[r]
    second_is_majority = 2 * jnp.sum(to_second.astype(jnp.int32)) >= n_rows
    majority_keys = jnp.where(second_is_majority, keys[:, n], keys[:, m])  # [K, L]
    minority_keys = jnp.where(second_is_majority, keys[:, m], keys[:, n])
    minority = to_second != second_is_majority  # [U]: the row targets the minority modality
    (minority_rows,) = jnp.nonzero(minority, size=minority_capacity, fill_value=0)
    slot = jnp.clip(jnp.cumsum(minority.astype(jnp.int32)) - 1, 0, minority_capacity - 1)
    majority_lse = log_sum_exp_below(scaled[r] @ majority_keys.T + bias, inverse_temperature)
    n_minority = jnp.sum(minority.astype(jnp.int32))
    chunk = -(-minority_capacity // _MINORITY_CHUNKS)

    def chunk_lse(rows):
      return lambda q, k: log_sum_exp_below(q[rows] @ k.T + bias, inverse_temperature)

    chunks = []
    for start in range(0, minority_capacity, chunk):
      rows = minority_rows[start:start + chunk]
      if start == 0:
        chunks.append(chunk_lse(rows)(scaled[r], minority_keys))
      else:
        chunks.append(jax.lax.cond(n_minority > start, chunk_lse(rows),
                                   lambda q, k, n=rows.shape[0]: jnp.zeros((n,), q.dtype),
                                   scaled[r], minority_keys))
    minority_lse = jnp.concatenate(chunks)
    log_partition = jnp.where(minority, minority_lse[slot], majority_lse)  # [U]
    positive_keys = jnp.where(to_second[:, None], keys[positive_index, n],
                              keys[positive_index, m])
    nce.append(log_partition - jnp.sum(scaled[r] * positive_keys, axis=-1))
  nce = jnp.stack(nce)  # [R, U]
  n_directions = jnp.sum(directed.active.astype(nce.dtype), axis=0)
  per_item = (jnp.sum(jnp.where(directed.active, nce, 0.0), axis=0)
              / jnp.maximum(n_directions, 1.0))
  return masked_mean(per_item, valid & (n_directions > 0))


def direction_tuning_loss(directed: DirectionQueries, mean_user_emb: Array, valid: Array,
                          n_modalities: int, cosine: bool = False) -> Array:
  """L^DT (Eq. 6) = -1/(|M|(|M|-1)|I|) sum_{m,n} sum_{i in D^{m->n}} avg_{(u,i) in B} u^T i^{m->n}.

  avg over the item's batch users of u^T i^{m->n} equals mean_user_emb_i^T i^{m->n};
  |I| = number of valid unique items. No stop-gradient, as in Eq. 6.
  cosine=True scores cos(u, i^{m->n}) instead (pass the mean of the L2-normalized users):
  u^T i is unbounded below in the loss, and maximizing it only inflates norms (on ml100k
  FREEDOM the literal form drove L^DT to -1.5e6 within 20 epochs); the cosine tunes the
  *direction*, which is what Sec 3.2 motivates.
  """
  aligned = l2_normalize(directed.queries) if cosine else directed.queries
  preference = jnp.einsum("ul,rul->ru", mean_user_emb, aligned)
  mask = directed.active & valid[None, :]
  n_items = jnp.maximum(jnp.sum(valid.astype(aligned.dtype)), 1.0)
  return (-jnp.sum(jnp.where(mask, preference, 0.0))
          / (n_modalities * (n_modalities - 1) * n_items))


# ---------------------------------------------------------------- Eq. 7-9: cluster alignment


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
  k - 1 multiplies instead of a second exp (k = 1: the paper's 0.05 / 0.05; k = 2: the
  ml100k setting's 0.1 / 0.05)."""
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
# arrays (fewer products: cache-resident passes are cheap); beyond it, as code mixtures
# (fewer passes over arrays that stream from memory). Timings: RESULTS.md, 2026-12-03
# fifth session (ml100k's [800, 256]: dense 0.5-1.0 ms faster per step; Baby's
# [1696, 10240]: mixtures ~100 ms faster per step).
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


# ------------------------------------------------------------ all terms on the unique items

TERMS = ("ila", "dt", "cla_itv", "cla_ui")


class TermInputs(NamedTuple):
  """What the terms differentiate; item rows are the batch's unique-item slots."""
  embeddings: Array       # [U, |M|, L] i^m
  mean_users: Array       # [U, L] mean of the item's batch users (normalized for cosine DT)
  users: Array            # [V, L] the batch's users: unique rows, or one row per pair
  ffn: dict               # the residual FFNs f^{m->n}
  codebook_item: Array    # C^ITV [L, P_ITV]
  codebook_user: Array    # C^UI [L, P_UI]


class TermIndex(NamedTuple):
  """What the terms only read. Valid item slots form a prefix (ids are sorted)."""
  scores: Array          # [U, |M|] s_i^m (Eq. 2)
  valid: Array           # bool [U]
  ids: Array             # int32 [U] item ids (ILA's positive index under 'all' negatives)
  item_counts: Array     # int32 [U] pairs per item slot
  item_of_pair: Array    # int32 [B] pair -> item slot
  user_counts: Any       # int32 [V] pairs per user row, or None (rows are the pairs)
  user_of_pair: Any      # int32 [B] pair -> user row, or None
  all_keys: Any          # [n_items, |M|, L] i^m of every item ('all' negatives), or None


class TermLayout(NamedTuple):
  """Static facts the terms branch on (hashable, known at trace time)."""
  names: Tuple[str, ...]   # M, index 0 = ID


def enabled_terms(n_modalities: int, cfg) -> List[str]:
  switches = {"ila": cfg.use_ila, "dt": cfg.use_dt, "cla_itv": cfg.use_cla,
              "cla_ui": cfg.use_cla}
  item_level = n_modalities >= 2  # ILA, DT and CLA_ITV pair modalities
  return [name for name in TERMS if switches[name] and (item_level or name == "cla_ui")]


def item_level_queries(inputs: TermInputs, index: TermIndex, layout: TermLayout,
                       cfg) -> DirectionQueries:
  """The directions (Eq. 5) and aligned embeddings i^{m->n} (Eq. 3) that ILA and DT share."""
  directions = alignment_directions(index.scores, index.valid, cfg.directions,
                                    cfg.bidirectional_threshold)
  return direction_queries(inputs.ffn, inputs.embeddings, directions, layout.names,
                           both_ways=not bidirectional_off(cfg.bidirectional_threshold))


def alignment_term(name: str, inputs: TermInputs, index: TermIndex, layout: TermLayout,
                   cfg, directed: DirectionQueries = None) -> Array:
  """One unweighted term: L^ILA, L^DT (Eq. 3-6), L_ITV^CLA (Eq. 7-8) or L_UI^CLA (Eq. 9).

  directed: `item_level_queries` when the caller shares them between ILA and DT.
  """
  names = layout.names
  if name == "cla_ui":
    users = ClusterSide(inputs.users, index.user_of_pair, index.user_counts)
    # The item side always on the batch's unique items (the buckets' rows): with code
    # mixtures a pair reads [B, L] rows, so even a batch of mostly distinct items gains
    # (Baby: 1,625 rows of 2,048 pairs, FREEDOM + FETTLE 660-670 vs 691-697 ms per step).
    items = ClusterSide(inputs.embeddings[:, 0], index.item_of_pair, index.item_counts)
    return grouped_user_cluster_alignment_loss(
        users, items, inputs.codebook_user, cfg.temperature_cluster, cfg.sinkhorn_iterations,
        cfg.sinkhorn_epsilon)
  if name == "cla_itv":
    return item_cluster_alignment_loss(inputs.embeddings, inputs.codebook_item, index.valid,
                                       cfg.temperature_cluster, cfg.sinkhorn_iterations,
                                       cfg.sinkhorn_epsilon)
  if directed is None:
    directed = item_level_queries(inputs, index, layout, cfg)
  if name == "dt":
    return direction_tuning_loss(directed, inputs.mean_users, index.valid, len(names),
                                 cfg.dt_similarity == "cosine")
  if index.all_keys is None:  # 'batch' negatives: the unique items themselves
    keys, positive, key_mask = (inputs.embeddings, jnp.arange(index.valid.shape[0]),
                                index.valid)
  else:  # 'all' items (Eq. 4 as written)
    keys, positive, key_mask = index.all_keys, index.ids, None
  return item_level_alignment_loss(directed, keys, positive, key_mask, index.valid,
                                   cfg.temperature_feedback)


def prefix_terms(inputs: TermInputs, index: TermIndex, layout: TermLayout, cfg,
                 enabled: Sequence[str]) -> Dict[str, Array]:
  """The enabled terms on one prefix. ILA and DT share one set of direction queries, so
  under one gradient their cotangents meet before the residual FFNs: one backward pass
  through f^{m->n} instead of two (ml100k FREEDOM shapes: ILA + DT 13.4-13.8 -> 11.5-12.0 ms)."""
  directed = None
  if "ila" in enabled or "dt" in enabled:
    directed = item_level_queries(inputs, index, layout, cfg)
  return {name: alignment_term(name, inputs, index, layout, cfg, directed) for name in enabled}


def bucket_sizes(capacity: int, n_buckets: int = 4, multiple: int = 64) -> List[int]:
  """Static prefix sizes ~k/n_buckets of capacity (k = 1..n_buckets), rounded up to `multiple`."""
  sizes = set()
  for k in range(1, n_buckets + 1):
    size = -(-capacity * k // n_buckets)  # ceil(capacity k / n_buckets)
    sizes.add(min(-(-size // multiple) * multiple, capacity))
  return sorted(sizes)


class Bucket(NamedTuple):
  """One static branch: the first `items` unique-item slots and `users` unique-user rows."""
  items: int
  users: int


def buckets(item_capacity: int, user_capacity: int, typical_items: int = 0,
            typical_users: int = 0, common_items: int = 0,
            common_users: int = 0) -> List[Bucket]:
  """The branches, smallest first; the last holds every slot (so every batch has one).

  Without hints: `bucket_sizes` of the item buffer, all user rows. With the distinct items
  / users that every sampled batch fits (typical) and that the median batch fits (common,
  `fit_static_shapes`), up to three branches: the common size, the typical size, the whole
  buffer. A batch's distinct count varies little (ml100k: 704-782 items of 1,682 slots,
  median 745; common 768, typical 800), so almost every step runs on ~its true size, and
  the rare larger batch pays a larger branch once rather than every run compiling the
  quarter sizes in between (each branch is a copy of every term and its gradient: ml100k
  FREEDOM+FETTLE's first epoch without a compilation cache, 4 branches 18.5-22.3 s, 2
  branches 10.1-11.6 s; 0 of 3,900 sampled ml100k batches exceed the typical branch).
  The common branch pays where the terms grow with the rows: ILA's [U, U] logits
  (ml100k: (768 / 800)^2 = 0.92 of the products).
  """
  if not 0 < typical_items < item_capacity:
    return [Bucket(size, user_capacity) for size in bucket_sizes(item_capacity)]

  def users(size):
    return min(size or user_capacity, user_capacity)

  typical = Bucket(typical_items, users(typical_users))
  common = Bucket(common_items, users(common_users or typical_users))
  ladder = [typical, Bucket(item_capacity, user_capacity)]
  if (0 < common.items <= typical.items and common.users <= typical.users
      and common != typical):
    ladder.insert(0, common)
  return ladder


def static_bucket_hints(cfg, unique_users: bool) -> Tuple[int, int, int, int]:
  """`buckets`' size hints from config.fettle; user sizes only where users are unique rows."""
  return (cfg.typical_batch_items, cfg.typical_batch_users if unique_users else 0,
          cfg.common_batch_items, cfg.common_batch_users if unique_users else 0)


def bucket_prefix(inputs: TermInputs, index: TermIndex, bucket: Bucket):
  """The first unique-item slots and unique-user rows; parameters and all_keys stay whole."""
  inputs = inputs._replace(embeddings=inputs.embeddings[:bucket.items],
                           mean_users=inputs.mean_users[:bucket.items])
  index = index._replace(scores=index.scores[:bucket.items], valid=index.valid[:bucket.items],
                         ids=index.ids[:bucket.items],
                         item_counts=index.item_counts[:bucket.items])
  if index.user_counts is not None:
    inputs = inputs._replace(users=inputs.users[:bucket.users])
    index = index._replace(user_counts=index.user_counts[:bucket.users])
  return inputs, index


def alignment_terms(inputs: TermInputs, index: TermIndex, layout: TermLayout, cfg,
                    weights: Dict[str, Any], grid_axis: str = "") -> Tuple[Array, Dict[str, Array]]:
  """sum_t weights[t] L_t over the enabled terms, and every unweighted term L_t, on the
  smallest static prefix of the unique-item buffer that holds every valid slot.

  The buffer has U = min(B, n_items) slots, but a batch usually fills far fewer (ml100k:
  ~745 of 1682; Baby: ~1460 of 2048), and ILA's [U, U] logits cost O(U^2). Valid slots
  are a prefix, padding slots are masked out of every term and no pair points at one, so
  the terms on a prefix holding all valid slots equal the full-buffer terms exactly;
  `lax.switch` runs only the chosen size's branch.

  Differentiating through a `lax.switch` makes every branch emit the residuals of every
  other branch (zero-filled [U, U] buffers of the largest size, written each step). So the
  gradient is taken *inside* the chosen branch, in the forward pass (`jax.custom_vjp`):
  the weighted total's gradient with respect to the inputs comes out of the switch, and
  the backward pass only scales it by the total's cotangent. One gradient of the weighted
  sum (not one per term) lets the terms share their backward work (`prefix_terms`). The
  weights get their exact gradient (the terms); the per-term values are for reporting:
  differentiating one of them raises (weight that term instead).

  Under fettle_jax/grid.py's vmap over settings (`grid_axis` names its axis), a per-setting
  branch index would turn the switch into a select that runs every branch; the branch is
  chosen jointly instead: the smallest size that holds every setting's valid slots.
  """
  zero = jnp.zeros((), inputs.embeddings.dtype)
  enabled = enabled_terms(len(layout.names), cfg)
  if not enabled:
    return zero, {name: zero for name in TERMS}
  weights = {name: jnp.asarray(weights[name], zero.dtype) for name in enabled}
  user_capacity = inputs.users.shape[0]
  sizes = buckets(index.valid.shape[0], user_capacity,
                  *static_bucket_hints(cfg, index.user_counts is not None))
  n_items = jnp.sum(index.valid.astype(jnp.int32))
  n_users = (user_capacity if index.user_counts is None
             else jnp.sum((index.user_counts > 0).astype(jnp.int32)))
  fits = ((n_items <= jnp.asarray([b.items for b in sizes]))
          & (n_users <= jnp.asarray([b.users for b in sizes])))
  chosen = jnp.argmax(fits)  # the first branch that holds every valid row (the last always does)
  if grid_axis:
    chosen = jax.lax.pmax(chosen, grid_axis)  # sizes grow with the index: fits all settings

  def run(branches, *args):
    if len(branches) == 1:
      return branches[0](*args)
    return jax.lax.switch(chosen, branches, *args)

  def weighted_terms(bucket, inputs, index, weights):
    values = prefix_terms(*bucket_prefix(inputs, index, bucket), layout, cfg, enabled)
    return sum(weights[name] * values[name] for name in enabled), values

  def values_branch(bucket):
    return lambda inputs, index, weights: weighted_terms(bucket, inputs, index, weights)

  def values_and_grad_branch(bucket):
    def values_and_grad(inputs, index, weights):
      # The prefix is taken inside: the gradient keeps the inputs' full shape.
      return jax.value_and_grad(lambda x: weighted_terms(bucket, x, index, weights),
                                has_aux=True)(inputs)
    return values_and_grad

  @jax.custom_vjp
  def terms(inputs, index, weights):
    return run([values_branch(b) for b in sizes], inputs, index, weights)

  def terms_fwd(inputs, index, weights):
    inputs, index, weights = jax.custom_derivatives.custom_vjp_primal_tree_values(
        (inputs, index, weights))
    (total, values), grad = run([values_and_grad_branch(b) for b in sizes], inputs, index,
                                weights)
    return (total, values), (grad, values)

  def terms_bwd(residuals, cotangents):
    grad, values = residuals
    total_cotangent, value_cotangents = cotangents
    differentiated = [name for name, c in value_cotangents.items()
                      if not isinstance(c, jax.custom_derivatives.SymbolicZero)]
    if differentiated:
      raise ValueError(f"FETTLE's per-term values carry no gradient (got one on "
                       f"{differentiated}): differentiate the weighted total, with weight on "
                       "the terms you want")
    if isinstance(total_cotangent, jax.custom_derivatives.SymbolicZero):
      return None, None, None
    return (jax.tree_util.tree_map(lambda g: total_cotangent * g, grad), None,
            {name: total_cotangent * values[name] for name in values})

  terms.defvjp(terms_fwd, terms_bwd, symbolic_zeros=True)
  total, values = terms(inputs, index, weights)
  return total, {name: values.get(name, zero) for name in TERMS}


# --------------------------------------------------------------------------- plug-in API


def init(rng: Array, data_info: DataInfo, config) -> Params:
  """Projectors (content features -> L), residual FFNs f^{m->n}, codebooks C^ITV and C^UI."""
  cfg, dim = config.fettle, config.embedding_size
  names = modality_names(data_info.feature_dims)
  r_proj, r_ffn, r_item, r_user = jax.random.split(rng, 4)
  pairs = ordered_pairs(len(names))
  ffn_rngs = jax.random.split(r_ffn, max(len(pairs), 1))
  return {
      "projectors": init_feature_projectors(r_proj, data_info.feature_dims, dim),
      "alignment_ffn": {direction_name(names, m, n): init_residual_ffn(r, dim, cfg.projector_hidden)
                        for (m, n), r in zip(pairs, ffn_rngs)},
      # Free parameters; columns are L2-normalized where used (cosines, Eq. 7-9).
      "codebook_item": xavier_uniform(r_item, (dim, cfg.prototypes_item)),
      "codebook_user": xavier_uniform(r_user, (dim, cfg.prototypes_user)),
  }


def fit_static_shapes(config, train_pairs: np.ndarray, n_users: int, n_items: int,
                      n_samples: int = 16, seed: int = 0):
  """Sets typical_batch_items / _users and common_batch_items / _users (when 0) from the
  training data, before compiling.

  Samples `n_samples` batches as an epoch draws them (config.batch_size pairs without
  replacement); typical: the largest distinct count plus 2%, common: the median plus 2%,
  each rounded up to 32. Only the speed depends on them: a batch with more distinct rows
  takes a larger, exact branch.
  """
  cfg = config.fettle
  rng = np.random.default_rng(seed)
  batch_size = min(config.batch_size, len(train_pairs))
  samples = [train_pairs[rng.choice(len(train_pairs), batch_size, replace=False)]
             for _ in range(n_samples)]
  for side, column, capacity in (("items", 1, n_items), ("users", 0, n_users)):
    distinct = [len(np.unique(sample[:, column])) for sample in samples]
    for field, count in ((f"typical_batch_{side}", max(distinct)),
                         (f"common_batch_{side}", np.median(distinct))):
      if cfg[field] == 0:
        cfg[field] = min(capacity, -(-int(np.ceil(count * 1.02)) // 32) * 32)
  return config


def check_config(cfg) -> None:
  """One-line errors for the string-valued switches (`config.fettle`); the train loop calls
  it before loading data, the loss again at trace time."""
  allowed = {"directions": ("pairwise", "topmost"), "dt_similarity": ("cosine", "dot"),
             "ila_negatives": ("batch", "all"), "feedback": ("dot", "cosine")}
  for field, values in allowed.items():
    if cfg[field] not in values:
      raise ConfigError(f"fettle.{field} must be one of {values}, got {cfg[field]!r}")


def prepare_terms(params: Params, reps: Representations, features: Dict[str, Array],
                  batch: Batch, cfg) -> Tuple[TermInputs, TermIndex, TermLayout]:
  """The batch's unique items and users, their embeddings and feedback (Eq. 2)."""
  names = modality_names(params["projectors"])
  n_users, n_items = reps.users.shape[0], reps.items.shape[0]
  batch_size = batch.pos_items.shape[0]
  items = unique_batch_items(batch.pos_items, n_items)
  # i^m of the batch's unique items only: a repeated item is gathered (and projected) once.
  item_embs = batch_modality_embeddings(params["projectors"], reps, features, items.ids, names,
                                        cfg.use_backbone_modalities)  # [U, |M|, L]
  user_emb_b = reps.users[batch.users]
  # Eq. 2; directions only compare these scores, so no gradient flows through them.
  scores, mean_users = estimated_feedback(user_emb_b, item_embs, items)
  if cfg.feedback == "cosine":
    scores, _ = estimated_feedback(l2_normalize(user_emb_b), l2_normalize(item_embs), items)
  scores = jax.lax.stop_gradient(scores)
  if cfg.dt_similarity == "cosine":
    mean_users = segment_mean(l2_normalize(user_emb_b), items.inverse, items.counts)
  all_keys = None
  if cfg.use_ila and cfg.ila_negatives == "all":
    all_keys = jax.lax.stop_gradient(all_item_modality_embeddings(
        params["projectors"], reps, features, names, cfg.use_backbone_modalities))
  # L_UI^CLA meets the codebook once per distinct item (the unique-item buffer above) and
  # once per distinct user where that saves rows: statically (fewer users than the batch
  # has pairs, e.g. ml100k) or in the first branch (its user bucket holds fewer rows than
  # the batch has pairs; Baby: 1,874-1,937 distinct users of 2,048 pairs, branches of
  # 1,952 / 1,984 rows); else once per pair.
  users, user_of_pair, user_counts = user_emb_b, None, None
  first_branch = buckets(min(batch_size, n_items), min(batch_size, n_users),
                         *static_bucket_hints(cfg, unique_users=True))[0]
  if n_users < batch_size or first_branch.users < batch_size:
    unique_users = unique_batch_items(batch.users, n_users)
    users = reps.users[unique_users.ids]
    user_of_pair, user_counts = unique_users.inverse, unique_users.counts
  return (TermInputs(item_embs, mean_users, users, params["alignment_ffn"],
                     params["codebook_item"], params["codebook_user"]),
          TermIndex(scores, items.valid, items.ids, items.counts, items.inverse, user_counts,
                    user_of_pair, all_keys),
          TermLayout(tuple(names)))


def loss(params: Params, reps: Representations, features: Dict[str, Array], batch: Batch,
         rng: Array, config) -> Tuple[Array, Dict[str, Array]]:
  """alpha (L_UI^CLA + L_ITV^CLA) + beta (L^ILA + L^DT): Eq. 11 without L^BPR."""
  del rng  # FETTLE is deterministic given the batch
  cfg = config.fettle
  check_config(cfg)
  weights = {"cla_ui": cfg.alpha, "cla_itv": cfg.alpha, "ila": cfg.beta, "dt": cfg.beta}
  return alignment_terms(*prepare_terms(params, reps, features, batch, cfg), cfg, weights,
                         config.get("grid_axis", ""))
