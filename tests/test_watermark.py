"""Tests of WDM: the watermark kernel, extraction, triggers, the exact test, the CLI."""

import dataclasses
import json
import math
import os
import stat
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from tests.conftest import TINY_DIT, run_cli
from wdmjax import runs
from wdmjax.data import load_arrays
from wdmjax.data.pipeline import preprocess
from wdmjax.diffusion import diffusion_loss, make_schedule, sample
from wdmjax.errors import WdmjaxError
from wdmjax.models import build_model, init_params
from wdmjax.stats import (
  exact_binomial_log10_sf,
  permutation_log10_p,
  rank_sum_log10_p,
  two_point_log10_sf,
)
from wdmjax.train import create_train_state, make_optimizer, make_train_step
from wdmjax.train.sharding import make_mesh
from wdmjax.watermark import (
  ImageShape,
  Secret,
  best_log10_p,
  best_sample_test,
  decoy_test,
  decoy_trigger_specs,
  expected_bits,
  extract,
  is_generated_trigger,
  keyed_targets,
  keyed_test,
  make_trigger,
  make_watermark,
  reach_warning,
  soft_keyed_test,
  vote_bits,
  wdp_loss,
  wdp_moments,
  wdp_q_sample,
)
from wdmjax.watermark.robust import thief_optimizer
from wdmjax.watermark.wdp import decoy_triggers


def apply_fn_for(model):
  """The network as the losses see it: (params, x, t, y, rng, train) -> output."""
  return lambda p, x, t, y, rng, train: model.apply({"params": p}, x, t, y, train=train,
                                                    rngs={"dropout": rng})


def model_fn_for(model):
  """The network as the samplers see it: (params, x, t, y) -> output."""
  return lambda p, x, t, y: model.apply({"params": p}, x, t, y)

SHAPE = ImageShape(8, 1)


# ----------------------------------------------------------------------------- kernel


def test_wdp_kernel_moments_match_closed_form():
  sched = make_schedule("linear", 1000)
  k_x, k_tau, k_n = jax.random.split(jax.random.PRNGKey(0), 3)
  x0w = jax.random.uniform(k_x, (1, 4, 4, 3), minval=-1, maxval=1)
  tau = jnp.sign(jax.random.normal(k_tau, (4, 4, 3)))
  n = 20000
  for t_val in (0, 300, 999):
    t = jnp.full((n,), t_val)
    noise = jax.random.normal(jax.random.fold_in(k_n, t_val), (n, 4, 4, 3))
    draws = wdp_q_sample(sched, jnp.broadcast_to(x0w, (n, 4, 4, 3)), t, noise, tau, 0.8)
    mean, var = wdp_moments(sched, x0w, t[:1], tau, 0.8)
    se = jnp.sqrt(var[0, 0, 0, 0] / n)
    np.testing.assert_allclose(draws.mean(0), mean[0], atol=float(5 * se) + 1e-6)
    np.testing.assert_allclose(draws.var(0), jnp.broadcast_to(var[0], (4, 4, 3)),
                               rtol=0.06)


def _toy_model(params, x, t, y):
  """A hashable stand-in network whose output depends on x and t."""
  return params["w"] * x + jnp.sin(x + t[:, None, None, None] / 100.0)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_extraction_with_gamma1_one_is_ordinary_sampling(sampler):
  sched = make_schedule("linear", 100)
  params = {"w": jnp.float32(0.3)}
  rng = jax.random.PRNGKey(7)
  tau = make_trigger("random:3", ImageShape(8, 2))
  kw = dict(sampler=sampler, steps=10, objective="eps")
  got = extract(_toy_model, params, rng, sched, trigger=tau, gamma1=1.0, num=3, **kw)
  want = sample(_toy_model, params, rng, sched, shape=(3, 8, 8, 2), **kw)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  shifted = extract(_toy_model, params, rng, sched, trigger=tau, gamma1=0.8, num=3, **kw)
  assert np.abs(np.asarray(shifted) - np.asarray(want)).max() > 1e-3


def test_wdp_loss_targets_each_objective_and_checks_shapes():
  sched = make_schedule("linear", 100)
  seen = []

  def apply_fn(params, x, t, y, rng, train):
    seen.append(x)
    return jnp.zeros_like(x)

  tau = jnp.ones((8, 8, 1))
  wm = -jnp.ones((1, 8, 8, 1))
  batch = {"image": jnp.zeros((4, 8, 8, 1))}
  for objective in ("eps", "x0", "v"):
    loss = wdp_loss(apply_fn, sched, objective, trigger=tau, watermark=wm, gamma1=0.8,
                    gamma2=0.5)
    total, m = loss({}, batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(total, m["task_loss"] + 0.5 * m["watermark_loss"], rtol=1e-6)
  with pytest.raises(WdmjaxError, match="watermark"):
    wdp_loss(apply_fn, sched, "eps", trigger=tau, watermark=jnp.ones((1, 4, 4, 1)))
  with pytest.raises(WdmjaxError, match="gamma1"):
    wdp_loss(apply_fn, sched, "eps", trigger=tau, watermark=wm, gamma1=1.5)


def test_decoys_sit_in_the_watermark_half_above_t_min():
  """With (almost) no noise the network inputs show each example's kind: zeros for the task
  half, 0.8 * 1 for the watermark (trigger 0), +-0.2 for a decoy at t >= t_min, 0 below."""
  sched = make_schedule("linear", 10, beta_start=1e-12, beta_end=1e-12)
  seen = []

  def apply_fn(params, x, t, y, rng, train):
    seen.append((np.asarray(x), np.asarray(t), None if y is None else np.asarray(y)))
    return jnp.zeros_like(x)

  loss = wdp_loss(apply_fn, sched, "eps", trigger=jnp.zeros((4, 4, 1)),
                  watermark=jnp.ones((1, 4, 4, 1)), gamma1=0.8, class_dropout_prob=0.1,
                  null_label=-1, num_classes=10, decoy_fraction=0.5, decoy_kind="pixels",
                  decoy_t_min=0.5)
  batch = {"image": jnp.zeros((64, 4, 4, 1)), "label": jnp.arange(64) % 10}
  loss({}, batch, jax.random.PRNGKey(0))
  (x_wm, t_wm, y_wm), (x_task, _, _) = seen
  np.testing.assert_allclose(x_task, 0.0, atol=1e-4)  # the task half is the paper's
  assert np.all(y_wm == -1)  # extraction samples with the null label
  np.testing.assert_allclose(x_wm[32:], 0.8, atol=1e-4)  # the secret-trigger half
  high = t_wm[:32] >= 5
  assert 0 < high.sum() < 32
  np.testing.assert_allclose(np.abs(x_wm[:32][high]), 0.2, atol=1e-4)  # decoys: +-0.2
  np.testing.assert_allclose(x_wm[:32][~high], 0.0, atol=1e-4)  # below t_min: plain
  assert 0.3 < np.mean(x_wm[:32][high] > 0) < 0.7


@pytest.mark.parametrize("name, objective", [("unet", "x0"), ("dit", "v")])
def test_wdp_trains_and_extracts_unet_and_dit(name, objective):
  """One gradient step of the joint loss and an extraction, for both networks."""
  common = dict(resolution=8, in_channels=1, num_classes=10, class_dropout_prob=0.1)
  cfg = (dict(name="unet", ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,),
              num_groups=4, **common) if name == "unet" else
         dict(name="dit", patch_size=2, width=16, depth=1, num_heads=2, **common))
  model = build_model(cfg)
  params = init_params(model, jax.random.PRNGKey(0))
  sched = make_schedule("linear", 50)
  trigger, _, targets = Secret("random:1", "keyed:2", key=3, block=2).images(SHAPE)
  loss = wdp_loss(apply_fn_for(model), sched, objective, trigger=trigger, watermark=targets,
                  class_dropout_prob=0.1, null_label=-1, num_classes=10, decoy_fraction=0.5)
  batch = {"image": jnp.zeros((4, 8, 8, 1)), "label": jnp.arange(4)}
  (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params, batch,
                                                                   jax.random.PRNGKey(1))
  assert np.isfinite(value) and metrics["watermark_loss"] > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  out = extract(model_fn_for(model), params, jax.random.PRNGKey(2), sched, trigger=trigger,
                gamma1=0.8, num=2, y=jnp.full((2,), -1), steps=3, objective=objective)
  assert out.shape == (2, 8, 8, 1) and np.all(np.isfinite(out))


