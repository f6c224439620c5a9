"""Every notebook in notebooks/ runs top to bottom at its tiny size, in a fresh kernel."""

import glob
import os
import re
import time

import nbclient
import nbformat
import pytest

from tests.conftest import ROOT

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
KERNEL = "python3"
SIZE_ENV = "WDMJAX_NOTEBOOK_SIZE"
RESULT = re.compile(r"^RESULT size=(\w+) log10_p_watermarked=(\S+) log10_p_clean=(\S+)",
                    re.MULTILINE)


def _stdout(nb) -> str:
  return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []) if out.get("output_type") == "stream"
                 and out.get("name") == "stdout")


def _check_quickstart(stdout: str) -> None:
  # The watermarked model's exact keyed test must beat the clean model's by far: at least 15
  # of the 16 bits at the tiny size (log10 p <= -3.59; all 16 give -4.82), where a model
  # without the key agrees with each bit by a fair coin.
  m = RESULT.search(stdout)
  assert m, f"no RESULT line in the notebook's output:\n{stdout[-2000:]}"
  size, wm, clean = m.group(1), float(m.group(2)), float(m.group(3))
  assert size == "tiny"
  assert wm <= -3.5, wm
  assert clean > -2.0, clean
  assert wm < clean


CHECKS = {"01_quickstart.ipynb": _check_quickstart}


def test_notebooks_exist_and_are_stored_without_outputs():
  assert NOTEBOOKS, "no notebooks in notebooks/"
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL, path
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, (path, cell.source[:80])


def test_kernel_is_installed():
  from jupyter_client.kernelspec import KernelSpecManager

  assert KERNEL in KernelSpecManager().find_kernel_specs()


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom_at_tiny_size(path, tmp_path, monkeypatch, data_dir):
  # The kernel inherits this environment: the tiny size and the session's data dir.
  monkeypatch.setenv(SIZE_ENV, "tiny")
  monkeypatch.setenv("WDMJAX_DATA_DIR", data_dir)
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=300,
                                   resources={"metadata": {"path": str(tmp_path)}})
  t0 = time.time()
  client.execute()  # raises CellExecutionError on the first cell that fails
  print(f"{os.path.basename(path)}: {time.time() - t0:.1f} s")
  check = CHECKS.get(os.path.basename(path))
  if check is not None:
    check(_stdout(nb))
