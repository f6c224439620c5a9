"""Nonparametric tests as log10 p: the one-sided rank-sum (Mann-Whitney U / Wilcoxon) test
and the permutation test of one statistic against decoys.

`permutation_log10_p` is what verifies an unkeyed watermark: one statistic per trigger (the
secret one and each decoy), exact whenever the statistics are exchangeable under the null.
`rank_sum_log10_p` needs every single score exchangeable: P(U >= u) is then exact (scipy's
exact distribution for small groups without ties, the normal approximation with tie
correction otherwise). Samples a model draws with one trigger share that trigger's effect,
so their scores are not exchangeable with another trigger's, and a rank-sum test over
samples would over-count the evidence.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from wdmjax.errors import check

EXACT_MAX = 10_000  # scipy's exact U distribution beyond m * n this large is slow


def rank_sum_log10_p(x: np.ndarray, y: np.ndarray) -> float:
  """log10 P(U >= u) for 'x tends to be larger than y'; x: [m], y: [n] scores.

  Returns 0.0 (p = 1) when either group is empty of finite values.
  """
  x = np.asarray(x, np.float64).ravel()
  y = np.asarray(y, np.float64).ravel()
  check(np.all(np.isfinite(x)) and np.all(np.isfinite(y)),
        "scores: expected finite values, got NaN or inf")
  if x.size == 0 or y.size == 0:
    return 0.0
  ties = np.unique(np.concatenate([x, y])).size < x.size + y.size
  method = "exact" if (not ties and x.size * y.size <= EXACT_MAX) else "asymptotic"
  p = stats.mannwhitneyu(x, y, alternative="greater", method=method).pvalue
  return math.log10(max(float(p), 1e-300))


def permutation_log10_p(statistic: float, decoy_statistics: np.ndarray) -> float:
  """log10 of (1 + #{decoys >= statistic}) / (decoys + 1), the one-sided permutation p-value
  of one statistic against D decoy statistics [D]; ties count against the statistic.

  If the D + 1 statistics are exchangeable under the null, P(p <= q) <= q for every q: the
  test is exact, and its smallest p-value is 1 / (D + 1).
  """
  decoy_statistics = np.asarray(decoy_statistics, np.float64).ravel()
  check(decoy_statistics.size >= 1, "decoys: expected at least one decoy statistic")
  check(bool(np.isfinite(statistic)) and bool(np.all(np.isfinite(decoy_statistics))),
        "statistics: expected finite values, got NaN or inf")
  beaten = int(np.sum(decoy_statistics >= statistic))
  return math.log10((1 + beaten) / (decoy_statistics.size + 1))
