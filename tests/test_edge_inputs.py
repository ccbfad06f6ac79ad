"""Edge inputs that are valid train; hostile ones are refused cheaply (one line, bounded)."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import freedom_baby
from data_pipeline import dataset as dataset_lib
from data_pipeline import mmrec_writer
from data_pipeline.errors import DataError
from fettle_jax import train
from fettle_jax.errors import ConfigError
from tests.conftest import ROOT, tiny_config


def write(path, users, items, labels, features=None):
  mmrec_writer.write_mmrec(str(path), "edge", np.asarray(users), np.asarray(items),
                           np.asarray(labels), features)
  return str(path)


def random_split(n_users, n_items, per_user, seed=0):
  rng = np.random.default_rng(seed)
  users, items, labels = [], [], []
  for u in range(n_users):
    chosen = rng.choice(n_items, size=per_user, replace=False)
    users += [u] * per_user
    items += chosen.tolist()
    labels += [0] * (per_user - 2) + [1, 2]
  return users, items, labels


def train_briefly(path, model="lightgcn", alignment="none", tmp=None, **overrides):
  config = tiny_config(path, model=model, alignment=alignment)
  config.max_epochs = 2
  for key, value in overrides.items():
    config[key] = value
  result = train.train_and_evaluate(config, str(tmp))
  assert all(np.isfinite(v) for v in result["test"].values())
  return result


def test_fewer_interactions_than_one_batch_trains(tmp_path):
  # The case: 60 users, 80 items, 360 train interactions, the default batch of 2048.
  users, items, labels = random_split(60, 80, 8)
  path = write(tmp_path / "d", users, items, labels)
  result = train_briefly(path, tmp=tmp_path / "run", batch_size=2048)
  assert result["config"]["batch_size"] == 360


def test_single_user_trains(tmp_path):
  path = write(tmp_path / "d", [0] * 8, list(range(8)), [0, 0, 0, 0, 0, 0, 1, 2])
  train_briefly(path, tmp=tmp_path / "run", topk=(1, 2), selection_metric="recall@2")


def test_items_only_in_held_out_splits_and_users_whose_held_out_items_are_all_unseen(tmp_path):
  users, items, labels = random_split(30, 20, 6)
  # Items 20-23 occur only in valid/test; every held-out item of the new user 30 is one of
  # them; item 24 has a feature row but no interaction at all.
  users += [1, 2, 30, 30, 30, 30, 30, 30]
  items += [22, 23, 0, 1, 2, 3, 20, 21]
  labels += [1, 2, 0, 0, 0, 0, 1, 2]
  image = np.random.default_rng(2).normal(size=(25, 5)).astype(np.float32)
  path = write(tmp_path / "d", users, items, labels, {"image": image})
  data = dataset_lib.load_dataset(path)
  assert data.n_items == 25 and not np.isin(np.arange(20, 25), data.train[:, 1]).any()
  train_briefly(path, model="freedom", alignment="fettle", tmp=tmp_path / "run", batch_size=64)


@pytest.mark.parametrize("alignment", ["fettle", "bm3"])
def test_one_content_modality_with_an_all_zero_feature_row(tmp_path, alignment):
  users, items, labels = random_split(30, 20, 6)
  image = np.random.default_rng(1).normal(size=(20, 5)).astype(np.float32)
  image[3] = 0.0  # an item without content: normalizations must stay finite
  path = write(tmp_path / "d", users, items, labels, {"image": image})
  config = tiny_config(path, alignment=alignment, config=freedom_baby.get_config())
  config.max_epochs = 2
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert all(np.isfinite(v) for v in result["test"].values())


def test_catalogue_smaller_than_every_cut_off_names_the_fix(tmp_path):
  path = write(tmp_path / "d", [0, 0, 0, 1, 1, 1], [0, 1, 2, 1, 2, 0], [0, 1, 2, 0, 1, 2])
  with pytest.raises(ConfigError, match="n_items=3.*--config.topk"):
    train_briefly(path, tmp=tmp_path / "run")


def test_huge_id_is_refused_in_seconds_and_bounded_memory(tmp_path):
  users, items, labels = random_split(60, 80, 6)
  items[5] = 2_000_000_000  # one typo among 80 real items
  path = write(tmp_path / "d", users, items, labels)
  code = ("import resource, sys\n"
          "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
          "from data_pipeline import dataset\n"
          "from data_pipeline.errors import DataError\n"
          "try:\n"
          f"  dataset.load_dataset({path!r})\n"
          "except DataError as e:\n"
          "  print(e)\n")
  start = time.perf_counter()
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
  assert time.perf_counter() - start < 20
  assert "item ids are not 0..n-1" in out.stdout and "--remap" in out.stdout, out.stderr
  # The CLI says the same in one line, no traceback.
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"),
                         f"--config.data.path={path}", "--config.data.prepare=",
                         f"--workdir={tmp_path / 'run'}", "--compilation_cache=none"],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_remap_renumbers_ids_and_keeps_feature_rows(tmp_path):
  users, items, labels = random_split(10, 12, 5)
  users = [u * 1000 + 7 for u in users]
  image = np.arange(12 * 3, dtype=np.float32).reshape(12, 3)
  items = [i for i in items]
  src = write(tmp_path / "raw", users, items, labels, {"image": image})
  with pytest.raises(DataError, match="user ids are not 0..n-1"):
    dataset_lib.load_dataset(src)
  subprocess.run([sys.executable, "-m", "data_pipeline.convert", f"--src={src}",
                  f"--out={tmp_path / 'clean'}", "--name=clean", "--remap"], cwd=ROOT,
                 check=True, capture_output=True)
  data = dataset_lib.load_dataset(str(tmp_path / "clean"))
  original_items = np.loadtxt(tmp_path / "clean" / "item_ids.txt", dtype=np.int64)
  np.testing.assert_array_equal(data.features["image"], image[original_items])
  assert data.n_users == 10