def test_decoy_triggers_are_plus_minus_one_of_each_kind():
  d = decoy_triggers(jax.random.PRNGKey(0), 64, (8, 8, 3), "mixed")
  assert set(np.unique(np.asarray(d))) == {-1.0, 1.0}
  cols = np.all(d == d[:, :1], axis=(1, 3)).all(-1)  # stripes: every row equal
  assert 10 < cols.sum() < 54
  assert not np.all(decoy_triggers(jax.random.PRNGKey(1), 8, (8, 8, 1), "pixels")
                    == decoy_triggers(jax.random.PRNGKey(1), 8, (8, 8, 1), "pixels")[:, :1])


# ----------------------------------------------------------------------------- triggers


def test_trigger_specs(tmp_path):
  r = make_trigger("random:5", SHAPE)
  assert r.shape == (8, 8, 1) and set(np.unique(r)) <= {-1.0, 1.0}
  np.testing.assert_array_equal(r, make_trigger("random:5", SHAPE))
  assert not np.array_equal(r, make_trigger("random:6", SHAPE))
  s = make_trigger("stripes:5", ImageShape(8, 3))
  assert np.all(s == s[:1]) and set(np.unique(s)) <= {-1.0, 1.0}
  path = tmp_path / "t.png"
  Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))).save(path)
  img = make_trigger(str(path), SHAPE)
  assert img.shape == (8, 8, 1) and img.max() - img.min() > 1.5
  assert np.all(np.diff(img[0, :, 0]) > 0)  # the left-to-right ramp survives the resize


@pytest.mark.parametrize("spec, match", [
  ("random:abc", "integer seed"),
  ("noise:3", "expected one of"),
  ("/no/such/file.png", "no such file"),
])
def test_malformed_trigger_specs(spec, match):
  with pytest.raises(WdmjaxError, match=match):
    make_trigger(spec, SHAPE)


def test_trigger_array_of_wrong_size(tmp_path):
  path = str(tmp_path / "t.npy")
  np.save(path, np.ones((16, 16, 1), np.float32))
  with pytest.raises(WdmjaxError, match=r"expected an array of shape \(8, 8, 1\)"):
    make_trigger(path, SHAPE)


def test_watermark_specs_and_keying():
  w = make_watermark("keyed:4", SHAPE, block=2)
  assert w.shape == (1, 8, 8, 1) and set(np.unique(w)) <= {-1.0, 1.0}
  assert np.all(w[0, ::2, ::2] == w[0, 1::2, 1::2])  # constant on 2x2 blocks
  fives = make_watermark("class:digits:5", SHAPE)
  _, labels = load_arrays("digits", "train")
  assert fives.shape == (int(np.sum(np.asarray(labels) == 5)), 8, 8, 1)
  t = keyed_targets(fives, key=9, block=2)
  assert set(np.unique(t)) <= {-1.0, 1.0}
  # Each keyed image is its own block signs XOR the key mask: votes of the targets recover
  # the expected bits exactly.
  np.testing.assert_array_equal(vote_bits(t, 2), expected_bits(fives, 9, 2))
  with pytest.raises(WdmjaxError, match="no images of class 11"):
    make_watermark("class:digits:11", SHAPE)
  with pytest.raises(WdmjaxError, match="block"):
    Secret("random:1", "keyed:1", block=3).images(SHAPE)


def test_vote_ties_never_agree():
  samples = np.stack([np.ones((4, 4, 1)), -np.ones((4, 4, 1))])  # one vote each way
  assert np.all(vote_bits(samples, 2) == 0)
  r = keyed_test(samples, np.ones((1, 4, 4, 1)), key=1, block=2)
  assert r["agreeing_bits"] == 0 and r["bits"] == 4


def test_keyed_test_null_is_a_fair_coin():
  """Samples that know nothing of the key agree with w XOR r on about half the bits."""
  rng = np.random.default_rng(0)
  samples = rng.normal(size=(5, 16, 16, 1)).astype(np.float32)
  w = np.ones((1, 16, 16, 1), np.float32)
  rates = [keyed_test(samples, w, key, 2)["bit_agreement"] for key in range(300)]
  assert abs(np.mean(rates) - 0.5) < 0.02


