"""SLMRec: augmentations, modality graph encoders, fusion and the SSL objectives against NumPy
references; gradients; tiny runs with alignment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from fettle_jax import sampling
from fettle_jax import train
from fettle_jax.backbones import slmrec
from fettle_jax.errors import ConfigError
from fettle_jax.types import Batch, DataInfo
from tests.conftest import assert_sane_run, tiny_config

N_USERS, N_ITEMS, SIZE = 12, 9, 4


def random_pairs(seed=0, per_user=4):
  rng = np.random.default_rng(seed)
  return np.array([(u, i) for u in range(N_USERS)
                   for i in rng.choice(N_ITEMS, per_user, replace=False)], np.int64)


def random_features(seed=1):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(N_ITEMS, 6)).astype(np.float32),
          "text": rng.normal(size=(N_ITEMS, 5)).astype(np.float32)}


def slmrec_config(**overrides):
  config = base.get_config("slmrec")
  config.embedding_size = SIZE
  config.slmrec.update(n_layers=2, **overrides)
  return config


def setup(**overrides):
  config = slmrec_config(**overrides)
  pairs, features = random_pairs(), random_features()
  static = train.StaticInputs(jnp.asarray(pairs), sampling.seen_items(pairs, N_USERS),
                              {k: jnp.asarray(v) for k, v in features.items()},
                              slmrec.build_graph(pairs, N_USERS, N_ITEMS, features, config))
  info = DataInfo(N_USERS, N_ITEMS, {k: v.shape[1] for k, v in features.items()})
  params = slmrec.init(jax.random.PRNGKey(0), info, config)
  batch = Batch(jnp.array([0, 1, 1, 4, 7]), jnp.array([2, 3, 5, 5, 8]),
                jnp.array([0, 0, 1, 8, 6]))
  return config, pairs, features, static, params, batch


# ----------------------------------------------------------------------------- NumPy references


def numpy_adjacency(pairs):
  """Dense D^-1/2 A D^-1/2 of the bipartite graph (items offset by N_USERS)."""
  n = N_USERS + N_ITEMS
  a = np.zeros((n, n))
  a[pairs[:, 0], pairs[:, 1] + N_USERS] = 1.0
  a[pairs[:, 1] + N_USERS, pairs[:, 0]] = 1.0
  inv = 1.0 / np.sqrt(np.maximum(a.sum(1), 1.0))
  return inv[:, None] * a * inv[None, :]


def numpy_branches(params, features, pairs, n_layers, items0=None):
  """Each branch propagated SEPARATELY (ID, image, text): [n, 3, L] users and items."""
  p = {k: np.asarray(v, np.float64) if not isinstance(v, dict) else v
       for k, v in params.items()}
  if items0 is None:
    items0 = [p["item_embedding"]] + [
        features[m] @ np.asarray(params["projectors"][m]["kernel"], np.float64)
        + np.asarray(params["projectors"][m]["bias"]) for m in ("image", "text")]
    items0 = np.stack(items0, axis=1)
  a = numpy_adjacency(pairs)
  users, items = [], []
  for b in range(items0.shape[1]):
    h = np.concatenate([p["user_embedding"], items0[:, b]])
    layers_ = [h]
    for _ in range(n_layers):
      layers_.append(a @ layers_[-1])
    final = np.mean(layers_, axis=0)
    users.append(final[:N_USERS])
    items.append(final[N_USERS:])
  return np.stack(users, 1), np.stack(items, 1)


def numpy_linear(layer, x):
  return x @ np.asarray(layer["kernel"], np.float64) + np.asarray(layer["bias"], np.float64)


def numpy_info_nce_sum(a, b, ids, tau):
  """sum over distinct ids i of -log softmax_j(cos(a_i, b_j) / tau) at j = i."""
  unique = np.unique(ids)
  an = a[unique] / np.linalg.norm(a[unique], axis=1, keepdims=True)
  bn = b[unique] / np.linalg.norm(b[unique], axis=1, keepdims=True)
  logits = an @ bn.T / tau
  return float(np.sum(np.log(np.exp(logits).sum(1)) - np.diag(logits)))


def numpy_weight_decay(params):
  return 0.5 * sum(float(np.sum(np.asarray(x, np.float64) ** 2))
                   for x in jax.tree_util.tree_leaves(params))


def numpy_bpr(u, pos, neg):
  margin = np.sum(u * (pos - neg), axis=1)
  return float(np.mean(np.log1p(np.exp(-margin))))


# ----------------------------------------------------------------------------- augmentations


def test_feature_dropout_rate_kept_values_and_determinism():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(400, 3, 16)), jnp.float32) + 5.0
  drop = jax.jit(lambda r: slmrec.feature_dropout(r, x, 0.3))
  a, again, other = (np.asarray(drop(jax.random.PRNGKey(s))) for s in (0, 0, 1))
  np.testing.assert_array_equal(a, again)  # deterministic per key
  assert not np.array_equal(a, other)
  dropped = a == 0.0  # x > 0 everywhere, so 0 means dropped
  assert abs(dropped.mean() - 0.3) < 0.01  # 19,200 elements: 3 sigma ~ 0.01
  np.testing.assert_allclose(a[~dropped], np.asarray(x)[~dropped] / 0.7, rtol=1e-6)
  assert slmrec.feature_dropout(jax.random.PRNGKey(0), x, 0.0) is x  # rate 0: untouched


def test_feature_masking_zeroes_whole_modality_vectors_at_the_rate():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2000, 3, 8)), jnp.float32) + 5.0
  mask = jax.jit(lambda r: slmrec.feature_masking(r, x, 0.3))
  a, again = np.asarray(mask(jax.random.PRNGKey(2))), np.asarray(mask(jax.random.PRNGKey(2)))
  np.testing.assert_array_equal(a, again)
  zero_rows = np.all(a == 0.0, axis=2)
  kept_rows = np.all(a == np.asarray(x), axis=2)  # kept vectors are unscaled
  assert np.all(zero_rows | kept_rows)  # a modality vector is masked whole or kept whole
  assert abs(zero_rows.mean() - 0.3) < 0.015  # 6,000 vectors: 3 sigma ~ 0.018
  # FD+FM: dropout first (scaled elements), then whole vectors masked.
  both = np.asarray(jax.jit(lambda r: slmrec.augment(r, x, "FD+FM", 0.3))(jax.random.PRNGKey(3)))
  scaled = np.isclose(both, np.asarray(x) / 0.7, rtol=1e-6)
  assert np.all(scaled | (both == 0.0))
  assert abs(np.all(both == 0.0, axis=2).mean() - 0.3) < 0.02  # + 0.3^8 of FD's whole drops


# ----------------------------------------------------------------------------- encoder and losses


def test_encoder_branches_fusion_and_modality_items_match_dense_numpy():
  config, pairs, features, static, params, _ = setup()
  reps = jax.jit(lambda p: slmrec.represent(p, {}, static, config))(params)
  users, items = numpy_branches(params, features, pairs, 2)
  np.testing.assert_allclose(reps.users, numpy_linear(params["user_fusion"],
                                                      users.reshape(N_USERS, -1)), atol=1e-5)
  np.testing.assert_allclose(reps.items, numpy_linear(params["item_fusion"],
                                                      items.reshape(N_ITEMS, -1)), atol=1e-5)
  assert sorted(reps.modality_items) == ["image", "text"]
  np.testing.assert_allclose(reps.modality_items["image"], items[:, 1], atol=1e-5)
  np.testing.assert_allclose(reps.modality_items["text"], items[:, 2], atol=1e-5)
  mean_config = slmrec_config(fusion="mean")
  mean_params = slmrec.init(jax.random.PRNGKey(0), DataInfo(N_USERS, N_ITEMS, {"image": 6,
                                                                               "text": 5}),
                            mean_config)
  assert "user_fusion" not in mean_params
  mean_reps = jax.jit(lambda p: slmrec.represent(p, {}, static, mean_config))(mean_params)
  users, items = numpy_branches(mean_params, features, pairs, 2)
  np.testing.assert_allclose(mean_reps.users, users.mean(1), atol=1e-5)
  np.testing.assert_allclose(mean_reps.items, items.mean(1), atol=1e-5)


@pytest.mark.parametrize("main", ["bpr", "softmax"])
def test_fac_apply_equals_numpy_main_plus_fine_and_coarse_infonce_plus_decay(main):
  config, pairs, features, static, params, batch = setup(main_loss=main, ssl_alpha=0.5)
  _, got = jax.jit(lambda p: slmrec.apply(p, {}, static, batch, None, config))(params)
  users, items = numpy_branches(params, features, pairs, 2)
  u = numpy_linear(params["user_fusion"], users.reshape(N_USERS, -1))
  i = numpy_linear(params["item_fusion"], items.reshape(N_ITEMS, -1))
  b_u, b_pos, b_neg = (np.asarray(x) for x in batch)
  if main == "bpr":
    main_value = numpy_bpr(u[b_u], i[b_pos], i[b_neg])
  else:  # in-batch softmax over the batch rows' positives, cosine / 0.2
    un = u[b_u] / np.linalg.norm(u[b_u], axis=1, keepdims=True)
    pn = i[b_pos] / np.linalg.norm(i[b_pos], axis=1, keepdims=True)
    logits = un @ pn.T / 0.2
    main_value = float(np.mean(np.log(np.exp(logits).sum(1)) - np.diag(logits)))
  # FAC: image (fine, L dims) then text (coarsest, L / 2 dims); ID chained through both.
  heads = params["fac"]
  assert np.shape(heads["text"]["content"]["kernel"]) == (SIZE, SIZE // 2)
  z_image = numpy_linear(heads["image"]["chain"], items[:, 0])
  z_text = numpy_linear(heads["text"]["chain"], z_image)
  fac = (numpy_info_nce_sum(z_image, numpy_linear(heads["image"]["content"], items[:, 1]),
                            b_pos, 0.1)
         + numpy_info_nce_sum(z_text, numpy_linear(heads["text"]["content"], items[:, 2]),
                              b_pos, 0.1))
  expected = main_value + 0.5 * fac / 5 + 1e-4 * numpy_weight_decay(params)
  assert float(got) == pytest.approx(expected, rel=1e-5)
  assert 0.5 * fac / 5 > 0.1 * main_value  # the SSL term matters in this check


def test_fac_order_follows_config_then_unlisted_sorted():
  assert slmrec.fac_order(["text", "image"], ("image", "audio", "text")) == ["image", "text"]
  assert slmrec.fac_order(["kg", "text"], ("image", "audio", "text")) == ["text", "kg"]
  assert slmrec.fac_dims(1, 64) == [64] and slmrec.fac_dims(3, 64) == [64, 64, 32]


@pytest.mark.parametrize("task", ["FD", "FM"])
def test_view_task_equals_numpy_infonce_of_two_augmented_views(task):
  config, pairs, features, static, params, batch = setup(ssl_task=task, ssl_alpha=0.5)
  apply = jax.jit(lambda p, r: slmrec.apply(p, {}, static, batch, r, config)[1])
  rng = jax.random.PRNGKey(7)
  got = float(apply(params, rng))
  assert got == float(apply(params, rng))  # deterministic per key
  assert got != float(apply(params, jax.random.PRNGKey(8)))  # views differ with the key
  # Reference: the views' inputs from the (separately tested) augmentation, encoded per
  # branch and fused in NumPy.
  items0 = np.asarray(slmrec.item_inputs(params, static.features), np.float64)
  users, items = numpy_branches(params, features, pairs, 2)
  u = numpy_linear(params["user_fusion"], users.reshape(N_USERS, -1))
  i = numpy_linear(params["item_fusion"], items.reshape(N_ITEMS, -1))
  views = []
  for view_rng in jax.random.split(rng):
    augmented = np.asarray(slmrec.augment(view_rng, jnp.asarray(items0, jnp.float32), task,
                                          0.3), np.float64)
    assert not np.allclose(augmented, items0)
    _, view_items = numpy_branches(params, features, pairs, 2, items0=augmented)
    views.append(numpy_linear(params["item_fusion"], view_items.reshape(N_ITEMS, -1)))
  b_u, b_pos, b_neg = (np.asarray(x) for x in batch)
  ssl = numpy_info_nce_sum(views[0], views[1], b_pos, 0.1)
  expected = (numpy_bpr(u[b_u], i[b_pos], i[b_neg]) + 0.5 * ssl / 5
              + 1e-4 * numpy_weight_decay(params))
  assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("task", ["FAC", "FD+FM"])
def test_every_parameter_gets_a_gradient_and_losses_are_finite(task):
  config, _, _, static, params, batch = setup(ssl_task=task)
  loss, grads = jax.jit(jax.value_and_grad(
      lambda p: slmrec.apply(p, {}, static, batch, jax.random.PRNGKey(1), config)[1]))(params)
  assert np.isfinite(float(loss))
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  for path, grad in flat:
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(grad)), name
    if task == "FAC" and name == "['item_fusion']['bias']":
      # Cancels in BPR (u . (i_pos - i_neg)) and FAC reads the branches: no gradient from
      # the loss but rounding, and weight decay of a zero-initialized bias is zero too.
      kernel = np.abs(np.asarray(grads["item_fusion"]["kernel"])).max()
      assert np.abs(np.asarray(grad)).max() < 1e-5 * kernel, name
    else:
      assert np.any(np.asarray(grad) != 0.0), name


def test_bad_settings_are_config_errors():
  for field, value in (("ssl_task", "XX"), ("fusion", "sum"), ("main_loss", "ce"),
                       ("dropout_rate", 1.0), ("ssl_temp", 0.0), ("temperature", -1.0),
                       ("ssl_alpha", -0.1), ("weight_decay", -1.0), ("n_layers", -1),
                       ("fac_order", ("image", 3))):
    cfg = slmrec.default_config()
    cfg[field] = value
    with pytest.raises(ConfigError, match=f"slmrec.{field}"):
      slmrec.check_config(cfg)
  with pytest.raises(ConfigError, match="content modality"):
    slmrec.build_graph(random_pairs(), N_USERS, N_ITEMS, {}, slmrec_config())


@pytest.mark.parametrize("alignment", ["fettle", "bm3"])
def test_tiny_end_to_end_run(tiny_mmrec, tmp_path, alignment):
  config = tiny_config(tiny_mmrec, model="slmrec", alignment=alignment)
  config.max_epochs, config.slmrec.n_layers = 2, 1  # small program: the tests stay fast
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert_sane_run(result, n_epochs=2, aligned=True)
