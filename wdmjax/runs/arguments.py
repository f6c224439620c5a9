"""What the runs check alike in the arguments a user types: upper bounds on counts, and
messages that name the argument the user gave.

A count (a batch size, a number of images, steps, draws) without a bound fails late and
badly: `--batch-size 1000000000` reaches XLA and dies with an out-of-memory traceback,
`--n 1000000000` of a noise set fills the host's memory before anything says no. Each
count is checked before any work against

  * a fixed cap, generous for any real run (`MAX_STEPS` optimisation steps, ...), and
  * where the count multiplies memory, a bound derived from memory: `count * bytes_each`
    may use at most half of this host's physical memory (`host_memory_bytes`), the rest
    left to the program, its compiled code and the system.

`bytes_each` is an estimate of what one more unit costs (an image and its working copies,
an example's activations in a training step), stated where it is used; the bound errs
generous: its purpose is a one-line refusal of an absurd count, not a tight fit.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from collections.abc import Iterator

from wdmjax.errors import WdmjaxError, check, show

MAX_STEPS = 10**7  # optimisation or sampling steps: about four months at one step a second
MAX_DRAWS = 1000  # noise draws per step, candidates per image, and other repeats
MAX_COUNT = 10**8  # anything else counted one by one (images, samples)
_FALLBACK_MEMORY = 16 * 2**30


def host_memory_bytes() -> int:
  """This host's physical memory in bytes (16 GiB where the system does not say)."""
  try:
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
  except (AttributeError, OSError, ValueError):
    return _FALLBACK_MEMORY
  return pages * size if pages > 0 and size > 0 else _FALLBACK_MEMORY


def check_count(name: str, value, high: int = MAX_COUNT, *, bytes_each: int = 0,
                what: str = "", low: int = 1) -> int:
  """A count: an integer (not a bool) in [low, high], and, with `bytes_each` (an estimate
  of the memory one unit costs; `what` says of what), at most half of the host's memory in
  all. Returns it as an int; raises WdmjaxError naming `name` otherwise."""
  limit = int(high)
  reason = ""
  if bytes_each > 0:
    by_memory = max(low, host_memory_bytes() // 2 // int(bytes_each))
    if by_memory < limit:
      limit = by_memory
      reason = (f" (about {bytes_each / 2**20:.3g} MiB each{' for ' + what if what else ''}, "
                f"half of this host's {host_memory_bytes() / 2**30:.0f} GiB of memory)")
  ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
  check(ok and value >= low, f"{name}: expected an integer >= {low}, got {show(value)}")
  check(value <= limit, f"{name}: expected an integer in [{low}, {limit:,}]{reason}, got "
                        f"{int(value):,}")
  return int(value)


@contextlib.contextmanager
def renamed(name: str, as_name: str) -> Iterator[None]:
  """Within the block, a WdmjaxError about the parameter `name` ('workdir: ...', from a
  function that calls its argument so) is about `as_name` instead: the argument the user
  gave (`ldm_workdir`, `regen_workdir`), whose flag the command line then names."""
  try:
    yield
  except WdmjaxError as e:
    text = str(e)
    if not text.startswith(f"{name}:"):
      raise
    raise WdmjaxError(as_name + text[len(name):]) from None