def test_decoy_test_is_a_permutation_test_over_triggers():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(5, 8, 8, 1)).astype(np.float32)
  draw = lambda m: rng.normal(size=(m, 8, 8, 1)).astype(np.float32)
  # Secret-trigger samples drawn like the decoys' (a model that never learned the trigger).
  r = decoy_test(draw(16), [draw(16) for _ in range(4)], w, block=2)
  assert r["test"] == "decoy-permutation" and not r["verified"]
  assert r["decoys"] == 4 and r["decoy_samples"] == 64 and 0.0 < r["null_agreement"] < 1.0
  # Noisy copies of the watermark images beat every decoy: p = 1 / (4 + 1), the smallest
  # there is, which cannot reach the default alpha: not verified, and the report says why.
  copies = w[rng.integers(0, 5, 16)] + 0.5 * draw(16)
  r = decoy_test(copies, [draw(16) for _ in range(4)], w, block=2)
  assert r["log10_p_value"] == pytest.approx(math.log10(1 / 5))
  assert r["similarity_mean"] > max(r["decoy_similarity_means"])
  assert not r["verified"] and "1/5" in r["warning"] and "key" in r["warning"]
  r = decoy_test(copies, [draw(16) for _ in range(4)], w, block=2, alpha=0.2)
  assert r["verified"] and "warning" not in r
  # Ties count against the owner: identical samples give p = 1.
  r = decoy_test(copies, [copies] * 4, w, block=2, alpha=0.2)
  assert r["log10_p_value"] == 0.0 and not r["verified"]


def test_trigger_permutation_is_calibrated_where_the_sample_rank_sum_is_not():
  """Null scores with a trigger effect (each trigger shifts all its samples' scores by its own
  N(0, 0.5^2)): the old rank-sum over samples rejects far above its level, the permutation
  test over trigger means keeps P(p <= q) <= q, also when coarse statistics tie."""
  rng = np.random.default_rng(0)
  sims, decoys, m = 4000, 4, 16
  scores = 0.5 * rng.normal(size=(sims, decoys + 1, 1)) + rng.normal(size=(sims, decoys + 1, m))
  rank_p = np.array([10 ** rank_sum_log10_p(s[0], s[1:].ravel()) for s in scores[:400]])
  assert np.mean(rank_p <= 0.01) > 0.05  # anti-conservative: 12% at level 1%
  means = scores.mean(2)
  for stats in (means, np.round(means * 2) / 2):  # the second ties 64% of the time
    p = np.array([10 ** permutation_log10_p(s[0], s[1:]) for s in stats])
    for q in (0.2, 0.4, 0.6, 0.8):
      assert np.mean(p <= q + 1e-9) <= q + 3 * math.sqrt(q * (1 - q) / sims), q
  assert np.mean(p <= 0.2 + 1e-9) > 0.05  # the first one is exact (about 0.2), not vacuous


def test_decoy_triggers_come_from_the_secret_triggers_generator():
  assert decoy_trigger_specs("random:1", 2) == ["random:1000003", "random:1000004"]
  assert decoy_trigger_specs("stripes:7", 1) == ["stripes:1000003"]
  assert decoy_trigger_specs("random:1000003", 2) == ["random:1000004", "random:1000005"]
  assert decoy_trigger_specs("logo.png", 1) == ["random:1000003"]  # no generator to share
  assert is_generated_trigger("stripes:7") and not is_generated_trigger("logo.png")


def test_best_log10_p_warns_when_a_secret_can_never_verify():
  keyed = Secret("random:1", "keyed:2", key=3, block=2)
  assert best_log10_p(keyed, SHAPE) == pytest.approx(16 * math.log10(0.5))  # (8 / 2)^2 bits
  warning = reach_warning(keyed, SHAPE, alpha=1e-6)
  assert "16 bits" in warning and "10^-4.82" in warning
  assert reach_warning(keyed, SHAPE, alpha=1e-4) is None
  assert reach_warning(Secret("random:1", "keyed:2", key=3, block=1), SHAPE) is None  # 64
  unkeyed = Secret("random:1", "keyed:2", block=2)
  assert best_log10_p(unkeyed, SHAPE, decoys=9) == pytest.approx(-1.0)
  assert "1/10" in reach_warning(unkeyed, SHAPE, alpha=1e-6, decoys=9)
  with pytest.raises(WdmjaxError, match="decoys"):
    best_log10_p(unkeyed, SHAPE)
  samples = np.ones((3, 8, 8, 1), np.float32)
  assert "16 bits" in keyed_test(samples, np.ones((1, 8, 8, 1)), 3, 2)["warning"]
  assert "warning" not in keyed_test(samples, np.ones((1, 8, 8, 1)), 3, 2, alpha=1e-3)


def test_rank_sum_matches_the_exact_count():
  """Complete separation of m over n scores: p = 1 / C(m + n, m) exactly."""
  x, y = np.arange(16) + 100.0, np.arange(64.0)
  want = -math.log10(math.comb(80, 16))
  assert rank_sum_log10_p(x, y) == pytest.approx(want, abs=1e-9)
  assert rank_sum_log10_p(y, x) == pytest.approx(0.0, abs=1e-9)


# ----------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def tiny_models():
  """The same tiny DiT trained 300 steps with the WDP and without it."""
  imgs, labels = load_arrays("digits", "train")
  x, y = preprocess(np.asarray(imgs), 8, 1), np.asarray(labels)
  model = build_model(dict(name="dit", resolution=8, in_channels=1, patch_size=2, width=32,
                           depth=2, num_heads=2, num_classes=10, class_dropout_prob=0.1))
  params = init_params(model, jax.random.PRNGKey(0))
  sched = make_schedule("linear", 100)
  secret = Secret(trigger="random:1", watermark="keyed:2", key=3, gamma1=0.5, gamma2=1.0,
                  block=2)
  trigger, watermark, targets = secret.images(SHAPE)
  losses = {
    "watermarked": wdp_loss(apply_fn_for(model), sched, "eps", trigger=trigger,
                            watermark=targets, gamma1=secret.gamma1, gamma2=secret.gamma2,
                            class_dropout_prob=0.1, null_label=-1, num_classes=10),
    "clean": diffusion_loss(apply_fn_for(model), sched, "eps", 0.1, -1),
  }
  tx = make_optimizer(3e-3, 0, 0.0, 1.0)
  out = {}
  for name, loss in losses.items():
    step = make_train_step(loss, tx, 0.99, make_mesh(1))
    state = create_train_state(params, tx, jax.random.PRNGKey(1))
    for i in range(300):
      idx = np.random.default_rng(i).integers(0, len(x), 32)
      state, _ = step(state, {"image": jnp.asarray(x[idx]), "label": jnp.asarray(y[idx])})
    out[name] = state.params
  return model, sched, secret, trigger, watermark, out


