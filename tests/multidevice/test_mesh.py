"""Sharded training and evaluation on 8 CPU devices equal the one-device run, and the
sharding is real (shards hold their fraction, gradients are all-reduced, one compile)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fettle_jax import evaluation
from fettle_jax import sampling
from fettle_jax import sharding
from fettle_jax import train
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices")


def train_epochs(config, n_epochs):
  """(logical params, per-epoch losses, test+valid metrics) after n_epochs."""
  chex.clear_trace_counter()  # a new epoch function per call: each may trace once
  data = train.load_data(config)
  run = train.create_train_state(config, data)
  epoch_fn = train.make_train_epoch(run.backbone, run.alignment, run.config, run.optimizer,
                                    run.info, run.layout)
  evaluate = train.make_evaluate(run.backbone, run.config, run.layout)
  eval_data = train.build_eval_data(data, run.config, run.layout)
  state, losses = run.state, []
  for epoch in range(1, n_epochs + 1):
    state, loss = epoch_fn(state, jax.random.fold_in(run.train_rng, epoch), run.static)
    losses.append(np.asarray(loss))
  metrics = jax.device_get(evaluate(state.params, state.model_state, run.static, eval_data))
  shapes = run.layout.state.shapes.params
  params = jax.device_get(jax.jit(lambda p: sharding.slice_to_shapes(p, shapes))(state.params))
  return params, np.stack(losses), metrics, epoch_fn


def mesh_config(path, model, alignment, mesh):
  config = tiny_config(path, model=model, alignment=alignment)
  config.mesh.data, config.mesh.model = mesh
  return config


@pytest.mark.parametrize("model,meshes", [("lightgcn", [(8, 1), (1, 8)]),
                                          ("freedom", [(2, 4), (4, 2)])])
def test_meshes_match_one_device(tiny_mmrec, model, meshes):
  """Losses, metrics (1e-4) and parameters (1e-4 relative, 1e-5 absolute) after 3 epochs."""
  base = train_epochs(mesh_config(tiny_mmrec, model, "fettle", (1, 1)), 3)
  for mesh in meshes:
    params, losses, metrics, _ = train_epochs(mesh_config(tiny_mmrec, model, "fettle", mesh), 3)
    np.testing.assert_allclose(losses, base[1], rtol=1e-5, atol=1e-6, err_msg=str(mesh))
    for name, value in metrics.items():
      np.testing.assert_allclose(value, base[2][name], atol=1e-4, err_msg=f"{mesh} {name}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5,
                                                         err_msg=str(mesh)), params, base[0])


@pytest.mark.parametrize("model,alignment", [
    ("sgl", "none"), ("directau", "none"), ("ncl", "none"), ("grcn", "none"),
    ("dualgnn", "none"), ("slmrec", "none"), ("lattice", "none")])
def test_later_backbones_on_2x4_match_one_device(tiny_mmrec, model, alignment):
  """The backbones added after the mesh (CF contrastive and multi-modal): 2 epochs (the
  second runs every epoch hook on state the first produced)."""
  base = train_epochs(mesh_config(tiny_mmrec, model, alignment, (1, 1)), 2)
  _, losses, metrics, _ = train_epochs(mesh_config(tiny_mmrec, model, alignment, (2, 4)), 2)
  np.testing.assert_allclose(losses, base[1], rtol=1e-5, atol=1e-6)
  for name, value in metrics.items():
    np.testing.assert_allclose(value, base[2][name], atol=1e-4, err_msg=name)


def test_shards_hold_their_fraction_and_the_epoch_all_reduces_once_compiled(tiny_mmrec):
  chex.clear_trace_counter()
  config = mesh_config(tiny_mmrec, "freedom", "fettle", (2, 4))
  data = train.load_data(config)  # 40 users, 30 items: items do not divide by 4 (padded)
  run = train.create_train_state(config, data)
  params = run.state.params
  adam = run.state.opt_state[0]
  for table, n in (("user_embedding", 40), ("item_embedding", 30)):
    for tree in (params, adam.mu, adam.nu):
      x = tree["backbone"][table]
      assert {s.data.shape[0] for s in x.addressable_shards} == {-(-n // 4)}, table
      assert x.shape[0] == 4 * -(-n // 4)
  for codebook in ("codebook_item", "codebook_user"):
    x = params["alignment"][codebook]
    assert {s.data.shape[1] for s in x.addressable_shards} == {x.shape[1] // 4}
  for name, x in run.static.features.items():
    assert {s.data.shape[0] for s in x.addressable_shards} == {8}, name  # ceil(30 / 4)

  batches = jax.jit(lambda static: run.layout.constrain_batches(sampling.epoch_batches(
      jax.random.PRNGKey(0), static.train_pairs, static.seen, 30, config.batch_size)))(
          run.layout.static.logical(run.static))
  assert {s.data.shape for s in batches.users.addressable_shards} == {
      (batches.users.shape[0], config.batch_size // 2)}

  epoch_fn = train.make_train_epoch(run.backbone, run.alignment, run.config, run.optimizer,
                                    run.info, run.layout)
  rng = jax.random.PRNGKey(1)
  hlo = epoch_fn.lower(run.state, rng, run.static).compile().as_text()
  assert "all-reduce" in hlo
  state = run.state
  for epoch in range(3):  # chex.assert_max_traces(n=1) inside would raise on a retrace
    state, _ = epoch_fn(state, jax.random.fold_in(rng, epoch), run.static)
  assert epoch_fn.jitted._cache_size() == 1  # pylint: disable=protected-access
  assert state.params["backbone"]["item_embedding"].sharding == (
      run.state.params["backbone"]["item_embedding"].sharding)


@pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8), (4, 2)])
def test_sharded_top_k_equals_one_device_top_k(mesh_shape):
  mesh = jax.make_mesh(mesh_shape, ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rng = np.random.default_rng(0)
  n_users, n_items, k = 16, 30, 12  # 30 items over 4 or 8 shards: padded last block
  # Small integer embeddings: many exactly tied scores.
  user_emb = jnp.asarray(rng.integers(-1, 2, (n_users, 3)), jnp.float32)
  item_emb = jnp.asarray(rng.integers(-1, 2, (n_items, 3)), jnp.float32)
  seen = rng.random((n_users, n_items)) < 0.3
  seen[0, :25] = True  # fewer unseen items than k: -inf scores in the top-k
  seen[1, :] = True    # nothing unseen: all -inf
  pairs = np.argwhere(seen)
  pairs = np.concatenate([pairs, [[n_users, 0]] * 3])  # padding pairs: row len(users), dropped
  rows, items = jnp.asarray(pairs[:, 0], jnp.int32), jnp.asarray(pairs[:, 1], jnp.int32)
  users = jnp.arange(n_users)
  expected = evaluation.top_items(user_emb, item_emb, users, rows, items, k)
  masked = np.where(seen, -np.inf, np.asarray(user_emb @ item_emb.T))
  np.testing.assert_array_equal(np.asarray(expected),
                                np.argsort(-masked, axis=1, kind="stable")[:, :k])
  with jax.set_mesh(mesh):
    got = jax.jit(lambda u, i, us, r, c: evaluation.top_items_sharded(mesh, u, i, us, r, c, k))(
        user_emb, item_emb, users, rows, items)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("mesh_shape,chunk", [((2, 4), 7), ((1, 8), 1 << 16), ((1, 8), 1)])
def test_row_block_propagation_equals_one_device(mesh_shape, chunk):
  """A x and its gradient with rows over 'model', each device walking its own edges in
  chunks (several chunks, one, and one edge at a time), equal the one-device product."""
  from fettle_jax import graphs  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  n_users, n_items = 13, 18  # 31 nodes over 4 or 8 row blocks: padded
  pairs = np.unique(np.stack([rng.integers(0, n_users, 60), rng.integers(0, n_items, 60)], 1),
                    axis=0)
  graph = graphs.user_item_graph(pairs[:, 0], pairs[:, 1], n_users, n_items)
  x = jnp.asarray(rng.normal(size=(n_users + n_items, 5)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  def loss(x):
    return jnp.sum(graphs.propagate_symmetric(graph, graphs.propagate_symmetric(graph, x))
                   * cotangent)

  expected_value, expected_grad = jax.value_and_grad(loss)(x)
  mesh = jax.make_mesh(mesh_shape, ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  original = graphs.ROW_BLOCK_CHUNK
  graphs.ROW_BLOCK_CHUNK = chunk
  try:
    with jax.set_mesh(mesh):
      value, grad = jax.jit(jax.value_and_grad(loss))(x)
  finally:
    graphs.ROW_BLOCK_CHUNK = original
  np.testing.assert_allclose(value, expected_value, rtol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_grid_on_a_2x4_mesh_matches_one_device(tiny_mmrec, tmp_path):
  """A grid trains on the run's mesh: each setting's slice of the stacked state is split as
  a single run's (tables over 'model', batches over 'data'; LightGCN's row-block
  propagation and the sharded ranking under the settings' vmap)."""
  from fettle_jax import grid  # pylint: disable=g-import-not-at-top
  settings = grid.grid_settings({"learning_rate": (1e-2, 3e-2)}, seeds=(0,))
  results = {}
  for mesh in [(1, 1), (2, 4)]:
    config = mesh_config(tiny_mmrec, "lightgcn", "none", mesh)
    config.max_epochs = 3
    results[mesh] = grid.train_grid(config, settings, str(tmp_path / f"{mesh[0]}x{mesh[1]}"))
  for got, want in zip(results[(2, 4)], results[(1, 1)]):
    assert got["mesh"]["model"] == 4 and got["best_epoch"] == want["best_epoch"]
    np.testing.assert_allclose([h["loss"] for h in got["history"]],
                               [h["loss"] for h in want["history"]], rtol=1e-5)
    for split in ("valid", "test"):
      for name, value in want[split].items():
        np.testing.assert_allclose(got[split][name], value, atol=1e-4, err_msg=name)
