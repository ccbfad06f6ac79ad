"""Many settings of one experiment in one compiled program (seeds x hyper-parameter grids).

`train_grid(config, settings, workdir)` trains every setting -- a seed and values of float
config fields, e.g. {"seed": 1, "fettle.alpha": 1e-2, "fettle.beta": 1e-3} -- side by
side: the settings' train states are stacked on a leading axis, one jitted `jax.vmap` of
`train.train_epoch_fn` advances all of them, one vmapped evaluation ranks for all. The swept
values enter the program as traced scalars (a copy of the config whose swept leaves are
tracers), so one compilation serves the whole grid.

Each setting stops early on its own validation metric: once its patience (or max_epochs)
runs out its slice of the state is frozen (the epoch's update is masked away) and
`<workdir>/<setting name>/` gets what `train.train_and_evaluate` writes for a run --
metrics.json, learning curves, history.jsonl, the best checkpoint -- so the table tools
and `recommend` / `export` read a grid's settings like single runs. A setting equals the
sequential run of its config (same seed: same init, batches, negatives) up to the float
summation order of batched products.

Memory grows with the number of settings: `chunk` bounds the settings per program (the
chunks run one after another), and a chunk that exhausts device memory before its first
epoch is split in two and retried. A finished setting (metrics.json present) is reused;
an interrupted chunk resumes from `<workdir>/chunks/<id>/checkpoints/latest` (removed once
every setting of the chunk has finished).
Single-device only for now: a mesh of several devices is a ConfigError.
"""

import functools
import hashlib
import itertools
import json
import os
import shutil
import time
from typing import Dict, List, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fettle_jax import checkpoint as checkpoint_lib
from fettle_jax import train
from fettle_jax.errors import ConfigError

Setting = Dict[str, float]
# The named jax.vmap axis of the settings (config.grid_axis): code whose compiled branch
# depends on the data (FETTLE's prefix bucket) chooses it jointly over this axis.
GRID_AXIS = "settings"


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


def make_grid_programs(run: train.Experiment, config, keys: Sequence[str]):
  """(epoch, evaluate, keep_best), jitted: the vmapped train epoch with masked updates,
  the vmapped evaluation, and the per-setting copy of improved parameters."""
  backbone, alignment, info = run.backbone, run.alignment, run.info

  @chex.assert_max_traces(n=1)
  def grid_epoch(states, train_rngs, epoch, static, values, active):
    def one(state, train_rng, setting_values):
      cfg = traced_config(config, keys, setting_values)
      epoch_fn = train.train_epoch_fn(backbone, alignment, cfg, train.make_optimizer(cfg), info)
      # fold_in(epoch) as in train_and_evaluate: the setting draws a sequential run's batches.
      return epoch_fn(state, jax.random.fold_in(train_rng, epoch), static)
    new_states, losses = jax.vmap(one, axis_name=GRID_AXIS)(states, train_rngs, values)
    return _select(active, new_states, states), losses

  @chex.assert_max_traces(n=1)
  def grid_evaluate(params, model_states, static, eval_data, values):
    def one(p, model_state, setting_values):
      cfg = traced_config(config, keys, setting_values)
      return train.evaluate_fn(backbone, cfg)(p, model_state, static, eval_data)
    return jax.vmap(one, axis_name=GRID_AXIS)(params, model_states, values)

  def keep_best(best, params, model_states, improved):
    return _select(improved, (params, model_states), best)

  # Everything on the run's one device, inputs and outputs alike: each program keeps one
  # input signature epoch after epoch (compiles once).
  on_device = run.layout.replicated()
  jit = functools.partial(jax.jit, in_shardings=on_device, out_shardings=on_device)
  return (jit(grid_epoch, donate_argnums=0), jit(grid_evaluate),
          jit(keep_best, donate_argnums=0))


def _is_out_of_memory(error: BaseException) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error) or "Out of memory" in str(error)


