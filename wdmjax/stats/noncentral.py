"""The noncentral chi-squared CDF in log space, for p-values far below float64's range.

Tree-Ring's detection statistic is a sum of squared Gaussian distances to a key; under the
null it is noncentral chi-squared, and a watermarked image lands deep in the left tail
(p < 1e-300 is common), where `scipy.stats.ncx2.cdf` returns 0. The CDF is the Poisson
mixture
    P(X <= x) = sum_j Pois(j; lam / 2) P(chi2_{k + 2j} <= x),
summed here in log space, with the regularized lower incomplete gamma from its series
(log P(a, z) = a log z - z - lgamma(a + 1) + log sum_n z^n / ((a+1)...(a+n))) where it
underflows.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from wdmjax.errors import check

_LN10 = math.log(10.0)


def _log_lower_gamma(a: float, z: float) -> float:
  """log of the regularized lower incomplete gamma P(a, z), accurate far into the tail."""
  if z <= 0:
    return -math.inf
  if z > a:  # not in the tail: scipy is accurate
    return math.log(max(special.gammainc(a, z), 1e-300))
  # Series: sum_n z^n / ((a+1)...(a+n)), terms shrink at least geometrically for z < a + 1.
  total, term, n = 1.0, 1.0, 0
  while term > 1e-17 * total and n < 10_000:
    n += 1
    term *= z / (a + n)
    total += term
  return a * math.log(z) - z - special.gammaln(a + 1.0) + math.log(total)


def ncx2_log10_cdf(x: float, dof: float, nc: float) -> float:
  """log10 P(X <= x) for X ~ noncentral chi-squared(dof, nc); -inf at x <= 0.

  dof > 0 degrees of freedom, nc >= 0 noncentrality (the sum of the squared means)."""
  check(dof > 0 and math.isfinite(dof), f"dof: expected a positive number, got {dof!r}")
  check(nc >= 0 and math.isfinite(nc), f"nc: expected a non-negative number, got {nc!r}")
  check(math.isfinite(x), f"x: expected a finite number, got {x!r}")
  if x <= 0:
    return -math.inf
  half = nc / 2.0
  # The Poisson weights that matter: its mean +- 12 sd (and from j = 0 in the left tail,
  # where the smallest j dominate).
  hi = int(half + 12.0 * math.sqrt(half) + 60)
  j = np.arange(hi + 1, dtype=np.float64)
  log_pois = (j * math.log(half) - half - special.gammaln(j + 1.0)) if half > 0 else (
      np.where(j == 0, 0.0, -np.inf))
  log_p = np.array([_log_lower_gamma(dof / 2.0 + jj, x / 2.0) for jj in j])
  return float(special.logsumexp(log_pois + log_p) / _LN10)