def test_tiny_model_trained_with_wdp_verifies_and_clean_one_does_not(tiny_models):
  model, sched, secret, trigger, watermark, params = tiny_models
  reports = {}
  for name, p in params.items():
    s = extract(model_fn_for(model), p, jax.random.PRNGKey(5), sched, trigger=trigger,
                gamma1=secret.gamma1, num=9, y=jnp.full((9,), -1), steps=20)
    reports[name] = keyed_test(np.asarray(s), watermark, secret.key, secret.block, alpha=1e-3)
  assert reports["watermarked"]["verified"], reports["watermarked"]
  assert reports["watermarked"]["bit_agreement"] >= 15 / 16
  assert not reports["clean"]["verified"], reports["clean"]


# ----------------------------------------------------------------------------- CLI


def test_unkeyed_test_is_calibrated_over_secrets_on_an_innocent_model(tiny_models):
  """The whole pipeline (extraction with the secret and the decoy triggers, similarity,
  permutation p) on the clean tiny model, over 60 secrets drawn as an owner draws them:
  P(p <= q) stays at or below q (binomial noise allowed)."""
  from wdmjax.configs import load_config

  params = tiny_models[-1]["clean"]
  cfg = load_config(TINY_DIT, [])
  seeds = np.random.default_rng(0).integers(0, 10**6, 60)
  p = np.array([10 ** runs.verify_model(
    cfg, params, Secret(trigger=f"random:{s}", watermark="keyed:2", block=2), num=8,
    steps=10, decoys=4, seed=i)["log10_p_value"] for i, s in enumerate(seeds)])
  for q in (0.2, 0.4, 0.6, 0.8):
    assert np.mean(p <= q + 1e-9) <= q + 3 * math.sqrt(q * (1 - q) / len(p)), (q, p)
  assert np.mean(p <= 0.2 + 1e-9) > 0.05  # reaches its smallest p: not vacuous


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
  """A tiny model watermarked from scratch through the CLI (a few steps: plumbing only)."""
  workdir = str(tmp_path_factory.mktemp("wm") / "run")
  r = run_cli("embed", "--config", TINY_DIT, "--workdir", workdir, "--trigger", "random:1",
              "--watermark", "keyed:2", "--key", "77", "--block", "2", "--steps", "6",
              "--no-progress")
  assert r.returncode == 0, r.stderr
  return workdir


def test_embed_keeps_the_secret_apart(embedded):
  path = os.path.join(embedded, "secret.json")
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
  assert json.load(open(path))["key"] == 77
  for name in ("config.json", "metrics.jsonl", "embedding.json"):
    text = open(os.path.join(embedded, name)).read()
    assert "random:1" not in text and "keyed:2" not in text and '"key"' not in text, name


def test_verify_json_and_explicit_secret(embedded, tmp_path):
  r = run_cli("verify", "--workdir", embedded, "--json", "--num", "3", "--steps", "5")
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  for key in ("log10_p_value", "verified", "bit_agreement", "bits", "alpha", "test"):
    assert key in out
  assert out["bits"] == 16 and out["test"] == "exact-binomial"
  # The same model, as a suspect that came without a secret file.
  suspect = tmp_path / "suspect"
  suspect.mkdir()
  for name in ("config.json", "checkpoints"):
    os.symlink(os.path.join(embedded, name), suspect / name)
  r = run_cli("verify", "--workdir", str(suspect), "--json", "--num", "3", "--steps", "5")
  assert r.returncode == 2 and "--trigger/--watermark" in r.stderr
  r = run_cli("verify", "--workdir", str(suspect), "--json", "--num", "3", "--steps", "5",
              "--trigger", "random:1", "--watermark", "keyed:2", "--key", "77", "--block", "2")
  assert r.returncode == 0, r.stderr
  assert json.loads(r.stdout)["bit_agreement"] == out["bit_agreement"]
  r = run_cli("verify", "--workdir", str(suspect), "--num", "3", "--steps", "5", "--trigger",
              "random:1", "--watermark", "keyed:2", "--key", "77", "--block", "2", "--test",
              "soft", "--json")
  soft = json.loads(r.stdout)
  assert soft["test"] == "exact-key-flip" and soft["bits"] == 3 * 16 and soft["blocks"] == 16
  r = run_cli("verify", "--workdir", str(suspect), "--num", "3", "--steps", "5", "--trigger",
              "random:1", "--watermark", "keyed:2", "--block", "2", "--test", "soft")
  assert r.returncode == 2 and "--test: 'soft' is a test of a keyed watermark" in r.stderr
  png = str(tmp_path / "wm.png")
  r = run_cli("extract", "--workdir", embedded, "--num", "3", "--steps", "5", "--out", png)
  assert r.returncode == 0 and os.path.isfile(png), r.stderr


