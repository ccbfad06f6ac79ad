"""Property-based: corrupted MMRec and LATTICE folders either load into a data set that
trains, or stop with one DataError line, quickly. Hypothesis picks the folder and the
corruption; every failure it found is fixed in the loaders and kept as an example here."""

import json
import os
import shutil
import tempfile

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
import numpy as np

from data_pipeline import dataset as dataset_lib
from data_pipeline import mmrec_writer
from data_pipeline.errors import DataError

EXAMPLES = 400  # per format; a few seconds each on a 2-core CPU

CORRUPTIONS = ("none", "truncate", "delimiter", "huge_id", "negative_id", "nan_feature",
               "inf_feature", "string_feature", "object_feature", "complex_feature",
               "empty_split", "feature_rows", "garbage_interactions", "garbage_features",
               "delete_interactions", "delete_features", "float_ids", "bool_ids")


def write_valid(folder, seed, n_users, n_items, lattice):
  rng = np.random.default_rng(seed)
  users, items, labels = [], [], []
  for u in range(n_users):
    chosen = rng.choice(n_items, size=4, replace=False)
    users += [u] * 4
    items += chosen.tolist()
    labels += [0, 0, 1, 2]
  features = {"image": rng.normal(size=(n_items, 3)).astype(np.float32)}
  if lattice:
    os.makedirs(folder, exist_ok=True)
    for label, file in enumerate(("train.json", "val.json", "test.json")):
      split = {}
      for u, i, l in zip(users, items, labels):
        if l == label:
          split.setdefault(str(u), []).append(int(i))
      with open(os.path.join(folder, file), "w") as f:
        json.dump(split, f)
    np.save(os.path.join(folder, "image_feat.npy"), features["image"])
  else:
    mmrec_writer.write_mmrec(folder, "d", np.array(users), np.array(items), np.array(labels),
                             features)


def corrupt(folder, how, data, lattice):
  inter = [os.path.join(folder, f) for f in sorted(os.listdir(folder))
           if f.endswith((".inter", ".json"))]
  feats = os.path.join(folder, "image_feat.npy")
  target = data.draw(st.sampled_from(inter))
  if how == "truncate":
    raw = open(target, "rb").read()
    open(target, "wb").write(raw[:data.draw(st.integers(0, max(len(raw) - 1, 0)))])
  elif how == "delimiter":
    text = open(target).read()
    open(target, "w").write(text.replace("\t", data.draw(st.sampled_from([",", " ", ";"]))))
  elif how in ("huge_id", "negative_id", "float_ids", "bool_ids"):
    value = {"huge_id": data.draw(st.integers(10**6, 10**19)), "negative_id": -3,
             "float_ids": 1.5, "bool_ids": True}[how]
    if lattice:
      split = json.load(open(target))
      key = data.draw(st.sampled_from(sorted(split))) if split else "0"
      split.setdefault(key, []).append(value)
      json.dump(split, open(target, "w"))
    else:
      with open(target, "a") as f:
        f.write(f"0\t{value}\t0\n" if data.draw(st.booleans()) else f"{value}\t0\t1\n")
  elif how in ("nan_feature", "inf_feature"):
    matrix = np.load(feats)
    matrix[data.draw(st.integers(0, len(matrix) - 1)), 0] = np.nan if how == "nan_feature" else -np.inf
    np.save(feats, matrix)
  elif how == "string_feature":
    np.save(feats, np.load(feats).astype(str))
  elif how == "object_feature":
    np.save(feats, np.load(feats).astype(object), allow_pickle=True)
  elif how == "complex_feature":
    np.save(feats, np.load(feats).astype(np.complex64))
  elif how == "empty_split":
    if lattice:
      json.dump({}, open(target, "w"))
    else:
      lines = open(target).read().splitlines()
      label = data.draw(st.sampled_from(["0", "1", "2"]))
      open(target, "w").write("\n".join([lines[0]] + [l for l in lines[1:]
                                                       if l.split("\t")[-1] != label]) + "\n")
  elif how == "feature_rows":
    matrix = np.load(feats)
    np.save(feats, matrix[:data.draw(st.integers(0, len(matrix) - 1))])
  elif how == "garbage_interactions":
    open(target, "wb").write(data.draw(st.binary(min_size=0, max_size=200)))
  elif how == "garbage_features":
    open(feats, "wb").write(data.draw(st.binary(min_size=0, max_size=200)))
  elif how == "delete_interactions":
    os.remove(target)
  elif how == "delete_features":
    os.remove(feats)


def check_trainable(data):
  """What the trainer relies on: ids in range, finite features, warm held-out users."""
  assert data.n_users > 0 and data.n_items > 0
  for split in (data.train, data.valid, data.test):
    assert len(split) and split.dtype == np.int32
    assert split[:, 0].min() >= 0 and split[:, 0].max() < data.n_users
    assert split[:, 1].min() >= 0 and split[:, 1].max() < data.n_items
  warm = set(data.train[:, 0].tolist())
  assert set(data.valid[:, 0].tolist()) <= warm and set(data.test[:, 0].tolist()) <= warm
  for matrix in data.features.values():
    assert matrix.dtype == np.float32 and matrix.shape[0] == data.n_items
    assert np.all(np.isfinite(matrix))


def load_or_refuse(lattice, seed, n_users, n_items, how, data):
  event(how)
  folder = tempfile.mkdtemp()
  try:
    write_valid(folder, seed, n_users, n_items, lattice)
    corrupt(folder, how, data, lattice)
    try:
      loaded = dataset_lib.load_dataset(folder)
    except DataError as e:
      message = str(e)
      assert message and "\n" not in message and len(message) < 2000
      return
    check_trainable(loaded)
  finally:
    shutil.rmtree(folder, ignore_errors=True)


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(seed=st.integers(0, 2**16), n_users=st.integers(1, 6), n_items=st.integers(5, 9),
       how=st.sampled_from(CORRUPTIONS), data=st.data())
def test_corrupted_mmrec_folders_load_or_fail_in_one_line(seed, n_users, n_items, how, data):
  load_or_refuse(False, seed, n_users, n_items, how, data)


@SETTINGS
@given(seed=st.integers(0, 2**16), n_users=st.integers(1, 6), n_items=st.integers(5, 9),
       how=st.sampled_from(CORRUPTIONS), data=st.data())
def test_corrupted_lattice_folders_load_or_fail_in_one_line(seed, n_users, n_items, how, data):
  load_or_refuse(True, seed, n_users, n_items, how, data)
