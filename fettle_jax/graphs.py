"""Graphs as receiver-sorted edge lists: host-side construction (user-item, kNN item-item)
and on-device propagation, pruning and subgraphs.

Never dense adjacency matrices: Baby's user-item graph has 26k nodes but only 240k directed
edges. Symmetric graphs (the normalized user-item graph) propagate through a CSR
sparse-dense product whose gradient is the same product; general graphs through gathers
and `jax.ops.segment_sum`, or, where that backward's scatter-add is the cost (learned edge
weights), through CSR products both ways (`weighted_propagate`, `propagate_csr`).
"""

import functools
from typing import NamedTuple

import jax
from jax.experimental import sparse
import jax.numpy as jnp
import numpy as np

from fettle_jax import sharding
from fettle_jax.types import Array


class Graph(NamedTuple):
  """A weighted directed graph as edge arrays, sorted by receiver for fast segment sums."""
  senders: Array    # int32 [E]
  receivers: Array  # int32 [E], non-decreasing
  weights: Array    # float32 [E]


def propagate(graph: Graph, x: Array) -> Array:
  """One message-passing step: out[r] = sum_{(s, r)} w_sr * x[s] (under a model-parallel
  mesh XLA partitions the gather and the segment sum itself)."""
  messages = x[graph.senders] * graph.weights[:, None]
  return jax.ops.segment_sum(messages, graph.receivers, num_segments=x.shape[0],
                             indices_are_sorted=True)


def csr_matrix(graph: Graph, n_nodes: int) -> sparse.BCSR:
  """The graph as a [n_nodes, n_nodes] CSR matrix A with A[r, s] = w_sr (edges sorted by r)."""
  counts = jax.ops.segment_sum(jnp.ones_like(graph.receivers), graph.receivers, n_nodes,
                               indices_are_sorted=True)
  indptr = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])
  return sparse.BCSR((graph.weights, graph.senders, indptr), shape=(n_nodes, n_nodes))


def _csr_product(senders: Array, receivers: Array, weights: Array, x: Array) -> Array:
  """out[r] = sum_{(s, r)} w_sr x[s] for 2-D x, as one CSR sparse-dense product."""
  return csr_matrix(Graph(senders, receivers, weights), x.shape[0]) @ x


@jax.custom_batching.custom_vmap
def csr_product(senders: Array, receivers: Array, weights: Array, x: Array) -> Array:
  """_csr_product with its own batching rule for a grid's `jax.vmap` (S settings): one
  shared graph puts the settings' columns through one product, A @ [x_1 .. x_S]; settings
  with their own edges or weights (SGL's views, learned weights) go through one
  block-diagonal product. The sparse library's rule for a batched dense operand runs ~12x
  slower than S separate products on CPU."""
  return _csr_product(senders, receivers, weights, x)


@csr_product.def_vmap
def _csr_product_batched(axis_size, in_batched, senders, receivers, weights, x):
  if not any(in_batched[:3]):
    n = x.shape[1]
    columns = jnp.moveaxis(x, 0, 1)  # [n, S, d]
    out = csr_product(senders, receivers, weights, columns.reshape(n, -1))
    return jnp.moveaxis(out.reshape(columns.shape), 1, 0), True
  senders, receivers, weights, x = (
      a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
      for a, batched in zip((senders, receivers, weights, x), in_batched))
  n = x.shape[1]
  # Setting k's nodes become rows k*n .. k*n + n - 1: receivers stay sorted.
  offsets = (jnp.arange(axis_size, dtype=senders.dtype) * n)[:, None]
  out = csr_product((senders + offsets).reshape(-1), (receivers + offsets).reshape(-1),
                    weights.reshape(-1), x.reshape(axis_size * n, -1))
  return out.reshape(x.shape), True


def row_dot(a: Array, b: Array) -> Array:
  """sum(a * b, axis=-1) for [n, d] rows: the product, then a matrix-vector product with
  ones. XLA's CPU backend fuses gathers + multiply + row reduction into one loop that runs
  several times slower than this unfused form (docs/performance.md)."""
  return (a * b) @ jnp.ones((a.shape[-1],), a.dtype)


