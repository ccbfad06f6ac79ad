"""DualGNN: the user co-occurrence top-k and the whole forward against dense NumPy
references; losses, gradients, config errors and tiny end-to-end runs."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from fettle_jax import sampling
from fettle_jax import train
from fettle_jax.backbones import dualgnn
from fettle_jax.errors import ConfigError
from fettle_jax.types import Batch, DataInfo
from tests.conftest import assert_sane_run, tiny_config

N_USERS, N_ITEMS = 24, 15


def random_pairs(seed=0):
  """Train pairs with many tied co-occurrence counts, one duplicated pair, and user 0
  alone on item 0 (no co-occurring user)."""
  rng = np.random.default_rng(seed)
  pairs = [(0, 0)]
  for u in range(1, N_USERS):
    size = int(rng.integers(1, 5))
    pairs += [(u, int(i)) for i in rng.choice(np.arange(1, N_ITEMS), size, replace=False)]
  pairs.append(pairs[-1])  # a repeated interaction is one shared item, not two
  return np.array(pairs, np.int64)


def random_features(seed=1):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(N_ITEMS, 10)).astype(np.float32),
          "text": rng.normal(size=(N_ITEMS, 6)).astype(np.float32)}


def dense_counts(pairs, n_users, n_items):
  adjacency = np.zeros((n_users, n_items))
  adjacency[pairs[:, 0], pairs[:, 1]] = 1.0  # duplicates collapse
  counts = adjacency @ adjacency.T
  np.fill_diagonal(counts, 0)
  return counts


def reference_topk(pairs, n_users, n_items, k):
  """Dense reference: per row, users by count descending, ties to the lower id (a stable
  sort of -count), the first k with a positive count; -1 / 0 pad the rest."""
  counts = dense_counts(pairs, n_users, n_items)
  k = min(k, n_users - 1)
  neighbours = np.full((n_users, k), -1)
  top_counts = np.zeros((n_users, k), int)
  for u in range(n_users):
    order = np.argsort(-counts[u], kind="stable")
    order = [v for v in order if v != u and counts[u, v] > 0][:k]
    neighbours[u, :len(order)] = order
    top_counts[u, :len(order)] = counts[u, order]
  return neighbours, top_counts


def reference_user_matrix(pairs, n_users, n_items, k, aggregation):
  """Dense [n_users, n_users] a_uv: softmax of the counts (or 1/|N|) over the top-k."""
  neighbours, counts = reference_topk(pairs, n_users, n_items, k)
  out = np.zeros((n_users, n_users))
  for u in range(n_users):
    real = neighbours[u] >= 0
    if not real.any():
      continue
    scores = np.exp(counts[u, real]) if aggregation == "softmax" else np.ones(real.sum())
    out[u, neighbours[u, real]] = scores / scores.sum()
  return out


def test_cooccurrence_topk_matches_dense_count_reference():
  pairs = random_pairs()
  counts = dense_counts(pairs, N_USERS, N_ITEMS)
  assert np.all(counts[0] == 0)  # user 0 co-occurs with nobody
  # Ties are frequent on this data: the tie rule is exercised.
  assert max(np.bincount(row[row > 0].astype(int)).max() for row in counts if row.any()) > 2
  for k in (1, 3, 5, N_USERS + 10):  # k > n_users - 1 is clipped
    expected = reference_topk(pairs, N_USERS, N_ITEMS, k)
    for block_rows in (1, 5, 7, None, 10 ** 6):  # padded last blocks, one block, the default
      got = dualgnn.cooccurrence_topk(pairs[:, 0], pairs[:, 1], N_USERS, N_ITEMS, k,
                                      block_rows)
      np.testing.assert_array_equal(got[0], expected[0])
      np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("aggregation", ["softmax", "mean"])
def test_user_graph_edges_match_dense_weight_reference(aggregation):
  pairs = random_pairs()
  config = base.get_config("dualgnn")
  config.dualgnn.update(user_k=3, user_aggregation=aggregation)
  structures = dualgnn.cached_structures(pairs, N_USERS, N_ITEMS, config)
  assert all(isinstance(v, np.ndarray) for v in structures.values())
  receivers = structures["user_user_receivers"]
  assert np.all(np.diff(receivers) >= 0)  # propagate's sorted segments
  dense = np.zeros((N_USERS, N_USERS))
  np.add.at(dense, (receivers, structures["user_user_senders"]),
            structures["user_user_weights"])
  expected = reference_user_matrix(pairs, N_USERS, N_ITEMS, 3, aggregation)
  np.testing.assert_allclose(dense, expected, rtol=1e-6, atol=1e-7)
  rows = expected.sum(1)
  assert rows[0] == 0 and np.allclose(rows[1:][rows[1:] > 0], 1.0)


def make_setup(batch_size=20, **overrides):
  config = base.get_config("dualgnn")
  config.embedding_size = 8
  config.dualgnn.update(user_k=3, reg_weight=0.1, **overrides)
  # Distinct pairs, as the data loader gives (user_item_graph counts a repeat twice).
  pairs, features = np.unique(random_pairs(), axis=0), random_features()
  graph = dualgnn.build_graph(pairs, N_USERS, N_ITEMS, features, config)
  # What the train loop merges in from the cache (cached_structures -> device arrays).
  graph.update({k: jnp.asarray(v) for k, v in
                dualgnn.cached_structures(pairs, N_USERS, N_ITEMS, config).items()})
  static = train.StaticInputs(jnp.asarray(pairs), sampling.seen_items(pairs, N_USERS),
                              {k: jnp.asarray(v) for k, v in features.items()}, graph)
  info = DataInfo(N_USERS, N_ITEMS, {k: v.shape[1] for k, v in features.items()})
  params = dualgnn.init(jax.random.PRNGKey(0), info, config)
  # Distinct per-user fusion weights (init is ~1/M each), so the fusion is really tested.
  params["user_modality_weights"] = jax.random.uniform(jax.random.PRNGKey(7),
                                                       (N_USERS, 2), minval=0.1, maxval=1.5)
  rng = np.random.default_rng(3)
  batch = Batch(*(jnp.asarray(rng.integers(0, n, batch_size), jnp.int32)
                  for n in (N_USERS, N_ITEMS, N_ITEMS)))
  return config, pairs, features, static, params, batch


def numpy_forward(params, pairs, features, config):
  """The model's equations with dense float64 matrices."""
  cfg = config.dualgnn
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  adjacency = np.zeros((N_USERS + N_ITEMS,) * 2)
  adjacency[pairs[:, 0], pairs[:, 1] + N_USERS] = 1.0
  adjacency[pairs[:, 1] + N_USERS, pairs[:, 0]] = 1.0
  degree = adjacency.sum(1)
  inv = np.where(degree > 0, degree ** -0.5, 0.0)
  normalized = inv[:, None] * adjacency * inv[None, :]
  per_modality = []
  for m, name in enumerate(sorted(features)):
    mlp = p["projectors"][name]
    hidden = features[name] @ mlp["hidden"]["kernel"] + mlp["hidden"]["bias"]
    hidden = np.where(hidden > 0, hidden, 0.01 * hidden)
    items = hidden @ mlp["output"]["kernel"] + mlp["output"]["bias"]
    x = np.concatenate([p["user_embedding"][:, m], items])
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    total, h = x.copy(), x
    for _ in range(cfg.n_layers):
      h = normalized @ h
      total += h
    per_modality.append(total)
  users = sum(p["user_modality_weights"][:, m:m + 1] * rep[:N_USERS]
              for m, rep in enumerate(per_modality))
  users = users + reference_user_matrix(pairs, N_USERS, N_ITEMS, cfg.user_k,
                                        cfg.user_aggregation) @ users
  items = sum(rep[N_USERS:] for rep in per_modality)
  modality_items = {name: rep[N_USERS:] for name, rep in zip(sorted(features), per_modality)}
  return users, items, modality_items


