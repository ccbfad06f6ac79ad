"""NCL (Lin et al., WWW'22): LightGCN + neighbourhood-enriched contrastive learning.

Backbone: LightGCN (`lightgcn.py`): mean of layers 0..K of the normalized user-item graph,
BPR + L2 on the batch's ego embeddings. Two contrastive terms on top (NCL Eq. 12):
- structure-contrastive (Eq. 5-7): a node's ego embedding z^(0) against its own even-layer
  output z^(k), k = 2 * hyper_layers (its k-hop homogeneous neighbours: users reach users
  through items at even layers), InfoNCE with temperature ssl_temp; users + alpha * items,
  weighted ssl_reg;
- prototype-contrastive (Eq. 9-11): a node's ego embedding against the k-means prototype
  c_i of its cluster, all K prototypes as candidates, temperature ssl_temp; weighted
  proto_reg; off during the first warm_up epochs.
The prototypes come from the paper's EM view (Sec 3.3.2): the E-step (k-means on the current
ego embeddings) runs at every epoch start inside the compiled epoch (`epoch_start`, Lloyd's
algorithm as a lax.fori_loop); the state keeps centroids, each node's cluster and the
epoch count (for the warm-up).

Where we differ from the authors' code (RUCAIBox/NCL, = RecBole's NCL; facts carried over):
- structure term candidates: by default (`ssl_negatives='batch'`) the batch's unique
  users (positive items), each query summed once; the authors' code uses every user (item)
  as a candidate and sums over all batch rows (`ssl_negatives='all'` does exactly that);
- k-means: Lloyd's algorithm from K distinct sampled rows, `kmeans_iters` (faiss's default
  niter 25) iterations, an empty cluster keeping its previous centroid (faiss instead
  re-seeds it by splitting a large cluster); no subsampling (faiss subsamples only above
  256 points per centroid);
- K is clamped to the number of rows: min(num_clusters, n_users) user prototypes and
  min(num_clusters, n_items) item prototypes (faiss refuses K > n).
Both terms are sums over the batch, as in the authors' code: the published weights
(ssl_reg 1e-7, proto_reg 8e-8) assume that scale next to a batch-mean BPR loss.
"""

import jax
import jax.numpy as jnp
import ml_collections

from fettle_jax import graphs
from fettle_jax import losses
from fettle_jax.backbones import lightgcn
from fettle_jax.errors import ConfigError
from fettle_jax.types import Batch, Representations


def default_config() -> ml_collections.ConfigDict:
  """`config.ncl`: RecBole's NCL.yaml (= the authors' ml-1m setting in RUCAIBox/NCL)."""
  return ml_collections.ConfigDict({
      "n_layers": 3,  # int: LightGCN layers K of the readout; RecBole NCL.yaml 3
      "reg_weight": 1e-4,  # float: L2 on the batch's ego embeddings; RecBole 1e-4
      "ssl_temp": 0.1,  # float: tau of both InfoNCE terms (Eq. 6, 10); RecBole 0.1
      "ssl_reg": 1e-7,  # float: lambda_1, structure-term weight (Eq. 12); RecBole 1e-7
      # int: the structure term contrasts layer 2 * hyper_layers with layer 0 (Eq. 5);
      # RecBole 1 (layer 2, the paper's best, Sec 4.4)
      "hyper_layers": 1,
      "alpha": 1.0,  # float: weight of the item part of the structure term (Eq. 7); RecBole 1.0
      "proto_reg": 8e-8,  # float: lambda_2, prototype-term weight (Eq. 12); RecBole 8e-8
      # int: K prototypes per side (clamped to n_users / n_items); RecBole 1000. The authors'
      # Amazon-Books setting: 2000 clusters, ssl_temp 0.05, ssl_reg 1e-6, alpha 0.8,
      # proto_reg 1e-7, reg_weight 1e-6 (RUCAIBox/NCL properties/amazon-books.yaml).
      "num_clusters": 1000,
      # int: epochs without the prototype term (RecBole warm_up_step 20: the NCL trainer
      # drops it while epoch index < 20); the E-step still runs every epoch (m_step 1)
      "warm_up": 20,
      "kmeans_iters": 25,  # int: Lloyd iterations per E-step; faiss.Kmeans' default niter 25
      # str: structure-term candidates: 'batch' = the batch's unique users (items);
      # 'all' = every user (item), as the authors' code
      "ssl_negatives": "batch",
  })


