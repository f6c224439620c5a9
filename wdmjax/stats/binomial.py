"""Exact binomial tails in log space (the null of every bit-agreement watermark test).

`P(Binomial(n, p) >= k)` underflows float64 long before the p-values a watermark reaches
(n = 4096 agreeing bits gives 10^-1233), so the tail is summed as log-probabilities with
log-sum-exp and reported as log10.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln, logsumexp

from wdmjax.errors import check


def binom_log10_sf(k: int, n: int, p: float = 0.5) -> float:
  """log10 P(X >= k) for X ~ Binomial(n, p), exact up to float64 rounding.

  Args:
    k: observed successes (any integer; k <= 0 gives 0.0, k > n gives -inf).
    n: trials, >= 0.
    p: success probability in [0, 1].

  Returns:
    log10 of the one-sided upper tail, a finite number for every 0 <= k <= n when 0 < p < 1.
  """
  check(isinstance(n, (int, np.integer)) and n >= 0,
        f"n: expected a non-negative integer, got {n!r}")
  check(isinstance(k, (int, np.integer)), f"k: expected an integer, got {k!r}")
  check(0.0 <= p <= 1.0, f"p: expected a probability in [0, 1], got {p!r}")
  k, n = int(k), int(n)
  if k <= 0:
    return 0.0
  if k > n:
    return -math.inf
  if p == 0.0:
    return -math.inf
  if p == 1.0:
    return 0.0
  i = np.arange(k, n + 1, dtype=np.float64)
  log_pmf = (gammaln(n + 1.0) - gammaln(i + 1.0) - gammaln(n - i + 1.0)
             + i * math.log(p) + (n - i) * math.log1p(-p))
  return float(min(logsumexp(log_pmf), 0.0) / math.log(10.0))


def min_agreeing_bits(n: int, alpha: float, p: float = 0.5) -> int:
  """The smallest k with P(Binomial(n, p) >= k) <= alpha (n + 1 when no k reaches it)."""
  check(0.0 < alpha < 1.0, f"alpha: expected a level in (0, 1), got {alpha!r}")
  target = math.log10(alpha)
  lo, hi = 0, n + 1  # the tail decreases in k: binary search
  while lo < hi:
    mid = (lo + hi) // 2
    if binom_log10_sf(mid, n, p) <= target:
      hi = mid
    else:
      lo = mid + 1
  return lo
