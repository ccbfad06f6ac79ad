"""LATTICE (Zhang et al., ACM MM'21, Mining Latent Structures for Multimedia Recommendation).

Equations as numbered in the arXiv version (2104.09036), per content modality m:
- Initial graph (Sec 3.1.1), frozen, built once in `build_graph`: cosine similarity of the raw
  features S^m_ij (Eq. 1), kNN sparsification that keeps the top-k values of each row, the
  item itself included (Eq. 2), symmetric normalization S~^m = D^-1/2 S^m D^-1/2 with D the
  row sums of the sparsified, weighted S^m (Eq. 3).
- Learned graph (Sec 3.1.2): projected features e~^m_i = W_m e^m_i + b_m (Eq. 4), their
  cosine similarity A^m_ij (Eq. 5), sparsified and normalized as Eq. 2-3 into A^m^; skip
  connection A^m = (1 - lambda) A^m^ + lambda S~^m (Eq. 6).
- Aggregation (Sec 3.1.3): A = sum_m alpha_m A^m, alpha = softmax of learnable logits (Eq. 7).
- Item-item convolution h^(l) = A h^(l-1), h^(0) = item ID embeddings, the last layer kept
  (Eq. 8); combined with LightGCN on the user-item graph (mean of layers 0..K):
  x^_i = x~_i + h_i / ||h_i|| (Eq. 9); score x_u^T x^_i (Eq. 10); BPR (Eq. 11).
`modality_items` exposes e~^m (Eq. 4), LATTICE's own modality embeddings, for alignment.

Speed: the learned graph's neighbours vs its weights. The paper (and the official code)
rebuild the learned kNN graph every step: an all-pairs [n, n] similarity and top-k per step.
Here the k neighbours of each item are re-selected once per epoch in `epoch_start` from the
current projections (block-wise exact top-k, `graphs._knn_blocks`, no gradient) and kept in
`model_state`; the kept edges' weights (cosine of the *current* e~^m, Eq. 5, then Eq. 3's
normalization over the kept edges) are recomputed every step, so W_m and b_m learn through
every step's graph. Within an epoch the neighbour *sets* lag the projections by at most one
epoch; their weights never do.

Where we differ from MMRec's implementation (facts, not code, carried over):
- MMRec rebuilds the learned graph at the first batch of each epoch and detaches it for the
  others, so the projectors (and modality logits) learn from one batch per epoch; here they
  learn every step (above).
- MMRec mixes the *unnormalized* learned kNN graphs with alpha and normalizes the mixture;
  we normalize each modality's learned graph, then mix (Eq. 6-7 of the paper, as the
  initial graphs are in both): A = sum_m alpha_m ((1 - lambda) A^m^ + lambda S~^m).
- MMRec fine-tunes the raw feature tables (embeddings initialized from the features,
  freeze=False); we keep them frozen (only W_m, b_m of Eq. 4 learn): a trainable copy of
  Baby's 7,050 x 4,096 image features would triple with Adam's moments, and in MMRec they
  get a gradient from one batch per epoch anyway.
- MMRec's LightGCN branch propagates on D^-1 (A + I) (row-normalized, self-loops); we use
  LightGCN's D^-1/2 A D^-1/2 (the paper plugs LATTICE into LightGCN as published).
- Degrees <= 0 of a weighted kNN row (possible only with negative cosine neighbours) give
  that row weight 0 instead of MMRec's NaN.
- Projector width = `embedding_size` (MMRec feat_embed_dim 64 = embedding_size 64), so
  e~^m has the width L that alignment losses need.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fettle_jax import graphs
from fettle_jax import layers
from fettle_jax import losses
from fettle_jax.errors import ConfigError
from fettle_jax.types import Array, Batch, DataInfo, Representations


def default_config() -> ml_collections.ConfigDict:
  """`config.lattice`; MMRec's LATTICE.yaml values (first value of a grid)."""
  return ml_collections.ConfigDict({
      "knn_k": 10,  # int: k of the initial and learned kNN graphs (Eq. 2); MMRec knn_k 10
      # float: lambda, weight of the frozen initial graph in the skip connection (Eq. 6);
      # MMRec lambda_coeff 0.9 (the paper's choice).
      "lambda_coeff": 0.9,
      "n_layers": 1,  # int: convolutions on the item-item graph (Eq. 8); MMRec n_layers 1
      # int: LightGCN layers on the user-item graph; MMRec: len(weight_size [64, 64]) = 2.
      "n_ui_layers": 2,
      # float: weight of 1/2 ||.||^2 / B of the batch's final user/item rows (MMRec's
      # bpr_loss regularizer); MMRec grid reg_weight [0.0, 1e-5, 1e-4, 1e-3] -> 0.0.
      "reg_weight": 0.0,
      "knn_block_size": 1024,  # int: item rows per block of the exact top-k (memory, not math)
  })


def check_config(cfg) -> None:
  """One-line errors for `config.lattice` (the train loop calls it before loading data)."""
  # ConfigDict is type-safe: the int fields stay ints; only their ranges need checks.
  for field, low in (("knn_k", 1), ("knn_block_size", 1), ("n_layers", 0), ("n_ui_layers", 0)):
    if cfg[field] < low:
      raise ConfigError(f"lattice.{field} must be >= {low}, got {cfg[field]}")
  if not 0.0 <= cfg.lambda_coeff <= 1.0:
    raise ConfigError(f"lattice.lambda_coeff must lie in [0, 1], got {cfg.lambda_coeff}")
  if cfg.reg_weight < 0:
    raise ConfigError(f"lattice.reg_weight must be >= 0, got {cfg.reg_weight}")


