"""Orbax checkpoints of a TrainState in `workdir/checkpoints/<step>`, sealed by a checksum.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
run killed at any moment (even with SIGKILL) leaves only whole checkpoints behind. What
Orbax cannot see is a checkpoint damaged afterwards (a flipped bit on disk, a truncated copy,
a deleted file): it restores garbage without a word. So once a checkpoint is complete, its
files are sealed: `<step>/wdmjax_checksums.json` lists every file's size and SHA-256, and a
restore first checks them. A damaged newest checkpoint is reported and the newest intact one
is used instead; a run resuming from it moves the damaged ones aside (`<step>.corrupt`,
never deleted) so that it can save those steps again.

A checkpoint without the seal (a run killed in the moment between Orbax's rename and the
seal, or a checkpoint from an older wdmjax) is restored unverified, and said so. Damage that
takes the seal with it is not mistaken for that: `checkpoint_seals.json` beside
`checkpoints/` (the ledger) records the SHA-256 of every seal written, so a checkpoint whose
seal is in the ledger but no longer in its directory (or differs from it) is damaged. A step
leaves the ledger when it is saved again or moved aside.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from wdmjax.errors import WdmjaxError
from wdmjax.files import write_json
from wdmjax.workdir import Workdir

SEAL = "wdmjax_checksums.json"
LEDGER = "checkpoint_seals.json"  # in the workdir: {step: sha256 of its seal file}
_CHUNK = 1 << 22


def _quiet(_message: str) -> None:
  pass


def file_checksums(directory: str) -> dict[str, list]:
  """{relative path: [size, sha256 hex]} of every file under `directory` but the seal."""
  out = {}
  for root, _dirs, files in os.walk(directory):
    for name in sorted(files):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel == SEAL:
        continue
      h = hashlib.sha256()
      with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
          h.update(chunk)
      out[rel] = [os.path.getsize(path), h.hexdigest()]
  return out


def _sha256_file(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _ledger_path(directory: str) -> str:
  return os.path.join(os.path.dirname(os.path.abspath(directory)), LEDGER)


def read_ledger(directory: str) -> dict[str, str]:
  """The ledger of the checkpoints directory `directory` ({step: seal sha256}); an unreadable
  one counts as empty (it can only make a checkpoint 'unverified', never accept damage)."""
  try:
    with open(_ledger_path(directory)) as f:
      ledger = json.load(f)
  except (OSError, ValueError):
    return {}
  if not isinstance(ledger, dict):
    return {}
  return {k: v for k, v in ledger.items() if isinstance(k, str) and isinstance(v, str)}


def _update_ledger(directory: str, step: int, digest: str | None) -> None:
  ledger = read_ledger(directory)
  if digest is None and str(step) not in ledger:
    return
  if digest is None:
    del ledger[str(step)]
  else:
    ledger[str(step)] = digest
  write_json(_ledger_path(directory), ledger)


def seal(step_dir: str) -> str:
  """Writes the checksums of a complete checkpoint directory into it and records the seal in
  its directory's ledger; returns the seal."""
  path = write_json(os.path.join(step_dir, SEAL), {"files": file_checksums(step_dir)})
  parent, step = os.path.split(os.path.normpath(step_dir))
  _update_ledger(parent, int(step), _sha256_file(path))
  return path


