"""GRCN (Wei et al., ACM MM'20): Graph-Refined Convolutional Network.

GRCN refines the user-item graph inside every forward pass, then convolves on the refined
graph. Notation: U users, I items, M content modalities, L = config.embedding_size. Every
step below works on the train graph's edge list (2|E| directed edges, sorted by receiver),
never a dense user-item matrix: per-edge scores are row gathers, aggregations are CSR
products, and so are their gradients (`graphs.weighted_propagate`, `graphs.edge_dot`:
custom VJPs, since XLA's CPU scatter-add, the transpose of a gather, was the bottleneck).

Graph refining layer (paper Sec 3.2), per modality m:
  prototypical network: f_i = normalize(leaky_relu(W_m x_i^m + b_m)), the item's content
    in the preference space; p_u = normalize(P_u^m), a learned user preference;
  routing (T = n_routing iterations): r_ui = softmax_{i in N(u)}(p_u . f_i),
    p_u <- normalize(p_u + sum_{i in N(u)} r_ui f_i)  (the user's modality-specific
    preference, pulled toward the items it agrees with);
  affinity: s_ui^m = cos(p_u, f_i) = p_u . f_i (both unit vectors);
  soft pruning: relu(s_ui^m) (edges scored as likely false positives get weight 0), then,
    per receiving node r, normalized to sum 1: a_e^m = relu(s_e^m) / max(sum_{e' -> r}
    relu(s_e'^m), eps) (why: see the differences below);
  integration (weight_mode): 'confid' w_e = relu(max_m c_{src(e)}^m a_e^m) with a learned
    confidence c_n in R^M per node, the sending node's (as MMRec); 'mean' mean_m a_e^m;
    'max' max_m a_e^m.
Graph convolution (Sec 3.3) on the refined graph:
  ID: x = normalize([E_user; E_item]), h^(k+1) = A_w h^(k) for k < n_id_layers (A_w[r, s] =
    w_sr, sum aggregation, no activation), h_id = x + h^(1) + ... + h^(K);
  modality m: z^m = [p^m; f^m], h^m = z^m + A_{a^m} z^m (users' routed preferences, items'
    projected content, each convolved once on the modality's own refined weights).
Prediction (Sec 3.4): y_ui = u . i with u, i fused by `fusion` (below). Loss: BPR +
reg_weight * (element mean of the batch's squared ID rows + the batch users' preferences).
`modality_items` exposes h^m's item rows (FETTLE aligns them with the ID side).

Where we differ from the MMRec implementation (facts, not code, carried over):
- fusion: MMRec concatenates [h_id, h^image, h^text] ((1+M) L wide). The alignment
  plug-ins score u . i^m and align reps.items with modality_items in one L-dim space, which a
  concatenation cannot give, so the default is GRCN's own 'mean' option (h_id + sum_m h^m) /
  (1 + M), L-dim; 'concat' (MMRec) is available with alignment 'none' only.
- routing updates the users' preferences, as the paper writes: MMRec's messages flow
  user -> item during routing, so its users receive nothing and routing leaves p_u at its
  initial value.
- edge scores: MMRec's per-modality score is a softmax (over each receiver's edges) of the
  affinity, always positive, so its relu prunes only through negative confidences; we prune
  the cosine itself (negative -> 0, the paper's soft pruning) and keep MMRec's property that
  a receiver's weights sum to 1 (a weighted mean, not a degree-sized sum) by dividing the
  pruned scores by their sum instead of by the softmax partition function.
- the confidence table gets no L2 (MMRec computes one but never adds it), nor does the whole
  image preference table (MMRec adds mean(P_image^2) over all users, image only); the
  batch users' preferences are regularized for every modality, as MMRec does.
- every parameter is Xavier-uniform (MMRec: Xavier-normal; the FETTLE paper: Xavier), the
  projector bias starts at 0; the learning rate is the shared config.learning_rate (Adam
  1e-3, FETTLE Sec 4.1), not the first value of MMRec's GRCN grid (1, then 0.1, ..., 1e-4).
"""

from typing import Dict, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fettle_jax import graphs
from fettle_jax import layers
from fettle_jax import losses
from fettle_jax.errors import ConfigError
from fettle_jax.types import Array, Batch, DataInfo, Representations

