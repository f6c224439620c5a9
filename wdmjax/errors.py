"""The one exception type that wdmjax raises for bad user input, and the checks shared by
every parameter of one kind (seeds, finite numbers)."""

import math
import numbers


class WdmjaxError(ValueError):
  """Bad input from a user: the message names the argument, the expected and the actual value.

  The CLI prints it as a single line (no traceback) and exits with status 2: whatever a
  value's repr holds (an empty ConfigDict's ends in a newline), the message has no line
  break (each run of them becomes one space).
  """

  def __init__(self, message: str = "", *args):
    super().__init__(one_line(str(message)), *args)


def one_line(text: str) -> str:
  """`text` with every run of line breaks (any that `str.splitlines` knows) and the spaces
  around them as one space, and no leading or trailing ones."""
  return " ".join(part.strip() for part in text.splitlines() if part.strip())


def show(value, limit: int = 80) -> str:
  """`repr(value)` on one line, cut to about `limit` characters (a message quotes what the
  user gave, not a megabyte of it)."""
  text = one_line(repr(value))
  return text if len(text) <= limit else f"{text[:limit - 15]}... ({len(text):,} chars)"


def check(condition: bool, message: str) -> None:
  """Raises `WdmjaxError(message)` unless `condition` holds."""
  if not condition:
    raise WdmjaxError(message)


# JAX keeps the low 32 bits of an integer seed (without x64), so 2**32 + s and -s would
# silently repeat other seeds, and seeds beyond int64 overflow.
SEED_MAX = 2**32 - 1


def check_seed(seed, name: str = "seed") -> int:
  """A PRNG seed: an integer in [0, SEED_MAX]; returns it as an int."""
  check(isinstance(seed, numbers.Integral) and not isinstance(seed, bool)
        and 0 <= seed <= SEED_MAX, f"{name}: expected an integer in [0, {SEED_MAX}], got "
                                   f"{show(seed)}")
  return int(seed)


def _expected_number(low, high, low_open: bool, high_open: bool) -> str:
  if low is not None and high is not None:
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
  if low == 0:
    return "a positive number" if low_open else "a non-negative number"
  if low is not None:
    return f"a number {'>' if low_open else '>='} {low:g}"
  if high is not None:
    return f"a number {'<' if high_open else '<='} {high:g}"
  return "a finite number"


def check_number(value, name: str, low: float | None = None, high: float | None = None, *,
                 low_open: bool = False, high_open: bool = False) -> float:
  """A finite real number (not a bool) in the interval from `low` to `high` (None: unbounded;
  an end is excluded when its `*_open` flag is set); returns it as a float. Every float a
  user types goes through it: NaN and inf pass every `x > 0` test but poison a run."""
  ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
        and math.isfinite(value)
        and (low is None or (value > low if low_open else value >= low))
        and (high is None or (value < high if high_open else value <= high)))
  if not ok:
    finite = not isinstance(value, numbers.Real) or math.isfinite(value)
    raise WdmjaxError(f"{name}: expected {_expected_number(low, high, low_open, high_open)}, "
                      f"got {show(value)}{'' if finite else ' (not finite)'}")
  return float(value)


class Interrupted(KeyboardInterrupt):
  """A run stopped by a signal (SIGTERM, Ctrl-C) after saving its last step: rerunning the
  same command resumes it. A KeyboardInterrupt, so code that handles Ctrl-C handles it; the
  CLI exits with status 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)."""

  def __init__(self, signum: int, step: int, directory: str):
    super().__init__(f"stopped by signal {signum} at step {step}; checkpoint saved in "
                     f"{directory}, rerun the same command to resume")
    self.signum, self.step, self.directory = signum, step, directory


class Terminated(KeyboardInterrupt):
  """SIGTERM outside a training loop (which saves its step and raises `Interrupted`): the
  command stops where it is, undoes what it had not finished (`Workdir.undo_on_failure`)
  and keeps what it had saved; the CLI exits with status 128 + the signal's number."""

  def __init__(self, signum: int):
    super().__init__(f"stopped by signal {signum}; what was saved is kept, rerun the same "
                     f"command to go on")
    self.signum = signum
