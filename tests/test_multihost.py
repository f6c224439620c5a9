"""Real multi-process runs: several JAX processes on localhost (gloo CPU collectives) stand in
for the hosts of a pod. 2 processes x 2 devices against 1 process x 4 devices, checkpoints
moved between process counts, FSDP against data parallelism, and a killed worker."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, TINY_DIT

WORKER = os.path.join(ROOT, "tests", "multihost", "worker.py")
N = 4  # steps per phase
COMMON = ["train.log_every=1", f"train.ckpt_every={N}", "train.warmup_steps=0"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def _launch(out, phases, processes, devices, timeout=300):
  """Runs the worker as `processes` processes of `devices` CPU devices each."""
  spec = {"coordinator": f"localhost:{_free_port()}", "num_processes": processes,
          "config": TINY_DIT, "phases": phases, "out": str(out)}
  path = os.path.join(out, f"spec_{phases[0]['name']}.json")
  with open(path, "w") as f:
    json.dump(spec, f)
  procs = [subprocess.Popen([sys.executable, WORKER, path, str(i)], cwd=ROOT, env=_env(devices),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(processes)]
  results = [p.communicate(timeout=timeout) for p in procs]
  for p, (stdout, stderr) in zip(procs, results, strict=True):
    assert p.returncode == 0, stderr[-3000:]
    info = json.loads(stdout.strip().splitlines()[-1])
    assert info["of"] == processes and info["devices"] == processes * devices


def _phase(name, workdir, steps, *extra, base=None, embed=False):
  return {"name": name, "workdir": str(workdir), "set": [f"train.steps={steps}", *COMMON, *extra],
          "base": base and str(base), "embed": embed}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Three launches: 1x4 (reference runs), 2x2 (same runs, a resumed 1x4 checkpoint, FSDP,
  an FSDP DiffFit fine-tune), 1x4 again (a resumed 2x2 checkpoint, the same fine-tune)."""
  tmp = tmp_path_factory.mktemp("multihost")
  out = tmp / "out"
  out.mkdir()
  t0 = time.time()
  _launch(out, [_phase("one_dp", tmp / "one_dp", N), _phase("one_full", tmp / "one_full", 2 * N)],
          processes=1, devices=4)
  shutil.copytree(tmp / "one_dp", tmp / "one_to_two")
  _launch(out, [_phase("two_dp", tmp / "two_dp", N),
                # every leaf of 64+ elements sharded: the tiny DiT's kernels are 32 x 32
                _phase("two_fsdp", tmp / "two_fsdp", N, "mesh.fsdp=2", "mesh.fsdp_min_size=64",
                       f"train.sample_every={N}"),
                _phase("one_to_two", tmp / "one_to_two", 2 * N),
                _phase("two_difffit", tmp / "two_difffit", N, "mesh.fsdp=2", "train.lr=1e-2",
                       base=tmp / "one_dp"),
                _phase("two_embed", tmp / "two_embed", N, base=tmp / "one_dp", embed=True)],
          processes=2, devices=2)
  shutil.copytree(tmp / "two_dp", tmp / "two_to_one")
  _launch(out, [_phase("two_to_one", tmp / "two_to_one", 2 * N),
                _phase("one_difffit", tmp / "one_difffit", N, "train.lr=1e-2",
                       base=tmp / "one_dp"),
                _phase("one_embed", tmp / "one_embed", N, base=tmp / "one_dp", embed=True)],
          processes=1, devices=4)
  print(f"multi-process launches: {time.time() - t0:.1f} s")
  return tmp


def _load(tmp, name, process=0):
  with np.load(tmp / "out" / f"{name}_p{process}.npz") as z:
    return dict(z)


