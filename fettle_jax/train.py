"""Training: model-agnostic, one compiled program per epoch, resumable; the one loop.

`train_and_evaluate(config, workdir)` loads the data, builds the backbone and the alignment
plug-in named by the config, trains with early stopping on the validation
config.selection_metric, and writes `<workdir>/metrics.json` (fettle_jax/workdir.py) with
the test metrics of the best *validation* epoch.

`train_loop` is the one training loop: a single run (`SingleRun`) and a grid's chunk of
settings (fettle_jax/grid.py) are both a `Cohort` it drives, with the same validation
cadence (config.eval_every), early stopping, NaN policy, history and progress lines.

Devices: `create_train_state` places the state and static inputs on the `config.mesh`
device mesh (fettle_jax/sharding.py); the compiled epoch and evaluation keep those
shardings, split each batch over 'data', and (model > 1) rank items where their rows live.
In a multi-process run every process trains; process 0 reports and writes the files.
"""

import functools
import os
import statistics
import time
from typing import Any, Dict, List, NamedTuple, Optional, Protocol, Tuple

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
from fettle_jax import evaluation
from fettle_jax import programs
from fettle_jax import progress
from fettle_jax import sampling
from fettle_jax import sharding
from fettle_jax import workdir as workdir_lib
from fettle_jax import backbones as backbone_contract
from fettle_jax.backbones import get_backbone
from fettle_jax.types import Batch, DataInfo
from fettle_jax.errors import ConfigError, StopRequested


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
  programs.private_directory(path)  # compiled machine code: private unless the user chose it
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
  config = scaled_batch(config, len(data.train))
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


