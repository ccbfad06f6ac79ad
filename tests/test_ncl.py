"""NCL: k-means E-step, structure and prototype terms, and the full loss against NumPy
references; per-epoch model state in one compiled epoch; tiny end-to-end runs."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from fettle_jax import backbones as backbone_contract
from fettle_jax import losses
from fettle_jax import train
from fettle_jax.backbones import ncl
from fettle_jax.errors import ConfigError
from fettle_jax.types import Batch
from tests.conftest import tiny_config


# ----------------------------------------------------------------------------- NumPy references


def np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_lloyd(x, centroids, n_iters):
  """Textbook Lloyd's algorithm in float64; an empty cluster keeps its centroid."""
  x, c = x.astype(np.float64), centroids.astype(np.float64).copy()
  for _ in range(n_iters):
    assign = np.argmin(((x[:, None, :] - c[None, :, :]) ** 2).sum(-1), axis=1)
    for j in range(len(c)):
      if np.any(assign == j):
        c[j] = x[assign == j].mean(axis=0)
  return c, np.argmin(((x[:, None, :] - c[None, :, :]) ** 2).sum(-1), axis=1)


def np_info_nce(query, keys, positive, temperature):
  logits = np_normalize(keys) @ np_normalize(query) / temperature
  return -(logits[positive] - np.log(np.sum(np.exp(logits))))


def np_structure(layer_k, ego, ids, temperature, negatives):
  if negatives == "all":
    return sum(np_info_nce(layer_k[i], ego, i, temperature) for i in ids)
  unique = list(dict.fromkeys(ids.tolist()))  # distinct ids, first-occurrence order
  return sum(np_info_nce(layer_k[u], ego[unique], p, temperature) for p, u in enumerate(unique))


def np_prototype(ego, centroids, cluster, ids, temperature):
  return sum(np_info_nce(ego[i], centroids, cluster[i], temperature) for i in ids)