# ------------------------------------------------------------ differentiable edge weights
# Products whose edge weights are themselves learned (GRCN's refined graph, LATTICE's learned
# item graph), forward and backward both as CSR products + gathers: XLA's CPU scatter-add,
# the autodiff transpose of a gather, made the plain gather + segment_sum form several
# times slower.


class EdgeList(NamedTuple):
  """A receiver-sorted edge list and its transpose: the same edges reversed, sorted by their
  new receivers (the old senders); the transpose's edge k is the original edge order[k]."""
  senders: Array
  receivers: Array
  t_senders: Array
  t_receivers: Array
  order: Array


def _rows(x: Array, ids: Array) -> Array:
  """x[ids] for ids known to be in range: XLA's CPU gather is ~5x faster without the
  out-of-bounds handling of the default indexing mode."""
  return x.at[ids].get(mode="promise_in_bounds")


def _product(senders, receivers, weights, x):
  """out[r] = sum_{(s, r)} w_sr x[s]: a CSR product (one device) or, under a model-parallel
  mesh, graphs.propagate (gather + segment sum, which XLA partitions)."""
  graph = Graph(senders, receivers, weights)
  if sharding.model_axis_size() > 1:
    return propagate(graph, x)
  return csr_product(senders, receivers, weights, x)


# The edge arrays are explicit (integer, non-differentiated) inputs of the custom VJPs, not
# closure constants: the edges may be traced values (chosen inside a compiled program).


@jax.custom_vjp
def weighted_propagate(edges: EdgeList, weights: Array, x: Array) -> Array:
  """graphs.propagate with gradients for the weights too, without scatters: d/dx is the
  transpose's CSR product, d/dw_e = g[r_e] . x[s_e] (two gathers)."""
  return _product(edges.senders, edges.receivers, weights, x)


def _weighted_propagate_forward(edges, weights, x):
  return weighted_propagate(edges, weights, x), (edges, weights, x)


def _weighted_propagate_backward(residuals, cotangent):
  edges, w, v = residuals
  grad_v = _product(edges.t_senders, edges.t_receivers, w[edges.order], cotangent)
  grad_w = row_dot(_rows(cotangent, edges.receivers), _rows(v, edges.senders))
  return None, grad_w, grad_v


weighted_propagate.defvjp(_weighted_propagate_forward, _weighted_propagate_backward)


@jax.custom_vjp
def edge_dot(edges: EdgeList, x: Array) -> Array:
  """x[r_e] . x[s_e] per edge; backward as two CSR products (the edge list and its
  transpose carrying the cotangents), no scatter."""
  return row_dot(_rows(x, edges.receivers), _rows(x, edges.senders))


def _edge_dot_backward(residuals, cotangent):
  edges, v = residuals
  return None, (_product(edges.senders, edges.receivers, cotangent, v)
                + _product(edges.t_senders, edges.t_receivers, cotangent[edges.order], v))


edge_dot.defvjp(lambda edges, x: (edge_dot(edges, x), (edges, x)), _edge_dot_backward)


def transposed_edge_list(senders: Array, receivers: Array) -> EdgeList:
  """An EdgeList of receiver-sorted edges, its transpose sorted on device (a stable argsort
  of the senders): for graphs whose edges are chosen inside the compiled program."""
  order = jnp.argsort(senders, stable=True)
  return EdgeList(senders, receivers, receivers[order], senders[order], order)


def propagate_csr(graph: Graph, x: Array) -> Array:
  """propagate() as CSR products forward and backward (also for the weights): for any
  receiver-sorted graph, symmetric or not. Costs one argsort of the E senders per call."""
  edges = transposed_edge_list(graph.senders, graph.receivers)
  return weighted_propagate(edges, graph.weights, x)


TINY_DEGREE = 1e-12  # rsqrt's argument floor: finite gradients where a row's degree is 0
ROW_BLOCK_CHUNK = 1 << 16  # edges per step of a device's loop: memory O(chunk * d), not O(E * d)


