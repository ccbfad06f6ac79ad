"""Every Orbax call of the project lives here (its v1 API is coming; one place to change).

Two managers in the run folder's checkpoint folder (its path: fettle_jax/workdir.py):
`latest` (training state + loop state, for resuming; the two newest are kept, so an
unreadable newest one falls back to the one before) and `best` (parameters of the best
validation epoch).

Orbax writes a step into a temporary folder and renames it when complete, so a process
killed mid-save leaves no half step behind (the temporary folder is removed at the next
start). A write that fails (full disk, file-size limit) raises `CheckpointWriteError`
and leaves the earlier checkpoints as they were.

Checkpoints hold logical shapes (no mesh padding, see `sharding.Placement.storage`) and
restore onto the current run's mesh: a run saved on 8x1 resumes on 2x4 or on one device.
Every process of a multi-process run calls save and restore (Orbax coordinates them).
"""

import os
from typing import Any, Optional, Tuple

from absl import logging
import jax
import orbax.checkpoint as ocp

from fettle_jax import sharding
from fettle_jax import workdir as workdir_lib
from fettle_jax.errors import CheckpointWriteError, NoReadableCheckpointError


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"


def _is_write_failure(error: BaseException) -> bool:
  """An OSError, or the ValueError tensorstore raises for a failed write (its status text
  says so, e.g. 'OUT_OF_RANGE: Error writing ... Failed writing' under a file-size limit)."""
  if isinstance(error, OSError):
    return True
  text = str(error)
  return any(marker in text for marker in ("Error writing", "Failed writing",
                                           "RESOURCE_EXHAUSTED", "No space left"))


class _Storage:
  """How one pytree goes to and comes from disk: the abstract tree Orbax restores onto
  (logical shapes, the current mesh's storage shardings) and the pad/unpad programs."""

  def __init__(self, placement: Optional[sharding.Placement], like: Any = None):
    if placement is None:  # no mesh given: restore onto `like` as it is
      self.to_storage = self.from_storage = None
      self.abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
      return
    shardings, self.to_storage, self.from_storage = placement.storage()
    self.abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        placement.shapes, shardings)

  def save_form(self, tree):
    return tree if self.to_storage is None else self.to_storage(tree)

  def run_form(self, tree):
    return tree if self.from_storage is None else self.from_storage(tree)


class Checkpoints:
  """Latest and best checkpoints of one run; `placement` (the train state's) says where
  restored arrays go and which are stored padded."""

  def __init__(self, workdir: str, placement: Optional[sharding.Placement] = None):
    root = workdir_lib.checkpoints_dir(workdir)
    self.root = root
    self._state = self._params = self._model_state = None
    if placement is not None:  # built once: the pad/unpad programs compile once per run
      self._state = _Storage(placement)
      self._params = _Storage(sharding.Placement(placement.shardings.params,
                                                 placement.shapes.params))
      self._model_state = _Storage(sharding.Placement(placement.shardings.model_state,
                                                      placement.shapes.model_state))

    def options(keep):
      # Synchronous saves: the train step donates the state buffers, so a background write
      # could otherwise read a buffer the next epoch already reuses (CPU arrays are not
      # copied).
      return ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                          enable_async_checkpointing=False,
                                          cleanup_tmp_directories=True)

    self._latest = ocp.CheckpointManager(os.path.join(root, "latest"), options=options(2))
    self._best = ocp.CheckpointManager(os.path.join(root, "best"), options=options(1))

  def latest_epoch(self) -> Optional[int]:
    return self._latest.latest_step()

  def save_latest(self, epoch: int, state: Any, loop_state: dict) -> None:
    state = (self._state or _Storage(None, state)).save_form(state)
    self._save(self._latest, epoch, ocp.args.Composite(
        state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop_state)))

  def restore_latest(self, like_state: Any = None) -> Tuple[Any, dict]:
    """The newest readable (state, loop state), restored onto the placement's mesh (or, with
    none, the structure, shapes, dtypes and shardings of `like_state`); an unreadable newer
    step is skipped with a warning."""
    storage = self._state or _Storage(None, like_state)
    abstract = storage.abstract
    failures = []
    for step in sorted(self._latest.all_steps(), reverse=True):
      try:
        restored = self._latest.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), loop=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  # any corruption: try older
        logging.warning("checkpoint of epoch %d is unreadable (%s); falling back to the one "
                        "before", step, _first_line(e))
        failures.append(step)
        continue
      if restored.loop.get("epoch") != step:
        failures.append(step)
        continue
      for bad in failures:  # re-run epochs are saved afresh, not skipped as existing steps
        self._latest.delete(bad)
      return storage.run_form(restored.state), restored.loop
    raise NoReadableCheckpointError(
        f"{self.root}/latest: no readable checkpoint (tried epochs {failures}); move the "
        "workdir away to start over")

  def save_best(self, epoch: int, params: Any, model_state: Any = None) -> None:
    """The best epoch's parameters and the non-trainable state its ranking read (a
    backbone's `represent` may read it, e.g. LATTICE's learned neighbours)."""
    # A resumed run re-runs the epochs after its last 'latest' step and may reach a best
    # epoch saved before the interruption again: replace it (same seed, same parameters).
    if epoch in self._best.all_steps():
      self._best.delete(epoch)
    params = (self._params or _Storage(None, params)).save_form(params)
    items = {"params": ocp.args.StandardSave(params)}
    if jax.tree.leaves(model_state):  # Orbax refuses empty items; most backbones keep none
      model_state = (self._model_state or _Storage(None, model_state)).save_form(model_state)
      items["model_state"] = ocp.args.StandardSave(model_state)
    self._save(self._best, epoch, ocp.args.Composite(**items))

  def restore_best(self, like_params: Any = None,
                   like_model_state: Any = None) -> Tuple[Any, Optional[Any]]:
    """(params, model_state) of the best epoch; model_state is None if the checkpoint holds
    none (a backbone without state, or a run saved before the state was kept)."""
    step = self._best.latest_step()
    params_storage = self._params or _Storage(None, like_params)
    items = {"params": ocp.args.StandardRestore(params_storage.abstract)}
    state_storage = None
    if os.path.isdir(os.path.join(self.root, "best", str(step), "model_state")):
      state_storage = self._model_state or _Storage(None, like_model_state)
      items["model_state"] = ocp.args.StandardRestore(state_storage.abstract)
    restored = self._best.restore(step, args=ocp.args.Composite(**items))
    model_state = None if state_storage is None else state_storage.run_form(
        restored.model_state)
    return params_storage.run_form(restored.params), model_state

  @staticmethod
  def _save(manager, epoch: int, args) -> None:
    try:
      manager.save(epoch, args=args)
      manager.wait_until_finished()
    except (OSError, ValueError) as e:  # disk full, quota, file-size limit, ...
      if not _is_write_failure(e):
        raise  # anything else is a bug: keep its traceback
      raise CheckpointWriteError(
          f"epoch {epoch}: could not write the checkpoint to {manager.directory} "
          f"({_first_line(e)}); the earlier checkpoints are intact, free space and rerun "
          "to resume") from e

  def close(self) -> None:
    for manager in (self._latest, self._best):
      try:
        manager.wait_until_finished()
      finally:
        manager.close()
