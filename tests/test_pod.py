"""Pod-scale configs, planning from abstract shapes, and the TPU / SLURM launch scripts."""

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import pytest

from tests.conftest import ROOT, run_cli
from wdmjax.configs import load_config
from wdmjax.peft import PeftSpec, prepare
from wdmjax.train.plan import matmul_flops, plan_step

POD = os.path.join(ROOT, "tpu", "pod.sh")


def _dit_forward_flops(batch, tokens, width, depth, patch_channels, frequency_dim=256):
  """Closed-form forward FLOPs (2 per multiply-add) of a DiT without learned sigma.

  Per block: qkv (3 d^2), proj (d^2) and MLP (8 d^2) on every token, adaLN (6 d^2) once per
  image, attention QK^T and AV (2 L^2 d). Patch embedding and final projection (p^2 C d
  each) on every token; the final adaLN (2 d^2) and timestep MLP (256 -> d -> d) per image.
  """
  d = width
  per_token = depth * 12 * d * d + 2 * patch_channels * d
  per_image = depth * 6 * d * d + 2 * d * d + frequency_dim * d + d * d
  attention = depth * 2 * tokens * tokens * d
  return 2.0 * batch * (per_token * tokens + per_image + attention)


def test_matmul_flops_counts_dots_and_convs_inside_nested_jaxprs():
  a, b = jnp.zeros((8, 16)), jnp.zeros((16, 32))
  x, w = jnp.zeros((2, 10, 10, 3)), jnp.zeros((3, 3, 3, 5))

  def f(a, b, x, w):
    z = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(a @ b).sum() + z.sum()  # elementwise work and reductions are not counted

  forward = 2 * 8 * 16 * 32 + 2 * (2 * 10 * 10 * 5) * (3 * 3 * 3)
  assert matmul_flops(jax.make_jaxpr(f)(a, b, x, w).jaxpr) == forward
  # Inside a remat sub-jaxpr too.
  assert matmul_flops(jax.make_jaxpr(jax.checkpoint(f))(a, b, x, w).jaxpr) == forward
  # The gradient adds one dot or conv per operand of each: 3x the forward.
  grad = jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2, 3)))(a, b, x, w).jaxpr
  assert matmul_flops(grad) == 3 * forward
  # A scan's body counts once per iteration.
  looped = lambda a, b: jax.lax.scan(lambda c, _: (c @ b[:, :16], None), a, None, length=5)[0]
  assert matmul_flops(jax.make_jaxpr(looped)(a, b).jaxpr) == 5 * 2 * 8 * 16 * 16
  # A cond runs one branch: the costlier counts (platform_dependent has one per platform).
  branch = lambda a, b: jax.lax.cond(a.sum() > 0, lambda: (a @ b).sum(), lambda: a.sum())
  assert matmul_flops(jax.make_jaxpr(branch)(a, b).jaxpr) == 2 * 8 * 16 * 32
  # The weight gradient of a dense layer is one product on every platform.
  from wdmjax.models.layers import dense_matmul
  dense = jax.make_jaxpr(jax.grad(lambda a, b: dense_matmul(a, b).sum(), (0, 1)))(a, b).jaxpr
  assert matmul_flops(dense) == 3 * 2 * 8 * 16 * 32


@pytest.fixture(scope="module")
def xl2_plan():
  return load_config("dit_xl2_imagenet256"), plan_step(load_config("dit_xl2_imagenet256"), 8, 4)


