"""LightGCN propagation against a dense NumPy reference; negative sampling; the bit matrix."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fettle_jax import graphs
from fettle_jax import sampling
from fettle_jax import train
from fettle_jax.backbones import lightgcn
from tests.conftest import tiny_config


def dense_lightgcn(pairs, n_users, n_items, ego, n_layers):
  """Dense (I + A + ... + A^K) e / (K + 1) with A = D^-1/2 [[0, R], [R^T, 0]] D^-1/2."""
  r = np.zeros((n_users, n_items))
  r[pairs[:, 0], pairs[:, 1]] = 1.0
  adj = np.block([[np.zeros((n_users, n_users)), r], [r.T, np.zeros((n_items, n_items))]])
  deg = adj.sum(1)
  inv = np.where(deg > 0, 1 / np.sqrt(np.maximum(deg, 1)), 0.0)
  norm = inv[:, None] * adj * inv[None, :]
  total, h = ego.copy(), ego.copy()
  for _ in range(n_layers):
    h = norm @ h
    total += h
  return total / (n_layers + 1)


def test_lightgcn_matches_dense_reference():
  rng = np.random.default_rng(0)
  n_users, n_items = 17, 11
  pairs = np.unique(np.stack([rng.integers(0, n_users, 60), rng.integers(0, n_items, 60)], 1),
                    axis=0)
  pairs = pairs[pairs[:, 1] != 10]  # item 10 without interactions: zero degree must not NaN
  config = tiny_config("unused")
  config.lightgcn.n_layers = 3
  params = lightgcn.init(jax.random.PRNGKey(0), lightgcn_info(n_users, n_items), config)
  graph = lightgcn.build_graph(pairs, n_users, n_items, {}, config)
  static = train.StaticInputs(jnp.asarray(pairs), sampling.seen_items(pairs, n_users), {}, graph)
  reps = lightgcn.represent(params, {}, static, config)
  ego = np.concatenate([params["user_embedding"], params["item_embedding"]]).astype(np.float64)
  expected = dense_lightgcn(pairs, n_users, n_items, ego, 3)
  chex.assert_trees_all_close(np.asarray(reps.users), expected[:n_users], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(np.asarray(reps.items), expected[n_users:], rtol=1e-5, atol=1e-6)


def lightgcn_info(n_users, n_items):
  from fettle_jax.types import DataInfo  # pylint: disable=g-import-not-at-top
  return DataInfo(n_users, n_items, {})


def test_propagate_gradient_is_the_transpose():
  rng = np.random.default_rng(1)
  pairs = np.stack([rng.integers(0, 9, 30), rng.integers(0, 7, 30)], 1)
  pairs = np.unique(pairs, axis=0)
  graph = graphs.user_item_graph(pairs[:, 0], pairs[:, 1], 9, 7)
  x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  probe = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  grad = jax.grad(lambda v: jnp.sum(graphs.propagate(graph, v) * probe))(x)
  dense = np.zeros((16, 16))
  np.add.at(dense, (np.asarray(graph.receivers), np.asarray(graph.senders)), np.asarray(graph.weights))
  chex.assert_trees_all_close(np.asarray(grad), dense.T @ np.asarray(probe), rtol=1e-5, atol=1e-6)


def test_weighted_propagate_on_device_transpose_matches_dense_gradients():
  # A receiver-sorted graph with repeated (s, r) edges and senders that receive nothing, as
  # LATTICE's learned item graph: values and both gradients equal the dense A x.
  rng = np.random.default_rng(3)
  n_nodes, width, dim = 7, 4, 3
  senders = jnp.asarray(rng.integers(0, n_nodes, n_nodes * width), jnp.int32)
  receivers = jnp.repeat(jnp.arange(n_nodes, dtype=jnp.int32), width)
  weights = jnp.asarray(rng.random(n_nodes * width), jnp.float32)
  x = jnp.asarray(rng.normal(size=(n_nodes, dim)), jnp.float32)
  probe = jnp.asarray(rng.normal(size=(n_nodes, dim)), jnp.float32)

  def dense(w, v):
    matrix = jnp.zeros((n_nodes, n_nodes)).at[receivers, senders].add(w)
    return matrix @ v

  def sparse_product(w, v):
    return graphs.weighted_propagate(graphs.transposed_edge_list(senders, receivers), w, v)

  np.testing.assert_allclose(sparse_product(weights, x), dense(weights, x),
                             rtol=1e-5, atol=1e-6)
  got, expected = (jax.grad(lambda w, v, f=f: jnp.sum(f(w, v) * probe), argnums=(0, 1))(
      weights, x) for f in (jax.jit(sparse_product), dense))
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)


def test_negatives_are_never_train_items_and_epoch_covers_train():
  rng = np.random.default_rng(3)
  n_users, n_items = 20, 15
  # Dense users: 12 of 15 items seen, so naive sampling would collide 80% of the time.
  pairs = np.array([(u, i) for u in range(n_users) for i in rng.permutation(n_items)[:12]])
  seen_items = sampling.seen_items(pairs, n_users)
  batches = sampling.epoch_batches(jax.random.PRNGKey(0), jnp.asarray(pairs, jnp.int32),
                                   seen_items, n_items, batch_size=64)
  seen = {tuple(p) for p in pairs.tolist()}
  users, negs = np.asarray(batches.users).ravel(), np.asarray(batches.neg_items).ravel()
  collisions = sum((u, i) in seen for u, i in zip(users.tolist(), negs.tolist()))
  assert collisions == 0
  # Every (user, positive) pair of the epoch comes from train, and all of train is present.
  got = set(zip(users.tolist(), np.asarray(batches.pos_items).ravel().tolist()))
  assert got == seen
  assert batches.users.shape == (4, 64)


def test_negatives_are_uniform_over_unseen_items():
  pairs = np.array([[0, 1], [0, 2], [0, 5], [0, 6], [1, 0]])
  seen = sampling.seen_items(pairs, 2)
  users = jnp.zeros(60000, jnp.int32)
  draws = np.asarray(sampling.sample_negatives(jax.random.PRNGKey(0), seen, users, 8))
  counts = np.bincount(draws, minlength=8)
  assert counts[[1, 2, 5, 6]].sum() == 0
  np.testing.assert_allclose(counts[[0, 3, 4, 7]] / 60000, 0.25, atol=0.01)
  last_user = np.asarray(sampling.sample_negatives(jax.random.PRNGKey(1), seen,
                                                   jnp.ones(1000, jnp.int32), 8))
  assert set(last_user.tolist()) == set(range(1, 8))


def test_epoch_batches_are_reproducible():
  pairs = jnp.asarray([[0, 1], [1, 2], [2, 0], [0, 3]], jnp.int32)
  seen = sampling.seen_items(np.asarray(pairs), 3)
  a = sampling.epoch_batches(jax.random.PRNGKey(7), pairs, seen, 5, 3)
  b = sampling.epoch_batches(jax.random.PRNGKey(7), pairs, seen, 5, 3)
  chex.assert_trees_all_equal(a, b)


def dense_matrix(graph, n_nodes):
  """The graph's dense matrix A[r, s] = w_sr."""
  dense = np.zeros((n_nodes, n_nodes))
  np.add.at(dense, (np.asarray(graph.receivers), np.asarray(graph.senders)),
            np.asarray(graph.weights))
  return dense


