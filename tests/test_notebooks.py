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
# Each notebook ends with one machine-readable line: `RESULT size=tiny key=value ...`.
RESULT = re.compile(r"^RESULT (.+)$", re.MULTILINE)


def _stdout(nb) -> str:
  return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []) if out.get("output_type") == "stream"
                 and out.get("name") == "stdout")


def _result(stdout: str) -> dict[str, str]:
  """The `key=value` pairs of the last RESULT line in a notebook's output."""
  found = RESULT.findall(stdout)
  assert found, f"no RESULT line in the notebook's output:\n{stdout[-2000:]}"
  pairs = [item.split("=", 1) for item in found[-1].split()]
  assert all(len(p) == 2 for p in pairs), found[-1]
  return dict(pairs)


def _check_quickstart(stdout: str) -> None:
  # The watermarked model's exact keyed test must beat the clean model's by far: at least 15
  # of the 16 bits at the tiny size (log10 p <= -3.59; all 16 give -4.82), where a model
  # without the key agrees with each bit by a fair coin.
  r = _result(stdout)
  wm, clean = float(r["log10_p_watermarked"]), float(r["log10_p_clean"])
  assert r["size"] == "tiny"
  assert wm <= -3.5, wm
  assert clean > -2.0, clean
  assert wm < clean


def _check_difffit(stdout: str) -> None:
  # DiffFit trains a few percent of the tiny DiT, `full` all of it, and a delta applied onto
  # its base is bit for bit the fine-tune that load_model restores. Step times are printed in
  # the RESULT line but never compared: timings do not belong in a test.
  r = _result(stdout)
  assert r["size"] == "tiny"
  fraction = float(r["difffit_fraction"])
  assert 0.0 < fraction < 0.1, fraction
  assert 0 < int(r["difffit_trainable"]) < int(r["total"]), r
  assert int(r["full_trainable"]) == int(r["total"]), r
  assert float(r["delta_max_abs_diff"]) == 0.0, r
  # The delta holds the trainable leaves only (float32): DiffFit's is far smaller than full's.
  assert 0 < int(r["difffit_delta_bytes"]) < int(r["full_delta_bytes"]) / 5, r
  assert float(r["difffit_step_ms"]) > 0 and float(r["full_step_ms"]) > 0, r


def _check_verification(stdout: str) -> None:
  # Exact statistics: 41 of 48 bits are needed at fpr 1e-6 (P(X >= 41) = 10^-6.51, P(X >= 40)
  # = 10^-5.78), the float64 tail matches the exact integer tail, and identification finds the
  # planted key among 1,000 and no key for a random message. The MMSE estimator follows Monte
  # Carlo on LeNet; the unattacked watermark verifies with at least 15 of its 16 bits.
  r = _result(stdout)
  assert r["size"] == "tiny"
  assert int(r["threshold_48_1e-6"]) == 41, r
  assert float(r["max_log10_sf_err"]) < 1e-9, r
  assert int(r["identified_best"]) == 17 and r["identified_planted"] == "1", r
  assert r["identified_null"] == "0", r
  assert 0.0 <= float(r["mmse_mc_mae"]) < 0.1, r
  assert float(r["unattacked_agreement"]) >= 15 / 16, r
  assert float(r["unattacked_log10_p"]) <= -3.5, r
  # The guarded embedding still verifies unattacked; the soft and best-sample tests see the
  # plain watermark too (best: at most 64 * 2^-16 = 10^-3.01 with 16 bits).
  assert float(r["guarded_log10_p"]) <= -3.5, r
  assert float(r["soft_log10_p"]) <= -3.5, r
  assert float(r["best_log10_p"]) <= -2.5, r
  for name in ("strongest_attack_agreement", "jpeg50_agreement"):
    assert 0.0 <= float(r[name]) <= 1.0, (name, r)


