"""LATTICE: its item-item graphs (initial, learned, mixed) and forward pass against dense NumPy
references on tiny data; gradients; the epoch hook; tiny aligned runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from fettle_jax import sampling
from fettle_jax import train
from fettle_jax.backbones import lattice
from fettle_jax.errors import ConfigError
from fettle_jax.types import Batch, DataInfo
from tests.conftest import assert_sane_run, tiny_config

N_USERS, N_ITEMS, K = 20, 24, 4


def random_pairs(seed=0):
  """Unique train pairs; every user and every item appears."""
  rng = np.random.default_rng(seed)
  pairs = {(u % N_USERS, u) for u in range(N_ITEMS)}
  for u in range(N_USERS):
    pairs |= {(u, int(i)) for i in rng.choice(N_ITEMS, int(rng.integers(2, 7)), replace=False)}
  return np.array(sorted(pairs), np.int32)


def random_features(seed=1):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(N_ITEMS, 10)).astype(np.float32),
          "text": rng.normal(size=(N_ITEMS, 6)).astype(np.float32)}


def lattice_config(**overrides):
  config = base.get_config("lattice")
  config.embedding_size = 8
  config.lattice.update(knn_k=K, knn_block_size=7, **overrides)  # 7: a padded last block
  return config


def setup(config):
  pairs, features = random_pairs(), random_features()
  static = train.StaticInputs(
      jnp.asarray(pairs), sampling.seen_items(pairs, N_USERS),
      {k: jnp.asarray(v) for k, v in features.items()},
      lattice.build_graph(pairs, N_USERS, N_ITEMS, features, config))
  info = DataInfo(N_USERS, N_ITEMS, {k: v.shape[1] for k, v in features.items()})
  params = lattice.init(jax.random.PRNGKey(0), info, config)
  # Non-trivial biases and modality logits, so the references test them too.
  rng = np.random.default_rng(5)
  for projector in params["projectors"].values():
    projector["bias"] = jnp.asarray(rng.normal(size=projector["bias"].shape), jnp.float32)
  params["modality_logits"] = jnp.asarray([0.7, -0.4], jnp.float32)
  return pairs, features, static, info, params


# ----------------------------------------------------------------------------- dense references


def reference_neighbours(x, k):
  """Top-k of brute-force float64 cosine similarity (self included), ties to the lower index."""
  x = np.asarray(x, np.float64)
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  return np.argsort(-(unit @ unit.T), axis=1, kind="stable")[:, :k]


def reference_knn_graph(x, neighbours):
  """Eq. 1-3: the cosine matrix kept at each row's kNN (values, not 0/1), D^-1/2 S D^-1/2."""
  x = np.asarray(x, np.float64)
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  similarity = unit @ unit.T
  sparse = np.zeros_like(similarity)
  np.put_along_axis(sparse, neighbours, np.take_along_axis(similarity, neighbours, 1), axis=1)
  degree = sparse.sum(1)
  assert np.all(degree > 0)
  return sparse / np.sqrt(degree)[:, None] / np.sqrt(degree)[None, :]


def dense(graph, n):
  out = np.zeros((n, n))
  np.add.at(out, (np.asarray(graph.receivers), np.asarray(graph.senders)),
            np.asarray(graph.weights, np.float64))
  return out


def projected(params, features):
  return {name: np.asarray(x, np.float64) @ np.asarray(params["projectors"][name]["kernel"])
          + np.asarray(params["projectors"][name]["bias"]) for name, x in features.items()}


def reference_item_graph(params, features, learned_neighbours, lam):
  """Eq. 6-7: sum_m softmax(logits)_m ((1 - lam) learned_m + lam initial_m), dense."""
  logits = np.asarray(params["modality_logits"], np.float64)
  alpha = np.exp(logits) / np.exp(logits).sum()
  e = projected(params, features)
  total = np.zeros((N_ITEMS, N_ITEMS))
  for m, name in enumerate(sorted(features)):
    initial = reference_knn_graph(features[name], reference_neighbours(features[name], K))
    learned = reference_knn_graph(e[name], learned_neighbours[name])
    total += alpha[m] * ((1 - lam) * learned + lam * initial)
  return total


def reference_user_item(pairs):
  adjacency = np.zeros((N_USERS + N_ITEMS,) * 2)
  adjacency[pairs[:, 0], pairs[:, 1] + N_USERS] = 1.0
  adjacency[pairs[:, 1] + N_USERS, pairs[:, 0]] = 1.0
  inv_sqrt = 1.0 / np.sqrt(adjacency.sum(1))
  return inv_sqrt[:, None] * adjacency * inv_sqrt[None, :]


# ----------------------------------------------------------------------------- graphs


def test_initial_graph_is_the_normalized_weighted_knn_of_the_raw_features():
  config = lattice_config()
  _, features, static, _, _ = setup(config)
  for name, x in features.items():
    initial = static.graph["initial"][name]
    np.testing.assert_array_equal(initial["neighbours"], reference_neighbours(x, K))
    got = np.zeros((N_ITEMS, N_ITEMS))
    np.put_along_axis(got, np.asarray(initial["neighbours"]), np.asarray(initial["weights"]), 1)
    np.testing.assert_allclose(got, reference_knn_graph(x, reference_neighbours(x, K)),
                               rtol=1e-5, atol=1e-7)


