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
  do not grow with B. The item-level terms run on the smallest of a few static prefixes
  of that buffer that holds every valid slot (`item_level_terms_bucketed`, exact).
- Ties in Eq. 5: on s_i^m == s_i^n the modality with the lower index in M is the lower
  one, so every unordered pair gets exactly one direction.
- Eq. 4 is printed without a minus sign; we minimize -log softmax (InfoNCE).
- Cosine similarity / L2 normalization everywhere an embedding meets a codebook (SwAV).
- DT (Eq. 6) has no stop-gradient: gradients reach users, modality embeddings and the
  residual projectors, as the equation is written. It scores cos(u, i^{m->n}) by default
  (`dt_similarity`): the printed u^T i^{m->n} is unbounded and diverged in our runs.
"""

import itertools
from typing import Dict, List, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fettle_jax.blocks import init_feature_projectors, init_linear, linear, xavier_uniform
from fettle_jax.types import Array, Batch, DataInfo, Params, Representations

ID_MODALITY = "id"
_NORM_EPS = 1e-12


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
      "use_ila": True,  # bool: item-level alignment L_ILA (Table 3 ablation)
      "use_dt": True,  # bool: direction tuning L_DT (Table 3 ablation)
      # str: 'cosine' (default) scores DT with cos(u, i^{m->n}); 'dot' is Eq. 6 as printed
      # (u^T i^{m->n}), unbounded: it inflates embedding norms and diverged on ml100k.
      "dt_similarity": "cosine",
      "use_cla": True,  # bool: cluster-level alignment L_UI + L_ITV (Table 3 ablation)
      "projector_hidden": 64,  # int: hidden width of each residual FFN f^{m->n} (Eq. 3)
      "use_backbone_modalities": True,  # bool: prefer reps.modality_items[m] over own projectors
  })


# ----------------------------------------------------------------------------- helpers


def modality_names(content_modalities: Sequence[str]) -> List[str]:
  """M = [ID] + sorted content modalities; the list index is the tie-break order of Eq. 5."""
  return [ID_MODALITY] + sorted(content_modalities)


def ordered_pairs(n_modalities: int) -> List[Tuple[int, int]]:
  """All |M|(|M|-1) ordered modality pairs (m, n), m != n."""
  return [(m, n) for m, n in itertools.permutations(range(n_modalities), 2)]


def direction_name(names: Sequence[str], m: int, n: int) -> str:
  return f"{names[m]}->{names[n]}"


def l2_normalize(x: Array, axis: int = -1) -> Array:
  """x / max(||x||, eps), like torch's F.normalize (finite gradient at 0)."""
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, _NORM_EPS ** 2))


def init_residual_ffn(rng: Array, dim: int, hidden: int) -> dict:
  """f^{m->n} of Eq. 3: Linear(L, H) -> ReLU -> Linear(H, L), Xavier-uniform weights."""
  r1, r2 = jax.random.split(rng)
  return {"hidden": init_linear(r1, dim, hidden), "output": init_linear(r2, hidden, dim)}


def residual_ffn(params: dict, x: Array) -> Array:
  """i^{m->n} = i^m + f^{m->n}(i^m) (Eq. 3): the residual says what m must gain to match n."""
  return x + linear(params["output"], jax.nn.relu(linear(params["hidden"], x)))


def batch_modality_embeddings(projectors: dict, reps: Representations, features: dict,
                              item_ids: Array, names: Sequence[str],
                              use_backbone_modalities: bool) -> Array:
  """i^m for the given items and every m in `names`, stacked to [len(item_ids), |M|, L].

  ID is reps.items; a content modality comes from reps.modality_items[m] when the backbone
  provides it (and use_backbone_modalities), else from our projector of features[m] (Sec 3,
  "pre-processing the input"). Gathering features before projecting keeps the cost at
  O(|ids| d_m L) instead of O(n_items d_m L).
  """
  per_modality = []
  for name in names:
    if name == ID_MODALITY:
      per_modality.append(reps.items[item_ids])
    elif use_backbone_modalities and name in reps.modality_items:
      per_modality.append(reps.modality_items[name][item_ids])
    else:
      per_modality.append(linear(projectors[name], features[name][item_ids]))
  return jnp.stack(per_modality, axis=1)


