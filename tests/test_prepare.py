"""Tests of data_pipeline.prepare / data_pipeline.ml100k: split rule, features, cache, real data."""

import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import types
import zipfile
import zlib

import numpy as np
import pytest

from data_pipeline import ml100k
from data_pipeline import wheels
from data_pipeline import prepare as prep
from data_pipeline.errors import DataError
from data_pipeline.mmrec_writer import TEST, TRAIN, VALID

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeEncoder:
  """Deterministic stand-in for MiniLMEncoder: a seeded vector per sentence; records its input."""

  def __init__(self, dim=384):
    self.dim, self.seen = dim, None

  def encode(self, sentences, progress=False):
    self.seen = list(sentences)
    return np.stack([np.random.default_rng(zlib.crc32(s.encode())).standard_normal(self.dim)
                     for s in sentences]).astype(np.float32)


def quiet(_):
  pass


# ----------------------------------------------------------------------------- split rule


def test_split_counts_rule():
  n = np.array([1, 2, 3, 5, 14, 15, 20, 24, 25, 35, 100])
  n_valid, n_test = ml100k.split_counts(n)
  # max(1, n/10 rounded half up); tiny users fill test first, then valid.
  np.testing.assert_array_equal(n_test, [1, 1, 1, 1, 1, 2, 2, 2, 3, 4, 10])
  np.testing.assert_array_equal(n_valid, [0, 1, 1, 1, 1, 2, 2, 2, 3, 4, 10])


def test_chronological_split_handmade():
  # user 0: 10 interactions, the two latest share a timestamp (tie broken by item id).
  # user 1: 3 interactions -> one each. user 2: 25 -> 3 test, 3 valid (2.5 rounds up).
  rows = [(0, item, ts) for item, ts in [(5, 100), (4, 200), (3, 300), (9, 400), (8, 500),
                                         (2, 600), (1, 700), (0, 800), (7, 900), (6, 900)]]
  rows += [(1, 3, 50), (1, 1, 10), (1, 2, 30)]
  rows += [(2, item, 1000 - item) for item in range(25)]  # item 0 is the latest
  rng = np.random.default_rng(0)
  rows = [rows[i] for i in rng.permutation(len(rows))]  # input order must not matter
  users, items, stamps = (np.array(c) for c in zip(*rows))
  labels = ml100k.chronological_split(users, items, stamps)
  got = {(u, i): l for u, i, l in zip(users, items, labels)}
  assert got[(0, 7)] == TEST  # ts 900 ties with item 6; item 7 sorts after
  assert got[(0, 6)] == VALID
  assert all(got[(0, i)] == TRAIN for i in (5, 4, 3, 9, 8, 2, 1, 0))
  assert [got[(1, i)] for i in (1, 2, 3)] == [TRAIN, VALID, TEST]
  assert {i for i in range(25) if got[(2, i)] == TEST} == {0, 1, 2}
  assert {i for i in range(25) if got[(2, i)] == VALID} == {3, 4, 5}


def test_split_by_order_rejects_ungrouped_order():
  with pytest.raises(ValueError):
    ml100k.split_by_order(np.array([0, 1, 0]), np.array([1, 0, 2]))


# ----------------------------------------------------------------------------- text


def test_item_title_and_sentence():
  assert ml100k.item_title("Toy Story", "1995") == "Toy Story (1995)"
  # item 1412: the year field is "V" and the year already ends the title
  title = "Land Before Time III: The Time of the Great Giving (1995)"
  assert ml100k.item_title(title, "V") == title
  assert ml100k.item_title(title, "1995") == title
  assert ml100k.item_title("unkonwn", "unkonwn") == "Unknown title"
  assert (ml100k.item_sentence("Toy Story (1995)", ["Animation", "Children's", "Comedy"])
          == "Toy Story (1995). Genres: Animation, Children's, Comedy.")
  assert ml100k.item_sentence("M*A*S*H (1970)", []) == "M*A*S*H (1970)."
  assert ml100k.item_sentence("When Harry Met Sally...", ["Comedy"]) == (
      "When Harry Met Sally... Genres: Comedy.")


# ----------------------------------------------------------------------------- kg


LINK = "item_id:token\tentity_id:token\n" + "".join(
    f"{i}\te{i}\n" for i in ("1", "2", "3", "5", "99"))  # item 4 has no link; 99 is not rated
