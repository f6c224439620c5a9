"""Shared fixtures: every test uses one data dir, built once per session."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DIT = os.path.join(ROOT, "tests", "configs", "tiny_dit.py")


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory):
  """A private TFDS data dir, so tests never depend on (or write to) the user's cache."""
  path = os.environ.get("WDMJAX_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
  os.environ["WDMJAX_DATA_DIR"] = path
  return path


def run_cli(*args, env=None, timeout=300):
  """Runs `python -m wdmjax.cli ARGS` in a subprocess; returns the CompletedProcess."""
  import subprocess
  return subprocess.run([sys.executable, "-m", "wdmjax.cli", *args], capture_output=True,
                        text=True, env=env or os.environ.copy(), timeout=timeout, cwd=ROOT)
