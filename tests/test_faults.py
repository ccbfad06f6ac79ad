"""Faults never lose a run: kills, unreadable checkpoints, a full disk, two processes, NaN."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest

from fettle_jax import checkpoint as checkpoint_lib
from fettle_jax import train
from fettle_jax import workdir as workdir_lib
from fettle_jax.errors import OtherRunError, WorkdirInUseError
from tests.conftest import ROOT, load_script, subprocess_env, tiny_config

kill_loop = load_script("kill_loop")


def fettle_config(path, max_epochs, model="lightgcn", alignment="none"):
  """The checkpoint machinery does not depend on the model: a cheap one by default."""
  config = tiny_config(path, model=model, alignment=alignment)
  config.max_epochs, config.patience, config.checkpoint_every_epochs = max_epochs, 100, 1
  return config


def restore_latest(config, workdir):
  like = train.create_train_state(config, train.load_data(config)).state
  checkpoints = checkpoint_lib.Checkpoints(workdir)
  try:
    return checkpoints.restore_latest(like)
  finally:
    checkpoints.close()


def test_unreadable_latest_checkpoint_falls_back_to_the_previous_one(tiny_mmrec, tmp_path,
                                                                     caplog):
  full = train.train_and_evaluate(fettle_config(tiny_mmrec, 5), str(tmp_path / "full"))
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(fettle_config(tiny_mmrec, 3), workdir)
  for file in glob.glob(os.path.join(workdir, "checkpoints", "latest", "3", "state", "**", "*"),
                        recursive=True):
    if os.path.isfile(file):
      with open(file, "wb") as f:  # a torn write: garbage where the arrays were
        f.write(b"\x00garbage")
  caplog.clear()
  _, loop = restore_latest(fettle_config(tiny_mmrec, 5), workdir)
  assert loop["epoch"] == 2
  assert any("checkpoint of epoch 3 is unreadable" in r.getMessage() for r in caplog.records)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints", "latest"))) == ["2"]
  resumed = train.train_and_evaluate(fettle_config(tiny_mmrec, 5), workdir)
  assert resumed["test"] == full["test"] and resumed["valid"] == full["valid"]


def disk_config(path, max_epochs):
  """Tables of 10 KB each: a checkpoint's arrays exceed the test's 4000-byte file limit
  however well they compress, while history lines stay far below it."""
  config = fettle_config(path, max_epochs)
  config.embedding_size = 64
  return config


def test_full_disk_stops_with_one_line_and_keeps_the_previous_checkpoint(tiny_mmrec, tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(disk_config(tiny_mmrec, 2), workdir)
  code = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))  # history lines fit, arrays do not
from tests.test_faults import disk_config
from fettle_jax import train
from fettle_jax.errors import REPORTED_ERRORS
try:
  train.train_and_evaluate(disk_config({tiny_mmrec!r}, 4), {workdir!r})
except REPORTED_ERRORS as e:
  print("error:", e)
"""
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=300)
  lines = out.stdout.strip().splitlines()
  assert lines and lines[-1].startswith("error: epoch 3: could not write the checkpoint"), (
      out.stdout + out.stderr)
  _, loop = restore_latest(disk_config(tiny_mmrec, 4), workdir)
  assert loop["epoch"] == 2  # the previous checkpoint is intact
  assert train.train_and_evaluate(disk_config(tiny_mmrec, 4), workdir)["epochs"] == 4


