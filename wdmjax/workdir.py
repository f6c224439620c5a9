"""A run's directory and every file in it, by name; all writes atomic.

    config.json         the run's config (never the secret)
    checkpoints/<step>  Orbax checkpoints of the TrainState (whole or absent)
    checkpoint_seals.json  the SHA-256 of each checkpoint's seal (`train.checkpoint`)
    metrics.jsonl       one JSON object per logged step
    train_summary.json  steps, seconds, processes and mesh of the last `train` call
    samples/*.png       sample grids
    secret.json         WDM: the owner's trigger, watermark and key (owner-only permissions)
    embedding.json      WDM: how the watermark was embedded
    peft.json           a parameter-efficient fine-tune: strategy, base workdir, base hash
    delta.npz           ... its trainable EMA leaves
    attacks.json        an attacked copy: the source and the attacks applied

The training engine writes the first five through a `Workdir`; the methods write theirs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import ml_collections

from wdmjax.configs import from_json, to_json
from wdmjax.errors import WdmjaxError, check
from wdmjax.files import atomic_write, check_dir_path, read_json, write_json
from wdmjax.locks import LOCK_NAME, directory_lock

# The config sections that fix the parameters' shapes and meaning: a workdir never mixes two.
_FIXED = {"model": None, "diffusion": None, "data": ("resolution", "channels")}


class Workdir:
  """The files of one run directory (see the module docstring for the layout)."""

  CONFIG = "config.json"
  CHECKPOINTS = "checkpoints"
  METRICS = "metrics.jsonl"
  SUMMARY = "train_summary.json"
  SAMPLES = "samples"
  SECRET = "secret.json"
  EMBEDDING = "embedding.json"
  PEFT = "peft.json"
  DELTA = "delta.npz"
  ATTACKS = "attacks.json"

  def __init__(self, path: str | os.PathLike | Workdir):
    path = path.path if isinstance(path, Workdir) else os.fspath(path)
    check(isinstance(path, str) and bool(path), f"workdir: expected a directory path, got "
                                                f"{path!r}")
    check_dir_path(path, "workdir")  # not a file, nor inside one
    self.path = path

  def __repr__(self) -> str:
    return f"Workdir({self.path!r})"

  def __fspath__(self) -> str:
    return self.path

  @property
  def abspath(self) -> str:
    return os.path.abspath(self.path)

  def file(self, name: str) -> str:
    """The path of the file `name` (one of the class's names) in this workdir."""
    return os.path.join(self.path, name)

  def exists(self, name: str | None = None) -> bool:
    return os.path.exists(self.path if name is None else self.file(name))

  def remove(self, name: str) -> None:
    if self.exists(name):
      os.remove(self.file(name))

  # ------------------------------------------------------------------ config, checkpoints

  def has_config(self) -> bool:
    return os.path.isfile(self.file(self.CONFIG))

  def read_config(self) -> ml_collections.ConfigDict:
    check(self.has_config(), f"workdir: no trained run in {self.path!r} (no {self.CONFIG})")
    with open(self.file(self.CONFIG), "rb") as f:
      return from_json(f.read(), source=self.file(self.CONFIG))

  def write_config(self, cfg: ml_collections.ConfigDict) -> None:
    """Writes config.json; refuses a workdir that holds a run of another model or data."""
    if self.has_config():
      old = self.read_config()
      for section, keys in _FIXED.items():
        # through JSON both: the file holds lists where a config holds tuples (ch_mult)
        a, b = (json.loads(to_json(c[section])) for c in (old, cfg))
        if keys:
          a, b = {k: a[k] for k in keys}, {k: b[k] for k in keys}
        check(a == b, f"workdir: {self.path!r} holds a run with a different {section} config "
                      f"({a} != {b}); use a new workdir")
    atomic_write(self.file(self.CONFIG), to_json(cfg))

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.abspath, self.CHECKPOINTS)

  def has_checkpoint(self) -> bool:
    """Whether the workdir holds at least one complete checkpoint (Orbax renames a
    checkpoint's directory to its step number only when it is complete)."""
    d = self.checkpoint_dir
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))

  # ------------------------------------------------------------------ metrics, samples

  def append_metrics(self, step: int, metrics: dict[str, float], time: float) -> None:
    """Appends one row to metrics.jsonl, flushed at once so a crash loses nothing."""
    os.makedirs(self.path, exist_ok=True)
    row = {"step": int(step), "time": time, **{k: float(v) for k, v in metrics.items()}}
    with open(self.file(self.METRICS), "a") as f:
      f.write(json.dumps(row) + "\n")

  def truncate_metrics(self, step: int) -> None:
    """Drops the rows of steps after `step` (a run resumed from the checkpoint of `step`
    replays them), atomically; a torn last line (a crash mid-write) goes too."""
    if not self.exists(self.METRICS):
      return
    with open(self.file(self.METRICS)) as f:
      lines = f.readlines()
    keep = []
    for line in lines:
      try:
        row = json.loads(line)
      except ValueError:
        continue
      if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
      atomic_write(self.file(self.METRICS), "".join(keep))

  def read_metrics(self) -> list[dict]:
    if not self.exists(self.METRICS):
      return []
    with open(self.file(self.METRICS)) as f:
      return [json.loads(line) for line in f if line.strip()]

  def sample_grid(self, name: int | str) -> str:
    """samples/<step:07d>.png for a step, samples/<name>.png otherwise."""
    stem = f"{name:07d}" if isinstance(name, int) else name
    return os.path.join(self.path, self.SAMPLES, f"{stem}.png")

  # ------------------------------------------------------------------ failures

  @contextlib.contextmanager
  def lock(self, enabled: bool = True) -> Iterator[None]:
    """Holds the workdir's writer lock for the block (`wdmjax.locks.directory_lock`): a
    second writing command gets one line naming this one's pid. `enabled=False`: a no-op
    (the processes of a multi-host run other than 0 write nothing)."""
    with directory_lock(self.path, "workdir", enabled):
      yield

  @contextlib.contextmanager
  def undo_on_failure(self, enabled: bool = True) -> Iterator[None]:
    """Holds the workdir's writer lock (`lock`) and leaves the workdir as it was when the
    block fails before its first checkpoint: every file or folder the block created goes
    again (the workdir too, if it is new). Once a checkpoint exists the block has made
    progress that a rerun resumes, and nothing is removed. `enabled=False` (the other
    processes of a multi-host run): only process 0 writes, so only it locks and cleans up.
    The lock comes first: a command refused because another one writes here undoes nothing
    of what that one made."""
    existed = os.path.isdir(self.path)
    with self.lock(enabled):
      before = set(os.listdir(self.path)) if existed else set()
      had_checkpoint = self._has_progress()
      try:
        yield
      except BaseException:
        if enabled and not had_checkpoint and not self._has_progress():
          self._remove_new(before)
        raise

  def _has_progress(self) -> bool:
    """A checkpoint, or one moved aside (`<step>.diverged`, `<step>.corrupt`): never undone."""
    d = self.checkpoint_dir
    return os.path.isdir(d) and any(n[:1].isdigit() for n in os.listdir(d))

  def _remove_new(self, before: set[str]) -> None:
    """Removes what is in the workdir but not in `before`, the lock aside (a new workdir,
    left empty, goes when its lock is released)."""
    if not os.path.isdir(self.path):
      return
    for name in set(os.listdir(self.path)) - before - {LOCK_NAME}:
      path = self.file(name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      else:
        with contextlib.suppress(OSError):
          os.remove(path)

  # ------------------------------------------------------------------ JSON records

  def read_json(self, name: str) -> Any | None:
    """The JSON file `name`, or None when the workdir has none."""
    if not self.exists(name):
      return None
    try:
      return read_json(self.file(name))
    except ValueError as e:  # truncated or garbled (UnicodeDecodeError included)
      raise WdmjaxError(f"workdir: expected JSON in {self.file(name)!r}, got invalid JSON "
                        f"({e})") from None

  def write_json(self, name: str, obj: Any) -> str:
    os.makedirs(self.path, exist_ok=True)
    return write_json(self.file(name), obj)

  def write_private(self, name: str, text: str) -> str:
    """A file readable by the owner only (the secret)."""
    os.makedirs(self.path, exist_ok=True)
    return atomic_write(self.file(name), text, mode=0o600)

  def read_text(self, name: str) -> str | None:
    if not self.exists(name):
      return None
    with open(self.file(name)) as f:
      return f.read()
