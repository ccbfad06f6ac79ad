"""Alignment plug-ins against independent NumPy references written from the paper's equations.

The references below loop over items, pairs, directions and prototypes in float64, following
Eq. 2-11 of Li et al. (SIGIR'24) literally; they share no code with the JAX implementation.
"""

import functools
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fettle_jax.alignment import bm3, fettle, get_alignment, none
from fettle_jax.alignment.fettle import equations, fast, fast_clusters, shapes
from fettle_jax.types import Batch, DataInfo, ProjectedRows, Representations

TOL = dict(rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- NumPy references


def np_unit(v):
  return v / max(np.linalg.norm(v), 1e-12)


def np_cos(a, b):
  return float(np_unit(a) @ np_unit(b))


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  top = x.max()
  return x - top - math.log(sum(math.exp(v - top) for v in x))


def np_linear(p, x):
  return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def np_residual_ffn(p, x):
  """Eq. 3: x + W2 relu(W1 x + b1) + b2."""
  return x + np_linear(p["output"], np.maximum(np_linear(p["hidden"], x), 0.0))


def np_modality_tables(params, reps, features, names, use_backbone):
  """name -> [n_items, L] float64: ID from reps.items, content from backbone or projector."""
  tables = {}
  for name in names:
    if name == "id":
      tables[name] = np.asarray(reps.items, np.float64)
    elif use_backbone and name in reps.modality_items:
      tables[name] = np.asarray(reps.modality_items[name], np.float64)
    else:
      tables[name] = np_linear(params["projectors"][name], np.asarray(features[name], np.float64))
  return tables


def np_feedback(users_table, tables, names, batch_users, batch_items, kind="dot"):
  """Eq. 2: item -> [s_i^m for m in names], averaging u^T i^m (kind 'dot') or cos(u, i^m)
  (kind 'cosine') over the item's batch pairs."""
  def score(u, v):
    return u @ v if kind == "dot" else u @ v / (np.linalg.norm(u) * np.linalg.norm(v))

  feedback = {}
  for item in sorted(set(batch_items.tolist())):
    pairs = [b for b in range(len(batch_items)) if batch_items[b] == item]
    feedback[item] = np.array([
        np.mean([score(users_table[batch_users[b]], tables[m][item]) for b in pairs])
        for m in names])
  return feedback


def np_directions(s, mode="pairwise", threshold=-1.0):
  """Eq. 5 (+ Sec 3.2 topmost, Sec 4.4 bidirectional) for one item's scores s."""
  k = len(s)
  if mode == "pairwise":
    directions = set()
    for m in range(k):
      for n in range(m + 1, k):
        directions.add((m, n) if s[m] <= s[n] else (n, m))  # tie: lower index is lower
  else:
    top = max(range(k), key=lambda idx: (s[idx], idx))  # tie: higher index ranks higher
    directions = {(m, top) for m in range(k) if m != top}
  if threshold >= 0:
    directions |= {(n, m) for (m, n) in directions if s[m] > threshold}
  return directions


def np_ila(params, tables, names, feedback, negatives, temperature, mode, threshold):
  """Eq. 4 as -log softmax; avg over each item's directions, mean over the batch's items."""
  items = sorted(feedback)
  candidates = items if negatives == "batch" else range(len(tables["id"]))
  per_item = []
  for i in items:
    losses = []
    for m, n in np_directions(feedback[i], mode, threshold):
      ffn = params["alignment_ffn"][f"{names[m]}->{names[n]}"]
      query = np_residual_ffn(ffn, tables[names[m]][i])
      logits = {j: np_cos(query, tables[names[n]][j]) / temperature for j in candidates}
      log_norm = math.log(sum(math.exp(v) for v in logits.values()))
      losses.append(-(logits[i] - log_norm))
    per_item.append(np.mean(losses))
  return np.mean(per_item)


def np_dt(params, users_table, tables, names, feedback, batch_users, batch_items, mode, threshold,
          similarity="dot"):
  """Eq. 6 with |I| = number of unique batch items; similarity 'dot' (as printed) or 'cosine'."""
  k = len(names)
  total = 0.0
  for i in sorted(feedback):
    pairs = [b for b in range(len(batch_items)) if batch_items[b] == i]
    for m, n in np_directions(feedback[i], mode, threshold):
      ffn = params["alignment_ffn"][f"{names[m]}->{names[n]}"]
      aligned = np_residual_ffn(ffn, tables[names[m]][i])
      if similarity == "cosine":
        scores = [users_table[batch_users[b]] @ aligned / np.linalg.norm(aligned)
                  / np.linalg.norm(users_table[batch_users[b]]) for b in pairs]
      else:
        scores = [users_table[batch_users[b]] @ aligned for b in pairs]
      total += np.mean(scores)
  return -total / (k * (k - 1) * len(feedback))


def np_sinkhorn(scores, iterations, epsilon):
  """SwAV's Sinkhorn-Knopp, element by element: [n, P] scores -> [n, P] codes (Eq. 7)."""
  n, p = scores.shape
  q = [[math.exp(scores[b][c] / epsilon) for b in range(n)] for c in range(p)]  # [P][n]
  total = sum(sum(row) for row in q)
  q = [[v / total for v in row] for row in q]
  for _ in range(iterations):
    for c in range(p):
      row_sum = sum(q[c])
      q[c] = [v / row_sum / p for v in q[c]]
    for b in range(n):
      col_sum = sum(q[c][b] for c in range(p))
      for c in range(p):
        q[c][b] = q[c][b] / col_sum / n
  return np.array([[q[c][b] * n for c in range(p)] for b in range(n)])


def np_prototype_scores(vectors, codebook):
  columns = [np_unit(codebook[:, c]) for c in range(codebook.shape[1])]
  return np.array([[np_unit(v) @ col for col in columns] for v in vectors])


def np_cross_entropy(code, scores, temperature):
  return -float(code @ np_log_softmax(np.asarray(scores) / temperature))


def np_cla_itv(params, tables, names, items, cfg):
  """Eq. 8: -1/|I| sum_i sum_{m<n} [q^n log p(i^m) + q^m log p(i^n)], per-modality codes."""
  codebook = np.asarray(params["codebook_item"], np.float64)
  scores = {m: np_prototype_scores([tables[m][i] for i in items], codebook) for m in names}
  codes = {m: np_sinkhorn(scores[m], cfg.sinkhorn_iterations, cfg.sinkhorn_epsilon) for m in names}
  t = cfg.temperature_cluster
  total = 0.0
  for k in range(len(items)):
    for m, n in itertools.combinations(names, 2):
      total += np_cross_entropy(codes[n][k], scores[m][k], t)
      total += np_cross_entropy(codes[m][k], scores[n][k], t)
  return total / len(items)


def np_cla_ui(params, users_table, id_table, batch_users, batch_items, cfg):
  """Eq. 9 over the batch's (u, i) pairs with codebook C^UI."""
  codebook = np.asarray(params["codebook_user"], np.float64)
  user_scores = np_prototype_scores([users_table[u] for u in batch_users], codebook)
  item_scores = np_prototype_scores([id_table[i] for i in batch_items], codebook)
  user_codes = np_sinkhorn(user_scores, cfg.sinkhorn_iterations, cfg.sinkhorn_epsilon)
  item_codes = np_sinkhorn(item_scores, cfg.sinkhorn_iterations, cfg.sinkhorn_epsilon)
  t = cfg.temperature_cluster
  return np.mean([np_cross_entropy(item_codes[b], user_scores[b], t)
                  + np_cross_entropy(user_codes[b], item_scores[b], t)
                  for b in range(len(batch_users))])


def np_fettle_terms(params, reps, features, batch, cfg):
  names = fettle.modality_names(params["projectors"])
  tables = np_modality_tables(params, reps, features, names, cfg.use_backbone_modalities)
  users_table = np.asarray(reps.users, np.float64)
  batch_users, batch_items = np.asarray(batch.users), np.asarray(batch.pos_items)
  feedback = np_feedback(users_table, tables, names, batch_users, batch_items, cfg.feedback)
  mode, threshold = cfg.directions, cfg.bidirectional_threshold
  terms = {
      "ila": np_ila(params, tables, names, feedback, cfg.ila_negatives, cfg.temperature_feedback,
                    mode, threshold),
      "dt": np_dt(params, users_table, tables, names, feedback, batch_users, batch_items, mode,
                  threshold, cfg.dt_similarity),
      "cla_itv": np_cla_itv(params, tables, names, sorted(feedback), cfg),
      "cla_ui": np_cla_ui(params, users_table, tables["id"], batch_users, batch_items, cfg),
  }
  if len(names) < 2:
    terms.update(ila=0.0, dt=0.0, cla_itv=0.0)
  total = cfg.alpha * (terms["cla_ui"] + terms["cla_itv"]) + cfg.beta * (terms["ila"] + terms["dt"])
  return total, terms


# ------------------------------------------------------------------------------ fixtures


def make_config(embedding_size=8, **fettle_overrides):
  fettle_cfg = fettle.default_config()
  fettle_cfg.update(dict(prototypes_item=7, prototypes_user=11, projector_hidden=5,
                         alpha=0.3, beta=0.7))
  fettle_cfg.update(fettle_overrides)
  return ml_collections.ConfigDict({"embedding_size": embedding_size, "fettle": fettle_cfg,
                                    "bm3": bm3.default_config()})


def jitted_loss(module, cfg):
  return jax.jit(functools.partial(module.loss, rng=jax.random.PRNGKey(1), config=cfg))


def make_problem(seed=0, feature_dims=None, backbone_modalities=(), n_users=10, n_items=9,
                 batch_size=16, dim=8):
  """Random representations, features and a batch whose positive items repeat."""
  if feature_dims is None:
    feature_dims = {"image": 12, "text": 6}
  rng = np.random.default_rng(seed)
  features = {m: jnp.asarray(rng.normal(size=(n_items, d)), jnp.float32)
              for m, d in feature_dims.items()}
  reps = Representations(
      users=jnp.asarray(rng.normal(size=(n_users, dim)), jnp.float32),
      items=jnp.asarray(rng.normal(size=(n_items, dim)), jnp.float32),
      modality_items={m: jnp.asarray(rng.normal(size=(n_items, dim)), jnp.float32)
                      for m in backbone_modalities})
  pos_items = rng.integers(0, n_items // 2 + 1, size=batch_size)  # few items -> many repeats
  assert len(set(pos_items.tolist())) < batch_size
  batch = Batch(users=jnp.asarray(rng.integers(0, n_users, batch_size), jnp.int32),
                pos_items=jnp.asarray(pos_items, jnp.int32),
                neg_items=jnp.asarray(rng.integers(0, n_items, batch_size), jnp.int32))
  return DataInfo(n_users, n_items, dict(feature_dims)), reps, features, batch


# ------------------------------------------------------------------------ Eq. 2 and Eq. 5


def test_estimated_feedback_matches_per_item_average_over_batch_pairs():
  _, reps, _, batch = make_problem(backbone_modalities=("image", "text"))
  names = ["id", "image", "text"]
  tables = {"id": reps.items, **reps.modality_items}
  ids, inverse, counts, valid = equations.unique_items(batch.pos_items)
  per_item = jnp.stack([tables[m][ids] for m in names], axis=1)
  scores = equations.estimated_feedback(reps.users[batch.users], per_item, inverse, counts)
  expected = np_feedback(np.asarray(reps.users, np.float64),
                         {m: np.asarray(t, np.float64) for m, t in tables.items()}, names,
                         np.asarray(batch.users), np.asarray(batch.pos_items))
  n_unique = len(expected)
  assert int(valid.sum()) == n_unique and scores.shape == (16, 3)
  chex.assert_trees_all_close(np.asarray(ids)[:n_unique], np.array(sorted(expected)))
  chex.assert_trees_all_close(scores[:n_unique], np.stack([expected[i] for i in sorted(expected)]),
                              **TOL)
  np.testing.assert_array_equal(np.asarray(scores[n_unique:]), 0.0)
  np.testing.assert_array_equal(np.asarray(ids)[np.asarray(inverse)],
                                np.asarray(batch.pos_items))


def _direction_sets(mask):
  mask = np.asarray(mask)
  return [{(m, n) for m in range(mask.shape[1]) for n in range(mask.shape[2]) if mask[i, m, n]}
          for i in range(mask.shape[0])]


@pytest.mark.parametrize("n_modalities", [3, 4])
def test_pairwise_directions_one_per_pair_with_deterministic_ties(n_modalities):
  rng = np.random.default_rng(1)
  scores = rng.integers(0, 3, size=(40, n_modalities)).astype(np.float32)  # many exact ties
  valid = np.arange(40) < 35
  mask = equations.alignment_directions(jnp.asarray(scores), jnp.asarray(valid), "pairwise")
  sets = _direction_sets(mask)
  for i in range(40):
    if not valid[i]:
      assert not sets[i]
      continue
    assert len(sets[i]) == n_modalities * (n_modalities - 1) // 2
    assert sets[i] == np_directions(scores[i])
    for m, n in itertools.combinations(range(n_modalities), 2):
      assert ((m, n) in sets[i]) != ((n, m) in sets[i])  # exactly one direction per pair
  tied = equations.alignment_directions(jnp.zeros((1, 3)), jnp.ones((1,), bool))
  assert _direction_sets(tied)[0] == {(0, 1), (0, 2), (1, 2)}  # all tied: ID->image->text


@pytest.mark.parametrize("n_modalities", [3, 4])
def test_topmost_directions_point_all_others_to_the_top_modality(n_modalities):
  rng = np.random.default_rng(2)
  scores = rng.integers(0, 3, size=(40, n_modalities)).astype(np.float32)
  mask = equations.alignment_directions(jnp.asarray(scores), jnp.ones((40,), bool), "topmost")
  for i, directions in enumerate(_direction_sets(mask)):
    assert len(directions) == n_modalities - 1
    assert directions == np_directions(scores[i], "topmost")


@pytest.mark.parametrize("mode", ["pairwise", "topmost"])
def test_bidirectional_threshold_adds_reverse_directions_for_high_scores(mode):
  rng = np.random.default_rng(3)
  scores = rng.normal(size=(50, 3)).astype(np.float32)
  threshold = 0.1
  mask = equations.alignment_directions(jnp.asarray(scores), jnp.ones((50,), bool), mode,
                                        threshold)
  sets = _direction_sets(mask)
  n_bidirectional = 0
  for i in range(50):
    assert sets[i] == np_directions(scores[i], mode, threshold)
    n_bidirectional += any((n, m) in sets[i] for (m, n) in sets[i])
  assert 0 < n_bidirectional < 50  # the threshold really splits the items
  off = equations.alignment_directions(jnp.asarray(scores), jnp.ones((50,), bool), mode, -1.0)
  assert [np_directions(s, mode) for s in scores] == _direction_sets(off)


# ----------------------------------------------------------------------------- Sinkhorn


def test_sinkhorn_matches_swav_reference_and_respects_mask():
  rng = np.random.default_rng(4)
  scores = np.tanh(rng.normal(size=(12, 7))).astype(np.float32)
  codes = equations.sinkhorn_codes(jnp.asarray(scores), jnp.ones(12, bool), 3, 0.05)
  chex.assert_trees_all_close(codes, np_sinkhorn(scores.astype(np.float64), 3, 0.05), **TOL)
  # Padding rows (e.g. empty unique-item slots) get no mass and do not change real rows.
  padded = np.concatenate([scores, rng.normal(size=(5, 7)).astype(np.float32)])
  mask = np.arange(17) < 12
  masked = equations.sinkhorn_codes(jnp.asarray(padded), jnp.asarray(mask), 3, 0.05)
  chex.assert_trees_all_close(masked[:12], codes, **TOL)
  np.testing.assert_array_equal(np.asarray(masked[12:]), 0.0)


@pytest.mark.parametrize("masked", [False, True])
def test_sinkhorn_marginals(masked):
  rng = np.random.default_rng(5)
  n, p = 48, 16
  scores = np.tanh(rng.normal(size=(n, p))).astype(np.float32)
  mask = (np.arange(n) < 40) if masked else np.ones(n, bool)
  n_valid = int(mask.sum())
  for iterations in (3, 300):
    codes = np.asarray(equations.sinkhorn_codes(jnp.asarray(scores), jnp.asarray(mask),
                                                iterations, 0.2))
    assert np.all(np.isfinite(codes)) and np.all(codes >= 0)
    np.testing.assert_allclose(codes[mask].sum(axis=1), 1.0, atol=1e-5)  # each code sums to 1
    np.testing.assert_array_equal(codes[~mask], 0.0)
  # After convergence every prototype also holds n_valid / P of the (rescaled) mass.
  np.testing.assert_allclose(codes[mask].sum(axis=0), n_valid / p, rtol=1e-3)


# ----------------------------------------------------------------- every term, end to end


CASES = {
    "pairwise_batch": dict(),
    "dt_as_printed_dot": dict(dt_similarity="dot"),
    "pairwise_all_negatives": dict(ila_negatives="all"),
    "topmost": dict(directions="topmost"),
    "bidirectional": dict(bidirectional_threshold=0.0),
    "cosine_feedback": dict(feedback="cosine"),
    "cosine_feedback_bidirectional": dict(feedback="cosine", bidirectional_threshold=0.1),
    "sinkhorn_5_iterations": dict(sinkhorn_iterations=5, sinkhorn_epsilon=0.1),
    # lambda_c = 2 eps: Sinkhorn's kernel is the prediction's exp squared (one exp pass).
    "cluster_temperature_twice_epsilon": dict(temperature_cluster=0.1),
    "cluster_temperature_not_a_multiple": dict(temperature_cluster=0.07),
    "no_sinkhorn_round": dict(sinkhorn_iterations=0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_terms_match_numpy_reference(case):
  """The reference module (equations.py) against the NumPy loops; tests/
  test_fettle_reference.py proves the fast path equal to it."""
  data_info, reps, features, batch = make_problem(seed=6)
  cfg = make_config(implementation="reference", **CASES[case])
  params = fettle.init(jax.random.PRNGKey(0), data_info, cfg)
  total, terms = jitted_loss(fettle, cfg)(params, reps, features, batch)
  expected_total, expected = np_fettle_terms(params, reps, features, batch, cfg.fettle)
  assert set(terms) == {"ila", "dt", "cla_itv", "cla_ui"}
  chex.assert_trees_all_close(terms, {k: np.float32(v) for k, v in expected.items()}, **TOL)
  chex.assert_trees_all_close(total, np.float32(expected_total), **TOL)
  assert all(abs(float(v)) > 1e-3 for v in terms.values())  # no term is trivially zero


# make_problem's batch has 16 pairs: 10 users / 9 items put both L_UI^CLA sides on unique
# rows (pair counts as Sinkhorn weights); 40 users or 30 items keep that side on pair rows.
@pytest.mark.parametrize("n_users,n_items", [(10, 30), (40, 9), (40, 30)])
def test_user_cluster_term_on_unique_or_pair_rows_matches_reference(n_users, n_items):
  data_info, reps, features, batch = make_problem(seed=14, n_users=n_users, n_items=n_items)
  cfg = make_config()
  params = fettle.init(jax.random.PRNGKey(0), data_info, cfg)
  total, terms = jitted_loss(fettle, cfg)(params, reps, features, batch)
  expected_total, expected = np_fettle_terms(params, reps, features, batch, cfg.fettle)
  chex.assert_trees_all_close(terms, {k: np.float32(v) for k, v in expected.items()}, **TOL)
  chex.assert_trees_all_close(total, np.float32(expected_total), **TOL)


def test_users_as_unique_rows_where_a_user_branch_is_smaller_than_the_batch():
  """More users than pairs (40 > 16) keeps L_UI^CLA's users on pair rows, unless the
  first branch's user bucket holds fewer rows than the batch: then unique rows, same values."""
  data_info, reps, features, batch = make_problem(seed=14, n_users=40, n_items=9)
  n_distinct = len(set(np.asarray(batch.users).tolist()))
  assert n_distinct < 16
  params = fettle.init(jax.random.PRNGKey(0), data_info, make_config())
  expected_total, expected = np_fettle_terms(params, reps, features, batch, make_config().fettle)
  for hint, unique in [({}, False), (dict(typical_batch_items=8, typical_batch_users=16), False),
                        (dict(typical_batch_items=8, typical_batch_users=n_distinct), True),
                        (dict(typical_batch_items=8, typical_batch_users=16,
                              common_batch_items=8, common_batch_users=n_distinct), True)]:
    cfg = make_config()
    cfg.fettle_shapes = shapes.default_shape_hints()
    cfg.fettle_shapes.update(hint)
    _, index, _ = fast.prepare_terms(params, reps, features, batch, cfg.fettle, cfg.fettle_shapes)
    assert (index.user_counts is not None) == unique, hint
    total, terms = jitted_loss(fettle, cfg)(params, reps, features, batch)
    chex.assert_trees_all_close(terms, {k: np.float32(v) for k, v in expected.items()}, **TOL)
    chex.assert_trees_all_close(total, np.float32(expected_total), **TOL)


def test_typical_bucket_from_data_is_exact_and_taken():
  """fit_static_shapes sizes the first branches; a batch larger than one takes a later one."""
  data_info, reps, features, batch = make_problem(seed=6)
  cfg = make_config()
  pairs = np.stack([np.asarray(batch.users), np.asarray(batch.pos_items)], axis=1)
  cfg.batch_size = 16
  cfg = fettle.fit_static_shapes(cfg, pairs, data_info.n_users, data_info.n_items)
  hints = cfg.fettle_shapes
  n_items = len(set(np.asarray(batch.pos_items).tolist()))
  n_users = len(set(np.asarray(batch.users).tolist()))
  assert hints.typical_batch_items == min(9, -(-int(np.ceil(n_items * 1.02)) // 32) * 32)
  assert hints.typical_batch_users == min(10, -(-int(np.ceil(n_users * 1.02)) // 32) * 32)
  expected_total, _ = np_fettle_terms(fettle.init(jax.random.PRNGKey(0), data_info, cfg),
                                      reps, features, batch, cfg.fettle)
  params = fettle.init(jax.random.PRNGKey(0), data_info, cfg)
  # Every sample holds all 16 pairs: the median batch is the largest, no common branch.
  assert (hints.common_batch_items, hints.common_batch_users) == (
      hints.typical_batch_items, hints.typical_batch_users)
  # First branch: too few item slots, exactly the batch's rows, too few user rows.
  for typical in [(3, n_users), (n_items, n_users), (8, n_users - 1)]:
    hints.typical_batch_items, hints.typical_batch_users = typical
    ladder = shapes.buckets(9, 10, *typical, *typical)
    assert ladder == [typical, (9, 10)]  # two branches: each is a compiled copy of every term
    total, _ = jitted_loss(fettle, cfg)(params, reps, features, batch)
    chex.assert_trees_all_close(total, np.float32(expected_total), **TOL)
  # A smaller common branch first: the batch fits it, or too few items / users send it on.
  assert n_items <= 8
  hints.typical_batch_items, hints.typical_batch_users = 8, n_users
  for common in [(n_items, n_users), (3, n_users), (n_items, n_users - 1)]:
    hints.common_batch_items, hints.common_batch_users = common
    ladder = shapes.buckets(9, 10, 8, n_users, *common)
    assert ladder == [common, (8, n_users), (9, 10)]
    total, _ = jitted_loss(fettle, cfg)(params, reps, features, batch)
    chex.assert_trees_all_close(total, np.float32(expected_total), **TOL)


def test_unique_items_fill_a_prefix_of_the_buffer():
  _, _, _, batch = make_problem(seed=6)
  valid = np.asarray(fast.unique_batch_items(batch.pos_items, 9).valid)
  n_valid = int(valid.sum())
  assert 0 < n_valid < valid.size and valid[:n_valid].all() and not valid[n_valid:].any()


@pytest.mark.parametrize("batch_size,n_items", [(16, 9), (16, 16), (16, 40), (64, 3), (8, 1000),
                                               (32, 600)])
def test_unique_batch_items_equal_jnp_unique(batch_size, n_items):
  """The catalogue pass (n_items <= 16 B) and the sort give jnp.unique's values and padding."""
  rng = np.random.default_rng(batch_size * n_items)
  for trial in range(20):
    high = [1, 2, n_items][trial % 3]  # one id repeated, two ids, the whole catalogue
    items = jnp.asarray(rng.integers(0, high, batch_size), jnp.int32)
    got = jax.jit(fast.unique_batch_items, static_argnums=1)(items, n_items)
    ids, inverse, counts = jnp.unique(items, size=min(batch_size, n_items),
                                      return_inverse=True, return_counts=True)
    for name, expected in (("ids", ids), ("inverse", inverse), ("counts", counts),
                           ("valid", counts > 0)):
      np.testing.assert_array_equal(getattr(got, name), expected, err_msg=name)
      assert getattr(got, name).dtype == expected.dtype, name


def test_bucket_sizes_are_static_and_end_at_capacity():
  assert shapes.bucket_sizes(1682) == [448, 896, 1280, 1682]
  assert shapes.bucket_sizes(2048) == [512, 1024, 1536, 2048]
  assert shapes.bucket_sizes(9) == [9]


# The batch of make_problem(seed=6) holds 5 unique items in 9 slots: each ladder picks a
# different branch (the 5-slot prefix, a roomier one, or the full buffer as fallback).
@pytest.mark.parametrize("ladder,case", [((2, 5, 9), "pairwise_batch"),
                                         ((3, 7, 9), "pairwise_all_negatives"),
                                         ((1, 2, 9), "bidirectional")])
def test_bucketed_item_terms_equal_reference_and_full_buffer_gradients(monkeypatch, ladder, case):
  data_info, reps, features, batch = make_problem(seed=6)
  cfg = make_config(**CASES[case])
  params = fettle.init(jax.random.PRNGKey(0), data_info, cfg)
  # One program for the terms and the gradients (each compile of the ladder is the slow part).
  terms_and_grads = lambda: jax.jit(jax.value_and_grad(
      lambda p, r: fettle.loss(p, r, features, batch, None, cfg), argnums=(0, 1),
      has_aux=True))(params, reps)
  _, full_grads = terms_and_grads()  # capacity 9 < 64: one bucket, no switch
  monkeypatch.setattr(shapes, "bucket_sizes", lambda capacity: list(ladder))
  (_, terms), grads = terms_and_grads()
  _, expected = np_fettle_terms(params, reps, features, batch, cfg.fettle)
  chex.assert_trees_all_close(terms, {k: np.float32(v) for k, v in expected.items()}, **TOL)
  chex.assert_trees_all_close(grads, full_grads, **TOL)


@pytest.mark.parametrize("feature_dims,backbone", [
    ({"audio": 5, "image": 12, "text": 6}, ()),  # four modalities, all projected
    ({"image": 12, "text": 6}, ("image",)),       # backbone's image, projected text
    ({"image": 12}, ("image",)),                   # two modalities
])
def test_fettle_any_number_of_modalities_and_backbone_modalities(feature_dims, backbone):
  data_info, reps, features, batch = make_problem(seed=7, feature_dims=feature_dims,
                                                  backbone_modalities=backbone)
  cfg = make_config()
  params = fettle.init(jax.random.PRNGKey(0), data_info, cfg)
  k = len(feature_dims) + 1
  assert len(params["alignment_ffn"]) == k * (k - 1)
  loss_fn = functools.partial(fettle.loss, features=features, batch=batch, rng=None, config=cfg)
  (total, terms), grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))(
      params, reps)
  expected_total, expected = np_fettle_terms(params, reps, features, batch, cfg.fettle)
  chex.assert_trees_all_close(terms, {k: np.float32(v) for k, v in expected.items()}, **TOL)
  chex.assert_trees_all_close(total, np.float32(expected_total), **TOL)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
  if backbone:  # the projector of a backbone-provided modality is unused
    np.testing.assert_array_equal(np.asarray(grads[0]["projectors"]["image"]["kernel"]), 0.0)


def test_fettle_without_content_modalities_is_user_cluster_alignment_only():
  data_info, reps, features, batch = make_problem(seed=8, feature_dims={})
  cfg = make_config()
  params = fettle.init(jax.random.PRNGKey(0), data_info, cfg)
  assert params["projectors"] == {} and params["alignment_ffn"] == {}
  total, terms = jitted_loss(fettle, cfg)(params, reps, features, batch)
  expected = np_cla_ui(params, np.asarray(reps.users, np.float64),
                       np.asarray(reps.items, np.float64), np.asarray(batch.users),
                       np.asarray(batch.pos_items), cfg.fettle)
  assert float(terms["ila"]) == float(terms["dt"]) == float(terms["cla_itv"]) == 0.0
  chex.assert_trees_all_close(terms["cla_ui"], np.float32(expected), **TOL)
  chex.assert_trees_all_close(total, np.float32(cfg.fettle.alpha * expected), **TOL)


@pytest.mark.parametrize("switches", [
    dict(use_ila=True, use_dt=False, use_cla=False),
    dict(use_ila=False, use_dt=False, use_cla=True),
    dict(use_ila=True, use_dt=False, use_cla=True),
])
def test_ablation_switches_drop_terms(switches):
  data_info, reps, features, batch = make_problem(seed=9)
  cfg = make_config(**switches)
  params = fettle.init(jax.random.PRNGKey(0), data_info, cfg)
  total, terms = jitted_loss(fettle, cfg)(params, reps, features, batch)
  _, expected = np_fettle_terms(params, reps, features, batch, cfg.fettle)
  kept = {"ila": switches["use_ila"], "dt": switches["use_dt"],
          "cla_itv": switches["use_cla"], "cla_ui": switches["use_cla"]}
  for name, on in kept.items():
    chex.assert_trees_all_close(terms[name], np.float32(expected[name] if on else 0.0), **TOL)
  f = cfg.fettle
  chex.assert_trees_all_close(total, f.alpha * (terms["cla_ui"] + terms["cla_itv"])
                              + f.beta * (terms["ila"] + terms["dt"]), **TOL)


# ------------------------------------------------------------------------------ gradients


def _id_dominant_problem():
  """Two modalities where every item's ID score beats its image score: only image -> ID."""
  rng = np.random.default_rng(10)
  n_users, n_items, dim = 12, 10, 8
  v = rng.normal(size=dim)
  users = v + 0.1 * rng.normal(size=(n_users, dim))
  reps = Representations(
      users=jnp.asarray(users, jnp.float32),
      items=jnp.asarray(3 * v + 0.1 * rng.normal(size=(n_items, dim)), jnp.float32),
      modality_items={"image": jnp.asarray(-v + 0.1 * rng.normal(size=(n_items, dim)),
                                           jnp.float32)})
  batch = Batch(users=jnp.asarray(rng.integers(0, n_users, 16), jnp.int32),
                pos_items=jnp.asarray(rng.integers(0, 6, 16), jnp.int32),
                neg_items=jnp.zeros(16, jnp.int32))
  return DataInfo(n_users, n_items, {"image": 4}), reps, {"image": jnp.ones((n_items, 4))}, batch


def test_ila_stop_gradient_keeps_target_modality_fixed():
  data_info, reps, features, batch = _id_dominant_problem()
  cfg = make_config(use_dt=False, use_cla=False)
  params = fettle.init(jax.random.PRNGKey(0), data_info, cfg)

  ila_grad = jax.jit(jax.grad(  # only ILA is on: the total is beta L^ILA
      lambda r: fettle.loss(params, r, features, batch, None, cfg)[0]))
  grads = ila_grad(reps)
  # ID is only ever the target sg(i^ID) of image -> ID, and users only pick directions.
  np.testing.assert_array_equal(np.asarray(grads.items), 0.0)
  np.testing.assert_array_equal(np.asarray(grads.users), 0.0)
  image_grad = np.abs(np.asarray(grads.modality_items["image"])).sum(axis=1)
  batch_items = set(np.asarray(batch.pos_items).tolist())
  assert all(image_grad[i] > 0 for i in batch_items)  # the source modality does move
  # Flip the scores so ID -> image: now ID receives gradient and image (the target) none.
  flipped = reps._replace(users=-reps.users)
  grads = ila_grad(flipped)
  assert np.abs(np.asarray(grads.items)).sum() > 0
  np.testing.assert_array_equal(np.asarray(grads.modality_items["image"]), 0.0)


@pytest.mark.parametrize("n_rows", [1, 10, 11])
def test_ila_split_by_majority_target_matches_per_row_reference(n_rows):
  """ILA's majority / minority key products give every row its own target's InfoNCE,
  whatever the split of targets in a pair (all, none, exactly half, one more than half,
  alternating), with masked keys left out; the gradient equals that of a dense per-row
  formula. The split is data: one compiled program per row count."""
  rng = np.random.default_rng(n_rows)
  n_keys, dim, temperature = 13, 5, 0.1
  queries = rng.normal(size=(2, n_rows, dim)).astype(np.float32)
  keys = rng.normal(size=(n_keys, 3, dim)).astype(np.float32)
  unit_keys = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
  key_mask = np.arange(n_keys) != 3
  positive = rng.choice(np.flatnonzero(key_mask), size=n_rows)
  active, valid = np.ones((2, n_rows), bool), np.ones(n_rows, bool)
  pairs = ((0, 1), (0, 2))

  @jax.jit
  def ila_value_and_grad(q, second):
    def ila(q):
      directed = fast.DirectionQueries(q, second, jnp.asarray(active), pairs)
      return fast.item_level_alignment_loss(directed, jnp.asarray(keys), jnp.asarray(positive),
                                              jnp.asarray(key_mask), jnp.asarray(valid),
                                              temperature)
    return jax.value_and_grad(ila)(q)

  @jax.jit
  def dense_reference_grad(q, second):  # every row against its own target's keys
    def loss(q):
      losses = []
      for r, (m, n) in enumerate(pairs):
        target_keys = jnp.where(second[r][:, None, None], unit_keys[None, :, n],
                                unit_keys[None, :, m])
        unit_q = q[r] / jnp.linalg.norm(q[r], axis=-1, keepdims=True)
        logits = jnp.einsum("ul,ukl->uk", unit_q, target_keys) / temperature
        logits = jnp.where(key_mask[None], logits, -jnp.inf)
        losses.append(jax.nn.logsumexp(logits, axis=-1) - logits[np.arange(n_rows), positive])
      return jnp.mean(jnp.stack(losses))
    return jax.grad(loss)(q)

  real_keys = list(np.flatnonzero(key_mask))
  rows = np.arange(n_rows)
  for pattern in [rows >= 0, rows < 0, rows < n_rows // 2, rows <= n_rows // 2, rows % 2 == 0]:
    second = np.stack([pattern, ~pattern])
    expected = np.mean([[
        -np_log_softmax([np_cos(queries[r, i], keys[j, n if second[r, i] else m]) / temperature
                         for j in real_keys])[real_keys.index(positive[i])]
        for i in range(n_rows)] for r, (m, n) in enumerate(pairs)])
    value, grad = ila_value_and_grad(jnp.asarray(queries), jnp.asarray(second))
    np.testing.assert_allclose(float(value), expected, **TOL)
    np.testing.assert_allclose(np.asarray(grad),
                               np.asarray(dense_reference_grad(queries, jnp.asarray(second))),
                               rtol=1e-4, atol=1e-6)


def test_gradient_is_of_the_weighted_total_and_its_weights():
  """One gradient of sum_t w_t L_t (the terms share their backward work): it equals the
  weighted sum of each term's own gradient, the weights' gradients are the terms, and a
  per-term value, which carries none, refuses to be differentiated."""
  data_info, reps, features, batch = make_problem(seed=6)
  cfg = make_config()
  params = fettle.init(jax.random.PRNGKey(0), data_info, cfg)
  inputs, index, layout = fast.prepare_terms(params, reps, features, batch, cfg.fettle)
  weights = {"ila": 0.7, "dt": -0.2, "cla_itv": 1.3, "cla_ui": 0.4}

  def weighted(x, w):
    return fast.alignment_terms(x, index, layout, cfg.fettle, w)

  (_, terms), (grad_x, grad_w) = jax.jit(jax.value_and_grad(weighted, argnums=(0, 1),
                                                            has_aux=True))(inputs, weights)
  # Each term's own gradient (weight 1 on it, 0 elsewhere), all four in one program.
  one_hot = {t: jnp.asarray([float(t == name) for name in weights]) for t in weights}
  each = jax.jit(jax.vmap(jax.grad(lambda x, w: weighted(x, w)[0]), in_axes=(None, 0)))(
      inputs, one_hot)
  want = jax.tree_util.tree_map(
      lambda g: jnp.tensordot(jnp.asarray(list(weights.values())), g, axes=1), each)
  chex.assert_trees_all_close(grad_x, want, **TOL)
  chex.assert_trees_all_close(grad_w, {t: terms[t] for t in weights}, **TOL)
  with pytest.raises(ValueError, match="per-term values carry no gradient"):  # when traced
    jax.jit(jax.grad(
        lambda x: fast.alignment_terms(x, index, layout, cfg.fettle, weights)[1]["ila"]))(
            inputs)


def test_dt_gradient_reaches_users_sources_and_projectors():
  data_info, reps, features, batch = _id_dominant_problem()
  cfg = make_config(use_ila=False, use_cla=False)
  params = fettle.init(jax.random.PRNGKey(0), data_info, cfg)
  grad_params, grad_reps = jax.jit(jax.grad(
      lambda p, r: fettle.loss(p, r, features, batch, None, cfg)[0], argnums=(0, 1)))(params, reps)
  assert np.abs(np.asarray(grad_reps.users)).sum() > 0
  assert np.abs(np.asarray(grad_reps.modality_items["image"])).sum() > 0
  np.testing.assert_array_equal(np.asarray(grad_reps.items), 0.0)  # ID is never a DT source here
  assert np.abs(np.asarray(grad_params["alignment_ffn"]["image->id"]["output"]["kernel"])).sum() > 0
  np.testing.assert_array_equal(
      np.asarray(grad_params["alignment_ffn"]["id->image"]["output"]["kernel"]), 0.0)


def test_cluster_codes_carry_no_gradient():
  rng = np.random.default_rng(11)
  users = jnp.asarray(rng.normal(size=(20, 8)), jnp.float32)
  items = jnp.asarray(rng.normal(size=(20, 8)), jnp.float32)
  codebook = jnp.asarray(rng.normal(size=(8, 13)), jnp.float32)
  t, n_iter, eps = 0.05, 3, 0.05
  actual = jax.jit(jax.grad(functools.partial(
      fast_clusters.user_cluster_alignment_loss, temperature=t, n_iterations=n_iter, epsilon=eps),
      argnums=(0, 1, 2)))(users, items, codebook)

  # Same loss with the codes computed outside as constants.
  q_u = fast_clusters.sinkhorn_knopp(fast_clusters.prototype_scores(users, codebook), n_iter, eps)
  q_i = fast_clusters.sinkhorn_knopp(fast_clusters.prototype_scores(items, codebook), n_iter, eps)

  def fixed_codes_loss(u, i, c, codes_u, codes_i):  # dense codes, plain log-softmax
    log_p_u = jax.nn.log_softmax(fast_clusters.prototype_scores(u, c) / t)
    log_p_i = jax.nn.log_softmax(fast_clusters.prototype_scores(i, c) / t)
    return jnp.mean(-jnp.sum(codes_i * log_p_u, axis=-1) - jnp.sum(codes_u * log_p_i, axis=-1))

  expected = jax.jit(jax.grad(fixed_codes_loss, argnums=(0, 1, 2)))(
      users, items, codebook, q_u, q_i)
  chex.assert_trees_all_close(actual, expected, **TOL)
  # The check has power: letting gradient through the codes changes it.
  through = jax.jit(jax.grad(lambda u, i, c: fixed_codes_loss(
      u, i, c, fast_clusters.sinkhorn_knopp(fast_clusters.prototype_scores(u, c), n_iter, eps),
      fast_clusters.sinkhorn_knopp(fast_clusters.prototype_scores(i, c), n_iter, eps)),
      argnums=0))(
          users, items, codebook)
  assert np.abs(np.asarray(through) - np.asarray(actual[0])).max() > 1e-4


@pytest.mark.parametrize("n_iterations, temperature", [(3, 0.05), (0, 0.1), (2, 0.07)])
def test_item_cluster_targets_as_arrays_or_mixtures_agree(n_iterations, temperature):
  """L_ITV^CLA's two exact forms (dense [U, P] targets for small arrays, code mixtures for
  large ones) give the same value and gradients, padding rows included."""
  rng = np.random.default_rng(13)
  embeddings = jnp.asarray(rng.normal(size=(12, 3, 8)), jnp.float32)
  codebook = jnp.asarray(rng.normal(size=(8, 17)), jnp.float32)
  valid = jnp.asarray(np.arange(12) < 9)

  def loss(dense):
    return jax.jit(jax.value_and_grad(lambda e, c: fast_clusters.item_cluster_alignment_loss(
        e, c, valid, temperature, n_iterations, 0.05, dense_targets=dense), argnums=(0, 1)))(
            embeddings, codebook)

  dense, mixed = loss(True), loss(False)
  chex.assert_trees_all_close(dense, mixed, **TOL)
  assert np.abs(np.asarray(dense[1][0])).sum() > 0 and np.abs(np.asarray(dense[1][1])).sum() > 0
  np.testing.assert_array_equal(np.asarray(dense[1][0])[9:], 0.0)  # padding gets no gradient


# ------------------------------------------------------------------------------- scale


def test_losses_and_gradients_finite_at_paper_scale():
  """B=2048, P=10240/20480, lambda_c=tau=0.05, Amazon-like feature widths and scales."""
  rng = np.random.default_rng(12)
  n_users, n_items, dim, batch_size = 3000, 2500, 64, 2048
  data_info = DataInfo(n_users, n_items, {"image": 4096, "text": 384})
  cfg = ml_collections.ConfigDict({"embedding_size": dim, "fettle": fettle.default_config(),
                                   "bm3": bm3.default_config()})
  features = {  # CNN fc7-like non-negative image features, unit-norm sentence embeddings
      "image": jnp.asarray(np.maximum(rng.normal(0, 2, (n_items, 4096)), 0), jnp.float32),
      "text": jnp.asarray(rng.normal(0, 1 / np.sqrt(384), (n_items, 384)), jnp.float32)}
  reps = Representations(users=jnp.asarray(rng.normal(0, 1, (n_users, dim)), jnp.float32),
                         items=jnp.asarray(rng.normal(0, 1, (n_items, dim)), jnp.float32),
                         modality_items={})
  popular = rng.zipf(1.5, batch_size) % n_items  # skewed popularity: many repeats
  batch = Batch(jnp.asarray(rng.integers(0, n_users, batch_size), jnp.int32),
                jnp.asarray(popular, jnp.int32),
                jnp.asarray(rng.integers(0, n_items, batch_size), jnp.int32))
  params = fettle.init(jax.random.PRNGKey(0), data_info, cfg)

  @jax.jit
  def value_and_grads(params, reps):
    return jax.value_and_grad(
        lambda p, r: fettle.loss(p, r, features, batch, None, cfg), argnums=(0, 1),
        has_aux=True)(params, reps)

  (total, terms), grads = value_and_grads(params, reps)
  for value in [total, *terms.values(), *jax.tree_util.tree_leaves(grads)]:
    assert np.all(np.isfinite(np.asarray(value)))
  assert all(float(v) != 0.0 for v in terms.values())


# ----------------------------------------------------------------------- BM3, none, registry


def test_bm3_matches_reference_and_pulls_both_ways():
  data_info, reps, features, batch = make_problem(seed=13, backbone_modalities=("text",))
  cfg = make_config()
  params = bm3.init(jax.random.PRNGKey(0), data_info, cfg)
  total, aux = jitted_loss(bm3, cfg)(params, reps, features, batch)
  names = ["id", "image", "text"]
  tables = np_modality_tables(params, reps, features, names, True)
  distances = [1 - np_cos(tables[m][i], tables[n][i])
               for i in np.asarray(batch.pos_items) for m, n in itertools.combinations(names, 2)]
  chex.assert_trees_all_close(aux["bm3"], np.float32(np.mean(distances)), **TOL)
  chex.assert_trees_all_close(total, np.float32(cfg.bm3.weight * np.mean(distances)), **TOL)
  grads = jax.grad(lambda r: bm3.loss(params, r, features, batch, None, cfg)[0])(reps)
  assert np.abs(np.asarray(grads.items)).sum() > 0
  assert np.abs(np.asarray(grads.modality_items["text"])).sum() > 0


def test_none_and_registry():
  data_info, reps, features, batch = make_problem()
  assert none.init(None, data_info, None) == {}
  total, aux = none.loss({}, reps, features, batch, None, None)
  assert float(total) == 0.0 and aux == {}
  assert get_alignment("fettle") is fettle and get_alignment("bm3") is bm3
  assert get_alignment("none") is none
  with pytest.raises(ValueError):
    get_alignment("clip")


def test_default_config_fields():
  cfg = fettle.default_config()
  assert dict(cfg) == dict(
      alpha=1e-3, beta=1e-3, temperature_feedback=0.1, temperature_cluster=0.05,
      prototypes_item=10240, prototypes_user=20480, sinkhorn_iterations=3, sinkhorn_epsilon=0.05,
      directions="pairwise", ila_negatives="batch", bidirectional_threshold=-1.0,
      feedback="dot", use_ila=True,
      use_dt=True, dt_similarity="cosine", use_cla=True, projector_hidden=64,
      use_backbone_modalities=True, implementation="fast")


@pytest.mark.parametrize("field,value", [("directions", "cyclic"), ("ila_negatives", "queue"),
                                         ("dt_similarity", "l1"), ("feedback", "l2"),
                                         ("implementation", "slow")])
def test_invalid_config_values_are_rejected(field, value):
  data_info, reps, features, batch = make_problem()
  cfg = make_config(**{field: value})
  params = fettle.init(jax.random.PRNGKey(0), data_info, cfg)
  with pytest.raises(ValueError, match=field):
    fettle.loss(params, reps, features, batch, None, cfg)


def test_lazy_projected_modality_rows_equal_the_full_table():
  """A backbone may hand FETTLE ProjectedRows (only gathered rows get projected): same
  terms, and the gradient reaches the projector either way."""
  data_info, reps, features, batch = make_problem(seed=16)
  rng = np.random.default_rng(16)
  projector = {"kernel": jnp.asarray(rng.normal(size=(12, 8)), jnp.float32),
               "bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}
  cfg = make_config()
  params = fettle.init(jax.random.PRNGKey(0), data_info, cfg)

  def total(proj, lazy):
    rows = ProjectedRows(features["image"], proj)
    table = rows if lazy else rows.materialize()
    r = reps._replace(modality_items={"image": table})
    return fettle.loss(params, r, features, batch, None, cfg)[0]

  lazy, lazy_grad = jax.jit(jax.value_and_grad(lambda p: total(p, True)))(projector)
  full, full_grad = jax.jit(jax.value_and_grad(lambda p: total(p, False)))(projector)
  chex.assert_trees_all_close(lazy, full, **TOL)
  chex.assert_trees_all_close(lazy_grad, full_grad, **TOL)
  assert np.abs(np.asarray(lazy_grad["kernel"])).sum() > 0
