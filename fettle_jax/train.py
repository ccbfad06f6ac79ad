"""The training loop: model-agnostic, one compiled program per epoch, resumable.

`train_and_evaluate(config, workdir)` loads the data, builds the backbone and the alignment
plug-in named by the config, trains with early stopping on validation Recall@20, and writes
`<workdir>/metrics.json` with the test metrics of the best *validation* epoch.

Devices: `create_train_state` places the state and static inputs on the `config.mesh`
device mesh (fettle_jax/sharding.py); the compiled epoch and evaluation keep those
shardings, split each batch over 'data', and (model > 1) rank items where their rows live.
In a multi-process run every process trains; process 0 prints and writes the files.
"""

import fcntl
import functools
import json
import os
import statistics
import time
from typing import Any, Dict, NamedTuple

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from data_pipeline import dataset as dataset_lib
from data_pipeline import derived
from data_pipeline import wheels
from fettle_jax import alignment as alignment_lib
from fettle_jax import checkpoint as checkpoint_lib
from fettle_jax import curves
from fettle_jax import evaluation
from fettle_jax import programs
from fettle_jax import sampling
from fettle_jax import sharding
from fettle_jax import backbones as backbone_contract
from fettle_jax.backbones import get_backbone
from fettle_jax.types import Batch, DataInfo
from fettle_jax.errors import ConfigError, WorkdirInUseError, WorkdirWriteError


class TrainState(NamedTuple):
  params: Any       # {"backbone": ..., "alignment": ...}
  opt_state: Any
  model_state: Any  # the backbone's non-trainable state ({} if it keeps none); checkpointed


class StaticInputs(NamedTuple):
  """Every array training and evaluation read but never change: built once, on device once,
  passed as an argument (not closed over: no baked constants) to backbone and alignment."""
  train_pairs: jax.Array     # int32 [n_train, 2]
  seen: sampling.SeenItems   # train items per user, for negative sampling
  features: Dict[str, jax.Array]  # content modality -> [n_items, d_m], the only copy
  graph: Any                 # the backbone's own structures (build_graph), no feature copies


class Experiment(NamedTuple):
  """Everything `create_train_state` builds for one config and data set."""
  config: ml_collections.ConfigDict  # with data-derived static settings filled in
  backbone: Any
  alignment: Any
  info: DataInfo
  static: StaticInputs
  optimizer: optax.GradientTransformation
  state: TrainState
  train_rng: jax.Array
  layout: sharding.Layout  # the mesh; where state and static inputs live


def enable_compilation_cache(path: str = None, traced_programs: bool = False) -> str:
  """Turns on JAX's persistent compilation cache (default: <data cache root>/xla).

  Every compiled program of a run (epoch, evaluation, kNN graph, ...) is stored there, so
  a second run with the same config and data shapes starts training without compiling.
  traced_programs: also keep the traced epoch and evaluation programs in <path>/programs
  (fettle_jax/programs.py), so that a rerun does not trace them either (run.py's choice:
  the library traces by default). Must run before the first compilation in the process.
  """
  path = path or os.path.join(wheels.cache_root(), "xla")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  if traced_programs:
    programs.enable(os.path.join(path, "programs"))
  return path


def load_data(config: ml_collections.ConfigDict) -> dataset_lib.Dataset:
  path = config.data.path
  if config.data.prepare:
    from data_pipeline import prepare  # pylint: disable=g-import-not-at-top
    path = prepare.prepare(config.data.prepare, root=config.data.root or None)
  modalities = list(config.data.modalities) if config.data.modalities is not None else None
  return dataset_lib.load_dataset(path, name=config.data.name or None, modalities=modalities)


