"""FETTLE's equations (Li et al., SIGIR'24, Sec 3, Eq. 2-11) written plainly: the reference.

One function per equation or term, named after the paper's symbols. `fast.py` computes the
same values and gradients faster (tests/test_fettle_reference.py proves them equal); this
module is the one to read, and the one to change an equation in first.

Notation: B is the batch's (u, i) pairs; I the batch's unique positive items, kept in a
buffer of B slots with a mask `valid` (static shapes); M = [ID] + sorted content
modalities (index 0 = ID), any number of them; L the embedding size.

Where the paper is ambiguous (fast.py makes the same choices):
- Every "sum over items" is a mean over I (|I| = the number of unique positive items), so
  loss scales do not grow with the batch.
- Eq. 5's ties: on s_i^m == s_i^n the modality with the lower index in M is the lower one.
- Eq. 4 is printed without a minus sign; we minimize -log softmax (InfoNCE).
- Cosines wherever an embedding meets a key (Eq. 4) or a codebook (Eq. 7-9, as in SwAV).
- Eq. 6 scores cos(u, i^{m->n}) unless `dt_similarity = 'dot'` (u^T i^{m->n} as printed,
  unbounded below in the loss: maximizing it only inflates norms).
"""

import itertools
from typing import Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from fettle_jax.alignment.modalities import (all_item_modality_embeddings,
                                             batch_modality_embeddings, modality_names)
from fettle_jax.layers import linear
from fettle_jax.losses import l2_normalize, masked_mean
from fettle_jax.types import Array, Batch, Params, Representations

TERMS = ("ila", "dt", "cla_itv", "cla_ui")


def ordered_pairs(n_modalities: int) -> List[Tuple[int, int]]:
  """Every direction m -> n, m != n: |M|(|M|-1) of them."""
  return list(itertools.permutations(range(n_modalities), 2))


def direction_name(names, m: int, n: int) -> str:
  """The key of f^{m->n} in params['alignment_ffn']."""
  return f"{names[m]}->{names[n]}"


def unique_items(pos_items: Array) -> Tuple[Array, Array, Array, Array]:
  """I: the batch's unique positive items in B slots (sorted ids, then padding).

  Returns ids [B], inverse [B] (pair b -> its item's slot), counts [B] (pairs per slot) and
  valid [B] (the slot holds an item)."""
  ids, inverse, counts = jnp.unique(pos_items, size=pos_items.shape[0], return_inverse=True,
                                    return_counts=True)
  return ids, inverse.reshape(-1), counts, counts > 0


def average_over_item_pairs(per_pair: Array, inverse: Array, counts: Array) -> Array:
  """avg_{(u,i) in B}: each item slot's mean of a per-pair value (0 on padding slots)."""
  sums = jax.ops.segment_sum(per_pair, inverse, num_segments=counts.shape[0])
  return sums / jnp.maximum(counts, 1).astype(per_pair.dtype).reshape(
      (-1,) + (1,) * (per_pair.ndim - 1))


def estimated_feedback(users_b: Array, item_embs: Array, inverse: Array, counts: Array,
                       kind: str = "dot") -> Array:
  """Eq. 2: s_i^m = avg_{(u,i) in B} u^T i^m, [U, |M|] for item_embs [U, |M|, L].

  kind 'cosine' averages cos(u, i^m) instead of the raw product."""
  if kind == "cosine":
    users_b, item_embs = l2_normalize(users_b), l2_normalize(item_embs)
  per_pair = jnp.einsum("bl,bml->bm", users_b, item_embs[inverse])
  return average_over_item_pairs(per_pair, inverse, counts)


def aligned_embedding(ffn: dict, i_m: Array) -> Array:
  """Eq. 3: i^{m->n} = i^m + f^{m->n}(i^m), f a two-layer ReLU FFN (what m must gain)."""
  return i_m + linear(ffn["output"], jax.nn.relu(linear(ffn["hidden"], i_m)))


def alignment_directions(scores: Array, valid: Array, mode: str = "pairwise",
                         bidirectional_threshold=-1.0) -> Array:
  """Eq. 5: D^{m->n} = {i | s_i^m < s_i^n}, as a mask [U, |M|, |M|] (True: i in D^{m->n}).

  mode 'topmost' (Sec 3.2): every other modality -> the item's top-scored one. A threshold
  theta >= 0 (Sec 4.4) also puts i in D^{n->m} when the source's s_i^m > theta."""
  k = scores.shape[-1]
  s_m, s_n = scores[:, :, None], scores[:, None, :]
  lower_index = np.arange(k)[:, None] < np.arange(k)[None, :]
  lower = (s_m < s_n) | ((s_m == s_n) & lower_index)  # [i, m, n]: m ranks below n
  if mode == "pairwise":
    directions = lower
  else:
    is_top = jnp.sum(lower, axis=1) == k - 1  # [i, n]: every other modality ranks below n
    directions = is_top[:, None, :] & ~np.eye(k, dtype=bool)
  reverse = jnp.swapaxes(directions, 1, 2)  # reverse[i, n, m] = (i in D^{m->n})
  source_above = scores[:, None, :] > bidirectional_threshold  # [i, n, m]: s_i^m > theta
  directions = directions | (reverse & source_above & (bidirectional_threshold >= 0))
  return directions & valid[:, None, None]


