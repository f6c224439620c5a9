"""The diffusion OOD detector: metrics against scikit-learn, reconstruction scores of a tiny
trained DiT, aggregation and calibration, the baselines, the runs API and the CLI."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from tests.conftest import TINY_DIT, run_cli
from wdmjax import ood, runs
from wdmjax.errors import WdmjaxError
from wdmjax.ood.reconstruction import reconstruction_losses
from wdmjax.runs.ood import unconditional_model


def _score_pairs():
  rng = np.random.default_rng(0)
  yield rng.normal(size=60), rng.normal(0.7, size=45)  # continuous
  yield rng.integers(0, 4, 60).astype(float), rng.integers(1, 5, 45).astype(float)  # ties
  yield np.zeros(10), np.zeros(7)  # everything tied
  yield np.arange(5.0), np.arange(5.0, 9.0)  # perfectly separated


@pytest.mark.parametrize("pair", list(_score_pairs()), ids=["normal", "ties", "all_tied",
                                                            "separated"])
def test_metrics_equal_scikit_learn(pair):
  a, b = pair
  y = np.r_[np.zeros(len(a)), np.ones(len(b))]
  s = np.r_[a, b]
  fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
  assert abs(ood.auroc(a, b) - roc_auc_score(y, s)) < 1e-6
  assert abs(ood.aupr(a, b) - average_precision_score(y, s)) < 1e-6
  assert abs(ood.far95(a, b) - fpr[tpr >= 0.95].min()) < 1e-6
  for level in (0.0, 0.1, 0.5):
    assert abs(ood.tpr_at_fpr(a, b, level) - tpr[fpr <= level].max()) < 1e-6


def test_metrics_keep_float64_ties_and_large_sets():
  # Scores a float32 copy would merge stay distinct; n0 * n1 beyond 2**31 does not overflow.
  a, b = np.array([1.0, 1.0 + 1e-12]), np.array([1.0 + 2e-12, 1.0 + 5e-13])
  y, s = np.r_[0, 0, 1, 1], np.r_[a, b]
  assert abs(ood.auroc(a, b) - roc_auc_score(y, s)) < 1e-6
  rng = np.random.default_rng(0)
  big_id, big_ood = rng.normal(size=50_000), rng.normal(0.5, size=50_000)
  y = np.r_[np.zeros(50_000), np.ones(50_000)]
  assert abs(ood.auroc(big_id, big_ood) - roc_auc_score(y, np.r_[big_id, big_ood])) < 1e-5


def test_threshold_flags_at_most_the_chosen_share():
  s = np.random.default_rng(1).normal(size=997)
  for fpr in (0.01, 0.05, 0.2):
    thr = ood.threshold_at_fpr(s, fpr)
    assert np.mean(s > thr) <= fpr
    assert np.mean(s >= thr) > fpr  # and no stricter than needed


def test_metrics_refuse_bad_scores():
  with pytest.raises(WdmjaxError, match="scores_ood: expected a non-empty vector"):
    ood.auroc([0.1, 0.2], [])
  with pytest.raises(WdmjaxError, match="scores_id: expected finite scores"):
    ood.far95([0.1, np.nan], [0.3])
  with pytest.raises(WdmjaxError, match="tpr: expected a number in"):
    ood.far_at_tpr([0.1], [0.3], tpr=1.5)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The tiny DiT (8x8 digits, T = 100, label dropout) trained 150 steps."""
  wd = str(tmp_path_factory.mktemp("ood") / "dit")
  runs.train(TINY_DIT, wd, ["train.steps=150", "train.ckpt_every=150"], samples=False,
             progress=False)
  return wd, runs.load_scorer(wd)


def _digits(n=64):
  return ood.load_images("digits", (8, 8, 1), n=n)


def test_training_images_score_lower_than_noise(tiny):
  _, sc = tiny
  x = _digits()
  noise = ood.load_images("uniform", (8, 8, 1), n=64)
  key = jax.random.PRNGKey(0)
  s_id = sc.losses(x, key, t=(30, 60), draws=2).mean(axis=(1, 2))
  s_noise = sc.losses(noise, key, t=(30, 60), draws=2).mean(axis=(1, 2))
  assert np.median(s_id) < np.median(s_noise)
  assert ood.auroc(s_id, s_noise) > 0.9


