"""Ranking metrics against a brute-force NumPy computation written from the definitions."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fettle_jax import evaluation


def brute_force_metrics(scores, train, heldout, k):
  """One user at a time, with Python loops: the definitions, not the vectorized code."""
  out = {"recall": [], "precision": [], "ndcg": [], "map": []}
  for u in range(scores.shape[0]):
    relevant = heldout[u]
    if not relevant:
      continue
    # Rank by score descending; ties by lower item index (stable sort); train items excluded.
    ranking = [i for i in sorted(range(scores.shape[1]), key=lambda i: (-scores[u, i], i))
               if i not in train[u]][:k]
    hits = [1.0 if i in relevant else 0.0 for i in ranking]
    out["recall"].append(sum(hits) / len(relevant))
    out["precision"].append(sum(hits) / k)
    dcg = sum(h / np.log2(j + 2) for j, h in enumerate(hits))
    idcg = sum(1 / np.log2(j + 2) for j in range(min(len(relevant), k)))
    out["ndcg"].append(dcg / idcg)
    ap, found = 0.0, 0
    for j, h in enumerate(hits):
      if h:
        found += 1
        ap += found / (j + 1)
    out["map"].append(ap / min(len(relevant), k))
  return {f"{name}@{k}": np.mean(v) for name, v in out.items()}


def random_case(seed, n_users=23, n_items=60, tie_levels=None):
  rng = np.random.default_rng(seed)
  if tie_levels:  # few distinct scores: many ties
    scores = rng.integers(0, tie_levels, size=(n_users, n_items)).astype(np.float32)
  else:
    scores = rng.normal(size=(n_users, n_items)).astype(np.float32)
  train, heldout = [], []
  for u in range(n_users):
    perm = rng.permutation(n_items)
    n_train, n_held = rng.integers(0, 10), rng.integers(0, 4)  # some users: 0 held-out, < K
    train.append(set(perm[:n_train].tolist()))
    heldout.append(set(perm[n_train:n_train + n_held].tolist()))
  return scores, train, heldout


def pairs_of(sets):
  return np.array([(u, i) for u, s in enumerate(sets) for i in sorted(s)], np.int32).reshape(-1, 2)


@pytest.mark.parametrize("seed,tie_levels,batch_size,edge_users",
                         [(0, None, 8, False), (1, None, 8, False), (2, 3, 8, False),
                          (3, 2, 8, False), (4, 2, 5, True), (5, None, 64, True),
                          (6, 3, 1, True)])
def test_metrics_match_brute_force(seed, tie_levels, batch_size, edge_users):
  scores, train, heldout = random_case(seed, tie_levels=tie_levels)
  if edge_users:  # one unseen item (-inf fills the top-k), no train items, many held out
    train[0], heldout[0] = set(range(scores.shape[1])) - {3}, {3}
    train[1], heldout[1] = set(), {0, 1, 2}
    train[2], heldout[2] = set(range(0, scores.shape[1], 2)), set(range(1, 40, 2))
  n_users, n_items = scores.shape
  ks = (1, 5, 10, 20)
  # Scores as user embeddings against identity item embeddings: user_emb @ I = scores.
  user_emb, item_emb = scores, np.eye(n_items, dtype=np.float32)
  data = evaluation.build_eval_data([pairs_of(heldout)], pairs_of(train), n_users, n_items,
                                    batch_size=batch_size)
  got = jax.jit(functools.partial(evaluation.evaluate_embeddings, ks=ks))(user_emb, item_emb, data)
  for k in ks:
    expected = brute_force_metrics(scores, train, heldout, k)
    for name, value in expected.items():
      np.testing.assert_allclose(float(got[name][0]), value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_two_splits_in_one_pass_match_separate_passes():
  scores, train, heldout = random_case(5)
  _, _, other = random_case(6)
  n_users, n_items = scores.shape
  bits = pairs_of(train)
  evaluate = jax.jit(functools.partial(evaluation.evaluate_embeddings, ks=(5, 10)))
  eye = np.eye(n_items, dtype=np.float32)
  both = evaluate(scores, eye, evaluation.build_eval_data(
      [pairs_of(heldout), pairs_of(other)], bits, n_users, n_items, 4))
  first = evaluate(scores, eye, evaluation.build_eval_data([pairs_of(heldout)], bits, n_users,
                                                           n_items, 4))
  second = evaluate(scores, eye, evaluation.build_eval_data([pairs_of(other)], bits, n_users,
                                                            n_items, 4))
  for name in both:
    np.testing.assert_allclose(both[name][0], first[name][0], rtol=1e-6)
    np.testing.assert_allclose(both[name][1], second[name][0], rtol=1e-6)


def test_perfect_ranking_scores_one():
  n_users, n_items = 5, 12
  heldout = [{u, u + 1} for u in range(n_users)]
  scores = np.zeros((n_users, n_items), np.float32)
  for u, s in enumerate(heldout):
    scores[u, list(s)] = 1.0
  bits = np.zeros((0, 2), np.int32)
  data = evaluation.build_eval_data([pairs_of(heldout)], bits, n_users, n_items, 4)
  got = evaluation.evaluate_embeddings(scores, np.eye(n_items, dtype=np.float32), data, (2, 5))
  for name in ("recall@2", "ndcg@2", "map@2", "precision@2", "recall@5", "ndcg@5"):
    chex.assert_trees_all_close(float(got[name][0]), 1.0)
  chex.assert_trees_all_close(float(got["precision@5"][0]), 0.4)


@pytest.mark.parametrize("n_items,n_blocks,k", [(103, 8, 10), (64, 4, 16), (10, 3, 10), (7, 8, 3)])
def test_two_stage_top_k_equals_one_top_k_with_ties_and_masked_items(n_items, n_blocks, k):
  rng = np.random.default_rng(n_items)
  scores = rng.integers(0, 5, size=(6, n_items)).astype(np.float32)  # many exact ties
  scores[rng.random(scores.shape) < 0.3] = -np.inf  # masked (seen) items
  scores[0] = -np.inf  # a row with nothing to rank
  expected = jax.lax.top_k(jnp.asarray(scores), k)[1]
  got = evaluation.two_stage_top_k(jnp.asarray(scores), k, n_blocks)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def numpy_top_items(scores, seen, k):
  """Stable descending sort with seen items at -inf: lax.top_k's order, ties to lower ids."""
  masked = np.where(seen, -np.inf, scores)
  return np.argsort(-masked, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("batch_size", [1, 4, 7, 32])
def test_block_rankings_equal_numpy_reference(batch_size):
  """Each batch's window of sparse pairs masks exactly its users' seen items: the rankings
  of every batch equal a NumPy ranking over a dense seen matrix, with ties, repeated pairs,
  a user with no seen item, a user with every item seen, and users with no held-out item
  (left out of the evaluation order, so their pairs must not leak into a batch)."""
  rng = np.random.default_rng(batch_size)
  n_users, n_items, k = 30, 25, 10
  scores = rng.integers(0, 3, (n_users, n_items)).astype(np.float32)  # many ties
  seen = rng.random((n_users, n_items)) < 0.3
  seen[0], seen[1] = True, False
  train = np.argwhere(seen)
  train = np.concatenate([train, train[::3]])  # repeated pairs
  heldout = np.argwhere(rng.random((n_users, n_items)) < 0.1)
  heldout = heldout[heldout[:, 0] % 5 != 2]  # users 2, 7, ... are not evaluated
  heldout = np.concatenate([heldout, [[0, 4], [1, 5]]])
  data = evaluation.build_eval_data([heldout], train, n_users, n_items, batch_size)

  @jax.jit
  def rank_batch(users, b, start):
    rows, items = evaluation.batch_pairs(data.train_slots, data.train_items, start, b,
                                         batch_size)
    top = evaluation.top_items(jnp.asarray(scores), jnp.eye(n_items), users, rows, items, k)
    rows, items = evaluation.batch_pairs(data.heldout_slots[0], data.heldout_items[0],
                                         data.heldout_start[0, b], b, batch_size)
    return top, evaluation.hits_of(top, rows, items)

  held = np.zeros((n_users, n_items), bool)
  held[heldout[:, 0], heldout[:, 1]] = True
  evaluated = np.unique(heldout[:, 0])
  for b in range(data.users.shape[0]):
    users = np.asarray(data.users[b])
    real = users[np.asarray(data.valid[b])]
    top, hits = rank_batch(data.users[b], b, data.train_start[b])
    want = numpy_top_items(scores[real], seen[real], k)
    np.testing.assert_array_equal(np.asarray(top)[:len(real)], want)
    np.testing.assert_array_equal(np.asarray(hits)[:len(real)],
                                  np.take_along_axis(held[real], want, axis=1))
  np.testing.assert_array_equal(np.asarray(data.users).ravel()[:len(evaluated)], evaluated)


def test_eval_data_grows_with_interactions_not_users_times_items():
  """100k pairs over 50k users x 200k items: the sparse rows are a few bytes per pair (a
  [users, items / 32] bit matrix would be 1.25 GB)."""
  rng = np.random.default_rng(0)
  n_users, n_items, n_pairs = 50_000, 200_000, 100_000
  train = np.stack([rng.integers(0, n_users, n_pairs), rng.integers(0, n_items, n_pairs)], 1)
  held = [np.stack([rng.integers(0, n_users, n_pairs // 10),
                    rng.integers(0, n_items, n_pairs // 10)], 1) for _ in range(2)]
  data = evaluation.build_eval_data(held, train, n_users, n_items, batch_size=4096)
  n_total = n_pairs + sum(len(h) for h in held)
  per_pair = (data.train_slots.nbytes + data.train_items.nbytes + data.heldout_slots.nbytes
              + data.heldout_items.nbytes) / n_total
  assert per_pair < 12, per_pair  # 8 bytes + two windows of padding
  assert evaluation.eval_data_bytes(data) < 16 * n_total + 20 * n_users


def test_seen_rows_and_csr_match_dense_rows():
  rng = np.random.default_rng(1)
  n_users, n_items = 9, 14
  pairs = np.stack([rng.integers(0, n_users, 50), rng.integers(0, n_items, 50)], 1)
  indptr, indices = evaluation.csr_of_pairs(pairs, n_users)
  dense = np.zeros((n_users, n_items), bool)
  dense[pairs[:, 0], pairs[:, 1]] = True
  np.testing.assert_array_equal(np.diff(indptr), dense.sum(1))
  users = np.array([3, 0, 3, 8], np.int32)  # repeated user
  rows, items = evaluation.seen_rows(indptr, indices, users, width=60)
  got = np.zeros((len(users) + 1, n_items), bool)
  got[rows, items] = True
  np.testing.assert_array_equal(got[:len(users)], dense[users])
  assert not got[len(users)].any() or (rows == len(users)).any()
  with pytest.raises(ValueError):
    evaluation.seen_rows(indptr, indices, users, width=1)
