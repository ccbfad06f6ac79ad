"""Many settings of one experiment in one compiled program (seeds x hyper-parameter grids).

`train_grid(config, settings, workdir)` trains every setting -- a seed and values of float
config fields, e.g. {"seed": 1, "fettle.alpha": 1e-2, "fettle.beta": 1e-3} -- side by
side: the settings' train states are stacked on a leading axis, one jitted `jax.vmap` of
`train.train_epoch_fn` advances all of them, one vmapped evaluation ranks for all. The swept
values enter the program as traced scalars (a copy of the config whose swept leaves are
tracers), so one compilation serves the whole grid.

Training goes through `train.train_loop`, the one loop every run uses (a single run is a
cohort of one setting): validation every config.eval_every epochs, each setting's own
early stopping on its own validation metric, the loop's NaN policy (a setting whose loss
is not finite stops there with its best validation epoch; the others train on). A stopped
setting's slice of the state is frozen (the epoch's update is masked away) and
`<workdir>/<setting name>/` gets what `train.train_and_evaluate` writes for a run --
metrics.json, learning curves, history.jsonl, the best checkpoint -- so the table tools
and `recommend` / `export` read a grid's settings like single runs. A setting equals the
sequential run of its config (same seed: same init, batches, negatives) up to the float
summation order of batched products. With config.valid_users_sample, every setting
selects on the same sample (drawn with the grid's config.seed).

The grid runs on the run's mesh (config.mesh): each setting's slice of the stacked state
is split as a single run's state is, batches over 'data', tables over 'model'.

Memory grows with the number of settings: `chunk` bounds the settings per program (the
chunks run one after another), and a chunk that exhausts device memory before its first
epoch is split in two and retried. A finished setting (metrics.json present) is reused;
an interrupted chunk resumes from `<workdir>/chunks/<id>/checkpoints/latest` (removed once
every setting of the chunk has finished).
"""

import functools
import hashlib
import itertools
import json
import os
import shutil
from typing import Dict, List, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fettle_jax import checkpoint as checkpoint_lib
from fettle_jax import progress
from fettle_jax import sharding
from fettle_jax import train
from fettle_jax import workdir as workdir_lib
from fettle_jax.errors import ConfigError

Setting = Dict[str, float]


def grid_settings(sweeps: Dict[str, Sequence[float]], seeds: Sequence[int]) -> List[Setting]:
  """The cross product of `seeds` and every swept field's values, seeds outermost."""
  keys = sorted(sweeps)
  return [dict({"seed": int(seed)}, **dict(zip(keys, values)))
          for seed in seeds for values in itertools.product(*(sweeps[k] for k in keys))]


def parse_sweep(text: str):
  """'fettle.alpha=1e-4,1e-3' -> ('fettle.alpha', (1e-4, 1e-3)); one-line errors."""
  key, sep, values = text.partition("=")
  try:
    parsed = tuple(float(v) for v in values.split(",") if v.strip())
  except ValueError:
    parsed = ()
  if not sep or not key.strip() or not parsed:
    raise ConfigError(f"--sweep={text!r}: expected FIELD=V1,V2,... with numbers, e.g. "
                      "--sweep=fettle.beta=1e-4,1e-3,1e-2")
  return key.strip(), parsed


def swept_keys(settings: Sequence[Setting]) -> List[str]:
  """The float fields the settings set (every setting must set the same ones)."""
  keys = sorted(set(settings[0]) - {"seed"})
  for setting in settings:
    if sorted(set(setting) - {"seed"}) != keys:
      raise ConfigError(f"grid settings must set the same fields; {sorted(setting)} vs "
                        f"{keys}")
  return keys


def _lookup(config, key: str):
  """(the section holding dotted `key`, its last name); ConfigError if absent."""
  *path, name = key.split(".")
  section = config
  for part in path:
    if part not in section or not isinstance(section[part], ml_collections.ConfigDict):
      raise ConfigError(f"grid field {key!r}: config has no section {part!r}")
    section = section[part]
  if name not in section:
    raise ConfigError(f"grid field {key!r}: config has no field {name!r}")
  return section, name


