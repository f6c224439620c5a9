"""Atomic file writes: a reader (or a crash) never sees a half-written file.

Every file wdmjax writes goes through `atomic_write`: the bytes go to a temporary file in the
same directory, which is then renamed over the target (`os.replace` is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from wdmjax.errors import WdmjaxError, check


@contextlib.contextmanager
def atomic_open(path: str, mode: int = 0o644) -> Iterator[io.BufferedWriter]:
  """A binary file handle whose contents replace `path` only when the block ends without an
  error; `mode` sets the permissions (0o600: owner only).

  The temporary file is created by `tempfile.mkstemp`: a fresh random name opened with
  O_CREAT | O_EXCL (never an existing file, never through a symbolic link) and mode 0o600,
  so a private file is never readable by others, not even while it is written. `os.replace`
  then replaces `path` itself: a symbolic link there is replaced, never written through.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fchmod(f.fileno(), mode)  # on the open file: the name could be swapped meanwhile
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def atomic_write(path: str, data: bytes | str, mode: int = 0o644) -> str:
  """Writes `data` (text is UTF-8 encoded) to `path` atomically; returns `path`."""
  with atomic_open(path, mode) as f:
    f.write(data.encode() if isinstance(data, str) else data)
  return path


def write_json(path: str, obj: Any, mode: int = 0o644) -> str:
  """`obj` as indented JSON, atomically."""
  return atomic_write(path, json.dumps(obj, indent=2) + "\n", mode)


def _existing_ancestor(path: str) -> str:
  """`path` itself or its nearest ancestor that exists (a dangling link counts as missing)."""
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return path


def check_dir_path(path: str | os.PathLike, name: str, writable: bool = False) -> None:
  """Raises WdmjaxError naming `name` unless `path` is a directory or can become one (no
  file sits at it or above it); with `writable`, also unless it can be written (not on a
  read-only file system, not forbidden)."""
  path = os.fspath(path)
  found = _existing_ancestor(path)
  if found == os.path.abspath(path):
    check(os.path.isdir(found), f"{name}: expected a directory, got a file {path!r}")
  else:
    check(os.path.isdir(found), f"{name}: expected a directory, got {path!r} inside the file "
                                f"{found!r}")
  if writable and not os.access(found, os.W_OK | os.X_OK):
    try:
      read_only = bool(os.statvfs(found).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
      read_only = False
    where = repr(path) if found == os.path.abspath(path) else f"{path!r} (under {found!r})"
    why = "on a read-only file system" if read_only else "without write permission"
    raise WdmjaxError(f"{name}: expected a writable directory, got {where} {why}")


def check_file_path(path: str | os.PathLike, name: str) -> None:
  """Raises WdmjaxError naming `name` unless a file can be written at `path`: not a
  directory, in a (possibly new) writable directory."""
  path = os.fspath(path)
  check(not os.path.isdir(path), f"{name}: expected a file path, got a directory {path!r}")
  parent = os.path.dirname(os.path.abspath(path))
  found = _existing_ancestor(parent)
  check(os.path.isdir(found), f"{name}: expected a file path in a directory, got {path!r} "
                              f"inside the file {found!r}")
  check_dir_path(parent, name, writable=True)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def save_npz(path: str, arrays: dict[str, np.ndarray], compressed: bool = False,
             mode: int = 0o644) -> str:
  """A `.npz` of named arrays, atomically; `mode` as in `atomic_open` (0o600: private)."""
  with atomic_open(path, mode) as f:
    (np.savez_compressed if compressed else np.savez)(f, **arrays)
  return path
