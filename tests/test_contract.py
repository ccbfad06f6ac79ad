"""Backbone contract v2: non-trainable state, the epoch hook, resume, history, errors."""

import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fettle_jax import checkpoint as checkpoint_lib
from fettle_jax import layers
from fettle_jax import losses
from fettle_jax import train
from fettle_jax import workdir as workdir_lib
from fettle_jax.errors import ConfigError
from fettle_jax.types import Representations
from tests.conftest import tiny_config


def make_toy_backbone() -> types.ModuleType:
  """BPR-MF whose items are shifted by a state re-estimated at every epoch start: the
  epoch count and the mean item embedding (a stand-in for NCL's k-means prototypes)."""
  toy = types.ModuleType("fettle_jax.backbones.toy_stateful")

  def build_graph(train_pairs, n_users, n_items, features, config):
    del train_pairs, n_users, n_items, features, config
    return {}

  def init(rng, data_info, config):
    return layers.init_embedding_tables(rng, data_info.n_users, data_info.n_items,
                                        config.embedding_size)

  def init_state(rng, static, info, config):
    del static, info
    return {"epochs": jnp.zeros((), jnp.int32),
            "centre": jax.random.normal(rng, (config.embedding_size,)),
            "draws": jnp.zeros((), jnp.float32)}

  def epoch_start(params, model_state, static, info, rng, config):
    del static, info, config
    return {"epochs": model_state["epochs"] + 1,
            "centre": jnp.mean(params["item_embedding"], axis=0),
            "draws": model_state["draws"] + jax.random.uniform(rng)}

  def represent(params, model_state, static, config):
    del static, config
    items = params["item_embedding"] - 0.5 * model_state["centre"]
    return Representations(params["user_embedding"], items, {})

  def apply(params, model_state, static, batch, rng, config):
    del rng
    reps = represent(params, model_state, static, config)
    return reps, losses.regularized_bpr_loss(reps.users, reps.items, batch, 1e-5)

  toy.__dict__.update(build_graph=build_graph, init=init, init_state=init_state,
                      epoch_start=epoch_start, represent=represent, apply=apply)
  return toy


@pytest.fixture
def toy_backbone(monkeypatch):
  monkeypatch.setitem(sys.modules, "fettle_jax.backbones.toy_stateful", make_toy_backbone())
  return "toy_stateful"


def final_state(config, workdir):
  data = train.load_data(config)
  like = train.create_train_state(config, data).state
  checkpoints = checkpoint_lib.Checkpoints(workdir)
  try:
    state, loop = checkpoints.restore_latest(like)
  finally:
    checkpoints.close()
  return state, loop


