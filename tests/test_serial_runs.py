"""Deep Serial Number on workdirs, at a tiny size (the 8x8 digits, a 2x2 px stamp of 4
bits): teacher -> students -> eval, where the valid serial must beat none; the owner's key,
seals and private files; tampered, copied and misplaced files refused in one line; one
writer at a time; a killed `issue` resumed with nothing lost; a locked diffusion model's
plumbing; bad inputs refused in one line with nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

import wdmjax.runs.serial as runs_serial
from tests.conftest import ROOT, TINY_DIT, run_cli, tree_hashes
from wdmjax import runs, serial
from wdmjax.configs import load_config
from wdmjax.errors import Terminated, WdmjaxError
from wdmjax.keys import key_id
from wdmjax.runs.serial import DSN_JSON, ISSUE_JSON, LOCK_JSON, SERIALS, STUDENTS, TEACHER
from wdmjax.workdir import Workdir

SPEC = serial.StampSpec(bits=4, cell=1, corner="top_left")
STUDENT = serial.StudentConfig(steps=300, batch_size=32)
# A fixed key and nonce: the serials, hence the students, are the same in every run.
KEY = "serial-test-owner-key-0123456789abcdef"
OTHER_KEY = "another-owner-key-fedcba9876543210"
NONCE = "0123456789abcdef0123456789abcdef"


def _key_file(path, text: str) -> str:
  with open(path, "w") as f:
    f.write(text + "\n")
  os.chmod(path, 0o600)
  return str(path)


@pytest.fixture(scope="module")
def issued(tmp_path_factory):
  root = tmp_path_factory.mktemp("dsn")
  key = _key_file(root / "owner.key", KEY)
  wd = str(root / "w")
  t = runs.serial_teacher(wd, "digits", steps=300, stamp=SPEC, progress=False)
  rep = runs.serial_issue(wd, 2, config=STUDENT, key_file=key, invalid=5, nonce=NONCE,
                          progress=False)
  return dict(wd=wd, key=key, other=_key_file(root / "other.key", OTHER_KEY), teacher=t,
              rep=rep)


@pytest.fixture(autouse=True)
def _no_key_in_environment(monkeypatch):
  monkeypatch.delenv("WDMJAX_OWNER_KEY", raising=False)
  monkeypatch.delenv("WDMJAX_OWNER_KEY_FILE", raising=False)


def _mode(path: str) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


def _copy(issued, tmp_path) -> str:
  return shutil.copytree(issued["wd"], str(tmp_path / "copy"))


def _one_line(r, *words) -> str:
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r
  for w in words:
    assert w in lines[0], (w, lines[0])
  return lines[0]


def test_teacher_students_eval_round_trip(issued):
  wd, rep, key = issued["wd"], issued["rep"], issued["key"]
  assert issued["teacher"].accuracy > 0.8
  assert rep.teacher_accuracy == pytest.approx(issued["teacher"].accuracy)
  serials = [c["serial"] for c in rep.customers]
  assert len(set(serials)) == 2 and all(len(s) == 1 for s in serials)
  # The serials are the owner key's and the nonce's, nothing else.
  want = serial.derive_serials(KEY.encode(), NONCE, 2, 4)
  assert serials == [serial.format_serial(s) for s in want]
  for c in rep.customers:
    # The lock works at this size: the valid serial is far better than none or invalid ones.
    assert c["valid"] > c["raw"] + 0.3, c
    assert c["valid"] > c["invalid_mean"] + 0.3, c
  # The owner's files are private; eval reads the serials from them and agrees with issue.
  assert _mode(os.path.join(wd, SERIALS)) == 0o600 and _mode(os.path.join(wd, TEACHER)) == 0o600
  ev = runs.serial_eval(wd, customer=1, serial=serials[1], invalid=5, key_file=key)
  row = ev["customers"][0]
  assert row["typed"] == row["valid"] == rep.customers[1]["valid"]
  assert row["raw"] == rep.customers[1]["raw"]
  assert row["invalid_mean"] == rep.customers[1]["invalid_mean"]  # the same invalid serials
  # The student a customer receives, loaded alone, needs the stamp.
  model, params, _ = runs.load_student(wd, 0, key_file=key)
  from wdmjax.data import labelled_split
  _, _, xh, yh = labelled_split("digits")
  sn = serial.parse_serial(serials[0], 4)
  assert serial.accuracy(model, params, xh, yh, sn, SPEC) == rep.customers[0]["valid"]


def test_issue_resumes_without_retraining_and_keeps_serials(issued, monkeypatch):
  wd = issued["wd"]
  before = tree_hashes(os.path.join(wd, "students"))
  os.remove(os.path.join(wd, ISSUE_JSON))
  monkeypatch.setenv("WDMJAX_OWNER_KEY_FILE", issued["key"])  # the key from the environment
  rep = runs.serial_issue(wd, 2, config=STUDENT, invalid=5, progress=False)
  assert tree_hashes(os.path.join(wd, "students")) == before
  assert [c["serial"] for c in rep.customers] == [c["serial"] for c in issued["rep"].customers]


def test_no_file_others_can_read_holds_a_serial_and_a_wrong_key_learns_nothing(issued,
                                                                             tmp_path):
  """serials.json (sealed, mode 600) is the only file of the workdir with the serials;
  issue.json holds none. A wrong key, for issue or eval, is refused in one line naming both
  keys by their public ids only; a second issue with another key changes nothing."""
  wd, key, other = issued["wd"], issued["key"], issued["other"]
  for d, _, files in os.walk(wd):
    for name in files:
      path = os.path.join(d, name)
      if name.endswith(".json") and _mode(path) & 0o044:
        with open(path) as f:
          assert "serial" not in _keys(json.load(f)), path
  assert _mode(os.path.join(wd, SERIALS)) == 0o600
  with open(os.path.join(wd, ISSUE_JSON)) as f:
    assert all("serial" not in c for c in json.load(f)["customers"])
  before = tree_hashes(wd)
  for args in (["serial", "issue", "--workdir", wd, "--customers", "3", "--key-file", other],
               ["serial", "eval", "--workdir", wd, "--key-file", other, "--show-serials"]):
    line = _one_line(run_cli(*args), SERIALS, key_id(OTHER_KEY.encode()),
                     key_id(KEY.encode()))
    assert KEY not in line and OTHER_KEY not in line
  r = run_cli("serial", "issue", "--workdir", wd, "--customers", "1")  # no key at all
  _one_line(r, "--key-file: expected the owner key's file", "WDMJAX_OWNER_KEY")
  assert tree_hashes(wd) == before
  # A table shows the serials only when the owner asks.
  serials = [c["serial"] for c in issued["rep"].customers]
  r = run_cli("serial", "eval", "--workdir", wd, "--key-file", key, "--invalid", "3")
  assert r.returncode == 0 and "| serial |" not in r.stdout, r.stderr
  r = run_cli("serial", "eval", "--workdir", wd, "--key-file", key, "--invalid", "3",
              "--show-serials", "--customer", "1", "--json")
  assert r.returncode == 0 and json.loads(r.stdout)["customers"][0]["serial"] == serials[1]


def _keys(value) -> set[str]:
  """Every key of every object nested in a JSON value."""
  if isinstance(value, dict):
    return set(value).union(*map(_keys, value.values()))
  if isinstance(value, list):
    return set().union(*map(_keys, value))
  return set()


def _tamper(wd: str, name: str, change) -> None:
  path = os.path.join(wd, name)
  if callable(change):
    change(path)
  elif isinstance(change, bytes):
    with open(path, "wb") as f:
      f.write(change)
  else:
    with open(path) as f:
      rec = json.load(f)
    rec.update(change)
    with open(path, "w") as f:
      json.dump(rec, f)


def _truncate(path: str) -> None:
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def test_tampered_truncated_and_mistyped_files_are_refused_in_one_line(issued, tmp_path):
  """Every file eval reads back, damaged one way or another: one line that starts with the
  file's path (not a flag the user never gave) and says what is wrong."""
  w = _copy(issued, tmp_path)
  key = issued["key"]
  s0 = os.path.join(STUDENTS, "customer_000.npz")
  s1 = os.path.join(w, STUDENTS, "customer_001.npz")
  cases = [
    (SERIALS, _truncate, "expected JSON"),
    (SERIALS, {"customers": "x"}, "an altered one"),
    (SERIALS, {"seal": None}, "without a seal"),
    (SERIALS, lambda p: os.chmod(p, 0o644), "only its owner can read"),
    (DSN_JSON, b"\xff\xfe", "expected JSON"),
    (DSN_JSON, {"teacher": {"num_classes": "x"}}, "field 'num_classes': expected an integer"),
    (DSN_JSON, {"stamp": {"bits": 9, "cell": 1, "corner": "top_left"}},
     "field 'stamp': bits: expected a perfect square"),
    (DSN_JSON, {"stamp": {"bits": 4, "cell": 1, "corner": "top_right"}},
     "field 'stamp': expected the stamp the students were issued with"),
    (DSN_JSON, {"seed": -1}, "field 'seed': expected an integer >= 0"),
    (DSN_JSON, {"method": "wdm"}, "field 'method': expected one of"),
    (TEACHER, _truncate, "expected the teacher the students were issued from"),
    (TEACHER, lambda p: shutil.copy(s1, p), "expected the teacher"),
    (s0, _truncate, "expected the student issued to customer 0 here"),
    (s0, lambda p: shutil.copy(s1, p), "expected the student issued to customer 0 here"),
    (s0, lambda p: (os.remove(p), os.symlink(s1, p)), "expected a regular file, got a "
                                                      "symbolic link"),
    (s0, os.remove, "expected a file, got nothing"),
  ]
  for name, change, words in cases:
    path = os.path.join(w, name)
    saved = path + ".saved"
    shutil.copy2(path, saved)
    _tamper(w, name, change)
    r = run_cli("serial", "eval", "--workdir", w, "--key-file", key, "--invalid", "3")
    line = _one_line(r, words)
    assert line.startswith(f"wdmjax: error: {path}"), (name, line)
    if os.path.lexists(path):
      os.remove(path)
    os.replace(saved, path)
  # The restored copy is whole again.
  assert run_cli("serial", "eval", "--workdir", w, "--key-file", key,
                 "--invalid", "3").returncode == 0