def check_settings(config, settings: Sequence[Setting]) -> List[str]:
  """One-line errors for settings a grid cannot sweep; returns the swept float fields."""
  if not settings:
    raise ConfigError("a grid needs at least one setting")
  keys = swept_keys(settings)
  for key in keys:
    section, name = _lookup(config, key)
    if not isinstance(section[name], float) or isinstance(section[name], bool):
      raise ConfigError(f"grid field {key!r} is {type(section[name]).__name__} "
                        f"({section[name]!r}); only float fields can be swept in one program "
                        "(seeds via 'seed'); run other settings as separate runs")
  if "learning_rate" in keys and config.steps_per_epoch > 0:
    raise ConfigError("a grid cannot sweep learning_rate with config.steps_per_epoch > 0 (the "
                      "square-root rule rescales it from the data); set steps_per_epoch=0 and "
                      "sweep the rates to use")
  for setting in settings:
    if int(setting.get("seed", config.seed)) != setting.get("seed", config.seed):
      raise ConfigError(f"grid seed must be an integer, got {setting['seed']!r}")
  names = [setting_name(s) for s in settings]
  if len(set(names)) != len(names):
    raise ConfigError(f"grid settings repeat: {sorted(n for n in names if names.count(n) > 1)}")
  return keys


def setting_name(setting: Setting) -> str:
  """Folder name of a setting, e.g. 'seed0_alpha0.001_beta0.01' (dotted names where the
  last parts collide)."""
  keys = sorted(setting, key=lambda k: (k != "seed", k))
  last = [k.split(".")[-1] for k in keys]
  return "_".join(f"{k if last.count(k.split('.')[-1]) > 1 else k.split('.')[-1]}{setting[k]:g}"
                  for k in keys)


def concrete_config(config, setting: Setting):
  """`config` with the setting's seed and values (a plain config of one run)."""
  config = config.copy_and_resolve_references()
  for key, value in setting.items():
    if key == "seed":
      config.seed = int(value)
    else:
      section, name = _lookup(config, key)
      section[name] = float(value)
  return config


def traced_config(config, keys: Sequence[str], values):
  """A copy of `config` whose `keys` hold the traced scalars `values[i]` (inside a vmap:
  the code reads them as it reads floats; Python control flow on them fails loudly)."""
  traced = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
  for i, key in enumerate(keys):
    section, name = _lookup(traced, key)
    section[name] = values[i]
  return traced


def _stack(trees):
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _slice(tree, index: int):
  return jax.tree.map(lambda leaf: leaf[index], tree)


def _select(mask, new, old):
  """Per setting (leading axis), `new` where mask else `old`."""
  return jax.tree.map(
      lambda n, o: jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def make_grid_programs(run: train.Experiment, config, keys: Sequence[str], n: int):
  """(epoch, evaluate, final_evaluate, keep_best), jitted on the run's mesh: the vmapped
  train epoch with masked updates, the vmapped evaluation of the validation passes and
  the one of the selected parameters on every user (used when selection ranks a sample of
  validation users), and the per-setting copy of improved parameters.
  Each setting's slice of the stacked state is placed as a single run's state is
  (`sharding.stacked`), so a grid splits its batches over 'data' and its tables over
  'model' exactly as a single run does."""
  backbone, alignment, info, layout = run.backbone, run.alignment, run.info, run.layout
  states = sharding.stacked(layout.state, n)

  @chex.assert_max_traces(n=1)
  def grid_epoch(states, train_rngs, epoch, static, values, active):
    def one(state, train_rng, setting_values):
      cfg = traced_config(config, keys, setting_values)
      epoch_fn = train.train_epoch_fn(backbone, alignment, cfg, train.make_optimizer(cfg), info,
                                      layout)
      # fold_in(epoch) as a single run: the setting draws a sequential run's batches.
      return epoch_fn(state, jax.random.fold_in(train_rng, epoch), static)
    new_states, losses = jax.vmap(one)(states, train_rngs, values)
    return _select(active, new_states, states), losses

  def grid_evaluate(params, model_states, static, eval_data, values):
    def one(p, model_state, setting_values):
      cfg = traced_config(config, keys, setting_values)
      return train.evaluate_fn(backbone, cfg, layout)(p, model_state, static, eval_data)
    return jax.vmap(one)(params, model_states, values)

  def keep_best(best, params, model_states, improved):
    return _select(improved, (params, model_states), best)

  replicated = layout.replicated()
  # Inputs and outputs keep the stacked placement: each program keeps one input signature
  # epoch after epoch (compiles once).
  epoch = jax.jit(grid_epoch, donate_argnums=0,
                  in_shardings=(states.shardings, replicated, replicated,
                                layout.static.shardings, replicated, replicated),
                  out_shardings=(states.shardings, replicated))
  best = (states.shardings.params, states.shardings.model_state)
  evaluate = jax.jit(chex.assert_max_traces(n=1)(grid_evaluate), out_shardings=replicated)
  return (train.under_mesh(epoch, layout.mesh), train.under_mesh(evaluate, layout.mesh),
          train.under_mesh(jax.jit(grid_evaluate, out_shardings=replicated), layout.mesh),
          train.under_mesh(jax.jit(keep_best, donate_argnums=0, out_shardings=best),
                           layout.mesh))


def _is_out_of_memory(error: BaseException) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error)


