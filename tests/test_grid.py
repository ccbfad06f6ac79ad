"""fettle_jax/grid.py: settings trained side by side in one vmapped program equal the
sequential runs of the same settings; per-setting early stopping; resume; one-line errors."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from fettle_jax import grid
from fettle_jax import train
from fettle_jax.errors import ConfigError, OtherRunError

METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")


def assert_same_run(got, want, atol):
  assert (got["best_epoch"], got["epochs"]) == (want["best_epoch"], want["epochs"])
  for key in ("loss", "valid_recall@20"):
    np.testing.assert_allclose([h.get(key, np.nan) for h in got["history"]],
                               [h.get(key, np.nan) for h in want["history"]], atol=atol, rtol=0)
  for split in ("valid", "test"):
    np.testing.assert_allclose([got[split][m] for m in METRICS],
                               [want[split][m] for m in METRICS], atol=atol, rtol=0)


def test_grid_equals_sequential_runs_and_stops_each_setting_on_its_own(tiny_mmrec, tmp_path):
  # BM3 rather than FETTLE: the same contract at a fraction of the compile time; FETTLE's
  # one grid-specific piece is tested below at the loss level.
  config = tiny_config(tiny_mmrec, model="bpr", alignment="bm3")
  config.max_epochs = 4
  config.patience = 2
  # Seeds, an alignment weight and the learning rate swept together; learning rate 0 never
  # improves after epoch 1, so that setting stops at epoch 3 while another trains on.
  settings = [{"seed": 0, "bm3.weight": 0.1, "learning_rate": 1e-2},
              {"seed": 1, "bm3.weight": 1.0, "learning_rate": 1e-2},
              {"seed": 0, "bm3.weight": 0.1, "learning_rate": 0.0}]
  results = grid.train_grid(config, settings, str(tmp_path / "grid"))
  assert results[2]["epochs"] == 3 and max(r["epochs"] for r in results) == 4
  # The finished chunk's resumable state is gone; its settings list stays.
  assert [p.name for p in (tmp_path / "grid" / "chunks").glob("*/*")] == ["settings.txt"]
  for setting, got in zip(settings, results):
    name = grid.setting_name(setting)
    want = train.train_and_evaluate(grid.concrete_config(config, setting),
                                    str(tmp_path / "sequential" / name))
    assert_same_run(got, want, atol=1e-5)
    folder = tmp_path / "grid" / name
    with open(folder / "metrics.json") as f:
      assert json.load(f)["config"]["learning_rate"] == setting["learning_rate"]
    assert (folder / "history.jsonl").exists() and (folder / "learning_curves.csv").exists()
    # The best checkpoint is the best epoch's parameters, as a single run's.
    from fettle_jax import checkpoint  # pylint: disable=g-import-not-at-top
    best = checkpoint.Checkpoints(str(folder))
    try:
      assert best._best.latest_step() == got["best_epoch"]  # pylint: disable=protected-access
    finally:
      best.close()
  assert results[0]["history"] != results[1]["history"]


def test_fettle_under_the_grid_vmap_equals_each_setting(monkeypatch):
  """Two settings whose batches hold different numbers of unique items (alone they take
  different prefix buckets): under the grid's plain vmap over settings each setting's loss
  and gradients equal its own unvmapped ones."""
  from test_alignment import make_config, make_problem  # pylint: disable=g-import-not-at-top
  from fettle_jax.alignment import fettle  # pylint: disable=g-import-not-at-top
  from fettle_jax.alignment.fettle import shapes  # pylint: disable=g-import-not-at-top
  # 5 and 4 unique items: alone they take branches 9 and 4, together both take 9.
  monkeypatch.setattr(shapes, "bucket_sizes", lambda capacity: [2, 4, 9])
  problems = [make_problem(seed=6), make_problem(seed=7)]
  assert [len(set(np.asarray(p[3].pos_items).tolist())) for p in problems] == [5, 4]
  features = problems[0][2]
  cfg = make_config()
  params = [fettle.init(jax.random.PRNGKey(i), problems[0][0], cfg) for i in range(2)]

  def loss(p, reps, batch):
    return fettle.loss(p, reps, features, batch, None, cfg)[0]

  each_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  each = [each_fn(params[i], problems[i][1], problems[i][3]) for i in range(2)]
  stacked = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
  vmapped = jax.vmap(jax.value_and_grad(loss, argnums=(0, 1)))
  args = (stacked(params), stacked([p[1] for p in problems]), stacked([p[3] for p in problems]))
  together = jax.jit(vmapped)(*args)
  for i in range(2):
    chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], together), each[i],
                                atol=1e-5, rtol=1e-5)


def test_a_diverging_setting_stops_alone_under_the_one_nan_policy(tiny_mmrec, tmp_path):
  """train.train_loop's NaN policy in a grid: the setting whose loss is not finite stops
  with its best validation epoch and says why; the other trains on to max_epochs."""
  config = tiny_config(tiny_mmrec, model="bpr")
  config.max_epochs, config.patience = 4, 100
  settings = grid.grid_settings({"learning_rate": (1e-2, 1e30)}, seeds=(0,))
  fine, diverged = grid.train_grid(config, settings, str(tmp_path / "grid"))
  assert (fine["epochs"], fine["stop"]) == (4, "max_epochs")
  stopped = int(diverged["stop"].split()[-1])
  assert diverged["stop"] == f"non-finite loss at epoch {stopped}"
  assert diverged["epochs"] == stopped < 4 and diverged["best_epoch"] < stopped
  assert all(np.isfinite(h["loss"]) for h in fine["history"])


def test_grid_selecting_on_a_sample_of_validation_users_equals_sequential_runs(tiny_mmrec,
                                                                              tmp_path):
  """config.valid_users_sample in a grid: every setting selects on the same sample, then
  its selected parameters are measured on every user, as a single run's are."""
  config = tiny_config(tiny_mmrec, model="bpr")
  config.max_epochs, config.valid_users_sample, config.eval_every = 3, 12, 2
  settings = grid.grid_settings({"learning_rate": (1e-2, 3e-2)}, seeds=(0,))
  results = grid.train_grid(config, settings, str(tmp_path / "grid"))
  for setting, got in zip(settings, results):
    want = train.train_and_evaluate(grid.concrete_config(config, setting),
                                    str(tmp_path / "sequential" / grid.setting_name(setting)))
    assert got["selection_metric"] == want["selection_metric"]
    assert [h["epoch"] for h in got["history"] if "valid_recall@20" in h] == [2, 3]
    assert_same_run(got, want, atol=1e-5)


