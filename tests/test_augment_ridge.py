"""Linear augmentations in over-parametrized ridge regression (wdmjax.augment.ridge): the
estimator against numpy, the exact span statement for label-preserving maps, mixup as a
regulariser, and the argument checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wdmjax.augment.ridge import (
  augment_label_preserving,
  augment_mixup,
  error_curves,
  fixed_space_projector,
  flip_matrix,
  label_preserving_drop,
  matching_ridge_strength,
  mixup_norm_factor,
  random_problem,
  ridge,
  ridge_path,
  symmetric_beta,
)
from wdmjax.errors import WdmjaxError

H, W = 4, 6  # p = 24: small images keep every compilation short
P = H * W


def _data(n: int, p: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, p)), rng.normal(size=n)


@pytest.mark.parametrize("n", [10, 40])  # n < p (dual form) and n > p
def test_ridge_matches_the_normal_equations_and_the_dual_form(n):
  X, y = _data(n, 30)
  with jax.enable_x64(True):
    for lam in (0.01, 0.7):
      got = np.asarray(ridge(X, y, lam))
      primal = np.linalg.solve(X.T @ X + n * lam * np.eye(30), X.T @ y)
      np.testing.assert_allclose(got, primal, rtol=1e-9, atol=1e-12)
      if n < 30:
        dual = X.T @ np.linalg.solve(X @ X.T + n * lam * np.eye(n), y)
        np.testing.assert_allclose(got, dual, rtol=1e-9, atol=1e-12)
    path = np.asarray(ridge_path(X, y, jnp.array([0.01, 0.7])))
    np.testing.assert_allclose(path[1], np.asarray(ridge(X, y, 0.7)), rtol=1e-12)


def test_lam_zero_is_the_minimum_norm_interpolator():
  X, y = _data(10, 30)
  with jax.enable_x64(True):
    b = np.asarray(ridge(X, y, 0.0))
    np.testing.assert_allclose(b, np.linalg.lstsq(X, y, rcond=None)[0], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(X @ b, y, atol=1e-10)  # interpolates
    # rank-deficient data (every point twice, labels consistent): still the pseudo-inverse
    X2, y2 = np.vstack([X, X]), np.concatenate([y, y])
    np.testing.assert_allclose(np.asarray(ridge(X2, y2, 0.0)), np.linalg.pinv(X2) @ y2,
                               rtol=1e-9, atol=1e-12)
    # the ridgeless limit is continuous: a tiny lam is within O(lam) of it
    np.testing.assert_allclose(np.asarray(ridge(X, y, 1e-9)), b, atol=1e-6)


def test_a_flip_preserves_the_labels_of_an_invariant_beta():
  with jax.enable_x64(True):
    hflip, vflip = flip_matrix(H, W), flip_matrix(H, W, "vertical")
    np.testing.assert_array_equal(np.asarray(hflip @ hflip), np.eye(P))
    X, y, beta = random_problem(jax.random.key(0), 8, P, 0.0, invariant=hflip)
    np.testing.assert_allclose(float(jnp.linalg.norm(beta)), 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(hflip @ beta), np.asarray(beta), atol=1e-12)
    np.testing.assert_allclose(np.asarray(X @ hflip.T @ beta), np.asarray(X @ beta),
                               atol=1e-12)
    np.testing.assert_allclose(np.asarray(y), np.asarray(X @ beta), atol=1e-12)  # sigma 0
    assert float(jnp.max(jnp.abs(X @ vflip.T @ beta - X @ beta))) > 0.1  # vflip is not
    # for an orthogonal involution the fixed-space projector is (I + F^T) / 2
    np.testing.assert_allclose(np.asarray(fixed_space_projector(hflip)),
                               (np.eye(P) + np.asarray(hflip).T) / 2, atol=1e-12)
    Xa, ya = augment_label_preserving(X, y, hflip)
    assert Xa.shape == (16, P) and ya.shape == (16,)
    np.testing.assert_allclose(np.asarray(Xa @ beta), np.asarray(ya), atol=1e-12)


def test_the_exact_drop_of_a_label_preserving_point():
  """Noise-free, lam = 0: adding F x lowers ||P_X^perp beta||^2 by <z, beta>^2 / ||z||^2."""
  with jax.enable_x64(True):
    hflip, eye = flip_matrix(H, W), jnp.eye(P)
    flip, dup = [], []
    for key in jax.random.split(jax.random.key(1), 10):
      X, _, beta = random_problem(key, 8, P, 0.0, invariant=hflip)
      flip.append(label_preserving_drop(X, beta, hflip, 3))
      dup.append(label_preserving_drop(X, beta, eye, 3))  # F x = x: in the span
    flip, dup = (jax.tree.map(lambda *v: np.stack(v), *d) for d in (flip, dup))
    meas, pred = np.asarray(flip.measured), np.asarray(flip.predicted)
    assert np.all(pred > 1e-6)
    np.testing.assert_allclose(meas, pred, rtol=1e-5)
    # the error before is ||P_X^perp beta||^2, 1 - n/p = 2/3 on average
    assert 0.5 < float(np.mean(flip.before)) < 0.8
    np.testing.assert_array_equal(np.asarray(dup.predicted), 0.0)
    assert float(np.max(np.abs(dup.measured))) < 1e-12


def test_symmetric_beta_draws_beta_alpha_alpha():
  """Both branches (Joehnk for alpha <= 1/2, the polar method above) against scipy."""
  from scipy import stats  # only this test needs scipy

  keys = jax.random.split(jax.random.key(2), 4)
  for key, alpha in zip(keys, (0.2, 0.5, 1.0, 3.0), strict=True):
    # float64: in float32 the 2% of Beta(0.2, 0.2) within 6e-8 of 1 rounds to 1.0
    with jax.enable_x64(True):
      lam = np.asarray(symmetric_beta(key, alpha, 10_000))
    assert lam.shape == (10_000,) and np.all((lam >= 0) & (lam <= 1))
    assert stats.kstest(lam, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    # E[lam (1 - lam)] = alpha / (2 (2 alpha + 1)), the moment behind mixup_norm_factor
    assert np.mean(lam * (1 - lam)) == pytest.approx(alpha / (2 * (2 * alpha + 1)), rel=0.04)


def test_matching_ridge_strength():
  assert matching_ridge_strength(0.3, 32, 0, 1.0) == 0.3
  assert matching_ridge_strength(0.0, 32, 64, 1.0) == 0.0
  # alpha = 1: lam ~ U(0, 1), c = E[lam^2 + (1 - lam)^2] = 2/3
  assert mixup_norm_factor(1.0) == pytest.approx(2 / 3)
  assert matching_ridge_strength(0.3, 32, 64, 1.0) == pytest.approx(0.3 * 96 / (32 + 128 / 3))
  for alpha in (0.2, 1.0, 5.0):
    # c against the Beta moments: E[lam^2] = Var + 1/4 = 1 / (4 (2 alpha + 1)) + 1/4
    assert mixup_norm_factor(alpha) == pytest.approx(2 * (1 / (4 * (2 * alpha + 1)) + 0.25))
    for m in (1, 32, 10_000):
      lam_eff = matching_ridge_strength(0.3, 32, m, alpha)
      assert 0.3 < lam_eff < 0.3 / mixup_norm_factor(alpha)


def test_mixup_regularises_like_ridge_at_the_matching_strength():
  """n = 16, p = 32, sigma = 0.5 (the error-minimising lam is about sigma^2 p / n = 0.5);
  m = 2n points mixed with alpha = 1, lam_eff = 1.286 lam; 200 paired problems.
  Measured over 5 seeds: at lam = 0.05 plain ridge's error is 0.013-0.017 above mixup's and
  mixup - (ridge at lam_eff) is -0.34 to -0.40 times that (mixup regularises a bit more than
  lam_eff says); at lam = 2 (above the optimum) mixup is 0.030-0.034 worse than ridge, and
  0.27-0.35 of that is left unexplained by lam_eff. The bound 0.5 fails if lam_eff were lam
  (ratio 1) or 2 lam (0.89 and 1.18 at seed 0). At lam = 0 the errors agree to 1e-14."""
  n, p, m = 16, 32, 32
  lams = np.array([0.0, 0.05, 2.0])
  r = matching_ridge_strength(1.0, n, m, 1.0)
  with jax.enable_x64(True):
    cur = error_curves(jax.random.key(0), n, p, 0.5, np.concatenate([lams, r * lams]),
                       {"ridge": None, "mixup": lambda k, X, y: augment_mixup(k, X, y, m, 1.0)},
                       num_problems=200)
  ridge_e, mixed = np.asarray(cur["ridge"].errors[:, :3]), np.asarray(cur["mixup"].errors[:, :3])
  matched = np.asarray(cur["ridge"].errors[:, 3:])
  # lam = 0: the mixed points are in the span with consistent labels, nothing changes
  np.testing.assert_allclose(mixed[:, 0], ridge_e[:, 0], rtol=1e-9)
  gain = (ridge_e - mixed).mean(0)
  miss = (mixed - matched).mean(0)
  # below the optimum mixup helps, and ridge at lam_eff explains most of the gain
  assert gain[1] > 0.01
  assert abs(miss[1]) < 0.5 * gain[1]
  # above it mixup hurts, as stronger ridge does, again mostly as lam_eff predicts
  assert gain[2] < -0.02
  assert abs(miss[2]) < 0.5 * abs(gain[2])


BAD = [
  (lambda: random_problem(jax.random.key(0), 24, 24, 0.5), "n:"),
  (lambda: random_problem(jax.random.key(0), 4, 24, -0.1), "sigma:"),
  (lambda: random_problem(jax.random.key(0), 4, 24, 0.5, invariant=jnp.eye(5)), "invariant:"),
  (lambda: random_problem(jax.random.key(0), 4, 24, 0.5, invariant=-jnp.eye(24)),
   "invariant:"),
  (lambda: ridge(np.ones((4, 6)), np.ones(4), -1.0), "lam:"),
  (lambda: ridge(np.ones((4, 6)), np.ones(4), float("nan")), "lam:"),
  (lambda: ridge(np.ones((4, 6)), np.ones(5), 0.1), "y:"),
  (lambda: ridge(np.ones(6), np.ones(6), 0.1), "X:"),
  (lambda: ridge_path(np.ones((4, 6)), np.ones(4), np.array([0.1, -0.1])), "lams:"),
  (lambda: augment_label_preserving(np.ones((4, 6)), np.ones(4), np.eye(5)), "F:"),
  (lambda: label_preserving_drop(np.ones((6, 6)), np.ones(6), np.eye(6)), "X:"),
  (lambda: label_preserving_drop(np.ones((4, 6)), np.ones(5), np.eye(6)), "beta:"),
  (lambda: label_preserving_drop(np.ones((4, 6)), np.ones(6), np.eye(6), 4), "index:"),
  (lambda: augment_mixup(jax.random.key(0), np.ones((4, 6)), np.ones(4), -1, 1.0), "m:"),
  (lambda: augment_mixup(jax.random.key(0), np.ones((4, 6)), np.ones(4), 2, 0.0), "alpha:"),
  (lambda: augment_mixup(jax.random.key(0), np.ones((1, 6)), np.ones(1), 2, 1.0), "X:"),
  (lambda: mixup_norm_factor(-1.0), "alpha:"),
  (lambda: symmetric_beta(jax.random.key(0), float("inf"), 3), "alpha:"),
  (lambda: matching_ridge_strength(-0.1, 32, 4, 1.0), "lam:"),
  (lambda: matching_ridge_strength(0.1, 32, -4, 1.0), "m:"),
  (lambda: matching_ridge_strength(0.1, 0, 4, 1.0), "n:"),
  (lambda: matching_ridge_strength(0.1, 32, 4, 0.0), "alpha:"),
  (lambda: error_curves(jax.random.key(0), [4, 30], 24, 0.5, [0.1]), "n:"),
  (lambda: error_curves(jax.random.key(0), 4, 24, 0.5, [[0.1]]), "lams:"),
  (lambda: error_curves(jax.random.key(0), 4, 24, 0.5, [0.1], {"x": 3}), "augments:"),
  (lambda: error_curves(jax.random.key(0), 4, 24, 0.5, [0.1], num_problems=1),
   "num_problems:"),
  (lambda: flip_matrix(4, 6, "diagonal"), "axis:"),
]


@pytest.mark.parametrize("call,name", BAD, ids=[name for _, name in BAD])
def test_bad_arguments_raise_naming_the_argument(call, name):
  with pytest.raises(WdmjaxError, match=f"^{name}"):
    call()