def test_forward_and_loss_match_dense_reference():
  # 'mean' differs only in the user-graph weights, checked above.
  aggregation = "softmax"
  config, pairs, features, static, params, batch = make_setup(user_aggregation=aggregation)
  users, items, modality_items = numpy_forward(params, pairs, features, config)
  u = users[batch.users]
  margin = np.sum(u * (items[batch.pos_items] - items[batch.neg_items]), 1)
  prefs = np.asarray(params["user_embedding"], np.float64)[np.asarray(batch.users)]
  reg = sum(np.mean(prefs[:, m] ** 2) for m in range(2)) + np.mean(
      np.asarray(params["user_modality_weights"], np.float64) ** 2)
  expected_loss = np.mean(np.log1p(np.exp(-margin))) + 0.1 * reg

  evaluated = jax.jit(lambda p, s: dualgnn.represent(p, {}, s, config))(params, static)
  reps, loss = jax.jit(lambda p, s: dualgnn.apply(p, {}, s, batch, None, config))(params, static)
  for got in (evaluated, reps):
    np.testing.assert_allclose(got.users, users, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.items, items, rtol=1e-5, atol=1e-5)
    assert sorted(got.modality_items) == ["image", "text"]
    for name, table in got.modality_items.items():
      np.testing.assert_allclose(table, modality_items[name], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
  # The second graph matters on this data: with its weights zeroed the users change.
  graph = dict(static.graph, user_user_weights=jnp.zeros_like(static.graph["user_user_weights"]))
  alone = dualgnn.represent(params, {}, static._replace(graph=graph), config)
  assert np.abs(np.asarray(alone.users) - users).max() > 1e-2


def test_loss_finite_and_gradients_reach_every_parameter():
  config, _, _, static, params, batch = make_setup()

  @jax.jit
  def loss_and_grads(params, static):
    return jax.value_and_grad(lambda p: dualgnn.apply(p, {}, static, batch, None, config)[1])(
        params)

  loss, grads = loss_and_grads(params, static)
  assert np.isfinite(float(loss))
  leaves = jax.tree_util.tree_leaves_with_path(grads)
  assert len(leaves) == 2 + 2 * 4  # preferences, fusion weights, 2 x (hidden, output) x (W, b)
  for path, g in leaves:
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), name
    assert np.any(g != 0), name


def test_bad_settings_are_config_errors():
  for field, value in (("user_aggregation", "max"), ("user_k", 0), ("n_layers", -1),
                       ("mlp_hidden_factor", 0), ("reg_weight", -1.0)):
    cfg = dualgnn.default_config()
    cfg[field] = value
    with pytest.raises(ConfigError, match=f"dualgnn.{field}"):
      dualgnn.check_config(cfg)
  with pytest.raises(ConfigError, match="content modality"):
    dualgnn.build_graph(random_pairs(), N_USERS, N_ITEMS, {}, base.get_config("dualgnn"))


# alignment 'none' trains through the same apply (its loss and gradients are tested above).
# BM3 on a multi-modal backbone runs in test_grcn.py and test_slmrec.py.
@pytest.mark.parametrize("alignment", ["fettle"])
def test_tiny_end_to_end_run(tiny_mmrec, tmp_path, alignment):
  config = tiny_config(tiny_mmrec, model="dualgnn", alignment=alignment)
  config.max_epochs = 2
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert_sane_run(result, n_epochs=2, aligned=True)
  # The user graph was computed once and cached next to the data.
  assert len(glob.glob(os.path.join(tiny_mmrec, "derived", "dualgnn-*.npz"))) == 1
