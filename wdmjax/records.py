"""Typed loaders for the files a command reads back: a tampered, truncated, mistyped or
misplaced file is refused in one line that names the file and the field, never a traceback.

    read_json_file(path)          JSON from a regular file (no symbolic link, bounded size)
    field(record, key, kind)      one typed field of a record, checked
    read_npz_file(path, keys)     arrays from an .npz (allow_pickle=False, no object arrays)
    inside(root, relative)        a path a file names, kept inside its workdir

Every failure raises `WdmjaxError` with a message that starts with the file's path.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import stat
import zipfile
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from wdmjax.errors import WdmjaxError, check, show

MAX_JSON_BYTES = 64 * 2**20  # a registry of 100,000 users is about 10 MB
MAX_NPZ_BYTES = 4 * 2**30


def regular_file(path: str | os.PathLike, what: str | None = None,
                 max_bytes: int | None = None) -> str:
  """`path` as a str, checked to be a regular file reached without a symbolic link in its
  last component (a link inside a workdir could point into another file or out of it), of
  at most `max_bytes`. `what` names it in the message (default: the path)."""
  path = os.fspath(path)
  what = what or path
  try:
    st = os.lstat(path)
  except FileNotFoundError:
    raise WdmjaxError(f"{what}: expected a file, got nothing at {path!r}") from None
  except OSError as e:
    raise WdmjaxError(f"{what}: expected a readable file, got {e.strerror}") from None
  if stat.S_ISLNK(st.st_mode):
    raise WdmjaxError(f"{what}: expected a regular file, got a symbolic link to "
                      f"{os.readlink(path)!r}")
  kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a special file"
  check(stat.S_ISREG(st.st_mode), f"{what}: expected a regular file, got {kind}")
  if max_bytes is not None:
    check(st.st_size <= max_bytes,
          f"{what}: expected at most {max_bytes:,} bytes, got {st.st_size:,}")
  return path


def _open_nofollow(path: str):
  fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
  return os.fdopen(fd, "rb")


def read_json_file(path: str | os.PathLike, what: str | None = None,
                   max_bytes: int = MAX_JSON_BYTES) -> Any:
  """The JSON value in the regular file `path` (see `regular_file`); refuses invalid JSON,
  invalid UTF-8 and non-standard constants (NaN, Infinity) in one line."""
  path = regular_file(path, what, max_bytes)
  what = what or path
  def constant(name):
    raise ValueError(f"{name} is not JSON")

  try:
    with _open_nofollow(path) as f:
      return json.loads(f.read().decode("utf-8"), parse_constant=constant)
  except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError too
    raise WdmjaxError(f"{what}: expected JSON, got {type(e).__name__}: {e}") from None
  except OSError as e:
    raise WdmjaxError(f"{what}: expected a readable file, got {e.strerror}") from None


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
  "int": (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
          "an integer"),
  "float": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)
            and math.isfinite(v), "a finite number"),
  "str": (lambda v: isinstance(v, str), "a string"),
  "bool": (lambda v: isinstance(v, bool), "true or false"),
  "list": (lambda v: isinstance(v, list), "a list"),
  "dict": (lambda v: isinstance(v, dict), "an object"),
}


def field(record: Any, key: str, kind: str, what: str, *, low: float | None = None,
          high: float | None = None, choices: Iterable | None = None,
          optional: bool = False, default: Any = None) -> Any:
  """`record[key]`, checked to be of `kind` ('int', 'float', 'str', 'bool', 'list',
  'dict'), within [low, high] (numbers; lengths for str and list) and among `choices`.
  `what` names the file (and record) in the message. `optional`: a missing key (or a null)
  gives `default`."""
  check(isinstance(record, dict), f"{what}: expected an object, got {show(record, 40)}")
  if record.get(key) is None and optional:
    return default
  check(key in record, f"{what}: expected a field {key!r}, got none")
  value = record[key]
  test, name = _KINDS[kind]
  check(test(value), f"{what}: field {key!r}: expected {name}, got {show(value, 60)}")
  size = len(value) if kind in ("str", "list") else value
  if kind in ("int", "float", "str", "list"):
    unit = " long" if kind in ("str", "list") else ""
    check(low is None or size >= low, f"{what}: field {key!r}: expected {name} >= {low}"
                                      f"{unit}, got {show(value, 60)}")
    check(high is None or size <= high, f"{what}: field {key!r}: expected {name} <= {high}"
                                        f"{unit}, got {show(value, 60)}")
  if choices is not None:
    choices = list(choices)
    check(value in choices, f"{what}: field {key!r}: expected one of {show(choices, 60)}, "
                            f"got {show(value, 60)}")
  return value


def read_npz_file(path: str | os.PathLike, keys: Iterable[str] | None = None,
                  what: str | None = None, *, finite: bool = True,
                  max_bytes: int = MAX_NPZ_BYTES) -> dict[str, np.ndarray]:
  """The arrays of the .npz file `path` (see `regular_file`), loaded with
  `allow_pickle=False`: numeric or boolean arrays only; `keys`: these must be present (others
  may be too); `finite`: no NaN or inf in a float array. A truncated or garbled archive is
  refused in one line."""
  path = regular_file(path, what, max_bytes)
  what = what or path
  try:
    with _open_nofollow(path) as f, np.load(f, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (zipfile.BadZipFile, ValueError, EOFError, KeyError, OSError, zipfile.LargeZipFile,
          NotImplementedError) as e:
    raise WdmjaxError(f"{what}: expected an .npz archive of numeric arrays, got "
                      f"{type(e).__name__}: {str(e)[:200]}") from None
  missing = sorted(set(keys or ()) - set(arrays))
  check(not missing, f"{what}: expected arrays {missing}, got none of them")
  for k, a in arrays.items():
    check(a.dtype.kind in "biuf", f"{what}: array {k!r}: expected numbers, got dtype {a.dtype}")
    check(not finite or a.dtype.kind != "f" or bool(np.isfinite(a).all()),
          f"{what}: array {k!r}: expected finite numbers, got NaN or inf")
  return arrays


def inside(root: str | os.PathLike, relative: Any, what: str) -> str:
  """The path `relative` (as a file records it) under the directory `root`: a relative path
  that stays inside `root` once symbolic links are followed; returns `root/relative`.
  An absolute path, `..`, or a link that leads out of `root` is refused."""
  root = os.fspath(root)
  check(isinstance(relative, str) and relative and "\0" not in relative,
        f"{what}: expected a path relative to {root!r}, got {show(relative, 60)}")
  check(not os.path.isabs(relative),
        f"{what}: expected a path relative to {root!r}, got the absolute path {relative!r}")
  path = os.path.join(root, relative)
  real_root = os.path.realpath(root)
  real = os.path.realpath(path)
  check(os.path.commonpath([real_root, real]) == real_root,
        f"{what}: expected a path inside {root!r}, got {relative!r}, which leads to {real!r}")
  return path