def test_verify_takes_the_secret_from_the_owner_only(embedded, tmp_path, monkeypatch):
  """A suspect's own secret.json (here a hostile one: another gamma1, block and key) never
  changes a test with an explicit secret; --secret names the owner's; the key may come from
  a file or WDMJAX_KEY; the report and the text output say where the secret came from."""
  monkeypatch.delenv("WDMJAX_KEY", raising=False)
  suspect = tmp_path / "suspect"
  suspect.mkdir()
  for name in ("config.json", "checkpoints"):
    os.symlink(os.path.join(embedded, name), suspect / name)
  (suspect / "secret.json").write_text(json.dumps(
    {"trigger": "random:1", "watermark": "keyed:2", "key": 5, "gamma1": 0.3, "block": 8}))
  key_file = tmp_path / "key"
  key_file.write_text("77\n")
  common = ["verify", "--workdir", suspect, "--num", "3", "--steps", "5", "--json"]
  explicit = ["--trigger", "random:1", "--watermark", "keyed:2", "--block", "2"]
  reports = {}
  for name, extra in (("owner", ["--secret", embedded]),
                      ("file", ["--secret", os.path.join(embedded, "secret.json")]),
                      ("key_file", [*explicit, "--key-file", key_file])):
    r = run_cli(*common, *extra)
    assert r.returncode == 0, r.stderr
    reports[name] = json.loads(r.stdout)
    assert reports[name]["bits"] == 16  # block 2 on 8x8, not the suspect's 8
    assert "wdmjax: warning: the secret has 16 bits" in r.stderr  # 10^-4.8 > alpha 1e-6
  want = os.path.abspath(os.path.join(embedded, "secret.json"))
  assert reports["owner"]["secret_source"] == reports["file"]["secret_source"] == want
  assert reports["key_file"]["secret_source"] == "explicit"
  assert len({r["bit_agreement"] for r in reports.values()}) == 1
  # Unkeyed, with an image-file trigger: the permutation test says it is not exact, and
  # that 1/(2 + 1) can never reach alpha.
  png = tmp_path / "trigger.png"
  Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4).save(png)
  r = run_cli(*common, "--trigger", png, "--watermark", "keyed:2", "--block", "2",
              "--decoys", "2")
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout)
  assert out["test"] == "decoy-permutation" and out["decoys"] == 2 and not out["verified"]
  assert out["log10_p_value"] >= math.log10(1 / 3) - 1e-9
  assert "image file" in out["warning"] and "1/3" in out["warning"]
  assert "wdmjax: warning:" in r.stderr
  monkeypatch.setenv("WDMJAX_KEY", "77")
  r = run_cli(*common[:-1], *explicit)  # text output
  assert r.returncode == 0 and "secret: explicit" in r.stdout, r.stderr
  assert f"{reports['owner']['agreeing_bits']}/16 bits agree" in r.stdout
  r = run_cli("extract", "--workdir", suspect, "--secret", embedded, "--num", "3", "--steps",
              "5", "--out", tmp_path / "x.png")
  assert r.returncode == 0 and f"(secret: {want})" in r.stdout, r.stderr
  # Explicit parts without trigger and watermark read nothing: an error, not the suspect's.
  r = run_cli(*common, "--key", "77")
  assert r.returncode == 2 and "--trigger/--watermark" in r.stderr
  key_file.write_text("secret987654321x")
  r = run_cli(*common, *explicit, "--key-file", key_file)
  assert r.returncode == 2 and "--key-file" in r.stderr and "987654321" not in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1


def test_resolve_secret_sources(tmp_path):
  owner, suspect = str(tmp_path / "owner"), str(tmp_path / "suspect")
  mine = Secret("random:1", "keyed:2", key=77, block=2)
  runs.write_secret(owner, mine)
  runs.write_secret(suspect, Secret("random:1", "keyed:2", key=5, gamma1=0.3, block=8))
  owner_file = os.path.abspath(os.path.join(owner, "secret.json"))
  got = runs.resolve_secret(suspect, trigger="random:1", watermark="keyed:2", key=77)
  assert got == (Secret("random:1", "keyed:2", key=77), "explicit")  # defaults, not 0.3/8
  for path in (owner, owner_file):
    assert runs.resolve_secret(suspect, path, block=4) == (dataclasses.replace(mine, block=4),
                                                           owner_file)
  assert runs.resolve_secret(suspect, mine, key=1) == (dataclasses.replace(mine, key=1),
                                                       "explicit")
  assert runs.resolve_secret(owner) == (mine, owner_file)  # the owner's own model
  with pytest.raises(WdmjaxError, match="trigger/watermark: expected both"):
    runs.resolve_secret(suspect, key=77)
  with pytest.raises(WdmjaxError, match="secret: expected the owner's secret.json"):
    runs.resolve_secret(suspect, str(tmp_path))


def test_read_key_precedence_and_errors(tmp_path, monkeypatch):
  key_file = tmp_path / "key"
  key_file.write_text(" 42\n")
  monkeypatch.setenv("WDMJAX_KEY", "7")
  assert runs.read_key(5, key_file) == 5
  assert runs.read_key(None, key_file) == 42
  assert runs.read_key() == 7 and runs.read_key(env=False) is None
  monkeypatch.delenv("WDMJAX_KEY")
  assert runs.read_key() is None
  for text in ("987654321x", "-987654321", "9876 54321", "", "9" * 5000):
    key_file.write_text(text)
    with pytest.raises(WdmjaxError, match="key_file: expected") as e:
      runs.read_key(None, key_file)
    assert "98765" not in str(e.value) and "999" not in str(e.value)
  monkeypatch.setenv("WDMJAX_KEY", "0x987654321")
  with pytest.raises(WdmjaxError, match="WDMJAX_KEY: expected") as e:
    runs.read_key()
  assert "987654321" not in str(e.value)
  with pytest.raises(WdmjaxError, match="no such file"):
    runs.read_key(None, tmp_path / "none")


@pytest.mark.parametrize("text", [
  '{"trigger": "random:1", "watermark": "keyed:2", "key": "987654321"}',
  '{"trigger": "random:1", "watermark": "keyed:2", "key": -987654321}',
  '{"trigger": "random:1", "watermark": "keyed:2", "key": 987654321, "gamma1": "9x"}',
  '{"trigger": "random:1", "watermark": "keyed:2", "key": 987654321, "gamma1": 9}',
  '{"trigger": "random:1", "key": 987654321, "salt": 1}',
  '[987654321]',
  '{"trigger": "random:1", "watermark": "keyed:2", "key": 987654321',
])
def test_secret_json_errors_never_echo_the_key(text):
  with pytest.raises(WdmjaxError, match="^s.json: ") as e:
    Secret.from_json(text, source="s.json")
  assert "987654321" not in str(e.value) and "9x" not in str(e.value)