# ----------------------------------------------------------------------------- contract


def build_graph(train_pairs, n_users, n_items, features, config):
  """The normalized user-item graph and, per modality, the frozen initial kNN graph
  (Eq. 1-3): neighbours [n, k] (row i receives from neighbours[i]) and their weights."""
  cfg = config.lattice
  if not features:
    raise ConfigError("LATTICE needs at least one content modality (its item-item graphs are "
                      "built from the features)")
  train_pairs = np.asarray(train_pairs)
  initial = {}
  for name in sorted(features):
    neighbours = graphs.knn_neighbours(features[name], cfg.knn_k, cfg.knn_block_size)
    weights = graphs.normalized_knn_weights(
        neighbours, graphs.host_edge_cosine(features[name], neighbours))
    initial[name] = {"neighbours": jnp.asarray(neighbours, jnp.int32),
                     "weights": jnp.asarray(weights, jnp.float32)}
  return {
      "user_item": graphs.user_item_graph(train_pairs[:, 0], train_pairs[:, 1], n_users, n_items),
      "initial": initial,
  }


def init(rng, data_info: DataInfo, config):
  table_rng, proj_rng = jax.random.split(rng)
  size = config.embedding_size
  params = layers.init_embedding_tables(table_rng, data_info.n_users, data_info.n_items, size)
  params["projectors"] = layers.init_feature_projectors(proj_rng, data_info.feature_dims, size)
  # Equal logits -> alpha_m = 1/|M| at the start (MMRec: [0.5, 0.5] before the softmax).
  params["modality_logits"] = jnp.zeros((len(data_info.feature_dims),), jnp.float32)
  return params


def init_state(rng, static, info, config):
  """The learned graphs' neighbour sets. `epoch_start` selects them from the projections
  before every epoch's steps; until then (no params here) the initial graphs' neighbours.
  Copies: the train loop donates the model state, never the static inputs."""
  del rng, info
  check_config(config.lattice)
  return {"learned_neighbours": {name: jnp.copy(g["neighbours"])
                                 for name, g in sorted(static.graph["initial"].items())}}


def epoch_start(params, model_state, static, info, rng, config):
  """Re-selects each modality's learned kNN neighbours from the current e~^m (Eq. 4-5)."""
  del model_state, info, rng
  cfg = config.lattice
  projected = layers.project_features(params["projectors"], static.features)
  return {"learned_neighbours": {
      name: graphs.select_neighbours(x, cfg.knn_k, cfg.knn_block_size)
      for name, x in sorted(projected.items())}}


def modality_mixing(params) -> Array:
  """alpha_m of Eq. 7 in sorted modality order: softmax of the learnable logits."""
  return jax.nn.softmax(params["modality_logits"])


def item_item_graph(params, model_state, static, config):
  """A = sum_m alpha_m ((1 - lambda) A^m^ + lambda S~^m) (Eq. 6-7) as one Graph, and e~^m.

  Every item receives from 2k neighbours per modality (learned, initial); the edges are laid
  out [n, 2k|M|] by receiver, so the flat list is receiver-sorted with no sort. An (i, j)
  present in several graphs is several edges whose messages sum, i.e. the summed matrix.
  """
  cfg = config.lattice
  lam = cfg.lambda_coeff
  projected = layers.project_features(params["projectors"], static.features)  # Eq. 4
  alpha = modality_mixing(params)
  senders, weights = [], []
  for m, name in enumerate(sorted(projected)):
    initial = static.graph["initial"][name]
    learned = model_state["learned_neighbours"][name]
    # Eq. 5 at this epoch's kept edges, from this step's projections; then Eq. 3.
    similarity = graphs.edge_cosine(losses.l2_normalize(projected[name]), learned)
    senders += [initial["neighbours"], learned]
    weights += [alpha[m] * lam * initial["weights"],
                alpha[m] * (1.0 - lam) * graphs.normalized_knn_weights(learned, similarity)]
  senders = jnp.concatenate(senders, axis=1)
  n, width = senders.shape
  receivers = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, width))
  graph = graphs.Graph(senders.reshape(-1), receivers.reshape(-1),
                       jnp.concatenate(weights, axis=1).reshape(-1))
  return graph, projected


def represent(params, model_state, static, config) -> Representations:
  cfg = config.lattice
  graph, projected = item_item_graph(params, model_state, static, config)
  h = params["item_embedding"]
  for _ in range(cfg.n_layers):  # Eq. 8: h^(l) = A h^(l-1), the last layer kept
    h = graphs.propagate_csr(graph, h)  # learned weights differentiated without scatters
  users, items = params["user_embedding"], params["item_embedding"]
  n_users = users.shape[0]
  final = graphs.mean_of_layers(static.graph["user_item"],  # LightGCN, x~_u and x~_i
                                jnp.concatenate([users, items], axis=0), cfg.n_ui_layers)
  # Eq. 9: x^_i = x~_i + h_i / ||h_i||.
  items_final = final[n_users:] + losses.l2_normalize(h)
  return Representations(final[:n_users], items_final, dict(sorted(projected.items())))


def apply(params, model_state, static, batch: Batch, rng, config):
  del rng
  cfg = config.lattice
  reps = represent(params, model_state, static, config)
  u = reps.users[batch.users]
  pos, neg = reps.items[batch.pos_items], reps.items[batch.neg_items]
  loss = losses.bpr_loss(u, pos, neg)  # Eq. 11
  if cfg.reg_weight:  # MMRec's regularizer: 1/2 sum of squared final rows / B
    loss = loss + cfg.reg_weight * 0.5 * losses.embedding_l2(u, pos, neg)
  return reps, loss