WEIGHT_MODES = ("confid", "mean", "max")
FUSIONS = ("mean", "concat", "id")
# Floor of a receiver's summed pruned affinities: below it the weights shrink toward 0
# with the affinities (continuous), instead of dividing by ~0.
_AFFINITY_TOTAL_FLOOR = 1e-4


def default_config() -> ml_collections.ConfigDict:
  """`config.grcn`; MMRec's GRCN values (GRCN.yaml and the constants of its model)."""
  return ml_collections.ConfigDict({
      # int: routing iterations T of the prototypical network; MMRec GRCN.yaml n_layers 3
      # (which MMRec passes to the modality networks as their routing count).
      "n_routing": 3,
      # int: graph-conv layers on the ID embeddings; MMRec's ID network has 2, fixed.
      "n_id_layers": 2,
      # str: how modality scores become one edge weight: 'confid' | 'mean' | 'max';
      # MMRec weight_mode 'confid' (the paper's and official code's three options).
      "weight_mode": "confid",
      # str: 'mean' | 'concat' | 'id' (GRCN's fusion options); MMRec 'concat', here 'mean':
      # the alignment plug-ins need L-dim users and items (module docstring).
      "fusion": "mean",
      # float: weight of the L2 term; MMRec GRCN.yaml grid [0.1, 0.01, ..., 1e-5], first 0.1.
      "reg_weight": 0.1,
  })


def check_config(cfg) -> None:
  """One-line errors for `config.grcn` (the train loop calls it before loading data)."""
  if cfg.weight_mode not in WEIGHT_MODES:
    raise ConfigError(f"grcn.weight_mode must be one of {WEIGHT_MODES}, got {cfg.weight_mode!r}")
  if cfg.fusion not in FUSIONS:
    raise ConfigError(f"grcn.fusion must be one of {FUSIONS}, got {cfg.fusion!r}")
  if cfg.n_routing < 0:
    raise ConfigError(f"grcn.n_routing must be >= 0, got {cfg.n_routing}")
  if cfg.n_id_layers < 0:
    raise ConfigError(f"grcn.n_id_layers must be >= 0, got {cfg.n_id_layers}")
  if cfg.reg_weight < 0:
    raise ConfigError(f"grcn.reg_weight must be >= 0, got {cfg.reg_weight}")


# ----------------------------------------------------------------------------- the edge list


class BipartiteDirectedEdges(NamedTuple):
  """Both directions of every train interaction over U + I nodes (items offset by U),
  sorted by receiver: the first |E| edges are item -> user (receivers are users, ascending),
  the last |E| user -> item (receivers are items, ascending). `users` / `items` are each
  edge's endpoints (item ids not offset), whichever way it points; `reverse[e]` is the
  position of e's opposite edge (an involution)."""
  senders: Array    # int32 [2E]
  receivers: Array  # int32 [2E], non-decreasing
  users: Array      # int32 [2E]
  items: Array      # int32 [2E]
  reverse: Array    # int32 [2E]


def bipartite_directed_edges(users: np.ndarray, items: np.ndarray, n_users: int,
                             n_items: int) -> BipartiteDirectedEdges:
  """Host-side: the directed edge list the refinement scores and the convolutions use."""
  users = np.asarray(users, np.int64)
  items = np.asarray(items, np.int64)
  n_nodes = n_users + n_items
  senders = np.concatenate([items + n_users, users])
  receivers = np.concatenate([users, items + n_users])
  order = np.lexsort((senders, receivers))
  senders, receivers = senders[order], receivers[order]
  keys = receivers * n_nodes + senders  # ascending: receiver-major
  reverse = np.searchsorted(keys, senders * n_nodes + receivers)
  return BipartiteDirectedEdges(*(jnp.asarray(a, jnp.int32) for a in (
      senders, receivers, np.concatenate([users, users])[order],
      np.concatenate([items, items])[order], reverse)))


def edge_lists(edges: BipartiteDirectedEdges):
  """(to_users, full): the item -> user half (routing, affinities; its transpose is the
  user -> item half) and the whole directed list (convolutions; its own transpose)."""
  n_half = edges.senders.shape[0] // 2
  head, tail = slice(None, n_half), slice(n_half, None)
  to_users = graphs.EdgeList(edges.senders[head], edges.receivers[head],
                             edges.senders[tail], edges.receivers[tail], edges.reverse[tail])
  full = graphs.EdgeList(edges.senders, edges.receivers, edges.senders, edges.receivers,
                         edges.reverse)
  return to_users, full


