"""Host memory: keep XLA:CPU's scratch memory mapped from one jitted call to the next.

XLA:CPU gives each call of a compiled program one aligned block for its temporaries (484 MB
for the DiT train step of `benchmarks/train_step.py`), allocated with glibc's malloc. By
default the call runs on one of the CPU client's worker threads, whose glibc arena holds at
most 64 MB per heap, so the block is always a fresh `mmap`, unmapped when the call ends:
every call page-faults all of it anew (126,000 faults and 0.24 s of kernel time in a 0.93 s
step on 2 cores). `keep_host_memory` runs single-device programs on the calling thread
instead (JAX's `jax_cpu_enable_async_dispatch` off), whose allocations come from glibc's
main arena, and has that arena keep large blocks in its heap (no `mmap`, a high trim
threshold): the block is reused and the same step takes 0.79-0.80 s without faults. The
worker threads keep their own arenas, so their small allocations do not contend.

What it costs: the process keeps its peak heap instead of returning it between calls (the
benchmark's JAX process: 1.77 GB resident against 1.70 GB; the heap may grow once or twice
more before a freed block fits an aligned request), and single-device calls return when
they are done rather than at once (Python no longer runs ahead of the CPU, which on CPU
shares the same cores anyway).
"""

from __future__ import annotations

import ctypes
import os
import sys

import jax

# "off" (or "0", "") leaves glibc's and JAX's defaults alone.
HOST_MEMORY_ENV = "WDMJAX_HOST_MEMORY"
_OFF = ("off", "0", "")
# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: about 2 GiB of free heap kept
_ASYNC_ENV = "JAX_CPU_ENABLE_ASYNC_DISPATCH"  # a user's own choice is left as it is


def _backends_started() -> bool:
  try:
    # private: a JAX that moved it must not break the import of this module
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):  # a JAX without it: assume the early call it needs
    return False


def keep_host_memory() -> bool:
  """Makes single-device CPU calls reuse their scratch memory (see the module docstring);
  returns whether it did. It must run before JAX starts its backends (the first computation
  or device query), which read the dispatch setting once. Returns False, changing nothing,
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
  if not all(mallopt(param, value) == 1 for param, value in (
      (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))):
    return False
  if _ASYNC_ENV not in os.environ:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True