def test_interrupted_grid_resumes_to_identical_metrics(tiny_mmrec, tmp_path, monkeypatch):
  config = tiny_config(tiny_mmrec, model="bpr", alignment="bm3")
  config.max_epochs = 4
  config.checkpoint_every_epochs = 2
  settings = grid.grid_settings({"learning_rate": (1e-2, 3e-2)}, seeds=(0,))
  full = grid.train_grid(config, settings, str(tmp_path / "full"))

  record_epoch = train.record_epoch

  def killed_in_epoch_4(loop, epoch, *args):
    if epoch == 4:
      raise KeyboardInterrupt
    return record_epoch(loop, epoch, *args)

  monkeypatch.setattr(train, "record_epoch", killed_in_epoch_4)
  with pytest.raises(KeyboardInterrupt):
    grid.train_grid(config, settings, str(tmp_path / "resumed"))
  assert not os.path.exists(tmp_path / "resumed" / grid.setting_name(settings[0]) /
                            "metrics.json")
  assert list((tmp_path / "resumed" / "chunks").glob("*/checkpoints/latest"))  # kept to resume
  monkeypatch.setattr(train, "record_epoch", record_epoch)
  resumed = grid.train_grid(config, settings, str(tmp_path / "resumed"))
  for got, want in zip(resumed, full):
    assert got["history"] == want["history"] and got["test"] == want["test"]
  # A finished grid is reused, not retrained.
  again = grid.train_grid(config, settings, str(tmp_path / "resumed"))
  assert [r["history"] for r in again] == [r["history"] for r in resumed]
  # Another base config is not handed the finished settings (swept values and seeds may
  # differ: each is its own folder).
  other = config.copy_and_resolve_references()
  other.bpr.reg_weight = 0.5
  with pytest.raises(OtherRunError, match="bpr.reg_weight 1e-05 there, 0.5 here"):
    grid.train_grid(other, settings, str(tmp_path / "resumed"))
  more = grid.grid_settings({"learning_rate": (1e-2, 5e-2)}, seeds=(0, 1))
  assert len(grid.train_grid(config, more, str(tmp_path / "resumed"))) == 4