def train_grid(config: ml_collections.ConfigDict, settings: Sequence[Setting], workdir: str,
               chunk: Optional[int] = None) -> List[dict]:
  """Trains every setting (see the module docstring); returns their metrics.json contents
  in the order of `settings`. Holds `<workdir>/.lock` throughout."""
  os.makedirs(workdir, exist_ok=True)
  lock = workdir_lib.WorkdirLock(workdir) if progress.is_primary() else None
  try:
    return _train_grid(config, list(settings), workdir, chunk)
  finally:
    if lock is not None:
      lock.release()


def _train_grid(config, settings, workdir, chunk):
  chex.clear_trace_counter()
  train.check_config(config)
  keys = check_settings(config, settings)
  data = train.load_data(config)
  train.check_config_for_data(config, data.n_items)
  progress.log(data.summary())
  run = train.create_train_state(concrete_config(config, settings[0]), data)
  # One validation sample for every setting (the grid's config.seed), so they compare.
  run = run._replace(config=run.config.copy_and_resolve_references())
  run.config.seed = config.seed
  layout = run.layout
  progress.log(f"mesh: data {layout.data_size} x model {layout.model_size} over "
               f"{layout.mesh.devices.size} {jax.devices()[0].platform} device(s)")
  eval_sets = train.build_eval_sets(data, run.config, layout)
  facts = train.data_facts(data)
  del data
  if progress.is_primary():
    # The swept keys and the seed are each setting's own, named in its folder.
    resumable = os.path.isdir(workdir_lib.chunks_dir(workdir)) or any(
        workdir_lib.finished(_setting_dir(workdir, s)) for s in settings)
    workdir_lib.check_same_run(
        workdir, workdir_lib.run_identity(run.config, facts, exclude=sorted(settings[0])),
        resumable)
  size = chunk or len(settings)
  # Chunks are cut from every setting (not only the unfinished ones), so an interrupted
  # chunk finds its own checkpoint again when the grid is rerun.
  queue = [settings[i:i + size] for i in range(0, len(settings), size)]
  while queue:
    part = queue.pop(0)
    if all(workdir_lib.finished(_setting_dir(workdir, s)) for s in part):
      progress.log(f"grid: {len(part)} settings already finished (reused)")
      continue
    try:
      _train_chunk(run, keys, part, workdir, eval_sets, facts)
    except Exception as e:  # pylint: disable=broad-except
      if not _is_out_of_memory(e) or len(part) == 1:
        raise
      half = (len(part) + 1) // 2
      progress.log(f"grid: {len(part)} settings exceed device memory; splitting into "
                   f"{half} + {len(part) - half}")
      queue[:0] = [part[:half], part[half:]]
  results = []
  for setting in settings:
    with open(workdir_lib.metrics_path(_setting_dir(workdir, setting))) as f:
      results.append(json.load(f))
  return results


def _setting_dir(workdir: str, setting: Setting) -> str:
  return workdir_lib.setting_dir(workdir, setting_name(setting))


def _chunk_id(settings) -> str:
  return hashlib.sha1(" ".join(setting_name(s) for s in settings).encode()).hexdigest()[:12]


