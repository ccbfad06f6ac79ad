"""End-to-end training on tiny data: metrics file, determinism, resume, one compile."""

import json
import logging
import os
import re
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
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
  assert result["stop"].startswith("patience")


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
    ("steps_per_epoch", -1, "steps_per_epoch must not be negative"),
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


def absl_lines(caplog):
  """The progress lines a run logged (Orbax logs through the same absl logger)."""
  return [r.getMessage() for r in caplog.records if r.pathname.endswith("progress.py")]


def test_epoch_line_format():
  from fettle_jax import progress  # pylint: disable=g-import-not-at-top
  line = progress.epoch_line(
      3, 400, "loss 0.69000 (backbone 0.60000, alignment 0.09000) | valid recall@20 0.0712 *",
      "18/20", 0.87, 0.66, 3.2, 347.0)
  assert line == ("epoch   3/400 | loss 0.69000 (backbone 0.60000, alignment 0.09000) | "
                  "valid recall@20 0.0712 * | patience 18/20 | train 0.87s eval 0.66s | "
                  "elapsed 3.20s, ETA <= 5m47s")
  assert progress.epoch_line(12, 12, "x", "1/5", 1.0, None, 75.0, 0.0) == (
      "epoch 12/12 | x | patience 1/5 | train 1.00s | elapsed 1m15s, ETA <= 0.00s")
  assert [progress.duration(s) for s in (0.421, 12.34, 245.0, 3723.0)] == [
      "0.42s", "12.3s", "4m05s", "1h02m03s"]


def test_final_line_names_the_best_epoch_and_says_when_none_was_validated():
  loop = dict(train.initial_loop_state(), epoch=12, best_epoch=9,
              best_test={"recall@10": 0.1, "recall@20": 0.2, "ndcg@10": 0.05, "ndcg@20": 0.07})
  assert train.final_line(loop) == ("best epoch 9 of 12: test recall@10 0.1000 test "
                                    "recall@20 0.2000 test ndcg@10 0.0500 test ndcg@20 0.0700")
  assert train.final_line(train.initial_loop_state()) == (
      "best epoch 0 of 0: no validated epoch, so no test metrics")


def test_epoch_bar_only_on_a_terminal(caplog):
  from fettle_jax import progress  # pylint: disable=g-import-not-at-top
  caplog.set_level(logging.INFO, logger="absl")  # another test may have quieted absl
  assert progress.EpochBar(10, 0)._bar is None  # pylint: disable=protected-access  # captured stdout
  bar = progress.EpochBar(10, 2, enabled=True)
  bar.line("epoch 3/10 | ...", 3, "19/20 patience")
  assert bar._bar.n == 3  # pylint: disable=protected-access
  bar.close()
  assert absl_lines(caplog) == ["epoch 3/10 | ..."]


