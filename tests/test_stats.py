"""Exact binomial tails, thresholds, identification among keys, the multivariate normal CDF."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import binom, multivariate_normal, norm

from wdmjax.errors import WdmjaxError
from wdmjax.stats import (
  binomial_log10_sf,
  exact_binomial_log10_sf,
  identify,
  mvn_cdf,
  threshold_for_fpr,
)

sf_jit = jax.jit(binomial_log10_sf)


@pytest.mark.parametrize("p0", [0.5, 0.1, 0.73])
def test_binomial_tail_matches_scipy_to_1e9(p0):
  ns = [1, 2, 7, 20, 49, 128, 500, 1000]
  k = np.concatenate([np.arange(0, n + 2) for n in ns])  # one call: one compilation
  n = np.repeat(ns, [n + 2 for n in ns])
  with jax.enable_x64(True):
    got = 10.0 ** np.asarray(sf_jit(k, n, p0))
  want = binom.sf(k - 1, n, p0)
  ok = want > 1e-300  # scipy underflows to 0 beyond this
  np.testing.assert_allclose(got[ok], want[ok], rtol=1e-9, atol=0)
  assert np.all(got[k > n] == 0.0)


def test_binomial_tail_in_the_far_tail_and_at_a_million_trials():
  with jax.enable_x64(True):
    assert exact_binomial_log10_sf(4096, 4096) == pytest.approx(4096 * math.log10(0.5))
    k = np.arange(0, 10**6 + 1, 499)
    got = np.asarray(sf_jit(k, 10**6))
    assert np.all(np.isfinite(got))
    assert np.all(np.diff(got) <= 0)  # monotone; the lower half rounds to log10(1) = 0
    tail = got[got < -1e-9]
    assert len(tail) > 900 and np.all(np.diff(tail) < 0)  # strictly where it is not 1
    assert got[-1] < -250_000
  # float32 is approximate but finite.
  got32 = np.asarray(binomial_log10_sf(jnp.arange(0, 50, 7), 49))
  want = np.log10(binom.sf(np.arange(0, 50, 7) - 1, 49, 0.5))
  np.testing.assert_allclose(got32, want, rtol=1e-4, atol=1e-6)


def _scipy_log10_sf(k, n, p0):
  """scipy's log10 P(X >= k), through the lower tail where the upper one is near 1."""
  sf = binom.sf(k - 1, n, p0)
  with np.errstate(divide="ignore"):
    log_sf = np.where(sf > 0.5, np.log1p(-binom.cdf(k - 1, n, p0)), binom.logsf(k - 1, n, p0))
  return log_sf / math.log(10), sf


def test_binomial_tail_without_x64_is_within_1e6_relative():
  """Without x64 (the default): eager calls meet the documented 1e-6, traced float32 ones
  3e-4 at the float32 value of p0; k = 3058, n = 3373, p0 = 0.9 erred 1.3e-3 before."""
  assert not jax.config.jax_enable_x64
  ks, ns, ps = [3058], [3373], [0.9]
  for p0 in (0.5, 0.1, 0.9, 0.999):
    for n in (1, 10, 49, 333, 3373, 100_000):
      k = np.unique(np.linspace(0, n + 1, 25).astype(int))
      ks, ns, ps = ks + list(k), ns + [n] * len(k), ps + [p0] * len(k)
  k, n, p0 = np.asarray(ks), np.asarray(ns), np.asarray(ps)
  got = np.asarray(binomial_log10_sf(k, n, p0))
  assert got.dtype == np.float32
  want, sf = _scipy_log10_sf(k, n, p0)
  # Compared where scipy is exact (sf above its own underflow) and float32 normal.
  ok = (sf > 1e-280) & (np.abs(want) > 1.2e-37)
  assert ok.sum() > 100 and ok[0]
  rel = np.abs(got[ok] - want[ok]) / np.abs(want[ok])
  assert rel.max() <= 1e-6, (k[ok][rel.argmax()], n[ok][rel.argmax()], rel.max())
  assert np.all(got[k > n] == -np.inf) and np.all(got[k <= 0] == 0.0)
  # Constant arguments inside a trace are concrete too.
  np.testing.assert_array_equal(jax.jit(lambda: binomial_log10_sf(k, n, p0))(), got)
  p32 = p0.astype(np.float32).astype(np.float64)
  want32, sf32 = _scipy_log10_sf(k, n, p32)
  ok = (sf32 > 1e-280) & (np.abs(want32) > 1.2e-37)
  traced = np.asarray(sf_jit(k, n, p0))
  np.testing.assert_allclose(traced[ok], want32[ok], rtol=3e-4, atol=0)