def propagate_row_blocks(graph: Graph, x: Array, chunk: int = None) -> Array:
  """propagate() with the node rows split over the traced mesh's 'model' axis. Each device
  gathers the full input once (all_gather), then walks only its own receivers' edges,
  a contiguous range of the receiver-sorted list (found by binary search), `chunk` edges at
  a time: work O(E / model) per device on balanced blocks, memory O(N d + chunk d). The
  output stays split by rows (padded to a multiple of the axis size, sliced back).

  Forward only (the loop's trip count is data-dependent); `propagate_symmetric` supplies
  the gradient, which for A = A^T is the same product.
  """
  n, d = x.shape
  blocks = sharding.model_axis_size()
  block = -(-n // blocks)
  n_edges = graph.senders.shape[0]
  chunk = max(1, min(chunk or ROW_BLOCK_CHUNK, n_edges))
  padded = jnp.pad(x, ((0, blocks * block - n), (0, 0)))
  # Room for a last chunk that starts near the end: slices never get clamped back.
  senders, receivers, weights = (jnp.pad(a, (0, chunk)) for a in graph)

  def local(x_block, senders, receivers, weights):
    x_all = jax.lax.all_gather(x_block, sharding.MODEL, axis=0, tiled=True)
    first = jax.lax.axis_index(sharding.MODEL) * block
    start = jnp.searchsorted(receivers[:n_edges], first).astype(jnp.int32)
    end = jnp.searchsorted(receivers[:n_edges], first + block).astype(jnp.int32)

    def add_chunk(i, total):
      offset = start + i * chunk
      take = lambda a: jax.lax.dynamic_slice(a, (offset,), (chunk,))
      rows = jnp.where(offset + jnp.arange(chunk) < end, take(receivers) - first, block)
      messages = x_all[take(senders)] * take(weights)[:, None]
      return total + jax.ops.segment_sum(messages, rows, num_segments=block,
                                         indices_are_sorted=True)  # `block` rows dropped

    n_chunks = (end - start + chunk - 1) // chunk
    return jax.lax.fori_loop(0, n_chunks, add_chunk, jnp.zeros((block, d), x_block.dtype))

  out = sharding.map_model_row_blocks(local, padded, senders, receivers, weights)
  return out[:n]


def propagate_symmetric(graph: Graph, x: Array) -> Array:
  """propagate() for a graph with w_sr = w_rs on every edge pair (A = A^T).

  A CSR product is ~4x faster than gather + segment_sum on CPU (XLA's gather writes an
  [E, d] intermediate; the CSR kernel streams rows), and since A^T = A its gradient is the
  same product: no scatter in the backward pass either. Under a mesh with a 'model' axis
  > 1 the rows are split over it instead (`propagate_row_blocks`).
  """
  if sharding.model_axis_size() > 1:
    product = functools.partial(propagate_row_blocks, graph)
  else:
    product = functools.partial(csr_product, *graph)

  @jax.custom_vjp
  def multiply(v):
    return product(v)

  multiply.defvjp(lambda v: (product(v), None), lambda _, cotangent: (product(cotangent),))
  return multiply(x)


def sort_edges_by_receiver(senders: np.ndarray, receivers: np.ndarray,
                           weights: np.ndarray) -> Graph:
  order = np.lexsort((senders, receivers))
  return Graph(jnp.asarray(senders[order], jnp.int32), jnp.asarray(receivers[order], jnp.int32),
               jnp.asarray(weights[order], jnp.float32))


def symmetric_normalized_weights(senders, receivers, n_nodes: int, xp=np):
  """w_sr = 1 / sqrt(deg(s) deg(r)): the LightGCN normalization D^-1/2 A D^-1/2."""
  degree = xp.zeros((n_nodes,), xp.float32)
  if xp is np:
    degree = np.bincount(receivers, minlength=n_nodes).astype(np.float32)
  else:
    degree = jax.ops.segment_sum(jnp.ones_like(receivers, jnp.float32), receivers, n_nodes)
  inv_sqrt = xp.where(degree > 0, 1.0 / xp.sqrt(xp.maximum(degree, 1.0)), 0.0)
  return inv_sqrt[senders] * inv_sqrt[receivers]


def user_item_graph(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> Graph:
  """Symmetric-normalized bipartite graph over n_users + n_items nodes (items offset by n_users)."""
  users = np.asarray(users, np.int64)
  items = np.asarray(items, np.int64) + n_users
  senders = np.concatenate([users, items])
  receivers = np.concatenate([items, users])
  weights = symmetric_normalized_weights(senders, receivers, n_users + n_items)
  return sort_edges_by_receiver(senders, receivers, weights)


def mean_of_layers(graph: Graph, x: Array, n_layers: int) -> Array:
  """LightGCN's layer combination: mean of x, Ax, ..., A^K x (He et al. 2020, Eq. 4).

  `graph` must be symmetric (a normalized user-item graph, pruned or not).
  """
  total, h = x, x
  for _ in range(n_layers):
    h = propagate_symmetric(graph, h)
    total = total + h
  return total / (n_layers + 1)


# ----------------------------------------------------------------------------- item-item kNN graphs
# Frozen modality graphs of FREEDOM (Zhou & Shen, MM'23), built once before training.


def _knn_blocks(features: Array, k: int, block_size: int) -> Array:
  """Top-k cosine neighbours of every row, computed block_size query rows at a time."""
  sq_norm = jnp.sum(features * features, axis=1, keepdims=True)
  unit = features * jax.lax.rsqrt(jnp.maximum(sq_norm, 1e-24))  # zero rows stay 0, not NaN
  n = unit.shape[0]
  n_blocks = -(-n // block_size)
  queries = jnp.pad(unit, ((0, n_blocks * block_size - n), (0, 0)))

  def one_block(block):
    # HIGHEST: no TF32/bf16 passes on accelerators, so the top-k is the exact float32 one.
    sims = jnp.matmul(block, unit.T, precision=jax.lax.Precision.HIGHEST)
    return jax.lax.top_k(sims, k)[1]  # ties: the lower item index first

  # lax.map runs the blocks sequentially: peak memory is one [block_size, n] slab, never n x n.
  neighbours = jax.lax.map(one_block, queries.reshape(n_blocks, block_size, -1))
  return neighbours.reshape(-1, k)[:n]


_knn_blocks_jit = jax.jit(_knn_blocks, static_argnames=("k", "block_size"))


def knn_neighbours(features, k: int, block_size: int = 1024) -> np.ndarray:
  """Exact top-k cosine-similarity neighbours of each item: int32 [n, min(k, n)], best first.

  The item itself is a candidate (its self-similarity 1 is the row maximum), as FREEDOM's
  and LATTICE's top-k(S_i) over all items is written. Deterministic: ties go to the lower index.
  """
  features = jnp.asarray(features, jnp.float32)
  n = features.shape[0]
  k = min(int(k), n)
  block_size = max(1, min(int(block_size), n))
  return np.asarray(_knn_blocks_jit(features, k=k, block_size=block_size), np.int32)


def knn_adjacency_edges(neighbours: np.ndarray):
  """Edges (senders, receivers, weights) of D^-1/2 S D^-1/2 for a 0/1 kNN matrix S.

  S_ij = 1 iff j is among i's top-k (unweighted, as FREEDOM freezes it); propagation is
  h_i <- sum_j S~_ij h_j, so i receives from j. D is S's row sums (the degree of the
  receiving row; = k for every row), used on both sides as in FREEDOM.
  """
  n, k = neighbours.shape
  receivers = np.repeat(np.arange(n, dtype=np.int64), k)
  senders = neighbours.reshape(-1).astype(np.int64)
  return senders, receivers, symmetric_normalized_weights(senders, receivers, n)


def knn_item_graph(features: dict, k: int, modality_weights: dict,
                   block_size: int = 1024) -> Graph:
  """sum_m w_m D_m^-1/2 S_m D_m^-1/2 over modalities (FREEDOM's frozen item-item graph).

  features: name -> [n_items, d_m]; modality_weights: name -> w_m. Duplicate (i, j) edges of
  different modalities are merged (weights summed), so the result is one sparse matrix.
  """
  names = sorted(features)
  if not names:
    raise ValueError("an item-item kNN graph needs at least one content modality")
  n = np.shape(features[names[0]])[0]
  keys, values = [], []
  for name in names:
    senders, receivers, weights = knn_adjacency_edges(knn_neighbours(features[name], k,
                                                                     block_size))
    keys.append(receivers * n + senders)
    values.append(float(modality_weights[name]) * weights.astype(np.float64))
  unique_keys, inverse = np.unique(np.concatenate(keys), return_inverse=True)
  merged = np.bincount(inverse.reshape(-1), weights=np.concatenate(values))
  return sort_edges_by_receiver(unique_keys % n, unique_keys // n, merged.astype(np.float32))


# Weighted kNN graphs (LATTICE, Zhang et al. MM'21, keeps the similarity values; FREEDOM's are
# 0/1), and the neighbour selection traced inside a compiled epoch (LATTICE's learned graph).


def normalized_knn_weights(neighbours: Array, similarities: Array) -> Array:
  """LATTICE Eq. 3 on a weighted kNN graph: D^-1/2 S D^-1/2 at its edges, [n, k].

  S_ij = similarities[i, s] for j = neighbours[i, s] (Eq. 2 keeps the values), D_ii = sum_j
  S_ij the row sums (row i receives from its neighbours j), on both sides as the paper.
  Rows with degree <= 0 get weight 0. Works on host (NumPy inputs) and traced arrays.
  """
  similarities = jnp.asarray(similarities, jnp.float32)
  degree = jnp.sum(similarities, axis=1)
  inv_sqrt = jnp.where(degree > 0, jax.lax.rsqrt(jnp.maximum(degree, TINY_DEGREE)), 0.0)
  return similarities * inv_sqrt[:, None] * inv_sqrt[neighbours]


def edge_cosine(unit: Array, neighbours: Array) -> Array:
  """cos(x_i, x_j) at each kNN edge (Eq. 1 / 5) from unit rows: [n, k]. Gathers [n, k, L]."""
  return jnp.einsum("nl,nkl->nk", unit, unit[neighbours],
                    precision=jax.lax.Precision.HIGHEST)


def host_edge_cosine(features: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
  """edge_cosine on the host for wide raw features, one neighbour slot at a time: memory
  O(n d), never the [n, k, d] gather (Baby: 7,050 x 10 x 4,096 floats)."""
  x = np.asarray(features, np.float64)
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  unit = np.where(norms > 0, x / np.maximum(norms, 1e-300), 0.0)
  return np.stack([np.sum(unit * unit[neighbours[:, s]], axis=1)
                   for s in range(neighbours.shape[1])], axis=1).astype(np.float32)


def select_neighbours(x: Array, k: int, block_size: int) -> Array:
  """Exact top-k cosine neighbours of every row (the item itself included), int32 [n, k];
  traceable (knn_neighbours is the host version), no gradient."""
  n = x.shape[0]
  k, block_size = min(int(k), n), max(1, min(int(block_size), n))
  return _knn_blocks(jax.lax.stop_gradient(x), k, block_size).astype(jnp.int32)


# ----------------------------------------------------------------------------- edge pruning
# FREEDOM's degree-sensitive edge pruning of the user-item graph, with static shapes.


class BipartiteEdges(NamedTuple):
  """The user-item interactions as undirected edges, for resampling subgraphs under jit."""
  users: Array        # int32 [E], edges sorted by (user, item)
  items: Array        # int32 [E]
  by_item: Array      # int32 [E], edge ids in (item, user) order
  item_rank: Array    # int32 [E], position of each edge id in by_item
  log_weights: Array  # float32 [E], log(1 / sqrt(d_u d_i)) with full-graph degrees


def bipartite_edges(users: np.ndarray, items: np.ndarray, n_users: int,
                    n_items: int) -> BipartiteEdges:
  users = np.asarray(users, np.int64)
  items = np.asarray(items, np.int64)
  order = np.lexsort((items, users))
  users, items = users[order], items[order]
  by_item = np.lexsort((users, items))
  item_rank = np.empty_like(by_item)
  item_rank[by_item] = np.arange(len(by_item))
  user_degree = np.bincount(users, minlength=n_users).astype(np.float64)
  item_degree = np.bincount(items, minlength=n_items).astype(np.float64)
  log_weights = -0.5 * (np.log(user_degree[users]) + np.log(item_degree[items]))
  return BipartiteEdges(*(jnp.asarray(a, jnp.int32) for a in (users, items, by_item, item_rank)),
                        jnp.asarray(log_weights, jnp.float32))


def sample_without_replacement(rng: Array, log_weights: Array, n_keep: int) -> Array:
  """n_keep distinct indices drawn without replacement with probability ~ exp(log_weights).

  Gumbel top-k (Vieira 2014; Kool et al., ICML'19): the n_keep largest log w + Gumbel noise
  are distributed as n_keep successive weighted draws without replacement. Sorted ascending.
  """
  keys = log_weights + jax.random.gumbel(rng, log_weights.shape, log_weights.dtype)
  return top_k_index_set(keys, n_keep)


def _order_preserving_uint32(x: Array) -> Array:
  """float32 -> uint32 with a < b  <=>  f(a) < f(b), infinities included (no NaN); -0.0 sorts
  below +0.0, where a float comparison calls them equal."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  negative = (bits >> 31) == 1
  return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def top_k_index_set(values: Array, k: int) -> Array:
  """jnp.sort(lax.top_k(values, k)[1]) for a 1-D float array, without a top-k or a sort.

  The same indices for non-NaN values (ties to the lower index, as lax.top_k; only -0.0
  and +0.0 count as distinct here, a zero-probability case for Gumbel keys), found as
  everything above the k-th largest value plus the first ties at it. The k-th largest is built bit by bit on an
  order-preserving uint32 image of the values (32 counting passes); the indices come out
  ascending from a mask. XLA's CPU top-k of 16k of 80k values (FREEDOM's pruned graph,
  every step) costs ~5 ms; this costs a fraction of it.
  """
  keys = _order_preserving_uint32(values)

  def next_bit(i, threshold):  # largest t with #{keys >= t} >= k, from the top bit down
    candidate = threshold | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    return jnp.where(jnp.sum(keys >= candidate) >= k, candidate, threshold)

  kth = jax.lax.fori_loop(0, 32, next_bit, jnp.uint32(0))
  above = keys > kth
  ties = keys == kth
  tie_rank = jnp.cumsum(ties.astype(jnp.int32))  # 1-based among the ties, by index
  chosen = above | (ties & (tie_rank <= k - jnp.sum(above.astype(jnp.int32))))
  return jnp.nonzero(chosen, size=k)[0].astype(jnp.int32)


def bipartite_subgraph(edges: BipartiteEdges, kept: Array, n_users: int, n_items: int) -> Graph:
  """Symmetric-normalized user-item Graph on the kept edge ids (sorted ascending).

  Degrees are recomputed on the kept edges (segment sums), so the pruned graph is itself
  D^-1/2 A D^-1/2. 2 * len(kept) directed edges, sorted by receiver: users' in-edges first
  (kept ids are in (user, item) order), then items' (re-sorted through item_rank).
  """
  ones = jnp.ones(kept.shape, jnp.float32)
  users, items = edges.users[kept], edges.items[kept]
  user_inv = jax.lax.rsqrt(jnp.maximum(jax.ops.segment_sum(ones, users, n_users), 1.0))
  item_inv = jax.lax.rsqrt(jnp.maximum(jax.ops.segment_sum(ones, items, n_items), 1.0))
  # The kept edges in by-item order: their ranks, ascending, read off a mask (no sort).
  rank_kept = jnp.zeros(edges.item_rank.shape, bool).at[edges.item_rank[kept]].set(True)
  by_item = edges.by_item[jnp.nonzero(rank_kept, size=kept.shape[0])[0]]
  users_i, items_i = edges.users[by_item], edges.items[by_item]
  senders = jnp.concatenate([items + n_users, users_i])
  receivers = jnp.concatenate([users, items_i + n_users])
  weights = jnp.concatenate([user_inv[users] * item_inv[items],
                             user_inv[users_i] * item_inv[items_i]])
  return Graph(senders, receivers, weights)


def n_kept_edges(n_edges: int, dropout: float) -> int:
  """Static number of edges a pruned graph keeps: round((1 - dropout) |E|), at least 1."""
  return max(1, min(n_edges, int(round((1.0 - dropout) * n_edges))))


def pruned_user_item_graph(rng: Array, edges: BipartiteEdges, n_users: int, n_items: int,
                           dropout: float) -> Graph:
  """FREEDOM's degree-sensitive edge pruning: keep round((1 - dropout)|E|) edges
  drawn without replacement with p_e ~ 1 / sqrt(d_u d_i), so edges at high-degree nodes are
  pruned more often; then renormalize. Static shapes: jittable, resampled every call."""
  n_keep = n_kept_edges(edges.users.shape[0], dropout)
  kept = sample_without_replacement(rng, edges.log_weights, n_keep)
  return bipartite_subgraph(edges, kept, n_users, n_items)
