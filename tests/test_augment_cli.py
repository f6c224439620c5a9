"""`wdmjax augment preview` and `wdmjax classifier` as a user runs them: files, output, and bad
flags refused in one line."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from tests.conftest import run_cli


def test_preview_writes_the_picture_and_prints_its_path(tmp_path):
  out = tmp_path / "grid.png"
  r = run_cli("augment", "preview", "--data", "digits", "--policy", "uncertainty", "--out", out,
              "--num", "3")
  assert r.returncode == 0, r.stderr
  assert str(out) in r.stdout
  width, height = Image.open(out).size
  assert width > 0 and height > 0


def test_classifier_prints_json_and_writes_params_and_report(tmp_path):
  out = tmp_path / "c.npz"
  r = run_cli("classifier", "--data", "digits", "--augment", "random", "--steps", "20",
              "--out", out, "--json")
  assert r.returncode == 0, r.stderr
  result = json.loads(r.stdout)  # the progress bar goes to stderr: stdout is the JSON alone
  for name in ("accuracy", "shifted_accuracy"):
    assert 0.0 <= result[name] <= 1.0, result
  assert result["steps"] == 20 and result["augment"]["policy"] == "random", result
  assert result["path"] == str(out) and os.path.getsize(out) > 0
  report = json.load(open(tmp_path / "c.json"))
  assert result["report"] == str(tmp_path / "c.json")
  assert report["accuracy"] == result["accuracy"] and report["data"] == "digits", report


# Each is refused before any data is read or anything compiles.
BAD = [
  (["augment", "preview", "--policy", "foo"], "--policy"),
  (["augment", "preview", "--S", "5"], "--S"),  # S of C = 4 (the default)
  (["augment", "preview", "--L", "0"], "--L"),
  (["classifier", "--augment", "bad"], "--augment"),
  (["classifier", "--ops", "rotate,twirl"], "--ops"),
  (["classifier", "--magnitude", "2"], "--magnitude"),
  (["classifier", "--out", "x.txt"], "--out"),
  (["augment", "preview", "--ops", "rotate,rotate"], "--ops"),  # duplicates
  (["augment", "preview", "--out", "g.txt"], "--out"),  # not a .png
  (["augment", "preview", "--C", "5000"], "--C"),  # bounded
  (["classifier", "--batch-size", "1000000000"], "--batch-size"),
  (["classifier", "--steps", "1000000000"], "--steps"),
]


@pytest.mark.parametrize("args, flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flags_exit_2_with_one_line_naming_the_flag(args, flag, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # nothing may be written, and nothing where the tests run
  r = run_cli(*args, "--data", "digits")
  assert r.returncode == 2, (r.stdout, r.stderr)
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"wdmjax: error: {flag}: expected"), lines
  assert not r.stdout and not os.listdir(tmp_path)