def test_secret_is_written_private_never_through_a_link(tmp_path, monkeypatch):
  """secret.json goes through a temporary file that mkstemp creates exclusively (mode 0o600,
  O_EXCL | O_NOFOLLOW): a planted world-readable file or link at a temporary name is skipped,
  and a link at secret.json itself is replaced, not written through."""
  victim = tmp_path / "victim"
  victim.write_text("victim")
  os.chmod(victim, 0o644)
  wd = tmp_path / "wd"
  wd.mkdir()
  os.symlink(victim, wd / ".secret.json.planted_link.tmp")
  (wd / ".secret.json.planted_file.tmp").write_text("planted")
  os.chmod(wd / ".secret.json.planted_file.tmp", 0o666)
  os.symlink(victim, wd / "secret.json")
  tried = []

  def names():
    for name in ("planted_link", "planted_file", "fresh"):
      tried.append(name)
      yield name

  monkeypatch.setattr(tempfile, "_get_candidate_names", names)
  runs.write_secret(wd, Secret("random:1", "keyed:2", key=77))
  assert tried == ["planted_link", "planted_file", "fresh"]  # mkstemp asked for each name
  assert victim.read_text() == "victim" and stat.S_IMODE(os.stat(victim).st_mode) == 0o644
  assert (wd / ".secret.json.planted_file.tmp").read_text() == "planted"
  assert not os.path.islink(wd / "secret.json")
  assert stat.S_IMODE(os.lstat(wd / "secret.json").st_mode) == 0o600
  assert runs.read_secret(wd).key == 77
  assert not os.path.exists(wd / ".secret.json.fresh.tmp")
  os.chmod(wd / "secret.json", 0o644)  # a world-readable secret.json becomes private again
  monkeypatch.undo()
  runs.write_secret(wd, Secret("random:1", "keyed:2", key=78))
  assert stat.S_IMODE(os.stat(wd / "secret.json").st_mode) == 0o600


@pytest.mark.parametrize("args, match", [
  (["--trigger", "random:x"], "--trigger: expected an integer seed"),
  (["--trigger", "blur:3"], "--trigger: expected one of"),
  (["--watermark", "class:digits"], "--watermark"),
  (["--block", "3"], "block: expected a divisor of the resolution 8"),
])
def test_embed_bad_secret_gives_one_line_error(args, match, tmp_path):
  base = ["embed", "--config", TINY_DIT, "--workdir", str(tmp_path / "w"), "--trigger",
          "random:1", "--watermark", "keyed:2", "--key", "1", "--block", "2", "--steps", "2"]
  for flag, value in zip(args[::2], args[1::2], strict=True):
    base[base.index(flag) + 1] = value
  r = run_cli(*base)
  assert r.returncode == 2 and match in r.stderr, r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "w" / "secret.json")


def test_embed_rejected_by_the_engine_leaves_no_secret(tmp_path):
  """A config the training loop rejects (an unprepared data set) leaves no secret behind."""
  r = run_cli("embed", "--config", TINY_DIT, "--workdir", str(tmp_path / "w"), "--trigger",
              "random:1", "--watermark", "keyed:2", "--key", "1", "--block", "2", "--steps",
              "2", "--set", "data.name=cifar10", "--set", f"data.data_dir={tmp_path / 'none'}")
  assert r.returncode == 2 and "cifar10" in r.stderr, r.stderr
  assert not os.path.exists(tmp_path / "w")  # nothing left: the workdir is as it was


def test_workdir_without_checkpoint_gives_one_line_error(tmp_path):
  for cmd in ("verify", "extract"):
    r = run_cli(cmd, "--workdir", str(tmp_path), "--trigger", "random:1", "--watermark",
                "keyed:2")
    assert r.returncode == 2 and "no trained run" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- fine-tuning


def test_soft_keyed_test_null_is_exact_over_keys(tiny_models):
  """The soft test on a model that never saw the keys (the clean tiny model; the same 32
  extracted samples, 400 random keys): the randomized p-values are uniform within the
  0.1% Kolmogorov-Smirnov bound, the conservative ones never below it; on the watermarked
  model, the secret key verifies. The best-sample test likewise (valid, not exact)."""
  model, sched, secret, trigger, watermark, params = tiny_models
  s = np.asarray(extract(model_fn_for(model), params["clean"], jax.random.PRNGKey(6), sched,
                         trigger=trigger, gamma1=secret.gamma1, num=32,
                         y=jnp.full((32,), -1), steps=10))
  rng = np.random.default_rng(0)
  keys = rng.integers(0, 2**31, 400)
  rand = np.sort([10 ** soft_keyed_test(s, watermark, int(k), 2, u=float(rng.uniform())
                                        )["log10_p_value"] for k in keys])
  cons = np.sort([10 ** soft_keyed_test(s, watermark, int(k), 2)["log10_p_value"]
                  for k in keys])
  n, bound = len(keys), 1.95 / math.sqrt(len(keys))
  ecdf_hi, ecdf_lo = np.arange(1, n + 1) / n, np.arange(n) / n
  assert max(np.max(ecdf_hi - rand), np.max(rand - ecdf_lo)) < bound  # two-sided KS
  assert np.max(ecdf_hi - cons) < bound  # conservative: P(p <= q) never far above q
  assert len(np.unique(cons)) > 20  # many distinct values: the samples differ per block
  w = np.asarray(extract(model_fn_for(model), params["watermarked"], jax.random.PRNGKey(6),
                         sched, trigger=trigger, gamma1=secret.gamma1, num=32,
                         y=jnp.full((32,), -1), steps=10))
  r = soft_keyed_test(w, watermark, secret.key, secret.block, alpha=1e-3)
  assert r["verified"] and r["test"] == "exact-key-flip" and r["bits"] == 32 * 16, r
  # The best-sample test is valid (conservative) over the same keys, and finds a watermark
  # left whole in one sample of 32 where the vote and the soft test cannot.
  best = np.array([10 ** best_sample_test(s, watermark, int(k), 2)["log10_p_value"]
                   for k in keys])
  for q in (0.05, 0.2, 0.5):
    assert np.mean(best <= q) <= q + 3 * math.sqrt(q * (1 - q) / n), (q, np.mean(best <= q))
  mixed = np.concatenate([w[:1], s[1:]])
  r = best_sample_test(mixed, watermark, secret.key, secret.block, alpha=1e-3)
  assert r["verified"] and r["agreeing_bits"] == 16, r
  assert not keyed_test(mixed, watermark, secret.key, secret.block, alpha=1e-3)["verified"]


