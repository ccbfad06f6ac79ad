"""DualGNN (Wang et al., IEEE TMM'21): per-modality user-item GCNs, a per-user fusion of the
modalities, and a user co-occurrence graph that propagates the fused user representation.

Single-modal representation learning (one GCN per content modality m, shared user-item
graph): the item input is its projected content feature, i^m_0 = MLP_m(f^m_i) with
MLP_m = W2 leaky_relu(W1 f + b1) + b2 (width d_m -> 4L -> L), the user input a free
per-modality preference p^m_u; both are L2-normalized rows x^m = [p^m; i^m_0] / ||.||.
Propagation without weights or non-linearity on A~ = D^-1/2 A D^-1/2 (the normalized
bipartite graph, no self-loops), read out as the SUM of layers: x^m_hat = sum_{l=0..K} A~^l x^m.
Multi-modal fusion ("weighted sum", MMRec's construction): u = sum_m w_{u,m} u^m_hat with a
learnable weight per user and modality (initialized to a softmax over modalities);
items i = sum_m i^m_hat (unweighted).
User co-occurrence graph: each user's top-k other users by the number of shared train items
c_uv; the fused user representation is propagated one step on it,
u* = u + sum_{v in N_k(u)} a_uv u_v, with a_uv = softmax_v(c_uv) over u's neighbours
('softmax', MMRec's user aggregation; 'mean': 1/|N_k(u)|). Score y_ui = u*^T i.
Loss: BPR(u*, i) + reg_weight * (sum_m mean(p^m_u^2 over the batch's users) + mean(w^2)).
The graph is built once on the host (`cached_structures`, block-wise over user rows, never an
[n_users, n_users] matrix) and cached by the train loop next to the data.
`modality_items` exposes i^m_hat, the backbone's own modality-specific item representations.

Where we differ from the MMRec implementation (facts, not code, carried over):
- user fusion follows the paper, u = sum_m w_{u,m} u^m_hat. MMRec adds the text GCN output
  in place onto the image one (`representation += t_rep` aliases v_rep), so its fused user is
  w_v (v + t) + w_t t;
- a user with fewer than k co-occurring users aggregates only its real neighbours (the
  softmax over them). MMRec pads the list every epoch with random duplicates of its own
  neighbours (a duplicate doubles that neighbour's share); we keep the graph deterministic,
  without an epoch hook. Ties in c_uv go to the lower user id (MMRec: torch.topk's order,
  unspecified). MMRec's 200-neighbour pre-truncation never binds at k = 40;
- MMRec builds an item-dropped graph per modality (drop_rate 0.1) that its GCN never reads,
  and an item weight table `weight_i` used only in the L2 term; both are left out;
- BPR with the natural log (the shared `losses.bpr_loss`, FETTLE Eq. 10), MMRec log2: our
  BPR is ln 2 times MMRec's, so reg_weight weighs ~1.44x more against it;
- Xavier-uniform initialization everywhere (the FETTLE paper's, Sec 4.1); MMRec Xavier-normal
  preferences and torch's default Linear init; the shared learning rate 1e-3 (FETTLE Sec 4.1,
  as every backbone here), where MMRec's DualGNN grid starts at 0.1;
- with one modality the per-user weight still applies (a learnable per-user scale); MMRec
  then uses that modality's output unweighted;
- evaluation recomputes the representations from the current parameters (MMRec ranks with the
  ones cached by the last training forward).
"""

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.sparse

from fettle_jax import graphs
from fettle_jax import layers
from fettle_jax import losses
from fettle_jax.errors import ConfigError
from fettle_jax.types import Batch, DataInfo, Representations

USER_AGGREGATIONS = ("softmax", "mean")
# Host memory per block of the co-occurrence top-k: a block holds [rows, n_users] counts
# (int32) and sort keys (int64) plus argpartition's indices (int64), ~24 bytes an entry.
COOCCURRENCE_BLOCK_BYTES = 96 << 20


def default_config() -> ml_collections.ConfigDict:
  """`config.dualgnn`; MMRec's DualGNN values (configs/model/DualGNN.yaml, models/dualgnn.py)."""
  return ml_collections.ConfigDict({
      # int: GCN layers K per modality (sum readout over 0..K); DualGNN.yaml n_layers 2, and
      # MMRec's GCN applies its convolution twice.
      "n_layers": 2,
      # int: neighbours per user in the co-occurrence graph; MMRec dualgnn.py k = 40.
      "user_k": 40,
      # str: 'softmax' (a_uv = softmax of shared-item counts) | 'mean' (1/|N(u)|);
      # MMRec dualgnn.py user_aggr_mode 'softmax'.
      "user_aggregation": "softmax",
      # float: L2 weight on the batch's preferences and the fusion weights; DualGNN.yaml grid
      # [0.1, 0.01, 0.001, 0.0001, 0.00001], its first value.
      "reg_weight": 0.1,
      # int: hidden width of the feature MLP in units of L; MMRec's GCN 4 * dim_latent.
      "mlp_hidden_factor": 4,
  })


