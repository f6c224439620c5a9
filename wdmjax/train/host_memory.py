"""Host memory: keep XLA:CPU's scratch memory mapped from one jitted call to the next.

XLA:CPU gives each call of a compiled program one aligned block for its temporaries (484 MB
for the DiT train step of `benchmarks/train_step.py`), allocated with glibc's malloc on one
of the CPU client's worker threads. Such a thread allocates from its own glibc arena, whose
heaps hold at most 64 MB, so the block is always a fresh `mmap`, unmapped again when the
call ends: every call page-faults all of it anew (126,000 faults and 0.24 s of kernel time
in a 0.93 s step on 2 cores). `keep_host_memory` sends every thread to glibc's main arena
with `mmap` off and a high trim threshold, so the block stays in the heap and is reused:
the same step then takes 0.83 s with no faults. The price is that the process keeps its
peak heap instead of returning it to the system between calls.
"""

from __future__ import annotations

import ctypes
import os
import sys

# "off" (or "0", "") leaves glibc's defaults alone.
HOST_MEMORY_ENV = "WDMJAX_HOST_MEMORY"
_OFF = ("off", "0", "")
# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: about 2 GiB of free heap kept


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # a JAX without it: assume the early call it needs
    return False


def keep_host_memory() -> bool:
  """Makes glibc keep freed blocks for reuse (see the module docstring); returns whether it
  did. It must run before JAX starts its backends (the first computation or device query):
  a worker thread keeps the arena it first allocated from. Returns False, changing nothing,
  when the backends have started, when HOST_MEMORY_ENV says "off", or off Linux with glibc.
  """
  env = os.environ.get(HOST_MEMORY_ENV)
  if env is not None and env.strip().lower() in _OFF:
    return False
  if not sys.platform.startswith("linux") or _backends_started():
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # noqa: B018 (glibc only: musl's mallopt ignores these)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return all(mallopt(param, value) == 1 for param, value in (
    (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)))