def item_level_alignment_loss(aligned: Dict[Tuple[int, int], Array], keys: Array,
                              positive: Array, key_mask: Array, directions: Array,
                              valid: Array, temperature_feedback) -> Array:
  """Eq. 4: L^ILA = avg_i avg_{m->n} -log softmax_j(cos(i^{m->n}, sg(j^n)) / lambda_f)[i].

  aligned[(m, n)]: i^{m->n} [U, L]; keys [K, |M|, L] the negatives j (the batch's unique
  items or all items), positive [U] each item's own row in keys, key_mask [K] real keys."""
  unit_keys = l2_normalize(jax.lax.stop_gradient(keys))  # sg(j^n): only the source moves
  losses, active = [], []
  for (m, n), query in aligned.items():
    logits = l2_normalize(query) @ unit_keys[:, n].T / temperature_feedback  # [U, K]
    logits = jnp.where(key_mask[None, :], logits, -jnp.inf)
    positive_logit = jnp.take_along_axis(logits, positive[:, None], axis=1)[:, 0]
    losses.append(jax.nn.logsumexp(logits, axis=1) - positive_logit)
    active.append(directions[:, m, n])
  losses, active = jnp.stack(losses), jnp.stack(active)  # [|M|(|M|-1), U]
  n_directions = jnp.sum(active, axis=0)
  per_item = jnp.sum(jnp.where(active, losses, 0.0), axis=0) / jnp.maximum(n_directions, 1)
  return masked_mean(per_item, valid & (n_directions > 0))


def direction_tuning_loss(users_b: Array, aligned: Dict[Tuple[int, int], Array],
                          directions: Array, inverse: Array, counts: Array, valid: Array,
                          similarity: str = "cosine") -> Array:
  """Eq. 6: L^DT = -1/(|M|(|M|-1)|I|) sum_{m,n} sum_{i in D^{m->n}} avg_{(u,i) in B}
  u^T i^{m->n}; similarity 'cosine' uses cos(u, i^{m->n}). No stop-gradient (as printed)."""
  n_modalities = directions.shape[-1]
  total = 0.0
  for (m, n), query in aligned.items():
    u, q = users_b, query[inverse]  # each pair's user and its item's i^{m->n}
    if similarity == "cosine":
      u, q = l2_normalize(u), l2_normalize(q)
    preference = average_over_item_pairs(jnp.sum(u * q, axis=-1), inverse, counts)
    total = total + jnp.sum(jnp.where(directions[:, m, n] & valid, preference, 0.0))
  n_items = jnp.maximum(jnp.sum(valid), 1)
  return -total / (n_modalities * (n_modalities - 1) * n_items)


def prototype_similarity(x: Array, codebook: Array) -> Array:
  """cos(x, c_p) for every prototype column c_p of the codebook [L, P]: [n, P]."""
  return l2_normalize(x) @ l2_normalize(codebook, axis=0)


def sinkhorn_codes(scores: Array, sample_weight: Array, n_iterations: int,
                   epsilon) -> Array:
  """Eq. 7: codes q = diag(r) exp(S / eps) diag(s) by N Sinkhorn-Knopp rounds (SwAV).

  scores [n, P] cosines; sample_weight [n] (0 = padding, left out of every marginal). Each
  round gives every prototype 1/P of the mass, then every sample 1/n; returned times n,
  so each sample's code sums to 1. The codes are targets: no gradient flows into them."""
  scores = jax.lax.stop_gradient(scores)
  weight = sample_weight.astype(scores.dtype)
  n_valid, n_prototypes = jnp.maximum(jnp.sum(weight), 1.0), scores.shape[1]
  tiny = jnp.finfo(scores.dtype).tiny
  # Shifting the cosines by their bound 1 is a constant factor the normalizations undo.
  q = jnp.exp((scores - 1.0) / epsilon) * weight[:, None]
  q = q / jnp.sum(q)

  def sinkhorn_round(_, q):
    q = q / (jnp.maximum(jnp.sum(q, axis=0, keepdims=True), tiny) * n_prototypes)
    return q / (jnp.maximum(jnp.sum(q, axis=1, keepdims=True), tiny) * n_valid)

  return jax.lax.fori_loop(0, n_iterations, sinkhorn_round, q) * n_valid


def cluster_cross_entropy(codes: Array, x: Array, codebook: Array,
                          temperature_cluster) -> Array:
  """-q^T log SoftMax(x C / lambda_c), per row: the brackets of Eq. 8 and Eq. 9."""
  log_p = jax.nn.log_softmax(prototype_similarity(x, codebook) / temperature_cluster, axis=-1)
  return -jnp.sum(codes * log_p, axis=-1)


