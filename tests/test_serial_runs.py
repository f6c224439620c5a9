"""Deep Serial Number on workdirs, at a tiny size (the 8x8 digits, a 2x2 px stamp of 4
bits): teacher -> students -> eval, where the valid serial must beat none; the owner's files
private; resuming; a locked diffusion model's plumbing; bad inputs refused in one line with
nothing half-written."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from tests.conftest import TINY_DIT, run_cli, tree_hashes
from wdmjax import runs, serial
from wdmjax.errors import WdmjaxError
from wdmjax.runs.serial import ISSUE_JSON, LOCK_JSON, SERIALS, TEACHER

SPEC = serial.StampSpec(bits=4, cell=1, corner="top_left")
STUDENT = serial.StudentConfig(steps=300, batch_size=32)


@pytest.fixture(scope="module")
def issued(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("dsn") / "w")
  t = runs.serial_teacher(wd, "digits", steps=300, stamp=SPEC, progress=False)
  rep = runs.serial_issue(wd, 2, config=STUDENT, key=11, invalid=5, progress=False)
  return dict(wd=wd, teacher=t, rep=rep)


def _mode(path: str) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def test_teacher_students_eval_round_trip(issued):
  wd, rep = issued["wd"], issued["rep"]
  assert issued["teacher"].accuracy > 0.8
  assert rep.teacher_accuracy == pytest.approx(issued["teacher"].accuracy)
  serials = [c["serial"] for c in rep.customers]
  assert len(set(serials)) == 2 and all(len(s) == 1 for s in serials)
  for c in rep.customers:
    # The lock works at this size: the valid serial is far better than none or invalid ones.
    assert c["valid"] > c["raw"] + 0.3, c
    assert c["valid"] > c["invalid_mean"] + 0.3, c
  # The owner's files are private; eval reads the serials from them and agrees with issue.
  assert _mode(os.path.join(wd, SERIALS)) == 0o600 and _mode(os.path.join(wd, TEACHER)) == 0o600
  ev = runs.serial_eval(wd, customer=1, serial=serials[1], invalid=5)
  row = ev["customers"][0]
  assert row["typed"] == row["valid"] == rep.customers[1]["valid"]
  assert row["raw"] == rep.customers[1]["raw"]
  # The student a customer receives, loaded alone, needs the stamp.
  model, params, _ = runs.load_student(wd, 0)
  from wdmjax.data import labelled_split
  _, _, xh, yh = labelled_split("digits")
  sn = serial.parse_serial(serials[0], 4)
  assert serial.accuracy(model, params, xh, yh, sn, SPEC) == rep.customers[0]["valid"]


def test_issue_resumes_without_retraining_and_keeps_serials(issued):
  wd = issued["wd"]
  before = tree_hashes(os.path.join(wd, "students"))
  os.remove(os.path.join(wd, ISSUE_JSON))
  rep = runs.serial_issue(wd, 2, config=STUDENT, invalid=5, progress=False)  # key from file
  assert tree_hashes(os.path.join(wd, "students")) == before
  assert [c["serial"] for c in rep.customers] == [c["serial"] for c in issued["rep"].customers]


def test_bad_inputs_are_refused_in_one_line_with_nothing_written(issued, tmp_path):
  wd = issued["wd"]
  before = tree_hashes(wd)
  for args, flag in (
      (["serial", "eval", "--workdir", wd, "--serial", "xyz"], "--serial"),
      (["serial", "eval", "--workdir", wd, "--customer", "5"], "--customer"),
      (["serial", "eval", "--workdir", wd], "--invalid: expected at most 14 invalid serials"),
      (["serial", "issue", "--workdir", wd, "--customers", "1", "--key", str(2 ** 70)],
       "--key: expected an integer in [0, 2**62)"),
      (["serial", "issue", "--workdir", wd, "--customers", "1", "--key", "12"], "--key"),
      (["serial", "issue", "--workdir", wd, "--customers", "1", "--steps", "5"],
       "config: expected the settings of the students issued already (steps 300, not 5"),
      (["serial", "issue", "--workdir", str(tmp_path / "none"), "--customers", "1"],
       "--workdir"),
      (["serial", "teacher", "--workdir", wd], "--workdir"),
      (["serial", "teacher", "--workdir", str(tmp_path / "t"), "--bits", "9"], "--bits"),
      (["serial", "teacher", "--workdir", str(tmp_path / "t"), "--data", "digits", "--cell",
        "8"], "stamp:"),
  ):
    r = run_cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert flag in r.stderr, (flag, r.stderr)
  assert tree_hashes(wd) == before
  assert not os.path.exists(tmp_path / "t") and not os.path.exists(tmp_path / "none")


def test_cli_issue_and_eval_print_the_table(issued):
  r = run_cli("serial", "eval", "--workdir", issued["wd"], "--invalid", "3")
  assert r.returncode == 0, r.stderr
  assert "| customer | serial | valid |" in r.stdout and r.stdout.count("\n| ") >= 3


def test_a_locked_diffusion_model_samples_with_and_without_its_serial(tmp_path):
  base = str(tmp_path / "base")
  runs.train(TINY_DIT, base, ["train.steps=2"], samples=False, progress=False)
  wd = str(tmp_path / "locked")
  rep = runs.serial_lock(wd, base, steps=2, stamp=SPEC, key=3, progress=False)
  assert rep.step == 2 and len(rep.serial) == 1
  assert _mode(os.path.join(wd, LOCK_JSON)) == 0o600
  assert runs.read_lock(wd)["serial"] == rep.serial
  r = run_cli("serial", "sample", "--workdir", wd, "--serial", rep.serial, "--num", "4",
              "--out", str(tmp_path / "g.png"))
  assert r.returncode == 0 and os.path.exists(tmp_path / "g.png"), r.stderr
  model = runs.load_model(wd)
  with_sn = runs.locked_samples(wd, rep.serial, 4, model=model)
  without = runs.locked_samples(wd, None, 4, model=model)
  assert with_sn.shape == without.shape == (4, 8, 8, 1)
  assert not np.array_equal(with_sn, without)  # the stamp reaches the network
  with pytest.raises(WdmjaxError, match=r"serial: expected 1 hex digit \(4 bits\)"):
    runs.serial_sample(wd, 4, serial="zz", out=str(tmp_path / "bad.png"))
  assert not os.path.exists(tmp_path / "bad.png")
  # Locking again to another key is refused, the workdir untouched.
  before = tree_hashes(wd)
  with pytest.raises(WdmjaxError, match="key: this workdir is locked with key 3"):
    runs.serial_lock(wd, base, steps=2, stamp=SPEC, key=4, progress=False)
  with pytest.raises(WdmjaxError, match="stamp: this workdir is locked with stamp"):
    runs.serial_lock(wd, base, steps=2, key=3, progress=False, stamp=serial.StampSpec())
  # ... and a workdir holding another model is not taken over.
  base_before = tree_hashes(base)
  with pytest.raises(WdmjaxError, match="workdir: .* holds a model that is not being locked"):
    runs.serial_lock(base, wd, steps=2, progress=False)
  assert tree_hashes(wd) == before and tree_hashes(base) == base_before