def test_dit_xl2_config_plans_to_the_papers_model(xl2_plan):
  cfg, p = xl2_plan
  assert cfg.train.batch_size == 256 and cfg.train.lr == 1e-4 and cfg.train.ema_decay == 0.9999
  assert p.params == 674_880_784 and p.mesh == {"data": 2, "fsdp": 4}
  # FSDP over 4: each device holds about a quarter of the state (small leaves replicated).
  assert 0.25 <= p.state_bytes_per_device / p.state_bytes < 0.26
  # 16 bytes per parameter: float32 params, EMA and two Adam moments.
  assert abs(p.state_bytes - 16 * p.params) < 1e6
  # Model FLOPs from the train step's jaxpr = 3 x the closed-form forward count of XL/2
  # (width 1152, depth 28, patch 2) on 32x32x4 latents: 256 tokens of 2 x 2 x 4 values.
  assert (cfg.data.resolution, cfg.data.channels, cfg.model.learn_sigma) == (32, 4, False)
  closed = 3 * _dit_forward_flops(256, tokens=(32 // 2) ** 2, width=1152, depth=28,
                                  patch_channels=2 * 2 * 4)
  assert abs(p.flops_per_step / closed - 1) < 0.02, (p.flops_per_step, closed)


def test_difffit_512_plan_trains_a_fraction_and_skips_weight_gradients(xl2_plan):
  cfg = load_config("difffit_dit_xl2_512")
  assert cfg.data.resolution == 64 and cfg.model.pos_coord_scale == 2.0

  def difffit(params):
    trainable, frozen, _, combine = prepare(PeftSpec("difffit"), params)
    return trainable, frozen, combine

  ft = plan_step(cfg, 8, 4, difffit)
  full = plan_step(cfg, 8, 4)
  r = run_cli("params", "--config", "difffit_dit_xl2_512", "--peft", "difffit", "--json")
  assert r.returncode == 0, r.stderr
  assert ft.trainable == json.loads(r.stdout)["trainable"] < 0.003 * ft.params
  # Forward + input gradients only: about 2/3 of a full step's matmul FLOPs.
  assert 0.6 < ft.flops_per_step / full.flops_per_step < 0.75
  assert ft.frozen_bytes_per_device > 20 * ft.state_bytes_per_device


def test_plan_cli_reports_per_chip_expectations():
  r = run_cli("plan", "--config", "dit_xl2_imagenet256", "--devices", "16", "--fsdp", "4",
              "--chip", "v5e", "--mfu", "0.5", "--json")
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  (row,) = out["chips"]
  assert row["chip"] == "v5e" and row["chip_gib"] == 16
  assert abs(row["step_s"] - out["flops_per_step"] / (16 * 197e12 * 0.5)) < 1e-9
  bad = run_cli("plan", "--config", "dit_xl2_imagenet256", "--devices", "16", "--fsdp", "3")
  assert bad.returncode == 2 and "fsdp: expected a divisor of devices=16, got 3" in bad.stderr


def _pod(*args):
  return subprocess.run(["bash", POD, "--dry-run", *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=60)


def test_tpu_script_prints_the_gcloud_commands():
  r = _pod("--zone", "us-west4-a", "--type", "v5litepod-16", "--spot", "create")
  assert r.returncode == 0, r.stderr
  assert ("gcloud compute tpus tpu-vm create wdmjax --zone us-west4-a --accelerator-type "
          "v5litepod-16 --version v2-alpha-tpuv5-lite --spot") in r.stdout
  r = _pod("--zone", "z", "--name", "pod1", "train", "--config", "dit_xl2_imagenet256",
           "--workdir", "/mnt/wdmjax/xl2", "--set", "mesh.fsdp=4")
  assert r.returncode == 0, r.stderr
  assert "ssh pod1 --zone z --worker=all" in r.stdout
  assert "wdmjax\\ train\\ --config\\ dit_xl2_imagenet256" in r.stdout
  assert "mesh.fsdp=4" in r.stdout
  r = _pod("--zone", "z", "stop")
  assert "pkill\\ -TERM" in r.stdout and "--worker=all" in r.stdout
  for args, message in [(["create"], "--zone: expected a zone"),
                        (["--zone", "z", "--type", "v9-8", "create"], "--type: expected v4-N"),
                        (["--zone", "z", "mount"], "--bucket: expected"),
                        (["--zone", "z", "launch"], "unknown command 'launch'")]:
    r = _pod(*args)
    assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


def test_slurm_script_is_valid_bash_and_runs_wdmjax_under_srun():
  r = subprocess.run(["bash", "-n", os.path.join(ROOT, "tpu", "slurm.sbatch")],
                     capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  with open(os.path.join(ROOT, "tpu", "slurm.sbatch")) as f:
    text = f.read()
  assert "srun --kill-on-bad-exit=1 wdmjax train" in text and "#SBATCH --requeue" in text