def item_cluster_alignment_loss(item_embs: Array, codebook: Array, valid: Array,
                                temperature_cluster, n_iterations: int, epsilon) -> Array:
  """Eq. 8: L_ITV^CLA = -1/|I| sum_i sum_{m<n} [q_i^n log p(i^m) + q_i^m log p(i^n)].

  item_embs [U, |M|, L]; one codebook C^ITV; a Sinkhorn per modality over the items of I."""
  n_modalities = item_embs.shape[1]
  codes = [sinkhorn_codes(prototype_similarity(item_embs[:, m], codebook), valid,
                          n_iterations, epsilon) for m in range(n_modalities)]
  per_item = 0.0
  for m, n in itertools.combinations(range(n_modalities), 2):
    per_item = per_item + (
        cluster_cross_entropy(codes[n], item_embs[:, m], codebook, temperature_cluster)
        + cluster_cross_entropy(codes[m], item_embs[:, n], codebook, temperature_cluster))
  return masked_mean(per_item, valid)


def user_cluster_alignment_loss(users_b: Array, id_items_b: Array, codebook: Array,
                                temperature_cluster, n_iterations: int, epsilon) -> Array:
  """Eq. 9: L_UI^CLA = -1/|B| sum_{(u,i) in B} [q_i log p(u) + q_u log p(i^ID)], one
  codebook C^UI, a Sinkhorn over the batch's users and one over its items (a row per pair)."""
  every_pair = jnp.ones(users_b.shape[:1], bool)
  user_codes = sinkhorn_codes(prototype_similarity(users_b, codebook), every_pair,
                              n_iterations, epsilon)
  item_codes = sinkhorn_codes(prototype_similarity(id_items_b, codebook), every_pair,
                              n_iterations, epsilon)
  return jnp.mean(cluster_cross_entropy(item_codes, users_b, codebook, temperature_cluster)
                  + cluster_cross_entropy(user_codes, id_items_b, codebook, temperature_cluster))


def fettle_alignment_loss(terms: Dict[str, Array], alpha, beta) -> Array:
  """Eq. 11 without L^BPR: alpha (L_UI^CLA + L_ITV^CLA) + beta (L^ILA + L^DT)."""
  return alpha * (terms["cla_ui"] + terms["cla_itv"]) + beta * (terms["ila"] + terms["dt"])


def alignment_terms(params: Params, reps: Representations, features: Dict[str, Array],
                    batch: Batch, cfg) -> Dict[str, Array]:
  """Every term of Eq. 11 on one batch (`config.fettle` as cfg); a switched-off term is 0,
  and with |M| < 2 the item-level terms (ILA, DT, CLA_ITV) are 0."""
  names = modality_names(params["projectors"])
  ids, inverse, counts, valid = unique_items(batch.pos_items)
  item_embs = batch_modality_embeddings(params["projectors"], reps, features, ids, names,
                                        cfg.use_backbone_modalities)  # i^m, [U, |M|, L]
  users_b = reps.users[batch.users]
  terms = {name: jnp.zeros((), users_b.dtype) for name in TERMS}
  if cfg.use_cla:
    terms["cla_ui"] = user_cluster_alignment_loss(
        users_b, item_embs[inverse, 0], params["codebook_user"], cfg.temperature_cluster,
        cfg.sinkhorn_iterations, cfg.sinkhorn_epsilon)
  if len(names) < 2:
    return terms
  if cfg.use_cla:
    terms["cla_itv"] = item_cluster_alignment_loss(
        item_embs, params["codebook_item"], valid, cfg.temperature_cluster,
        cfg.sinkhorn_iterations, cfg.sinkhorn_epsilon)
  # Eq. 2's scores only choose directions: no gradient flows through them.
  scores = jax.lax.stop_gradient(estimated_feedback(users_b, item_embs, inverse, counts,
                                                    cfg.feedback))
  directions = alignment_directions(scores, valid, cfg.directions, cfg.bidirectional_threshold)
  aligned = {(m, n): aligned_embedding(params["alignment_ffn"][direction_name(names, m, n)],
                                       item_embs[:, m])
             for m, n in ordered_pairs(len(names))}
  if cfg.use_ila:
    if cfg.ila_negatives == "all":
      keys = all_item_modality_embeddings(params["projectors"], reps, features, names,
                                          cfg.use_backbone_modalities)
      positive, key_mask = ids, jnp.ones(keys.shape[:1], bool)
    else:  # 'batch': the batch's unique items are the negatives
      keys, positive, key_mask = item_embs, jnp.arange(ids.shape[0]), valid
    terms["ila"] = item_level_alignment_loss(aligned, keys, positive, key_mask, directions,
                                             valid, cfg.temperature_feedback)
  if cfg.use_dt:
    terms["dt"] = direction_tuning_loss(users_b, aligned, directions, inverse, counts, valid,
                                        cfg.dt_similarity)
  return terms


def loss(params: Params, reps: Representations, features: Dict[str, Array], batch: Batch,
         rng: Array, config) -> Tuple[Array, Dict[str, Array]]:
  """The plug-in loss: Eq. 11 without L^BPR, and every unweighted term."""
  del rng  # FETTLE is deterministic given the batch
  cfg = config.fettle
  terms = alignment_terms(params, reps, features, batch, cfg)
  return fettle_alignment_loss(terms, cfg.alpha, cfg.beta), terms