def check_config(cfg) -> None:
  """One-line errors for `config.ncl` (the train loop calls it before loading data)."""
  if cfg.ssl_negatives not in ("batch", "all"):
    raise ConfigError(f"ncl.ssl_negatives must be 'batch' or 'all', got {cfg.ssl_negatives!r}")
  for name in ("hyper_layers", "num_clusters", "kmeans_iters"):
    if cfg[name] < 1:
      raise ConfigError(f"ncl.{name} must be >= 1, got {cfg[name]}")
  if cfg.n_layers < 0 or cfg.warm_up < 0:
    raise ConfigError("ncl.n_layers and ncl.warm_up must not be negative")
  if cfg.ssl_temp <= 0:
    raise ConfigError(f"ncl.ssl_temp must be positive, got {cfg.ssl_temp}")


build_graph = lightgcn.build_graph


init = lightgcn.init


# ----------------------------------------------------------------------------- k-means (E-step)


def kmeans_init(rng, x, k: int):
  """K distinct rows of x, drawn uniformly (faiss's initialization)."""
  return x[jax.random.choice(rng, x.shape[0], (k,), replace=False)]


def nearest_centroid(x, centroids):
  """argmin_c ||x - c||^2 per row; ||x||^2 is the same for every c and is dropped."""
  # HIGHEST: no TF32 on accelerators, so near ties resolve as in float32 arithmetic.
  dots = jnp.matmul(x, centroids.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.argmin(jnp.sum(centroids * centroids, axis=1)[None, :] - 2.0 * dots, axis=1)


def lloyd(x, centroids, n_iters: int):
  """n_iters Lloyd steps (assign to the nearest centroid, move each centroid to its
  members' mean; an empty cluster keeps its centroid), then the final assignment.
  Returns (centroids [K, d], cluster of each row int32 [n])."""
  k = centroids.shape[0]

  def step(_, c):
    cluster = nearest_centroid(x, c)
    sums = jax.ops.segment_sum(x, cluster, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones_like(cluster, x.dtype), cluster, num_segments=k)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c)

  centroids = jax.lax.fori_loop(0, n_iters, step, centroids)
  return centroids, nearest_centroid(x, centroids).astype(jnp.int32)


def n_clusters(cfg, n_rows: int) -> int:
  """K for one side: num_clusters clamped to the rows there are (k-means needs K <= n)."""
  return min(int(cfg.num_clusters), int(n_rows))


def kmeans(rng, x, k: int, n_iters: int):
  return lloyd(x, kmeans_init(rng, x, k), n_iters)


# ----------------------------------------------------------------------------- model state


def init_state(rng, static, info, config):
  """Placeholders with the E-step's shapes: `epoch_start` replaces them before the first
  step (init_state sees no parameters), and the epoch counter starts at 0."""
  del rng, static
  cfg = config.ncl
  check_config(cfg)
  n_users, n_items = info.n_users, info.n_items
  size = config.embedding_size
  return {
      "epoch": jnp.zeros((), jnp.int32),
      "user_centroids": jnp.zeros((n_clusters(cfg, n_users), size), jnp.float32),
      "user_cluster": jnp.zeros((n_users,), jnp.int32),
      "item_centroids": jnp.zeros((n_clusters(cfg, n_items), size), jnp.float32),
      "item_cluster": jnp.zeros((n_items,), jnp.int32),
  }


def epoch_start(params, model_state, static, info, rng, config):
  """E-step (Sec 3.3.2): k-means on the current ego user and item embeddings."""
  del static
  cfg = config.ncl
  n_users, n_items = info.n_users, info.n_items
  # [:n]: the logical rows, should the stored tables carry mesh padding.
  users = jax.lax.stop_gradient(params["user_embedding"][:n_users])
  items = jax.lax.stop_gradient(params["item_embedding"][:n_items])
  user_rng, item_rng = jax.random.split(rng)
  user_centroids, user_cluster = kmeans(user_rng, users, n_clusters(cfg, n_users),
                                        cfg.kmeans_iters)
  item_centroids, item_cluster = kmeans(item_rng, items, n_clusters(cfg, n_items),
                                        cfg.kmeans_iters)
  return {"epoch": model_state["epoch"] + 1,
          "user_centroids": user_centroids, "user_cluster": user_cluster,
          "item_centroids": item_centroids, "item_cluster": item_cluster}