def all_item_modality_embeddings(projectors: dict, reps: Representations, features: dict,
                                 names: Sequence[str], use_backbone_modalities: bool) -> Array:
  """i^m for all items, [n_items, |M|, L] (needed by ILA's 'all' negatives, Eq. 4)."""
  return batch_modality_embeddings(projectors, reps, features, jnp.arange(reps.items.shape[0]),
                                   names, use_backbone_modalities)


class BatchItems(NamedTuple):
  """The batch's unique positive items in a fixed-size buffer of B slots (sorted by id)."""
  ids: Array          # int32 [B]; padding slots repeat a valid id (safe to gather)
  inverse: Array      # int32 [B]; pair b -> its item's slot
  first_index: Array  # int32 [B]; slot -> first pair holding that item
  counts: Array       # int32 [B]; pairs per slot, 0 on padding
  valid: Array        # bool [B]; slot holds a real item


def unique_batch_items(batch_items: Array, n_items: int = None) -> BatchItems:
  # A batch holds at most min(B, n_items) distinct items: a static bound that shrinks every
  # [U, U] ILA matrix on catalogues smaller than the batch (ml100k: 1682 < 2048).
  size = batch_items.shape[0] if n_items is None else min(batch_items.shape[0], n_items)
  ids, first_index, inverse, counts = jnp.unique(
      batch_items, size=size, return_index=True, return_inverse=True, return_counts=True)
  return BatchItems(ids, inverse.reshape(-1), first_index, counts, counts > 0)


def segment_mean(values: Array, segment_ids: Array, counts: Array) -> Array:
  """Mean of `values` rows per segment; 0 for empty (padding) segments."""
  sums = jax.ops.segment_sum(values, segment_ids, num_segments=counts.shape[0])
  denom = jnp.maximum(counts, 1).astype(values.dtype)
  return sums / denom.reshape((-1,) + (1,) * (values.ndim - 1))


def masked_mean(values: Array, mask: Array) -> Array:
  """Mean over masked-in entries; `where`, not a product, so inf/nan in padding cannot leak."""
  total = jnp.sum(jnp.where(mask, values, 0.0))
  return total / jnp.maximum(jnp.sum(mask.astype(values.dtype)), 1.0)


# ------------------------------------------------------------- Eq. 2, 5: feedback, directions


def estimated_feedback(user_emb_b: Array, item_emb_by_modality_b: Array,
                       batch_items: Array, n_items: int = None) -> Tuple[Array, BatchItems]:
  """s_i^m = avg_{(u,i) in B} u^T i^m (Eq. 2), for the batch's unique items.

  user_emb_b: [B, L] users of the batch's interacted pairs; item_emb_by_modality_b:
  [B, |M|, L] their items' modality embeddings; batch_items: [B] item ids.
  Returns scores [U, |M|] (row per unique-item slot, 0 on padding; U = min(B, n_items))
  and the BatchItems.
  """
  items = unique_batch_items(batch_items, n_items)
  pair_scores = jnp.einsum("bl,bml->bm", user_emb_b, item_emb_by_modality_b)
  return segment_mean(pair_scores, items.inverse, items.counts), items


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
  return directions | (reverse & (scores[:, None, :] > threshold))


def alignment_directions(scores: Array, valid: Array, mode: str,
                         bidirectional_threshold: float) -> Array:
  if mode == "pairwise":
    directions = pairwise_directions(scores, valid)
  elif mode == "topmost":
    directions = topmost_directions(scores, valid)
  else:
    raise ValueError(f"fettle.directions must be 'pairwise' or 'topmost', got {mode!r}")
  if bidirectional_threshold >= 0:  # static config switch; negative means off
    directions = add_bidirectional(directions, scores, bidirectional_threshold)
  return directions


# ------------------------------------------------------------------ Eq. 3, 4, 6: ILA and DT