def test_scores_are_a_function_of_the_key_not_the_batching(tiny):
  _, sc = tiny
  x = _digits(20)
  fn, params, schedule = unconditional_model(sc.setup), sc.params, sc.setup.schedule
  kw = dict(t=(10, 50), draws=2, objective=sc.setup.cfg.diffusion.objective)
  a = reconstruction_losses(fn, params, schedule, x, jax.random.PRNGKey(3), **kw)
  b = reconstruction_losses(fn, params, schedule, x, jax.random.PRNGKey(3), batch_size=7, **kw)
  c = reconstruction_losses(fn, params, schedule, x, jax.random.PRNGKey(4), **kw)
  assert a.shape == (20, 2, 2)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert not np.allclose(np.asarray(a), np.asarray(c))
  score = ood.reconstruction_score(fn, params, schedule, x, jax.random.PRNGKey(3), **kw)
  np.testing.assert_allclose(np.asarray(score), np.asarray(a).mean(axis=(1, 2)), rtol=1e-6)


def test_ddim_reconstruction_and_the_elbo_baseline(tiny):
  _, sc = tiny
  x = _digits(8)
  fn, params, schedule = unconditional_model(sc.setup), sc.params, sc.setup.schedule
  obj = sc.setup.cfg.diffusion.objective
  one = reconstruction_losses(fn, params, schedule, x, jax.random.PRNGKey(0), t=40,
                              objective=obj)
  chain = reconstruction_losses(fn, params, schedule, x, jax.random.PRNGKey(0), t=40,
                                objective=obj, ddim_steps=4)
  assert chain.shape == one.shape == (8, 1, 1)
  assert np.all(np.isfinite(chain)) and not np.allclose(np.asarray(chain), np.asarray(one))
  elbo = ood.elbo_score(fn, params, schedule, x, jax.random.PRNGKey(0), num_t=5, objective=obj)
  assert elbo.shape == (8,) and np.all(np.asarray(elbo) > 0)
  # The eps and vlb metrics read the network's own prediction: clipping x0 changes nothing.
  kw = dict(t=(5, 60), objective=obj, metric="eps")
  np.testing.assert_array_equal(
      np.asarray(reconstruction_losses(fn, params, schedule, x, jax.random.PRNGKey(0), **kw)),
      np.asarray(reconstruction_losses(fn, params, schedule, x, jax.random.PRNGKey(0),
                                       clip=False, **kw)))
  xt, xhat = sc.reconstruct(x, jax.random.PRNGKey(0), t=40, ddim_steps=2)
  assert xt.shape == xhat.shape == x.shape
  with pytest.raises(WdmjaxError, match="ddim_steps: expected 1 with metric 'vlb'"):
    reconstruction_losses(fn, params, schedule, x, jax.random.PRNGKey(0), t=40,
                          metric="vlb", ddim_steps=2)


@pytest.mark.parametrize("t, match", [(0, r"t: expected steps in \[1, 100\]"),
                                      (101, r"t: expected steps in \[1, 100\]"),
                                      ((), "t: expected an integer step or a non-empty list"),
                                      (2.5, "t: expected an integer step")])
def test_bad_steps_refused(tiny, t, match):
  _, sc = tiny
  with pytest.raises(WdmjaxError, match=match):
    sc.losses(_digits(4), jax.random.PRNGKey(0), t=t)


def test_images_of_the_wrong_size_refused(tiny):
  _, sc = tiny
  with pytest.raises(WdmjaxError, match=r"x: expected images of shape \[N, 8, 8, 1\]"):
    sc.losses(np.zeros((3, 28, 28, 1), np.float32), jax.random.PRNGKey(0), t=10)