def test_threshold_for_fpr_vmaps_and_matches_the_definition():
  with jax.enable_x64(True):
    assert int(threshold_for_fpr(48, 1e-6)) == 41
    assert 10 ** exact_binomial_log10_sf(41, 48) == pytest.approx(3.1e-7, rel=0.05)
    assert 10 ** exact_binomial_log10_sf(40, 48) == pytest.approx(1.65e-6, rel=0.05)
    n = np.array([10, 48, 100, 1000])
    got = np.asarray(jax.jit(jax.vmap(threshold_for_fpr, (0, None)))(n, 1e-3))
    for ni, ki in zip(n, got, strict=True):
      assert binom.sf(ki - 1, ni, 0.5) <= 1e-3 < binom.sf(ki - 2, ni, 0.5)
    assert int(threshold_for_fpr(5, 1e-6)) == 6  # unreachable: n + 1


def test_identification_tightens_the_threshold_by_the_number_of_keys():
  with jax.enable_x64(True):
    agree = jnp.array([[20, 44, 30], [25, 24, 41]])
    one = identify(agree[:, :1], 48, 1e-6)
    many = identify(jnp.tile(agree, (1, 100)), 48, 1e-6)  # 300 keys
    np.testing.assert_array_equal(identify(agree, 48, 1e-6).best, [1, 2])
    assert int(many.threshold[0]) > int(one.threshold[0]) == 41
    r = identify(agree, 48, 1e-6)
    assert int(r.threshold[0]) == 41  # P(X >= 41) = 3.1e-7 <= 1e-6 / 3
    np.testing.assert_array_equal(r.identified, [True, True])
    assert not bool(many.identified[1])  # 41 of 48 is not enough among 300 keys
    assert float(r.log10_p[0]) == pytest.approx(exact_binomial_log10_sf(44, 48) + math.log10(3))


def test_binomial_bad_input_gives_clear_errors():
  with pytest.raises(WdmjaxError, match="p0"):
    exact_binomial_log10_sf(3, 10, 1.5)
  with pytest.raises(WdmjaxError, match="n: expected non-negative"):
    exact_binomial_log10_sf(3, -1)


def random_cov(rng, d):
  a = rng.normal(size=(d, d))
  cov = a @ a.T / d + 0.2 * np.eye(d)
  s = np.sqrt(np.diag(cov))
  return cov / np.outer(s, s)


def test_mvn_cdf_agrees_with_scipy_on_random_covariances():
  rng = np.random.default_rng(0)
  key = jax.random.PRNGKey(0)
  for d in (2, 3, 5, 8, 12, 20):
    covs = np.stack([random_cov(rng, d) for _ in range(3)])
    z = rng.normal(size=(3, d)) + 1.0
    got = mvn_cdf(z, covs, key)
    want = [multivariate_normal(np.zeros(d), c, abseps=1e-6).cdf(zz)
            for zz, c in zip(z, covs, strict=True)]
    np.testing.assert_allclose(np.asarray(got.p), want, atol=1e-3)
    assert np.all(np.asarray(got.stderr) < 1e-3)


def test_mvn_cdf_closed_forms_independent_and_equicorrelated():
  key = jax.random.PRNGKey(1)
  z = np.linspace(-0.5, 2.0, 10)
  got = float(mvn_cdf(z, np.eye(10), key).p)
  assert got == pytest.approx(np.prod(norm.cdf(z)), abs=1e-4)
  # Equicorrelated rho: X_i = sqrt(rho) W + sqrt(1 - rho) E_i, so
  # P = integral phi(w) prod_i Phi((z_i - sqrt(rho) w) / sqrt(1 - rho)) dw.
  w, weights = np.polynomial.hermite_e.hermegauss(80)
  for rho, d in ((0.5, 6), (0.9, 30), (0.3, 100)):
    zz = np.full(d, 1.5)
    cov = np.full((d, d), rho) + (1 - rho) * np.eye(d)
    inner = np.prod(norm.cdf((zz[None] - np.sqrt(rho) * w[:, None]) / np.sqrt(1 - rho)), axis=1)
    want = np.sum(weights * inner) / np.sqrt(2 * np.pi)
    assert float(mvn_cdf(zz, cov, key).p) == pytest.approx(want, abs=1e-3)


def test_mvn_cdf_bad_covariances_give_clear_errors():
  key = jax.random.PRNGKey(0)
  with pytest.raises(WdmjaxError, match="square"):
    mvn_cdf(np.zeros(3), np.eye(3)[:2], key)
  with pytest.raises(WdmjaxError, match="positive semi-definite"):
    mvn_cdf(np.zeros(2), np.array([[1.0, 2.0], [2.0, 1.0]]), key)
  with pytest.raises(WdmjaxError, match="symmetric"):
    mvn_cdf(np.zeros(2), np.array([[1.0, 0.5], [0.1, 1.0]]), key)
  with pytest.raises(WdmjaxError, match="num_shifts"):
    mvn_cdf(np.zeros(2), np.eye(2), key, num_shifts=1)