def blobs(seed=0, n=150, d=6, k=5):
  rng = np.random.default_rng(seed)
  centres = rng.normal(scale=4.0, size=(k, d))
  return (centres[rng.integers(k, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


# ----------------------------------------------------------------------------- k-means


def test_kmeans_init_draws_distinct_rows():
  x = blobs()
  init = np.asarray(ncl.kmeans_init(jax.random.PRNGKey(3), jnp.asarray(x), 40))
  rows = [int(np.flatnonzero((x == c).all(axis=1))[0]) for c in init]
  assert len(set(rows)) == 40


@pytest.mark.parametrize("n_iters", [1, 4, 12])
def test_kmeans_matches_numpy_lloyd_from_the_same_init(n_iters):
  x = blobs(seed=n_iters)
  rng = jax.random.PRNGKey(n_iters)
  centroids, cluster = ncl.kmeans(rng, jnp.asarray(x), 8, n_iters)
  init = np.asarray(ncl.kmeans_init(rng, jnp.asarray(x), 8))
  want_c, want_cluster = np_lloyd(x, init, n_iters)
  np.testing.assert_array_equal(np.asarray(cluster), want_cluster)
  np.testing.assert_allclose(np.asarray(centroids), want_c, rtol=1e-5, atol=1e-5)
  assert cluster.dtype == jnp.int32


def test_empty_cluster_keeps_its_centroid():
  x = blobs(seed=7)
  init = np.concatenate([x[:4], np.full((1, x.shape[1]), 1e3, np.float32)])  # far away
  centroids, cluster = jax.jit(ncl.lloyd, static_argnums=2)(jnp.asarray(x), jnp.asarray(init), 5)
  want_c, want_cluster = np_lloyd(x, init, 5)
  np.testing.assert_array_equal(np.asarray(cluster), want_cluster)
  np.testing.assert_allclose(np.asarray(centroids), want_c, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(centroids)[4], init[4])
  assert not np.any(np.asarray(cluster) == 4)


# ----------------------------------------------------------------------------- the two terms


def test_distinct_ids_pads_to_a_static_length():
  ids = jnp.array([3, 1, 3, 0, 1, 1, 7])
  unique, real = losses.distinct_ids(ids, 100)
  assert unique.shape == (7,)
  np.testing.assert_array_equal(np.asarray(unique)[np.asarray(real)], [0, 1, 3, 7])
  assert int(real.sum()) == 4
  unique, real = losses.distinct_ids(jnp.array([2, 2, 0, 1, 2]), 3)  # min(B, n) = 3
  np.testing.assert_array_equal(np.asarray(unique), [0, 1, 2])
  assert bool(real.all())


@pytest.mark.parametrize("negatives", ["batch", "all"])
def test_structure_loss_matches_numpy(negatives):
  rng = np.random.default_rng(0)
  layer_k, ego = rng.normal(size=(2, 12, 5)).astype(np.float32)
  ids = np.array([4, 1, 4, 9, 0, 1, 11, 4])
  got = ncl.structure_loss(jnp.asarray(layer_k), jnp.asarray(ego), jnp.asarray(ids), 0.2,
                           negatives)
  want = np_structure(layer_k.astype(np.float64), ego.astype(np.float64), ids, 0.2, negatives)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_prototype_loss_matches_numpy():
  rng = np.random.default_rng(1)
  ego = rng.normal(size=(12, 5)).astype(np.float32)
  centroids = rng.normal(size=(4, 5)).astype(np.float32)
  cluster = rng.integers(4, size=12).astype(np.int32)
  ids = np.array([4, 1, 4, 9, 0, 11])
  got = ncl.prototype_loss(jnp.asarray(ego), jnp.asarray(centroids), jnp.asarray(cluster),
                           jnp.asarray(ids), 0.1)
  want = np_prototype(ego.astype(np.float64), centroids.astype(np.float64), cluster, ids, 0.1)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


class FakeStatic(NamedTuple):
  graph: dict


def np_full_loss(users, items, pairs, batch, state, cfg, proto_on):
  """NCL Eq. 12 with a dense normalized adjacency (tiny graphs only)."""
  n_users, n = len(users), len(users) + len(items)
  adj = np.zeros((n, n))
  adj[pairs[:, 0], pairs[:, 1] + n_users] = adj[pairs[:, 1] + n_users, pairs[:, 0]] = 1.0
  degree = adj.sum(1)
  inv = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1.0)), 0.0)
  norm = inv[:, None] * adj * inv[None, :]
  layers = [np.concatenate([users, items])]
  for _ in range(max(cfg.n_layers, 2 * cfg.hyper_layers)):
    layers.append(norm @ layers[-1])
  final = np.mean(layers[:cfg.n_layers + 1], axis=0)
  u, pos, neg = final[batch.users], final[n_users + batch.pos_items], final[
      n_users + batch.neg_items]
  bpr = np.mean(np.log1p(np.exp(-np.sum(u * (pos - neg), axis=1))))
  l2 = (np.sum(users[batch.users] ** 2) + np.sum(items[batch.pos_items] ** 2)
        + np.sum(items[batch.neg_items] ** 2)) / len(batch.users)
  k = layers[2 * cfg.hyper_layers]
  ssl = (np_structure(k[:n_users], users, batch.users, cfg.ssl_temp, cfg.ssl_negatives)
         + cfg.alpha * np_structure(k[n_users:], items, batch.pos_items, cfg.ssl_temp,
                                    cfg.ssl_negatives))
  proto = (np_prototype(users, state["user_centroids"], state["user_cluster"], batch.users,
                        cfg.ssl_temp)
           + np_prototype(items, state["item_centroids"], state["item_cluster"],
                          batch.pos_items, cfg.ssl_temp))
  return (bpr + cfg.reg_weight * l2 + cfg.ssl_reg * ssl
          + proto_on * cfg.proto_reg * proto), final