def test_a_second_process_on_the_same_workdir_is_refused(tiny_mmrec, tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  holder = workdir_lib.WorkdirLock(workdir)  # another live run
  with pytest.raises(WorkdirInUseError, match=f"in use by another run .pid {os.getpid()}"):
    train.train_and_evaluate(fettle_config(tiny_mmrec, 1), workdir)
  holder.release()
  assert train.train_and_evaluate(fettle_config(tiny_mmrec, 1), workdir)["epochs"] == 1


def test_a_workdir_resumes_only_the_run_it_holds(tiny_mmrec, tmp_path):
  """Rerunning a workdir with another config would continue that run's checkpoint (or keep
  its metrics) as if it were this one: it stops with one error instead. The schedule may
  change (a longer run resumes), and a folder from before run.json is read through its
  metrics.json."""
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(fettle_config(tiny_mmrec, 2), workdir)
  other = fettle_config(tiny_mmrec, 3)
  other.seed, other.learning_rate = 1, 0.5
  with pytest.raises(OtherRunError, match=r"learning_rate 0.001 there, 0.5 here; seed 0 "
                                          r"there, 1 here\); pass another --workdir"):
    train.train_and_evaluate(other, workdir)
  assert train.train_and_evaluate(fettle_config(tiny_mmrec, 3), workdir)["epochs"] == 3
  os.remove(workdir_lib.run_file(workdir))  # as written before run.json existed
  with pytest.raises(OtherRunError, match="alignment 'none' there, 'bm3' here"):
    train.train_and_evaluate(fettle_config(tiny_mmrec, 3, alignment="bm3"), workdir)
  # Nothing to resume yet (killed before its first checkpoint): a new config starts afresh.
  fresh = str(tmp_path / "fresh")
  os.makedirs(fresh)
  workdir_lib.check_same_run(fresh, {"seed": 0}, resumable=False)
  workdir_lib.check_same_run(fresh, {"seed": 1}, resumable=False)
  with pytest.raises(OtherRunError):
    workdir_lib.check_same_run(fresh, {"seed": 0}, resumable=True)


def test_nan_loss_stops_the_run_with_its_best_epoch_and_a_usable_checkpoint(tiny_mmrec,
                                                                          tmp_path, caplog):
  """The NaN policy (train.train_loop): a non-finite epoch loss stops the run there; the
  result is its best validation epoch, metrics.json says why it stopped, and the diverged
  state is never checkpointed."""
  import json  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  before = train.train_and_evaluate(fettle_config(tiny_mmrec, 2), workdir)
  diverging = fettle_config(tiny_mmrec, 6)
  diverging.learning_rate = 1e30
  # A deliberate mix: the 2 sane epochs' checkpoint continued at another learning rate,
  # past the check that a workdir resumes only its own run.
  os.remove(workdir_lib.run_file(workdir))
  os.remove(workdir_lib.metrics_path(workdir))
  caplog.set_level(logging.WARNING, logger="absl")
  result = train.train_and_evaluate(diverging, workdir)
  stopped = int(result["stop"].split()[-1])
  assert result["stop"] == f"non-finite loss at epoch {stopped}" and 3 <= stopped <= 6
  assert result["epochs"] == stopped and result["best_epoch"] < stopped
  assert not np.isfinite(result["history"][-1]["loss"])
  assert "valid_recall@20" not in result["history"][-1]  # a diverged state is not validated
  if result["best_epoch"] <= 2:
    assert result["test"] == before["test"]
  with open(os.path.join(workdir, "metrics.json")) as f:
    assert json.load(f)["stop"] == result["stop"]
  assert any(f"at epoch {stopped}: stopped" in r.getMessage() for r in caplog.records)
  state, loop = restore_latest(fettle_config(tiny_mmrec, 6), workdir)
  assert all(np.all(np.isfinite(np.asarray(x))) for x in
             __import__("jax").tree_util.tree_leaves(state.params))
  assert 2 <= loop["epoch"] < stopped


def test_kill_loop_resumes_to_identical_metrics(tiny_mmrec, tmp_path):
  """SIGKILL at random moments (start-up, compilation, epochs, checkpoint saves), restart
  on the same workdir each time: the same final metrics as an uninterrupted run."""
  run_args = ["--config=" + os.path.join(ROOT, "configs", "freedom_baby.py"),
              f"--config.data.path={tiny_mmrec}", "--config.max_epochs=5", "--config.patience=100",
              "--config.batch_size=64", "--config.eval_batch_size=16",
              "--config.embedding_size=8", "--config.topk=5,10,20",
              "--config.fettle.prototypes_item=16", "--config.fettle.prototypes_user=16",
              f"--compilation_cache={tmp_path / 'xla'}"]
  result = kill_loop.kill_loop(run_args, str(tmp_path), kills=3, min_delay=2.0, max_delay=7.0,
                               seed=1, log=lambda _: None)
  assert result["killed"] == result["uninterrupted"]
  assert result["killed"]["epochs"] == 5


def test_sigterm_stops_after_the_epoch_with_a_checkpoint_to_resume_from(tiny_mmrec, tmp_path):
  """A scheduler's SIGTERM (or Ctrl-C) mid-run: the run checkpoints the epoch in progress
  (checkpoint_every_epochs would not have), says so, exits 143, and a rerun resumes there."""
  import signal  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  args = [sys.executable, os.path.join(ROOT, "run.py"), "--config=bpr_ml100k",
          f"--config.data.path={tiny_mmrec}", "--config.batch_size=64",
          "--config.eval_batch_size=16", "--config.embedding_size=8", "--config.topk=5,10,20",
          "--config.patience=100000", "--config.checkpoint_every_epochs=100000",
          f"--workdir={workdir}", "--compilation_cache=none"]
  child = subprocess.Popen(args + ["--config.max_epochs=100000"], cwd=ROOT,
                           env=subprocess_env(), stderr=subprocess.PIPE, text=True)
  for line in child.stderr:
    if re.search(r"epoch +3/100000 \|", line):
      break
  child.send_signal(signal.SIGTERM)
  err = child.stderr.read()
  assert child.wait(timeout=120) == 128 + signal.SIGTERM, err[-2000:]
  stopped = int(re.search(r"SIGTERM: stopped after epoch (\d+); rerunning the same command "
                          r"resumes from epoch \1", err).group(1))
  assert stopped >= 3
  assert os.listdir(os.path.join(workdir, "checkpoints", "latest")) == [str(stopped)]
  again = subprocess.run(args + [f"--config.max_epochs={stopped + 1}"], cwd=ROOT,
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-2000:]
  assert f"resumed from {workdir} at epoch {stopped}" in again.stderr


def test_a_save_cut_short_leaves_no_step_behind(tmp_path):
  """A kill mid-save leaves Orbax's temporary folder, never a half step: it is ignored and
  removed at the next start."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  state = {"w": jnp.arange(4.0)}
  checkpoints = checkpoint_lib.Checkpoints(workdir)
  checkpoints.save_latest(1, state, {"epoch": 1})
  checkpoints.save_latest(2, {"w": state["w"] + 1}, {"epoch": 2})
  checkpoints.close()
  partial = os.path.join(workdir, "checkpoints", "latest", "3.orbax-checkpoint-tmp-12345")
  os.makedirs(os.path.join(partial, "state"))
  with open(os.path.join(partial, "state", "_METADATA"), "wb") as f:
    f.write(b"\x00half")
  checkpoints = checkpoint_lib.Checkpoints(workdir)
  try:
    assert checkpoints.latest_epoch() == 2
    restored, loop = checkpoints.restore_latest(state)
  finally:
    checkpoints.close()
  assert loop["epoch"] == 2 and np.array_equal(np.asarray(restored["w"]), np.arange(4.0) + 1)
  assert not os.path.exists(partial)
