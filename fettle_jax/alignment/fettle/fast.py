"""FETTLE's fast path (the default): the same values and gradients as `equations.py`,
the reference (tests/test_fettle_reference.py proves them equal, term by term, on every
branch below), computed with less work. The interpretation choices are the reference's.

Where it saves work, each exact:
- Item statistics live on a buffer of U = min(B, n_items) unique-item slots (a batch
  cannot hold more distinct items than the catalogue), found by a pass over the catalogue
  instead of a sort where the catalogue is small next to the batch (`unique_batch_items`).
- Every term runs on the smallest of a few static prefixes of that buffer that holds every
  valid slot (`alignment_terms`, `shapes.buckets`; sizes from the data, speed only), with
  the gradient of the weighted total (Eq. 11's alpha, beta) taken inside the chosen branch
  (`jax.custom_vjp`: reverse-mode only; the per-term values in `aux` are for reporting and
  refuse to be differentiated). Under `jax.vmap` the branch is chosen jointly
  (`joint_branch`), so a vmapped batch of settings still runs one branch.
- Eq. 2's average of u^T i^m over an item's pairs is (its mean user)^T i^m; ILA and DT
  share one set of aligned embeddings, only of the directions in use (`DirectionQueries`);
  ILA meets each pair's majority target keys once and its minority rows apart.
- The cluster terms (Eq. 7-9) keep codes as Sinkhorn's factors (`fast_clusters.py`).
"""

import itertools
from typing import Any, Dict, List, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp

from fettle_jax.alignment.fettle import equations, shapes
from fettle_jax.alignment.fettle.fast_clusters import (ClusterSide,
                                                       grouped_user_cluster_alignment_loss,
                                                       item_cluster_alignment_loss)
from fettle_jax.alignment.modalities import (all_item_modality_embeddings,
                                             batch_modality_embeddings, modality_names)
from fettle_jax.losses import l2_normalize, log_sum_exp_below, masked_mean
from fettle_jax.types import Array, Batch, Params, Representations

TERMS = equations.TERMS
# ILA's minority rows (at most U // 2) in this many chunks, all but the first run only when
# occupied (`item_level_alignment_loss`; 4 chunks of U // 8 were slower than 2).
_MINORITY_CHUNKS = 2
_MASKED_LOGIT = -1e30  # a key left out of a softmax: exp(-1e30 / T) == 0 in float32


class BatchItems(NamedTuple):
  """The batch's unique positive items in a fixed-size buffer of B slots (sorted by id)."""
  ids: Array          # int32 [B]; padding slots repeat the smallest id (safe to gather)
  inverse: Array      # int32 [B]; pair b -> its item's slot
  counts: Array       # int32 [B]; pairs per slot, 0 on padding
  valid: Array        # bool [B]; slot holds a real item


# Up to this many catalogue ids per batch pair, a pass over the catalogue beats sorting the
# batch (on XLA:CPU).
_CATALOGUE_PASS_MAX_IDS_PER_PAIR = 16


def unique_batch_items(batch_items: Array, n_items: int = None) -> BatchItems:
  """`jnp.unique(batch_items, size=min(B, n_items))` with inverse and counts (same values,
  same padding); ids must lie in [0, n_items)."""
  # A batch holds at most min(B, n_items) distinct items: a static bound that shrinks every
  # [U, U] ILA matrix when the catalogue is smaller than the batch.
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


# ------------------------------------------------------------------- Eq. 2: feedback


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


def bidirectional_off(threshold) -> bool:
  """Statically one-way: a negative config value. A traced theta (a grid sweeping it) keeps
  the reverse rows in the program and switches them per setting."""
  return isinstance(threshold, (int, float)) and threshold < 0


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
    forward = equations.aligned_embedding(ffn_params[equations.direction_name(names, m, n)],
                                          item_emb_by_modality[:, m])
    backward = equations.aligned_embedding(ffn_params[equations.direction_name(names, n, m)],
                                           item_emb_by_modality[:, n])
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
  every row. Each row reads its
  log-partition from the product that holds its own target. (Bidirectional reverse rows
  all target m, so their minority product is empty work.) The minority rows are taken in
  `_MINORITY_CHUNKS` static chunks, each after the first run only when rows reach it: in
  training the minority side soon holds a few percent of the rows, and its second half is
  skipped.
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
  u^T i is unbounded below in the loss, and maximizing it only inflates norms; the cosine
  tunes the *direction*, which is what Sec 3.2 motivates.
  """
  aligned = l2_normalize(directed.queries) if cosine else directed.queries
  preference = jnp.einsum("ul,rul->ru", mean_user_emb, aligned)
  mask = directed.active & valid[None, :]
  n_items = jnp.maximum(jnp.sum(valid.astype(aligned.dtype)), 1.0)
  return (-jnp.sum(jnp.where(mask, preference, 0.0))
          / (n_modalities * (n_modalities - 1) * n_items))


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
  directions = equations.alignment_directions(index.scores, index.valid, cfg.directions,
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
    # (fewer rows than pairs whenever the batch repeats an item).
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
  through f^{m->n} instead of two."""
  directed = None
  if "ila" in enabled or "dt" in enabled:
    directed = item_level_queries(inputs, index, layout, cfg)
  return {name: alignment_term(name, inputs, index, layout, cfg, directed) for name in enabled}


