"""Tests of data_pipeline.synthetic: exact paper counts, degrees, split, determinism, signal."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline import synthetic
from data_pipeline.ml100k import split_counts
from data_pipeline.mmrec_writer import TEST, TRAIN, VALID

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check_interactions(d):
  """Exact counts, no duplicate pairs, min degree 5, split rule with >= 1 valid and test."""
  users, items, labels = d["users"], d["items"], d["labels"]
  n_users, n_items = d["n_users"], d["n_items"]
  assert users.dtype == items.dtype == labels.dtype == np.int64
  assert len(users) == len(items) == len(labels) == d["n_interactions"]
  assert len(np.unique(users * n_items + items)) == len(users)
  udeg = np.bincount(users, minlength=n_users)
  ideg = np.bincount(items, minlength=n_items)
  assert udeg.min() >= 5 and ideg.min() >= 5
  n_valid, n_test = split_counts(udeg)
  np.testing.assert_array_equal(np.bincount(users[labels == TEST], minlength=n_users), n_test)
  np.testing.assert_array_equal(np.bincount(users[labels == VALID], minlength=n_users), n_valid)
  assert np.bincount(users[labels == TRAIN], minlength=n_users).min() >= 3
  assert n_test.min() >= 1 and n_valid.min() >= 1


def test_baby_full_scale_interactions():
  d = synthetic.generate("baby", seed=0, features=False)
  assert (d["n_users"], d["n_items"], d["n_interactions"]) == (19445, 7050, 160792)
  assert d["users"].max() + 1 == 19445 and d["items"].max() + 1 == 7050
  check_interactions(d)
  assert "image" not in d and "text" not in d
  # popularity skew: the most popular items are far above the mean degree
  ideg = np.bincount(d["items"])
  assert ideg.max() > 8 * ideg.mean()


@pytest.mark.parametrize("like", sorted(synthetic.PAPER_COUNTS))
def test_small_scale_counts_are_proportional(like):
  d = synthetic.generate(like, seed=1, scale=0.03, features=False)
  expected = tuple(int(round(c * 0.03)) for c in synthetic.PAPER_COUNTS[like])
  assert (d["n_users"], d["n_items"], d["n_interactions"]) == expected
  check_interactions(d)


@pytest.fixture(scope="module")
def small():
  return synthetic.generate("baby", seed=0, scale=0.06)


def test_features_shapes_and_dtypes(small):
  n = small["n_items"]
  assert small["image"].shape == (n, 4096) and small["text"].shape == (n, 384)
  for m in ("image", "text"):
    assert small[m].dtype == np.float32 and np.all(np.isfinite(small[m]))
  assert small["item_noise"].shape == (n, 2) and small["item_noise"].min() > 0
  assert small["item_latent"].shape == (n, synthetic.DEFAULT_PARAMS["latent_dim"])


def test_deterministic_by_seed(small):
  again = synthetic.generate("baby", seed=0, scale=0.06)
  for key in ("users", "items", "labels", "image", "text", "item_noise"):
    np.testing.assert_array_equal(small[key], again[key])
  other = synthetic.generate("baby", seed=1, scale=0.06, features=False)
  assert not np.array_equal(small["items"], other["items"])
  # the feature draws use their own streams: skipping them leaves the interactions unchanged
  plain = synthetic.generate("baby", seed=0, scale=0.06, features=False)
  np.testing.assert_array_equal(small["items"], plain["items"])


def alignment_error(x, q):
  """Per item, how far the latent factor read back from the features is from the true one.

  The map is estimated by least squares from all items (as a user could), then inverted.
  """
  x, q = x.astype(np.float64), q.astype(np.float64)
  w, *_ = np.linalg.lstsq(q, x, rcond=None)  # q w ~ x
  q_hat = np.linalg.lstsq(w.T, x.T, rcond=None)[0].T
  return np.linalg.norm(q_hat - q, axis=1) / np.sqrt(q.shape[1])


def test_features_carry_latent_with_item_specific_noise(small):
  q, noise = small["item_latent"], small["item_noise"]
  err = {m: alignment_error(small[m], q) for m in ("image", "text")}
  for col, m in enumerate(("image", "text")):
    assert np.corrcoef(err[m], noise[:, col])[0, 1] > 0.9
  # Both kinds of item exist, and the features tell which modality is the cleaner one.
  image_cleaner = noise[:, 0] < noise[:, 1]
  assert 0.3 < image_cleaner.mean() < 0.7
  clear = np.abs(noise[:, 0] - noise[:, 1]) > 0.5
  agree = (err["image"] < err["text"]) == image_cleaner
  assert agree[clear].mean() > 0.95


def test_interactions_follow_preferences(small):
  # Held items score higher under the true affinity than random items do.
  p, q = small["user_latent"], small["item_latent"]
  held = np.einsum("nk,nk->n", p[small["users"]], q[small["items"]])
  rng = np.random.default_rng(0)
  rand = np.einsum("nk,nk->n", p[small["users"]], q[rng.integers(0, len(q), len(held))])
  assert held.mean() > rand.mean() + 1.0


def test_infeasible_counts_raise():
  with pytest.raises(ValueError):
    synthetic.generate("baby", scale=0.0001, features=False)
  with pytest.raises(ValueError, match="unknown"):
    synthetic.generate("books")


def test_cli_writes_mmrec_folder(tmp_path):
  out = tmp_path / "baby"
  env = {**os.environ, "PYTHONPATH": REPO}
  proc = subprocess.run([sys.executable, "-m", "data_pipeline.synthetic", "--like", "baby",
                         "--out", str(out), "--seed", "3", "--scale", "0.02"],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr
  d = synthetic.generate("baby", seed=3, scale=0.02)
  with open(out / "baby.inter") as f:
    assert f.readline() == "userID\titemID\tx_label\n"
  table = np.loadtxt(out / "baby.inter", dtype=np.int64, skiprows=1)
  np.testing.assert_array_equal(table, np.stack([d["users"], d["items"], d["labels"]], 1))
  np.testing.assert_array_equal(np.load(out / "image_feat.npy"), d["image"])
  np.testing.assert_array_equal(np.load(out / "text_feat.npy"), d["text"])
  np.testing.assert_array_equal(np.load(out / "item_noise.npy"), d["item_noise"])
  with open(out / "metadata.json") as f:
    meta = json.load(f)
  assert (meta["n_users"], meta["n_items"], meta["n_interactions"]) == (
      d["n_users"], d["n_items"], d["n_interactions"])
  assert meta["paper_counts"]["n_users"] == 19445 and meta["params"]["latent_dim"] == 32
  assert meta["n_train"] + meta["n_valid"] + meta["n_test"] == d["n_interactions"]


def topk(logits, k, rng):
  logits = np.asarray(logits, np.float32)
  return synthetic._gumbel_topk(logits, np.asarray(k), rng, np.empty_like(logits),
                                np.empty_like(logits))


def test_gumbel_topk_samples_the_softmax():
  n = 20000
  logits = np.tile(np.log([0.5, 0.3, 0.2, 1.0]), (n, 1))
  logits[:, 3] = -np.inf  # never drawn
  rows, cols = topk(logits, np.ones(n, np.int64), np.random.default_rng(0))
  np.testing.assert_array_equal(rows, np.arange(n))
  np.testing.assert_allclose(np.bincount(cols, minlength=4) / n, [0.5, 0.3, 0.2, 0], atol=0.015)
  k = np.array([0, 1, 2, 3] * 50)
  rows, cols = topk(logits[:200], k, np.random.default_rng(1))
  np.testing.assert_array_equal(np.bincount(rows, minlength=200), k)
  assert not np.any(cols == 3)
  assert len(np.unique(rows * 4 + cols)) == len(rows)


def test_gumbel_topk_exact_count_under_ties():
  class Constant:  # every key ties: the threshold test alone would take whole rows
    def standard_exponential(self, out, dtype):
      out[...] = 1.0

  rows, cols = topk(np.zeros((3, 6)), np.array([2, 0, 5]), Constant())
  assert rows.tolist() == [0, 0, 2, 2, 2, 2, 2]
  assert cols.tolist() == [0, 1, 0, 1, 2, 3, 4]
