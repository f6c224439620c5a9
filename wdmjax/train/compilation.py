"""Compilation: JAX's persistent compilation cache, and a clock of the time spent compiling.

A first run of a command compiles every jitted function (on 2 CPU cores the demo's train
step takes several seconds); with the cache on, a second run reads them from disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import jax

from wdmjax.errors import check_number

# Where the cache lives: this variable's directory, else $XDG_CACHE_HOME/wdmjax/jax, else
# ~/.cache/wdmjax/jax. "off" (or "0", "") leaves the cache off.
CACHE_ENV = "WDMJAX_COMPILATION_CACHE"
_OFF = ("off", "0", "")
# jit's three costs, each reported by jax.monitoring
_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"  # includes reading the cache
_HITS = "/jax/compilation_cache/cache_hits"


def default_cache_dir() -> str:
  """The user's cache directory for compiled programs (see CACHE_ENV)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "wdmjax", "jax")


def enable_compilation_cache(path: str | None = None, *,
                             min_compile_seconds: float = 0.5) -> str | None:
  """Turns on JAX's persistent compilation cache in `path` (default: CACHE_ENV's value, or
  `default_cache_dir()`); returns the directory, or None when CACHE_ENV says "off" or the
  user already chose a cache directory through JAX's own settings (left as it is).
  Programs that compiled in under `min_compile_seconds` are not written."""
  min_compile_seconds = check_number(min_compile_seconds, "min_compile_seconds", 0)
  if jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR or the user's own
    return None
  if path is None:
    env = os.environ.get(CACHE_ENV)
    if env is not None and env.strip().lower() in _OFF:
      return None
    path = env or default_cache_dir()
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:  # an unwritable home must not stop a run: it only compiles every time
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_seconds))
  return path


@dataclasses.dataclass
class CompileClock:
  """Seconds spent tracing, lowering and compiling (or reading from the cache) since it
  started, and how many programs the backend compiled and how many came from the cache."""
  seconds: float = 0.0
  programs: int = 0
  cache_hits: int = 0

  def _duration(self, event: str, secs: float, **_kwargs) -> None:
    if event in (_TRACE, _LOWER, _BACKEND):
      self.seconds += secs
    if event == _BACKEND:
      self.programs += 1

  def _event(self, event: str, **_kwargs) -> None:
    if event == _HITS:
      self.cache_hits += 1


@contextlib.contextmanager
def compile_clock() -> Iterator[CompileClock]:
  """`with compile_clock() as c: ...`; afterwards `c.seconds`, `c.programs`, `c.cache_hits`
  hold what the block's compilations cost (every thread's: jit events are process-wide)."""
  clock = CompileClock()
  jax.monitoring.register_event_duration_secs_listener(clock._duration)
  jax.monitoring.register_event_listener(clock._event)
  try:
    yield clock
  finally:
    jax.monitoring.unregister_event_duration_listener(clock._duration)
    jax.monitoring.unregister_event_listener(clock._event)