def segment_normalized(values: Array, segments: Array, n_segments: int,
                       floor: float = 0.0) -> Array:
  """values_e / max(sum of values over e's segment, floor): per-receiver normalization of
  non-negative edge scores (segments sorted)."""
  totals = jax.ops.segment_sum(values, segments, num_segments=n_segments,
                               indices_are_sorted=True)
  return values / jnp.maximum(totals, floor)[segments]


def route_preferences(preferences: Array, item_content: Array, edges: BipartiteDirectedEdges,
                      n_routing: int) -> Array:
  """The prototypical network's routing (paper Sec 3.2.1): T rounds of
  r_ui = softmax_{i in N(u)}(p_u . f_i), p_u <- normalize(p_u + sum_i r_ui f_i).
  preferences [U, L] (raw), item_content [I, L] unit rows f_i; returns unit p [U, L]."""
  n_users = preferences.shape[0]
  to_users, _ = edge_lists(edges)
  p = losses.l2_normalize(preferences)
  for _ in range(n_routing):
    nodes = jnp.concatenate([p, item_content], axis=0)
    # |p . f| <= 1 (unit vectors): exp cannot overflow, no max-shift needed.
    r = segment_normalized(jnp.exp(graphs.edge_dot(to_users, nodes)), to_users.receivers, n_users)
    p = losses.l2_normalize(p + graphs.weighted_propagate(to_users, r, nodes)[:n_users])
  return p


def pruned_affinities(user_pref: Array, item_content: Array,
                      edges: BipartiteDirectedEdges) -> Array:
  """a_e^m (Sec 3.2.2): relu(cos(p_u, f_i)) on every directed edge, divided by the sum over
  the edge's receiver (module docstring); [2E], in `edges` order."""
  n_nodes = user_pref.shape[0] + item_content.shape[0]
  to_users, _ = edge_lists(edges)
  kept = jax.nn.relu(graphs.edge_dot(to_users, jnp.concatenate([user_pref, item_content], axis=0)))
  both = jnp.concatenate([kept, kept[to_users.order]])  # cos is symmetric: one per pair
  return segment_normalized(both, edges.receivers, n_nodes, _AFFINITY_TOTAL_FLOOR)


def integrated_weights(affinities: Array, senders: Array, confidence, mode: str) -> Array:
  """One weight per directed edge from the modalities' a_e^m [2E, M] (Sec 3.2.2):
  'confid' relu(max_m c_{sender}^m a_e^m), 'mean', or 'max' over m."""
  if mode == "mean":
    return jnp.mean(affinities, axis=1)
  if mode == "max":
    return jnp.max(affinities, axis=1)
  # A negative confidence prunes the edge in that modality; relu keeps weights >= 0.
  return jax.nn.relu(jnp.max(confidence[senders] * affinities, axis=1))


# ----------------------------------------------------------------------------- contract


def build_graph(train_pairs, n_users, n_items, features, config):
  del config
  if not features:
    raise ConfigError("GRCN needs at least one content modality (its graph refinement "
                      "scores edges in the modalities' feature spaces)")
  train_pairs = np.asarray(train_pairs)
  return {"edges": bipartite_directed_edges(train_pairs[:, 0], train_pairs[:, 1], n_users,
                                            n_items)}


def init(rng, data_info: DataInfo, config):
  cfg = config.grcn
  check_config(cfg)
  if cfg.fusion == "concat" and config.alignment != "none":
    raise ConfigError("grcn.fusion='concat' gives (1 + M) L-dim users and items, which the "
                      f"alignment {config.alignment!r} cannot align; use grcn.fusion='mean'")
  names = sorted(data_info.feature_dims)
  table_rng, proj_rng, pref_rng, conf_rng = jax.random.split(rng, 4)
  size = config.embedding_size
  params = layers.init_embedding_tables(table_rng, data_info.n_users, data_info.n_items, size)
  params["projectors"] = layers.init_feature_projectors(proj_rng, data_info.feature_dims, size)
  params["preferences"] = {
      name: layers.xavier_uniform(r, (data_info.n_users, size))
      for name, r in zip(names, jax.random.split(pref_rng, len(names)))}
  if cfg.weight_mode == "confid":  # c_n^m, one row per node (users, then items)
    params["confidence"] = layers.xavier_uniform(
        conf_rng, (data_info.n_users + data_info.n_items, len(names)))
  return params


