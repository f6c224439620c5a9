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
  """A 3-step demo (the real config, fewer steps) trains, resumes and writes a 10x10 grid."""
  out = tmp_path / "demo"
  r = run_cli("demo", "--out", str(out), "--steps", "3")
  assert r.returncode == 0, r.stderr
  from PIL import Image
  img = Image.open(out / "samples.png")
  assert img.size == (2 * (10 * 30 + 2),) * 2  # 10 x 10 digits of 28 px, 2 px padding, 2x
  assert os.path.isdir(out / "workdir" / "checkpoints" / "3")


def test_help_lists_the_commands():
  r = run_cli("--help")
  assert r.returncode == 0
  for cmd in ("train", "sample", "demo"):
    assert cmd in r.stdout