def read_scalars(folder):
  """{tag: [(step, value)]} from the TensorBoard event files in `folder` (TFRecord framing:
  length, its CRC, the Event proto, its CRC)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = {}
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_eval_every_the_compile_line_and_tensorboard_scalars(tiny_mmrec, tmp_path, caplog):
  """Validation after every 2nd epoch and after the last; the compile line comes before the
  first epoch line; TensorBoard holds each epoch's losses and each pass's metrics."""
  pytest.importorskip("tensorboardX")
  caplog.set_level(logging.INFO, logger="absl")  # another test may have quieted absl
  config = tiny_config(tiny_mmrec)
  config.max_epochs, config.eval_every, config.tensorboard = 5, 2, True
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  validated = [h["epoch"] for h in result["history"] if "valid_recall@20" in h]
  assert validated == [2, 4, 5] and result["best_epoch"] in validated
  lines = absl_lines(caplog)
  first = next(i for i, line in enumerate(lines) if line.startswith("epoch "))
  assert lines[first - 1].startswith("compiling the train step")
  assert lines[first].startswith("epoch 1/5 | loss ") and "| valid at epoch 2 |" in lines[first]
  assert re.search(r"^epoch 2/5 \| .* \| valid recall@20 \d\.\d{4} . \| patience \d+/20 \| "
                   r"train \d+\.\d\ds eval \d+\.\d\ds \| elapsed .*, ETA <= ", lines[first + 1])
  scalars = read_scalars(tmp_path / "run" / "tensorboard")
  for key in ("loss", "backbone_loss", "alignment_loss"):
    steps, values = zip(*scalars[f"train/{key}"])
    assert steps == (1, 2, 3, 4, 5)
    np.testing.assert_allclose(values, [h[key] for h in result["history"]], rtol=1e-6)
  steps, values = zip(*scalars["valid/recall_20"])
  assert steps == (2, 4, 5)
  np.testing.assert_allclose(values, [h["valid_recall@20"] for h in result["history"]
                                      if "valid_recall@20" in h], rtol=1e-6)
  assert {tag for tag in scalars if tag.startswith("valid/")} == {
      "valid/" + name.replace("@", "_") for name in result["valid"]}


def test_patience_counts_validation_passes(tiny_mmrec, tmp_path):
  config = tiny_config(tiny_mmrec)
  config.max_epochs, config.patience, config.eval_every = 200, 2, 3
  config.learning_rate = 0.0  # nothing improves after the first pass (epoch 3)
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert (result["best_epoch"], result["epochs"]) == (3, 9)
  assert result["stop"].startswith("patience: 2 validation passes")


def test_steps_per_epoch_scales_batch_and_learning_rate_by_the_square_root_rule():
  config = tiny_config("unused")
  config.batch_size, config.learning_rate = 2048, 1e-3
  assert train.scaled_batch(config, 100_000) is config  # 0: the batch size as given
  config.steps_per_epoch = 16
  scaled = train.scaled_batch(config, 100_000)  # 6250 per step -> 7168, a multiple of 1024
  assert (scaled.batch_size, config.batch_size) == (7168, 2048)
  np.testing.assert_allclose(scaled.learning_rate, 1e-3 * np.sqrt(7168 / 2048))
  config.steps_per_epoch = 1000  # fewer than batch_size per step: batch_size stays
  assert train.scaled_batch(config, 100_000).batch_size == 2048


def test_steps_per_epoch_fixes_the_step_count_of_a_run(tiny_mmrec, tmp_path):
  config = tiny_config(tiny_mmrec)
  config.batch_size, config.max_epochs, config.steps_per_epoch = 8, 1, 1
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  n_train = result["data"]["n_train"]
  assert result["config"]["batch_size"] == n_train  # n_train < 1024: one batch of all
  np.testing.assert_allclose(result["config"]["learning_rate"],
                             config.learning_rate * np.sqrt(result["config"]["batch_size"] / 8))


def test_sample_of_validation_users_is_fixed_by_the_seed():
  valid = np.array([[u, i] for u in (3, 5, 8, 9, 12, 20) for i in (0, 1)])
  users = np.unique(valid[:, 0])
  a = train.sample_valid_users(valid, 3, seed=0)
  assert len(a) == 3 and set(a) <= set(users) and list(a) == sorted(a)
  np.testing.assert_array_equal(a, train.sample_valid_users(valid, 3, seed=0))
  assert any(not np.array_equal(a, train.sample_valid_users(valid, 3, seed=s))
             for s in range(1, 10))
  for size in (0, 6, 100):  # 0 = all; a sample as large as the users is all of them
    np.testing.assert_array_equal(train.sample_valid_users(valid, size, seed=0), users)


def numpy_recall_at_k(users_emb, items_emb, train_pairs, heldout_pairs, users, k):
  """Mean Recall@k over `users` that have held-out items, ranking every unseen item."""
  scores = users_emb @ items_emb.T
  scores[train_pairs[:, 0], train_pairs[:, 1]] = -np.inf
  recalls = []
  for u in users:
    relevant = set(heldout_pairs[heldout_pairs[:, 0] == u, 1].tolist())
    if relevant:
      top = np.argsort(-scores[u], kind="stable")[:k]
      recalls.append(len(relevant & set(top.tolist())) / len(relevant))
  return float(np.mean(recalls))


def test_model_selection_on_a_sample_of_validation_users_tests_on_all(tiny_mmrec, tmp_path):
  """Each pass ranks the 12 sampled users only; the selected epoch's valid and test metrics
  are then every user's: both checked against NumPy rankings of the best parameters."""
  from fettle_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  config = tiny_config(tiny_mmrec)
  config.max_epochs, config.valid_users_sample = 4, 12
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["selection_metric"] == "valid recall@20 on 12 sampled validation users"
  run = workdir_lib.load_run(str(tmp_path / "run"))
  reps = workdir_lib.represent(run)
  users_emb, items_emb = np.asarray(reps.users), np.asarray(reps.items)
  data = run.data
  sample = train.sample_valid_users(data.valid, 12, config.seed)
  best = next(h for h in result["history"] if h["epoch"] == result["best_epoch"])
  np.testing.assert_allclose(best["valid_recall@20"], numpy_recall_at_k(
      users_emb, items_emb, data.train, data.valid, sample, 20), atol=1e-6)
  everyone = np.arange(data.n_users)
  np.testing.assert_allclose(result["valid"]["recall@20"], numpy_recall_at_k(
      users_emb, items_emb, data.train, data.valid, everyone, 20), atol=1e-6)
  np.testing.assert_allclose(result["test"]["recall@20"], numpy_recall_at_k(
      users_emb, items_emb, data.train, data.test, everyone, 20), atol=1e-6)
  assert "test" not in best  # passes never rank the test split on a sample


def test_tensorboard_without_tensorboardx_is_one_line(tmp_path, monkeypatch, caplog):
  from fettle_jax import progress  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # `import tensorboardX` fails
  caplog.set_level(logging.INFO, logger="absl")  # another test may have quieted absl
  scalars = progress.Scalars(str(tmp_path / "tb"), enabled=True)
  scalars.epoch(1, [0.5, 0.25], {"recall@20": 0.1})  # a no-op, not an error
  scalars.close()
  assert absl_lines(caplog) == [
      "note: config.tensorboard is set but tensorboardX is not installed (pip install "
      "'fettle-jax[tensorboard]'); training goes on without TensorBoard scalars"]
  assert not os.path.exists(tmp_path / "tb")