def check_config(cfg) -> None:
  """One-line errors for `config.dualgnn` (the train loop calls it before loading data)."""
  if cfg.user_aggregation not in USER_AGGREGATIONS:
    raise ConfigError(f"dualgnn.user_aggregation must be one of {USER_AGGREGATIONS}, "
                      f"got {cfg.user_aggregation!r}")
  if int(cfg.user_k) != cfg.user_k or cfg.user_k < 1:
    raise ConfigError(f"dualgnn.user_k must be a positive integer, got {cfg.user_k}")
  if int(cfg.n_layers) != cfg.n_layers or cfg.n_layers < 0:
    raise ConfigError(f"dualgnn.n_layers must be a non-negative integer, got {cfg.n_layers}")
  if int(cfg.mlp_hidden_factor) != cfg.mlp_hidden_factor or cfg.mlp_hidden_factor < 1:
    raise ConfigError(f"dualgnn.mlp_hidden_factor must be a positive integer, "
                      f"got {cfg.mlp_hidden_factor}")
  if not cfg.reg_weight >= 0:  # also rejects NaN
    raise ConfigError(f"dualgnn.reg_weight must be >= 0, got {cfg.reg_weight}")


# ----------------------------------------------------------------------------- user co-occurrence graph
# Host-side, once per train split (should move to graphs.py: generic, not DualGNN's own).


def cooccurrence_topk(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, k: int,
                      block_rows: int = None) -> Tuple[np.ndarray, np.ndarray]:
  """Each user's top-k other users by the number of distinct items both interacted with.

  Returns (neighbours int32 [n_users, k'], counts int32 [n_users, k']), k' = min(k, n_users-1),
  best first; ties in the count go to the lower user id (deterministic). Slots beyond a
  user's co-occurring users (count 0) hold neighbour -1 and count 0. C = A A^T (A the 0/1
  user-item matrix) is formed `block_rows` user rows at a time from sparse A, so memory is
  O(block_rows * n_users), never the [n_users, n_users] matrix.
  """
  users = np.asarray(users, np.int64)
  items = np.asarray(items, np.int64)
  k = max(0, min(int(k), n_users - 1))
  neighbours = np.full((n_users, k), -1, np.int32)
  counts = np.zeros((n_users, k), np.int32)
  if k == 0:
    return neighbours, counts
  a = scipy.sparse.csr_matrix((np.ones(len(users), np.int32), (users, items)),
                              shape=(n_users, n_items))
  a.sum_duplicates()
  a.data[:] = 1  # a repeated (user, item) pair is one shared item, not two
  a_t = a.T.tocsr()
  if block_rows is None:
    block_rows = COOCCURRENCE_BLOCK_BYTES // (24 * n_users)
  block_rows = max(1, min(int(block_rows), n_users))
  # Sort key: count first, then the LOWER id (n_users - 1 - v larger): unique per row, so
  # argpartition + a sort of the k winners gives the exact, deterministic order.
  id_key = (n_users - 1 - np.arange(n_users, dtype=np.int64))[None, :]
  for start in range(0, n_users, block_rows):
    stop = min(start + block_rows, n_users)
    block = (a[start:stop] @ a_t).toarray()  # [rows, n_users] shared-item counts
    rows = np.arange(stop - start)
    block[rows, rows + start] = 0  # a user is not its own neighbour
    key = block.astype(np.int64) * n_users + id_key
    if k < n_users:
      top = np.argpartition(-key, k - 1, axis=1)[:, :k]
    else:
      top = np.broadcast_to(np.arange(n_users), key.shape)
    order = np.argsort(-np.take_along_axis(key, top, axis=1), axis=1)
    top = np.take_along_axis(top, order, axis=1)
    top_counts = np.take_along_axis(block, top, axis=1)
    neighbours[start:stop] = np.where(top_counts > 0, top, -1)
    counts[start:stop] = top_counts
  return neighbours, counts