# ----------------------------------------------------------------------------- forward and losses


def propagate_layers(graph: graphs.Graph, ego, n_layers: int):
  """[z^(0), z^(1), ..., z^(n_layers)]: LightGCN's layer outputs (He et al. Eq. 3)."""
  outputs = [ego]
  for _ in range(n_layers):
    outputs.append(graphs.propagate_symmetric(graph, outputs[-1]))
  return outputs


def _readout(outputs, n_layers: int):
  """LightGCN's mean of layers 0..K (summed in order, like graphs.mean_of_layers)."""
  total = outputs[0]
  for h in outputs[1:n_layers + 1]:
    total = total + h
  return total / (n_layers + 1)


def represent(params, model_state, static, config) -> Representations:
  del model_state
  return lightgcn.layer_mean_representations(params, static.graph["user_item"],
                                             config.ncl.n_layers)


def structure_loss(layer_k, ego, ids, temperature: float, negatives: str = "batch"):
  """NCL Eq. 5/6 for one side, summed over queries: -log of
  exp(cos(z_i^(k), z_i^(0))/T) / sum_j exp(cos(z_i^(k), z_j^(0))/T).

  negatives='batch': queries and candidates j are the distinct ids of the batch (at most
  min(B, n) of them: a [min(B, n)]^2 logit matrix, not [B, B]);
  'all': every row of `ego` is a candidate and every batch row a query (authors' code).
  """
  if negatives == "all":
    return jnp.sum(losses.info_nce_loss(layer_k[ids], ego, ids, None, temperature))
  return losses.distinct_rows_info_nce(layer_k, ego, ids, temperature)


def prototype_loss(ego, centroids, cluster, ids, temperature: float):
  """NCL Eq. 9/10 for one side, summed over the batch rows: -log of
  exp(cos(e_i, c_i)/T) / sum_{j=1..K} exp(cos(e_i, c_j)/T), c_i the prototype of i's cluster."""
  return jnp.sum(losses.info_nce_loss(ego[ids], centroids, cluster[ids], None, temperature))


def apply(params, model_state, static, batch: Batch, rng, config):
  del rng
  cfg = config.ncl
  users, items = params["user_embedding"], params["item_embedding"]
  n_users = users.shape[0]
  ego = jnp.concatenate([users, items], axis=0)
  outputs = propagate_layers(static.graph["user_item"], ego,
                             max(cfg.n_layers, 2 * cfg.hyper_layers))
  final = _readout(outputs, cfg.n_layers)
  reps = Representations(final[:n_users], final[n_users:], {})

  loss = lightgcn.bpr_with_ego_l2(params, reps, batch, cfg.reg_weight)

  # Structure term (Eq. 7): users + alpha * positive items, layer 2*hyper_layers vs 0.
  layer_k = outputs[2 * cfg.hyper_layers]
  ssl = structure_loss(layer_k[:n_users], users, batch.users, cfg.ssl_temp, cfg.ssl_negatives)
  ssl += cfg.alpha * structure_loss(layer_k[n_users:], items, batch.pos_items, cfg.ssl_temp,
                                    cfg.ssl_negatives)

  # Prototype term (Eq. 11), after the warm-up: state["epoch"] is 1 in the first epoch.
  proto = prototype_loss(users, model_state["user_centroids"], model_state["user_cluster"],
                         batch.users, cfg.ssl_temp)
  proto += prototype_loss(items, model_state["item_centroids"], model_state["item_cluster"],
                          batch.pos_items, cfg.ssl_temp)
  proto_on = (model_state["epoch"] > cfg.warm_up).astype(jnp.float32)
  return reps, loss + cfg.ssl_reg * ssl + proto_on * cfg.proto_reg * proto
