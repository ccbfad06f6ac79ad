"""Multi-modal backbones (VBPR, FREEDOM) and their graph blocks, against dense NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import freedom_baby, vbpr_baby
from fettle_jax import graphs, sampling, train
from fettle_jax.backbones import freedom, vbpr
from fettle_jax.types import Batch, DataInfo, ProjectedRows
from tests.conftest import tiny_config

N_USERS, N_ITEMS = 30, 40


def random_pairs(n_users=N_USERS, n_items=N_ITEMS, seed=0):
  """Unique (user, item) train pairs with skewed degrees; every user and item appears."""
  rng = np.random.default_rng(seed)
  popularity = rng.pareto(1.5, n_items) + 0.1
  pairs = {(u, i) for u, i in zip(rng.permutation(n_users).tolist() + list(range(n_users)),
                                  list(range(n_items)))}
  for u in range(n_users):
    size = int(rng.integers(2, 9))
    pairs |= {(u, int(i)) for i in rng.choice(n_items, size, replace=False,
                                              p=popularity / popularity.sum())}
  return np.array(sorted(pairs), np.int32)


def random_features(n_items=N_ITEMS, seed=1):
  rng = np.random.default_rng(seed)
  return {"image": rng.normal(size=(n_items, 16)).astype(np.float32),
          "text": rng.normal(size=(n_items, 8)).astype(np.float32)}


def dense(graph, n):
  out = np.zeros((n, n))
  np.add.at(out, (np.asarray(graph.receivers), np.asarray(graph.senders)),
            np.asarray(graph.weights, np.float64))
  return out


def reference_knn(x, k):
  """Top-k by brute-force float64 cosine similarity; ties to the lower index (stable sort)."""
  x = np.asarray(x, np.float64)
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  return np.argsort(-(unit @ unit.T), axis=1, kind="stable")[:, :k]


def reference_item_graph(features, k, weights):
  """sum_m w_m D^-1/2 S_m D^-1/2, S_m the 0/1 top-k matrix, D its row sums (dense)."""
  n = next(iter(features.values())).shape[0]
  total = np.zeros((n, n))
  for name, x in features.items():
    adjacency = np.zeros((n, n))
    np.put_along_axis(adjacency, reference_knn(x, k), 1.0, axis=1)
    inv_sqrt = 1.0 / np.sqrt(adjacency.sum(1))
    total += weights[name] * inv_sqrt[:, None] * adjacency * inv_sqrt[None, :]
  return total


def reference_user_item(pairs, n_users, n_items):
  adjacency = np.zeros((n_users + n_items,) * 2)
  adjacency[pairs[:, 0], pairs[:, 1] + n_users] = 1.0
  adjacency[pairs[:, 1] + n_users, pairs[:, 0]] = 1.0
  degree = adjacency.sum(1)
  inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1)), 0.0)
  return inv_sqrt[:, None] * adjacency * inv_sqrt[None, :]


def small_config(module):
  config = module.get_config()
  config.embedding_size = 8
  return config


# ----------------------------------------------------------------------------- kNN item graph


def test_knn_neighbours_exact_and_blockwise_equals_unblocked():
  features = random_features()
  for x in features.values():
    expected = reference_knn(x, 10)
    for block_size in (1, 7, 16, 40, 4096):  # 7: a padded last block; 4096 > n: one block
      np.testing.assert_array_equal(graphs.knn_neighbours(x, 10, block_size), expected)
    assert np.all(expected[:, 0] == np.arange(N_ITEMS))  # the item itself ranks first
  # k > n is clipped; zero feature rows give no NaN and a deterministic order.
  x = np.vstack([features["text"][:5], np.zeros((2, 8), np.float32)])
  np.testing.assert_array_equal(graphs.knn_neighbours(x, 100, 3).shape, (7, 7))


def test_knn_item_graph_matches_dense_reference():
  features = random_features()
  weights = freedom.modality_weights(features, {"image": 0.1, "text": 0.9})
  assert weights == pytest.approx({"image": 0.1, "text": 0.9})
  graph = graphs.knn_item_graph(features, 4, weights, block_size=7)
  np.testing.assert_allclose(dense(graph, N_ITEMS), reference_item_graph(features, 4, weights),
                             rtol=1e-6, atol=1e-7)
  assert np.all(np.diff(np.asarray(graph.receivers)) >= 0)
  # Each modality's rows sum to 1 (D^-1/2 S D^-1/2 with constant degree k), so does the mix.
  np.testing.assert_allclose(dense(graph, N_ITEMS).sum(1), 1.0, rtol=1e-5)


def test_modality_weights_rules():
  assert freedom.modality_weights(["image"], {"image": 0.1, "text": 0.9}) == {"image": 1.0}
  assert freedom.modality_weights(["audio", "image"], {"image": 0.1}) == {"audio": 0.5,
                                                                          "image": 0.5}
  assert freedom.modality_weights(["a", "b", "c"], None) == pytest.approx(
      {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})


# ----------------------------------------------------------------------------- edge pruning


def test_pruned_graph_static_size_unique_and_renormalized():
  pairs = random_pairs()
  edges = graphs.bipartite_edges(pairs[:, 0], pairs[:, 1], N_USERS, N_ITEMS)
  n_keep = graphs.n_kept_edges(len(pairs), 0.8)
  assert n_keep == round(0.2 * len(pairs))
  prune = jax.jit(lambda r: graphs.pruned_user_item_graph(r, edges, N_USERS, N_ITEMS, 0.8))
  train_set = set(map(tuple, pairs.tolist()))
  for seed in range(3):
    graph = prune(jax.random.PRNGKey(seed))
    senders, receivers = np.asarray(graph.senders), np.asarray(graph.receivers)
    assert senders.shape == (2 * n_keep,)
    assert np.all(np.diff(receivers) >= 0)  # propagate's indices_are_sorted contract
    to_users = {(r, s - N_USERS) for s, r in zip(senders[:n_keep], receivers[:n_keep])}
    to_items = {(s, r - N_USERS) for s, r in zip(senders[n_keep:], receivers[n_keep:])}
    assert len(to_users) == n_keep and to_users == to_items and to_users <= train_set
    kept = np.array(sorted(to_users))
    np.testing.assert_allclose(dense(graph, N_USERS + N_ITEMS),
                               reference_user_item(kept, N_USERS, N_ITEMS), rtol=1e-6)


def test_sampling_without_replacement_follows_successive_draw_law():
  weights = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
  keys = jax.random.split(jax.random.PRNGKey(0), 20000)
  draw = jax.vmap(lambda r: graphs.sample_without_replacement(r, jnp.log(weights), 2))
  samples = np.asarray(draw(keys))
  assert np.all(samples[:, 0] < samples[:, 1])  # distinct and sorted
  p = weights / weights.sum()
  # P(e kept) for 2 successive draws without replacement (torch.multinomial's law).
  exact = [p[e] + sum(p[f] * p[e] / (1 - p[f]) for f in range(5) if f != e) for e in range(5)]
  frequency = np.bincount(samples.reshape(-1), minlength=5) / len(samples)
  np.testing.assert_allclose(frequency, exact, atol=0.015)


def test_top_k_index_set_equals_sorted_lax_top_k_with_ties_and_extremes():
  """The pruning's top-k replacement returns exactly jnp.sort(lax.top_k(v, k)[1])."""
  rng = np.random.default_rng(0)
  select = jax.jit(graphs.top_k_index_set, static_argnums=1)
  # A few static shapes (each compiles once), every value family and several draws on each:
  # k = 1, k = n, n = 1, odd and power-of-two sizes.
  for n, k in [(1, 1), (2, 1), (7, 7), (50, 1), (50, 17), (128, 64), (199, 100), (199, 199)]:
    for trial in range(10):
      values = [rng.normal(size=n),                                   # distinct
                rng.integers(-3, 3, size=n).astype(float),            # many ties
                np.full(n, 2.5),                                      # all tied
                np.where(rng.random(n) < 0.5, -1e30, 1e-30) * rng.random(n),
                np.where(rng.random(n) < 0.2, -np.inf, rng.normal(size=n))][trial % 5]
      values = jnp.asarray(values, jnp.float32)
      want = np.sort(np.asarray(jax.lax.top_k(values, k)[1]))
      np.testing.assert_array_equal(np.asarray(select(values, k)), want, err_msg=f"n={n} k={k}")


