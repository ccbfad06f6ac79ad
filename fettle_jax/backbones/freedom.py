"""FREEDOM (Zhou & Shen, ACM MM'23): a frozen item-item graph + a denoised user-item graph.

Freezing: per modality m, the 0/1 kNN graph S_m of the raw features' cosine similarity
(top-k per item, the item itself included), normalized D^-1/2 S_m D^-1/2 and summed with
weights w_m; built ONCE here (`build_graph`) and never learned. Item ID embeddings propagate
n_mm_layers times on it: h~ = S^L h (the last layer, no layer mean).
Denoising (degree-sensitive edge pruning): each training step keeps round((1 - dropout)|E|)
user-item edges sampled without replacement with p ~ 1 / sqrt(d_u d_i)
(`graphs.pruned_user_item_graph`) and renormalizes them; LightGCN propagation over
n_ui_layers, the mean of layers 0..K as readout.
Final reps: u = u^ui, i = i^ui + h~_i. Loss: BPR(u, i) + reg_weight * sum_m
BPR(u, W_m x^m + b_m), the projected raw features i^m = W_m x^m + b_m being FREEDOM's own
modality embeddings (exposed as `modality_items`, which FETTLE aligns).
`represent` (evaluation) uses the full, unpruned normalized user-item graph.

Where we differ from the MMRec implementation (facts, not code, carried over):
- by default the pruned graph is resampled every training step (`prune_every='step'`, the
  setting of every result so far); `prune_every='epoch'` prunes once per epoch as MMRec
  does, through the contract's epoch hook, the pruned graph living in the checkpointed
  model state; the sampling law is the same either way;
- kept edges = round((1 - dropout)|E|) instead of int() truncation (at most 1 edge apart);
- projector weights are Xavier-uniform, as the FETTLE paper initializes every parameter.
Note: the projector bias b_m cancels in BPR(u, i^m_pos, i^m_neg) and gets no gradient from this
loss (as in MMRec); it is kept because alignment losses see the absolute i^m.
"""

from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fettle_jax import graphs
from fettle_jax import layers
from fettle_jax import losses
from fettle_jax.errors import ConfigError
from fettle_jax.types import Batch, DataInfo, ProjectedRows, Representations


def default_config() -> ml_collections.ConfigDict:
  """`config.freedom`; MMRec's FREEDOM values."""
  return ml_collections.ConfigDict({
      "knn_k": 10,  # int: neighbours per item in each modality's frozen kNN graph; MMRec 10
      # dict[str, float]: w_m of the summed item-item graph; MMRec mm_image_weight 0.1 ->
      # image 0.1, text 0.9; renormalized over present modalities, equal if one is unlisted.
      "modality_weights": ml_collections.ConfigDict({"image": 0.1, "text": 0.9}),
      "knn_block_size": 1024,  # int: item rows per block of the exact top-k (memory, not math)
      "n_mm_layers": 1,  # int: propagation layers on the item-item graph; MMRec 1
      "n_ui_layers": 2,  # int: LightGCN layers on the user-item graph (mean readout); MMRec 2
      "dropout": 0.8,  # float: share of user-item edges pruned per step; MMRec grid {0.8, 0.9}
      "reg_weight": 1e-4,  # float: weight of the modality BPR terms; MMRec grid {0, 1e-5..1e-3}
      # str: 'step' resamples the pruned user-item graph every step (our results so far);
      # 'epoch' once per epoch at epoch start, as MMRec's FREEDOM.
      "prune_every": "step",
  })


def modality_weights(names: Sequence[str], configured: Dict[str, float]) -> Dict[str, float]:
  """w_m of the combined item-item graph, summing to 1.

  If every present modality has a configured weight (MMRec: image 0.1, text 0.9 from
  mm_image_weight), those weights renormalized over the present ones (image alone -> 1.0);
  otherwise equal weights 1/|M|.
  """
  names = sorted(names)
  configured = {} if configured is None else dict(configured.items())  # dict or ConfigDict
  if names and all(n in configured for n in names):
    total = float(sum(configured[n] for n in names))
    if total > 0:
      return {n: float(configured[n]) / total for n in names}
  return {n: 1.0 / len(names) for n in names}


def build_graph(train_pairs, n_users, n_items, features, config):
  cfg = config.freedom
  if not features:
    raise ConfigError("FREEDOM needs at least one content modality (its item-item graph and "
                     "modality losses are built from the features)")
  weights = modality_weights(list(features), cfg.modality_weights)
  train_pairs = np.asarray(train_pairs)
  item_item = graphs.knn_item_graph(features, cfg.knn_k, weights, cfg.knn_block_size)
  return {
      "user_item": graphs.user_item_graph(train_pairs[:, 0], train_pairs[:, 1], n_users, n_items),
      "edges": graphs.bipartite_edges(train_pairs[:, 0], train_pairs[:, 1], n_users, n_items),
      "item_item": item_item,
      # Its transpose, sorted once: S h and the gradient S^T g as CSR products, no scatter
      # (~4x faster than a scatter; docs/performance.md).
      "item_item_edges": graphs.transposed_edge_list(item_item.senders, item_item.receivers),
  }