class GridChunk:
  """The cohort of a chunk of settings (train.Cohort): their states stacked on a leading
  axis, advanced by one vmapped program; best parameters are kept on the devices and
  written to each setting's folder when it stops."""

  def __init__(self, run, keys, settings, workdir, eval_sets, facts):
    self.run, self.keys, self.workdir, self.eval_sets, self.facts = (run, keys, workdir,
                                                                    eval_sets, facts)
    n = len(settings)
    self.settings = settings
    self.configs = [concrete_config(run.config, s) for s in settings]
    self.names = [setting_name(s) for s in settings]
    self.id = _chunk_id(settings)
    self.folders = [_setting_dir(workdir, s) for s in settings]
    layout = run.layout
    values = np.asarray([[s[k] for k in keys] for s in settings], np.float32).reshape(n,
                                                                                   len(keys))
    initial = [train.init_train_state(run.backbone, run.alignment, train.make_optimizer(c),
                                      run.static, run.info, c) for c in self.configs]
    stacked_state = sharding.stacked(layout.state, n)
    host_states = jax.device_get(_stack([state for state, _ in initial]))
    # On the run's mesh, as the programs' outputs will be (one input signature).
    self.states = stacked_state.place(host_states)
    best = stacked_state.place(host_states)
    self.best = (best.params, best.model_state)
    replicated = functools.partial(jax.device_put, device=layout.replicated())
    self.train_rngs = replicated(jnp.stack([rng for _, rng in initial]))
    self.values = replicated(jnp.asarray(values))
    (self.epoch_fn, self.evaluate, self.final_evaluate,
     self.keep_best_fn) = make_grid_programs(run, run.config, keys, n)
    self.chunk_dir = workdir_lib.chunk_dir(workdir, self.id)
    os.makedirs(self.chunk_dir, exist_ok=True)
    with open(os.path.join(self.chunk_dir, "settings.txt"), "w") as f:
      f.write("\n".join(self.names) + "\n")
    self.checkpoints = checkpoint_lib.Checkpoints(self.chunk_dir)
    self.done = [workdir_lib.finished(folder) for folder in self.folders]  # kept as they are
    for folder in self.folders:
      os.makedirs(folder, exist_ok=True)
    self.histories = [None] * n
    self.scalars = [progress.Scalars(workdir_lib.tensorboard_dir(folder),
                                     run.config.tensorboard and not done)
                    for folder, done in zip(self.folders, self.done)]

  def restore(self):
    """(loop states, epoch) of the chunk's latest checkpoint, or fresh ones."""
    loops, epoch = [train.initial_loop_state() for _ in self.settings], 0
    if self.checkpoints.latest_epoch() is not None:
      (self.states, self.best), saved = self.checkpoints.restore_latest(
          like_state=(self.states, self.best))
      loops, epoch = train.upgrade_loop_state(saved), saved["epoch"]
      progress.log(f"grid: resumed {len(loops)} settings from {self.chunk_dir} at epoch "
                   f"{epoch}")
    if progress.is_primary():
      self.histories = [None if self.done[i] else workdir_lib.History(self.folders[i],
                                                                      loops[i]["epoch"])
                        for i in range(len(loops))]
    return loops, epoch

  def advance(self, epoch, active):
    try:
      self.states, losses = self.epoch_fn(self.states, self.train_rngs, epoch,
                                          self.run.static, self.values, jnp.asarray(active))
    except jax.errors.ConcretizationTypeError:
      raise ConfigError(f"a swept field ({', '.join(self.keys)}) is used as a static switch "
                        "(a Python branch or a shape) by the model or alignment; sweep it "
                        "with separate runs") from None
    return np.asarray(losses)

  def validate(self):
    metrics = jax.device_get(self.evaluate(self.states.params, self.states.model_state,
                                           self.run.static, self.eval_sets.selection,
                                           self.values))
    valid = {name: v[:, 0] for name, v in metrics.items()}
    test = None if self.eval_sets.final is not None else {
        name: v[:, 1] for name, v in metrics.items()}
    return valid, test

  def keep_best(self, epoch, improved):
    del epoch
    self.best = self.keep_best_fn(self.best, self.states.params, self.states.model_state,
                                  jnp.asarray(improved))

  def save_latest(self, epoch, loops):
    self.checkpoints.save_latest(epoch, (self.states, self.best),
                                 {"epoch": epoch, "loops": loops})

  def finish(self, indices, loops):
    """Writes each stopped setting's best checkpoint and metrics.json, as a single run's."""
    if self.eval_sets.final is not None:  # the selected epochs, measured on every user
      metrics = jax.device_get(self.final_evaluate(*self.best, self.run.static,
                                                   self.eval_sets.final, self.values))
      for i in indices:
        if loops[i]["best_epoch"] > 0:
          loops[i]["best_valid"] = {name: float(v[i, 0]) for name, v in sorted(metrics.items())}
          loops[i]["best_test"] = {name: float(v[i, 1]) for name, v in sorted(metrics.items())}
    for i in indices:
      if loops[i]["best_epoch"] > 0:
        params, model_state = _slice(self.best, i)
        best_checkpoint = checkpoint_lib.Checkpoints(self.folders[i], self.run.layout.state)
        try:
          best_checkpoint.save_best(loops[i]["best_epoch"], params, model_state)
        finally:
          best_checkpoint.close()
      result = train.run_result(loops[i], self.configs[i], self.facts, self.run.layout,
                                self.eval_sets.sampled_users)
      result["grid"] = {"settings": len(self.settings), "chunk": self.id,
                        "note": "train/eval seconds are those of the whole vmapped chunk"}
      if progress.is_primary():
        workdir_lib.write_result(self.folders[i], result)
      self.done[i] = True

  def close(self):
    self.checkpoints.close()
    for scalars in self.scalars:
      scalars.close()


