"""The training engine: loss goes down, resume is exact, multi-device equals one device."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import ROOT, TINY_DIT, run_cli
from wdmjax.configs import load_config
from wdmjax.errors import WdmjaxError
from wdmjax.train import load_trained, setup, train
from wdmjax.workdir import Workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """100 steps of the tiny DiT in-process, logging every step."""
  workdir = str(tmp_path_factory.mktemp("run"))
  cfg = load_config(TINY_DIT, ["train.steps=100", "train.log_every=1", "train.ckpt_every=50"])
  state = train(cfg, workdir, progress=False)
  return cfg, workdir, state


def test_loss_goes_down_within_100_steps(trained):
  _, workdir, state = trained
  losses = [m["loss"] for m in Workdir(workdir).read_metrics()]
  assert len(losses) == 100 and int(state.step) == 100
  first, last = np.mean(losses[:10]), np.mean(losses[-10:])
  assert last < 0.7 * first, (first, last)


def test_logged_metrics_are_means_over_the_logging_interval(trained, tmp_path):
  """The same first 10 steps logged every 5 steps: each row is the mean of its 5 steps."""
  _, workdir, _ = trained
  per_step = [m["loss"] for m in Workdir(workdir).read_metrics()][:10]
  cfg = load_config(TINY_DIT, ["train.steps=10", "train.log_every=5", "train.ckpt_every=50"])
  train(cfg, tmp_path / "w", progress=False)
  rows = Workdir(tmp_path / "w").read_metrics()
  assert [r["step"] for r in rows] == [5, 10]
  np.testing.assert_allclose([r["loss"] for r in rows],
                             [np.mean(per_step[:5]), np.mean(per_step[5:])], rtol=1e-5)
  assert rows[0]["loss"] != per_step[4]  # not the last step's loss alone


def test_progress_bar_counts_completed_steps(monkeypatch, tmp_path):
  """Each tick of the bar comes after the step it counts has run (not when it was queued)."""
  import wdmjax.train.loop as loop
  executed, seen = [], []

  class Bar:  # records, at every tick, how many steps had run by then
    def __init__(self, *a, initial=0, **k):
      self.n = initial

    def update(self, k):
      self.n += k
      seen.append((self.n, len(executed)))

    def set_postfix(self, **k):
      pass

    def close(self):
      pass

  monkeypatch.setattr(loop, "tqdm", Bar)
  cfg = load_config(TINY_DIT, ["train.steps=8", "train.log_every=4", "train.ckpt_every=0"])
  plain = setup(cfg).loss()

  def loss_fn(params, batch, rng):
    jax.debug.callback(lambda: executed.append(1))  # runs when the step runs
    return plain(params, batch, rng)

  train(cfg, tmp_path / "w", loss_fn=loss_fn)
  assert [n for n, _ in seen] == list(range(1, 9))
  assert all(ran >= n for n, ran in seen), seen


def test_checkpoints_and_resume_extend_a_run(trained):
  cfg, workdir, state = trained
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["100", "50"]
  _, params = load_trained(workdir, ema=False)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params), strict=True):
    np.testing.assert_array_equal(a, b)


def test_exported_params_make_a_workdir(trained, tmp_path):
  """float16 export -> a new workdir whose EMA and raw weights are the exported ones."""
  from wdmjax.models import load_params_npz, save_params_npz
  from wdmjax.train.export import workdir_from_params
  cfg, workdir, _ = trained
  _, ema = load_trained(workdir)
  path = save_params_npz(ema, str(tmp_path / "p.npz"))
  back = load_params_npz(path)
  new = workdir_from_params(cfg, back, str(tmp_path / "w"), 123)
  for use_ema in (True, False):
    _, got = load_trained(new, ema=use_ema)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ema), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)  # float16 rounding only
  assert os.path.isdir(tmp_path / "w" / "checkpoints" / "123")


def test_fine_tuning_starts_from_given_params(trained, tmp_path):
  cfg, workdir, _ = trained
  _, ema = load_trained(workdir)
  cfg = load_config(TINY_DIT, ["train.steps=1", "train.lr=1e-9"])
  state = train(cfg, str(tmp_path / "ft"), init_params=ema, progress=False)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ema), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_sample_cli_writes_a_grid(trained, tmp_path):
  _, workdir, _ = trained
  out = tmp_path / "grid.png"
  r = run_cli("sample", "--workdir", workdir, "--num", "20", "--steps", "5", "--out", str(out))
  assert r.returncode == 0, r.stderr
  from PIL import Image
  img = Image.open(out)
  # 10 columns x 2 rows of 8x8 digits with 2-pixel padding, upscaled 2x.
  assert img.size == (2 * (10 * 10 + 2), 2 * (2 * 10 + 2))


def test_wrong_image_shape_is_a_clear_error(trained):
  cfg, workdir, state = trained
  loss_fn = setup(cfg).loss()
  batch = {"image": jnp.zeros((4, 28, 28, 1)), "label": jnp.zeros((4,), jnp.int32)}
  with pytest.raises(WdmjaxError, match=r"x: expected shape"):
    loss_fn(state.params, batch, jax.random.key(0))


def _latest_ckpt(workdir):
  d = os.path.join(workdir, "checkpoints")
  steps = [int(s) for s in os.listdir(d) if s.isdigit()] if os.path.isdir(d) else []
  return max(steps, default=0)


def _start_and_interrupt(workdir, sig, after_ckpt, steps):
  """Starts a CLI run and sends `sig` once checkpoint `after_ckpt` exists."""
  cmd = [sys.executable, "-m", "wdmjax.cli", "train", "--config", TINY_DIT, "--workdir", workdir,
         "--no-progress", "--no-samples", "--set", f"train.steps={steps}",
         "--set", "train.ckpt_every=10"]
  p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while _latest_ckpt(workdir) < after_ckpt and time.time() < deadline and p.poll() is None:
    time.sleep(0.02)
  assert p.poll() is None, "the run ended before it could be interrupted: " + p.stderr.read()
  p.send_signal(sig)
  out, err = p.communicate(timeout=120)
  return p.returncode, out, err


def test_sigterm_then_sigkill_then_resume_equals_uninterrupted(tmp_path):
  steps = 300
  common = ["--set", f"train.steps={steps}", "--set", "train.ckpt_every=10", "--no-progress",
            "--no-samples"]
  ref = str(tmp_path / "ref")
  r = run_cli("train", "--config", TINY_DIT, "--workdir", ref, *common)
  assert r.returncode == 0, r.stderr

  run = str(tmp_path / "run")
  rc, out, err = _start_and_interrupt(run, signal.SIGTERM, after_ckpt=20, steps=steps)
  assert rc == 128 + signal.SIGTERM and "stopped by signal" in err, (rc, out, err)
  stopped_at = _latest_ckpt(run)
  assert 20 <= stopped_at < steps
  rc, _, _ = _start_and_interrupt(run, signal.SIGKILL, after_ckpt=stopped_at + 20, steps=steps)
  assert rc == -signal.SIGKILL
  r = run_cli("train", "--config", TINY_DIT, "--workdir", run, *common)
  assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
  logged = [m["step"] for m in Workdir(run).read_metrics()]  # replayed steps logged once
  assert logged == list(range(5, steps + 1, 5)), logged

  _, p_ref = load_trained(ref, ema=False)
  _, p_run = load_trained(run, ema=False)
  _, e_ref = load_trained(ref, ema=True)
  _, e_run = load_trained(run, ema=True)
  for a, b in zip(jax.tree.leaves((p_ref, e_ref)), jax.tree.leaves((p_run, e_run)), strict=True):
    np.testing.assert_array_equal(a, b)


DEVICE_SCRIPT = textwrap.dedent("""
  import json, sys
  import jax
  from wdmjax.configs import load_config
  from wdmjax.data import InputPipeline, shard_batch
  from wdmjax.train import init_state, make_train_step, setup
  from wdmjax.train.sharding import make_mesh
  cfg = load_config(sys.argv[1], ["train.batch_size=16", "train.lr=1e-3",
                                  "train.warmup_steps=0"])
  mesh = make_mesh()
  su = setup(cfg)
  step = make_train_step(su.loss(), su.optimizer, 0.99, mesh)
  state = init_state(cfg, mesh)
  data = InputPipeline("digits", batch_size=16, resolution=8, channels=1, seed=0)
  losses = []
  for s in range(3):
    state, m = step(state, shard_batch(data.batch(s), mesh, ("data", "fsdp")))
    losses.append(float(m["loss"]))
  leaf = jax.tree.leaves(state.params)[0]
  print(json.dumps({"devices": mesh.size, "losses": losses,
                    "param_sum": float(abs(leaf).sum())}))