def test_two_point_tail_matches_enumeration():
  """The exact convolution against all 2^10 sign patterns, and the binomial special case."""
  rng = np.random.default_rng(1)
  a, b = rng.integers(0, 6, 10), rng.integers(0, 6, 10)
  sums = np.array([sum(a[i] if (m >> i) & 1 else b[i] for i in range(10))
                   for m in range(1024)])
  for obs in (0, int(np.median(sums)), int(sums.max()), int(sums.max()) + 1):
    want = np.mean(sums >= obs)
    got = two_point_log10_sf(a, b, obs)
    assert (want == 0 and got == -math.inf) or math.isclose(10 ** got, want, rel_tol=1e-12)
  assert math.isclose(two_point_log10_sf(np.ones(49, int), np.zeros(49, int), 40),
                      exact_binomial_log10_sf(40, 49), rel_tol=1e-9)
  with pytest.raises(WdmjaxError, match="non-negative integers"):
    two_point_log10_sf(np.array([1.5]), np.array([0]), 1)


def _digits_batch_and_task(model, sched):
  """16 digits as a batch, and the clean task loss of the tiny models."""
  imgs, labels = load_arrays("digits", "train")
  batch = {"image": jnp.asarray(preprocess(np.asarray(imgs[:16]), 8, 1)),
           "label": jnp.asarray(np.asarray(labels[:16]))}
  return batch, diffusion_loss(apply_fn_for(model), sched, "eps", 0.1, -1)


def test_inner_finetune_matches_a_plain_loop_of_the_same_updates(tiny_models):
  """The lax.scan of fine-tuning updates is the thief's loop: the same optimizer, batch and
  keys, step by step; the first-order loss's gradient is grad L(theta) + grad L_wm(theta_k)."""
  from wdmjax.watermark.robust import finetune_aware_loss, inner_finetune

  model, sched, secret, trigger, _, params = tiny_models
  p0 = params["watermarked"]
  batch, task = _digits_batch_and_task(model, sched)
  rng = jax.random.PRNGKey(9)

  task_grad = jax.jit(jax.grad(lambda q, key: task(q, batch, key)[0]))  # one compile, not eager

  def plain_loop(tx, p):
    state, update = tx.init(p), jax.jit(tx.update)  # jitted: eager Adam is op by op
    for key in jax.random.split(rng, 3):
      g = task_grad(p, key)
      updates, state = update(g, state, p)
      p = jax.tree.map(lambda a, u: a + u, p, updates)
    return p

  sgd = optax.sgd(0.05)
  got = jax.jit(lambda p: inner_finetune(task, sgd, p, batch, rng, 3))(p0)
  chex.assert_trees_all_close(got, plain_loop(sgd, p0), atol=1e-6)
  # The thief's AdamW: its first updates are lr * g / (|g| + eps), so a gradient entry at
  # float-rounding level (~1e-9) may take either sign in two compilations; all others match.
  tx = thief_optimizer(1e-3, 1.0)
  got = jax.jit(lambda p: inner_finetune(task, tx, p, batch, rng, 3))(p0)
  diff = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in zip(
    jax.tree.leaves(got), jax.tree.leaves(plain_loop(tx, p0)), strict=True)])
  assert np.mean(diff > 1e-6) < 0.01 and diff.max() <= 6e-3, (np.mean(diff > 1e-6), diff.max())
  moved = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in zip(
    jax.tree.leaves(got), jax.tree.leaves(p0), strict=True)])
  assert np.median(moved) > 5e-4  # three Adam updates of 1e-3: it moved

  kw = dict(trigger=trigger, watermark=keyed_targets(make_watermark("keyed:2", SHAPE, 2), 3, 2),
            gamma1=secret.gamma1, gamma2=secret.gamma2, class_dropout_prob=0.1,
            null_label=-1, num_classes=10)
  joint = wdp_loss(apply_fn_for(model), sched, "eps", **kw)
  wm_only = wdp_loss(apply_fn_for(model), sched, "eps", task=False, **kw)
  # The first-order gradient; that the full one differs (and stays finite) is checked on a
  # toy loss below: its second-order compilation of the DiT would cost most of this test.
  got = jax.jit(jax.grad(lambda q: finetune_aware_loss(
    joint, wm_only, task, tx, steps=1, order="first")(q, batch, rng)[0]))(p0)
  r_now, r_inner, r_after = jax.random.split(rng, 3)
  moved = jax.jit(lambda p: inner_finetune(task, tx, p, batch, r_inner, 1))(p0)
  want = jax.tree.map(jnp.add, jax.jit(jax.grad(lambda q: joint(q, batch, r_now)[0]))(p0),
                      jax.jit(jax.grad(lambda q: wm_only(q, batch, r_after)[0]))(moved))
  chex.assert_trees_all_close(got, want, atol=1e-5)


def test_full_order_gradient_is_finite_where_the_thief_sees_exact_zero_gradients():
  """Some CPUs' kernels return entries of the task gradient that are exactly zero; Adam's
  sqrt(v) has an infinite derivative there, so a plain AdamW gives NaN through the inner
  updates. The thief's optimizer keeps it finite, and its updates are AdamW's elsewhere."""
  from wdmjax.watermark.robust import finetune_aware_loss

  mask = jnp.array([0.0, 1.0, 0.0, 1.0])  # entries 0 and 2: gradient exactly 0
  task = lambda q, batch, key: (jnp.sum((mask * q["w"] - batch["x"]) ** 2), {})
  wm = lambda q, batch, key: (jnp.sum(q["w"] ** 3), {})
  params, batch = {"w": jnp.array([0.5, -1.0, 2.0, 0.25])}, {"x": jnp.ones(4)}

  def grad(tx, order="full"):
    loss = finetune_aware_loss(wm, wm, task, tx, steps=2, order=order)
    return np.asarray(jax.grad(lambda q: loss(q, batch, jax.random.PRNGKey(0))[0])(params)["w"])

  assert not np.isfinite(grad(make_optimizer(1e-2, 0, 0.0, None))).all()
  got = grad(thief_optimizer(1e-2, None))
  assert np.isfinite(got).all() and np.abs(got).min() > 0.1, got
  # second order: the path through the updates counts (Adam's first updates are nearly
  # lr * sign(g), flat in the weights; SGD's move with the task's curvature)
  sgd = optax.sgd(0.1)
  assert np.abs(grad(sgd) - grad(sgd, "first")).max() > 0.1
  for tx in (make_optimizer(1e-2, 0, 0.0, None), thief_optimizer(1e-2, None)):
    g = jax.grad(lambda q: task(q, batch, None)[0])(params)
    updates, _ = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [0.0, 1e-2, 0.0, 1e-2], atol=1e-7)


