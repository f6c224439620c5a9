"""Faults never destroy a workdir: diverging runs, damaged checkpoints, failed commands."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.conftest import TINY_DIT, run_cli
from wdmjax.locks import LOCK_NAME, holds_lock
from wdmjax.train import Checkpointer, load_trained, setup
from wdmjax.train.checkpoint import SEAL
from wdmjax.train.state import create_train_state
from wdmjax.train.step import train_step
from wdmjax.workdir import Workdir

FAST = ["--no-progress", "--no-samples"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """20 steps of the tiny DiT, checkpoints at 10 and 20; tests work on copies."""
  workdir = str(tmp_path_factory.mktemp("faults") / "base")
  r = run_cli("train", "--config", TINY_DIT, "--workdir", workdir, *FAST)
  assert r.returncode == 0, r.stderr
  return workdir


def _copy(base, tmp_path) -> str:
  return shutil.copytree(base, str(tmp_path / "w"))


def _steps(workdir) -> list[str]:
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def _one_error_line(r, *words):
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("wdmjax: error:"), r
  for w in words:
    assert w in lines[0], lines[0]
  return lines[0]


def test_a_diverging_run_keeps_its_good_checkpoints_and_a_sane_rerun_continues(base, tmp_path):
  """lr=1e10 with a checkpoint every step and no loss logging: the run stops at the first
  non-finite step, no checkpoint holds a non-finite or diverged state (the one whose loss is
  NaN is moved aside), the metrics hold no NaN, and a rerun with a sane rate resumes."""
  w = _copy(base, tmp_path)
  r = run_cli("train", "--config", TINY_DIT, "--workdir", w, *FAST, "--set", "train.steps=60",
              "--set", "train.lr=1e10", "--set", "train.ckpt_every=1", "--set",
              "train.log_every=0")
  line = _one_error_line(r, "diverged", "lower train.lr")
  kept = [int(s) for s in _steps(w) if s.isdigit()]
  assert f"continue from step {max(kept)}" in line
  cfg = Workdir(w).read_config()
  for step in kept:  # every kept checkpoint: finite weights that give a finite loss
    ckpt = Checkpointer(w, writable=False)
    params = ckpt.restore_part({"params": setup(cfg).abstract_params()}, step)["params"]
    ckpt.close()
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params)), step
  assert all(np.isfinite(m["loss"]) for m in Workdir(w).read_metrics())

  r = run_cli("train", "--config", TINY_DIT, "--workdir", w, *FAST, "--set", "train.steps=24")
  assert r.returncode == 0 and f"resumed from {os.path.abspath(w)}/checkpoints/20" in r.stdout, (
    r.stdout, r.stderr)
  steps = [m["step"] for m in Workdir(w).read_metrics()]
  assert steps == sorted(set(steps)) and steps[-1] == 24


def test_a_run_failing_before_its_first_checkpoint_leaves_nothing(tmp_path):
  """lr=1e30: the first update gives weights of 1e30, the second overflows."""
  w = str(tmp_path / "new")
  r = run_cli("train", "--config", TINY_DIT, "--workdir", w, *FAST, "--set", "train.lr=1e30")
  _one_error_line(r, "diverged", "nothing was saved")
  assert not os.path.exists(w)


def test_undo_on_failure_removes_only_what_the_failed_command_made(tmp_path):
  wd = Workdir(str(tmp_path))
  wd.write_json("notes.json", {})
  with pytest.raises(OSError), wd.undo_on_failure():
    wd.write_json(Workdir.EMBEDDING, {})
    os.makedirs(wd.checkpoint_dir)
    raise OSError(28, "No space left on device")
  assert os.listdir(wd.path) == ["notes.json"]
  with pytest.raises(KeyError), wd.undo_on_failure(enabled=False):  # not process 0
    wd.write_json(Workdir.EMBEDDING, {})
    raise KeyError
  assert sorted(os.listdir(wd.path)) == [Workdir.EMBEDDING, "notes.json"]
  os.makedirs(os.path.join(wd.checkpoint_dir, "10"))  # progress made: nothing is removed
  with pytest.raises(ValueError), wd.undo_on_failure():
    wd.write_json(Workdir.SECRET, {})
    raise ValueError
  assert wd.exists(Workdir.SECRET)


@pytest.mark.parametrize("loss, lr, finite", [
    (lambda w: jnp.sum(w**2), 1e-3, True),
    (lambda w: jnp.sum(jnp.sqrt(jnp.abs(w))), 1e-3, False),  # finite loss, infinite gradient
    (lambda w: jnp.sum(w) * 1e15, 1e30, False),  # finite loss and gradient, weights overflow
    (lambda w: jnp.sum(jnp.log(w)), 1e-3, False),  # a non-finite loss
])
def test_every_step_says_whether_it_stayed_finite(loss, lr, finite):
  state = create_train_state({"w": jnp.array([0.0, 1.0, 2.0])}, optax.sgd(lr),
                             jax.random.PRNGKey(1))
  _, metrics = train_step(state, {}, loss_fn=lambda p, b, r: (loss(p["w"]), {}),
                          tx=optax.sgd(lr), ema_decay=0.9)
  assert bool(metrics["finite"]) == finite


def _data_files(workdir, step):
  d = os.path.join(workdir, "checkpoints", str(step))
  files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f != SEAL]
  return sorted(files, key=os.path.getsize)


def _flip(path, n=64):
  data = bytearray(open(path, "rb").read())
  for i in range(n):
    data[len(data) // 2 + i - n // 2] ^= 0xFF
  open(path, "wb").write(bytes(data))


@pytest.mark.parametrize("fault", ["flip", "truncate", "delete", "flip_and_unseal"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_newest_intact_one_used(
    base, tmp_path, capsys, fault):
  w = _copy(base, tmp_path)
  cfg = Workdir(w).read_config()
  ckpt = Checkpointer(w, writable=False)
  want = ckpt.restore_part({"ema_params": setup(cfg).abstract_params()}, 10)["ema_params"]
  ckpt.close()
  capsys.readouterr()
  victim = _data_files(w, 20)[-1]  # the largest: array data
  if fault.startswith("flip"):
    _flip(victim)
    if fault == "flip_and_unseal":  # the damage takes the seal along: the ledger has it
      os.remove(os.path.join(w, "checkpoints", "20", SEAL))
  elif fault == "truncate":
    open(victim, "r+b").truncate(10)
  else:
    os.remove(victim)
  _, params = load_trained(w)
  err = capsys.readouterr().err
  assert "checkpoint 20 is damaged" in err and "using checkpoint 10" in err, err
  assert len(err.strip().splitlines()) == 1, err
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)
  assert _steps(w) == ["10", "20"]  # loading never moves anything

  if fault == "flip":  # a run resuming moves it aside (kept, not deleted): it saves 20 again
    su = setup(cfg)
    target = jax.eval_shape(lambda: create_train_state(
      su.init_params(jax.random.PRNGKey(0)), su.optimizer, jax.random.PRNGKey(0)))
    ckpt = Checkpointer(w)
    step, state = ckpt.restore_step(target)
    ckpt.close()
    assert step == 10 and int(state.step) == 10 and _steps(w) == ["10", "20.corrupt"]


def test_every_checkpoint_damaged_is_one_line_and_a_sample_of_nothing(base, tmp_path):
  w = _copy(base, tmp_path)
  for step in (10, 20):
    _flip(_data_files(w, step)[-1])
  out = tmp_path / "grid.png"
  r = run_cli("sample", "--workdir", w, "--num", "2", "--steps", "2", "--out", out)
  _one_error_line(r, "no intact checkpoint", "checkpoint 20 is damaged",
                  "checkpoint 10 is damaged")
  assert not out.exists()


def test_a_workdir_without_checkpoints_is_not_changed_by_sample(base, tmp_path):
  w = str(tmp_path / "w")
  os.makedirs(w)
  shutil.copy(os.path.join(base, "config.json"), w)
  r = run_cli("sample", "--workdir", w, "--num", "2", "--out", tmp_path / "g.png")
  _one_error_line(r, "no checkpoint")
  assert os.listdir(w) == ["config.json"]


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
  wd = Workdir(str(tmp_path))
  for s in (5, 10, 15):
    wd.append_metrics(s, {"loss": 1.0}, 0.0)
  with open(wd.file(Workdir.METRICS), "a") as f:
    f.write('{"step": 20, "lo')  # torn by a crash
  wd.truncate_metrics(10)
  assert [m["step"] for m in wd.read_metrics()] == [5, 10]
  assert json.loads(open(wd.file(Workdir.METRICS)).read().splitlines()[-1])["step"] == 10


def test_a_full_disk_stops_the_run_before_a_checkpoint_is_half_written(base, tmp_path,
                                                                       monkeypatch):
  import wdmjax.train.checkpoint as checkpoint

  w = _copy(base, tmp_path)
  usage = shutil.disk_usage(w)
  monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                      lambda path: usage._replace(free=1 << 20))
  r = run_cli("train", "--config", TINY_DIT, "--workdir", w, *FAST, "--set", "train.steps=30")
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 1 and len(lines) == 1, r.stderr
  assert "checkpoints: No space left on device: checkpoint 30 needs about" in lines[0]
  assert _steps(w) == ["10", "20"]


def test_a_write_failing_half_way_leaves_no_temporary_file(tmp_path, monkeypatch):
  from wdmjax import files

  def full(fd):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(files.os, "fsync", full)
  for write in (lambda: files.write_json(str(tmp_path / "a.json"), {"x": 1}),
                lambda: Workdir(str(tmp_path)).write_private(Workdir.SECRET, "{}")):
    with pytest.raises(OSError):
      write()
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- one writer

_HOLDER = """
import os, sys, time
from wdmjax.locks import directory_lock
with directory_lock(sys.argv[1]):
  open(os.path.join(sys.argv[1], "first.txt"), "w").write("mine")
  print("holding", flush=True)
  sys.stdin.readline()  # until the test says go on
  open(os.path.join(sys.argv[1], "second.txt"), "w").write("still mine")