def aligned_item_embeddings(ffn_params: dict, item_emb_by_modality: Array,
                            names: Sequence[str]) -> Array:
  """[U, |M|, |M|, L] with [:, m, n] = i^{m->n} (Eq. 3); the diagonal holds i^m unchanged."""
  n_modalities = len(names)
  rows = []
  for m in range(n_modalities):
    source = item_emb_by_modality[:, m]
    rows.append(jnp.stack([
        source if m == n else residual_ffn(ffn_params[direction_name(names, m, n)], source)
        for n in range(n_modalities)], axis=1))
  return jnp.stack(rows, axis=1)


def info_nce_loss(queries: Array, keys: Array, positive_index: Array, key_mask: Array,
                  temperature: float) -> Array:
  """-log softmax_j(sim(q, k_j) / T) at j = positive, per query (cosine similarity)."""
  logits = l2_normalize(queries) @ l2_normalize(keys).T / temperature
  if key_mask is not None:
    logits = jnp.where(key_mask[None, :], logits, -jnp.inf)
  positive = jnp.take_along_axis(logits, positive_index[:, None], axis=1)[:, 0]
  return jax.nn.logsumexp(logits, axis=1) - positive


def item_level_alignment_loss(aligned: Array, target_keys: Array, positive_index: Array,
                              key_mask: Array, directions: Array, valid: Array,
                              temperature: float) -> Array:
  """L^ILA (Eq. 4): InfoNCE from i^{m->n} to sg(i^n) over the negatives j in `target_keys`.

  aligned [U, |M|, |M|, L]; target_keys [K, |M|, L] (K = the batch's unique items or all
  items) with positive_index [U] into K and key_mask [K] (None = all keys real).
  Eq. 4 drops the minus sign; we minimize -log softmax. Per item: average over its
  directions ("avg_{m->n}"); then the mean (not the printed sum) over the valid items.
  """
  n_modalities = aligned.shape[1]
  targets = jax.lax.stop_gradient(target_keys)  # sg(j^n): only the source m moves (one-way)
  per_direction = jnp.zeros(directions.shape, aligned.dtype)
  for m, n in ordered_pairs(n_modalities):
    nce = info_nce_loss(aligned[:, m, n], targets[:, n], positive_index, key_mask, temperature)
    per_direction = per_direction.at[:, m, n].set(nce)
  # `where`, not a product: a padding slot's positive key is masked, so its NCE is +inf.
  n_directions = jnp.sum(directions.astype(aligned.dtype), axis=(1, 2))
  per_item = (jnp.sum(jnp.where(directions, per_direction, 0.0), axis=(1, 2))
              / jnp.maximum(n_directions, 1.0))
  return masked_mean(per_item, valid & (n_directions > 0))


def direction_tuning_loss(aligned: Array, mean_user_emb: Array, directions: Array,
                          valid: Array, cosine: bool = False) -> Array:
  """L^DT (Eq. 6) = -1/(|M|(|M|-1)|I|) sum_{m,n} sum_{i in D^{m->n}} avg_{(u,i) in B} u^T i^{m->n}.

  avg over the item's batch users of u^T i^{m->n} equals mean_user_emb_i^T i^{m->n};
  |I| = number of valid unique items. No stop-gradient, as in Eq. 6.
  cosine=True scores cos(u, i^{m->n}) instead (pass the mean of the L2-normalized users):
  u^T i is unbounded below in the loss, and maximizing it only inflates norms (on ml100k
  FREEDOM the literal form drove L^DT to -1.5e6 within 20 epochs); the cosine tunes the
  *direction*, which is what Sec 3.2 motivates.
  """
  n_modalities = aligned.shape[1]
  if cosine:
    aligned = l2_normalize(aligned)
  preference = jnp.einsum("ul,umnl->umn", mean_user_emb, aligned)
  mask = directions & valid[:, None, None]
  n_items = jnp.maximum(jnp.sum(valid.astype(aligned.dtype)), 1.0)
  return -jnp.sum(jnp.where(mask, preference, 0.0)) / (n_modalities * (n_modalities - 1) * n_items)


# ---------------------------------------------------------------- Eq. 7-9: cluster alignment