def random_user_item_graph(rng, n_users, n_items, n_pairs):
  """A normalized user-item graph of random pairs and its dense matrix."""
  pairs = np.unique(np.stack([rng.integers(0, n_users, n_pairs),
                              rng.integers(0, n_items, n_pairs)], 1), axis=0)
  graph = graphs.user_item_graph(pairs[:, 0], pairs[:, 1], n_users, n_items)
  return graph, dense_matrix(graph, n_users + n_items)


def test_symmetric_propagation_and_its_gradient_match_dense():
  rng = np.random.default_rng(4)
  graph, dense = random_user_item_graph(rng, 12, 9, 50)
  np.testing.assert_allclose(dense, dense.T, atol=1e-7)  # the user-item graph is symmetric
  x = jnp.asarray(rng.normal(size=(21, 5)), jnp.float32)
  probe = jnp.asarray(rng.normal(size=(21, 5)), jnp.float32)
  chex.assert_trees_all_close(np.asarray(jax.jit(graphs.propagate_symmetric)(graph, x)),
                              dense @ np.asarray(x), rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda v: jnp.sum(graphs.propagate_symmetric(graph, v) * probe))(x)
  chex.assert_trees_all_close(np.asarray(grad), dense.T @ np.asarray(probe), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(graphs.propagate_symmetric(graph, x), graphs.propagate(graph, x),
                              rtol=1e-5, atol=1e-6)


def test_csr_product_under_vmap_matches_dense_per_setting():
  """A grid's vmap over the dense operand (one shared graph) and over the weights (settings
  with their own graphs) both give each setting's dense product, gradients included."""
  rng = np.random.default_rng(5)
  graph, dense = random_user_item_graph(rng, 10, 7, 40)
  x = jnp.asarray(rng.normal(size=(3, 17, 4)), jnp.float32)
  probe = jnp.asarray(rng.normal(size=(3, 17, 4)), jnp.float32)
  out = jax.jit(jax.vmap(functools.partial(graphs.propagate_symmetric, graph)))(x)
  chex.assert_trees_all_close(np.asarray(out), np.einsum("rs,bsd->brd", dense, x),
                              rtol=1e-5, atol=1e-6)
  grads = jax.vmap(jax.grad(lambda v, p: jnp.sum(graphs.propagate_symmetric(graph, v) * p)))(
      x, probe)
  chex.assert_trees_all_close(np.asarray(grads), np.einsum("sr,bsd->brd", dense, probe),
                              rtol=1e-5, atol=1e-6)
  scales = jnp.asarray([1.0, 2.0, -0.5], jnp.float32)
  weighted = jax.vmap(lambda s, v: graphs.csr_product(graph.senders, graph.receivers,
                                                      s * graph.weights, v))(scales, x)
  chex.assert_trees_all_close(
      np.asarray(weighted), np.einsum("b,rs,bsd->brd", scales, dense, x), rtol=1e-5, atol=1e-6)
  # Settings with their own edges (as SGL's views): each its own dense product.
  other, _ = random_user_item_graph(rng, 10, 7, 40)
  n_edges = min(graph.senders.shape[0], other.senders.shape[0])
  views = [graphs.Graph(*(a[:n_edges] for a in g)) for g in (graph, other)]
  denses = [dense_matrix(view, 17) for view in views]
  stacked = graphs.Graph(*(jnp.stack(arrays) for arrays in zip(*views)))
  out = jax.jit(jax.vmap(lambda g, v: graphs.csr_product(*g, v)))(stacked, x[:2])
  chex.assert_trees_all_close(np.asarray(out), np.einsum("brs,bsd->brd", np.stack(denses), x[:2]),
                              rtol=1e-5, atol=1e-6)