KG = "head_id:token\trelation_id:token\ttail_id:token\n" + "".join(
    f"{h}\t{r}\t{t}\n" for h, r, t in [
        ("e1", "genre", "g1"), ("e1", "actor", "a1"), ("e1", "actor", "a2"),
        ("e2", "genre", "g1"), ("e2", "actor", "a1"), ("e2", "actor", "only2"),
        ("e3", "actor", "only3"),  # item 3: only an unshared attribute -> mean row
        ("e5", "genre", "g1"), ("e5", "actor", "a2"), ("e5", "genre", "g2"),
        ("e99", "genre", "g2"),  # an unrated item still counts towards nothing
        ("g1", "genre_of", "e1"),  # a reversed edge: head is not an item, ignored
    ])


def reference_tfidf(raw_items):
  """The kg TF-IDF rows written out by hand from the documented rule."""
  cols = [("actor", "a1"), ("actor", "a2"), ("genre", "g1")]  # df >= 2 among rated items
  has = {"1": {0, 1, 2}, "2": {0, 2}, "5": {1, 2}}
  df = np.array([2, 2, 3])
  n = len(raw_items)
  idf = np.log((1 + n) / (1 + df)) + 1
  x = np.zeros((n, len(cols)))
  for k, raw in enumerate(raw_items):
    for c in has.get(raw, ()):
      x[k, c] = idf[c]
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def test_kg_features_match_reference():
  raw_items = ["1", "2", "3", "4", "5"]
  feat, stats = ml100k.kg_features(LINK, KG, raw_items, dim=8)
  assert feat.shape == (5, 8) and feat.dtype == np.float32 and np.all(np.isfinite(feat))
  x = reference_tfidf(raw_items)
  has = [0, 1, 4]
  # Full-rank SVD embedding reproduces the rows' Gram matrix; rank 3 < dim 8 pads with zeros.
  np.testing.assert_allclose(feat[has] @ feat[has].T, x[has] @ x[has].T, atol=1e-6)
  np.testing.assert_array_equal(feat[:, 3:], 0)
  for k in (2, 3):  # item 3 (only unshared attributes) and item 4 (no link)
    np.testing.assert_allclose(feat[k], feat[has].mean(axis=0), atol=1e-7)
  assert stats["n_columns_kept"] == 3 and stats["n_items_filled_with_mean"] == 2
  assert stats["n_linked_items"] == 4 and stats["svd_rank_used"] == 3


def test_kg_features_truncation_is_best_rank_k():
  raw_items = ["1", "2", "3", "4", "5"]
  feat, _ = ml100k.kg_features(LINK, KG, raw_items, dim=1)
  x = reference_tfidf(raw_items)[[0, 1, 4]]
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  np.testing.assert_allclose(np.abs(feat[[0, 1, 4], 0]), np.abs(u[:, 0] * s[0]), atol=1e-6)
  again, _ = ml100k.kg_features(LINK, KG, raw_items, dim=1)
  np.testing.assert_array_equal(feat, again)  # deterministic, signs included


# ----------------------------------------------------------------------------- fake wheel


def make_wheel(path):
  """A wheel-shaped zip with a tiny ml-100k: raw ids chosen so string order != numeric order."""
  inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
  rng = np.random.default_rng(0)
  for u in ("10", "2", "7"):
    for item in ("1", "2", "3", "4", "5"):
      inter.append(f"{u}\t{item}\t{rng.integers(1, 6)}\t{rng.integers(8e8, 9e8)}")
  item = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
          "1\tToy Story\t1995\tAnimation Children's Comedy", "2\tGoldenEye\t1995\tAction",
          "3\tunkonwn\tunkonwn\tunknown", "4\tFour Rooms (1995)\tV\tThriller",
          "5\tCérémonie, La\t1995\tDrama", "6\tNever Rated\t1990\tDrama"]
  with zipfile.ZipFile(path, "w") as z:
    for ext, text in (("inter", "\n".join(inter) + "\n"), ("item", "\n".join(item) + "\n"),
                      ("kg", KG), ("link", LINK)):
      z.writestr(f"{ml100k.ZIP_DIR}ml-100k.{ext}", text.encode("utf-8"))
  return path


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
  wheel = make_wheel(str(tmp_path / "fake.whl"))
  calls = []

  def fetch(cache_dir, log=print):
    calls.append(cache_dir)
    return wheel

  monkeypatch.setattr(ml100k, "fetch_wheel", fetch)
  return calls