def test_gaussian_combiner_proxy_and_calibration():
  rng = np.random.default_rng(0)
  ts = (100, 300, 500)
  fit = np.exp(rng.normal(size=(200, 3)) * 0.1)
  cal = np.exp(rng.normal(size=(200, 3)) * 0.1)
  proxy = np.exp(rng.normal(size=(200, 3)) * 0.1 + 0.5)
  det, rows = ood.select(ts, fit, cal, proxy)
  assert [r["detector"] for r in rows] == ["t=100", "t=300", "t=500", "mean", "gaussian"]
  single, _ = ood.select(ts, fit, cal, proxy, aggregation="single")
  best = max(rows[:3], key=lambda r: r["proxy_auroc"])["detector"]
  assert single.aggregation == "single" and single.name == best
  with pytest.raises(WdmjaxError, match="aggregation: expected at least 2 steps t for 'mean'"):
    ood.select((100,), fit[:, :1], cal[:, :1], proxy[:, :1], aggregation="mean")
  assert det.aggregation in ("mean", "gaussian")  # a shift of every step: pooled wins
  det = ood.calibrate(det, cal, 0.1)
  assert np.mean(det.flags(cal)) <= 0.1 and np.mean(det.flags(proxy)) > 0.9
  assert ood.Detector.from_dict(json.loads(json.dumps(det.to_dict()))) == det
  # The combiner also flags inputs reconstructed far better than ID ones.
  g = next(d for d in ood.candidates(ts, fit) if d.aggregation == "gaussian")
  assert np.all(g.score(fit * 1e-3) > np.quantile(g.score(cal), 0.99))
  x = jnp.asarray(rng.normal(size=(3, 8, 8, 1)), jnp.float32)
  p = ood.proxy_outliers(x, jax.random.PRNGKey(0))
  assert p.shape == x.shape and not np.allclose(np.asarray(p), np.asarray(x))
  np.testing.assert_allclose(np.sort(np.asarray(p).ravel()), np.sort(np.asarray(x).ravel()))


def test_classifier_baselines():
  logits = np.array([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
  np.testing.assert_allclose(ood.msp_score(logits), [-1 / (1 + 2 * np.exp(-10)), -1 / 3],
                             rtol=1e-5)
  np.testing.assert_allclose(ood.energy_score(logits),
                             [-np.log(np.exp(10) + 2), -np.log(3 * np.e)], rtol=1e-5)
  rng = np.random.default_rng(0)
  f = np.r_[rng.normal(0, 1, (100, 4)), rng.normal(5, 1, (100, 4))]
  y = np.r_[np.zeros(100, int), np.ones(100, int)]
  fit = ood.fit_mahalanobis(f, y)
  near, far = ood.mahalanobis_score(fit.means, fit), ood.mahalanobis_score(f[:1] + 40, fit)
  np.testing.assert_allclose(near, 0, atol=1e-9)
  assert far[0] > 100
  from wdmjax.models import LeNet
  model = LeNet(num_classes=3)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))["params"]
  logits, feats = ood.lenet_outputs(model, params, np.zeros((5, 28, 28, 1)), batch_size=2)
  assert logits.shape == (5, 3) and feats.shape == (5, 84) and np.all(feats >= 0)


def test_sets_are_offline_and_fitted():
  for name in ood.OOD_SETS:
    x = ood.load_images(name, (8, 8, 1), n=5)
    assert x.shape == (5, 8, 8, 1) and x.dtype == np.float32
    assert x.min() >= -1 and x.max() <= 1
  assert ood.load_images("digits@3", (8, 8, 3), n=4).shape == (4, 8, 8, 3)
  with pytest.raises(WdmjaxError, match="data: expected an embedded data set"):
    ood.load_images("no_such_set", (8, 8, 1))
  with pytest.raises(WdmjaxError, match="data: no images of classes @12"):
    ood.load_images("digits@12", (8, 8, 1))
  with pytest.raises(WdmjaxError, match="data: expected classes like"):
    ood.load_images("digits@3-", (8, 8, 1))
  assert ood.load_images("gray_crops", (256, 256, 1), n=2).shape == (2, 256, 256, 1)


def test_runs_score_and_eval(tiny, tmp_path):
  wd, _ = tiny
  common = dict(t=(20, 60), draws=1, val="digits:train[:300]", val_n=40, fpr=0.1)
  rep = runs.ood_score(wd, data="uniform", n=16, out=str(tmp_path / "s.json"), **common)
  assert rep["num_images"] == 16 and rep["flagged"] >= 12
  assert rep["val_is_training_data"] is False
  assert json.load(open(tmp_path / "s.json"))["images"][0]["image"] == "uniform#0"
  ev = runs.ood_eval(wd, "digits:train[300:]", ["uniform", "gaussian"], n=40, **common)
  assert [r["data"] for r in ev["rows"]] == ["uniform", "gaussian"]
  assert all(r["auroc"] > 0.9 for r in ev["rows"])
  assert ev["id"]["flagged"] < 0.4
  with pytest.raises(WdmjaxError, match=r"images: expected an array \[N, H, W, C\] of finite"):
    runs.ood_score(wd, images=np.full((2, 8, 8, 1), 255.0), **common)
  with pytest.raises(WdmjaxError, match=r"images: expected \[N, 8, 8, 1\] \(the model's"):
    runs.ood_score(wd, images=np.zeros((2, 28, 28, 1)), **common)
  with pytest.raises(WdmjaxError, match="n: expected only with data"):
    runs.ood_score(wd, images=np.zeros((2, 8, 8, 1)), n=1, **common)
  with pytest.raises(WdmjaxError, match="aggregation: expected at least 2 steps t for 'mean'"):
    runs.ood_score(wd, data="uniform", **{**common, "t": 20}, aggregation="mean")