def neighbour_weights(counts: np.ndarray, aggregation: str) -> np.ndarray:
  """a_uv over each row's real neighbours (count > 0): softmax of the counts or uniform;
  0 on empty slots, so a user without co-occurring users aggregates nothing."""
  real = counts > 0
  if aggregation == "mean":
    weights = real.astype(np.float64)
  else:
    logits = np.where(real, counts.astype(np.float64), -np.inf)
    top = np.max(logits, axis=1, keepdims=True)
    weights = np.where(real, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
  total = weights.sum(axis=1, keepdims=True)
  return (weights / np.where(total > 0, total, 1.0)).astype(np.float32)


def cached_structures(train_pairs, n_users, n_items, config) -> Dict[str, np.ndarray]:
  """The user co-occurrence graph as receiver-sorted edges v -> u with weights a_uv (only
  real neighbours: at most n_users * k edges). Pure and host-side; the train loop caches it."""
  cfg = config.dualgnn
  check_config(cfg)
  train_pairs = np.asarray(train_pairs)
  neighbours, counts = cooccurrence_topk(train_pairs[:, 0], train_pairs[:, 1], n_users,
                                         n_items, cfg.user_k)
  weights = neighbour_weights(counts, cfg.user_aggregation)
  real = neighbours >= 0
  receivers = np.broadcast_to(np.arange(n_users, dtype=np.int32)[:, None], real.shape)[real]
  # Row-major masking keeps the receivers non-decreasing (propagate's sorted segments).
  return {"user_user_senders": neighbours[real].astype(np.int32),
          "user_user_receivers": receivers.astype(np.int32),
          "user_user_weights": weights[real]}


def user_graph(structures) -> graphs.Graph:
  return graphs.Graph(structures["user_user_senders"], structures["user_user_receivers"],
                      structures["user_user_weights"])


# ----------------------------------------------------------------------------- model


def build_graph(train_pairs, n_users, n_items, features, config):
  del config
  if not features:
    raise ConfigError("DualGNN needs at least one content modality (its per-modality GCNs "
                      "start from the item features)")
  train_pairs = np.asarray(train_pairs)
  # The user-user graph comes from cached_structures (merged in by the train loop).
  return {"user_item": graphs.user_item_graph(train_pairs[:, 0], train_pairs[:, 1], n_users,
                                              n_items)}


def init(rng, data_info: DataInfo, config):
  names = sorted(data_info.feature_dims)
  size, hidden = config.embedding_size, config.dualgnn.mlp_hidden_factor * config.embedding_size
  pref_rng, weight_rng, mlp_rng = jax.random.split(rng, 3)
  mlp_rngs = jax.random.split(mlp_rng, 2 * max(len(names), 1))
  projectors = {
      name: {"hidden": layers.init_linear(mlp_rngs[2 * i], data_info.feature_dims[name], hidden),
             "output": layers.init_linear(mlp_rngs[2 * i + 1], hidden, size)}
      for i, name in enumerate(names)}
  return {
      # p^m_u, [n_users, M, L] (modalities in sorted order): one row-sharded table.
      "user_embedding": layers.xavier_uniform(pref_rng, (data_info.n_users, len(names), size)),
      # w_{u,m}: softmax over modalities at init (MMRec), free afterwards (L2-regularized).
      "user_modality_weights": jax.nn.softmax(
          layers.xavier_uniform(weight_rng, (data_info.n_users, len(names))), axis=1),
      "projectors": projectors,
  }


def feature_mlp(projector, features):
  """i^m_0 = W2 leaky_relu(W1 f + b1) + b2 (MMRec's GCN MLP; torch's slope 0.01)."""
  return layers.linear(projector["output"],
                       jax.nn.leaky_relu(layers.linear(projector["hidden"], features), 0.01))


def _forward(params, static, config) -> Representations:
  cfg = config.dualgnn
  names = sorted(params["projectors"])
  preferences = params["user_embedding"]  # [n_users, M, L]
  n_users, n_modalities, size = preferences.shape
  # x^m = row-normalized [p^m; MLP_m(f^m)]; the modalities share the graph, so they go
  # side by side in one [n_nodes, M * L] array: one propagation for all of them.
  inputs = [losses.l2_normalize(jnp.concatenate(
      [preferences[:, m], feature_mlp(params["projectors"][name], static.features[name])], 0))
            for m, name in enumerate(names)]
  x = jnp.concatenate(inputs, axis=1)
  # x_hat = sum_{l=0..K} A~^l x  = (K + 1) * the LightGCN layer mean.
  x_hat = graphs.mean_of_layers(static.graph["user_item"], x, cfg.n_layers) * (cfg.n_layers + 1)
  x_hat = x_hat.reshape(x.shape[0], n_modalities, size)
  per_modality_users, per_modality_items = x_hat[:n_users], x_hat[n_users:]
  # Fusion: u = sum_m w_{u,m} u^m_hat; i = sum_m i^m_hat.
  users = jnp.einsum("um,uml->ul", params["user_modality_weights"], per_modality_users)
  items = jnp.sum(per_modality_items, axis=1)
  # The second graph: u* = u + sum_v a_uv u_v on the user co-occurrence graph.
  users = users + graphs.propagate(user_graph(static.graph), users)
  modality_items = {name: per_modality_items[:, m] for m, name in enumerate(names)}
  return Representations(users, items, modality_items)


def represent(params, model_state, static, config) -> Representations:
  del model_state
  return _forward(params, static, config)


def apply(params, model_state, static, batch: Batch, rng, config):
  del rng
  reps = represent(params, model_state, static, config)
  loss = losses.bpr_loss(reps.users[batch.users], reps.items[batch.pos_items],
                         reps.items[batch.neg_items])
  # MMRec's L2: per modality the mean square of the batch users' preferences, plus the
  # mean square of every fusion weight.
  preferences = params["user_embedding"][batch.users]  # [B, M, L]
  reg = (jnp.sum(jnp.mean(jnp.square(preferences), axis=(0, 2)))
         + jnp.mean(jnp.square(params["user_modality_weights"])))
  return reps, loss + config.dualgnn.reg_weight * reg