def sinkhorn_knopp(scores: Array, n_iterations: int, epsilon: float,
                   sample_mask: Array = None) -> Array:
  """Codes q (Eq. 7), SwAV's Sinkhorn-Knopp: [n, P] scores -> [n, P] codes.

  Q = exp(scores / eps)^T normalized to total mass 1, then N rounds of: prototypes (rows)
  sum to 1/P, samples (columns) sum to 1/n_valid; returned as (Q n_valid)^T, so each
  valid sample's code sums to 1. Masked samples get zero mass and are left out of every
  marginal (n_valid counts only real samples). Callers stop gradients (codes are targets).

  Eq. 7's form diag(r) K diag(s) is kept literally: the loop updates only the scaling
  vectors (two matrix-vector products per round, no [n, P] writes), and the codes
  r_i K_ip s_p are formed once at the end, where XLA fuses them into their consumer.
  Subtracting the global max score first is a scalar rescaling (undone exactly by the
  normalizations) that keeps every exp in (0, 1]; scores are cosines in [-1, 1], so entries
  stay >= exp(-2 / eps), far above float32 underflow for eps >= 0.03; the tiny floors
  only guard the degenerate case.
  """
  n_samples, _ = scores.shape
  if sample_mask is None:
    sample_mask = jnp.ones((n_samples,), bool)
  weight = sample_mask.astype(scores.dtype)
  n_prototypes = scores.shape[1]
  n_valid = jnp.maximum(jnp.sum(weight), 1.0)
  tiny = jnp.finfo(scores.dtype).tiny
  top = jnp.max(jnp.where(sample_mask[:, None], scores, -jnp.inf))
  kernel = jnp.exp((jnp.minimum(scores, top) - top) / epsilon)  # K, [n, P]

  def normalize_round(_, scalings):
    r, _ = scalings
    s = 1.0 / (jnp.maximum(r @ kernel, tiny) * n_prototypes)  # prototype marginals 1/P
    r = weight / (jnp.maximum(kernel @ s, tiny) * n_valid)   # sample marginals 1/n_valid
    return r, s

  r, s = jax.lax.fori_loop(0, n_iterations, normalize_round,
                           (weight, jnp.ones((n_prototypes,), scores.dtype)))
  return (r * n_valid)[:, None] * kernel * s[None, :]


def prototype_scores(embeddings: Array, codebook: Array) -> Array:
  """Cosine of each embedding with each prototype column c_p: [n, L] x [L, P] -> [n, P]."""
  return l2_normalize(embeddings) @ l2_normalize(codebook, axis=0)


def cluster_codes(scores: Array, sample_mask: Array, n_iterations: int,
                  epsilon: float) -> Array:
  """Sinkhorn codes as fixed targets: no gradient flows into q (SwAV)."""
  return sinkhorn_knopp(jax.lax.stop_gradient(scores), n_iterations, epsilon, sample_mask)


class ClusterPrediction(NamedTuple):
  """SoftMax(i C / lambda_c) (Eq. 8-9), the predicted assignment, kept as logits z and
  log-partition lse(z): log p = z - lse is never materialized as its own [n, P] array."""
  logits: Array         # [n, P]
  log_partition: Array  # [n]


def cluster_prediction(scores: Array, temperature: float) -> ClusterPrediction:
  logits = scores / temperature
  return ClusterPrediction(logits, jax.nn.logsumexp(logits, axis=-1))


def code_cross_entropy(codes: Array, prediction: ClusterPrediction) -> Array:
  """-q^T log p = lse(z) sum(q) - q^T z, per sample (the brackets of Eq. 8-9).

  One fused pass over [n, P] forward and one backward (softmax(z) sum(q) - q).
  """
  return (prediction.log_partition * jnp.sum(codes, axis=-1)
          - jnp.sum(codes * prediction.logits, axis=-1))