def scaled_batch(config: ml_collections.ConfigDict, n_train: int) -> ml_collections.ConfigDict:
  """`config` with `steps_per_epoch` applied: batch = n_train / steps_per_epoch rounded up to
  a multiple of 1024 (at most n_train, never below config.batch_size), Adam's rate by the
  square-root rule lr * sqrt(batch / batch_size).

  Graph backbones propagate the whole graph in every step, so at a fixed batch size an
  epoch costs (n_train / batch) x graph size, quadratic in the data; a fixed step count
  keeps it linear. The square-root rule keeps the update's noise scale about constant as
  the batch grows (Krizhevsky, arXiv:1404.5997)."""
  if config.steps_per_epoch <= 0:
    return config
  per_step = -(-n_train // config.steps_per_epoch)
  batch = max(config.batch_size, min(-(-per_step // 1024) * 1024, n_train))
  if batch == config.batch_size:
    return config
  config = config.copy_and_resolve_references()
  config.learning_rate = float(config.learning_rate * (batch / config.batch_size) ** 0.5)
  log(f"steps_per_epoch {config.steps_per_epoch}: batch_size {config.batch_size} -> {batch}, "
      f"learning_rate -> {config.learning_rate:.6g} (square-root rule)")
  config.batch_size = int(batch)
  return config


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


def build_eval_data(data: dataset_lib.Dataset, config, layout,
                    splits=None) -> evaluation.EvalData:
  """Held-out `splits` (default: valid and test) evaluated in one pass; each batch of users
  split over 'data' (the batch rounded up to a multiple of it), placed on the mesh."""
  splits = [data.valid, data.test] if splits is None else splits
  eval_data = evaluation.build_eval_data(
      splits, data.train,
      data.n_users, data.n_items, sharding.round_up(config.eval_batch_size, layout.data_size))
  return sharding.placement(eval_data, EVAL_RULES, layout.mesh).place(eval_data)


def sample_valid_users(valid: np.ndarray, size: int, seed: int) -> np.ndarray:
  """`size` users drawn without replacement from those with validation items, fixed by
  `seed` (sorted); every such user when `size` is 0 or at least their number."""
  users = np.unique(valid[:, 0])
  if size <= 0 or size >= len(users):
    return users
  return np.sort(np.random.default_rng(seed).choice(users, size, replace=False))


class EvalSets(NamedTuple):
  """What each validation pass ranks, and what the selected parameters are finally
  measured on. `final` is None when selection already sees every user: a pass then ranks
  valid and test together (one top-k serves both) and the selected epoch's test metrics
  come with it."""
  selection: evaluation.EvalData  # valid and test (all users), or valid of the sample
  final: Optional[evaluation.EvalData]  # valid and test on every user, or None
  sampled_users: Optional[int]  # validation users in the sample (None: all)


def build_eval_sets(data: dataset_lib.Dataset, config, layout) -> EvalSets:
  """config.valid_users_sample: 0 selects on every validation user; n > 0 on n of them
  drawn with config.seed (the same users at every pass). Test is always every user's."""
  users = sample_valid_users(data.valid, config.valid_users_sample, config.seed)
  if len(users) == len(np.unique(data.valid[:, 0])):
    return EvalSets(build_eval_data(data, config, layout), None, None)
  sample = data.valid[np.isin(data.valid[:, 0], users)]
  return EvalSets(build_eval_data(data, config, layout, [sample]),
                  build_eval_data(data, config, layout), len(users))


def check_config(config: ml_collections.ConfigDict) -> None:
  """Every check that needs no data, in one place, before the data loads: one-line
  `ConfigError`s for settings that would otherwise fail deep inside a compiled step."""
  positive = ("batch_size", "eval_batch_size", "embedding_size", "patience",
              "checkpoint_every_epochs", "eval_every")
  for name in positive:
    if config[name] <= 0:
      raise ConfigError(f"config.{name} must be positive, got {config[name]}")
  if (config.max_epochs < 0 or config.learning_rate < 0 or config.valid_users_sample < 0
      or config.steps_per_epoch < 0):
    raise ConfigError("config.max_epochs, config.learning_rate, config.valid_users_sample and "
                      "config.steps_per_epoch must not be negative")
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


# Progress lines (fettle_jax/progress.py), under the names scripts call them by.
is_primary = progress.is_primary
log = progress.log


# --------------------------------------------------------------------------- the loop
# One loop trains every run: a single run is one setting, a grid (fettle_jax/grid.py) a
# chunk of settings side by side. What differs -- how the epoch and evaluation programs are
# called, where best parameters and results go -- is the `Cohort`'s; what a setting's
# training means -- validation cadence, early stopping, the NaN policy, history, progress
# -- is the loop's, the same for both.


class Cohort(Protocol):
  """S >= 1 settings trained together; the loop calls these, in this order, per epoch."""
  names: List[str]               # per setting, for progress lines ("" for a single run)
  histories: List[Optional[workdir_lib.History]]  # None: not written (finished / not process 0)
  scalars: List[progress.Scalars]

  def advance(self, epoch: int, active: np.ndarray) -> np.ndarray:
    """Trains epoch `epoch` for the `active` settings; their mean losses [S, 2]."""

  def validate(self) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, np.ndarray]]]:
    """(valid, test) metrics of every setting, {name: [S]}; test None when selection
    ranks a sample of the validation users (the test is then measured in `finish`)."""

  def keep_best(self, epoch: int, improved: np.ndarray) -> None:
    """Keeps the current parameters of the `improved` settings as their best."""

  def save_latest(self, epoch: int, loops: List[dict]) -> None:
    """The resumable checkpoint: every setting's state and loop state after `epoch`."""

  def finish(self, indices: List[int], loops: List[dict]) -> None:
    """Writes the results of settings that stopped (their best validation epoch)."""


def initial_loop_state() -> dict:
  return {"epoch": 0, "best_epoch": 0, "best_value": -1.0, "bad_evals": 0,
          "best_valid": {}, "best_test": {}, "history": [],
          "train_seconds": [], "eval_seconds": [], "stop": None}


def upgrade_loop_state(saved: dict) -> List[dict]:
  """The loop states of a 'latest' checkpoint ({"epoch", "loops"}); the earlier single-run
  format, one bare loop state counting patience in 'bad_epochs', still resumes."""
  loops = saved["loops"] if "loops" in saved else [saved]
  for loop in loops:
    if "bad_epochs" in loop:
      loop["bad_evals"] = loop.pop("bad_epochs")
    loop.setdefault("stop", None)
  return loops


def validates(epoch: int, config) -> bool:
  """A validation pass after every config.eval_every epochs, and after the last one."""
  return epoch % config.eval_every == 0 or epoch >= config.max_epochs


def stop_reason(loop: dict, config) -> Optional[str]:
  """Why a setting stops after its latest epoch, or None while it trains on. Early stopping
  counts validation passes without improvement (config.patience of them), never test."""
  if loop["stop"]:
    return loop["stop"]
  if loop["epoch"] >= config.max_epochs:
    return "max_epochs"
  if loop["bad_evals"] >= config.patience:
    return (f"patience: {config.patience} validation passes without a better valid "
            f"{config.selection_metric}")
  return None


# A stop asked for from outside the loop (fettle-train's SIGTERM / SIGINT handler sets it):
# the loop ends after the epoch in progress, once that epoch is checkpointed.
_STOP_REQUEST = {"signal": None}


def request_stop(signal_name: str) -> None:
  _STOP_REQUEST["signal"] = signal_name


def stop_requested() -> Optional[str]:
  return _STOP_REQUEST["signal"]


def train_loop(cohort: Cohort, config, loops: List[dict], epoch: int,
               done: List[bool]) -> int:
  """Trains the cohort's settings from `epoch` until each stops; returns the last epoch.

  Per epoch: every active setting trains one epoch; after every config.eval_every epochs
  (and the last) a validation pass ranks the validation users, and a setting that
  improves its config.selection_metric keeps those parameters as its best. A setting stops
  when max_epochs run out, after config.patience validation passes without improvement,
  or when its loss is not finite; its result is always its best validation epoch.

  NaN policy: a setting whose mean loss over an epoch is not finite (NaN or inf) stops at
  that epoch ("non-finite loss at epoch N", logged as a warning and kept as metrics.json's
  `stop`): the diverged state is never validated and never resumed from (a single run
  does not checkpoint it; a grid freezes that setting's slice), and the setting's result
  is its best validation epoch before it, as for any early stop. Other settings of a grid
  train on; a single run ends normally, with its metrics.json.

  A stop asked for with `request_stop` ends the loop after the epoch in progress: that
  epoch's state is checkpointed (unless every setting stopped there anyway) and
  StopRequested is raised; rerunning resumes from it.
  """
  n = len(loops)
  first_epoch, start_time = epoch + 1, time.perf_counter()
  epoch_seconds = []  # wall time of each epoch of this process, validation included
  bar = None

  def finish_stopped(candidates):
    stopping = [i for i in candidates if not done[i] and stop_reason(loops[i], config)]
    if stopping:
      cohort.finish(stopping, loops)
      for i in stopping:
        done[i] = True

  try:
    finish_stopped(range(n))
    if not all(done):
      log(f"compiling the train step ... (epoch {first_epoch}'s time includes it; a rerun "
          "with the compilation cache loads it instead)")
    bar = progress.EpochBar(config.max_epochs, epoch)  # after the lines it would garble
    while not all(done):
      epoch += 1
      epoch_start = time.perf_counter()
      active = np.array([not d for d in done])
      losses = np.asarray(cohort.advance(epoch, active), np.float64).reshape(n, 2)
      train_seconds = time.perf_counter() - epoch_start
      finite = np.all(np.isfinite(losses), axis=1)
      valid = test = eval_seconds = None
      if validates(epoch, config) and np.any(active & finite):
        start = time.perf_counter()
        valid, test = cohort.validate()
        eval_seconds = time.perf_counter() - start
      improved = record_settings(cohort, loops, epoch, active, losses, valid, test,
                                 (train_seconds, eval_seconds), first_epoch, config)
      if improved.any():
        cohort.keep_best(epoch, improved)
      epoch_seconds.append(time.perf_counter() - epoch_start)
      # Epochs after this process's first (which compiles), the recent ones.
      rate = np.mean(epoch_seconds[1:][-20:] or epoch_seconds)
      patience = patience_left(loops, active, config)
      bar.line(progress.epoch_line(
          epoch, config.max_epochs, epoch_body(cohort, loops, active, losses, valid, improved,
                                               epoch, config),
          patience, train_seconds, eval_seconds, time.perf_counter() - start_time,
          max(0, config.max_epochs - epoch) * rate), epoch, f"patience {patience}")
      stopping = [i for i in np.flatnonzero(active) if stop_reason(loops[i], config)]
      every_one_stops = len(stopping) == int(active.sum())
      saves = np.any(active & finite) and (epoch % config.checkpoint_every_epochs == 0
                                           or every_one_stops or stop_requested())
      if saves:
        cohort.save_latest(epoch, loops)
      finish_stopped(stopping)
      if stop_requested() and not all(done):
        resume = f"resumes from epoch {epoch}" if saves else "resumes from its last checkpoint"
        raise StopRequested(f"{stop_requested()}: stopped after epoch {epoch}; rerunning the "
                            f"same command {resume}", stop_requested())
  finally:
    if bar is not None:
      bar.close()
  return epoch


def record_settings(cohort: Cohort, loops: List[dict], epoch: int, active: np.ndarray,
                    losses: np.ndarray, valid, test, seconds, first_epoch: int,
                    config) -> np.ndarray:
  """The epoch's bookkeeping for each active setting (early stopping, history.jsonl,
  TensorBoard, the NaN policy's stop); returns which settings improved."""
  improved = np.zeros(len(loops), bool)
  for i in np.flatnonzero(active):
    setting_valid = None if valid is None else {k: float(v[i]) for k, v in valid.items()}
    setting_test = None if test is None else {k: float(v[i]) for k, v in test.items()}
    if not np.all(np.isfinite(losses[i])):
      setting_valid = setting_test = None
      loops[i]["stop"] = f"non-finite loss at epoch {epoch}"
      progress.warn(f"{names_prefix(cohort, i)}loss is {losses[i].tolist()} at epoch "
                    f"{epoch}: stopped; its result is its best validation epoch "
                    f"{loops[i]['best_epoch']} (lower the learning rate or the alignment "
                    "weights)")
    improved[i], record = record_epoch(loops[i], epoch, losses[i], setting_valid,
                                       setting_test, config.selection_metric, *seconds,
                                       first_epoch)
    if cohort.histories[i] is not None:
      cohort.histories[i].append(record)
    cohort.scalars[i].epoch(epoch, losses[i], setting_valid)
  return improved


def names_prefix(cohort: Cohort, i: int) -> str:
  return f"setting {cohort.names[i]}: " if cohort.names[i] else ""


def patience_left(loops: List[dict], active: np.ndarray, config) -> str:
  """Validation passes left before early stopping, of config.patience ('lo-hi' over a
  grid's active settings)."""
  left = [config.patience - loops[i]["bad_evals"] for i in np.flatnonzero(active)
          if not loops[i]["stop"]] or [0]
  low, high = min(left), max(left)
  return (f"{low}" if low == high else f"{low}-{high}") + f"/{config.patience}"


def epoch_body(cohort, loops, active, losses, valid, improved, epoch, config) -> str:
  """The middle of an epoch line: a single run's losses and validation value, or a grid's
  settings still training and its best validation value so far."""
  selection = config.selection_metric
  if len(loops) == 1:
    total = losses[0].sum()
    text = (f"loss {total:.5f} (backbone {losses[0, 0]:.5f}, alignment {losses[0, 1]:.5f})")
    if valid is not None:
      text += (f" | valid {selection} {float(valid[selection][0]):.4f}"
               f"{' *' if improved[0] else '  '}")
    else:
      following = min(config.max_epochs, -(-(epoch + 1) // config.eval_every)
                      * config.eval_every)
      text += f" | valid at epoch {following}"
    return text
  values = [loop["best_value"] for loop in loops]
  top = int(np.argmax(values))
  best = (f"best valid {selection} {values[top]:.4f} ({cohort.names[top]})"
          if loops[top]["best_epoch"] else "no validation pass yet")
  return f"{int(active.sum())}/{len(loops)} settings training | {best}"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains to early stop (or max_epochs) and returns/writes the metrics; holds the
  workdir's lock throughout, so a second process on it stops instead of interleaving."""
  os.makedirs(workdir, exist_ok=True)
  # In a multi-process run every process shares the workdir; the first one holds the lock.
  lock = workdir_lib.WorkdirLock(workdir) if is_primary() else None
  try:
    return _train_and_evaluate(config, workdir)
  finally:
    if lock is not None:
      lock.release()


class SingleRun:
  """The cohort of one setting: the run's jitted epoch and evaluation on its mesh; best
  parameters go to `<workdir>/checkpoints/best` as soon as they improve."""

  def __init__(self, run: Experiment, workdir: str, eval_sets: EvalSets, facts: dict):
    self.run, self.workdir, self.eval_sets, self.facts = run, workdir, eval_sets, facts
    config, layout = run.config, run.layout
    epoch_fn = make_train_epoch(run.backbone, run.alignment, config, run.optimizer, run.info,
                                layout)
    evaluate = make_evaluate(run.backbone, config, layout)
    # With run.py's program cache, a rerun loads both traced programs instead of tracing.
    description = repr((config.to_json_best_effort(sort_keys=True), run.info, facts))
    self.epoch_fn = programs.cached(epoch_fn, "epoch", description, donate_argnums=0,
                                    mesh=layout.mesh)
    self.evaluate = programs.cached(evaluate, "evaluate", description, mesh=layout.mesh)
    self.checkpoints = checkpoint_lib.Checkpoints(workdir, layout.state)
    self.state = run.state
    self.names = [""]
    self.histories = [None]
    self.scalars = [progress.Scalars(workdir_lib.tensorboard_dir(workdir), config.tensorboard)]
    self.result = None

  def restore(self):
    """(loop states, epoch) of the latest checkpoint, or None for a fresh run."""
    if self.checkpoints.latest_epoch() is None:
      return None
    self.state, saved = self.checkpoints.restore_latest()
    loops = upgrade_loop_state(saved)
    return loops, loops[0]["epoch"]

  def advance(self, epoch, active):
    del active  # called only while the run trains
    # fold_in(epoch): a resumed run draws exactly the batches an uninterrupted one would.
    self.state, losses = self.epoch_fn(self.state, jax.random.fold_in(self.run.train_rng,
                                                                      epoch), self.run.static)
    return np.asarray(losses)[None]

  def validate(self):
    # One device-to-host transfer for every metric of every split.
    metrics = jax.device_get(self.evaluate(self.state.params, self.state.model_state,
                                           self.run.static, self.eval_sets.selection))
    valid = {name: values[:1] for name, values in metrics.items()}
    test = None if self.eval_sets.final is not None else {
        name: values[1:2] for name, values in metrics.items()}
    return valid, test

  def keep_best(self, epoch, improved):
    if improved[0]:
      self.checkpoints.save_best(epoch, self.state.params, self.state.model_state)

  def save_latest(self, epoch, loops):
    self.checkpoints.save_latest(epoch, self.state, {"epoch": epoch, "loops": loops})

  def finish(self, indices, loops):
    del indices
    loop = loops[0]
    if self.eval_sets.final is not None and loop["best_epoch"] > 0:
      loop["best_valid"], loop["best_test"] = self.final_metrics()
    self.result = run_result(loop, self.run.config, self.facts, self.run.layout,
                             self.eval_sets.sampled_users)
    if is_primary():
      workdir_lib.write_result(self.workdir, self.result)

  def final_metrics(self):
    """Valid and test on every user, of the best checkpoint's parameters."""
    params, model_state = self.checkpoints.restore_best()
    if model_state is None:  # the backbone keeps no state its ranking reads
      model_state = self.state.model_state
    evaluate = make_evaluate(self.run.backbone, self.run.config, self.run.layout)
    metrics = jax.device_get(evaluate(params, model_state, self.run.static,
                                      self.eval_sets.final))
    return split_metrics(metrics, 0), split_metrics(metrics, 1)

  def close(self):
    self.checkpoints.close()
    for scalars in self.scalars:
      scalars.close()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  # The step functions below are new objects per run; chex counts traces per code location,
  # so reset its counter: within this run each may then trace (compile) exactly once.
  chex.clear_trace_counter()
  check_config(config)
  data = load_data(config)
  check_config_for_data(config, data.n_items)
  log(data.summary())
  run = create_train_state(config, data)
  config, layout = run.config, run.layout
  log(f"mesh: data {layout.data_size} x model {layout.model_size} over "
      f"{layout.mesh.devices.size} {jax.devices()[0].platform} device(s), "
      f"{jax.process_count()} process(es)")
  eval_sets = build_eval_sets(data, config, layout)
  if eval_sets.sampled_users:
    log(f"model selection on {eval_sets.sampled_users} sampled validation users (seed "
        f"{config.seed}); the selected epoch is then measured on every user")
  facts = data_facts(data)
  del data  # the host copies of the features: the device holds the one we train on
  cohort = SingleRun(run, workdir, eval_sets, facts)
  try:
    if is_primary():
      workdir_lib.check_same_run(
          workdir, workdir_lib.run_identity(config, facts),
          cohort.checkpoints.latest_epoch() is not None or workdir_lib.finished(workdir))
    loops, epoch = [initial_loop_state()], 0
    restored = cohort.restore()
    if restored is not None:
      loops, epoch = restored
      log(f"resumed from {workdir} at epoch {epoch}")
    if is_primary():
      cohort.histories = [workdir_lib.History(workdir, epoch)]
    train_loop(cohort, config, loops, epoch, [False])
  finally:
    cohort.close()
  log(final_line(loops[0]))
  return cohort.result


def data_facts(data: dataset_lib.Dataset) -> dict:
  return {"name": data.name, "path": data.path, "n_users": data.n_users,
          "n_items": data.n_items, "n_train": len(data.train), "n_valid": len(data.valid),
          "n_test": len(data.test), "modalities": sorted(data.features)}


def record_epoch(loop: dict, epoch: int, losses, valid: Optional[dict], test: Optional[dict],
                 selection: str, train_seconds: float, eval_seconds: Optional[float],
                 first_epoch: int):
  """Early-stopping bookkeeping of one finished epoch (model selection looks at validation
  only; `valid` is None on an epoch without a validation pass, `test` None when the pass
  ranked a sample of validation users); returns (improved, the epoch's history.jsonl
  record)."""
  improved = valid is not None and valid[selection] > loop["best_value"]
  if improved:
    loop.update(best_epoch=epoch, best_value=valid[selection], bad_evals=0,
                best_valid=valid, best_test=test or {})
  elif valid is not None:
    loop["bad_evals"] += 1
  loop["epoch"] = epoch
  record = {"epoch": epoch, "loss": float(losses[0] + losses[1]),
            "backbone_loss": float(losses[0]), "alignment_loss": float(losses[1])}
  if valid is not None:
    record[f"valid_{selection}"] = valid[selection]
  loop["history"].append(record)
  epoch_seconds = train_seconds + (eval_seconds or 0.0)
  if epoch > first_epoch:  # this process's first epoch includes compilation
    loop["train_seconds"].append(train_seconds)
    if eval_seconds is not None:
      loop["eval_seconds"].append(eval_seconds)
  elif epoch == first_epoch:
    loop["first_epoch_seconds"] = epoch_seconds
  details = {"train_seconds": train_seconds}
  if valid is not None:
    details.update(valid=valid, eval_seconds=eval_seconds)
  if test is not None:
    details["test"] = test
  return improved, dict(record, **details)


def run_result(loop: dict, config, data_facts: dict, layout,
               sampled_users: Optional[int] = None) -> dict:
  """metrics.json's content: the best validation epoch's metrics and the run's facts."""
  selection = f"valid {config.selection_metric}"
  if sampled_users:
    selection += f" on {sampled_users} sampled validation users"
  return {
      "best_epoch": loop["best_epoch"],
      "epochs": loop["epoch"],
      "selection_metric": selection,
      "stop": loop["stop"] or stop_reason(loop, config),
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


def final_line(loop: dict) -> str:
  test = loop["best_test"]
  if not test:  # max_epochs 0, or a loss that diverged before the first validation
    return (f"best epoch {loop['best_epoch']} of {loop['epoch']}: no validated epoch, so no "
            "test metrics")
  return (f"best epoch {loop['best_epoch']} of {loop['epoch']}: "
          + " ".join(f"test {k} {test.get(k, float('nan')):.4f}"
                     for k in ("recall@10", "recall@20", "ndcg@10", "ndcg@20")))