def test_a_student_copied_from_another_workdir_or_planted_is_refused(issued, tmp_path):
  """Students are bound to their workdir by the sha256 sealed in serials.json: another
  workdir's student (here: customer 0's weights, a little changed, as another teacher's
  student would be), another customer's, or a student file that was never issued here,
  are refused; nothing is written."""
  import jax

  w = _copy(issued, tmp_path)
  key = issued["key"]
  model, params, _ = runs.load_student(w, 0, key_file=key)
  from wdmjax.models.params_io import save_params_npz
  path = os.path.join(w, STUDENTS, "customer_000.npz")
  save_params_npz(jax.tree.map(lambda a: a * 1.01, params), path, dtype=np.float32)
  with pytest.raises(WdmjaxError, match="expected the student issued to customer 0 here"):
    runs.load_student(w, 0, key_file=key)
  os.replace(os.path.join(w, STUDENTS, "customer_001.npz"), path)
  with pytest.raises(WdmjaxError, match="expected the student issued to customer 0 here"):
    runs.serial_eval(w, customer=0, invalid=3, key_file=key)
  shutil.copy(path, os.path.join(w, STUDENTS, "customer_002.npz"))  # never issued
  before = tree_hashes(w)
  r = run_cli("serial", "issue", "--workdir", w, "--customers", "3", "--key-file", key,
              "--invalid", "3")
  _one_line(r, "customer_002.npz: expected no file (no student 2 was issued")
  assert tree_hashes(w) == before


