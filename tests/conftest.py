"""Shared fixtures: every test uses one data dir, built once per session."""

import contextlib
import io
import os
import subprocess

import pytest
from hypothesis import settings

# Hypothesis draws the same examples on every run and machine (a random draw never decides
# whether the suite passes); `HYPOTHESIS_PROFILE=explore` draws new ones to look for bugs,
# and whatever it finds is kept as an `@example` of its test.
settings.register_profile("derandomized", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "derandomized"))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIT = os.path.join(ROOT, "tests", "configs", "tiny_dit.py")

# JAX's persistent compilation cache, for this process and every subprocess a test starts
# (set before JAX is imported): the tests compile the same tiny programs many times over,
# and a hit loads the executable instead of compiling it again. Keyed by the program, the
# JAX version and the flags, so it never changes a result.
for _name, _value in (("JAX_COMPILATION_CACHE_DIR",
                       os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache")),
                      ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0"),
                      ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")):
  os.environ.setdefault(_name, _value)


# Single-device programs keep their scratch memory from call to call, as under the CLI
# (`wdmjax.train.host_memory`); it has to run before JAX starts in this process.
from wdmjax.train.host_memory import keep_host_memory  # noqa: E402

keep_host_memory()

# The README runs the suite on 2 workers (pytest-xdist, `--dist loadfile`: a file's tests
# share one worker and its module fixtures). Workers take files in collection order, so the
# longest files go first (cold-cache minutes on 2 cores, measured with --durations=0) and
# the short ones fill in at the end; any file not listed keeps its place after these.
LONGEST_FIRST = ("test_notebooks.py", "test_watermark.py", "test_multihost.py",
                 "test_noisemark.py", "test_train.py", "test_attacks.py",
                 "test_signature_runs.py", "test_ood.py", "test_peft.py", "test_models.py",
                 "test_cli.py", "test_readme.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory):
  """A private TFDS data dir, so tests never depend on (or write to) the user's cache."""
  path = os.environ.get("WDMJAX_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
  os.environ["WDMJAX_DATA_DIR"] = path
  return path


def tree_hashes(root: str) -> dict[str, str]:
  """sha256 of every file under `root`, by relative path: to show a command wrote nothing."""
  import hashlib

  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      with open(os.path.join(d, f), "rb") as fh:
        out[os.path.relpath(os.path.join(d, f), root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def run_cli(*args) -> subprocess.CompletedProcess:
  """Runs `wdmjax ARGS` in this process, as `wdmjax.cli.main` (what the console script
  calls), capturing what it prints; returns a CompletedProcess. In-process: no interpreter
  start-up or JAX import per call, and the compiled functions are shared with other tests."""
  from wdmjax.cli import main

  argv = [str(a) for a in args]
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      code = main(argv)
    except SystemExit as e:  # argparse: usage errors (2) and --help (0)
      code = e.code if isinstance(e.code, int) else 2
  return subprocess.CompletedProcess(["wdmjax", *argv], code, out.getvalue(), err.getvalue())