def train_grid(config: ml_collections.ConfigDict, settings: Sequence[Setting], workdir: str,
               chunk: Optional[int] = None) -> List[dict]:
  """Trains every setting (see the module docstring); returns their metrics.json contents
  in the order of `settings`. Holds `<workdir>/.lock` throughout."""
  os.makedirs(workdir, exist_ok=True)
  lock = train.WorkdirLock(workdir)
  try:
    return _train_grid(config, list(settings), workdir, chunk)
  finally:
    lock.release()


def _train_grid(config, settings, workdir, chunk):
  chex.clear_trace_counter()
  train.check_config(config)
  keys = check_settings(config, settings)
  data = train.load_data(config)
  train.check_config_for_data(config, data.n_items)
  train.log(data.summary())
  run = train.create_train_state(concrete_config(config, settings[0]), data)
  if run.layout.mesh.devices.size != 1:
    raise ConfigError(f"a grid runs on one device; config.mesh gives "
                      f"{run.layout.mesh.devices.size} (pass --config.mesh.data=1 "
                      "--config.mesh.model=1)")
  eval_data = train.build_eval_data(data, run.config, run.layout)
  facts = train.data_facts(data)
  del data
  size = chunk or len(settings)
  # Chunks are cut from every setting (not only the unfinished ones), so an interrupted
  # chunk finds its own checkpoint again when the grid is rerun.
  queue = [settings[i:i + size] for i in range(0, len(settings), size)]
  while queue:
    part = queue.pop(0)
    if all(os.path.exists(_metrics_file(workdir, s)) for s in part):
      train.log(f"grid: {len(part)} settings already finished (reused)")
      continue
    try:
      _train_chunk(run, keys, part, workdir, eval_data, facts)
    except Exception as e:  # pylint: disable=broad-except
      if not _is_out_of_memory(e) or len(part) == 1:
        raise
      half = (len(part) + 1) // 2
      train.log(f"grid: {len(part)} settings exceed device memory; splitting into "
                f"{half} + {len(part) - half}")
      queue[:0] = [part[:half], part[half:]]
  results = []
  for setting in settings:
    with open(_metrics_file(workdir, setting)) as f:
      results.append(json.load(f))
  return results


def _metrics_file(workdir: str, setting: Setting) -> str:
  return os.path.join(workdir, setting_name(setting), "metrics.json")


def _chunk_id(settings) -> str:
  return hashlib.sha1(" ".join(setting_name(s) for s in settings).encode()).hexdigest()[:12]