def test_pruning_drops_low_weight_edges_more_often():
  pairs = random_pairs()
  edges = graphs.bipartite_edges(pairs[:, 0], pairs[:, 1], N_USERS, N_ITEMS)
  n_keep = graphs.n_kept_edges(len(pairs), 0.5)
  keys = jax.random.split(jax.random.PRNGKey(1), 2000)
  kept = np.asarray(jax.vmap(
      lambda r: graphs.sample_without_replacement(r, edges.log_weights, n_keep))(keys))
  frequency = np.bincount(kept.reshape(-1), minlength=len(pairs)) / len(keys)
  weight = np.exp(np.asarray(edges.log_weights))
  low, high = weight <= np.quantile(weight, 0.25), weight >= np.quantile(weight, 0.75)
  assert frequency[low].mean() + 0.1 < frequency[high].mean()
  assert np.corrcoef(weight, frequency)[0, 1] > 0.7
  # log_weights are -1/2 log(d_u d_i) with full-graph degrees.
  d_u = np.bincount(pairs[:, 0], minlength=N_USERS)
  d_i = np.bincount(pairs[:, 1], minlength=N_ITEMS)
  np.testing.assert_allclose(
      weight, 1 / np.sqrt(d_u[np.asarray(edges.users)] * d_i[np.asarray(edges.items)]), rtol=1e-6)


