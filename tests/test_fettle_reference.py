"""The fast path (fettle/fast.py, the default) equals the reference (fettle/equations.py).

For every term of Eq. 11 (L^ILA, L^DT, L_ITV^CLA, L_UI^CLA): its value, and its gradient with
respect to the backbone's representations and every alignment parameter, on every branch
and size switch of the fast path: the unique-item buffer found by a catalogue pass or a
sort; L_UI^CLA's users as unique rows or one row per pair; L_ITV^CLA's targets as [U, P]
arrays or code mixtures; Sinkhorn's kernel reused from the prediction's exps (lambda_c / eps
an integer) or computed anew; each prefix branch (common, typical, whole buffer); ILA's
second minority chunk taken or skipped; pairwise / topmost / bidirectional directions;
batch / all negatives; dot / cosine feedback and DT; |M| = 1, 2, 3, 4; under jax.vmap.
The reference itself is checked against NumPy loops in tests/test_alignment.py.

Tolerance (float32, the same parameters and inputs): values and gradients agree to
rtol 1e-4, atol 1e-5. The paths differ only in exact rewrites (an item's mean user, exps
shifted by the cosines' bound, codes kept as Sinkhorn's factors) and summation order.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fettle_jax.alignment import fettle
from fettle_jax.alignment.fettle import equations, fast, fast_clusters, shapes
from test_alignment import make_config, make_problem

TOL = dict(rtol=1e-4, atol=1e-5)
ONE_HOT = jnp.eye(len(equations.TERMS))  # row t: weight 1 on term t, 0 elsewhere


def fast_weighted(params, reps, weights, features, batch, config):
  cfg, hints = config.fettle, shapes.shape_hints(config)
  inputs, index, layout = fast.prepare_terms(params, reps, features, batch, cfg, hints)
  return fast.alignment_terms(inputs, index, layout, cfg,
                              dict(zip(equations.TERMS, weights)), hints)


def reference_weighted(params, reps, weights, features, batch, config):
  terms = equations.alignment_terms(params, reps, features, batch, config.fettle)
  return sum(w * terms[t] for w, t in zip(weights, equations.TERMS)), terms


def per_term(weighted, params, reps, features, batch, config):
  """Each term's value and its gradient w.r.t. (params, reps), stacked over the terms."""
  fn = functools.partial(weighted, features=features, batch=batch, config=config)
  (_, terms), grads = jax.jit(jax.vmap(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True),
                                       in_axes=(None, None, 0)))(params, reps, ONE_HOT)
  return {t: terms[t][0] for t in equations.TERMS}, grads


def assert_equal_paths(data, cfg):
  """Fast == reference, term by term, values and gradients; returns the terms."""
  data_info, reps, features, batch = data
  params = fettle.init(jax.random.PRNGKey(0), data_info, cfg)
  fast_terms, fast_grads = per_term(fast_weighted, params, reps, features, batch, cfg)
  ref_terms, ref_grads = per_term(reference_weighted, params, reps, features, batch, cfg)
  chex.assert_trees_all_close(fast_terms, ref_terms, **TOL)
  chex.assert_trees_all_close(fast_grads, ref_grads, **TOL)
  return ref_terms


def with_hints(cfg, **hints):
  cfg.fettle_shapes = shapes.default_shape_hints()
  cfg.fettle_shapes.update(hints)
  return cfg


def taken_branch(data, cfg):
  """The fast path's branch (shapes.Bucket) and whether users are unique rows."""
  data_info, reps, features, batch = data
  params = fettle.init(jax.random.PRNGKey(0), data_info, cfg)
  hints = shapes.shape_hints(cfg)
  inputs, index, _ = fast.prepare_terms(params, reps, features, batch, cfg.fettle, hints)
  unique_users = index.user_counts is not None
  ladder = shapes.buckets(index.valid.shape[0], inputs.users.shape[0],
                          *shapes.static_bucket_hints(hints, unique_users))
  n_items = int(np.sum(np.asarray(index.valid)))
  n_users = (inputs.users.shape[0] if not unique_users
             else int(np.sum(np.asarray(index.user_counts) > 0)))
  chosen = next(b for b in ladder if n_items <= b.items and n_users <= b.users)
  return chosen, ladder, unique_users, index