def _train_chunk(run, keys, settings, workdir, eval_sets, facts):
  """Trains `settings` in one vmapped program, through the one training loop."""
  chex.clear_trace_counter()
  chunk = GridChunk(run, keys, settings, workdir, eval_sets, facts)
  try:
    loops, epoch = chunk.restore()
    progress.log(f"grid: {len(settings)} settings ({', '.join(keys) or 'seeds only'}) in one "
                 "program")
    train.train_loop(chunk, run.config, loops, epoch, list(chunk.done))
  finally:
    chunk.close()
  # Every setting has its folder (metrics, best checkpoint): the chunk's resumable state
  # (all settings' parameters and optimizer moments) is dead weight from here on.
  shutil.rmtree(os.path.join(chunk.chunk_dir, "checkpoints"), ignore_errors=True)


def summary_lines(settings: Sequence[Setting], results: Sequence[dict],
                  selection_metric: str, test_metrics=("recall@20", "ndcg@20")) -> List[str]:
  """The grid as a table: one row per hyper-parameter combination, its seeds' mean ± std of
  the validation selection metric and of the test metrics at each seed's best validation
  epoch. The row with the best mean validation value is marked '*' (model selection looks
  at validation only)."""
  keys = swept_keys(settings)
  groups: Dict[tuple, List[dict]] = {}
  for setting, result in zip(settings, results):
    groups.setdefault(tuple(setting[k] for k in keys), []).append(result)

  def mean_std(values):
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"

  rows, valid_means = [], []
  for combination, group in groups.items():
    valid = [r["valid"].get(selection_metric, float("nan")) for r in group]
    valid_means.append(np.nanmean(valid) if np.any(np.isfinite(valid)) else -np.inf)
    name = " ".join(f"{k}={v:g}" for k, v in zip(keys, combination)) or "(seeds)"
    rows.append([name, str(len(group)), mean_std(valid)]
                + [mean_std([r["test"].get(m, float("nan")) for r in group])
                   for m in test_metrics]
                + [f"{np.mean([r['best_epoch'] for r in group]):.0f}"])
  best = int(np.argmax(valid_means))
  header = (["setting", "seeds", f"valid {selection_metric}"]
            + [f"test {m}" for m in test_metrics] + ["best epoch"])
  widths = [max(len(row[c]) for row in rows + [header]) for c in range(len(header))]
  lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths))]
  for i, row in enumerate(rows):
    lines.append((" | ".join(c.ljust(w) for c, w in zip(row, widths))
                  + (" *" if i == best else "")).rstrip())
  return lines
