"""DDIM inversion, Tree-Ring and Gaussian Shading: inversion recovers x_T, each watermark
detects its own samples and not others, Gaussian Shading's noise is Gaussian and its test
exact, Tree-Ring's Gaussian null calibrated, bad input refused in one line."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from tests.conftest import TINY_DIT
from wdmjax import diffusion as d
from wdmjax.diffusion.inversion import ddim_invert, generate, invert
from wdmjax.errors import WdmjaxError
from wdmjax.noisemark import gaussian_shading as gs
from wdmjax.noisemark import tree_ring as tr
from wdmjax.stats.noncentral import ncx2_log10_cdf

SHAPE = (28, 28, 1)
STEPS = 10


@pytest.fixture(scope="module")
def schedule():
  return d.make_schedule("linear", 1000)


def _posterior_mean_eps(schedule, x, t, shift=0.0):
  """eps of a smooth denoiser shaped like the posterior mean of N(shift, 0.5^2) data."""
  a = schedule.alphas_cumprod[t][:, None, None, None]
  x0 = 0.5 * jnp.tanh(jnp.sqrt(a) * 0.5 * (x - jnp.sqrt(a) * shift) / (0.25 * a + 1 - a))
  return d.eps_from_x0(schedule, x0 + shift, x, t)


def _smooth_model(params, x, t, y):
  """A smooth conditional eps-network: `_posterior_mean_eps` with a label-dependent mean."""
  shift = params * 0.1 * y.astype(x.dtype)[:, None, None, None]
  return _posterior_mean_eps(d.make_schedule("linear", 1000), x, t, shift)


@pytest.mark.parametrize("iters,tol", [(0, 2.0), (10, 0.02)])
def test_inversion_of_a_ddim_sample_recovers_x_T(schedule, iters, tol):
  den = functools.partial(_posterior_mean_eps, schedule)
  x_T = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
  x0 = d.ddim_sample(den, schedule, x_T, steps=50)
  rec = ddim_invert(den, schedule, x0, steps=50, fixed_point_iters=iters)
  err = float(jnp.abs(rec - x_T).max())
  assert err < tol, err
  if iters == 0:
    assert err > 0.5  # the usual inversion is approximate: the refinement is what is exact


def test_guided_inversion_through_the_jitted_entry_points(schedule):
  y = jnp.array([1, 2, 3, 4])
  kw = dict(steps=50, y=y, guidance_scale=1.5, null_label=0, clip_denoised=False)
  x_T = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  x0 = generate(_smooth_model, jnp.float32(1.0), schedule, x_T, **kw)
  rec = invert(_smooth_model, jnp.float32(1.0), schedule, x0, fixed_point_iters=10, **kw)
  err = jnp.abs(rec - x_T)
  assert float(err.mean()) < 5e-3 and float(err.max()) < 0.1, err  # slowest where |x_T| > 2.5
  unguided = invert(_smooth_model, jnp.float32(1.0), schedule, x0, steps=50, y=y,
                    clip_denoised=False, fixed_point_iters=10)
  assert float(jnp.abs(unguided - x_T).max()) > 1e-2  # the guidance is really applied


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
  from wdmjax.runs.demo import base_workdir
  from wdmjax.runs.model import load_model
  from wdmjax.train import setup
  m = load_model(base_workdir(str(tmp_path_factory.mktemp("nm") / "base")))
  su = setup(m.cfg)
  y = jnp.full((16,), su.null_label, jnp.int32)
  kw = dict(steps=STEPS, objective=m.cfg.diffusion.objective, y=y)
  gen = lambda x_T: generate(su.model_fn, m.params, su.schedule, x_T, **kw)
  inv = lambda x: invert(su.model_fn, m.params, su.schedule, x, fixed_point_iters=2, **kw)
  return gen, inv


@pytest.fixture(scope="module")
def inverted(demo_model):
  """Inverted noise of 16 clean, 16 Tree-Ring and 16 Gaussian Shading samples of the demo DiT."""
  gen, inv = demo_model
  trk = tr.make_key(1, SHAPE, radius=8, channel=0, inner=3)
  gsk = gs.make_key(2, SHAPE, block=4)
  r = jax.random.key(5)
  clean = gen(jax.random.normal(r, (16, *SHAPE)))
  x_tr = gen(tr.watermark_noise(r, trk, 16, SHAPE))
  x_gs = gen(gs.watermark_noise(r, gsk, 16))
  return trk, gsk, clean, {k: inv(v) for k, v in [("clean", clean), ("tr", x_tr), ("gs", x_gs)]}


def test_inversion_reconstructs_images_of_the_trained_dit(demo_model, inverted):
  gen, _ = demo_model
  clean, z = inverted[2], inverted[3]["clean"]
  # 10 steps, 2 refinements: the image comes back to 0.06 RMS (of a range of 2).
  assert float(jnp.sqrt(((gen(z) - clean) ** 2).mean())) < 0.06


def test_tree_ring_detects_its_samples_and_not_others(inverted):
  trk, _, _, z = inverted
  for null in tr.NULLS:
    own = tr.log10_p_values(z["tr"], trk, null)
    for other in ("clean", "gs"):
      lp = tr.log10_p_values(z[other], trk, null)
      assert np.median(own) < np.median(lp) - 2.0, (null, own, lp)
  assert np.median(tr.distances(z["tr"], trk)) < np.median(tr.distances(z["clean"], trk))


def test_gaussian_shading_detects_its_samples_and_not_others(inverted):
  _, gsk, _, z = inverted
  acc, lp = gs.detect(z["gs"], gsk)
  assert np.median(acc) > 0.7 and np.median(lp) < -3, (acc, lp)
  for other in ("clean", "tr"):
    acc_o, lp_o = gs.detect(z[other], gsk)
    assert 0.3 < np.median(acc_o) < 0.7 and np.median(lp_o) > -1.5, (acc_o, lp_o)


def test_gaussian_shading_noise_is_gaussian():
  keys = [gs.make_key(s, (8, 8, 4), block=2, channel_factor=2) for s in range(300)]
  pos = np.array([float(gs.watermark_noise(jax.random.key(s), k, 1)[0, 3, 5, 1])
                  for s, k in enumerate(keys)])  # one position across keys
  assert sps.kstest(pos, "norm").pvalue > 1e-3
  pooled = np.concatenate([np.asarray(gs.watermark_noise(jax.random.key(s), k, 1)).ravel()
                           for s, k in enumerate(keys[:100])])
  assert sps.kstest(pooled, "norm").pvalue > 1e-3  # every position of 100 keys pooled


def test_gaussian_shading_test_is_exact_on_unwatermarked_images(inverted):
  """Over keys, the agreement of any image is Binomial(K, 1/2): p-values super-uniform within
  the DKW band at every level the test can reach."""
  z = inverted[3]["clean"]
  # One image per key, so the p-values are independent (images of one key are not).
  lps = np.concatenate([gs.detect(z[s % 16:s % 16 + 1], gs.make_key(s, SHAPE, block=4))[1]
                        for s in range(1500)])
  n, k_bits = lps.size, 49
  band = math.sqrt(math.log(2 / 1e-3) / (2 * n))
  for k in range(25, 40):
    level = sps.binom.sf(k - 1, k_bits, 0.5)
    emp = np.mean(lps <= math.log10(level) + 1e-4)  # p-values are float32
    assert abs(emp - level) <= band, (k, emp, level, band)


def test_tree_ring_gaussian_null_is_calibrated_on_gaussian_noise():
  key = tr.make_key(3, SHAPE, radius=5, channel=0)
  x = jax.random.normal(jax.random.key(9), (400, *SHAPE))
  p = 10.0 ** tr.log10_p_values(x, key)
  assert sps.kstest(p, "uniform").pvalue > 1e-3
  # ... and the key's own noise is far in the tail.
  assert tr.log10_p_values(tr.inject(x[:4], key), key).max() < -20


def test_tree_ring_injection_writes_the_key_and_keeps_the_noise_real():
  key = tr.make_key(4, (16, 16, 2), radius=3, channel=1)
  x = tr.watermark_noise(jax.random.key(2), key, 3, (16, 16, 2))
  f = np.fft.fft2(np.asarray(x[..., 1], np.float64))
  np.testing.assert_allclose(f[:, key.mask].real, np.broadcast_to(key.values[key.mask], (3,
                             key.mask.sum())), atol=1e-3)
  np.testing.assert_allclose(f[:, key.mask].imag, 0, atol=1e-3)
  assert key.mask[0, 0] and key.mask[0, 3] and not key.mask[0, 4]


@pytest.mark.parametrize("x,dof,nc", [(5, 10, 3), (1, 10, 30), (300, 100, 200), (2, 3, 0)])
def test_noncentral_chi2_matches_scipy(x, dof, nc):
  want = (sps.ncx2.logcdf(x, dof, nc) if nc else sps.chi2.logcdf(x, dof)) / math.log(10)
  assert abs(ncx2_log10_cdf(x, dof, nc) - want) < 1e-9
  assert math.isfinite(ncx2_log10_cdf(1e-3, 81, 3e4))  # where scipy underflows to -inf


@pytest.mark.parametrize("call,names", [
    (lambda: tr.make_key(0, SHAPE, radius=14), "radius"),
    (lambda: tr.make_key(0, SHAPE, radius=3, channel=1), "channel"),
    (lambda: tr.log10_p_values(jnp.zeros((1, *SHAPE)), tr.make_key(0, SHAPE, 3), "chi"),
     "null"),
    (lambda: gs.make_key(0, SHAPE, block=5), "block"),
    (lambda: gs.make_key(0, (8, 8, 4), channel_factor=3), "channel_factor"),
    (lambda: gs.make_key(0, SHAPE, message=np.ones(10)), "message"),
    (lambda: gs.make_key(-1, SHAPE), "seed"),
    (lambda: gs.detect(jnp.zeros((1, 8, 8, 1)), gs.make_key(0, SHAPE)), "x_T"),
    (lambda: invert(_smooth_model, 0.5, d.make_schedule("linear", 1000),
                    jnp.zeros((1, 8, 8, 1)), y=jnp.zeros(1, jnp.int32), fixed_point_iters=-1),
     "fixed_point_iters"),
    (lambda: invert(_smooth_model, 0.5, d.make_schedule("linear", 1000),
                    jnp.zeros((1, 8, 8, 1)), steps=0, y=jnp.zeros(1, jnp.int32)), "steps"),
    (lambda: invert(_smooth_model, 0.5, d.make_schedule("linear", 1000), jnp.zeros((8, 8, 1))),
     "images"),
])
def test_bad_input_is_refused_in_one_line(call, names):
  with pytest.raises(WdmjaxError, match=names) as e:
    call()
  assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- the benchmark


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (57, 1000)])
def test_clopper_pearson_matches_scipy(k, n):
  from wdmjax.stats.rates import clopper_pearson, rate_at
  ci = sps.binomtest(k, n).proportion_ci(0.95, method="exact")
  np.testing.assert_allclose(clopper_pearson(k, n), (ci.low, ci.high), atol=1e-9)
  lp = np.log10(np.r_[np.full(k, 1e-5), np.full(n - k, 0.5)])
  r = rate_at(lp, 1e-4)
  assert (r["k"], r["n"]) == (k, n) and r["low"] <= k / n <= r["high"]


def test_image_attack_chains_parse_and_apply():
  from wdmjax.attacks.image import apply_image_attack, parse_image_attack
  chain = parse_image_attack("jpeg:50+crop:0.8+none")
  assert [str(a) for a in chain] == ["jpeg:50", "crop:0.8", "none"]
  x = np.asarray(jax.random.uniform(jax.random.key(0), (2, 16, 16, 1), minval=-1, maxval=1))
  y = apply_image_attack(chain, x, jax.random.key(1))
  assert y.shape == x.shape and 0 < np.abs(y - x).mean() < 1
  np.testing.assert_array_equal(apply_image_attack(parse_image_attack("none"), x,
                                                   jax.random.key(1)), x)


def test_empirical_thresholds_keep_their_fpr_under_ties():
  from wdmjax.stats.rates import empirical_tpr
  rng = np.random.default_rng(0)
  flat = np.zeros(1000)  # a test whose clean p-values are all 1: nothing can be flagged
  assert empirical_tpr(np.zeros(50), flat, 0.01)["rate"] == 0.0
  assert empirical_tpr(np.full(50, -1.0), flat, 0.01)["rate"] == 1.0
  # a discrete statistic (binomial log10 p of 48 bits): heavy ties at every threshold
  null = np.round(rng.normal(size=10000), 1)
  for f in (0.01, 0.001, 0.3):
    r = empirical_tpr(null, null, f)
    assert r["rate"] <= f, (f, r)
  continuous = rng.normal(size=10000)
  assert empirical_tpr(continuous, continuous, 0.01)["k"] == 100  # exactly k without ties
  assert empirical_tpr(np.zeros(3), flat[:50], 0.01) is None  # 50 null images cannot set 1%


def test_attacks_vmapped_over_strengths_equal_one_call_each():
  from wdmjax.attacks.image import apply_image_attack, apply_image_attacks, parse_image_attack
  names = ["noise:0.1", "jpeg:50", "rotate:10", "noise:0.05", "brightness:0.3", "contrast:0.6",
           "rotate:-20", "blur:1", "none", "noise:0.1+blur:1"]
  chains = [parse_image_attack(n) for n in names]
  keys = [jax.random.fold_in(jax.random.key(1), i) for i in range(len(names))]
  x = np.asarray(jax.random.uniform(jax.random.key(0), (3, 16, 16, 1), minval=-1, maxval=1))
  for name, chain, k, y in zip(names, chains, keys, apply_image_attacks(chains, x, keys),
                               strict=True):
    # rotate: its angle traced rather than folded into the constants (float32 rounding)
    np.testing.assert_allclose(y, apply_image_attack(chain, x, k), atol=1e-5, err_msg=name)
  with pytest.raises(WdmjaxError, match="keys: expected one per chain"):
    apply_image_attacks(chains, x, keys[:2])


@pytest.mark.parametrize("text", ["jpeg:0", "jpeg:9.5", "crop:0", "crop:1.5", "blur:-1",
                                  "none:1", "sharpen:2", "noise:nan", "regen:0", "", "jpeg"])
def test_bad_image_attacks_are_refused(text):
  from wdmjax.attacks.image import parse_image_attack
  with pytest.raises(WdmjaxError, match="attack") as e:
    parse_image_attack(text)
  assert "\n" not in str(e.value)


def test_regeneration_with_an_oracle_returns_its_data(schedule):
  from wdmjax.diffusion.inversion import regenerate

  def oracle(params, x, t, y):  # a model whose data is the constant 0.3
    return d.eps_from_x0(schedule, jnp.full_like(x, 0.3), x, t)

  x = jax.random.uniform(jax.random.key(0), (2, 8, 8, 1), minval=-1, maxval=1)
  out = regenerate(oracle, None, schedule, x, 400, jax.random.key(1), steps=5)
  np.testing.assert_allclose(out, 0.3, atol=1e-4)
  with pytest.raises(WdmjaxError, match="t: expected"):
    regenerate(oracle, None, schedule, x, 1000, jax.random.key(1))


def test_evaluate_command_end_to_end(tmp_path):
  from tests.conftest import run_cli
  from wdmjax import runs
  base = runs.base_workdir(str(tmp_path / "base")).path
  out = tmp_path / "bench"
  r = run_cli("evaluate", "--out", out, "--methods", "tree_ring,gaussian_shading",
              "--workdir", base, "--regen-workdir", base, "--regen-steps", 2,
              "--num", 4, "--num-null", 8, "--steps", 2,
              "--inversion-iters", 0, "--attacks", "none,jpeg:50,regen:300",
              "--fprs", "0.5,1e-6")
  assert r.returncode == 0, r.stderr
  rep = __import__("json").loads((out / "benchmark.json").read_text())
  assert {row["method"] for row in rep["rows"]} == {"tree_ring", "tree_ring_published",
                                                    "gaussian_shading"}
  assert len(rep["rows"]) == 3 * 3 and rep["calibration"]["gaussian_shading"]["0.5"]["n"] == 8
  assert rep["rows"][0]["tpr_empirical"]["1e-06"] is None  # 8 null images cannot set it
  # each attack is also applied to 4 (= num) unwatermarked images: their FPR under it
  assert all(row["fpr_attacked"]["0.5"]["n"] == 4 for row in rep["rows"])
  assert "False positives under attack" in (out / "benchmark.md").read_text()
  with np.load(out / "scores.npz") as sc:  # the rates recompute from the saved scores
    assert sc["gaussian_shading|null"].shape == (8,)
    row = next(x for x in rep["rows"] if x["method"] == "gaussian_shading"
               and x["attack"] == "jpeg:50")
    assert row["tpr"]["0.5"]["k"] == int(np.sum(sc["gaussian_shading|jpeg:50"] <= np.log10(0.5)))
    assert sc["gaussian_shading|jpeg:50|null"].shape == (4,)
  assert (out / "benchmark.md").read_text().count("| tree_ring |") >= 3
  assert (out / "samples.png").stat().st_size > 0
  assert "TPR at FPR 1e-06" in r.stdout and "FPR of attacked unwatermarked" in r.stdout


@pytest.mark.parametrize("args,flag", [
    (["--methods", "stable_signature"], "--signature-workdir"),
    (["--methods", "tree_ring,nope"], "--methods"),
    (["--attacks", "jpeg:200"], "--attacks"), (["--num", "0"], "--num"),
    (["--fprs", "2"], "--fprs"), (["--steps", "5000"], "--steps"),
    (["--attacks", "none,regen:300"], "--attacks"), (["--regen-workdir", "nowhere"],
                                                     "--regen-workdir")])
def test_evaluate_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, args, flag):
  from tests.conftest import run_cli
  out = tmp_path / "bench"
  r = run_cli("evaluate", "--out", out, "--num-null", 4, "--num", 2, *args)
  assert r.returncode == 2 and flag in r.stderr and len(r.stderr.strip().splitlines()) == 1, \
      r.stderr
  assert not out.exists()


def test_evaluate_wdm_rows_on_a_briefly_watermarked_model(tmp_path):
  """The WDM family end to end on a 2-step embedding (too short to learn the mark: the rows
  and the calibration must be there, the detection is not the point)."""
  from wdmjax import runs
  from wdmjax.runs.evaluate import evaluate
  from wdmjax.workdir import Workdir
  base = runs.base_workdir(str(tmp_path / "base"))
  runs.embed(str(tmp_path / "wm"), runs.DEMO_SECRET, base=base.path, steps=2, progress=False)
  r = evaluate(str(tmp_path / "bench"), ["wdm"], ["none", "blur:1"], workdir=base.path,
               wdm_workdir=str(tmp_path / "wm"), model_attacks=["prune:0.3"], num=8,
               num_null=8, steps=2, wdm_group=4, wdm_null=8, fprs=[0.5], progress=False)
  rows = {(x["method"], x["attack"]) for x in r.report["rows"]}
  assert rows == {(m, a) for m in ("wdm", "wdm_vote4")
                  for a in ("none", "blur:1", "model prune:0.3")}
  by = {(x["method"], x["attack"]): x for x in r.report["rows"]}
  assert by[("wdm", "blur:1")]["fpr_attacked"]["0.5"]["n"] == 8
  assert by[("wdm_vote4", "blur:1")]["fpr_attacked"]["0.5"]["n"] == 2
  assert "fpr_attacked" not in by[("wdm", "model prune:0.3")]  # no clean twin of a weight edit
  assert r.report["calibration"]["wdm"]["0.5"]["n"] == 8
  assert r.report["calibration"]["wdm_vote4"]["0.5"]["n"] == 2
  assert 0 <= r.report["quality"]["wdm"]["ssim"] <= 1
  # made before evaluate: its cost is the time its embedding recorded
  recorded = Workdir(str(tmp_path / "wm")).read_json(Workdir.SUMMARY)["seconds"]
  assert r.report["cost"]["wdm"]["embed_seconds"] == recorded > 0


def test_noise_marks_on_a_unet_regenerated_by_a_dit(tmp_path):
  """The same evaluation on a UNet (tiny, at its initial weights: a smooth network, so DDIM
  inverts it closely and both marks must come back), with the tiny DiT as the second clean
  model of the regeneration attack."""
  from wdmjax.configs import load_config
  from wdmjax.configs.schema import default_config, merge, validate
  from wdmjax.runs.evaluate import evaluate
  from wdmjax.train import setup
  from wdmjax.train.export import workdir_from_params
  cfg = validate(merge(default_config(), dict(
      data=dict(name="digits", resolution=16, channels=1),
      model=dict(name="unet", ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                 dropout=0.0, num_classes=10, class_dropout_prob=0.1, num_groups=4),
      diffusion=dict(num_timesteps=100), train=dict(steps=1), sample=dict(steps=10))))
  unet, dit = tmp_path / "unet", tmp_path / "dit"
  workdir_from_params(cfg, setup(cfg).init_params(jax.random.PRNGKey(0)), unet, 1)
  dcfg = load_config(TINY_DIT, ["data.resolution=16"])  # 16 bits of Gaussian Shading
  workdir_from_params(dcfg, setup(dcfg).init_params(jax.random.PRNGKey(1)), dit, 1)
  r = evaluate(str(tmp_path / "bench"), ["tree_ring", "gaussian_shading"],
               ["none", "regen:50"], workdir=str(unet), regen_workdir=str(dit), num=8,
               num_null=16, steps=5, inversion_iters=3, fprs=[1e-2], progress=False)
  rows = {(x["method"], x["attack"]): x for x in r.report["rows"]}
  assert set(rows) == {(m, a) for m in ("tree_ring", "tree_ring_published", "gaussian_shading")
                       for a in ("none", "regen:50")}
  assert rows[("gaussian_shading", "none")]["tpr"]["0.01"]["rate"] == 1.0
  assert rows[("tree_ring", "none")]["tpr"]["0.01"]["rate"] == 1.0
  assert r.report["calibration"]["gaussian_shading"]["0.01"]["k"] <= 2
