"""Detection metrics of an out-of-distribution score, in JAX: AUROC, AUPR, FAR95, TPR at FPR.

Convention: a higher score means "more out-of-distribution"; OOD inputs are the positives
(the detections), in-distribution inputs the negatives (a flagged one is a false alarm).
Scores are first replaced by their dense ranks among both sets, computed in float64 on the
host, so the JAX computations see exact ties (no float32 rounding merges two scores); the
final sums are float32 (agreement with scikit-learn ~1e-7 for 20,000 scores a side).
FAR95 is the false alarm rate at the threshold that detects 95% of the OOD inputs, as the
diffusion-and-OOD study reports it. Ties are handled as scikit-learn does: a threshold
never separates equal scores (ROC points only at distinct score values; AUROC counts a
tied pair as one half).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.errors import check, check_number


def _check_scores(scores, name: str) -> np.ndarray:
  s = np.asarray(scores, np.float64)
  check(s.ndim == 1 and s.shape[0] >= 1,
        f"{name}: expected a non-empty vector of scores [N], got shape {tuple(s.shape)}")
  check(bool(np.all(np.isfinite(s))), f"{name}: expected finite scores, got NaN or inf")
  return s


def _ranks(scores_id, scores_ood) -> tuple[jax.Array, jax.Array]:
  """Both score vectors as dense int32 ranks among all their values (order and ties kept)."""
  a = _check_scores(scores_id, "scores_id")
  b = _check_scores(scores_ood, "scores_ood")
  _, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
  inv = inv.astype(np.int32)
  return jnp.asarray(inv[: len(a)]), jnp.asarray(inv[len(a):])


def _roc(scores_id: jax.Array, scores_ood: jax.Array
         ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """ROC points at every position of the descending order: (fpr [N], tpr [N], valid [N],
  sorted scores [N]); `valid` marks the last position of each run of tied scores, the only
  places a threshold can stand."""
  s = jnp.concatenate([scores_ood, scores_id])
  pos = jnp.concatenate([jnp.ones(scores_ood.shape, jnp.float32),
                         jnp.zeros(scores_id.shape, jnp.float32)])
  order = jnp.argsort(-s, stable=True)
  s, pos = s[order], pos[order]
  tp = jnp.cumsum(pos)
  fp = jnp.cumsum(1.0 - pos)
  valid = jnp.concatenate([s[1:] != s[:-1], jnp.array([True])])
  return fp / scores_id.shape[0], tp / scores_ood.shape[0], valid, s


@jax.jit
def _auroc(scores_id: jax.Array, scores_ood: jax.Array) -> jax.Array:
  # Mann-Whitney U with mid-ranks: P(ood > id) + P(ood == id) / 2.
  s = jnp.concatenate([scores_ood, scores_id])
  srt = jnp.sort(s)
  lo = jnp.searchsorted(srt, scores_ood, side="left")
  hi = jnp.searchsorted(srt, scores_ood, side="right")
  ranks = (lo + hi + 1) / 2.0  # 1-based mid-rank of each OOD score among all scores
  n1, n0 = float(scores_ood.shape[0]), float(scores_id.shape[0])  # n1 * n0 may pass 2**31
  return (jnp.sum(ranks) - n1 * (n1 + 1) / 2.0) / (n1 * n0)


def auroc(scores_id: chex.Array, scores_ood: chex.Array) -> float:
  """Area under the ROC curve of OOD detection.

  Args:
    scores_id: [N0] scores of in-distribution inputs (higher: more OOD).
    scores_ood: [N1] scores of OOD inputs.
  Returns:
    AUROC in [0, 1]: the probability that an OOD input scores above an ID one (ties 1/2).
  """
  return float(_auroc(*_ranks(scores_id, scores_ood)))


@jax.jit
def _aupr(scores_id: jax.Array, scores_ood: jax.Array) -> jax.Array:
  fpr, tpr, valid, _ = _roc(scores_id, scores_ood)
  tp = tpr * scores_ood.shape[0]
  fp = fpr * scores_id.shape[0]
  precision = tp / (tp + fp)
  # Average precision: sum of precision x recall increments over the distinct thresholds.
  recall = jnp.where(valid, tpr, 0.0)
  prev = jax.lax.cummax(jnp.concatenate([jnp.zeros(1), recall[:-1]]))
  return jnp.sum(jnp.where(valid, (tpr - prev) * precision, 0.0))


def aupr(scores_id: chex.Array, scores_ood: chex.Array) -> float:
  """Area under the precision-recall curve with OOD as the positive class, as average
  precision (scikit-learn's `average_precision_score`); arguments as in `auroc`."""
  return float(_aupr(*_ranks(scores_id, scores_ood)))


@jax.jit
def _far_at_tpr(scores_id: jax.Array, scores_ood: jax.Array, tpr_level: jax.Array) -> jax.Array:
  fpr, tpr, valid, _ = _roc(scores_id, scores_ood)
  return jnp.min(jnp.where(valid & (tpr >= tpr_level), fpr, 1.0))


def far_at_tpr(scores_id: chex.Array, scores_ood: chex.Array, tpr: float = 0.95) -> float:
  """The false alarm rate (share of ID inputs flagged) at the strictest threshold that
  still detects at least `tpr` of the OOD inputs; `far_at_tpr(.., 0.95)` is FAR95."""
  check_number(tpr, "tpr", 0, 1, low_open=True)
  return float(_far_at_tpr(*_ranks(scores_id, scores_ood), jnp.float32(tpr)))


def far95(scores_id: chex.Array, scores_ood: chex.Array) -> float:
  """FAR95: the false alarm rate when 95% of the OOD inputs are detected."""
  return far_at_tpr(scores_id, scores_ood, 0.95)


@jax.jit
def _tpr_at_fpr(scores_id: jax.Array, scores_ood: jax.Array, fpr_level: jax.Array) -> jax.Array:
  fpr, tpr, valid, _ = _roc(scores_id, scores_ood)
  return jnp.max(jnp.where(valid & (fpr <= fpr_level), tpr, 0.0))


def tpr_at_fpr(scores_id: chex.Array, scores_ood: chex.Array, fpr: float) -> float:
  """The share of OOD inputs detected at the loosest threshold whose false alarm rate on
  the ID inputs is at most `fpr` (0 when no threshold is that strict)."""
  check_number(fpr, "fpr", 0, 1)
  return float(_tpr_at_fpr(*_ranks(scores_id, scores_ood), jnp.float32(fpr)))


def threshold_at_fpr(scores_id: chex.Array, fpr: float) -> float:
  """The smallest threshold that flags (score > threshold) at most `fpr` of the validation
  scores `scores_id` [N]: their ceil((1 - fpr) N)-th smallest value. On new ID data from the
  same distribution the expected false alarm rate is then at most fpr + 1 / (N + 1)."""
  check_number(fpr, "fpr", 0, 1, high_open=True)
  s = np.sort(_check_scores(scores_id, "scores_id"))
  k = int(np.ceil((1.0 - fpr) * len(s) - 1e-9))
  return float(s[max(k, 1) - 1])


def detection_report(scores_id: chex.Array, scores_ood: chex.Array) -> dict[str, float]:
  """{'auroc', 'aupr', 'far95', 'tpr_at_fpr_0.05'} of one ID / OOD pair of score vectors."""
  return {"auroc": auroc(scores_id, scores_ood), "aupr": aupr(scores_id, scores_ood),
          "far95": far95(scores_id, scores_ood),
          "tpr_at_fpr_0.05": tpr_at_fpr(scores_id, scores_ood, 0.05)}
