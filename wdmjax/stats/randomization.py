"""Exact randomization tails: the sum of independent two-point variables (a key-flip test).

S = sum_i X_i with X_i = a_i or b_i, each with probability 1/2, independently; a_i, b_i
non-negative integers. Its law is the convolution of the n two-point laws, computed exactly
in float64 over the integers 0..sum(max(a_i, b_i)) (O(n * range)): no normal approximation,
so the far tail a court-grade alpha needs (1e-6 and below) is as exact as its centre.
"""

from __future__ import annotations

import math

import numpy as np

from wdmjax.errors import check


def two_point_pmf(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """The law of S: pmf[s] = P(S = s), s = 0..sum(max(a, b)); a, b [n] non-negative ints."""
  a, b = _check(a, b)
  pmf = np.zeros(int(np.maximum(a, b).sum()) + 1)
  pmf[0] = 1.0
  top = 0
  for ai, bi in zip(a.tolist(), b.tolist(), strict=True):
    new = np.zeros_like(pmf)
    new[ai:ai + top + 1] += 0.5 * pmf[:top + 1]
    new[bi:bi + top + 1] += 0.5 * pmf[:top + 1]
    pmf, top = new, top + max(ai, bi)
  return pmf


def two_point_log10_sf(a: np.ndarray, b: np.ndarray, observed: int,
                       u: float | None = None) -> float:
  """log10 P(S >= observed) under the two-point law of (a, b) (see the module docstring).

  u: None gives the conservative p-value P(S >= observed) (P(p <= alpha) <= alpha); a
  number in [0, 1] (uniform, drawn independently of everything else) gives the randomized
  p-value P(S > observed) + u P(S = observed), which is exactly uniform under the null.
  """
  pmf = two_point_pmf(a, b)
  check(isinstance(observed, (int, np.integer)), f"observed: expected an integer, got "
                                                 f"{observed!r}")
  check(u is None or 0.0 <= u <= 1.0, f"u: expected a number in [0, 1], got {u!r}")
  obs = int(observed)
  if obs <= 0:
    above, at = 1.0 - pmf[0], pmf[0]
  elif obs >= len(pmf):
    above, at = 0.0, 0.0
  else:
    above, at = float(pmf[obs + 1:].sum()), float(pmf[obs])
  p = above + (1.0 if u is None else u) * at
  return math.log10(p) if p > 0 else -math.inf


def _check(a, b) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a), np.asarray(b)
  check(a.shape == b.shape and a.ndim == 1, f"a, b: expected two [n] arrays, got shapes "
                                            f"{a.shape} and {b.shape}")
  check(np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)
        and bool(np.all(a >= 0)) and bool(np.all(b >= 0)),
        "a, b: expected non-negative integers")
  return a.astype(np.int64), b.astype(np.int64)