""")


def _run_devices(n):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", DEVICE_SCRIPT, TINY_DIT], capture_output=True,
                     text=True, env=env, cwd=ROOT, timeout=300)
  assert r.returncode == 0, r.stderr
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_four_devices_give_the_loss_of_one_device():
  one, four = _run_devices(1), _run_devices(4)
  assert one["devices"] == 1 and four["devices"] == 4
  np.testing.assert_allclose(four["losses"], one["losses"], atol=1e-5)
  np.testing.assert_allclose(four["param_sum"], one["param_sum"], rtol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["--config", "no/such/config.py"], "--config: expected a config file"),
    (["--set", "train.steps=-3"], "train.steps: expected an integer >= 1, got -3"),
    (["--set", "train.lr=0"], "train.lr: expected a positive number"),
    (["--set", "train.bogus=1"], "unknown key 'train.bogus'"),
    (["--set", "model.name=resnet"], "model.name: expected 'unet' or 'dit'"),
    (["--set", "model.width=30"], "width"),
    (["--set", "train.batch_size=many"], "train.batch_size: expected a value of type int"),
    (["--set", "data.name=nosuchset"], "nosuchset"),
])
def test_bad_input_gives_one_line_errors(tmp_path, args, message):
  if "--config" not in args:
    args = ["--config", TINY_DIT, *args]
  r = run_cli("train", "--workdir", str(tmp_path / "w"), "--no-progress", *args)
  assert r.returncode == 2, (r.stdout, r.stderr)
  lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("WARNING")]
  assert len(lines) == 1 and lines[0].startswith("wdmjax: error:"), r.stderr
  assert message in lines[0]
  assert "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "w" / "checkpoints")
  assert not os.path.exists(tmp_path / "w" / "config.json")


def test_resume_refuses_a_different_model(trained, tmp_path):
  _, workdir, _ = trained
  with pytest.raises(WdmjaxError, match="different model config"):
    train(load_config(TINY_DIT, ["model.width=64"]), workdir, progress=False)


def test_a_config_with_tuples_matches_its_own_config_json(tmp_path):
  """The UNet's ch_mult is a tuple in the config and a list in config.json: resuming it in
  its own workdir is the same model, a changed ch_mult is not."""
  from wdmjax.workdir import Workdir
  wd = Workdir(str(tmp_path / "w"))
  wd.write_config(load_config("mnist5k_unet"))
  wd.write_config(load_config("mnist5k_unet", ["train.steps=10"]))  # resumable
  with pytest.raises(WdmjaxError, match="different model config"):
    wd.write_config(load_config("mnist5k_unet", ["model.ch_mult=(1,2)"]))


def test_ema_decay_warms_up_then_holds():
  from wdmjax.train.step import ema_decay_at
  np.testing.assert_allclose(ema_decay_at(0, 0.999), 0.1)
  np.testing.assert_allclose(ema_decay_at(90, 0.999), 91 / 100)
  np.testing.assert_allclose(ema_decay_at(10**6, 0.999), 0.999)


def test_a_latent_dit_trains_from_streamed_latents(tmp_path):
  """The pod recipe's data path in miniature: VAE-latent shards -> imagenet_latents/256 ->
  batches read per step (in_memory=False) -> a 4-channel class-conditional DiT."""
  from wdmjax.data.latents import prepare_latents
  rng = np.random.default_rng(0)
  os.makedirs(tmp_path / "npz")
  np.savez(tmp_path / "npz" / "a.npz", latents=rng.normal(size=(24, 32, 32, 4)),
           labels=rng.integers(0, 1000, 24))
  prepare_latents(str(tmp_path / "npz"), 256, str(tmp_path / "tfds"))
  cfg = load_config(TINY_DIT, [
      "data.name=imagenet_latents/256", f"data.data_dir={tmp_path / 'tfds'}",
      "data.resolution=32", "data.channels=4", "data.in_memory=False", "model.patch_size=8",
      "model.num_classes=1000", "train.steps=3", "train.batch_size=8", "train.log_every=1"])
  state = train(cfg, str(tmp_path / "w"), progress=False)
  assert int(state.step) == 3
  assert state.params["x_embedder"]["kernel"].shape == (8, 8, 4, 32)
  losses = [m["loss"] for m in Workdir(tmp_path / "w").read_metrics()]
  assert len(losses) == 3 and all(np.isfinite(losses))
  from wdmjax.train import write_final_samples
  assert write_final_samples(cfg, state, str(tmp_path / "w")) is None


def test_the_compilation_cache_serves_a_second_process(tmp_path):
  """A command's programs compile once: the next process reads them from the user's cache
  (CACHE_ENV), which "off" leaves unused; the clock sees compiles and hits."""
  script = textwrap.dedent("""
    import jax, jax.numpy as jnp
    from wdmjax.train.compilation import compile_clock, enable_compilation_cache
    where = enable_compilation_cache(min_compile_seconds=0)
    with compile_clock() as c:
      jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64))).block_until_ready()
    print(where, c.programs, c.cache_hits, c.seconds > 0)
  """)
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  cache = tmp_path / "cache"

  def run(setting):
    out = subprocess.run([sys.executable, "-c", script], env={**env, "PYTHONPATH": ROOT,
                         "WDMJAX_COMPILATION_CACHE": setting}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    where, programs, hits, timed = out.stdout.split()
    return where, int(programs), int(hits), timed

  where, _, hits, timed = run("off")
  assert (where, hits, timed) == ("None", 0, "True") and not cache.exists()
  where, programs, hits, _ = run(str(cache))
  assert where == str(cache) and programs >= 1 and hits == 0
  assert run(str(cache))[1:3] == (programs, programs)  # every program from the cache


def test_kept_host_memory_stops_the_page_faults_of_each_call():
  """A program with a 72 MiB temporary page-faults all of it on every call under glibc's
  defaults (WDMJAX_HOST_MEMORY=off). With `keep_host_memory` later calls reuse the heap (it
  may grow once or twice more, until a freed block fits the aligned request). Too late (JAX
  started) it changes nothing."""
  script = textwrap.dedent("""
    import resource
    from wdmjax.train.host_memory import keep_host_memory
    applied = keep_host_memory()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: ((x + 1).T * 2 + x.T).sum(1)[0])  # a [4096, 4608] temporary
    x = jnp.ones((4608, 4096))
    assert f.lower(x).compile().memory_analysis().temp_size_in_bytes >= 72 * 2**20
    faults = []
    for _ in range(12):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, keep_host_memory(), min(faults[1:]), sum(faults[1:]))
  """)

  def run(setting):
    out = subprocess.run([sys.executable, "-c", script], env={
      **os.environ, "PYTHONPATH": ROOT, "WDMJAX_HOST_MEMORY": setting},
      capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    applied, late, least, total = out.stdout.split()
    return applied, late, int(least), int(total)

  pages = 72 * 2**20 // 4096
  applied, late, least, total_off = run("off")
  assert (applied, late) == ("False", "False") and least > 0.9 * pages  # every call
  applied, late, _, total_on = run("on")
  assert (applied, late) == ("True", "False") and total_on < 0.5 * total_off


@pytest.mark.parametrize("bad", [-1.0, float("nan"), "fast"])
def test_a_bad_minimum_compile_time_is_one_clear_error(bad):
  from wdmjax.train.compilation import enable_compilation_cache
  with pytest.raises(WdmjaxError, match=r"^min_compile_seconds: expected"):
    enable_compilation_cache(min_compile_seconds=bad)
