"""The `wdmjax` command as a user runs it: demo end to end, configs load, help works."""

import glob
import os

import pytest

from tests.conftest import ROOT, run_cli
from wdmjax.train import load_config
from wdmjax.train.presets import PRESETS


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "experiments", "configs",
                                                               "*.py"))))
def test_every_shipped_config_loads_and_builds(path):
  from wdmjax.models import param_count_from_config
  from wdmjax.train.sampling import model_kwargs
  cfg = load_config(path)
  assert param_count_from_config(model_kwargs(cfg)) > 0


def test_cifar10_unet_config_is_the_ddpm_model():
  from wdmjax.models import param_count_from_config
  from wdmjax.train.sampling import model_kwargs
  n = param_count_from_config(model_kwargs(PRESETS["cifar10_unet"]()))
  assert abs(n - 35.7e6) / 35.7e6 < 0.01


def test_demo_runs_end_to_end(tmp_path):
  """A 3-step demo (the shipped base, fewer embedding steps): picture, reports, workdirs."""
  import json

  from PIL import Image
  out = tmp_path / "demo"
  r = run_cli("demo", "--out", str(out), "--steps", "3")
  assert r.returncode == 0, r.stderr
  assert Image.open(out / "demo.png").size[0] > 1000
  report = json.load(open(out / "report.json"))
  for name in ("watermarked", "clean"):
    for key in ("log10_p_value", "verified", "bit_agreement", "bits", "alpha", "test"):
      assert key in report[name]
  # The shipped base never saw the secret: the exact test must not verify it.
  assert not report["clean"]["verified"] and report["clean"]["log10_p_value"] > -3
  assert os.path.isdir(out / "base" / "checkpoints" / "4000")
  assert os.path.isdir(out / "watermarked" / "checkpoints" / "3")
  assert "| watermarked" in r.stdout and "| clean" in r.stdout


def test_help_lists_the_commands():
  r = run_cli("--help")
  assert r.returncode == 0
  for cmd in ("train", "sample", "embed", "extract", "verify", "demo"):
    assert cmd in r.stdout