def test_chunk_that_exhausts_memory_is_split(tiny_mmrec, tmp_path, monkeypatch):
  config = tiny_config(tiny_mmrec, model="bpr")
  settings = grid.grid_settings({}, seeds=(0, 1, 2))
  chunks = []

  def fake_chunk(run, keys, part, workdir, eval_data, facts):
    chunks.append([s["seed"] for s in part])
    if len(part) > 1:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes")
    folder = os.path.join(workdir, grid.setting_name(part[0]))
    os.makedirs(folder)
    with open(os.path.join(folder, "metrics.json"), "w") as f:
      json.dump({"seed": part[0]["seed"]}, f)

  monkeypatch.setattr(grid, "_train_chunk", fake_chunk)
  results = grid.train_grid(config, settings, str(tmp_path / "grid"))
  assert chunks == [[0, 1, 2], [0, 1], [0], [1], [2]]
  assert [r["seed"] for r in results] == [0, 1, 2]


def test_grid_settings_and_names():
  settings = grid.grid_settings({"fettle.beta": (1e-3, 1e-2), "fettle.alpha": (0.1,)}, (0, 1))
  assert [grid.setting_name(s) for s in settings] == [
      "seed0_alpha0.1_beta0.001", "seed0_alpha0.1_beta0.01",
      "seed1_alpha0.1_beta0.001", "seed1_alpha0.1_beta0.01"]
  assert grid.setting_name({"seed": 0, "fettle.alpha": 1.0, "bm3.alpha": 2.0}) == \
      "seed0_bm3.alpha2_fettle.alpha1"
  assert grid.parse_sweep("fettle.beta=1e-4, 1e-3") == ("fettle.beta", (1e-4, 1e-3))


@pytest.mark.parametrize("settings, message", [
    ([{"seed": 0, "batch_size": 32.0}], "only float fields"),
    ([{"seed": 0, "fettle.nope": 1.0}], "no field 'nope'"),
    ([{"seed": 0, "nosection.beta": 1.0}], "no section 'nosection'"),
    ([{"seed": 0, "fettle.beta": 1.0}, {"seed": 1}], "must set the same fields"),
    ([{"seed": 0.5}], "seed must be an integer"),
    ([{"seed": 0}, {"seed": 0}], "settings repeat"),
    ([], "at least one setting"),
])
def test_bad_grid_is_one_clear_error(settings, message):
  from configs import base  # pylint: disable=g-import-not-at-top
  with pytest.raises(ConfigError, match=message):
    grid.check_settings(base.get_config("bpr"), settings)


def test_sweeping_the_learning_rate_under_the_steps_per_epoch_rule_is_one_clear_error():
  from configs import base  # pylint: disable=g-import-not-at-top
  config = base.get_config("bpr")
  settings = [{"seed": 0, "learning_rate": 1e-3}, {"seed": 0, "learning_rate": 1e-2}]
  assert grid.check_settings(config, settings) == ["learning_rate"]
  config.steps_per_epoch = 16
  with pytest.raises(ConfigError, match="cannot sweep learning_rate"):
    grid.check_settings(config, settings)


def test_sweeping_a_field_the_model_branches_on_is_one_clear_error(tiny_mmrec, tmp_path):
  # FREEDOM's edge dropout decides in Python whether the pruned graph is drawn.
  config = tiny_config(tiny_mmrec, model="freedom")
  config.freedom.prune_every = "step"
  settings = grid.grid_settings({"freedom.dropout": (0.0, 0.5)}, seeds=(0,))
  with pytest.raises(ConfigError, match=r"swept field \(freedom.dropout\) is used as a static"):
    grid.train_grid(config, settings, str(tmp_path / "grid"))


@pytest.mark.parametrize("text", ["fettle.beta", "fettle.beta=", "=1,2", "fettle.beta=a,b"])
def test_bad_sweep_flag_is_one_clear_error(text):
  with pytest.raises(ConfigError, match="expected FIELD=V1,V2"):
    grid.parse_sweep(text)


