"""Shared losses against NumPy references written from their papers' formulas."""

import math

import chex
import jax.numpy as jnp
import numpy as np

from fettle_jax import losses

TOL = dict(rtol=1e-5, atol=1e-6)


def unit(v):
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_info_nce_matches_reference_with_masked_keys():
  rng = np.random.default_rng(0)
  queries, keys = rng.normal(size=(5, 4)), rng.normal(size=(7, 4))
  positive = np.array([0, 3, 2, 6, 1])
  mask = np.array([1, 1, 1, 1, 0, 1, 1], bool)
  t = 0.2
  expected = []
  for q, p in zip(queries, positive):
    logits = [unit(q) @ unit(k) / t for k, m in zip(keys, mask) if m]
    expected.append(math.log(sum(math.exp(v) for v in logits)) - unit(q) @ unit(keys[p]) / t)
  got = losses.info_nce_loss(jnp.asarray(queries, jnp.float32), jnp.asarray(keys, jnp.float32),
                             jnp.asarray(positive), jnp.asarray(mask), t)
  chex.assert_trees_all_close(got, np.asarray(expected, np.float32), **TOL)


def test_alignment_and_uniformity_match_directau_reference():
  rng = np.random.default_rng(1)
  users, items = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
  expected_align = np.mean(np.sum((unit(users) - unit(items)) ** 2, axis=1))
  x = unit(users)
  potentials = [math.exp(-2 * np.sum((x[a] - x[b]) ** 2)) for a in range(6) for b in range(a + 1, 6)]
  expected_uniform = math.log(np.mean(potentials))
  chex.assert_trees_all_close(losses.alignment_loss(jnp.asarray(users), jnp.asarray(items)),
                              np.float32(expected_align), **TOL)
  chex.assert_trees_all_close(losses.uniformity_loss(jnp.asarray(users)),
                              np.float32(expected_uniform), **TOL)


def test_bpr_and_cosine_distance():
  rng = np.random.default_rng(2)
  u, p, n = (rng.normal(size=(4, 3)) for _ in range(3))
  expected = np.mean(np.log1p(np.exp(-np.sum(u * (p - n), axis=1))))
  chex.assert_trees_all_close(losses.bpr_loss(u, p, n), np.float32(expected), **TOL)
  chex.assert_trees_all_close(losses.cosine_distance(jnp.asarray(u), jnp.asarray(p)),
                              1 - np.sum(unit(u) * unit(p), axis=1).astype(np.float32), **TOL)