def test_prepare_on_fake_wheel(tmp_path, fake_wheel):
  enc = FakeEncoder()
  out = prep.prepare("ml100k", str(tmp_path / "root"), encoder=enc, log=quiet)
  assert out == str(tmp_path / "root" / "ml100k")
  assert fake_wheel == [str(tmp_path / "root" / "downloads")]
  for f in ("ml100k.inter", "text_feat.npy", "kg_feat.npy", "items.csv", "users.csv",
            "README.md", "metadata.json", prep.COMPLETE):
    assert os.path.exists(os.path.join(out, f)), f
  table = np.loadtxt(os.path.join(out, "ml100k.inter"), dtype=np.int64, skiprows=1)
  assert table.shape == (15, 3)
  assert set(table[:, 0]) == {0, 1, 2} and set(table[:, 1]) == {0, 1, 2, 3, 4}
  assert np.bincount(table[:, 2]).tolist() == [9, 3, 3]  # 5 each: 3 train, 1 valid, 1 test
  with open(os.path.join(out, "users.csv")) as f:
    assert [r["raw_user_id"] for r in csv.DictReader(f)] == ["2", "7", "10"]  # numeric order
  with open(os.path.join(out, "items.csv"), encoding="utf-8") as f:
    sentences = [r["sentence"] for r in csv.DictReader(f)]
  assert sentences == enc.seen
  assert sentences == ["Toy Story (1995). Genres: Animation, Children's, Comedy.",
                       "GoldenEye (1995). Genres: Action.", "Unknown title. Genres: unknown.",
                       "Four Rooms (1995). Genres: Thriller.",
                       "Cérémonie, La (1995). Genres: Drama."]
  text = np.load(os.path.join(out, "text_feat.npy"))
  np.testing.assert_allclose(text, enc.encode(sentences))
  kg = np.load(os.path.join(out, "kg_feat.npy"))
  assert kg.shape == (5, ml100k.KG_DIM) and kg.dtype == np.float32
  with open(os.path.join(out, "metadata.json")) as f:
    meta = json.load(f)
  assert (meta["n_users"], meta["n_items"], meta["n_interactions"]) == (3, 5, 15)
  assert not glob.glob(str(tmp_path / "root" / ".ml100k.tmp-*"))


def test_second_call_does_nothing(tmp_path, fake_wheel, monkeypatch):
  root = str(tmp_path / "root")
  out = prep.prepare("ml100k", root, encoder=FakeEncoder(), log=quiet)
  before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}

  def boom(*args, **kwargs):
    raise AssertionError("rebuilt a complete data set")

  monkeypatch.setattr(ml100k, "fetch_wheel", boom)
  monkeypatch.setitem(prep.BUILDERS, "ml100k", boom)
  logs = []
  assert prep.prepare("ml100k", root, log=logs.append) == out
  assert "already prepared" in logs[0]
  assert before == {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}


def test_incomplete_output_is_rebuilt(tmp_path, fake_wheel):
  root = tmp_path / "root"
  (root / "ml100k").mkdir(parents=True)
  (root / "ml100k" / "ml100k.inter").write_text("half a file")
  stale = root / ".ml100k.tmp-999999999"  # left by a killed run (no such process)
  stale.mkdir()
  out = prep.prepare("ml100k", str(root), encoder=FakeEncoder(), log=quiet)
  assert prep.is_complete(out)
  assert open(os.path.join(out, "ml100k.inter")).readline() == "userID\titemID\tx_label\n"
  assert not stale.exists()


def test_failed_build_leaves_nothing(tmp_path, fake_wheel):
  class Broken:
    def encode(self, sentences, progress=False):
      return np.zeros((len(sentences) - 1, 384), np.float32)

  root = tmp_path / "root"
  with pytest.raises(DataError, match="text encoder returned shape"):
    prep.prepare("ml100k", str(root), encoder=Broken(), log=quiet)
  assert not (root / "ml100k").exists()
  assert not glob.glob(str(root / ".ml100k.tmp-*"))


def test_unknown_name():
  with pytest.raises(DataError, match="unknown data set"):
    prep.prepare("ml1m", "/nonexistent", log=quiet)


def test_data_root_precedence(monkeypatch, tmp_path):
  monkeypatch.setenv(wheels.ENV_ROOT, str(tmp_path / "env"))
  assert prep.data_root() == str(tmp_path / "env")
  assert prep.data_root(str(tmp_path / "arg")) == str(tmp_path / "arg")
  monkeypatch.delenv(wheels.ENV_ROOT)
  assert prep.data_root() == os.path.expanduser("~/.cache/fettle_jax")


# ----------------------------------------------------------------------------- download


def test_download_failure_is_one_line_data_error(tmp_path, monkeypatch):
  def fail(cmd, **kwargs):
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"] and "--no-deps" in cmd
    err = "ERROR: No matching distribution found for recbole==1.2.1\n"
    return types.SimpleNamespace(returncode=1, stdout="", stderr=err)

  monkeypatch.setattr(wheels.subprocess, "run", fail)
  with pytest.raises(DataError) as e:
    ml100k.fetch_wheel(str(tmp_path), log=quiet)
  msg = str(e.value)
  assert "\n" not in msg and "no network" in msg and "No matching distribution" in msg
  assert os.path.join(str(tmp_path), ml100k.WHEEL_NAME) in msg
  assert os.listdir(tmp_path) == []  # the private download folder is gone