def _check_augmentation(stdout: str) -> None:
  # The kept candidate is each image's highest-loss one, exactly (the selection and the
  # candidates' losses come out of one call), and S = C keeps all C of each of the B images.
  # Accuracies are probabilities; at the tiny size only the unaugmented classifier is held to
  # beating chance (1 in 10 digits): a few hundred steps do not rank the policies.
  r = _result(stdout)
  assert r["size"] == "tiny"
  assert float(r["kept_loss_max_abs_diff"]) == 0.0, r
  assert float(r["ranked_loss_max_abs_diff"]) == 0.0, r
  b, c = int(r["num_images"]), int(r["C"])
  assert tuple(int(d) for d in r["selection_shape"].split("x")) == (b * c, 28, 28, 1), r
  assert float(r["kept_loss"]) >= float(r["random_candidate_loss"]) >= 0.0, r
  for policy in ("none", "random", "uncertainty"):
    for name in (f"accuracy_{policy}", f"shifted_{policy}"):
      assert 0.0 <= float(r[name]) <= 1.0, (name, r)
  assert float(r["accuracy_none"]) > 0.1, r
  assert int(r["bad_S_rejected"]) == 2, r


def _check_signature(stdout: str) -> None:
  # Exact thresholds (41 of 48 bits at 1e-6; 43 among 100 users, tested at 1e-8), only the
  # decoder changed (the autoencoder's, DiT's and extractor's files hash the same), the
  # whitened logits of held-out digits are decorrelated, and both bad inputs are refused.
  # Detection itself is not asserted: the tiny extractor is untrained.
  r = _result(stdout)
  assert r["size"] == "tiny"
  assert int(r["threshold_48_1e-6"]) == 41 and int(r["threshold_100_users"]) == 43, r
  assert r["only_decoder_changed"] == "1", r
  assert float(r["whitened_offdiag"]) < 0.3, r
  assert 0.0 <= float(r["ssim"]) <= 1.0 and float(r["psnr"]) > 0, r
  assert 0 <= int(r["detected"]) <= int(r["images"]), r
  assert int(r["refused"]) == 2, r


def _check_serial(stdout: str) -> None:
  # The gradient reversal negates and scales, both bad inputs are refused, and the tiny
  # student works with its serial number far better than without one.
  r = _result(stdout)
  assert r["size"] == "tiny"
  assert r["grl_ok"] == "1" and int(r["refused"]) == 2, r
  for name in ("teacher", "valid", "raw", "invalid_mean", "reverse_max"):
    assert 0.0 <= float(r[name]) <= 1.0, (name, r)
  assert float(r["valid"]) > float(r["raw"]) + 0.3, r


def _check_ood(stdout: str) -> None:
  # Reproducible scores, three bad inputs refused, and noise and inverted digits told apart
  # from the model's digits by the reconstruction score.
  r = _result(stdout)
  assert r["size"] == "tiny"
  assert r["deterministic"] == "1" and int(r["refused"]) == 3, r
  for name in ("auroc_gaussian", "auroc_inverted"):
    assert float(r[name]) > 0.9, (name, r)
  assert 0.0 <= float(r["auroc_photos"]) <= 1.0, r


def _check_noise_watermarks(stdout: str) -> None:
  # Inversion brings the image back; both noise watermarks separate their own samples from
  # clean ones by orders of magnitude; Gaussian Shading's noise passes a KS test against N(0, 1).
  r = _result(stdout)
  assert r["size"] == "tiny"
  assert float(r["image_rmse"]) < 0.1 and float(r["inversion_signs"]) > 0.55, r
  assert float(r["tr_gauss_own"]) < float(r["tr_gauss_clean"]) - 2, r
  assert float(r["gs_own"]) < float(r["gs_clean"]) - 2, r
  assert float(r["gs_ks_p"]) > 1e-3, r
  assert int(r["bench_rows"]) == 9, r


CHECKS = {
  "01_quickstart.ipynb": _check_quickstart,
  "02_difffit.ipynb": _check_difffit,
  "03_verification_robustness_attacks.ipynb": _check_verification,
  "04_augmentation.ipynb": _check_augmentation,
  "05_stable_signature.ipynb": _check_signature,
  "06_serial_numbers.ipynb": _check_serial,
  "07_ood_detection.ipynb": _check_ood,
  "08_noise_watermarks_benchmark.ipynb": _check_noise_watermarks,
}


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