def second_minority_chunk(index, n_rows):
  """Per unordered modality pair: does ILA run its second minority chunk on this batch?"""
  directions = np.asarray(equations.alignment_directions(index.scores[:n_rows],
                                                         index.valid[:n_rows]))
  capacity = max(n_rows // 2, 1)
  chunk = -(-capacity // 2)
  taken = []
  for m in range(directions.shape[1]):
    for n in range(m + 1, directions.shape[1]):
      to_second = int(directions[:, m, n].sum())
      minority = to_second if 2 * to_second < n_rows else n_rows - to_second
      taken.append(minority > chunk)
  return taken


# make_problem: 16 pairs, 10 users and 9 items by default (unique users: fewer users than
# pairs; catalogue pass: fewer than 16 ids per pair; [U, P] targets: small arrays).
CASES = {
    # |M| = 3, every default switch; catalogue pass, unique users, dense targets, reused
    # kernel (lambda_c = eps), whole buffer.
    "defaults": (dict(seed=6), dict()),
    # Sort (300 ids > 16 per pair), users per pair (40 > 16 pairs), code-mixture targets
    # (patched size limit below), a kernel computed anew (0.07 / 0.05), all negatives, |M| = 2.
    "sort_pair_users_mixtures_all_negatives": (
        dict(seed=3, n_users=40, n_items=300, feature_dims={"image": 12}),
        dict(temperature_cluster=0.07, ila_negatives="all")),
    # Topmost directions, the kernel as the prediction's exps squared (0.1 = 2 x 0.05),
    # DT as printed (dot), |M| = 4.
    "topmost_squared_kernel_dot_dt_four_modalities": (
        dict(seed=7, feature_dims={"audio": 5, "image": 12, "text": 6}),
        dict(directions="topmost", temperature_cluster=0.1, dt_similarity="dot")),
    # Bidirectional alignment, cosine feedback, Sinkhorn without a round.
    "bidirectional_cosine_feedback_no_sinkhorn_round": (
        dict(seed=6), dict(bidirectional_threshold=0.1, feedback="cosine",
                           sinkhorn_iterations=0)),
    # A backbone's own modality embedding, ILA and CLA off (DT alone).
    "backbone_modality_dt_only": (
        dict(seed=9, backbone_modalities=("image",)), dict(use_ila=False, use_cla=False)),
    # |M| = 1: L_UI^CLA only.
    "one_modality": (dict(seed=8, feature_dims={}), dict()),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_path_equals_reference(case, monkeypatch):
  problem, overrides = CASES[case]
  data = make_problem(**problem)
  cfg = make_config(**overrides)
  if "mixtures" in case:
    monkeypatch.setattr(fast_clusters, "_DENSE_TARGETS_MAX_BYTES", 0)
  _, _, unique_users, index = taken_branch(data, cfg)
  assert unique_users == (problem.get("n_users", 10) < 16)
  terms = assert_equal_paths(data, cfg)
  n_modalities = len(problem.get("feature_dims", {"image": 12, "text": 6})) + 1
  if n_modalities >= 2:
    on = {"ila": overrides.get("use_ila", True), "dt": overrides.get("use_dt", True),
          "cla_itv": overrides.get("use_cla", True)}
    assert all(abs(float(terms[t])) > 1e-4 for t, enabled in on.items() if enabled)
  if case == "defaults":  # the ILA minority chunk: run on some pairs, skipped on others
    taken = second_minority_chunk(index, index.valid.shape[0])
    assert any(taken) and not all(taken), taken


# make_problem(seed=6): 5 unique items in 9 slots and 7 distinct users of 10. Each set of
# hints sends the batch to a different one of up to three branches.
BRANCHES = {
    "common": dict(typical_batch_items=7, typical_batch_users=10, common_batch_items=5,
                   common_batch_users=9),
    # The common branch holds the items, too few users (6 < 7): on to the typical one.
    "typical": dict(typical_batch_items=6, typical_batch_users=10, common_batch_items=5,
                    common_batch_users=6),
    "whole_buffer": dict(typical_batch_items=4, typical_batch_users=10, common_batch_items=3,
                         common_batch_users=9),
}


@pytest.mark.parametrize("branch", sorted(BRANCHES))
def test_each_prefix_branch_equals_reference(branch):
  data = make_problem(seed=6)
  cfg = with_hints(make_config(), **BRANCHES[branch])
  chosen, ladder, _, _ = taken_branch(data, cfg)
  expected = {"common": 0, "typical": 1, "whole_buffer": 2}
  assert len(ladder) >= 2 and ladder.index(chosen) == expected[branch], (ladder, chosen)
  assert_equal_paths(data, cfg)


def test_joint_branch_under_vmap_equals_reference_per_example():
  """vmapped over batches (as a grid vmaps settings) the fast path runs one branch, the
  one that holds every batch's rows, and each batch's terms still equal the reference's."""
  data_info, reps, features, _ = make_problem(seed=6)
  cfg = with_hints(make_config(), typical_batch_items=6, typical_batch_users=10,
                   common_batch_items=4, common_batch_users=9)
  # Alone, the batches take different branches (5 and 4 unique items): typical and common.
  alone = [taken_branch(make_problem(seed=s), cfg)[:2] for s in (6, 7)]
  assert [ladder.index(chosen) for chosen, ladder in alone] == [1, 0]
  batches = [make_problem(seed=s)[3] for s in (6, 7)]
  params = fettle.init(jax.random.PRNGKey(0), data_info, cfg)
  stacked = jax.tree_util.tree_map(lambda *b: jnp.stack(b), *batches)

  def fast_loss(params, reps, batch):
    return fast.loss(params, reps, features, batch, None, cfg)

  (totals, terms), grads = jax.jit(jax.vmap(jax.value_and_grad(fast_loss, argnums=(0, 1),
                                                               has_aux=True),
                                            in_axes=(None, None, 0)))(params, reps, stacked)
  jaxpr = str(jax.make_jaxpr(jax.vmap(fast_loss, in_axes=(None, None, 0)))(params, reps,
                                                                           stacked))
  # A batched branch index would turn the switch into a select over every branch's outputs
  # (no cond left); the joint index keeps one cond.
  assert "cond[" in jaxpr
  for k, batch in enumerate(batches):
    (want_total, want_terms), want_grads = jax.jit(jax.value_and_grad(
        lambda p, r, b=batch: equations.loss(p, r, features, b, None, cfg), argnums=(0, 1),
        has_aux=True))(params, reps)
    pick = functools.partial(jax.tree_util.tree_map, lambda x, k=k: x[k])
    chex.assert_trees_all_close(totals[k], want_total, **TOL)
    chex.assert_trees_all_close(pick(terms), want_terms, **TOL)
    chex.assert_trees_all_close(pick(grads), want_grads, **TOL)


def test_implementation_switch_picks_the_module_and_is_checked():
  cfg = make_config()
  assert fettle.implementation(cfg.fettle) is fast
  cfg.fettle.implementation = "reference"
  assert fettle.implementation(cfg.fettle) is equations
  cfg.fettle.implementation = "slow"
  with pytest.raises(ValueError, match="fettle.implementation"):
    fettle.check_config(cfg.fettle)
