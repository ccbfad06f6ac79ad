"""Every Orbax call of the project lives here (its v1 API is coming; one place to change).

Two managers under the workdir: `checkpoints/latest` (training state + loop state, for
resuming) and `checkpoints/best` (parameters of the best validation epoch).
"""

import os
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """Latest and best checkpoints of one run."""

  def __init__(self, workdir: str):
    root = os.path.abspath(os.path.join(workdir, "checkpoints"))
    # Synchronous saves: the train step donates the state buffers, so a background write
    # could otherwise read a buffer the next epoch already reuses (CPU arrays are not copied).
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                           enable_async_checkpointing=False)
    self._latest = ocp.CheckpointManager(os.path.join(root, "latest"), options=options)
    self._best = ocp.CheckpointManager(os.path.join(root, "best"), options=options)

  def latest_epoch(self) -> Optional[int]:
    return self._latest.latest_step()

  def save_latest(self, epoch: int, state: Any, loop_state: dict) -> None:
    self._latest.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop_state)))

  def restore_latest(self, like_state: Any) -> Tuple[Any, dict]:
    """Restores onto the structure, shapes, dtypes and shardings of `like_state`."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
    restored = self._latest.restore(self._latest.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), loop=ocp.args.JsonRestore()))
    return restored.state, restored.loop

  def save_best(self, epoch: int, params: Any) -> None:
    self._best.save(epoch, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))

  def restore_best(self, like_params: Any) -> Any:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_params)
    return self._best.restore(self._best.latest_step(), args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract))).params

  def close(self) -> None:
    for manager in (self._latest, self._best):
      manager.wait_until_finished()
      manager.close()
