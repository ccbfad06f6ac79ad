"""GRCN: the refined graph and the convolutions on it against dense NumPy references of the
paper's equations; losses, gradients, config errors; tiny runs with FETTLE and BM3."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from fettle_jax import graphs
from fettle_jax import sampling
from fettle_jax import train
from fettle_jax.backbones import grcn
from fettle_jax.errors import ConfigError
from fettle_jax.types import Batch, DataInfo
from tests.conftest import assert_sane_run, tiny_config

N_USERS, N_ITEMS, SIZE = 12, 9, 4
FLOOR = grcn._AFFINITY_TOTAL_FLOOR  # pylint: disable=protected-access


def random_pairs(seed=0):
  rng = np.random.default_rng(seed)
  pairs = {(u, int(i)) for u in range(N_USERS)
           for i in rng.choice(N_ITEMS, int(rng.integers(1, 6)), replace=False)}
  return np.array(sorted(pairs), np.int64)


def grcn_config(**overrides):
  config = base.get_config("grcn")
  config.embedding_size = SIZE
  config.grcn.update(overrides)
  return config


def setup(seed=0, **overrides):
  config = grcn_config(**overrides)
  pairs = random_pairs(seed)
  rng = np.random.default_rng(seed + 10)
  features = {"image": rng.normal(size=(N_ITEMS, 7)).astype(np.float32),
              "text": rng.normal(size=(N_ITEMS, 5)).astype(np.float32)}
  static = train.StaticInputs(
      jnp.asarray(pairs, jnp.int32), sampling.seen_items(pairs, N_USERS),
      {k: jnp.asarray(v) for k, v in features.items()},
      grcn.build_graph(pairs, N_USERS, N_ITEMS, features, config))
  info = DataInfo(N_USERS, N_ITEMS, {k: v.shape[1] for k, v in features.items()})
  params = grcn.init(jax.random.PRNGKey(seed), info, config)
  # Random biases too (init sets them to 0), so the reference checks W x + b.
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(features))
  for key, name in zip(keys, sorted(features)):
    params["projectors"][name]["bias"] = 0.3 * jax.random.normal(key, (SIZE,))
  return config, pairs, features, static, params


# ----------------------------------------------------------------------------- NumPy reference


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference(params, pairs, features, cfg):
  """Dense float64 GRCN: refined weights as a dense [(U+I), (U+I)] matrix W (W[r, s] = w_sr),
  per-modality matrices, and the fused representations."""
  p64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  adjacency = np.zeros((N_USERS, N_ITEMS))
  adjacency[pairs[:, 0], pairs[:, 1]] = 1.0
  names = sorted(features)
  n = N_USERS + N_ITEMS
  per_modality, reps = [], {}
  for name in names:
    proj = p64["projectors"][name]
    z = features[name].astype(np.float64) @ proj["kernel"] + proj["bias"]
    f = unit(np.where(z > 0, z, 0.01 * z))                  # prototypical network
    p = unit(p64["preferences"][name])
    for _ in range(cfg.n_routing):                           # routing
      r = np.exp(p @ f.T) * adjacency
      p = unit(p + (r / r.sum(1, keepdims=True)) @ f)
    kept = np.maximum(p @ f.T, 0.0) * adjacency              # cosine, soft pruning
    to_users = kept / np.maximum(kept.sum(1, keepdims=True), FLOOR)  # [u, i]: i -> u
    to_items = kept.T / np.maximum(kept.T.sum(1, keepdims=True), FLOOR)  # [i, u]: u -> i
    a = np.zeros((n, n))
    a[:N_USERS, N_USERS:] = to_users
    a[N_USERS:, :N_USERS] = to_items
    per_modality.append(a)
    x = np.concatenate([p, f])
    reps[name] = x + a @ x
  stacked = np.stack(per_modality)  # [M, n, n]
  if cfg.weight_mode == "mean":
    weights = stacked.mean(0)
  elif cfg.weight_mode == "max":
    weights = stacked.max(0)
  else:  # confidence of the sending node (column s of W[r, s])
    conf = p64["confidence"].T[:, None, :]  # [M, 1, n]
    weights = np.maximum((conf * stacked).max(0), 0.0)  # 0 off the graph: stacked is 0 there
  x = unit(np.concatenate([p64["user_embedding"], p64["item_embedding"]]))
  id_rep, h = x, x
  for _ in range(cfg.n_id_layers):
    h = weights @ h
    id_rep = id_rep + h
  fused = (id_rep + sum(reps.values())) / (1 + len(names))
  return weights, per_modality, reps, fused


def adjacency_mask(adjacency):
  mask = np.zeros((N_USERS + N_ITEMS,) * 2, bool)
  mask[:N_USERS, N_USERS:] = adjacency > 0
  mask[N_USERS:, :N_USERS] = adjacency.T > 0
  return mask


def dense(edges, weights):
  out = np.zeros((N_USERS + N_ITEMS,) * 2)
  np.add.at(out, (np.asarray(edges.receivers), np.asarray(edges.senders)),
            np.asarray(weights, np.float64))
  return out


# ----------------------------------------------------------------------------- tests


def test_directed_edges_cover_both_directions_sorted_by_receiver():
  pairs = random_pairs()
  edges = grcn.bipartite_directed_edges(pairs[:, 0], pairs[:, 1], N_USERS, N_ITEMS)
  senders, receivers, users, items, reverse = (np.asarray(a) for a in edges)
  assert np.all(np.diff(receivers) >= 0)
  e = len(pairs)
  assert np.all(receivers[:e] < N_USERS) and np.all(receivers[e:] >= N_USERS)
  np.testing.assert_array_equal(receivers[:e], users[:e])  # item -> user half
  np.testing.assert_array_equal(senders[:e], items[:e] + N_USERS)
  np.testing.assert_array_equal(senders[e:], users[e:])   # user -> item half
  np.testing.assert_array_equal(receivers[e:], items[e:] + N_USERS)
  as_set = lambda u, i: sorted(zip(u.tolist(), i.tolist()))
  assert as_set(users[:e], items[:e]) == as_set(users[e:], items[e:]) == as_set(*pairs.T)
  np.testing.assert_array_equal(senders[reverse], receivers)  # the opposite edge
  np.testing.assert_array_equal(receivers[reverse], senders)
  np.testing.assert_array_equal(reverse[reverse], np.arange(2 * e))


def test_custom_gradients_equal_autodiff_of_gathers_and_segment_sums():
  """weighted_propagate / edge_dot (CSR products both ways) against jax.grad of the plain
  gather + segment_sum forms, on the half and the full edge lists."""
  pairs = random_pairs(seed=4)
  edges = grcn.bipartite_directed_edges(pairs[:, 0], pairs[:, 1], N_USERS, N_ITEMS)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(N_USERS + N_ITEMS, 3)), jnp.float32)
  probe = jnp.asarray(rng.normal(size=(N_USERS + N_ITEMS, 3)), jnp.float32)
  for edge_list in grcn.edge_lists(edges):
    w = jnp.asarray(rng.random(edge_list.senders.shape[0]), jnp.float32)
    plain = lambda w, x, el=edge_list: jax.ops.segment_sum(
        w[:, None] * x[el.senders], el.receivers, num_segments=x.shape[0])
    custom = lambda w, x, el=edge_list: graphs.weighted_propagate(el, w, x)
    np.testing.assert_allclose(jax.jit(custom)(w, x), jax.jit(plain)(w, x), rtol=1e-5,
                               atol=1e-6)
    grads = [jax.jit(jax.grad(lambda w, x, f=f: jnp.sum(f(w, x) * probe), argnums=(0, 1)))(w, x)
             for f in (custom, plain)]
    for got, expected in zip(*grads):
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    plain_dot = lambda x, el=edge_list: jnp.sum(x[el.receivers] * x[el.senders], axis=1)
    weights = jnp.asarray(rng.normal(size=edge_list.senders.shape[0]), jnp.float32)
    np.testing.assert_allclose(jax.jit(lambda x: graphs.edge_dot(edge_list, x))(x),
                               jax.jit(plain_dot)(x), rtol=1e-6)
    got, expected = (jax.jit(jax.grad(lambda x, f=f: jnp.sum(f(x) * weights)))(x)
                     for f in (lambda x: graphs.edge_dot(edge_list, x), plain_dot))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight_mode", ["confid", "mean", "max"])
def test_refined_graph_and_forward_match_dense_reference(weight_mode):
  config, pairs, features, static, params = setup(weight_mode=weight_mode)
  cfg = config.grcn
  refined = jax.jit(lambda: grcn.refine(params, static, config))()  # one program, not op by op
  weights, per_modality, reps, fused = reference(params, pairs, features, cfg)
  edges = static.graph["edges"]
  for name, expected in zip(sorted(features), per_modality):
    np.testing.assert_allclose(dense(edges, refined.affinities[name]), expected, atol=1e-6)
  np.testing.assert_allclose(dense(edges, refined.weights), weights, atol=1e-6)
  # The refinement did something: routing moved the preferences, pruning zeroed edges,
  # and each receiver's kept modality weights sum to 1.
  routed = np.asarray(refined.preferences["image"])
  assert not np.allclose(routed, np.asarray(grcn.losses.l2_normalize(
      params["preferences"]["image"])), atol=1e-3)
  mask = adjacency_mask(np.isin(np.arange(N_USERS * N_ITEMS),
                                pairs[:, 0] * N_ITEMS + pairs[:, 1]).reshape(N_USERS, N_ITEMS))
  for a in per_modality:
    assert np.any((a == 0) & mask) and np.any(a > 0)
    sums = a.sum(1)
    np.testing.assert_allclose(sums[sums > 0], 1.0, rtol=1e-9)
  assert np.all(weights[~mask] == 0) and np.all(weights >= 0)

  got = grcn.represent(params, {}, static, config)
  np.testing.assert_allclose(got.users, fused[:N_USERS], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.items, fused[N_USERS:], rtol=1e-5, atol=1e-5)
  for name in features:
    np.testing.assert_allclose(got.modality_items[name], reps[name][N_USERS:], rtol=1e-5,
                               atol=1e-5)


def test_one_propagation_on_refined_graph_equals_dense_matmul():
  config, _, _, static, params = setup(seed=1)
  refined = grcn.refine(params, static, config)
  edges = static.graph["edges"]
  x = np.random.default_rng(0).normal(size=(N_USERS + N_ITEMS, 3)).astype(np.float32)
  graph = grcn.graphs.Graph(edges.senders, edges.receivers, refined.weights)
  got = grcn.graphs.propagate(graph, jnp.asarray(x))
  np.testing.assert_allclose(got, dense(edges, refined.weights) @ x, rtol=1e-5, atol=1e-6)


def test_loss_is_bpr_plus_mmrec_l2_and_gradients_reach_every_parameter():
  config, pairs, features, static, params = setup(seed=2)
  batch = Batch(jnp.array([0, 3, 3, 7, 11]), jnp.array([1, 2, 2, 5, 8]),
                jnp.array([4, 0, 6, 6, 3]))
  loss, grads = jax.jit(jax.value_and_grad(
      lambda p: grcn.apply(p, {}, static, batch, None, config)[1]))(params)
  _, _, _, fused = reference(params, pairs, features, config.grcn)
  u, pos, neg = (np.asarray(a) for a in batch)
  users, items = fused[:N_USERS], fused[N_USERS:]
  margin = np.sum(users[u] * (items[pos] - items[neg]), 1)
  bpr = np.mean(np.log1p(np.exp(-margin)))
  # MMRec: element means over the batch's (user, item) rows, B users x (pos, neg).
  eu, ei = np.asarray(params["user_embedding"]), np.asarray(params["item_embedding"])
  user_rows, item_rows = np.repeat(u, 2), np.stack([pos, neg], 1).reshape(-1)
  reg = np.mean(eu[user_rows] ** 2 + ei[item_rows] ** 2)
  reg += sum(np.mean(np.asarray(params["preferences"][m])[user_rows] ** 2) for m in features)
  assert float(loss) == pytest.approx(bpr + 0.1 * reg, rel=1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), name
    assert np.any(np.asarray(g) != 0), name


def test_fusion_options_and_shapes():
  for fusion, width in (("concat", 3 * SIZE), ("id", SIZE), ("mean", SIZE)):
    config, _, features, static, params = setup(fusion=fusion)
    config.alignment = "none"
    reps = grcn.represent(params, {}, static, config)
    assert reps.users.shape == (N_USERS, width) and reps.items.shape == (N_ITEMS, width)
    assert sorted(reps.modality_items) == sorted(features)
    assert all(v.shape == (N_ITEMS, SIZE) for v in reps.modality_items.values())
  # 'id' fusion is the ID convolution alone: a different model from 'mean'.
  config, _, _, static, params = setup(fusion="id")
  id_only = grcn.represent(params, {}, static, config).items
  config.grcn.fusion = "mean"
  assert not np.allclose(id_only, grcn.represent(params, {}, static, config).items)


def test_config_errors():
  for field, value in (("weight_mode", "sum"), ("fusion", "add"), ("n_routing", -1),
                       ("n_id_layers", -1), ("reg_weight", -0.1)):
    cfg = grcn.default_config()
    cfg[field] = value
    with pytest.raises(ConfigError, match=f"grcn.{field}"):
      grcn.check_config(cfg)
  config = grcn_config(fusion="concat")
  config.alignment = "fettle"
  info = DataInfo(N_USERS, N_ITEMS, {"image": 7})
  with pytest.raises(ConfigError, match="concat"):
    grcn.init(jax.random.PRNGKey(0), info, config)
  with pytest.raises(ConfigError, match="modality"):
    grcn.build_graph(random_pairs(), N_USERS, N_ITEMS, {}, config)


@pytest.mark.parametrize("alignment", ["bm3", "fettle"])
def test_tiny_end_to_end_run(tiny_mmrec, tmp_path, alignment):
  config = tiny_config(tiny_mmrec, model="grcn", alignment=alignment)
  config.max_epochs = 2
  result = train.train_and_evaluate(config, str(tmp_path / "run"))  # asserts one trace
  assert_sane_run(result, n_epochs=2, aligned=True)