def test_learned_graph_and_modality_mixing_match_dense_numpy():
  config = lattice_config()
  _, features, static, info, params = setup(config)
  state = lattice.init_state(jax.random.PRNGKey(0), static, info, config)
  for name in features:  # before the first epoch hook: the initial graph's neighbours
    np.testing.assert_array_equal(state["learned_neighbours"][name],
                                  static.graph["initial"][name]["neighbours"])
  state = jax.jit(lambda p, s: lattice.epoch_start(p, s, static, info, None, config))(
      params, state)
  e = projected(params, features)
  expected = {name: reference_neighbours(e[name], K) for name in features}
  for name in features:  # re-selected from the current projections W x + b (Eq. 4-5)
    np.testing.assert_array_equal(state["learned_neighbours"][name], expected[name])
    assert not np.array_equal(expected[name], reference_neighbours(features[name], K))
  graph, modality = jax.jit(lambda p: lattice.item_item_graph(p, state, static, config))(params)
  assert np.all(np.diff(np.asarray(graph.receivers)) >= 0)  # propagate's sorted contract
  np.testing.assert_allclose(dense(graph, N_ITEMS),
                             reference_item_graph(params, features, expected, 0.9),
                             rtol=1e-5, atol=1e-6)
  for name in features:  # modality_items are LATTICE's projected features e~^m
    np.testing.assert_allclose(modality[name], e[name], rtol=1e-5, atol=1e-5)
  # lambda = 1: only the frozen graph; lambda = 0: only the learned one.
  for lam in (0.0, 1.0):
    cfg = lattice_config(lambda_coeff=lam)
    g, _ = lattice.item_item_graph(params, state, static, cfg)
    np.testing.assert_allclose(dense(g, N_ITEMS),
                               reference_item_graph(params, features, expected, lam),
                               rtol=1e-5, atol=1e-6)


def test_learned_weights_follow_the_projectors_within_an_epoch():
  """Neighbour sets are kept from the epoch hook; the edge weights move with W_m every step."""
  config = lattice_config()
  _, features, static, info, params = setup(config)
  state = lattice.epoch_start(params, None, static, info, None, config)
  moved = jax.tree_util.tree_map(lambda a: a, params)
  moved["projectors"]["text"]["kernel"] = params["projectors"]["text"]["kernel"] * -1.3 + 0.2
  before, _ = lattice.item_item_graph(params, state, static, config)
  after, _ = lattice.item_item_graph(moved, state, static, config)
  np.testing.assert_array_equal(before.senders, after.senders)
  assert not np.allclose(before.weights, after.weights)
  np.testing.assert_allclose(dense(after, N_ITEMS), reference_item_graph(
      moved, features, {n: np.asarray(v) for n, v in state["learned_neighbours"].items()}, 0.9),
                             rtol=1e-5, atol=1e-6)
  changed = lattice.epoch_start(moved, state, static, info, None, config)
  assert not np.array_equal(changed["learned_neighbours"]["text"],
                            state["learned_neighbours"]["text"])


# ----------------------------------------------------------------------------- forward, loss, grads


def test_apply_equals_dense_forward_and_gradients_reach_every_parameter():
  config = lattice_config(reg_weight=0.01)
  pairs, features, static, info, params = setup(config)
  state = lattice.epoch_start(params, None, static, info, None, config)
  batch = Batch(jnp.array([0, 3, 3, 9, 17]), jnp.array([1, 5, 7, 2, 23]),
                jnp.array([4, 4, 0, 11, 8]))

  def loss_fn(p):
    reps, loss = lattice.apply(p, state, static, batch, None, config)
    return loss, reps
  (loss, reps), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

  # Dense forward: LightGCN mean of layers 0..2, plus the normalized A h (Eq. 8-9).
  ego = np.concatenate([params["user_embedding"], params["item_embedding"]]).astype(np.float64)
  a = reference_user_item(pairs)
  final = (ego + a @ ego + a @ a @ ego) / 3
  h = reference_item_graph(params, features, {n: np.asarray(v) for n, v in
                                               state["learned_neighbours"].items()}, 0.9)
  h = h @ np.asarray(params["item_embedding"], np.float64)
  users = final[:N_USERS]
  items = final[N_USERS:] + h / np.linalg.norm(h, axis=1, keepdims=True)
  np.testing.assert_allclose(reps.users, users, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(reps.items, items, rtol=1e-4, atol=1e-5)
  u, pos, neg = (np.asarray(x) for x in batch)
  margin = np.sum(users[u] * (items[pos] - items[neg]), axis=1)
  reg = 0.5 * (np.sum(users[u] ** 2) + np.sum(items[pos] ** 2) + np.sum(items[neg] ** 2)) / 5
  assert float(loss) == pytest.approx(np.mean(np.log1p(np.exp(-margin))) + 0.01 * reg, rel=1e-5)
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(leaf)), name
    assert np.any(np.asarray(leaf) != 0), name


def test_bad_settings_are_config_errors():
  for field, value in (("knn_k", 0), ("knn_block_size", 0), ("n_layers", -1),
                       ("n_ui_layers", -2), ("lambda_coeff", 1.2), ("reg_weight", -1.0)):
    cfg = lattice.default_config()
    cfg[field] = value
    with pytest.raises(ConfigError, match=f"lattice.{field}"):
      lattice.check_config(cfg)
  with pytest.raises(ConfigError, match="content modality"):
    lattice.build_graph(random_pairs(), N_USERS, N_ITEMS, {}, lattice_config())


# BM3 on a multi-modal backbone runs in test_grcn.py and test_slmrec.py.
@pytest.mark.parametrize("alignment", ["fettle"])
def test_tiny_aligned_run_trains_two_epochs(tiny_mmrec, tmp_path, alignment):
  config = tiny_config(tiny_mmrec, model="lattice", alignment=alignment)
  config.max_epochs, config.lattice.knn_k = 2, 4
  result = train.train_and_evaluate(config, str(tmp_path / "run"))  # asserts one epoch trace
  assert_sane_run(result, n_epochs=2, aligned=True)
