"""SGL (Wu et al., SIGIR'21): LightGCN plus a self-supervised task on two stochastic graph views.

Main task: LightGCN on the full normalized user-item graph (mean of layers 0..K) with BPR
and L2 on the batch's ego embeddings, as `lightgcn.py`.
Views (their Sec 3.2.1): once per epoch (`epoch_start`, kept in the model state) two
augmented graphs s1, s2 are drawn by one operator:
  'ED' edge dropout (Eq. 7): keep round((1 - rho)|E|) interactions drawn uniformly without
       replacement, renormalized D^-1/2 A D^-1/2 on the kept edges;
  'ND' node dropout (Eq. 6): drop round(rho |U|) users and round(rho |I|) items (uniform,
       without replacement, as both reference implementations), every edge of a dropped node
       removed; static shapes: all edges stay, weight 0 on removed ones, the rest
       renormalized on the surviving degrees;
  'RW' random walk (Eq. 8): an independent edge-dropout graph per layer.
Each view propagates the same ego embeddings (LightGCN, mean readout) on its graph(s).
SSL loss (Eq. 9-10): InfoNCE between z'_u and z''_u with cosine similarity / tau, the batch's
other unique users as negatives; the same for the batch's unique positive items. The loss
is BPR + ssl_weight * (L_ssl^user + L_ssl^item) + reg_weight * L2 (Eq. 11).
`represent` (evaluation) is plain LightGCN on the full graph.

Scale: Eq. 10 (and both reference implementations) sum InfoNCE over the batch's nodes next to
a BPR *sum*; our BPR and L2 are batch means, so the SSL sum is divided by the batch size B
too: the loss is the references' / B, so ssl_weight keeps its meaning.
Choices where the references differ: negatives are the batch's *unique* nodes (Eq. 10; the
official TF code; SGL-Torch contrasts with every node, RecBole with the batch rows, repeats
included); kept-edge and dropped-node counts use round(), not int() (at most one apart).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fettle_jax import graphs
from fettle_jax import losses
from fettle_jax.backbones import lightgcn
from fettle_jax.errors import ConfigError
from fettle_jax.types import Array, Batch, Representations

AUGMENTATIONS = ("ED", "ND", "RW")


def default_config() -> ml_collections.ConfigDict:
  """`config.sgl`; RecBole's SGL.yaml unless said otherwise (paper values noted)."""
  return ml_collections.ConfigDict({
      # str: view operator 'ED' | 'ND' | 'RW'; RecBole 'ED' (the paper's main SGL-ED).
      "type": "ED",
      # int: LightGCN layers K (main task and views); RecBole 3, the paper's main 3-layer SGL.
      "n_layers": 3,
      # float: InfoNCE temperature tau (Eq. 9); RecBole 0.5; the paper's (and official
      # code's) choice 0.2, from the grid {0.1, 0.2, 0.5, 1.0}.
      "ssl_tau": 0.5,
      # float: lambda_1, weight of L_ssl (Eq. 11); RecBole 0.05; paper grid
      # {0.005, 0.01, 0.05, 0.1, 0.5, 1.0} (official: 0.1 Yelp2018, 0.5 Amazon-Book).
      "ssl_weight": 0.05,
      # float: rho, share of edges (ED, RW) or of nodes (ND) dropped per view; RecBole 0.1,
      # paper 0.1 (grid {0, 0.1, ..., 0.5}).
      "drop_ratio": 0.1,
      # float: lambda_2, L2 on the batch's ego embeddings; the official SGL's 1e-4 (Yelp2018),
      # as lightgcn here: RecBole's 1e-5 goes with its unsquared-norm EmbLoss, not ours.
      "reg_weight": 1e-4,
  })


def check_config(cfg) -> None:
  """One-line errors for `config.sgl` (the train loop calls it before loading data)."""
  if cfg.type not in AUGMENTATIONS:
    raise ConfigError(f"sgl.type must be one of {AUGMENTATIONS}, got {cfg.type!r}")
  if not 0.0 <= cfg.drop_ratio < 1.0:
    raise ConfigError(f"sgl.drop_ratio must lie in [0, 1), got {cfg.drop_ratio}")
  if cfg.ssl_tau <= 0:
    raise ConfigError(f"sgl.ssl_tau must be positive, got {cfg.ssl_tau}")
  if cfg.n_layers < 1:
    raise ConfigError(f"sgl.n_layers must be >= 1 (views differ only after propagation), "
                      f"got {cfg.n_layers}")


def build_graph(train_pairs, n_users, n_items, features, config):
  train_pairs = np.asarray(train_pairs)
  structures = lightgcn.build_graph(train_pairs, n_users, n_items, features, config)
  structures["edges"] = graphs.bipartite_edges(train_pairs[:, 0], train_pairs[:, 1], n_users,
                                               n_items)
  return structures


init = lightgcn.init


# ----------------------------------------------------------------------------- graph views


def edge_dropout_graph(rng: Array, edges: graphs.BipartiteEdges, n_users: int, n_items: int,
                       ratio: float) -> graphs.Graph:
  """ED (Eq. 7): round((1 - ratio)|E|) edges, uniform without replacement, renormalized."""
  n_keep = graphs.n_kept_edges(edges.users.shape[0], ratio)
  kept = graphs.sample_without_replacement(rng, jnp.zeros_like(edges.log_weights), n_keep)
  return graphs.bipartite_subgraph(edges, kept, n_users, n_items)