def item_cluster_alignment_loss(item_emb_by_modality: Array, codebook: Array, valid: Array,
                                temperature: float, n_iterations: int,
                                epsilon: float) -> Array:
  """L_ITV^CLA (Eq. 8): swapped code prediction across each item's modalities.

  item_emb_by_modality [U, |M|, L] for the batch's unique items, one shared codebook
  C^ITV [L, P]. Codes come from a separate Sinkhorn per modality over the valid items.
  Per item: sum over unordered pairs {m, n} of [CE(q^n, i^m) + CE(q^m, i^n)]; mean over
  valid items (1/|I|).
  """
  n_modalities = item_emb_by_modality.shape[1]
  if n_modalities < 2:
    return jnp.zeros((), item_emb_by_modality.dtype)
  scores = [prototype_scores(item_emb_by_modality[:, m], codebook) for m in range(n_modalities)]
  codes = [cluster_codes(s, valid, n_iterations, epsilon) for s in scores]
  predictions = [cluster_prediction(s, temperature) for s in scores]
  per_item = 0.0
  for m, n in itertools.combinations(range(n_modalities), 2):
    per_item = (per_item + code_cross_entropy(codes[n], predictions[m])
                + code_cross_entropy(codes[m], predictions[n]))
  return masked_mean(per_item, valid)


def user_cluster_alignment_loss(user_emb_b: Array, id_item_emb_b: Array, codebook: Array,
                                temperature: float, n_iterations: int,
                                epsilon: float) -> Array:
  """L_UI^CLA (Eq. 9): -1/|B| sum_{(u,i) in B} [CE(q^i, u) + CE(q^u, i^ID)] with codebook C^UI."""
  user_scores = prototype_scores(user_emb_b, codebook)
  item_scores = prototype_scores(id_item_emb_b, codebook)
  user_codes = cluster_codes(user_scores, None, n_iterations, epsilon)
  item_codes = cluster_codes(item_scores, None, n_iterations, epsilon)
  return jnp.mean(code_cross_entropy(item_codes, cluster_prediction(user_scores, temperature))
                  + code_cross_entropy(user_codes, cluster_prediction(item_scores, temperature)))


# ------------------------------------------------------ item-level terms on the unique items


class UniqueItemInputs(NamedTuple):
  """Per-unique-item inputs of ILA, DT and CLA_ITV; valid slots form a prefix (sorted ids)."""
  embeddings: Array  # [U, |M|, L] i^m
  scores: Array      # [U, |M|] s_i^m (Eq. 2)
  valid: Array       # bool [U]
  ids: Array         # int32 [U] item ids (ILA's positive index under 'all' negatives)
  mean_users: Array  # [U, L] mean of the item's batch users (normalized for cosine DT)


def item_level_terms(params: Params, unique: UniqueItemInputs, all_keys, names: Sequence[str],
                     cfg) -> Dict[str, Array]:
  """Unweighted L^ILA, L^DT (Eq. 3-6) and L_ITV^CLA (Eq. 7-8) over the unique items."""
  zero = jnp.zeros((), unique.embeddings.dtype)
  terms = {"ila": zero, "dt": zero, "cla_itv": zero}
  if (cfg.use_ila or cfg.use_dt) and len(names) >= 2:
    directions = alignment_directions(unique.scores, unique.valid, cfg.directions,
                                      cfg.bidirectional_threshold)
    aligned = aligned_item_embeddings(params["alignment_ffn"], unique.embeddings, names)
    if cfg.use_ila:
      if all_keys is None:  # 'batch' negatives: the unique items themselves
        keys, positive, key_mask = (unique.embeddings, jnp.arange(unique.valid.shape[0]),
                                    unique.valid)
      else:  # 'all' items (Eq. 4 as written)
        keys, positive, key_mask = all_keys, unique.ids, None
      terms["ila"] = item_level_alignment_loss(aligned, keys, positive, key_mask, directions,
                                               unique.valid, cfg.temperature_feedback)
    if cfg.use_dt:
      terms["dt"] = direction_tuning_loss(aligned, unique.mean_users, directions, unique.valid,
                                          cfg.dt_similarity == "cosine")
  if cfg.use_cla:
    terms["cla_itv"] = item_cluster_alignment_loss(
        unique.embeddings, params["codebook_item"], unique.valid, cfg.temperature_cluster,
        cfg.sinkhorn_iterations, cfg.sinkhorn_epsilon)
  return terms


