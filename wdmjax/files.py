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


@contextlib.contextmanager
def atomic_open(path: str, mode: int = 0o644) -> Iterator[io.BufferedWriter]:
  """A binary file handle whose contents replace `path` only when the block ends without an
  error; `mode` sets the permissions (0o600: owner only)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, mode)
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


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def save_npz(path: str, arrays: dict[str, np.ndarray], compressed: bool = False) -> str:
  """A `.npz` of named arrays, atomically."""
  with atomic_open(path) as f:
    (np.savez_compressed if compressed else np.savez)(f, **arrays)
  return path