def check_config(cfg) -> None:
  """One-line errors for `config.freedom` (the train loop calls it before loading data)."""
  if cfg.prune_every not in ("step", "epoch"):
    raise ConfigError(f"freedom.prune_every must be 'step' or 'epoch', got {cfg.prune_every!r}")


def _pruned_graph(rng, static, n_users: int, n_items: int, cfg) -> graphs.Graph:
  return graphs.pruned_user_item_graph(rng, static.graph["edges"], n_users, n_items, cfg.dropout)


def init_state(rng, static, info, config):
  """With prune_every='epoch': the pruned user-item graph of the current epoch."""
  cfg = config.freedom
  check_config(cfg)
  if cfg.prune_every != "epoch" or cfg.dropout <= 0:
    return {}
  return {"user_item": _pruned_graph(rng, static, info.n_users, info.n_items, cfg)}


def epoch_start(params, model_state, static, info, rng, config):
  """MMRec's FREEDOM prunes once per epoch: draw this epoch's graph (prune_every='epoch')."""
  del params
  if not model_state:
    return model_state
  return {"user_item": _pruned_graph(rng, static, info.n_users, info.n_items, config.freedom)}


def init(rng, data_info: DataInfo, config):
  table_rng, proj_rng = jax.random.split(rng)
  size = config.embedding_size
  params = layers.init_embedding_tables(table_rng, data_info.n_users, data_info.n_items, size)
  params["projectors"] = layers.init_feature_projectors(proj_rng, data_info.feature_dims, size)
  return params


def _forward(params, static, user_item: graphs.Graph, config,
             lazy_modalities: bool = False) -> Representations:
  cfg = config.freedom
  users, items = params["user_embedding"], params["item_embedding"]
  n_users = users.shape[0]
  item_item = items
  for _ in range(cfg.n_mm_layers):  # h~ = S^L h: the frozen graph's last layer
    item_item = graphs.weighted_propagate(static.graph["item_item_edges"],
                                          static.graph["item_item"].weights, item_item)
  ego = jnp.concatenate([users, items], axis=0)
  final = graphs.mean_of_layers(user_item, ego, cfg.n_ui_layers)
  # The frozen raw features (FREEDOM does not fine-tune them), projected to L each step;
  # in training only the rows an alignment loss gathers are projected (ProjectedRows).
  if lazy_modalities:
    modality = {name: ProjectedRows(static.features[name], projector)
                for name, projector in sorted(params["projectors"].items())}
  else:
    modality = layers.project_features(params["projectors"], static.features)
  return Representations(final[:n_users], final[n_users:] + item_item, modality)


def represent(params, model_state, static, config) -> Representations:
  del model_state
  return _forward(params, static, static.graph["user_item"], config)


def apply(params, model_state, static, batch: Batch, rng, config):
  cfg = config.freedom
  if "user_item" in model_state:  # prune_every='epoch': this epoch's graph
    user_item = model_state["user_item"]
  elif cfg.dropout > 0:
    user_item = _pruned_graph(rng, static, *(params[f"{side}_embedding"].shape[0]
                                             for side in ("user", "item")), cfg)
  else:
    user_item = static.graph["user_item"]
  # With fewer batch rows than items, FREEDOM's own modality loss reads only feature
  # differences (below), so the modality embeddings stay lazy: an alignment loss projects
  # just the rows it gathers. Otherwise every item is projected once, for both.
  batch_is_smaller = batch.pos_items.shape[0] < params["item_embedding"].shape[0]
  reps = _forward(params, static, user_item, config, lazy_modalities=batch_is_smaller)
  u = reps.users[batch.users]
  loss = losses.bpr_loss(u, reps.items[batch.pos_items], reps.items[batch.neg_items])
  # BPR(u, i^m_pos, i^m_neg) needs only i^m_pos - i^m_neg = W_m (x_pos - x_neg): with fewer
  # batch rows than items, one [B, d_m] x [d_m, L] product beats projecting every item (which
  # is then dead code unless an alignment loss reads reps.modality_items); 3.5x fewer FLOPs
  # on Baby's 4096-d image features. Static shapes pick the cheaper, equal-valued path.
  modality_loss = 0.0
  for name, projector in sorted(params["projectors"].items()):
    if batch_is_smaller:
      x = static.features[name]
      difference = (x[batch.pos_items] - x[batch.neg_items]) @ projector["kernel"]
    else:
      x = reps.modality_items[name]
      difference = x[batch.pos_items] - x[batch.neg_items]
    modality_loss += losses.bpr_loss(u, difference, jnp.zeros_like(difference))
  return reps, loss + cfg.reg_weight * modality_loss