def create_train_state(config: ml_collections.ConfigDict,
                       data: dataset_lib.Dataset) -> Experiment:
  """Backbone, alignment, static inputs and the initial train state for `config` on `data`.

  The one place a run is assembled (training, benchmarks and tests share it). Random
  streams: PRNGKey(seed) splits into backbone init, alignment init and training.
  """
  backbone = get_backbone(config.model)
  alignment = alignment_lib.get_alignment(config.alignment)
  if len(data.train) < config.batch_size:  # fewer interactions than one batch: one batch of all
    log(f"note: batch_size {config.batch_size} > {len(data.train)} train interactions; "
        f"training on one batch of {len(data.train)} per epoch")
    config = config.copy_and_resolve_references()
    config.batch_size = len(data.train)
  if hasattr(alignment, "fit_static_shapes"):  # data-derived static shapes, before compiling
    config = alignment.fit_static_shapes(config.copy_and_resolve_references(), data.train,
                                         data.n_users, data.n_items)
  mesh = sharding.make_mesh(config.mesh)
  info = DataInfo(data.n_users, data.n_items, {k: v.shape[1] for k, v in data.features.items()})
  # Built on this process's default device (every process the same), then placed on the mesh.
  graph = backbone.build_graph(data.train, data.n_users, data.n_items, data.features, config)
  if hasattr(backbone, "cached_structures"):  # expensive host structures, cached by the data
    graph = {**graph, **{name: jnp.asarray(value) for name, value in
                         derived.backbone_structures(backbone, config, data, log).items()}}
  static = StaticInputs(
      jnp.asarray(data.train), sampling.seen_items(data.train, data.n_users),
      {k: np.asarray(v, np.float32) for k, v in sorted(data.features.items())}, graph)
  optimizer = make_optimizer(config)
  state, train_rng = init_train_state(backbone, alignment, optimizer, static, info, config)
  layout = sharding.Layout(mesh, sharding.placement(state, sharding.STATE_RULES, mesh),
                           sharding.placement(static, sharding.STATIC_RULES, mesh))
  state, static = layout.state.place(state), layout.static.place(static)
  return Experiment(config, backbone, alignment, info, static, optimizer, state, train_rng,
                    layout)


def init_train_state(backbone, alignment, optimizer, static: StaticInputs, info: DataInfo,
                     config: ml_collections.ConfigDict):
  """(initial TrainState, training rng) of `config.seed`: PRNGKey(seed) splits into
  backbone init, alignment init and training."""
  backbone_rng, alignment_rng, train_rng = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  params = {"backbone": backbone.init(backbone_rng, info, config),
            "alignment": alignment.init(alignment_rng, info, config)}
  model_state = backbone_contract.init_state(backbone, jax.random.fold_in(backbone_rng, 1),
                                             static, info, config)
  return TrainState(params, optimizer.init(params), model_state), train_rng


def make_optimizer(config) -> optax.GradientTransformation:
  return optax.adam(config.learning_rate)


def under_mesh(jitted, mesh):
  """Calls (and lowers) a jitted function under `jax.set_mesh(mesh)`, so code traced inside
  sees the mesh (graphs.propagate_symmetric splits rows over 'model'); `.jitted` is the
  function itself."""
  if mesh is None:
    return jitted

  @functools.wraps(jitted)
  def call(*args):
    with jax.set_mesh(mesh):
      return jitted(*args)

  def lower(*args):
    with jax.set_mesh(mesh):
      return jitted.lower(*args)

  call.lower, call.jitted = lower, jitted
  return call