def test_wrong_wheel_is_rejected(tmp_path, monkeypatch):
  (tmp_path / ml100k.WHEEL_NAME).write_bytes(b"not the wheel")
  monkeypatch.setattr(wheels.subprocess, "run", lambda *a, **k: pytest.fail("downloaded again"))
  with pytest.raises(DataError, match="sha256"):
    ml100k.fetch_wheel(str(tmp_path), log=quiet)


def test_cli_prints_path_of_prepared_folder(tmp_path):
  out = tmp_path / "ml100k"
  out.mkdir()
  (out / prep.COMPLETE).write_text("complete\n")
  env = {**os.environ, "PYTHONPATH": REPO}
  proc = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", "ml100k", "--root",
                         str(tmp_path)], capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines()[-1] == str(out)
  proc = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", "nope", "--root",
                         str(tmp_path)], capture_output=True, text=True, env=env, cwd=REPO,
                        timeout=120)
  assert proc.returncode != 0 and "error: unknown data set 'nope'" in proc.stderr


# ----------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def real(tmp_path_factory):
  """The real ml100k, prepared once with a fake text encoder (the MiniLM one is tested apart).

  Needs the RecBole wheel: reused from the user's cache when there, else downloaded (~2 MB).
  """
  root = tmp_path_factory.mktemp("data")
  cached = os.path.join(prep.data_root(), prep.DOWNLOADS, ml100k.WHEEL_NAME)
  if os.path.exists(cached):
    os.makedirs(root / prep.DOWNLOADS)
    shutil.copy(cached, root / prep.DOWNLOADS / ml100k.WHEEL_NAME)
  enc = FakeEncoder()
  try:
    out = prep.prepare("ml100k", str(root), encoder=enc, log=quiet)
  except DataError as e:
    if "could not" in str(e):
      pytest.skip(f"RecBole wheel unavailable: {e}")
    raise
  return out, enc


def test_real_counts_and_split(real):
  out, _ = real
  table = np.loadtxt(os.path.join(out, "ml100k.inter"), dtype=np.int64, skiprows=1)
  users, items, labels = table.T
  assert len(table) == 100000
  assert users.max() + 1 == len(np.unique(users)) == 943
  assert items.max() + 1 == len(np.unique(items)) == 1682
  assert len(np.unique(users * 1682 + items)) == 100000
  n = np.bincount(users)
  n_valid, n_test = ml100k.split_counts(n)
  np.testing.assert_array_equal(np.bincount(users[labels == TEST], minlength=943), n_test)
  np.testing.assert_array_equal(np.bincount(users[labels == VALID], minlength=943), n_valid)
  assert n.min() >= 20 and np.bincount(users[labels == TRAIN], minlength=943).min() > 0
  with open(os.path.join(out, "metadata.json")) as f:
    meta = json.load(f)
  assert (meta["n_users"], meta["n_items"], meta["n_interactions"]) == (943, 1682, 100000)
  assert meta["n_train"] + meta["n_valid"] + meta["n_test"] == 100000
  assert meta["n_valid"] == meta["n_test"] == int(n_test.sum())


def test_real_features(real):
  out, enc = real
  text = np.load(os.path.join(out, "text_feat.npy"))
  assert text.shape == (1682, 384) and text.dtype == np.float32
  assert enc.seen[0] == "Toy Story (1995). Genres: Animation, Children's, Comedy."
  assert len(enc.seen) == 1682 and all(s.endswith(".") for s in enc.seen)
  kg = np.load(os.path.join(out, "kg_feat.npy"))
  assert kg.shape == (1682, 256) and kg.dtype == np.float32 and np.all(np.isfinite(kg))
  with open(os.path.join(out, "metadata.json")) as f:
    stats = json.load(f)["kg"]
  assert stats["n_linked_items"] == 1598 and stats["n_columns_kept"] >= 256
  # Rows equal to the mean of the others are exactly the items with no kept kg column.
  distinct, inverse, counts = np.unique(kg, axis=0, return_inverse=True, return_counts=True)
  filled = np.flatnonzero(counts[inverse.ravel()] > 1)
  assert len(filled) == stats["n_items_filled_with_mean"] >= 1682 - 1598
  others = np.setdiff1d(np.arange(1682), filled)
  np.testing.assert_allclose(kg[filled[0]], kg[others].mean(axis=0), atol=1e-6)
  assert np.linalg.matrix_rank(kg[others].astype(np.float64)) == 256
