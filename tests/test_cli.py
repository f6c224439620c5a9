"""The `wdmjax` command as a user runs it: demo end to end, configs load, help works."""

import glob
import os

import pytest

from tests.conftest import ROOT, run_cli
from wdmjax.configs import config_path, load_config, shipped_configs
from wdmjax.errors import WdmjaxError
from wdmjax.models import count_params
from wdmjax.train import setup

CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "wdmjax", "configs", "*.py")))


def test_every_preset_is_one_shipped_file():
  names = {os.path.basename(p)[:-3] for p in CONFIG_FILES} - {"__init__", "schema"}
  assert names == set(shipped_configs()) and "mnist5k_dit" in names


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_loads_by_name_and_by_path_and_builds(name):
  by_name, by_path = load_config(name), load_config(config_path(name))
  assert by_name.to_dict() == by_path.to_dict()
  assert count_params(setup(by_name).abstract_params()) > 0


def test_a_validated_config_is_locked():
  cfg = load_config("mnist5k_dit", ["train.steps=7"])
  assert cfg.is_locked and cfg.train.steps == 7
  with pytest.raises(AttributeError):
    cfg.train.stpes = 8  # a typo cannot add a key
  with pytest.raises(WdmjaxError, match="unknown key 'diffusion.class_dropout_prob'"):
    load_config("mnist5k_dit", ["diffusion.class_dropout_prob=0.2"])  # removed: no effect


def test_cifar10_unet_config_is_the_ddpm_model():
  n = count_params(setup(load_config("cifar10_unet")).abstract_params())
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
  # where the time went: every phase, each with its compiling share
  phases = [line.split() for line in r.stdout.splitlines()
            if line.split()[:1] in (["base"], ["embed"], ["sample"], ["verify"])]
  assert [p[0] for p in phases] == ["base", "embed", "sample", "verify"]
  total = float(r.stdout.split("done in ")[1].split()[0])
  assert sum(float(p[1]) for p in phases) <= total + 1
  assert all(0 <= float(p[2]) <= float(p[1]) for p in phases)
  assert float(phases[1][2]) > 0  # the embedding compiles its train step


def test_help_lists_the_commands():
  r = run_cli("--help")
  assert r.returncode == 0
  for cmd in ("train", "sample", "embed", "extract", "verify", "demo"):
    assert cmd in r.stdout