@pytest.mark.parametrize("negatives", ["batch", "all"])
def test_apply_matches_numpy_and_warm_up_gates_the_prototype_term(negatives):
  config = base.get_config("ncl")
  config.embedding_size = 4
  # Weights large enough that every term shows in the total.
  config.ncl.update(n_layers=1, hyper_layers=1, ssl_reg=0.3, proto_reg=0.2, alpha=0.7,
                    reg_weight=0.01, warm_up=2, ssl_negatives=negatives, ssl_temp=0.5)
  cfg = config.ncl
  rng = np.random.default_rng(2)
  n_users, n_items = 6, 5
  pairs = np.array([[u, i] for u in range(n_users) for i in range(n_items)
                    if rng.random() < 0.5 or i == u % n_items])
  users = rng.normal(size=(n_users, 4)).astype(np.float32)
  items = rng.normal(size=(n_items, 4)).astype(np.float32)
  batch = Batch(np.array([0, 3, 3, 5]), np.array([1, 4, 2, 1]), np.array([0, 0, 3, 2]))
  state = {"user_centroids": rng.normal(size=(3, 4)).astype(np.float32),
           "user_cluster": rng.integers(3, size=n_users).astype(np.int32),
           "item_centroids": rng.normal(size=(2, 4)).astype(np.float32),
           "item_cluster": rng.integers(2, size=n_items).astype(np.int32)}
  static = FakeStatic(ncl.build_graph(pairs, n_users, n_items, {}, config))
  params = {"user_embedding": jnp.asarray(users), "item_embedding": jnp.asarray(items)}
  jbatch = Batch(*(jnp.asarray(a, jnp.int32) for a in batch))
  apply = jax.jit(lambda p, m, s, b: ncl.apply(p, m, s, b, None, config))
  for epoch, proto_on in ((2, 0.0), (3, 1.0)):  # RecBole: off while epoch index < warm_up
    model_state = dict({k: jnp.asarray(v) for k, v in state.items()},
                       epoch=jnp.asarray(epoch, jnp.int32))
    reps, loss = apply(params, model_state, static, jbatch)
    want, final = np_full_loss(users.astype(np.float64), items.astype(np.float64), pairs,
                               batch, {k: v.astype(np.float64) if v.dtype == np.float32 else v
                                       for k, v in state.items()}, cfg, proto_on)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(reps.users), final[:n_users], rtol=1e-5, atol=1e-6)
  evaluated = ncl.represent(params, model_state, static, config)
  np.testing.assert_allclose(np.asarray(evaluated.items), final[n_users:], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- state and training


def ncl_tiny_config(path, alignment="none"):
  """One config for the state test and the 'none' run: the session's persistent XLA cache
  then compiles their (identical) epoch program once."""
  config = tiny_config(path, model="ncl", alignment=alignment)
  config.ncl.update(num_clusters=4, warm_up=1)  # the prototype term on from epoch 2
  return config


def test_epoch_state_is_the_e_step_of_each_epoch_and_compiles_once(tiny_mmrec):
  config = ncl_tiny_config(tiny_mmrec)
  data = train.load_data(config)
  run = train.create_train_state(config, data)
  state = run.state
  assert state.model_state["user_centroids"].shape == (4, 8)
  assert state.model_state["item_cluster"].shape == (data.n_items,)
  # The epoch carries chex.assert_max_traces(n=1): a retrace in epoch 2 or 3 would raise.
  epoch_fn = train.make_train_epoch(run.backbone, run.alignment, run.config, run.optimizer,
                                    run.info, run.layout)
  previous = None
  for epoch in (1, 2, 3):
    users = np.array(state.params["backbone"]["user_embedding"])  # before the donated call
    rng = jax.random.fold_in(run.train_rng, epoch)
    state, losses = epoch_fn(state, rng, run.static)
    assert np.all(np.isfinite(np.asarray(losses)))
    model_state = jax.tree_util.tree_map(np.asarray, state.model_state)
    assert int(model_state["epoch"]) == epoch
    # The state is k-means of the epoch-start embeddings, drawn from the hook's stream.
    hook_rng = jax.random.fold_in(rng, backbone_contract.EPOCH_HOOK_STREAM)
    init = np.asarray(ncl.kmeans_init(jax.random.split(hook_rng)[0], jnp.asarray(users), 4))
    want_c, want_cluster = np_lloyd(users, init, config.ncl.kmeans_iters)
    np.testing.assert_array_equal(model_state["user_cluster"], want_cluster)
    np.testing.assert_allclose(model_state["user_centroids"], want_c, rtol=1e-4, atol=1e-5)
    if previous is not None:
      assert not np.allclose(model_state["user_centroids"], previous["user_centroids"])
      assert not np.allclose(model_state["item_centroids"], previous["item_centroids"])
    previous = model_state


@pytest.mark.parametrize("alignment", ["none", "fettle"])
def test_tiny_end_to_end_run(tiny_mmrec, tmp_path, alignment):
  config = ncl_tiny_config(tiny_mmrec, alignment)
  if alignment == "fettle":  # 1000 clusters > 40 users / 30 items: clamped, one per node
    config.ncl.num_clusters = 1000
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["epochs"] == 4
  for record in result["history"]:
    assert np.isfinite(record["backbone_loss"]) and np.isfinite(record["alignment_loss"])
  for split in ("valid", "test"):
    for value in result[split].values():
      assert 0.0 <= value <= 1.0


def test_k_is_clamped_to_the_rows():
  config = base.get_config("ncl")
  assert ncl.n_clusters(config.ncl, 30) == 30 and ncl.n_clusters(config.ncl, 5000) == 1000


@pytest.mark.parametrize("field,value,message", [
    ("ssl_negatives", "global", "ncl.ssl_negatives"),
    ("hyper_layers", 0, "ncl.hyper_layers"),
    ("num_clusters", 0, "ncl.num_clusters"),
    ("ssl_temp", 0.0, "ncl.ssl_temp"),
])
def test_bad_config_is_one_line_error_before_data(tmp_path, field, value, message):
  config = tiny_config(str(tmp_path / "no_such_folder"), model="ncl")
  config.ncl[field] = value
  with pytest.raises(ConfigError, match=message) as error:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert "\n" not in str(error.value)
