"""The one-sided rank-sum (Mann-Whitney U / Wilcoxon) test, as log10 p.

Used where no exact parametric null exists: an unkeyed watermark is scored against samples
the suspect model draws with decoy triggers. Under the null the scores of both groups are
exchangeable, and P(U >= u) is then exact (scipy's exact distribution for small groups
without ties, the normal approximation with tie correction otherwise).
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
