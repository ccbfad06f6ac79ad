"""SGL: graph views (ED, ND, RW) and the SSL InfoNCE against NumPy references; tiny runs."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from fettle_jax import graphs
from fettle_jax import sampling
from fettle_jax import losses
from fettle_jax import train
from fettle_jax.backbones import sgl
from fettle_jax.errors import ConfigError
from fettle_jax.types import Batch, DataInfo
from tests.conftest import tiny_config

N_USERS, N_ITEMS = 12, 9
INFO = DataInfo(N_USERS, N_ITEMS, {})


def random_pairs(seed=0, per_user=4):
  rng = np.random.default_rng(seed)
  return np.array([(u, i) for u in range(N_USERS)
                   for i in rng.choice(N_ITEMS, per_user, replace=False)], np.int64)


def sgl_config(**overrides):
  config = base.get_config("sgl")
  config.sgl.update(overrides)
  return config


def directed_weights(graph: graphs.Graph) -> dict:
  """{(sender, receiver): weight} of a graph, on the host."""
  s, r, w = (np.asarray(a) for a in graph)
  return {(int(a), int(b)): float(c) for a, b, c in zip(s, r, w)}


def numpy_normalized(pairs, n_users, n_items) -> dict:
  """Reference D^-1/2 A D^-1/2 of the bipartite graph on `pairs`, as {(s, r): w}."""
  du = np.bincount(pairs[:, 0], minlength=n_users)
  di = np.bincount(pairs[:, 1], minlength=n_items)
  out = {}
  for u, i in pairs:
    w = 1.0 / math.sqrt(du[u] * di[i])
    out[(int(u), int(i) + n_users)] = w
    out[(int(i) + n_users, int(u))] = w
  return out


def assert_sorted_by_receiver(graph):
  receivers = np.asarray(graph.receivers)
  assert np.all(np.diff(receivers) >= 0)


def test_edge_dropout_view_is_a_renormalized_subset_of_the_training_graph():
  pairs = random_pairs()
  edges = graphs.bipartite_edges(pairs[:, 0], pairs[:, 1], N_USERS, N_ITEMS)
  view = sgl.edge_dropout_graph(jax.random.PRNGKey(3), edges, N_USERS, N_ITEMS, 0.25)
  assert_sorted_by_receiver(view)
  got = directed_weights(view)
  kept = np.array(sorted({(s, r - N_USERS) for s, r in got if s < N_USERS}))
  assert len(kept) == round(0.75 * len(pairs)) and len(got) == 2 * len(kept)
  assert {tuple(p) for p in kept} <= {tuple(p) for p in pairs}  # subset of the train edges
  expected = numpy_normalized(kept, N_USERS, N_ITEMS)  # degrees on the kept edges only
  assert got.keys() == expected.keys()
  for key, weight in expected.items():
    assert got[key] == pytest.approx(weight, rel=1e-6)


def test_node_dropout_removes_every_edge_of_a_dropped_node_and_renormalizes():
  pairs = random_pairs(seed=1)
  edges = graphs.bipartite_edges(pairs[:, 0], pairs[:, 1], N_USERS, N_ITEMS)
  keep_users = np.ones(N_USERS, np.float32)
  keep_items = np.ones(N_ITEMS, np.float32)
  keep_users[[2, 7]] = 0.0
  keep_items[[0, 5]] = 0.0
  view = sgl.node_dropout_graph(edges, jnp.asarray(keep_users), jnp.asarray(keep_items),
                                N_USERS, N_ITEMS)
  assert_sorted_by_receiver(view)
  assert view.senders.shape == (2 * len(pairs),)  # static shape: every edge, some weight 0
  got = directed_weights(view)
  survivors = np.array([p for p in pairs if keep_users[p[0]] and keep_items[p[1]]])
  expected = numpy_normalized(survivors, N_USERS, N_ITEMS)
  for (s, r), weight in got.items():
    user, item = (s, r - N_USERS) if s < N_USERS else (r, s - N_USERS)
    if user in (2, 7) or item in (0, 5):
      assert weight == 0.0  # every edge of a dropped node is gone
    else:
      assert weight == pytest.approx(expected[(s, r)], rel=1e-6)
  assert sum(w > 0 for w in got.values()) == 2 * len(survivors)


def test_node_keep_mask_drops_the_configured_count():
  mask = np.asarray(sgl.node_keep_mask(jax.random.PRNGKey(0), 40, 0.2))
  assert set(np.unique(mask)) <= {0.0, 1.0} and int((mask == 0).sum()) == 8
  assert np.all(np.asarray(sgl.node_keep_mask(jax.random.PRNGKey(0), 40, 0.0)) == 1.0)


def make_static(pairs):
  structures = sgl.build_graph(pairs, N_USERS, N_ITEMS, {}, sgl_config())
  return train.StaticInputs(jnp.asarray(pairs), sampling.seen_items(pairs, N_USERS), {},
                            structures)


@pytest.mark.parametrize("kind", ["ED", "ND", "RW"])
def test_two_views_differ_and_are_deterministic_per_rng(kind):
  pairs = random_pairs(seed=2)
  static = make_static(pairs)
  config = sgl_config(type=kind, drop_ratio=0.2, n_layers=2)
  draw = jax.jit(lambda rng: sgl.init_state(rng, static, INFO, config))
  state = draw(jax.random.PRNGKey(0))
  again = draw(jax.random.PRNGKey(0))
  jax.tree_util.tree_map(np.testing.assert_array_equal, state, again)
  views = state["views"]
  assert views.weights.shape[:2] == (2, 2 if kind == "RW" else 1)
  assert not np.array_equal(views.weights[0], views.weights[1])  # the two views differ
  if kind == "RW":  # a different edge-dropout graph per layer
    assert not np.array_equal(views.senders[0, 0], views.senders[0, 1])
  nxt = jax.jit(lambda rng: sgl.epoch_start(None, state, static, INFO, rng, config))(
      jax.random.PRNGKey(1))
  assert not np.array_equal(nxt["views"].weights, views.weights)  # redrawn each epoch
  # Every view, every layer: symmetric weights on train edges only.
  train_edges = numpy_normalized(pairs, N_USERS, N_ITEMS).keys()
  for v in range(2):
    for g in range(views.weights.shape[1]):
      got = directed_weights(graphs.Graph(*(a[v, g] for a in views)))
      assert {k for k, w in got.items() if w > 0} <= train_edges
      for (s, r), w in got.items():
        assert got[(r, s)] == pytest.approx(w)


def numpy_info_nce_sum(a, b, ids, tau):
  """Eq. 10 over the unique ids: sum_i -log( e^{cos(a_i,b_i)/tau} / sum_j e^{cos(a_i,b_j)/tau} )."""
  unique = np.unique(ids)
  an = a[unique] / np.linalg.norm(a[unique], axis=1, keepdims=True)
  bn = b[unique] / np.linalg.norm(b[unique], axis=1, keepdims=True)
  total = 0.0
  for row in range(len(unique)):
    scores = np.exp(an[row] @ bn.T / tau)
    total += -np.log(scores[row] / scores.sum())
  return total


def test_distinct_rows_info_nce_matches_numpy_info_nce():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(10, 5)).astype(np.float32)
  b = rng.normal(size=(10, 5)).astype(np.float32)
  ids = np.array([3, 7, 3, 0, 9, 7, 1], np.int32)  # repeats count once
  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda x: losses.distinct_rows_info_nce(x, jnp.asarray(b), jnp.asarray(ids), 0.3)))
  got, grads = loss_and_grad(jnp.asarray(a))
  assert float(got) == pytest.approx(numpy_info_nce_sum(a, b, ids, 0.3), rel=1e-5)
  assert np.all(np.isfinite(grads))
  assert np.all(np.asarray(grads)[[2, 4, 5, 6, 8]] == 0.0)  # rows outside the batch
  # A batch longer than the catalogue (ml100k's users): keys capped at the node count.
  many = np.random.default_rng(1).integers(0, 10, size=25).astype(np.int32)
  got = jax.jit(losses.distinct_rows_info_nce, static_argnums=3)(jnp.asarray(a), jnp.asarray(b),
                                                 jnp.asarray(many), 0.3)
  assert float(got) == pytest.approx(numpy_info_nce_sum(a, b, many, 0.3), rel=1e-5)


def numpy_lightgcn(ego, weights: dict, n_layers):
  """Mean of A^k ego, k = 0..K, with A[r, s] = w_sr (dense: a test-sized graph)."""
  a = np.zeros((len(ego), len(ego)))
  for (s, r), w in weights.items():
    a[r, s] += w
  layers = [ego]
  for _ in range(n_layers):
    layers.append(a @ layers[-1])
  return np.mean(layers, axis=0)


def test_apply_equals_numpy_bpr_plus_scaled_ssl_plus_l2():
  pairs = random_pairs(seed=3)
  static = make_static(pairs)
  config = sgl_config(n_layers=2)
  config.embedding_size = 4
  params = sgl.init(jax.random.PRNGKey(0), INFO, config)
  state = sgl.init_state(jax.random.PRNGKey(1), static, INFO, config)
  batch = Batch(jnp.array([0, 1, 1, 4]), jnp.array([2, 3, 5, 5]), jnp.array([0, 0, 1, 8]))
  _, got = jax.jit(lambda p: sgl.apply(p, state, static, batch, None, config))(params)

  ego = np.concatenate([params["user_embedding"], params["item_embedding"]]).astype(np.float64)
  u, pos, neg = (np.asarray(x) for x in batch)
  final = numpy_lightgcn(ego, numpy_normalized(pairs, N_USERS, N_ITEMS), 2)
  users, items = final[:N_USERS], final[N_USERS:]
  margin = np.sum(users[u] * (items[pos] - items[neg]), axis=1)
  bpr = np.mean(np.log1p(np.exp(-margin)))
  l2 = (np.sum(ego[u] ** 2) + np.sum(ego[N_USERS + pos] ** 2)
        + np.sum(ego[N_USERS + neg] ** 2)) / 4
  z = [numpy_lightgcn(ego, directed_weights(graphs.Graph(*(a[v, 0] for a in state["views"]))),
                      2) for v in (0, 1)]
  ssl = (numpy_info_nce_sum(z[0][:N_USERS], z[1][:N_USERS], u, 0.5)
         + numpy_info_nce_sum(z[0][N_USERS:], z[1][N_USERS:], pos, 0.5))
  # Eq. 11 with the InfoNCE sum scaled by 1 / B like the mean BPR (module docstring).
  assert float(got) == pytest.approx(bpr + 0.05 * ssl / 4 + 1e-4 * l2, rel=1e-5)
  assert 0.05 * ssl / 4 > 1e-3 * bpr  # the SSL term is not negligible in this check


def test_bad_settings_are_config_errors():
  for field, value in (("type", "XX"), ("drop_ratio", 1.0), ("ssl_tau", 0.0), ("n_layers", 0)):
    cfg = sgl.default_config()
    cfg[field] = value
    with pytest.raises(ConfigError, match=f"sgl.{field}"):
      sgl.check_config(cfg)


@pytest.mark.parametrize("alignment", ["none", "fettle"])
def test_tiny_end_to_end_run(tiny_mmrec, tmp_path, alignment):
  config = tiny_config(tiny_mmrec, model="sgl", alignment=alignment)
  config.max_epochs, config.sgl.n_layers = 2, 2  # small program: the tests stay fast
  # train_and_evaluate asserts (chex) that the epoch compiles once, views and all.
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["epochs"] == 2
  for record in result["history"]:
    assert all(np.isfinite(v) for k, v in record.items() if "loss" in k)
    if alignment == "fettle":
      assert record["alignment_loss"] > 0
  for split in ("valid", "test"):
    for name, value in result[split].items():
      assert 0.0 <= value <= 1.0, name