def fake_result(valid, test, best_epoch=3):
  return {"valid": {"recall@20": valid}, "test": {"recall@20": test, "ndcg@20": test / 2},
          "best_epoch": best_epoch}


def test_summary_groups_seeds_and_marks_the_best_validation_row():
  settings = grid.grid_settings({"fettle.beta": (1e-3, 1e-2)}, seeds=(0, 1))
  # Seeds outermost: (seed0, 1e-3), (seed0, 1e-2), (seed1, 1e-3), (seed1, 1e-2). beta 1e-2
  # has the better validation mean although its test is worse: validation decides.
  results = [fake_result(0.10, 0.30), fake_result(0.20, 0.10),
             fake_result(0.12, 0.32), fake_result(0.22, 0.12)]
  header, low, high = grid.summary_lines(settings, results, "recall@20")
  def cells(line):
    return [cell.strip() for cell in line.split(" | ")]
  assert cells(header)[:4] == ["setting", "seeds", "valid recall@20", "test recall@20"]
  assert cells(low) == ["fettle.beta=0.001", "2", "0.1100 ± 0.0100", "0.3100 ± 0.0100",
                        "0.1550 ± 0.0050", "3"]
  assert high.startswith("fettle.beta=0.01 ") and high.endswith(" *")
  assert not low.endswith("*")


def test_run_py_sweep_and_seeds_train_one_grid_and_print_its_table(monkeypatch, capsys,
                                                                   tmp_path):
  import run  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  calls = []

  def fake_train_grid(config, settings, workdir, chunk):
    calls.append((settings, workdir, chunk))
    return [fake_result(0.1 * (i + 1), 0.2) for i in range(len(settings))]

  monkeypatch.setattr(run.grid, "train_grid", fake_train_grid)
  run.parse_command_line(["run.py", "--sweep=bm3.weight=0.1,1", "--grid_seeds=3,4",
                          "--grid_chunk=2", f"--workdir={tmp_path}", "--compilation_cache=none"])
  try:
    run.main(["run.py"])
  finally:
    flags.FLAGS.unparse_flags()
  settings, workdir, chunk = calls[0]
  assert settings == [{"seed": 3, "bm3.weight": 0.1}, {"seed": 3, "bm3.weight": 1.0},
                      {"seed": 4, "bm3.weight": 0.1}, {"seed": 4, "bm3.weight": 1.0}]
  assert (workdir, chunk) == (str(tmp_path), 2)
  printed = capsys.readouterr().out.strip().splitlines()
  assert printed == (tmp_path / "grid.txt").read_text().strip().splitlines()
  assert len(printed) == 3 and printed[2].startswith("bm3.weight=1 ") and printed[2].endswith("*")


def test_a_swept_bidirectional_threshold_equals_each_concrete_setting():
  """Sec 4.4's theta enters a grid as a traced value: the reverse rows stay in the program
  and are switched per setting, so theta < 0 (one-way) equals the plain one-way loss."""
  from test_alignment import make_config, make_problem  # pylint: disable=g-import-not-at-top
  from fettle_jax.alignment import fettle  # pylint: disable=g-import-not-at-top
  info, reps, features, batch = make_problem(seed=6)
  cfg = make_config()
  params = fettle.init(jax.random.PRNGKey(0), info, cfg)
  thresholds = (-1.0, 0.3)
  keys = ["fettle.bidirectional_threshold"]

  def loss(p, config):
    return fettle.loss(p, reps, features, batch, None, config)

  def traced_loss(p, value):
    return loss(p, grid.traced_config(cfg, keys, value[None]))

  values = jnp.asarray(thresholds)
  together = jax.jit(jax.vmap(jax.value_and_grad(traced_loss, has_aux=True),
                              in_axes=(None, 0)))(params, values)
  for i, theta in enumerate(thresholds):
    concrete = grid.concrete_config(cfg, {"fettle.bidirectional_threshold": theta})
    want = jax.jit(jax.value_and_grad(lambda p, c=concrete: loss(p, c), has_aux=True))(params)
    chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], together), want,
                                atol=1e-5, rtol=1e-5)
  # theta changes the loss: the test is not vacuous.
  assert abs(float(together[0][0][0]) - float(together[0][0][1])) > 1e-4