def node_keep_mask(rng: Array, n_nodes: int, ratio: float) -> Array:
  """1.0 for kept nodes, 0.0 for round(ratio * n) dropped ones drawn uniformly without
  replacement (a fixed count, as the official SGL and RecBole draw; marginally each node is
  dropped with probability ~ratio)."""
  n_drop = min(n_nodes - 1, int(round(ratio * n_nodes)))
  mask = jnp.ones((n_nodes,), jnp.float32)
  if n_drop <= 0:
    return mask
  dropped = graphs.sample_without_replacement(rng, jnp.zeros((n_nodes,), jnp.float32), n_drop)
  return mask.at[dropped].set(0.0)


def node_dropout_graph(edges: graphs.BipartiteEdges, keep_users: Array, keep_items: Array,
                       n_users: int, n_items: int) -> graphs.Graph:
  """ND (Eq. 6) with static shapes: every edge stays, m_e = keep(u) keep(i), weights
  m_e / sqrt(d_u d_i) with the surviving degrees d = sum of m_e (D^-1/2 A' D^-1/2 of the
  masked graph). 2|E| directed edges sorted by receiver, like graphs.bipartite_subgraph."""
  mask = keep_users[edges.users] * keep_items[edges.items]
  user_inv = jax.lax.rsqrt(jnp.maximum(jax.ops.segment_sum(mask, edges.users, n_users), 1.0))
  item_inv = jax.lax.rsqrt(jnp.maximum(jax.ops.segment_sum(mask, edges.items, n_items), 1.0))
  weights = mask * user_inv[edges.users] * item_inv[edges.items]  # (user, item) edge order
  by_item = edges.by_item
  senders = jnp.concatenate([edges.items + n_users, edges.users[by_item]])
  receivers = jnp.concatenate([edges.users, edges.items[by_item] + n_users])
  return graphs.Graph(senders, receivers, jnp.concatenate([weights, weights[by_item]]))


def _one_graph(rng, edges, n_users, n_items, cfg) -> graphs.Graph:
  if cfg.type == "ND":
    user_rng, item_rng = jax.random.split(rng)
    return node_dropout_graph(edges, node_keep_mask(user_rng, n_users, cfg.drop_ratio),
                              node_keep_mask(item_rng, n_items, cfg.drop_ratio),
                              n_users, n_items)
  return edge_dropout_graph(rng, edges, n_users, n_items, cfg.drop_ratio)


def draw_views(rng: Array, edges: graphs.BipartiteEdges, n_users: int, n_items: int,
               cfg) -> graphs.Graph:
  """The epoch's two views as one Graph of [2, G, n_directed_edges] arrays: view v's
  layer-k graph is [v, k] for RW (G = n_layers, a fresh ED graph per layer, Eq. 8) and
  [v, 0] for every layer under ED and ND (G = 1: one graph shared by the layers)."""
  n_graphs = cfg.n_layers if cfg.type == "RW" else 1
  rngs = jax.random.split(rng, 2 * n_graphs)
  stacked = jax.vmap(lambda r: _one_graph(r, edges, n_users, n_items, cfg))(rngs)
  return graphs.Graph(*(a.reshape((2, n_graphs) + a.shape[1:]) for a in stacked))


def init_state(rng, static, info, config):
  """The first epoch's views (epoch_start redraws them before each epoch's steps)."""
  check_config(config.sgl)
  return {"views": draw_views(rng, static.graph["edges"], info.n_users, info.n_items,
                              config.sgl)}


def epoch_start(params, model_state, static, info, rng, config):
  """Two fresh views per epoch, as both reference implementations redraw them."""
  del params, model_state
  return init_state(rng, static, info, config)


# ----------------------------------------------------------------------------- forward and loss


def _ego(params) -> Array:
  return jnp.concatenate([params["user_embedding"], params["item_embedding"]], axis=0)


def view_representations(ego: Array, view: graphs.Graph, n_layers: int) -> Array:
  """LightGCN on one view (arrays [G, E]): mean of e^(0..K), layer k on graph min(k, G-1)."""
  n_graphs = view.senders.shape[0]
  if n_graphs == 1:
    return graphs.mean_of_layers(graphs.Graph(*(a[0] for a in view)), ego, n_layers)
  total, h = ego, ego
  for k in range(n_layers):
    h = graphs.propagate_symmetric(graphs.Graph(*(a[min(k, n_graphs - 1)] for a in view)), h)
    total = total + h
  return total / (n_layers + 1)


def represent(params, model_state, static, config) -> Representations:
  del model_state
  return lightgcn.layer_mean_representations(params, static.graph["user_item"],
                                             config.sgl.n_layers)


def apply(params, model_state, static, batch: Batch, rng, config):
  del rng
  cfg = config.sgl
  reps = represent(params, model_state, static, config)
  loss = lightgcn.bpr_with_ego_l2(params, reps, batch, cfg.reg_weight)
  n_users, ego = params["user_embedding"].shape[0], _ego(params)
  views = model_state["views"]
  z1, z2 = (view_representations(ego, graphs.Graph(*(a[v] for a in views)), cfg.n_layers)
            for v in (0, 1))
  # Eq. 9-10: each distinct batch node's two views, the other distinct nodes as negatives.
  ssl = (losses.distinct_rows_info_nce(z1[:n_users], z2[:n_users], batch.users, cfg.ssl_tau)
         + losses.distinct_rows_info_nce(z1[n_users:], z2[n_users:], batch.pos_items,
                                         cfg.ssl_tau))
  batch_size = batch.users.shape[0]
  return reps, loss + cfg.ssl_weight * ssl / batch_size