# ----------------------------------------------------------------------------- backbones


def setup_backbone(module, config_module, batch_size=16, **overrides):
  config = small_config(config_module)
  for key, value in overrides.items():
    setattr(getattr(config, module.__name__.split(".")[-1]), key, value)
  pairs, features = random_pairs(), random_features()
  # `graph` below is the whole StaticInputs pytree the backbone contract passes around.
  graph = train.StaticInputs(
      jnp.asarray(pairs), sampling.seen_items(pairs, N_USERS),
      {k: jnp.asarray(v) for k, v in features.items()},
      module.build_graph(pairs, N_USERS, N_ITEMS, features, config))
  info = DataInfo(N_USERS, N_ITEMS, {k: v.shape[1] for k, v in features.items()})
  params = module.init(jax.random.PRNGKey(0), info, config)
  rng = np.random.default_rng(3)
  batch = Batch(*(jnp.asarray(rng.integers(0, n, batch_size), jnp.int32)
                  for n in (N_USERS, N_ITEMS, N_ITEMS)))
  return config, pairs, features, graph, params, batch


@pytest.mark.parametrize("module,config_module", [(vbpr, vbpr_baby), (freedom, freedom_baby)])
def test_backbone_jit_loss_gradients_and_shapes(module, config_module):
  config, _, features, graph, params, batch = setup_backbone(module, config_module)
  size = config.embedding_size

  @jax.jit
  def loss_and_grads(params, graph, rng):
    def loss_fn(p):
      reps, loss = module.apply(p, {}, graph, batch, rng, config)
      return loss, reps
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (loss, reps), grads = loss_and_grads(params, graph, jax.random.PRNGKey(1))
  assert np.isfinite(float(loss))
  assert reps.users.shape == (N_USERS, size) and reps.items.shape == (N_ITEMS, size)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), name
    if module is freedom and "projectors" in name and "bias" in name:
      # u.(W x_pos + b) - u.(W x_neg + b): the bias cancels in FREEDOM's modality BPR.
      np.testing.assert_allclose(g, 0.0, atol=1e-9)
    else:
      assert np.any(g != 0), name

  evaluated = jax.jit(lambda p, g: module.represent(p, {}, g, config))(params, graph)
  again = jax.jit(lambda p, g: module.represent(p, {}, g, config))(params, graph)
  assert evaluated.users.shape == (N_USERS, size) and evaluated.items.shape == (N_ITEMS, size)
  np.testing.assert_array_equal(evaluated.items, again.items)  # deterministic
  if module is freedom:
    assert sorted(evaluated.modality_items) == sorted(features)
    assert all(v.shape == (N_ITEMS, size) for v in evaluated.modality_items.values())
    # Pruning is resampled per step: another rng, another graph, another loss.
    (other, _), _ = loss_and_grads(params, graph, jax.random.PRNGKey(2))
    assert float(other) != float(loss)
  else:
    assert evaluated.modality_items == {}
    np.testing.assert_array_equal(evaluated.items[:, :size // 2], params["item_embedding"])


def test_vbpr_matches_dense_reference():
  config, _, features, graph, params, batch = setup_backbone(vbpr, vbpr_baby)
  content = np.concatenate([features["image"], features["text"]], 1)  # sorted by name
  proj = params["content_projector"]
  items = np.concatenate([params["item_embedding"], content @ proj["kernel"] + proj["bias"]], 1)
  users = np.asarray(params["user_embedding"])
  u, pos, neg = users[batch.users], items[batch.pos_items], items[batch.neg_items]
  margin = np.sum(u * (pos - neg), 1)
  expected = np.mean(np.log1p(np.exp(-margin))) + config.vbpr.reg_weight * (
      (np.sum(u ** 2) + np.sum(pos ** 2) + np.sum(neg ** 2)) / len(u))
  reps, loss = jax.jit(lambda p, g: vbpr.apply(p, {}, g, batch, None, config))(params, graph)
  np.testing.assert_allclose(reps.items, items, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


@pytest.mark.parametrize("batch_size", [16, 48])  # fewer / more rows than the 40 items
def test_freedom_forward_matches_dense_reference_without_pruning(batch_size):
  config, pairs, features, graph, params, batch = setup_backbone(
      freedom, freedom_baby, batch_size=batch_size, dropout=0.0, reg_weight=0.1)
  cfg = config.freedom
  weights = freedom.modality_weights(features, cfg.modality_weights)
  item_item = reference_item_graph(features, cfg.knn_k, weights)
  user_item = reference_user_item(pairs, N_USERS, N_ITEMS)
  users, items = (np.asarray(params[k], np.float64) for k in ("user_embedding",
                                                              "item_embedding"))
  layers = [np.concatenate([users, items])]
  for _ in range(cfg.n_ui_layers):
    layers.append(user_item @ layers[-1])
  mean = np.mean(layers, axis=0)
  exp_users = mean[:N_USERS]
  exp_items = mean[N_USERS:] + np.linalg.matrix_power(item_item, cfg.n_mm_layers) @ items
  projected = {k: x @ np.asarray(params["projectors"][k]["kernel"])
               + np.asarray(params["projectors"][k]["bias"]) for k, x in features.items()}

  def bpr(u, pos, neg):
    return np.mean(np.log1p(np.exp(-np.sum(u * (pos - neg), 1))))

  u = exp_users[batch.users]
  expected_loss = bpr(u, exp_items[batch.pos_items], exp_items[batch.neg_items]) + 0.1 * sum(
      bpr(u, x[batch.pos_items], x[batch.neg_items]) for x in projected.values())

  evaluated = jax.jit(lambda p, g: freedom.represent(p, {}, g, config))(params, graph)
  reps, loss = jax.jit(lambda p, g, r: freedom.apply(p, {}, g, batch, r, config))(
      params, graph, jax.random.PRNGKey(0))
  for got in (evaluated, reps):  # dropout 0: training graph == evaluation graph
    np.testing.assert_allclose(got.users, exp_users, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.items, exp_items, rtol=1e-5, atol=1e-6)
    for k in features:
      table = got.modality_items[k]
      if isinstance(table, ProjectedRows):  # training with fewer batch rows than items: lazy
        table = table.materialize()
      np.testing.assert_allclose(table, projected[k], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)


def test_freedom_pruned_apply_propagates_on_sampled_graph():
  # With pruning on, apply must equal the same equations on the graph it sampled.
  config, _, _, graph, params, batch = setup_backbone(freedom, freedom_baby, dropout=0.6)
  rng = jax.random.PRNGKey(5)
  # Each side in one jitted program (eagerly, every op would compile on its own).
  reps, _ = jax.jit(lambda: freedom.apply(params, {}, graph, batch, rng, config))()
  expected = jax.jit(lambda: freedom._forward(  # pylint: disable=protected-access
      params, graph, graphs.pruned_user_item_graph(rng, graph.graph["edges"], N_USERS, N_ITEMS,
                                                   0.6), config))()
  np.testing.assert_allclose(reps.users, expected.users, rtol=1e-6)
  full = jax.jit(lambda: freedom.represent(params, {}, graph, config))()
  assert not np.allclose(reps.users, full.users)


# ----------------------------------------------------------------------------- end to end


def tiny_run_config(config_module, path, alignment="none"):
  config = tiny_config(path, alignment=alignment, config=config_module.get_config())
  config.max_epochs = 2
  return config


@pytest.mark.parametrize("config_module,alignment",
                         [(freedom_baby, "none"), (freedom_baby, "fettle"), (vbpr_baby, "none")])
def test_tiny_end_to_end_training(tiny_mmrec, tmp_path, config_module, alignment):
  config = tiny_run_config(config_module, tiny_mmrec, alignment)
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["epochs"] == 2
  assert all(np.isfinite(h["loss"]) for h in result["history"])
  assert 0.0 <= result["test"]["recall@20"] <= 1.0


def test_freedom_baby_config_is_freedom_with_fettle_at_paper_setting():
  # `python run.py --config=configs/freedom_baby.py` is the paper's FREEDOM+FETTLE (Sec 4.6).
  config = freedom_baby.get_config()
  assert (config.model, config.alignment) == ("freedom", "fettle")
  assert (config.fettle.beta, config.fettle.alpha) == (1e-3, 1e-3)
  assert (config.fettle.temperature_feedback, config.fettle.temperature_cluster) == (0.1, 0.05)
  assert (config.fettle.prototypes_item, config.fettle.prototypes_user) == (10240, 20480)


def test_freedom_prunes_once_per_epoch_through_the_epoch_hook(tiny_mmrec, tmp_path):
  """prune_every='epoch' (MMRec's schedule): one graph per epoch, in the model state; the
  epoch still compiles once, and a killed run resumes to the same metrics."""
  config = tiny_run_config(freedom_baby, tiny_mmrec, alignment="none")
  config.freedom.prune_every = "epoch"
  config.max_epochs, config.checkpoint_every_epochs, config.patience = 4, 1, 100
  data = train.load_data(config)
  run = train.create_train_state(config, data)
  graph = run.state.model_state["user_item"]
  batch = Batch(*(b[0] for b in sampling.epoch_batches(
      jax.random.PRNGKey(0), run.static.train_pairs, run.static.seen, data.n_items, 64)))
  step_loss = jax.jit(lambda r: freedom.apply(run.state.params["backbone"],
                                              run.state.model_state, run.static, batch, r,
                                              run.config)[1])
  assert float(step_loss(jax.random.PRNGKey(1))) == float(step_loss(jax.random.PRNGKey(2)))
  next_state = jax.jit(lambda: freedom.epoch_start(
      run.state.params["backbone"], run.state.model_state, run.static, run.info,
      jax.random.PRNGKey(3), run.config))()
  assert not np.array_equal(np.asarray(next_state["user_item"].senders), np.asarray(graph.senders))
  full = train.train_and_evaluate(config, str(tmp_path / "full"))  # asserts one trace
  config.max_epochs = 2
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  config.max_epochs = 4
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed["test"] == full["test"] and resumed["valid"] == full["valid"]
  config.freedom.prune_every = "batch"
  with pytest.raises(ValueError, match="prune_every"):
    train.train_and_evaluate(config, str(tmp_path / "bad"))
