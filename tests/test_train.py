"""End-to-end training on tiny data: metrics file, determinism, resume, one compile."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import pytest

from fettle_jax import train
from fettle_jax.errors import ConfigError
from tests.conftest import tiny_config


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("model", ["bpr", "lightgcn"])
def test_tiny_end_to_end_run_writes_metrics(tiny_mmrec, tmp_path, model):
  config = tiny_config(tiny_mmrec, model=model)
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  saved = read_metrics(tmp_path / "run")
  assert saved["epochs"] == 4 and 1 <= saved["best_epoch"] <= 4
  for split in ("valid", "test"):
    for k in (5, 10, 20):
      for name in ("recall", "ndcg", "precision", "map"):
        assert 0.0 <= saved[split][f"{name}@{k}"] <= 1.0
  assert saved["train_epoch_seconds"] > 0 and saved["eval_seconds"] > 0
  assert saved["first_epoch_seconds"] >= saved["train_epoch_seconds"]
  assert saved["config"]["model"] == model
  assert result["test"] == saved["test"]
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "best")


def test_same_seed_same_metrics_other_seed_differs(tiny_mmrec, tmp_path):
  config = tiny_config(tiny_mmrec)
  a = train.train_and_evaluate(config, str(tmp_path / "a"))
  b = train.train_and_evaluate(config, str(tmp_path / "b"))
  config.seed = 1
  c = train.train_and_evaluate(config, str(tmp_path / "c"))
  assert a["history"] == b["history"] and a["test"] == b["test"]
  assert a["history"] != c["history"]


def test_killed_run_resumes_to_identical_metrics(tiny_mmrec, tmp_path):
  config = tiny_config(tiny_mmrec)
  config.max_epochs = 6
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  # "Kill" after epoch 4: a run capped at 4 epochs leaves the epoch-4 checkpoint behind.
  config.max_epochs = 4
  train.train_and_evaluate(config, str(tmp_path / "resumed"))
  os.remove(tmp_path / "resumed" / "metrics.json")
  config.max_epochs = 6
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed["history"] == full["history"]
  assert resumed["valid"] == full["valid"] and resumed["test"] == full["test"]
  assert resumed["best_epoch"] == full["best_epoch"]


def test_early_stopping_uses_patience(tiny_mmrec, tmp_path):
  config = tiny_config(tiny_mmrec)
  config.max_epochs = 200
  config.patience = 2
  config.learning_rate = 0.0  # nothing improves after epoch 1
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["best_epoch"] == 1 and result["epochs"] == 3


def test_epoch_compiles_once_and_a_retrace_would_fail(tiny_mmrec, tmp_path):
  # The epoch and evaluation functions carry chex.assert_max_traces(n=1): this 3-epoch run
  # passing means each compiled once; a second trace raises, as shown below.
  config = tiny_config(tiny_mmrec)
  config.max_epochs = 3
  train.train_and_evaluate(config, str(tmp_path / "run"))

  @chex.assert_max_traces(n=1)
  def traced(x):
    return x + 1

  jitted = jax.jit(traced)
  jitted(jnp.zeros(2))
  jitted(jnp.ones(2))  # same shape: cached, no trace
  with pytest.raises(AssertionError, match="traced > 1 times"):
    jitted(jnp.zeros(3))


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 0, "batch_size must be positive"),
    ("topk", (5, 20, 500), "topk must lie in"),
    ("selection_metric", "recall@7", "selection_metric"),
    ("selection_metric", "auc@20", "selection_metric"),
    ("model", "gru4rec", "unknown backbone"),
    ("alignment", "clip", "unknown alignment"),
])
def test_bad_config_is_one_clear_error(tiny_mmrec, tmp_path, field, value, message):
  config = tiny_config(tiny_mmrec)
  config[field] = value
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "metrics.json")


def test_config_errors_come_before_loading_data(tmp_path, monkeypatch):
  """A bad setting is reported before any (possibly slow) data loading or preparation."""
  config = tiny_config(str(tmp_path / "no_such_folder"))
  config.batch_size = 0
  monkeypatch.setattr(train, "load_data", lambda c: pytest.fail("data loaded first"))
  with pytest.raises(ConfigError, match="batch_size"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  config.batch_size, config.fettle.directions, config.alignment = 64, "cyclic", "fettle"
  with pytest.raises(ConfigError, match="fettle.directions"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