def _train_chunk(run, keys, settings, workdir, eval_data, facts):
  """Trains `settings` in one vmapped program until each one stops."""
  chex.clear_trace_counter()
  base = run.config.copy_and_resolve_references()
  base.grid_axis = GRID_AXIS
  n = len(settings)
  configs = [concrete_config(run.config, s) for s in settings]
  names = [setting_name(s) for s in settings]
  values = jnp.asarray([[s[k] for k in keys] for s in settings], jnp.float32).reshape(n,
                                                                                    len(keys))
  initial = [train.init_train_state(run.backbone, run.alignment, train.make_optimizer(c),
                                    run.static, run.info, c) for c in configs]
  # On the run's device and mesh, as the programs' outputs will be (one input signature).
  place = functools.partial(jax.device_put, device=run.layout.replicated())
  states = place(_stack([state for state, _ in initial]))
  train_rngs = place(jnp.stack([rng for _, rng in initial]))
  best = place(jax.tree.map(jnp.copy, (states.params, states.model_state)))
  values = place(values)
  epoch_fn, evaluate, keep_best = make_grid_programs(run, base, keys)

  chunk_dir = os.path.join(workdir, "chunks", _chunk_id(settings))
  os.makedirs(chunk_dir, exist_ok=True)
  with open(os.path.join(chunk_dir, "settings.txt"), "w") as f:
    f.write("\n".join(names) + "\n")
  checkpoints = checkpoint_lib.Checkpoints(chunk_dir)
  loops, epoch = [train.initial_loop_state() for _ in settings], 0
  if checkpoints.latest_epoch() is not None:
    (states, best), saved = checkpoints.restore_latest(like_state=(states, best))
    loops, epoch = saved["loops"], saved["epoch"]
    train.log(f"grid: resumed {n} settings from {chunk_dir} at epoch {epoch}")
  done = [os.path.exists(_metrics_file(workdir, s)) for s in settings]  # kept as they are
  for name in names:
    os.makedirs(os.path.join(workdir, name), exist_ok=True)
  histories = [None if done[i] else train.History(os.path.join(workdir, names[i]),
                                                  loops[i]["epoch"]) for i in range(n)]

  def stopped(i):
    return loops[i]["epoch"] >= base.max_epochs or loops[i]["bad_epochs"] >= base.patience

  def finish(i):
    """Writes setting i's best checkpoint and metrics.json, as a single run would."""
    setting_dir = os.path.join(workdir, names[i])
    if loops[i]["best_epoch"] > 0:
      params, model_state = _slice(best, i)
      best_checkpoint = checkpoint_lib.Checkpoints(setting_dir)
      try:
        best_checkpoint.save_best(loops[i]["best_epoch"], params, model_state)
      finally:
        best_checkpoint.close()
    result = train.run_result(loops[i], configs[i], facts, run.layout)
    result["grid"] = {"settings": n, "chunk": _chunk_id(settings),
                      "note": "train/eval seconds are those of the whole vmapped chunk"}
    train.write_result(setting_dir, result)
    done[i] = True

  selection = base.selection_metric
  first_epoch = epoch + 1
  train.log(f"grid: {n} settings ({', '.join(keys) or 'seeds only'}) in one program")
  try:
    for i in range(n):
      if stopped(i) and not done[i]:
        finish(i)
    while not all(done):
      epoch += 1
      active = np.array([not (done[i] or stopped(i)) for i in range(n)])
      start = time.perf_counter()
      try:
        states, losses = epoch_fn(states, train_rngs, epoch, run.static, values,
                                  jnp.asarray(active))
      except jax.errors.ConcretizationTypeError:
        raise ConfigError(f"a swept field ({', '.join(keys)}) is used as a static switch (a "
                          "Python branch or a shape) by the model or alignment; sweep it "
                          "with separate runs") from None
      losses = np.asarray(losses)
      train_seconds = time.perf_counter() - start
      start = time.perf_counter()
      metrics = jax.device_get(evaluate(states.params, states.model_state, run.static,
                                        eval_data, values))
      eval_seconds = time.perf_counter() - start
      improved = np.zeros(n, bool)
      for i in np.flatnonzero(active):
        if not np.all(np.isfinite(losses[i])):
          train.log(f"grid: setting {names[i]} stopped at epoch {epoch}: loss is "
                    f"{losses[i].tolist()}; its metrics keep its best epoch "
                    f"{loops[i]['best_epoch']}")
          loops[i]["bad_epochs"] = base.patience  # stops it; other settings go on
          continue
        valid = {name: float(v[i, 0]) for name, v in sorted(metrics.items())}
        test = {name: float(v[i, 1]) for name, v in sorted(metrics.items())}
        improved[i], record = train.record_epoch(loops[i], epoch, losses[i], valid, test,
                                                 selection, train_seconds, eval_seconds,
                                                 first_epoch)
        histories[i].append(record)
      best = keep_best(best, states.params, states.model_state, jnp.asarray(improved))
      values_now = [loops[i]["best_value"] for i in range(n)]
      top = int(np.argmax(values_now))
      train.log(f"epoch {epoch:4d} | {int(active.sum())}/{n} settings training | best valid "
                f"{selection} {values_now[top]:.4f} ({names[top]}) | train "
                f"{train_seconds:.2f}s eval {eval_seconds:.2f}s")
      if epoch % base.checkpoint_every_epochs == 0 or all(done[i] or stopped(i) for i in range(n)):
        checkpoints.save_latest(epoch, (states, best), {"epoch": epoch, "loops": loops})
      for i in range(n):
        if stopped(i) and not done[i]:
          finish(i)
  finally:
    checkpoints.close()
  # Every setting has its folder (metrics, best checkpoint): the chunk's resumable state
  # (all settings' parameters and optimizer moments) is dead weight from here on.
  shutil.rmtree(os.path.join(chunk_dir, "checkpoints"), ignore_errors=True)


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