def damage(step_dir: str) -> str | None:
  """What is wrong with a sealed checkpoint directory (None: intact, or never sealed)."""
  path = os.path.join(step_dir, SEAL)
  parent, step = os.path.split(os.path.normpath(step_dir))
  recorded = read_ledger(parent).get(step)
  if not os.path.exists(path):
    return None if recorded is None else f"its {SEAL} was removed (the ledger has it)"
  if recorded is not None and _sha256_file(path) != recorded:
    return f"its {SEAL} differs from the one written (the ledger's)"
  try:
    with open(path) as f:
      want = json.load(f)
  except (OSError, ValueError):
    want = None
  want = want.get("files") if isinstance(want, dict) else None
  if not (isinstance(want, dict) and all(
      isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str)
      for v in want.values())):
    return f"its {SEAL} is unreadable"
  try:
    have = file_checksums(step_dir)
  except OSError as e:
    return f"a file cannot be read ({e.strerror})"
  for rel, (size, digest) in want.items():
    if rel not in have:
      return f"{rel} is missing"
    if have[rel][0] != size:
      return f"{rel} has {have[rel][0]} bytes, {size} were written"
    if have[rel][1] != digest:
      return f"{rel} does not match its checksum"
  extra = sorted(set(have) - set(want))
  return f"{extra[0]} was added after it was written" if extra else None


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` (keep the newest `keep`, resume the latest)
  that seals every checkpoint and verifies the seal on restore (see the module docstring).

  `writable=False` (loading a trained model) never creates or moves anything; `log` gets a
  line whenever a checkpoint other than the newest is used, or one is unverified.
  """

  def __init__(self, workdir: str | Workdir, keep: int = 2, async_save: bool = False,
               writable: bool = True, log: Callable[[str], None] | None = None):
    self.directory = Workdir(workdir).checkpoint_dir
    self.writable = writable
    self.log = log or _quiet
    if not writable and not os.path.isdir(self.directory):
      raise WdmjaxError(f"workdir: no checkpoint found in {self.directory!r}")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=writable,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.async_save = async_save
    self._unsealed: list[int] = []

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: chex.ArrayTree) -> None:
    if step in self.manager.all_steps():
      return
    self._seal_finished()  # the previous (async) save, once it has completed
    self._check_space(step, state)
    if jax.process_index() == 0:  # a step saved again is not the one the ledger sealed
      _update_ledger(self.directory, step, None)
    self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self._unsealed.append(step)
    if not self.async_save:
      self._seal_finished()

  def _check_space(self, step: int, state: chex.ArrayTree) -> None:
    """Refuses a save that cannot fit on the disk, before writing anything: a write failing
    half-way fails in every one of Orbax's writer threads at once."""
    need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)) + (1 << 20)
    os.makedirs(self.directory, exist_ok=True)
    free = shutil.disk_usage(self.directory).free
    if jax.process_count() > 1:  # decided together: a lone refusal would hang the others
      mib = np.int32(min(free >> 20, 2**31 - 1))  # MiB: int32 without x64
      free = int(multihost_utils.process_allgather(mib).min()) << 20
    if free < need:
      raise OSError(errno.ENOSPC, f"No space left on device: checkpoint {step} needs about "
                    f"{need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; the checkpoints "
                    f"saved before are kept, free space and rerun to resume", self.directory)

  def _seal_finished(self) -> None:
    if not self._unsealed:
      return
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      for step in self._unsealed:
        if os.path.isdir(self.step_dir(step)):  # not rotated out meanwhile
          seal(self.step_dir(step))
    self._unsealed = []

  def _intact_steps(self, step: int | None) -> tuple[list[int], list[str]]:
    """(the intact steps, newest first (only `step` when given); what is wrong with each
    damaged one). Damaged ones newer than the newest intact one are moved aside when
    writable. Raises when none is intact."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if step is not None:
      steps = [s for s in steps if s == step]
    if not steps:
      raise WdmjaxError(f"workdir: no checkpoint found in {self.directory!r}")
    intact, damaged = [], []
    for s in steps:
      why = damage(self.step_dir(s))
      if why is None:
        intact.append(s)
        continue
      damaged.append(f"checkpoint {s} is damaged: {why}")
    if not intact:
      raise WdmjaxError(f"checkpoints: no intact checkpoint in {self.directory!r} "
                        f"({'; '.join(damaged)}); retrain or restore them from a backup")
    if self.writable and damaged:
      for i, s in enumerate(steps):
        if s > intact[0]:
          damaged[i] += f", moved to {os.path.basename(self.move_aside(s, 'corrupt', False))}"
    return intact, damaged

  def move_aside(self, step: int, why: str, say: bool = True) -> str:
    """Renames checkpoint `step` to `<step>.<why>` (nothing is deleted), so that the run no
    longer resumes from it and can write that step again; process 0 renames, every process
    forgets it. Returns the new path."""
    self._seal_finished()
    target = f"{self.step_dir(step)}.{why}"
    multi = jax.process_count() > 1
    if multi:  # every process has finished reading it before process 0 renames it
      multihost_utils.sync_global_devices(f"wdmjax: move checkpoint {step}")
    if jax.process_index() == 0 and os.path.isdir(self.step_dir(step)):
      n = 1
      while os.path.exists(target):
        target, n = f"{self.step_dir(step)}.{why}{n}", n + 1
      os.rename(self.step_dir(step), target)
      _update_ledger(self.directory, step, None)
      if say:
        self.log(f"moved checkpoint {step} to {target}")
    if multi:
      multihost_utils.sync_global_devices(f"wdmjax: moved checkpoint {step}")
    self.manager.reload()
    return target

  def _restore(self, step: int | None, restore: Callable[[int], chex.ArrayTree]
               ) -> tuple[int, chex.ArrayTree]:
    errors = []
    steps, damaged = self._intact_steps(step)
    for s in steps:
      sealed = os.path.exists(os.path.join(self.step_dir(s), SEAL))
      try:
        out = restore(s)
      except Exception as e:  # noqa: BLE001 (Orbax and TensorStore raise many kinds)
        first = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else repr(e)
        if sealed and isinstance(e, (ValueError, KeyError)):  # intact files: the config
          raise WdmjaxError(f"checkpoint {self.step_dir(s)} does not match this model config "
                            f"({first})") from e
        if sealed:
          raise
        # an unsealed checkpoint that cannot be read: try an older one; a resuming run moves
        # it aside, or it would never save that step again
        errors.append(f"checkpoint {s} (unsealed) cannot be read: {first}")
        if self.writable:
          self.move_aside(s, "corrupt", False)
        continue
      said = damaged + errors
      if not sealed:
        said.append(f"checkpoint {s} has no {SEAL} (written by an older wdmjax, or the run "
                    f"stopped before sealing it): restored unverified")
      if said:
        self.log("; ".join(said) + f"; using checkpoint {s} in {self.directory}")
      return s, out
    raise WdmjaxError(f"checkpoints: none in {self.directory!r} can be restored "
                      f"({'; '.join(errors)}); a config mismatch, or damaged files")

  def restore(self, target: chex.ArrayTree, step: int | None = None) -> chex.ArrayTree:
    """Restores the newest intact checkpoint (or `step`) into the structure, shapes, dtypes
    and shardings of `target`."""
    return self.restore_step(target, step)[1]

  def restore_step(self, target: chex.ArrayTree, step: int | None = None
                   ) -> tuple[int, chex.ArrayTree]:
    """(step restored, state): `restore` that also says which checkpoint it used."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    return self._restore(step, lambda s: self.manager.restore(
      s, args=ocp.args.StandardRestore(abstract)))

  def restore_part(self, target: dict, step: int | None = None) -> dict:
    """Restores only the top-level entries of the saved state named in `target` (e.g.
    `{"ema_params": shapes}`, leaves `jax.ShapeDtypeStruct`s with shardings) from the
    newest intact checkpoint; the rest of the checkpoint is not read."""
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    return self._restore(step, lambda s: self.manager.restore(s, args=ocp.args.PyTreeRestore(
      target, restore_args=restore_args, partial_restore=True)))[1]

  def wait(self) -> None:
    self._seal_finished()
    self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      self._seal_finished()
    finally:
      self.manager.wait_until_finished()
      self.manager.close()