"""


def _holder(workdir):
  p = subprocess.Popen([sys.executable, "-c", _HOLDER, workdir], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
  assert p.stdout.readline().strip() == "holding"
  return p


def test_a_second_writer_is_refused_in_one_line_and_the_first_finishes_unharmed(tmp_path):
  """Two writers on one workdir: the one that comes second exits 2 naming the first one's
  pid and removes nothing (the first made the workdir, so the second's undo must not take
  it); the first goes on. A lock whose holder was killed is taken over."""
  w = str(tmp_path / "w")
  first = _holder(w)
  r = run_cli("train", "--config", TINY_DIT, "--workdir", w, *FAST)
  _one_error_line(r, "--workdir", f"in use by pid {first.pid}")
  first.communicate("go\n", timeout=60)
  assert first.returncode == 0
  assert sorted(os.listdir(w)) == ["first.txt", "second.txt"]  # the lock went with it

  killed = _holder(w)
  killed.kill()
  killed.wait()
  assert os.path.exists(os.path.join(w, LOCK_NAME))  # stale: its holder is dead
  with Workdir(w).lock():  # taken over
    assert holds_lock(w)
  assert not os.path.exists(os.path.join(w, LOCK_NAME)) and not holds_lock(w)


def test_a_refused_writer_on_a_new_workdir_leaves_nothing_and_the_lock_is_reentrant(tmp_path):
  w = str(tmp_path / "new" / "w")
  with pytest.raises(KeyError), Workdir(w).undo_on_failure():
    with Workdir(w).lock():  # the same process again (demo runs embed): no deadlock
      Workdir(w).write_json("x.json", {})
    raise KeyError
  assert not os.path.exists(w)


def test_sigterm_stops_any_command_with_143_in_one_line(monkeypatch):
  """Not only the training loop: every command turns SIGTERM into a clean stop."""
  from wdmjax import runs

  def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # the handler interrupts it
    raise AssertionError("SIGTERM did not stop the command")

  monkeypatch.setattr(runs, "plan", killed)
  before = signal.getsignal(signal.SIGTERM)
  r = run_cli("plan", "--config", TINY_DIT, "--devices", "1")
  assert r.returncode == 143, r.stderr
  assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "stopped by signal 15" in r.stderr
  assert signal.getsignal(signal.SIGTERM) is before  # restored for the caller