def bucket_sizes(capacity: int, n_buckets: int = 4, multiple: int = 64) -> List[int]:
  """Static prefix sizes ~k/n_buckets of capacity (k = 1..n_buckets), rounded up to `multiple`."""
  sizes = set()
  for k in range(1, n_buckets + 1):
    size = -(-capacity * k // n_buckets)  # ceil(capacity k / n_buckets)
    sizes.add(min(-(-size // multiple) * multiple, capacity))
  return sorted(sizes)


def item_level_terms_bucketed(params: Params, unique: UniqueItemInputs, all_keys,
                              names: Sequence[str], cfg) -> Dict[str, Array]:
  """item_level_terms on the smallest static prefix that holds every valid unique item.

  The buffer has U = min(B, n_items) slots, but a batch usually fills far fewer (ml100k:
  ~745 of 1682; Baby: ~1460 of 2048), and ILA's [U, U] logits cost O(U^2). Valid slots
  are a prefix and padding slots are masked out of every term, so the terms on a prefix
  holding all valid slots equal the full-buffer terms exactly; `lax.switch` runs only the
  chosen size's branch.
  """
  capacity = unique.valid.shape[0]
  sizes = bucket_sizes(capacity)
  if len(sizes) == 1:
    return item_level_terms(params, unique, all_keys, names, cfg)
  n_valid = jnp.sum(unique.valid.astype(jnp.int32))
  index = jnp.sum(n_valid > jnp.asarray(sizes[:-1]))  # first size >= n_valid

  def branch(size):
    prefix = jax.tree_util.tree_map(lambda x: x[:size], unique)
    return lambda p, keys: item_level_terms(p, prefix, keys, names, cfg)

  return jax.lax.switch(index, [branch(size) for size in sizes], params, all_keys)


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
      # Free parameters; columns are L2-normalized where used (prototype_scores).
      "codebook_item": xavier_uniform(r_item, (dim, cfg.prototypes_item)),
      "codebook_user": xavier_uniform(r_user, (dim, cfg.prototypes_user)),
  }


def loss(params: Params, reps: Representations, features: Dict[str, Array], batch: Batch,
         rng: Array, config) -> Tuple[Array, Dict[str, Array]]:
  """alpha (L_UI^CLA + L_ITV^CLA) + beta (L^ILA + L^DT): Eq. 11 without L^BPR."""
  del rng  # FETTLE is deterministic given the batch
  cfg = config.fettle
  if cfg.directions not in ("pairwise", "topmost"):
    raise ValueError(f"fettle.directions must be 'pairwise' or 'topmost', got {cfg.directions!r}")
  if cfg.dt_similarity not in ("cosine", "dot"):
    raise ValueError(f"fettle.dt_similarity must be 'cosine' or 'dot', got {cfg.dt_similarity!r}")
  if cfg.ila_negatives not in ("batch", "all"):
    raise ValueError(f"fettle.ila_negatives must be 'batch' or 'all', got {cfg.ila_negatives!r}")
  names = modality_names(params["projectors"])
  pair_embs = batch_modality_embeddings(params["projectors"], reps, features, batch.pos_items,
                                        names, cfg.use_backbone_modalities)  # [B, |M|, L]
  user_emb_b = reps.users[batch.users]
  scores, items = estimated_feedback(user_emb_b, pair_embs, batch.pos_items, reps.items.shape[0])
  users_for_dt = l2_normalize(user_emb_b) if cfg.dt_similarity == "cosine" else user_emb_b
  unique = UniqueItemInputs(
      embeddings=pair_embs[items.first_index],  # [U, |M|, L], one row per unique item
      scores=scores, valid=items.valid, ids=items.ids,
      mean_users=segment_mean(users_for_dt, items.inverse, items.counts))
  all_keys = None
  if cfg.use_ila and cfg.ila_negatives == "all":
    all_keys = all_item_modality_embeddings(params["projectors"], reps, features, names,
                                            cfg.use_backbone_modalities)
  terms = item_level_terms_bucketed(params, unique, all_keys, names, cfg)
  terms["cla_ui"] = jnp.zeros((), pair_embs.dtype)
  if cfg.use_cla:
    terms["cla_ui"] = user_cluster_alignment_loss(
        user_emb_b, pair_embs[:, 0], params["codebook_user"], cfg.temperature_cluster,
        cfg.sinkhorn_iterations, cfg.sinkhorn_epsilon)

  total = (cfg.alpha * (terms["cla_ui"] + terms["cla_itv"])
           + cfg.beta * (terms["ila"] + terms["dt"]))
  return total, terms