class Refined(NamedTuple):
  """A forward pass's refined graph and per-modality pieces (exposed for tests)."""
  weights: Array                    # [2E] w_e, the ID convolution's edge weights
  affinities: Dict[str, Array]      # m -> [2E] a_e^m
  preferences: Dict[str, Array]     # m -> [U, L] routed unit p^m
  item_content: Dict[str, Array]    # m -> [I, L] unit f^m


def refine(params, static, config) -> Refined:
  """The graph refining layer (Sec 3.2), differentiable in every parameter it reads."""
  cfg = config.grcn
  edges = static.graph["edges"]
  content, prefs, scores = {}, {}, {}
  for name in sorted(params["projectors"]):
    content[name] = losses.l2_normalize(jax.nn.leaky_relu(
        layers.linear(params["projectors"][name], static.features[name])))
    prefs[name] = route_preferences(params["preferences"][name], content[name], edges,
                                    cfg.n_routing)
    scores[name] = pruned_affinities(prefs[name], content[name], edges)
  stacked = jnp.stack([scores[name] for name in sorted(scores)], axis=1)
  weights = integrated_weights(stacked, edges.senders, params.get("confidence"),
                               cfg.weight_mode)
  return Refined(weights, scores, prefs, content)


def _forward(params, static, config):
  cfg = config.grcn
  edges = static.graph["edges"]
  n_users = params["user_embedding"].shape[0]
  refined = refine(params, static, config)
  # ID convolution (Sec 3.3): sum of layers 0..K on the refined graph, no activation.
  _, full = edge_lists(edges)
  h = losses.l2_normalize(jnp.concatenate([params["user_embedding"],
                                           params["item_embedding"]], axis=0))
  id_rep = h
  for _ in range(cfg.n_id_layers):
    h = graphs.weighted_propagate(full, refined.weights, h)
    id_rep = id_rep + h
  # Modality convolution: routed preferences and projected content, one layer each.
  modality_reps = {}
  for name in sorted(refined.affinities):
    z = jnp.concatenate([refined.preferences[name], refined.item_content[name]], axis=0)
    modality_reps[name] = z + graphs.weighted_propagate(full, refined.affinities[name], z)
  parts = [id_rep] + [modality_reps[name] for name in sorted(modality_reps)]
  if cfg.fusion == "concat":
    fused = jnp.concatenate(parts, axis=1)
  elif cfg.fusion == "mean":
    fused = sum(parts) / len(parts)
  else:  # 'id'
    fused = id_rep
  modality_items = {name: rep[n_users:] for name, rep in modality_reps.items()}
  return Representations(fused[:n_users], fused[n_users:], modality_items)


def represent(params, model_state, static, config) -> Representations:
  del model_state
  return _forward(params, static, config)


def grcn_l2(params, batch: Batch) -> Array:
  """MMRec's GRCN penalty: element means (over the batch rows' L entries) of the squared ID
  rows of users, positives and negatives (users counted once per item, as MMRec pairs them)
  plus the batch users' raw preference rows of every modality."""
  users, items = params["user_embedding"], params["item_embedding"]
  size = users.shape[1]
  sq = lambda x: jnp.sum(x * x, axis=1)
  per_row = (sq(users[batch.users])
             + 0.5 * (sq(items[batch.pos_items]) + sq(items[batch.neg_items])))
  for name in sorted(params["preferences"]):
    per_row = per_row + sq(params["preferences"][name][batch.users])
  return jnp.mean(per_row) / size


def apply(params, model_state, static, batch: Batch, rng, config):
  del rng  # deterministic: MMRec's edge dropout is 0
  reps = represent(params, model_state, static, config)
  loss = losses.bpr_loss(reps.users[batch.users], reps.items[batch.pos_items],
                         reps.items[batch.neg_items])
  return reps, loss + config.grcn.reg_weight * grcn_l2(params, batch)
