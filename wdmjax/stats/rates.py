"""Detection rates with exact (Clopper-Pearson) binomial confidence intervals."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats as sps

from wdmjax.errors import check


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
  """The exact two-sided interval for a binomial rate from k successes in n trials."""
  check(isinstance(n, int | np.integer) and n >= 1, f"n: expected a positive integer, got {n!r}")
  check(isinstance(k, int | np.integer) and 0 <= k <= n, f"k: expected an integer in [0, {n}], "
        f"got {k!r}")
  check(0 < confidence < 1, f"confidence: expected a number in (0, 1), got {confidence!r}")
  a = 1.0 - confidence
  lo = 0.0 if k == 0 else float(sps.beta.ppf(a / 2, k, n - k + 1))
  hi = 1.0 if k == n else float(sps.beta.ppf(1 - a / 2, k + 1, n - k))
  return lo, hi


def rate_at(log10_p: np.ndarray, fpr: float, confidence: float = 0.95) -> dict:
  """The share of tests with p <= fpr (a TPR on watermarked images, an FPR on clean ones),
  with its Clopper-Pearson interval: {'rate', 'k', 'n', 'low', 'high'}."""
  lp = np.asarray(log10_p, np.float64).ravel()
  check(lp.size >= 1, "log10_p: expected at least one p-value")
  check(0 < fpr < 1, f"fpr: expected a number in (0, 1), got {fpr!r}")
  k = int(np.sum(lp <= math.log10(fpr)))
  lo, hi = clopper_pearson(k, lp.size, confidence)
  return {"rate": k / lp.size, "k": k, "n": int(lp.size), "low": lo, "high": hi}


def empirical_tpr(log10_p: np.ndarray, null_log10_p: np.ndarray, fpr: float) -> dict | None:
  """TPR at a threshold set on the unwatermarked images: flagged when log10 p is below the
  (k+1)-th smallest null value, k = floor(fpr n). At most k null values lie strictly below
  it, ties or not, so the empirical FPR is at most fpr; with ties at the k-th value, '<=
  the k-th' would flag every tied null image (a test whose clean p-values are all 1 would
  pass every image). None when fpr n < 1."""
  k = int(np.floor(fpr * null_log10_p.size))
  if k < 1 or k >= null_log10_p.size:
    return None
  threshold = np.sort(null_log10_p)[k]
  hits = int(np.sum(log10_p < threshold))
  lo, hi = clopper_pearson(hits, log10_p.size)
  return {"rate": hits / log10_p.size, "k": hits, "n": int(log10_p.size), "low": lo, "high": hi,
          "threshold": float(threshold)}