def test_cli_score_images_and_bad_input(tiny, tmp_path):
  wd, _ = tiny
  d = tmp_path / "imgs"
  d.mkdir()
  x = ood.load_images("digits", (8, 8, 1), n=3)
  for i, im in enumerate(x):
    Image.fromarray(np.uint8((im[..., 0] + 1) * 127.5)).save(d / f"{i}.png")
  Image.fromarray(np.zeros((8, 8), np.uint8) + 255).save(d / "white.png")
  os.mkfifo(d / "fifo.png")  # skipped, never opened (opening it would block)
  args = ("--t", "20,60", "--draws", "1", "--val-n", "40", "--val", "digits:train[:300]")
  r = run_cli("ood", "score", "--workdir", wd, "--images", d, *args)
  assert r.returncode == 0, r.stderr
  assert "flagged" in r.stdout and "white.png" in r.stdout
  r = run_cli("ood", "score", "--workdir", wd, "--images", d, "--json", *args)
  rep = json.loads(r.stdout)
  assert len(rep["images"]) == 4
  r = run_cli("ood", "eval", "--workdir", wd, "--id", "digits:train[300:]", "--ood", "uniform",
              "--n", "30", *args)
  assert r.returncode == 0, r.stderr
  assert "| uniform | 30 |" in r.stdout
  # Bad input: one line each, naming the flag.
  empty = tmp_path / "empty"
  empty.mkdir()
  wrong = tmp_path / "wrong"
  wrong.mkdir()
  Image.fromarray(np.zeros((28, 28), np.uint8)).save(wrong / "big.png")
  fifos = tmp_path / "fifos"
  fifos.mkdir()
  os.mkfifo(fifos / "b.png")
  r = run_cli("ood", "score", "--workdir", wd, "--data", "uniform", "--n", "4", "--val-n", "8",
              "--draws", "1")  # default steps: 10%, ..., 90% of this model's T = 100
  assert r.returncode == 0 and "over t=10,30,50,70,90" in r.stdout, r.stderr
  for argv, msg in [
      (("--images", empty), "--images: expected .png or .jpg files"),
      (("--images", wrong), "--images: expected 8x8 images with 1 channel"),
      (("--data", "uniform", "--t", "0"), r"--t: expected steps in [1, 100]"),
      (("--data", "uniform", "--t", "101"), r"--t: expected steps in [1, 100]"),
      (("--data", "nothing_here"), "--data: expected an embedded data set"),
      (("--data", "uniform", "--fpr", "1.5"), "--fpr: expected a number in (0, 1)"),
      (("--images", fifos), "--images: expected .png or .jpg files in"),
      (("--data", "uniform", "--t", "10,10"), "--t: expected distinct steps"),
      (("--data", "uniform", "--show", "-1"), "--show: expected a number of rows >= 0"),
      (("--data", "uniform", "--n", "10000000000"), "--n: expected an integer in [1, "),
      (("--data", "uniform", "--data-dir", d / "0.png"), "--data-dir: expected a directory"),
  ]:
    before = sorted(os.listdir(tmp_path))
    r = run_cli("ood", "score", "--workdir", wd, *argv)
    assert r.returncode == 2, (argv, r.stdout)
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(os.listdir(tmp_path)) == before
  r = run_cli("ood", "score", "--workdir", wd, "--data", "uniform", "--t", "1,x")
  assert r.returncode == 2 and "--t" in r.stderr and "Traceback" not in r.stderr
  r = run_cli("ood", "eval", "--workdir", wd, "--id", "uniform", "--ood", "uniform")
  assert r.returncode == 2 and "--ood: expected data sets different" in r.stderr
  r = run_cli("ood", "score", "--workdir", tmp_path / "none", "--data", "uniform")
  assert r.returncode == 2 and "--workdir" in r.stderr