def test_epoch_hook_state_compiles_once_and_resumes_exactly(tiny_mmrec, tmp_path, toy_backbone):
  config = tiny_config(tiny_mmrec, model="lightgcn")
  config.model = toy_backbone
  config.max_epochs, config.patience, config.checkpoint_every_epochs = 4, 100, 1
  # The epoch is wrapped in chex.assert_max_traces(n=1): a second trace would raise.
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  state, _ = final_state(config, str(tmp_path / "full"))
  assert int(state.model_state["epochs"]) == 4  # the hook ran once per epoch, in the program
  config.max_epochs = 2  # "killed" after epoch 2 ...
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  config.max_epochs = 4  # ... and restarted on the same workdir
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed["test"] == full["test"] and resumed["valid"] == full["valid"]
  resumed_state, _ = final_state(config, str(tmp_path / "resumed"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed_state.model_state,
                         state.model_state)
  jax.tree_util.tree_map(np.testing.assert_array_equal, resumed_state.params, state.params)
  with open(tmp_path / "resumed" / "history.jsonl") as f:
    epochs = [json.loads(line)["epoch"] for line in f]
  assert epochs == [1, 2, 3, 4]  # each epoch once, across the restart


def test_history_drops_epochs_past_the_restored_checkpoint(tmp_path):
  path = tmp_path / "history.jsonl"
  path.write_text("".join(json.dumps({"epoch": e}) + "\n" for e in range(1, 6)) + '{"epo')
  history = workdir_lib.History(str(tmp_path), restored_epoch=3)
  history.append({"epoch": 4})
  assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_one_copy_of_the_features_on_device(tiny_mmrec):
  config = tiny_config(tiny_mmrec, model="freedom", config=None)
  data = train.load_data(config)
  run = train.create_train_state(config, data)
  leaves = jax.tree_util.tree_leaves(run.static)
  for name, feature in run.static.features.items():
    same_shape = [x for x in leaves if x.shape == feature.shape and x.dtype == feature.dtype]
    assert len(same_shape) == 1, name  # not again inside the backbone's graph


def test_run_py_input_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
  import run  # pylint: disable=g-import-not-at-top
  run.parse_command_line(["run.py"])  # the default config, as `python run.py` reads it

  def config_problem(config, workdir):
    raise ConfigError("config.batch_size must be positive, got 0")

  monkeypatch.setattr(run.train, "train_and_evaluate", config_problem)
  with pytest.raises(SystemExit) as exit_info:
    run.main(["run.py"])
  assert exit_info.value.code == 1
  assert capsys.readouterr().err.strip().splitlines() == [
      "error: config.batch_size must be positive, got 0"]

  def bug(config, workdir):
    raise ValueError("operands could not be broadcast together")  # a shape bug, say

  monkeypatch.setattr(run.train, "train_and_evaluate", bug)
  with pytest.raises(ValueError, match="broadcast"):
    run.main(["run.py"])


def test_cached_structures_are_computed_once_per_split_and_section(tiny_mmrec, tmp_path,
                                                                   monkeypatch):
  """A backbone's `cached_structures` runs once per (train split, config section); later
  runs read `<data>/derived/`, a changed section recomputes, a corrupt entry is rebuilt, and
  a read-only data folder falls back to the data cache root."""
  toy = make_toy_backbone()
  calls = []

  def cached_structures(train_pairs, n_users, n_items, config):
    calls.append(1)
    counts = np.bincount(np.asarray(train_pairs)[:, 0], minlength=n_users)
    return {"user_degree": counts.astype(np.float32) * config.toy_stateful.scale}

  toy.cached_structures = cached_structures
  monkeypatch.setitem(sys.modules, "fettle_jax.backbones.toy_stateful", toy)
  config = tiny_config(tiny_mmrec, model="lightgcn")
  config.model = "toy_stateful"
  config.toy_stateful = ml_collections.ConfigDict({"scale": 0.5})
  data = train.load_data(config)
  expected = np.bincount(data.train[:, 0], minlength=data.n_users) * 0.5

  def built():
    return np.asarray(train.create_train_state(config, data).static.graph["user_degree"])

  np.testing.assert_allclose(built(), expected, rtol=1e-6)
  np.testing.assert_allclose(built(), expected, rtol=1e-6)
  assert len(calls) == 1
  entries = os.listdir(os.path.join(tiny_mmrec, "derived"))
  assert len(entries) == 1 and entries[0].startswith("toy_stateful-")
  config.toy_stateful.scale = 1.0  # the backbone's section is part of the key
  np.testing.assert_allclose(built(), 2 * expected, rtol=1e-6)
  assert len(calls) == 2 and len(os.listdir(os.path.join(tiny_mmrec, "derived"))) == 2
  for entry in os.listdir(os.path.join(tiny_mmrec, "derived")):
    with open(os.path.join(tiny_mmrec, "derived", entry), "wb") as f:
      f.write(b"PK\x03\x04 truncated")
  np.testing.assert_allclose(built(), 2 * expected, rtol=1e-6)
  assert len(calls) == 3
  monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only data folder
  monkeypatch.setenv("FETTLE_JAX_DATA", str(tmp_path / "cache_root"))
  np.testing.assert_allclose(built(), 2 * expected, rtol=1e-6)
  assert len(calls) == 4 and len(os.listdir(tmp_path / "cache_root" / "derived")) == 1
