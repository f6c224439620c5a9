"""Exact binomial tails in log space: the null of every bit-agreement watermark test.

`P(Binomial(n, p0) >= k)` underflows float64 long before the p-values a watermark reaches
(n = 4096 agreeing bits gives 10^-1233), so the tail is computed as a logarithm through the
regularised incomplete beta function, P(X >= k) = I_p0(k, n - k + 1), whose continued
fraction (modified Lentz) is evaluated in log space. The cost is O(sqrt(n)) iterations, not
the O(n) of summing the probability mass, and every function here is pure JAX: jit it, vmap
it over arrays of k, n and p0.

Precision. With 64-bit types (`jax.enable_x64(True)`, or the `jax_enable_x64` flag) the
tail matches scipy to about 1e-12 relative. Without them, `binomial_log10_sf` called eagerly
(concrete arguments) still computes in float64 and returns the default float type, so its
log10 p is within 1e-6 relative of scipy wherever that float32 result is a normal number
(|log10 p| > 1.2e-38; smaller magnitudes round towards 0). Traced in float32 (under `jit`,
`vmap`, `grad`, or inside `threshold_for_fpr`) it is within 3e-4 relative
of the exact tail at the float32 value of p0 for n up to 10^5 (measured: at most 1.9e-4 over
p0 from 0.01 to 0.999, 1e-5 near the mean at n = 3373; the continued fraction's float32
rounding dominates), and the rounding of p0 to float32 itself moves log10 p further (about
4e-6 relative at k = 3058, n = 3373, p0 = 0.9).
The log-beta front term avoids the cancellation of large log-gamma values (Stirling's series
and log1p(d) - d, with an exact product for x (a + b) - a). `exact_binomial_log10_sf` is the
float64 Python-number form the verification reports use.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln

from wdmjax.errors import check

_LN10 = math.log(10.0)
# Continued-fraction iterations: convergence takes O(sqrt(max(a, b))), ~3,000 at n = 10^7.
_MAX_ITER = 20_000


def _log_betacf(a: chex.Array, b: chex.Array, x: chex.Array) -> chex.Array:
  """log of the continued fraction of I_x(a, b) (Numerical Recipes' betacf, modified Lentz),
  valid where x < (a + 1) / (a + b + 2); scalars."""
  dtype = x.dtype
  tiny = jnp.finfo(dtype).tiny * 1e10
  eps = jnp.finfo(dtype).eps
  qab, qap, qam = a + b, a + 1.0, a - 1.0

  def guard(v):
    return jnp.where(jnp.abs(v) < tiny, tiny, v)

  d = 1.0 / guard(1.0 - qab * x / qap)
  c = jnp.ones_like(x)

  def cond(s):
    m, _, _, _, delta = s
    return (m <= _MAX_ITER) & (jnp.abs(delta - 1.0) > eps)

  def body(s):
    m, c, d, log_h, _ = s
    m2 = 2.0 * m
    aa = m * (b - m) * x / ((qam + m2) * (a + m2))
    d = 1.0 / guard(1.0 + aa * d)
    c = guard(1.0 + aa / c)
    log_h = log_h + jnp.log(d * c)
    aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
    d = 1.0 / guard(1.0 + aa * d)
    c = guard(1.0 + aa / c)
    delta = d * c
    return m + 1.0, c, d, log_h + jnp.log(delta), delta

  one = jnp.ones_like(x)
  state = (one, c, d, jnp.log(d), 2.0 * one)
  return jax.lax.while_loop(cond, body, state)[3]


def log_betainc(a: chex.Array, b: chex.Array, x: chex.Array) -> chex.Array:
  """log I_x(a, b), the regularised incomplete beta function, for a, b > 0, 0 < x < 1.

  Elementwise over broadcast arrays; finite however small I is.
  """
  a, b, x = jnp.broadcast_arrays(*(jnp.asarray(v, jnp.result_type(float)) for v in (a, b, x)))
  return jnp.vectorize(_log_betainc_scalar)(a, b, x)


# Below this, log-gamma values are small enough to subtract directly; above, Stirling's
# series (remainder < 1e-11 relative at 10) replaces them.
_STIRLING_MIN = 10.0
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _stirling_remainder(z: chex.Array) -> chex.Array:
  """gammaln(z) - ((z - 1/2) log z - z + log(2 pi) / 2) for z >= _STIRLING_MIN."""
  r = 1.0 / z
  r2 = r * r
  return r * (1.0 / 12 - r2 * (1.0 / 360 - r2 * (1.0 / 1260 - r2 / 1680)))


def _log1pmx(d: chex.Array) -> chex.Array:
  """log(1 + d) - d for d > -1, without the cancellation of the direct form near 0: with
  u = d / (2 + d), log1p(d) = 2 atanh(u), so log1p(d) - d = -d u + 2 (u^3/3 + u^5/5 + ...)."""
  u = d / (2.0 + d)
  u2 = u * u
  s = 0.0
  for j in range(39, 1, -2):  # 1/3 + u^2/5 + ... + u^36/39: float64 at |u| <= 1/3
    s = 1.0 / j + u2 * s
  series = -d * u + 2.0 * u * u2 * s
  return jnp.where(jnp.abs(d) <= 0.5, series, jnp.log1p(d) - d)


def _two_product(x: chex.Array, y: chex.Array) -> tuple[chex.Array, chex.Array]:
  """(x * y rounded, its rounding error), exactly (Dekker's product with Veltkamp splits)."""
  splitter = 4097.0 if x.dtype == jnp.float32 else 134217729.0  # 2^12 + 1, 2^27 + 1

  def split(v):
    c = splitter * v
    hi = c - (c - v)
    return hi, v - hi

  p = x * y
  (xh, xl), (yh, yl) = split(x), split(y)
  return p, ((xh * yh - p) + xh * yl + xl * yh) + xl * yl


def _log_front(a, b, x):
  """log(x^a (1 - x)^b / B(a, b)), the prefactor of I_x(a, b); scalars."""
  s = a + b
  # Both large: with e = x s - a, a log(x s / a) + b log((1 - x) s / b) is
  # a log1pmx(e / a) + b log1pmx(-e / b) (the linear terms cancel), no large terms left.
  big = (a >= _STIRLING_MIN) & (b >= _STIRLING_MIN)
  ab, bb = jnp.where(big, a, _STIRLING_MIN), jnp.where(big, b, _STIRLING_MIN)
  p, err = _two_product(x, ab + bb)
  e = (p - ab) + err
  front_big = (ab * _log1pmx(e / ab) + bb * _log1pmx(-e / bb)
               + 0.5 * jnp.log(ab * bb / (ab + bb)) - _HALF_LOG_2PI
               + _stirling_remainder(ab + bb) - _stirling_remainder(ab)
               - _stirling_remainder(bb))
  # One large (hi), one small (lo): gammaln(s) - gammaln(hi) from Stirling's series.
  lo, hi = jnp.minimum(a, b), jnp.maximum(a, b)
  mixed = ~big & (hi >= _STIRLING_MIN)
  lo, hi = jnp.where(mixed, lo, 1.0), jnp.where(mixed, hi, _STIRLING_MIN)
  log_gamma_ratio = ((hi - 0.5) * jnp.log1p(lo / hi) + lo * jnp.log(hi + lo) - lo
                     + _stirling_remainder(hi + lo) - _stirling_remainder(hi))
  powers = a * jnp.log(x) + b * jnp.log1p(-x)
  front_mixed = powers + log_gamma_ratio - gammaln(lo)
  # Both small: log B(a, b) from gammaln (jax.scipy's betaln is off by ~2e-7 at (13, 8)).
  front_small = powers - (gammaln(a) + gammaln(b) - gammaln(s))
  return jnp.where(big, front_big, jnp.where(mixed, front_mixed, front_small))


def _log_betainc_scalar(a, b, x):
  # The continued fraction converges fast below the mean of Beta(a, b); above it use
  # I_x(a, b) = 1 - I_{1-x}(b, a), where the result is not small and log1p is exact.
  front = _log_front(a, b, x)
  direct = x < (a + 1.0) / (a + b + 2.0)
  aa, bb, xx = jnp.where(direct, a, b), jnp.where(direct, b, a), jnp.where(direct, x, 1.0 - x)
  log_part = front + _log_betacf(aa, bb, xx) - jnp.log(aa)
  return jnp.where(direct, log_part, jnp.log1p(-jnp.minimum(jnp.exp(log_part), 1.0)))


def binomial_log10_sf(k: chex.Array, n: chex.Array, p0: chex.Array = 0.5) -> chex.Array:
  """log10 P(X >= k) for X ~ Binomial(n, p0), exact for any n (see the module docstring).

  Args:
    k: observed successes, any integers (k <= 0 gives 0, k > n gives -inf); array.
    n: trials, non-negative integers; array broadcasting with k.
    p0: success probability under the null, in [0, 1]; broadcasts with k.

  Returns:
    Float array of the broadcast shape of (k, n, p0): the log10 upper tail, finite for
    every 0 <= k <= n when 0 < p0 < 1. Values outside the domain (n < 0, p0 outside
    [0, 1]) give NaN; `check_binomial_args` turns them into clear errors eagerly.
    Concrete arguments are computed in float64 whatever the default float type (traced
    ones in it); the result has the default float type.
  """
  float_t = jnp.result_type(float)
  if float_t != jnp.float64 and not any(isinstance(v, jax.core.Tracer) for v in (k, n, p0)):
    # Eager: float32 loses up to 3e-4 relative in the continued fraction (module docstring).
    # (Also inside an outer trace, where the arguments are constants.)
    with jax.ensure_compile_time_eval(), jax.enable_x64(True):
      out = np.asarray(_binomial_log10_sf_jit(*(np.asarray(v, np.float64) for v in (k, n, p0))))
    return jnp.asarray(out, float_t)
  return _binomial_log10_sf(k, n, p0)


def _binomial_log10_sf(k: chex.Array, n: chex.Array, p0: chex.Array) -> chex.Array:
  """`binomial_log10_sf` in the default float type (traceable)."""
  float_t = jnp.result_type(float)
  k, n, p0 = jnp.broadcast_arrays(jnp.asarray(k, float_t), jnp.asarray(n, float_t),
                                  jnp.asarray(p0, float_t))
  inside = (k >= 1) & (k <= n) & (p0 > 0) & (p0 < 1)
  # Dummy in-domain arguments where the answer is a constant, so no NaN reaches a gradient.
  a = jnp.where(inside, k, 1.0)
  b = jnp.where(inside, n - k + 1.0, 1.0)
  x = jnp.where(inside, p0, 0.5)
  log10_tail = jnp.minimum(log_betainc(a, b, x), 0.0) / _LN10
  out = jnp.where(k <= 0, 0.0,
                  jnp.where(k > n, -jnp.inf,
                            jnp.where(p0 == 0, -jnp.inf, jnp.where(p0 == 1, 0.0, log10_tail))))
  bad = (n < 0) | (p0 < 0) | (p0 > 1) | jnp.isnan(p0)
  return jnp.where(bad, jnp.nan, out)


def check_binomial_args(k, n, p0) -> None:
  """Clear errors for concrete arguments outside the domain (not traceable: eager use)."""
  k, n, p0 = np.asarray(k), np.asarray(n), np.asarray(p0, np.float64)
  check(np.issubdtype(k.dtype, np.integer) or np.all(np.mod(k, 1) == 0),
        f"k: expected integers, got {k!r}")
  check(np.all(n >= 0) and (np.issubdtype(n.dtype, np.integer) or np.all(np.mod(n, 1) == 0)),
        f"n: expected non-negative integers, got {n!r}")
  check(np.all((p0 >= 0) & (p0 <= 1)), f"p0: expected probabilities in [0, 1], got {p0!r}")


def exact_binomial_log10_sf(k: int, n: int, p0: float = 0.5) -> float:
  """`binomial_log10_sf` in float64 for Python numbers, with clear errors for bad input."""
  check_binomial_args(k, n, p0)
  with jax.enable_x64(True):
    return float(_binomial_log10_sf_jit(int(k), int(n), float(p0)))


_binomial_log10_sf_jit = jax.jit(_binomial_log10_sf)


def threshold_for_fpr(n: chex.Array, fpr: chex.Array, p0: chex.Array = 0.5) -> chex.Array:
  """The smallest k with P(Binomial(n, p0) >= k) <= fpr: the agreement a test must reach.

  Args:
    n: trials (array of non-negative integers).
    fpr: the false-positive rate allowed, in (0, 1); broadcasts with n.
    p0: the null success probability; broadcasts with n.

  Returns:
    Integer array of the broadcast shape; n + 1 where no k reaches fpr. A binary search of
    ceil(log2(n + 2)) tail evaluations, vmap-able and jit-able.
  """
  float_t = jnp.result_type(float)
  n, fpr, p0 = jnp.broadcast_arrays(jnp.asarray(n, float_t), jnp.asarray(fpr, float_t),
                                    jnp.asarray(p0, float_t))
  target = jnp.log10(fpr)

  def search(n, target, p0):
    def cond(s):
      return s[0] < s[1]

    def body(s):
      lo, hi = s
      mid = jnp.floor((lo + hi) / 2.0)
      ok = binomial_log10_sf(mid, n, p0) <= target
      return jnp.where(ok, lo, mid + 1.0), jnp.where(ok, mid, hi)

    return jax.lax.while_loop(cond, body, (jnp.zeros_like(n), n + 1.0))[0]

  return jnp.vectorize(search)(n, target, p0).astype(jnp.int32)


class Identification(NamedTuple):
  """Which of N keys a bit string belongs to, and whether the match is significant.

  best: index of the best-matching key (most agreeing bits).
  agreeing: its number of agreeing bits.
  threshold: agreements needed at the per-key rate fpr / N.
  identified: agreeing >= threshold.
  log10_p: log10 of the family-wise p-value, min(1, N * P(X >= agreeing)) (union bound).
  """
  best: chex.Array
  agreeing: chex.Array
  threshold: chex.Array
  identified: chex.Array
  log10_p: chex.Array


def identify(agreements: chex.Array, n: chex.Array, fpr: float, p0: float = 0.5
             ) -> Identification:
  """Identification among N keys: the best-matching key, tested at the per-key rate fpr / N.

  Testing N keys at once multiplies the chance that some key matches by accident by up to N
  (the union bound), so the per-key threshold is tightened to fpr / N to keep the global
  false-positive rate at most fpr.

  Args:
    agreements: [..., N] agreeing bits of one extracted message with each of N keys.
    n: bits per key (broadcasts with agreements[..., 0]).
    fpr: the global false-positive rate, in (0, 1).
    p0: chance agreement per bit under the null.

  Returns:
    Identification with fields of shape [...].
  """
  agreements = jnp.asarray(agreements)
  chex.assert_rank(agreements, {1, 2, 3, 4})
  num_keys = agreements.shape[-1]
  best = jnp.argmax(agreements, axis=-1)
  agreeing = jnp.max(agreements, axis=-1)
  threshold = threshold_for_fpr(n, fpr / num_keys, p0)
  log10_p = jnp.minimum(binomial_log10_sf(agreeing, n, p0) + math.log10(num_keys), 0.0)
  return Identification(best, agreeing, jnp.broadcast_to(threshold, agreeing.shape),
                        agreeing >= threshold, log10_p)