def test_a_data_dir_in_dsn_json_is_never_used(issued, tmp_path):
  """dsn.json records no data directory; one planted there is ignored (eval writes
  nothing anywhere, let alone outside the workdir)."""
  w = _copy(issued, tmp_path)
  outside = str(tmp_path / "outside" / "dd")
  _tamper(w, DSN_JSON, {"data_dir": outside})
  before = tree_hashes(w)
  r = run_cli("serial", "eval", "--workdir", w, "--key-file", issued["key"], "--invalid", "3")
  assert r.returncode == 0, r.stderr
  assert not os.path.exists(tmp_path / "outside") and tree_hashes(w) == before
  with open(os.path.join(issued["wd"], DSN_JSON)) as f:
    assert "data_dir" not in json.load(f)


_HOLDER = """
import sys
from wdmjax.locks import directory_lock
with directory_lock(sys.argv[1]):
  print("holding", flush=True)
  sys.stdin.readline()
"""


def test_a_second_issue_while_one_writes_is_refused_in_one_line(issued):
  wd = issued["wd"]
  before = tree_hashes(wd)
  first = subprocess.Popen([sys.executable, "-c", _HOLDER, wd], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
  try:
    assert first.stdout.readline().strip() == "holding"
    r = run_cli("serial", "issue", "--workdir", wd, "--customers", "3", "--key-file",
                issued["key"])
    _one_line(r, "--workdir", f"in use by pid {first.pid}")
  finally:
    first.communicate("go\n", timeout=60)
  assert first.returncode == 0 and tree_hashes(wd) == before


_KILLED = """
import sys
from wdmjax import runs, serial
import wdmjax.runs.serial as rs
distill = rs.distill_student
def announce(*args, desc="", **kw):
  print("distilling", desc, flush=True)
  return distill(*args, desc=desc, **kw)
rs.distill_student = announce
runs.serial_issue(sys.argv[1], 3, key_file=sys.argv[2], invalid=3, progress=False,
                  config=serial.StudentConfig(steps=300, batch_size=32))
"""


def test_sigkill_during_issue_then_a_rerun_resumes_and_loses_nothing(issued, tmp_path):
  """A real SIGKILL while customer 2 is distilled (a copy of the workdir holding customers
  0 and 1), plus a temporary file as a kill during a write leaves: the rerun keeps the
  students issued byte for byte, removes the temporary file and issues customer 2."""
  w = _copy(issued, tmp_path)
  key = issued["key"]
  students = os.path.join(w, STUDENTS)
  before = tree_hashes(students)
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  p = subprocess.Popen([sys.executable, "-c", _KILLED, w, key], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True, env=env)
  try:
    assert p.stdout.readline().strip() == "distilling customer 2"
  finally:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
  assert p.returncode == -signal.SIGKILL
  assert tree_hashes(students) == before  # customer 2 was never half-written
  with open(os.path.join(students, ".customer_002.npz.x1y2.tmp"), "wb") as f:
    f.write(b"half")
  rep = runs.serial_issue(w, 3, config=STUDENT, key_file=key, invalid=3, progress=False)
  after = tree_hashes(students)
  assert {k: after[k] for k in before} == before and sorted(after) == [
    "customer_000.npz", "customer_001.npz", "customer_002.npz"]
  assert [c["serial"] for c in rep.customers[:2]] == [c["serial"]
                                                      for c in issued["rep"].customers]
  assert len(runs.read_serials(w, key)["customers"]) == 3


def test_an_interrupted_issue_keeps_what_it_issued(issued, tmp_path, monkeypatch):
  """SIGTERM (as the CLI raises it) while customer 2 is distilled: customers 0 and 1 stay,
  serials.json still vouches for exactly them, nothing else is left."""
  w = _copy(issued, tmp_path)
  before = tree_hashes(w)

  def stopped(*args, **kwargs):
    raise Terminated(signal.SIGTERM)

  monkeypatch.setattr(runs_serial, "distill_student", stopped)
  with pytest.raises(Terminated):
    runs.serial_issue(w, 3, config=STUDENT, key_file=issued["key"], invalid=3,
                      progress=False)
  assert tree_hashes(w) == before


def test_bad_inputs_are_refused_in_one_line_with_nothing_written(issued, tmp_path):
  wd, key = issued["wd"], issued["key"]
  wdm = tmp_path / "wdm"  # another kind of run
  wdm.mkdir()
  (wdm / "config.json").write_text("{}")
  (wdm / "secret.json").write_text("{}")
  before = tree_hashes(wd)
  k = ["--key-file", key]
  for args, flag in (
      (["serial", "eval", "--workdir", wd, *k, "--serial", "xyz"], "--serial"),
      (["serial", "eval", "--workdir", wd, *k, "--customer", "5"], "--customer"),
      (["serial", "eval", "--workdir", wd, *k], "--invalid: expected at most 14 invalid serials"),
      (["serial", "issue", "--workdir", wd, *k, "--customers", "1", "--steps", "5"],
       "config: expected the settings of the students issued already (steps 300, not 5"),
      (["serial", "issue", "--workdir", wd, *k, "--customers", "1000000"],
       "--customers: expected at most 10,000"),
      (["serial", "issue", "--workdir", wd, *k, "--customers", "9"],
       "--customers: expected at most 8 for 4-bit serials"),
      (["serial", "issue", "--workdir", wd, "--customers", "1", "--key-file",
        str(tmp_path / "nokey")], "--key-file: expected a key file"),
      (["serial", "issue", "--workdir", str(tmp_path / "none"), *k, "--customers", "1"],
       "--workdir"),
      (["serial", "teacher", "--workdir", wd], "--workdir"),
      (["serial", "teacher", "--workdir", str(wdm)],
       "--workdir: expected a new or empty directory for a serial workdir"),
      (["serial", "teacher", "--workdir", str(tmp_path / "t"), "--bits", "9"], "--bits"),
      (["serial", "teacher", "--workdir", str(tmp_path / "t"), "--data", "digits", "--cell",
        "8", "--bits", "4"], "stamp:"),
      (["serial", "teacher", "--workdir", str(tmp_path / "t"), "--data", "digits"],
       "stamp: expected a stamp of at most half the image's side (4 px for 8x8 images), got "
       "8x8 px (64 bits"),
  ):
    r = run_cli(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert flag in r.stderr, (flag, r.stderr)
  assert tree_hashes(wd) == before
  assert not os.path.exists(tmp_path / "t") and not os.path.exists(tmp_path / "none")
  assert sorted(os.listdir(wdm)) == ["config.json", "secret.json"]


def test_cli_issue_and_eval_print_the_table(issued):
  r = run_cli("serial", "eval", "--workdir", issued["wd"], "--key-file", issued["key"],
              "--invalid", "3")
  assert r.returncode == 0, r.stderr
  assert "| customer | valid |" in r.stdout and r.stdout.count("\n| ") >= 3


def test_a_locked_diffusion_model_samples_with_and_without_its_serial(issued, tmp_path):
  key, other = issued["key"], issued["other"]
  base = str(tmp_path / "base")
  runs.train(TINY_DIT, base, ["train.steps=2"], samples=False, progress=False)
  wd = str(tmp_path / "locked")
  # (a fixed nonce: the serial is a constant of the compiled step, which the cache then keeps)
  rep = runs.serial_lock(wd, base, steps=2, stamp=SPEC, key_file=key, nonce=NONCE,
                         progress=False)
  assert rep.step == 2 and len(rep.serial) == 1 and rep.key_id == key_id(KEY.encode())
  assert _mode(os.path.join(wd, LOCK_JSON)) == 0o600
  assert runs.read_lock(wd, key)["serial"] == rep.serial
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
  with pytest.raises(WdmjaxError, match=r"num: expected an integer in \[1, 10000\]"):
    runs.serial_sample(wd, 10**7, out=str(tmp_path / "bad.png"))
  assert not os.path.exists(tmp_path / "bad.png")
  # Resuming with another key is refused, naming key ids only: never the key, nor the serial.
  before = tree_hashes(wd)
  r = run_cli("serial", "lock", "--base", base, "--workdir", wd, "--steps", "2",
              "--key-file", other, "--bits", "4", "--corner", "top_left")
  line = _one_line(r, f"{wd}/{LOCK_JSON}: expected a record of this owner key (id "
                      f"{key_id(OTHER_KEY.encode())})")
  assert KEY not in line and "serial" not in line.split("got", 1)[1]
  # A tampered lock.json: one line naming it, for sample (no key) and for the owner.
  lock_json = os.path.join(wd, LOCK_JSON)
  with open(lock_json) as f:
    good = f.read()
  for text, words in (('{"method": "serial_lock", "stamp": {"bits": "x"', "expected JSON"),
                      (good.replace('"lock_weight": 1.0', '"lock_weight": 9.0'),
                       "an altered one")):
    with open(lock_json, "w") as f:
      f.write(text)
    r = run_cli("serial", "sample", "--workdir", wd, "--serial", rep.serial, "--num", "4",
                "--out", str(tmp_path / "t.png"))
    if words == "expected JSON":  # (sample reads only the stamp: no key, no seal)
      assert _one_line(r, words).startswith(f"wdmjax: error: {lock_json}: expected JSON")
    with pytest.raises(WdmjaxError, match=f"{lock_json}: .*{words}"):
      runs.read_lock(wd, key)
  with open(lock_json, "w") as f:
    f.write(good)
  with pytest.raises(WdmjaxError, match="stamp: this workdir is locked with stamp"):
    runs.serial_lock(wd, base, steps=2, key_file=key, progress=False,
                     stamp=serial.StampSpec(bits=16))
  # ... a workdir holding another model or a serial workdir is not taken over ...
  base_before = tree_hashes(base)
  with pytest.raises(WdmjaxError, match="workdir: expected a new or empty directory"):
    runs.serial_lock(base, wd, steps=2, key_file=key, progress=False)
  with pytest.raises(WdmjaxError, match="workdir: expected a new or empty directory"):
    runs.serial_lock(issued["wd"], base, steps=2, key_file=key, progress=False)
  # ... and a latent model is refused: its stamp would sit in the latents.
  latent = Workdir(str(tmp_path / "latent"))
  os.makedirs(latent.path)
  latent.write_config(load_config(TINY_DIT, ["data.channels=4"]))
  with pytest.raises(WdmjaxError, match="base: expected a pixel-space diffusion model"):
    runs.serial_lock(str(tmp_path / "l2"), latent.path, steps=2, key_file=key,
                     progress=False)
  assert tree_hashes(wd) == before and tree_hashes(base) == base_before
  assert not os.path.exists(tmp_path / "l2")