def make_train_step(backbone, alignment, config, optimizer, layout=None):
  """Returns step(state, static, batch, rng) -> (state, [backbone loss, alignment loss]).

  With a `layout`, the stored (possibly padded) parameters are sliced to their logical
  shapes before the model sees them; `static` must be logical already."""

  def loss_fn(params, model_state, static: StaticInputs, batch: Batch, rng):
    if layout is not None:
      params = sharding.slice_to_shapes(params, layout.state.shapes.params)
    backbone_rng, alignment_rng = jax.random.split(rng)
    reps, backbone_loss = backbone.apply(params["backbone"], model_state, static, batch,
                                         backbone_rng, config)
    alignment_loss, _ = alignment.loss(params["alignment"], reps, static.features, batch,
                                       alignment_rng, config)
    return backbone_loss + alignment_loss, jnp.stack([backbone_loss, alignment_loss])

  def step(state: TrainState, static: StaticInputs, batch: Batch, rng):
    grads, losses = jax.grad(loss_fn, has_aux=True)(state.params, state.model_state, static,
                                                    batch, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return state._replace(params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state), losses

  return step


def train_epoch_fn(backbone, alignment, config, optimizer, info: DataInfo, layout=None):
  """epoch(state, rng, static) -> (state, mean losses), not yet compiled: the backbone's
  epoch hook, then a lax.scan over the batches (fettle_jax/grid.py vmaps it)."""
  step = make_train_step(backbone, alignment, config, optimizer, layout)

  def scan_body(carry, xs):
    state, static, rng = carry
    batch, index = xs
    state, losses = step(state, static, batch, jax.random.fold_in(rng, index))
    return (state, static, rng), losses

  def epoch(state: TrainState, rng, static: StaticInputs):
    if layout is not None:
      static = layout.static.logical(static)
    batch_rng, step_rng = jax.random.split(rng)
    if hasattr(backbone, "epoch_start"):  # per-epoch structure (views, prototypes, pruning)
      params = state.params if layout is None else sharding.slice_to_shapes(
          state.params, layout.state.shapes.params)  # the hook sees logical tables too
      state = state._replace(model_state=backbone.epoch_start(
          params["backbone"], state.model_state, static, info,
          jax.random.fold_in(rng, backbone_contract.EPOCH_HOOK_STREAM), config))
    batches = sampling.epoch_batches(batch_rng, static.train_pairs, static.seen, info.n_items,
                                     config.batch_size)
    if layout is not None:
      batches = layout.constrain_batches(batches)
    n_batch = batches.users.shape[0]
    (state, _, _), losses = jax.lax.scan(scan_body, (state, static, step_rng),
                                         (batches, jnp.arange(n_batch)))
    return state, jnp.mean(losses, axis=0)

  return epoch


def make_train_epoch(backbone, alignment, config, optimizer, info: DataInfo, layout=None):
  """Returns epoch(state, rng, static) -> (state, mean losses), jitted: one compiled
  program per run (per mesh). With a `layout`, inputs and outputs keep its shardings and
  each batch is split over 'data'."""
  epoch = chex.assert_max_traces(n=1)(
      train_epoch_fn(backbone, alignment, config, optimizer, info, layout))
  if layout is None:
    return jax.jit(epoch, donate_argnums=0)
  replicated = layout.replicated()
  return under_mesh(jax.jit(epoch, donate_argnums=0,
                            in_shardings=(layout.state.shardings, replicated,
                                          layout.static.shardings),
                            out_shardings=(layout.state.shardings, replicated)), layout.mesh)


def evaluate_fn(backbone, config, layout=None):
  """evaluate(params, model_state, static, eval_data) -> {metric: [n_splits]}, not yet
  compiled; with a `layout` of model > 1, items are ranked where their rows live (exact
  two-stage top-k)."""
  ks = tuple(config.topk)
  rank_mesh = layout.mesh if layout is not None and layout.model_size > 1 else None

  def evaluate(params, model_state, static: StaticInputs, eval_data: evaluation.EvalData):
    if layout is not None:
      params = sharding.slice_to_shapes(params, layout.state.shapes.params)
      static = layout.static.logical(static)
    reps = backbone.represent(params["backbone"], model_state, static, config)
    return evaluation.evaluate_embeddings(reps.users, reps.items, eval_data, ks,
                                          mesh=rank_mesh)

  return evaluate


def make_evaluate(backbone, config, layout=None):
  """evaluate_fn, jitted (one compiled program per run)."""
  evaluate = chex.assert_max_traces(n=1)(evaluate_fn(backbone, config, layout))
  if layout is None:
    return jax.jit(evaluate)
  return under_mesh(jax.jit(evaluate, out_shardings=layout.replicated()), layout.mesh)


EVAL_RULES = ((r"^(users|valid)$", sharding.P(None, sharding.DATA)),  # users over 'data'
              (r".*", sharding.P()))


def build_eval_data(data: dataset_lib.Dataset, config, layout) -> evaluation.EvalData:
  """Valid and test evaluated in one pass; each batch of users split over 'data' (the batch
  rounded up to a multiple of it), placed on the mesh."""
  eval_data = evaluation.build_eval_data(
      [data.valid, data.test],
      data.train,
      data.n_users, data.n_items, sharding.round_up(config.eval_batch_size, layout.data_size))
  return sharding.placement(eval_data, EVAL_RULES, layout.mesh).place(eval_data)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Every check that needs no data, in one place, before the data loads: one-line
  `ConfigError`s for settings that would otherwise fail deep inside a compiled step."""
  positive = ("batch_size", "eval_batch_size", "embedding_size", "patience",
              "checkpoint_every_epochs")
  for name in positive:
    if config[name] <= 0:
      raise ConfigError(f"config.{name} must be positive, got {config[name]}")
  if config.max_epochs < 0 or config.learning_rate < 0:
    raise ConfigError("config.max_epochs and config.learning_rate must not be negative")
  if not config.topk or min(config.topk) <= 0:
    raise ConfigError(f"config.topk must be positive cut-offs, got {tuple(config.topk)}")
  metric, _, k = config.selection_metric.partition("@")
  if metric not in evaluation.METRICS or not k.isdigit() or int(k) not in config.topk:
    raise ConfigError(f"config.selection_metric {config.selection_metric!r} must be one of "
                      f"{evaluation.METRICS} at a K in config.topk {tuple(config.topk)}")
  sharding.mesh_shape(config.mesh, len(jax.devices()))  # a mesh these devices can form
  backbone = get_backbone(config.model)  # unknown names are ConfigErrors
  alignment = alignment_lib.get_alignment(config.alignment)
  for module, section in ((backbone, config.model), (alignment, config.alignment)):
    if hasattr(module, "check_config"):  # the module's own fields
      module.check_config(config[section])


def check_config_for_data(config: ml_collections.ConfigDict, n_items: int) -> None:
  """The one check that needs the data: every K must fit the catalogue."""
  if max(config.topk) > n_items:
    raise ConfigError(f"config.topk must lie in [1, n_items={n_items}], got "
                      f"{tuple(config.topk)}; pass smaller cut-offs, e.g. --config.topk=5,10")


def median_or_none(values):
  return statistics.median(values) if values else None


def split_metrics(metrics: Dict[str, np.ndarray], index: int) -> Dict[str, float]:
  return {name: float(values[index]) for name, values in sorted(metrics.items())}


class WorkdirLock:
  """An exclusive flock on <workdir>/.lock for the run's lifetime: a second process on the
  same workdir stops with an error instead of interleaving checkpoints. The kernel drops
  the lock when the holder dies (SIGKILL included), so no stale lock survives a crash."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._file = open(self.path, "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = self._file.read().strip() or "?"
      self._file.close()
      raise WorkdirInUseError(f"{workdir}: in use by another run (pid {holder}); wait for it "
                              "or pass another --workdir") from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(str(os.getpid()))
    self._file.flush()

  def release(self) -> None:
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()


class History:
  """<workdir>/history.jsonl: one line per epoch, appended as it happens (a crashed run
  keeps its curve); on resume, lines past the restored epoch are dropped (they re-run)."""

  def __init__(self, workdir: str, restored_epoch: int):
    self.path = os.path.join(workdir, "history.jsonl")
    kept = []
    if os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:  # a line cut short by a kill
            continue
          if record.get("epoch", 0) <= restored_epoch:
            kept.append(line if line.endswith("\n") else line + "\n")
    with open(self.path, "w") as f:
      f.writelines(kept)

  def append(self, record: dict) -> None:
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
    except OSError as e:
      raise WorkdirWriteError(f"{self.path}: cannot append epoch {record.get('epoch')} "
                              f"({e.strerror}); free space and rerun to resume") from e


def initial_loop_state() -> dict:
  return {"epoch": 0, "best_epoch": 0, "best_value": -1.0, "bad_epochs": 0,
          "best_valid": {}, "best_test": {}, "history": [],
          "train_seconds": [], "eval_seconds": []}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains to early stop (or max_epochs) and returns/writes the metrics; holds the
  workdir's lock throughout, so a second process on it stops instead of interleaving."""
  os.makedirs(workdir, exist_ok=True)
  # In a multi-process run every process shares the workdir; the first one holds the lock.
  lock = WorkdirLock(workdir) if is_primary() else None
  try:
    return _train_and_evaluate(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def is_primary() -> bool:
  """Process 0: the one that prints, writes history and metrics (every process trains)."""
  return jax.process_index() == 0


def log(message: str) -> None:
  if is_primary():
    print(message, flush=True)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  # The step functions below are new objects per run; chex counts traces per code location,
  # so reset its counter: within this run each may then trace (compile) exactly once.
  chex.clear_trace_counter()
  check_config(config)
  data = load_data(config)
  check_config_for_data(config, data.n_items)
  log(data.summary())
  run = create_train_state(config, data)
  config, state, layout = run.config, run.state, run.layout
  log(f"mesh: data {layout.data_size} x model {layout.model_size} over "
      f"{layout.mesh.devices.size} {jax.devices()[0].platform} device(s), "
      f"{jax.process_count()} process(es)")
  eval_data = build_eval_data(data, config, layout)
  facts = data_facts(data)
  del data  # the host copies of the features: the device holds the one we train on
  epoch_fn = make_train_epoch(run.backbone, run.alignment, config, run.optimizer,
                              run.info, layout)
  evaluate = make_evaluate(run.backbone, config, layout)
  # With run.py's program cache, a rerun loads both traced programs instead of tracing.
  description = repr((config.to_json_best_effort(sort_keys=True), run.info, facts))
  epoch_fn = programs.cached(epoch_fn, "epoch", description, donate_argnums=0,
                             mesh=layout.mesh)
  evaluate = programs.cached(evaluate, "evaluate", description, mesh=layout.mesh)

  checkpoints = checkpoint_lib.Checkpoints(workdir, layout.state)
  loop = initial_loop_state()
  if checkpoints.latest_epoch() is not None:
    state, loop = checkpoints.restore_latest()
    log(f"resumed from {workdir} at epoch {loop['epoch']}")
  history = History(workdir, loop["epoch"]) if is_primary() else None

  selection = config.selection_metric
  first_epoch = loop["epoch"] + 1
  try:
    while loop["epoch"] < config.max_epochs and loop["bad_epochs"] < config.patience:
      epoch = loop["epoch"] + 1
      start = time.perf_counter()
      # fold_in(epoch): a resumed run draws exactly the batches an uninterrupted one would.
      state, losses = epoch_fn(state, jax.random.fold_in(run.train_rng, epoch), run.static)
      losses = np.asarray(losses)
      train_seconds = time.perf_counter() - start
      if not np.all(np.isfinite(losses)):
        raise FloatingPointError(
            f"epoch {epoch}: loss is {losses.tolist()}; nothing of this epoch was saved (last "
            f"checkpoint: epoch {checkpoints.latest_epoch()}); lower the learning rate or the "
            "alignment weights")
      start = time.perf_counter()
      # One device-to-host transfer for every metric of both splits.
      metrics = jax.device_get(evaluate(state.params, state.model_state, run.static, eval_data))
      valid, test = split_metrics(metrics, 0), split_metrics(metrics, 1)
      eval_seconds = time.perf_counter() - start
      improved, record = record_epoch(loop, epoch, losses, valid, test, selection,
                                      train_seconds, eval_seconds, first_epoch)
      if improved:
        checkpoints.save_best(epoch, state.params, state.model_state)
      if history is not None:
        history.append(record)
      log(f"epoch {epoch:4d} | loss {losses.sum():.5f} (backbone {losses[0]:.5f}, "
          f"alignment {losses[1]:.5f}) | valid {selection} {valid[selection]:.4f}"
          f"{' *' if improved else '  '} | train {train_seconds:.2f}s eval {eval_seconds:.2f}s")
      if epoch % config.checkpoint_every_epochs == 0:
        checkpoints.save_latest(epoch, state, loop)
    if loop["epoch"] % config.checkpoint_every_epochs:
      checkpoints.save_latest(loop["epoch"], state, loop)
  finally:
    checkpoints.close()

  result = run_result(loop, config, facts, layout)
  if is_primary():
    write_result(workdir, result)
  log(final_line(loop))
  return result


def data_facts(data: dataset_lib.Dataset) -> dict:
  return {"name": data.name, "path": data.path, "n_users": data.n_users,
          "n_items": data.n_items, "n_train": len(data.train), "n_valid": len(data.valid),
          "n_test": len(data.test), "modalities": sorted(data.features)}


def record_epoch(loop: dict, epoch: int, losses, valid: dict, test: dict, selection: str,
                 train_seconds: float, eval_seconds: float, first_epoch: int):
  """Early-stopping bookkeeping of one finished epoch (model selection looks at validation
  only); returns (improved, the epoch's history.jsonl record)."""
  improved = valid[selection] > loop["best_value"]
  if improved:
    loop.update(best_epoch=epoch, best_value=valid[selection], bad_epochs=0,
                best_valid=valid, best_test=test)
  else:
    loop["bad_epochs"] += 1
  loop["epoch"] = epoch
  record = {"epoch": epoch, "loss": float(losses[0] + losses[1]),
            "backbone_loss": float(losses[0]), "alignment_loss": float(losses[1]),
            f"valid_{selection}": valid[selection]}
  loop["history"].append(record)
  if epoch > first_epoch:  # this process's first epoch includes compilation
    loop["train_seconds"].append(train_seconds)
    loop["eval_seconds"].append(eval_seconds)
  else:
    loop["first_epoch_seconds"] = train_seconds + eval_seconds
  return improved, dict(record, valid=valid, test=test, train_seconds=train_seconds,
                        eval_seconds=eval_seconds)


def run_result(loop: dict, config, data_facts: dict, layout) -> dict:
  """metrics.json's content: the best validation epoch's metrics and the run's facts."""
  return {
      "best_epoch": loop["best_epoch"],
      "epochs": loop["epoch"],
      "selection_metric": f"valid {config.selection_metric}",
      "valid": loop["best_valid"],
      "test": loop["best_test"],
      # Medians over epochs after compilation (None if only one epoch ran).
      "train_epoch_seconds": median_or_none(loop["train_seconds"]),
      "eval_seconds": median_or_none(loop["eval_seconds"]),
      "first_epoch_seconds": loop.get("first_epoch_seconds"),
      "data": data_facts,
      "devices": [str(d) for d in layout.mesh.devices.flat],
      "mesh": {"data": layout.data_size, "model": layout.model_size,
               "processes": jax.process_count()},
      "history": loop["history"],
      "config": config.to_dict(),
  }


def write_result(workdir: str, result: dict) -> None:
  """metrics.json and the learning curves next to it."""
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(result, f, indent=2, default=str)
  curves.save(workdir, result)  # learning_curves.{csv,png}; a failure is one printed note


def final_line(loop: dict) -> str:
  test = loop["best_test"]
  return (f"best epoch {loop['best_epoch']} of {loop['epoch']}: "
          + " ".join(f"test {k} {test.get(k, float('nan')):.4f}"
                     for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")))