def bucket_prefix(inputs: TermInputs, index: TermIndex, bucket: shapes.Bucket):
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


def joint_branch(index: Array) -> Array:
  """The branch index itself; under `jax.vmap` the largest over the mapped batch, unbatched.

  A per-example branch index would turn `lax.switch` into a select that runs every branch;
  branches grow with the index, so the largest one holds every example's valid rows (the
  results are exact whichever branch holds them). Needs no axis name, so a vmap over
  settings (or anything else) gets one branch per step."""
  return _joint_branch(index)


@jax.custom_batching.custom_vmap
def _joint_branch(index):
  return index


@_joint_branch.def_vmap
def _joint_branch_vmap(axis_size, in_batched, index):
  del axis_size
  (batched,) = in_batched
  return (jnp.max(index, axis=0) if batched else index), False


def alignment_terms(inputs: TermInputs, index: TermIndex, layout: TermLayout, cfg,
                    weights: Dict[str, Any], hints=None) -> Tuple[Array, Dict[str, Array]]:
  """sum_t weights[t] L_t over the enabled terms, and every unweighted term L_t, on the
  smallest static prefix of the unique-item buffer that holds every valid slot.

  The buffer has U = min(B, n_items) slots, but a batch usually fills fewer (a batch
  repeats popular items), and ILA's [U, U] logits cost O(U^2). Valid slots
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

  Under `jax.vmap` (e.g. over settings) the branch is chosen jointly (`joint_branch`): the
  smallest size that holds every mapped example's valid slots. `hints`:
  `shapes.shape_hints(config)` (speed only).
  """
  zero = jnp.zeros((), inputs.embeddings.dtype)
  enabled = enabled_terms(len(layout.names), cfg)
  if not enabled:
    return zero, {name: zero for name in TERMS}
  weights = {name: jnp.asarray(weights[name], zero.dtype) for name in enabled}
  user_capacity = inputs.users.shape[0]
  hints = shapes.default_shape_hints() if hints is None else hints
  sizes = shapes.buckets(index.valid.shape[0], user_capacity,
                         *shapes.static_bucket_hints(hints, index.user_counts is not None))
  n_items = jnp.sum(index.valid.astype(jnp.int32))
  n_users = (user_capacity if index.user_counts is None
             else jnp.sum((index.user_counts > 0).astype(jnp.int32)))
  fits = ((n_items <= jnp.asarray([b.items for b in sizes]))
          & (n_users <= jnp.asarray([b.users for b in sizes])))
  # The first branch that holds every valid row (the last always does).
  chosen = joint_branch(jnp.argmax(fits))

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


def prepare_terms(params: Params, reps: Representations, features: Dict[str, Array],
                  batch: Batch, cfg, hints=None) -> Tuple[TermInputs, TermIndex, TermLayout]:
  """The batch's unique items and users, their embeddings and feedback (Eq. 2); `hints`
  as for `alignment_terms`."""
  hints = shapes.default_shape_hints() if hints is None else hints
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
  # has pairs) or in the first branch (its user bucket holds fewer rows than the batch has
  # pairs); else once per pair.
  users, user_of_pair, user_counts = user_emb_b, None, None
  first_branch = shapes.buckets(min(batch_size, n_items), min(batch_size, n_users),
                                *shapes.static_bucket_hints(hints, unique_users=True))[0]
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
  cfg, hints = config.fettle, shapes.shape_hints(config)
  weights = {"cla_ui": cfg.alpha, "cla_itv": cfg.alpha, "ila": cfg.beta, "dt": cfg.beta}
  return alignment_terms(*prepare_terms(params, reps, features, batch, cfg, hints), cfg,
                         weights, hints)