def _host(d):
  return [d[k] for k in sorted((k for k in d if k.startswith("host_")),
                               key=lambda k: int(k[5:]))]


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def test_two_processes_hold_identical_parameters_equal_to_one_process(runs):
  p0, p1 = _load(runs, "two_dp", 0), _load(runs, "two_dp", 1)
  local = [k for k in p0 if k.startswith("local_")]
  assert len(local) == len(_host(p0)) > 10  # data parallelism: every leaf replicated
  for k in local:
    copies = np.concatenate([p0[k], p1[k]])  # 4 devices' copies, 2 per process
    assert copies.shape[0] == 4
    for c in copies[1:]:
      np.testing.assert_array_equal(c, copies[0])
  one = _load(runs, "one_dp")
  assert int(p0["step"]) == int(one["step"]) == N
  for a, b in zip(_host(p0), _host(one), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  np.testing.assert_allclose(_losses(runs / "two_dp"), _losses(runs / "one_dp"), atol=1e-5)


@pytest.mark.parametrize("resumed", ["one_to_two", "two_to_one"])
def test_checkpoints_restore_with_another_process_count(runs, resumed):
  """A checkpoint of step N written by P processes continues under the other count to 2N and
  matches the uninterrupted 1-process run."""
  got, ref = _load(runs, resumed), _load(runs, "one_full")
  assert int(got["step"]) == int(ref["step"]) == 2 * N
  for a, b in zip(_host(got), _host(ref), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  assert sorted(int(s) for s in os.listdir(runs / resumed / "checkpoints")) == [N, 2 * N]
  np.testing.assert_allclose(_losses(runs / resumed)[N:], _losses(runs / "one_full")[N:],
                             atol=1e-5)


def test_fsdp_gives_the_loss_of_data_parallelism_on_half_the_bytes(runs):
  np.testing.assert_allclose(_losses(runs / "two_fsdp"), _losses(runs / "two_dp"), atol=1e-5)
  fsdp, dp = _load(runs, "two_fsdp"), _load(runs, "two_dp")
  for a, b in zip(_host(fsdp), _host(dp), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  # Sharded leaves are absent from the local replicas: most of the bytes are really split.
  assert sum(k.startswith("local_") for k in fsdp) < sum(k.startswith("local_") for k in dp)
  ratio = fsdp["bytes_per_device"].max() / dp["bytes_per_device"].max()
  print(f"FSDP bytes per device / data parallelism's: {ratio:.3f}")
  assert 0.48 < ratio < 0.55, ratio
  with open(runs / "two_fsdp" / "train_summary.json") as f:
    assert json.load(f)["mesh"] == {"data": 2, "fsdp": 2}
  # The sharded weights were gathered to the hosts and process 0 drew the grid.
  assert os.listdir(runs / "two_fsdp" / "samples") == [f"{N:07d}.png"]


def test_difffit_fine_tuning_under_fsdp_on_two_processes_matches_one(runs):
  two, one = _load(runs, "two_difffit"), _load(runs, "one_difffit")
  assert len(_host(two)) == len(_host(one)) > 5  # the trainable part only
  for a, b in zip(_host(two), _host(one), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  assert (runs / "two_difffit" / "delta.npz").exists()
  assert (runs / "two_difffit" / "peft.json").exists()


def test_wdm_embedding_on_two_processes_matches_one(runs):
  two, one = _load(runs, "two_embed"), _load(runs, "one_embed")
  for a, b in zip(_host(two), _host(one), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  with open(runs / "two_embed" / "secret.json") as f:
    assert json.load(f)["key"] == 3
  assert not [n for n in os.listdir(runs / "two_embed") if n.endswith(".tmp")]


def _start_two(workdir, heartbeat=5):
  """Two CLI training processes of 2 devices each, started on one endless run."""
  port = _free_port()
  cmd = [sys.executable, "-m", "wdmjax.cli", "train", "--config", TINY_DIT, "--workdir",
         str(workdir), "--no-progress", "--no-samples", "--set", "train.steps=100000",
         "--set", "train.log_every=1", "--set", "train.ckpt_every=0",
         "--coordinator", f"localhost:{port}", "--num-processes", "2",
         "--heartbeat-timeout", str(heartbeat)]
  procs = [subprocess.Popen([*cmd, "--process-id", str(i)], cwd=ROOT, env=_env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
      break
    time.sleep(0.1)
  if not all(p.poll() is None for p in procs):
    for p in procs:
      p.kill()
    pytest.fail("a worker ended early: " + procs[0].communicate()[1][-3000:])
  return procs


def _reap(procs):
  for p in procs:
    if p.poll() is None:
      p.kill()


def test_sigterm_to_one_worker_makes_all_save_at_one_step(tmp_path):
  """A preemption notice reaching one host: JAX's preemption service agrees on a step, every
  process saves there and exits cleanly (a lone stop would leave the others hanging)."""
  procs = _start_two(tmp_path / "w")
  try:
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p in procs]
  finally:
    _reap(procs)
  # Saved, resumable, not finished: the documented status 128 + SIGTERM on every process.
  assert [p.returncode for p in procs] == [143, 143], outs[0][1][-2000:] + outs[1][1][-2000:]
  saved = [int(s) for s in os.listdir(tmp_path / "w" / "checkpoints")]
  assert len(saved) == 1 and f"stopped by signal 15 at step {saved[0]}" in outs[0][1]
  # Only process 0 speaks (gloo's own connection lines aside).
  assert "stopped by signal" not in outs[1][1] and "workdir:" not in outs[1][0]


def test_a_killed_worker_stops_the_others_with_a_clear_error(tmp_path):
  procs = _start_two(tmp_path / "w")
  try:
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    _, err = procs[0].communicate(timeout=120)
    waited = time.time() - t0
  finally:
    _reap(procs)
  assert procs[0].returncode != 0
  assert waited < 60, waited
  clear = ("another process of this run has probably died" in err
           or "another task died" in err)
  assert clear, err[-3000:]


def test_fsdp_rule_splits_large_leaves_along_their_largest_divisible_dimension():
  from jax.sharding import PartitionSpec as P

  from wdmjax.train.sharding import fsdp_spec
  assert fsdp_spec((1152, 4608), 4) == P(None, "fsdp")
  assert fsdp_spec((4608, 1152), 4) == P("fsdp", None)
  assert fsdp_spec((2, 2, 4, 1152), 8) == P(None, None, None, "fsdp")
  assert fsdp_spec((1152,), 4) == P()  # a bias: too small to be worth a collective
  assert fsdp_spec((999, 1001), 4) == P()  # nothing divisible
  assert fsdp_spec((1152, 4608), 1) == P()


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator="localhost:1234"), "expected all three or none"),
    (dict(coordinator="localhost", num_processes=2, process_id=0),
     "coordinator: expected HOST:PORT"),
    (dict(coordinator="localhost:1", num_processes=2, process_id=2),
     "process_id: expected an integer in [0, 2)"),
    (dict(coordinator="localhost:1", num_processes=0, process_id=0),
     "num_processes: expected an integer >= 1"),
])
def test_bad_distributed_flags_are_clear_errors(kwargs, message, tmp_path):
  from tests.conftest import run_cli
  from wdmjax.errors import WdmjaxError
  from wdmjax.train.distributed import initialize
  with pytest.raises(WdmjaxError, match=re.escape(message)):
    initialize(**kwargs)
  # The command line names its flags: --coordinator, --num-processes, --process-id.
  flags = [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items()]
  r = run_cli("train", "--config", TINY_DIT, "--workdir", tmp_path / "w", *flags)
  flag_message = re.sub(r"\b(coordinator|num_processes|process_id)\b",
                        lambda m: "--" + m.group(1).replace("_", "-"), message)
  assert r.returncode == 2 and flag_message in r.stderr, r.stderr


def test_a_single_process_needs_no_coordination(monkeypatch):
  from wdmjax.train.distributed import detect_cluster, initialize
  for var in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
              "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  assert detect_cluster() is None
  assert initialize().how == "single"
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert detect_cluster() is None  # one task: nothing to coordinate
  monkeypatch.setenv("SLURM_NTASKS", "16")
  assert detect_cluster() == "SLURM"
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
  assert detect_cluster() == "Cloud TPU pod"


def test_mesh_and_config_errors_name_the_key(tmp_path):
  from tests.conftest import run_cli
  from wdmjax.errors import WdmjaxError
  from wdmjax.train.sharding import make_mesh
  with pytest.raises(WdmjaxError, match="mesh: data x fsdp = 3 x 2 = 6 exceeds"):
    make_mesh(3, 2)
  r = run_cli("train", "--config", TINY_DIT, "--workdir", str(tmp_path / "w"),
              "--set", "mesh.fsdp=0")
  assert r.returncode == 2 and "mesh.fsdp: expected an integer >= 1, got 0" in r.stderr
