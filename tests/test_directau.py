"""DirectAU: its loss and encoders against independent NumPy references, finite gradients,
config errors, and tiny end-to-end runs."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import directau_baby
from fettle_jax import losses, sampling, train
from fettle_jax.backbones import directau
from fettle_jax.errors import ConfigError
from fettle_jax.types import Batch, DataInfo
from tests.conftest import tiny_config

N_USERS, N_ITEMS, SIZE = 12, 15, 6


# ----------------------------------------------------------------------------- NumPy reference


def ref_normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def ref_alignment(users, items):
  """Paper Eq. 5 (alpha = 2): mean over the positive pairs of ||u~ - i~||^2."""
  diff = ref_normalize(users) - ref_normalize(items)
  return float(np.mean(np.sum(diff ** 2, axis=1)))


def ref_uniformity(x):
  """Paper Eq. 6 (t = 2), as the authors' torch.pdist: every pair of batch rows a < b,
  duplicated rows included (they add e^0)."""
  unit = ref_normalize(x)
  potentials = [np.exp(-2.0 * np.sum((unit[a] - unit[b]) ** 2))
                for a, b in itertools.combinations(range(len(unit)), 2)]
  return float(np.log(np.mean(potentials)))


def ref_lightgcn(pairs, users, items, n_layers):
  """Dense D^-1/2 A D^-1/2 and the mean of layers 0..K."""
  n_users, n_items = len(users), len(items)
  adjacency = np.zeros((n_users + n_items,) * 2)
  adjacency[pairs[:, 0], pairs[:, 1] + n_users] = 1.0
  adjacency[pairs[:, 1] + n_users, pairs[:, 0]] = 1.0
  degree = adjacency.sum(1)
  inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1.0)), 0.0)
  norm = inv_sqrt[:, None] * adjacency * inv_sqrt[None, :]
  h = np.concatenate([users, items]).astype(np.float64)
  layers = [h]
  for _ in range(n_layers):
    layers.append(norm @ layers[-1])
  final = np.mean(layers, axis=0)
  return final[:n_users], final[n_users:]


def ref_loss(users, items, batch, gamma, weight_decay, tables):
  u, i = users[np.asarray(batch.users)], items[np.asarray(batch.pos_items)]
  uniform = (ref_uniformity(u) + ref_uniformity(i)) / 2
  decay = 0.5 * weight_decay * sum(np.sum(np.asarray(t, np.float64) ** 2) for t in tables)
  return ref_alignment(u, i) + gamma * uniform + decay


# ----------------------------------------------------------------------------- setup


def random_pairs(seed=0):
  rng = np.random.default_rng(seed)
  pairs = {(u, u % N_ITEMS) for u in range(N_USERS)} | {(i % N_USERS, i) for i in range(N_ITEMS)}
  pairs |= {(int(u), int(i)) for u, i in zip(rng.integers(0, N_USERS, 40),
                                             rng.integers(0, N_ITEMS, 40))}
  return np.array(sorted(pairs), np.int32)


def setup(encoder, batch_size=10, **overrides):
  config = directau_baby.get_config()
  config.embedding_size = SIZE
  config.directau.encoder = encoder
  config.directau.update(overrides)
  pairs = random_pairs()
  static = train.StaticInputs(jnp.asarray(pairs), sampling.seen_items(pairs, N_USERS), {},
                              directau.build_graph(pairs, N_USERS, N_ITEMS, {}, config))
  params = directau.init(jax.random.PRNGKey(0), DataInfo(N_USERS, N_ITEMS, {}), config)
  rng = np.random.default_rng(1)
  rows = rng.integers(0, len(pairs), batch_size)
  rows[1] = rows[0]  # a duplicated interaction: same user and item twice in the batch
  batch = Batch(jnp.asarray(pairs[rows, 0]), jnp.asarray(pairs[rows, 1]),
                jnp.asarray(rng.integers(0, N_ITEMS, batch_size), jnp.int32))
  return config, pairs, static, params, batch


def reference_encoder(encoder, pairs, params, n_layers):
  users = np.asarray(params["user_embedding"], np.float64)
  items = np.asarray(params["item_embedding"], np.float64)
  if encoder == "mf":
    return users, items
  return ref_lightgcn(pairs, users, items, n_layers)


# ----------------------------------------------------------------------------- tests


def test_alignment_and_uniformity_match_reference_with_duplicate_rows():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(9, 5)).astype(np.float32)
  y = rng.normal(size=(9, 5)).astype(np.float32)
  x[4], y[4] = x[2], y[2]  # duplicates count as rows: a zero-distance pair in uniformity
  loss = directau.directau_loss(jnp.asarray(x), jnp.asarray(y), gamma=0.7)
  expected = ref_alignment(x, y) + 0.7 * (ref_uniformity(x) + ref_uniformity(y)) / 2
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
  # Scale-free: each row is normalized first.
  scaled = directau.directau_loss(jnp.asarray(3 * x), jnp.asarray(0.1 * y), gamma=0.7)
  np.testing.assert_allclose(float(scaled), float(loss), rtol=1e-5)


@pytest.mark.parametrize("encoder", ["mf", "lightgcn"])
def test_apply_and_represent_match_reference(encoder):
  config, pairs, static, params, batch = setup(encoder, gamma=0.5, weight_decay=1e-2,
                                               n_layers=3)
  users, items = reference_encoder(encoder, pairs, params, 3)
  reps = directau.represent(params, {}, static, config)
  np.testing.assert_allclose(np.asarray(reps.users), users, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(reps.items), items, rtol=1e-5, atol=1e-6)
  step_loss = jax.jit(lambda b: directau.apply(params, {}, static, b, None, config)[1])
  tables = (params["user_embedding"], params["item_embedding"])
  expected = ref_loss(users, items, batch, 0.5, 1e-2, tables)
  np.testing.assert_allclose(float(step_loss(batch)), expected, rtol=1e-5)
  # No negatives: other negative items leave the loss unchanged.
  other = batch._replace(neg_items=(batch.neg_items + 1) % N_ITEMS)
  assert float(step_loss(other)) == float(step_loss(batch))


@pytest.mark.parametrize("encoder", ["mf", "lightgcn"])
def test_gradients_finite_and_weight_decay_gradient_is_theta(encoder):
  config, _, static, params, batch = setup(encoder)
  params["user_embedding"] = params["user_embedding"].at[batch.users[3]].set(0.0)  # norm 0

  grads = jax.jit(jax.grad(lambda p: directau.apply(p, {}, static, batch, None, config)[1]))(
      params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
  assert float(jnp.abs(grads["item_embedding"][batch.pos_items]).sum()) > 0
  # weight_decay * penalty adds wd * theta to every row's gradient (torch Adam's decay).
  penalty_grads = jax.grad(losses.weight_decay_penalty)(params)
  for name in ("user_embedding", "item_embedding"):
    np.testing.assert_allclose(np.asarray(penalty_grads[name]), np.asarray(params[name]))


def test_mf_needs_no_graph_and_config_errors():
  config, _, static, _, _ = setup("mf")
  assert static.graph == {}
  directau.check_config(config.directau)
  for field, value in (("encoder", "ngcf"), ("gamma", -1.0), ("n_layers", -1)):
    bad = directau_baby.get_config().directau
    bad[field] = value
    with pytest.raises(ConfigError, match=f"directau.{field}"):
      directau.check_config(bad)


@pytest.mark.parametrize("encoder,alignment", [("mf", "fettle"), ("lightgcn", "none")])
def test_tiny_end_to_end(tiny_mmrec, tmp_path, encoder, alignment):
  config = tiny_config(tiny_mmrec, model="directau", alignment=alignment)
  config.directau.encoder = encoder
  result = train.train_and_evaluate(config, str(tmp_path / "run"))  # asserts one compile
  losses = np.asarray([record["loss"] for record in result["history"]], np.float64)
  assert np.all(np.isfinite(losses))
  for split in ("valid", "test"):
    for name, value in result[split].items():
      assert 0.0 <= value <= 1.0, (split, name, value)
