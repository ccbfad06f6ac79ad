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


@pytest.mark.parametrize("seed,tie_levels", [(0, None), (1, None), (2, 3), (3, 2)])
def test_metrics_match_brute_force(seed, tie_levels):
  scores, train, heldout = random_case(seed, tie_levels=tie_levels)
  n_users, n_items = scores.shape
  ks = (1, 5, 10, 20)
  # Scores as user embeddings against identity item embeddings: user_emb @ I = scores.
  user_emb, item_emb = scores, np.eye(n_items, dtype=np.float32)
  train_bits = evaluation.interaction_bitmask(pairs_of(train), n_users, n_items)
  data = evaluation.build_eval_data([pairs_of(heldout)], train_bits, n_users, n_items,
                                    batch_size=8)
  got = jax.jit(functools.partial(evaluation.evaluate_embeddings, ks=ks))(user_emb, item_emb, data)
  for k in ks:
    expected = brute_force_metrics(scores, train, heldout, k)
    for name, value in expected.items():
      np.testing.assert_allclose(float(got[name][0]), value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_two_splits_in_one_pass_match_separate_passes():
  scores, train, heldout = random_case(5)
  _, _, other = random_case(6)
  n_users, n_items = scores.shape
  bits = evaluation.interaction_bitmask(pairs_of(train), n_users, n_items)
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
  bits = evaluation.interaction_bitmask(np.zeros((0, 2), np.int32), n_users, n_items)
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
