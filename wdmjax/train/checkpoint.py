"""Orbax checkpoints of a TrainState in `workdir/checkpoints/<step>`.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
run killed at any moment (even with SIGKILL) leaves only whole checkpoints behind.
"""

from __future__ import annotations

import chex
import jax
import orbax.checkpoint as ocp

from wdmjax.errors import WdmjaxError
from wdmjax.workdir import Workdir


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` (keep the newest `keep`, resume the latest)."""

  def __init__(self, workdir: str | Workdir, keep: int = 2, async_save: bool = False):
    self.directory = Workdir(workdir).checkpoint_dir
    options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: chex.ArrayTree) -> None:
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, target: chex.ArrayTree, step: int | None = None) -> chex.ArrayTree:
    """Restores into the structure, shapes, dtypes and shardings of `target`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise WdmjaxError(f"workdir: no checkpoint found in {self.directory!r}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except (ValueError, KeyError) as e:
      raise WdmjaxError(f"checkpoint {self.directory}/{step} does not match this model "
                        f"config ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e

  def restore_part(self, target: dict, step: int | None = None) -> dict:
    """Restores only the top-level entries of the saved state named in `target` (e.g.
    `{"ema_params": shapes}`, leaves `jax.ShapeDtypeStruct`s with shardings); the rest of
    the checkpoint is not read."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise WdmjaxError(f"workdir: no checkpoint found in {self.directory!r}")
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    try:
      return self.manager.restore(step, args=ocp.args.PyTreeRestore(
        target, restore_args=restore_args, partial_restore=True))
    except (ValueError, KeyError) as e:
      raise WdmjaxError(f"checkpoint {self.directory}/{step} does not match this model "
                        f"config ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
