"""One writer per directory: an advisory lock that every writing command takes.

`directory_lock(path)` holds `flock(LOCK_EX | LOCK_NB)` on `<path>/.wdmjax.lock`, a file
that holds the holder's pid and command line. A second writer, in this process or another,
is refused at once in one line naming the holder's pid (`WorkdirBusy`). The kernel drops the
lock when its process dies, however it dies, so a stale lock (SIGKILL, power cut) is simply
taken over. The file goes when the lock is released; a lock taken on a directory that did
not exist yet removes the directory again if it is left empty (a refused command leaves
nothing behind).

The usual race of lock files that are removed (B opens the file, A unlinks it and releases,
B locks the unlinked inode while C creates and locks a new file) is closed by checking,
once locked, that the path still names the locked inode, and trying again if not.

Re-entrant within a process: a function that holds the lock may call another that takes it
(`wdmjax demo` runs `embed`), counted per directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import threading
from collections.abc import Iterator

from wdmjax.errors import WdmjaxError

LOCK_NAME = ".wdmjax.lock"

# realpath of a directory -> [how many times this process holds it, the locked file]
_held: dict[str, list[int]] = {}
_guard = threading.Lock()


class WorkdirBusy(WdmjaxError):
  """Another process is writing to the directory."""


def _holder(path: str) -> str:
  try:
    with open(path) as f:
      text = f.read(512).split("\n", 1)
  except OSError:
    return "another process"
  pid = text[0].strip()
  what = text[1].strip() if len(text) > 1 else ""
  return f"pid {pid}" + (f" ({what[:120]})" if what else "") if pid.isdigit() else \
    "another process"


def _acquire(directory: str, name: str) -> int:
  path = os.path.join(directory, LOCK_NAME)
  for _ in range(100):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirBusy(f"{name}: expected a directory no other command is writing to, got "
                        f"{directory!r}, in use by {_holder(path)}; wait for it to finish "
                        f"(a lock of a process that died is taken over)") from None
    except BaseException:
      os.close(fd)
      raise
    try:
      same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
    except FileNotFoundError:
      same = False
    if same:
      os.ftruncate(fd, 0)
      os.write(fd, f"{os.getpid()}\n{' '.join(sys.argv)[:400]}\n".encode(errors="replace"))
      return fd
    os.close(fd)  # the file we locked was removed meanwhile: lock the new one
  raise WdmjaxError(f"{name}: could not lock {directory!r}: its lock file keeps changing")


def _release(directory: str, fd: int) -> None:
  with contextlib.suppress(OSError):
    os.remove(os.path.join(directory, LOCK_NAME))  # while still holding it: see above
  os.close(fd)


@contextlib.contextmanager
def directory_lock(path: str | os.PathLike, name: str = "workdir",
                   enabled: bool = True) -> Iterator[None]:
  """Holds the writer's lock of the directory `path` (created, with its parents, if it does
  not exist) for the block; `name` is the argument that gave the path, for the message.
  Raises `WorkdirBusy` when another process holds it. `enabled=False`: a no-op (the other
  processes of a multi-host run, which write nothing)."""
  if not enabled:
    yield
    return
  directory = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  try:
    os.mkdir(directory)
    created = True
  except FileExistsError:
    created = False
  real = os.path.realpath(directory)
  try:
    with _guard:
      if real not in _held:
        _held[real] = [0, _acquire(directory, name)]
      _held[real][0] += 1
  except BaseException:
    if created:
      with contextlib.suppress(OSError):
        os.rmdir(directory)
    raise
  try:
    yield
  finally:
    with _guard:
      _held[real][0] -= 1
      if not _held[real][0]:
        _release(directory, _held.pop(real)[1])
    if created:
      with contextlib.suppress(OSError):
        os.rmdir(directory)  # only if empty: a refused or undone command leaves nothing


def holds_lock(path: str | os.PathLike) -> bool:
  """Whether this process holds the writer's lock of the directory `path`."""
  return os.path.realpath(os.fspath(path)) in _held