@pytest.mark.parametrize("args, match", [
  (["--robust", "finetune", "--robust-steps", "0"], "--robust-steps: expected an integer in"),
  (["--robust", "finetune", "--robust-lr", "-1"], "--robust-lr: expected"),
  (["--robust", "finetune", "--robust-lr", "nan"], "--robust-lr: expected"),
  (["--robust", "finetune", "--robust-weight", "0"], "--robust-weight: expected"),
  (["--robust-steps", "3"], "--robust-steps: expected --robust with it"),
  (["--robust", "fisher"], "--robust: 'fisher' anchors the weights to a base"),
  (["--robust", "finetune", "--peft", "difffit"], "--robust: expected a full embedding"),
])
def test_embed_bad_robust_options_give_one_line_error(args, match, tmp_path):
  r = run_cli("embed", "--config", TINY_DIT, "--workdir", str(tmp_path / "w"), "--trigger",
              "random:1", "--watermark", "keyed:2", "--key", "1", "--block", "2", "--steps",
              "2", *args)
  assert r.returncode == 2 and match in r.stderr, r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "w")
  r = run_cli("embed", "--config", TINY_DIT, "--workdir", str(tmp_path / "w"), "--trigger",
              "random:1", "--watermark", "keyed:2", "--robust-order", "third")
  assert r.returncode == 2 and "--robust-order: invalid choice" in r.stderr


def test_robust_embeddings_record_their_guard(embedded, tmp_path):
  """Plumbing of `embed --robust` (a few steps): the fine-tuning-aware loss from scratch and
  the Fisher anchor on a base; embedding.json says which, the metrics carry the guard."""
  wd = str(tmp_path / "ft")
  r = run_cli("embed", "--config", TINY_DIT, "--workdir", wd, "--trigger", "random:1",
              "--watermark", "keyed:2", "--key", "77", "--block", "2", "--steps", "3",
              "--robust", "finetune", "--robust-steps", "2", "--set", "train.log_every=1",
              "--no-progress")
  assert r.returncode == 0, r.stderr
  assert json.load(open(os.path.join(wd, "embedding.json")))["robust"] == {
    "kind": "finetune", "steps": 2, "lr": 3e-3, "weight": 1.0, "order": "first"}
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  assert all(row["inner_moved"] > 0 and "watermark_loss_after" in row for row in rows)
  wd = str(tmp_path / "fisher")
  r = run_cli("embed", "--base", embedded, "--workdir", wd, "--trigger", "random:1",
              "--watermark", "keyed:2", "--key", "77", "--block", "2", "--steps", "2",
              "--robust", "fisher", "--robust-weight", "0.01", "--set", "train.log_every=1",
              "--no-progress")
  assert r.returncode == 0, r.stderr
  assert json.load(open(os.path.join(wd, "embedding.json")))["robust"]["kind"] == "fisher"
  rows = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
  assert rows[0]["anchor_penalty"] == 0.0 < rows[-1]["anchor_penalty"]  # starts at the base


def test_gradient_surgery_removes_only_the_conflicting_component(tiny_models):
  """surgery_loss: the joint value, and the gradient g + g_w - min(0, g_w.g)/|g|^2 g through
  its linear surrogate; after the projection nothing of g_w points against g."""
  from wdmjax.watermark.robust import surgery_loss

  model, sched, secret, trigger, _, params = tiny_models
  p0 = params["watermarked"]
  batch, task = _digits_batch_and_task(model, sched)
  wm_only = wdp_loss(apply_fn_for(model), sched, "eps", task=False, trigger=trigger,
                     watermark=keyed_targets(make_watermark("keyed:2", SHAPE, 2), 3, 2),
                     gamma1=secret.gamma1, gamma2=secret.gamma2, class_dropout_prob=0.1,
                     null_label=-1, num_classes=10)
  rng = jax.random.PRNGKey(4)
  loss = surgery_loss(task, wm_only)
  (value, metrics), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(p0, batch, rng)
  r_task, r_wm = jax.random.split(rng)
  g_t = jax.grad(lambda q: task(q, batch, r_task)[0])(p0)
  g_w = jax.grad(lambda q: wm_only(q, batch, r_wm)[0])(p0)
  flat = lambda t: np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(t)])  # noqa: E731
  gt, gw = flat(g_t), flat(g_w)
  want = gt + gw - min(0.0, gw @ gt) / (gt @ gt) * gt
  np.testing.assert_allclose(flat(grad), want, atol=1e-5 * np.abs(want).max())
  assert (flat(grad) - gt) @ gt >= -1e-6 * np.linalg.norm(gt) ** 2  # no conflict is left
  assert math.isclose(float(value), float(task(p0, batch, r_task)[0])
                      + float(wm_only(p0, batch, r_wm)[0]), rel_tol=1e-5)
  assert -1.0 <= float(metrics["conflict"]) <= 0.0


def test_verify_model_tests_given_samples_as_its_own(tiny_models):
  """Samples already extracted with the same trigger, sampler, steps and seed give the
  report that verify_model draws itself; samples of another shape are one clear error."""
  from wdmjax.configs import load_config

  params = tiny_models[-1]["watermarked"]
  cfg = load_config(TINY_DIT, [])
  secret = tiny_models[2]
  trigger, _, _ = secret.images(SHAPE)
  drawn = runs.extract_samples(cfg, params, trigger, secret.gamma1, 8, steps=10, seed=3)
  own = runs.verify_model(cfg, params, secret, num=8, steps=10, seed=3)
  given = runs.verify_model(cfg, params, secret, num=8, steps=10, seed=3, samples=drawn)
  assert given == own
  with pytest.raises(WdmjaxError, match=r"^samples: expected the 8 extracted samples"):
    runs.verify_model(cfg, params, secret, num=8, samples=drawn[:5])
