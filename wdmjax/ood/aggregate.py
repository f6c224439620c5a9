"""From per-step losses to one score, chosen on in-distribution validation data only.

A screening user has in-distribution (ID) data and no examples of what will go wrong, so
every choice here is made without OOD data:
  * aggregations of the [N, K] losses at K steps: one step t ("t=600"), the mean over the
    steps ("mean"), or a learned combiner ("gaussian"): a Gaussian fitted to the ID
    validation log-losses, scoring an input by its Mahalanobis distance to them (it also
    flags inputs reconstructed suspiciously *well*, e.g. blank images);
  * the choice among them: the best AUROC of ID validation images against a proxy made from
    those same images (`proxy_outliers`: their patches shuffled, so strokes survive and the
    shape does not);
  * the threshold at a chosen false alarm rate, on ID validation scores the combiner was not
    fitted on.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np

from wdmjax.errors import check, check_number
from wdmjax.ood.metrics import auroc, threshold_at_fpr

AGGREGATIONS = ("single", "mean", "gaussian")
_EPS = 1e-12  # losses of 0 (a perfectly reconstructed input) stay finite on the log scale
_SHRINK = 0.1  # covariance shrinkage towards its diagonal: K steps' losses are correlated


@dataclasses.dataclass(frozen=True)
class Detector:
  """How [N, K] losses at steps `ts` become one score, and the alarm threshold.

  Attributes:
    ts: the K steps the losses were computed at.
    aggregation: 'single', 'mean' or 'gaussian'.
    index: the step used by 'single' (an index into ts).
    mean, precision: the Gaussian of 'gaussian' ([K] and [K, K], on log-losses).
    threshold: score above which an input is flagged (None until calibrated).
    fpr: the false alarm rate the threshold was set at.
  """
  ts: tuple[int, ...]
  aggregation: str
  index: int | None = None
  mean: tuple[float, ...] | None = None
  precision: tuple[tuple[float, ...], ...] | None = None
  threshold: float | None = None
  fpr: float | None = None

  @property
  def name(self) -> str:
    if self.aggregation == "single":
      return f"t={self.ts[self.index]}"
    return self.aggregation

  def score(self, losses: chex.Array) -> np.ndarray:
    """[N, K] (or [N, K, D] with draws, averaged) losses -> [N] scores."""
    return aggregate(losses, self)

  def flags(self, losses: chex.Array) -> np.ndarray:
    """[N] bool: inputs whose score is above the calibrated threshold."""
    check(self.threshold is not None, "detector: expected a calibrated detector (threshold "
                                      "set by `calibrate`), got one without a threshold")
    return self.score(losses) > self.threshold

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> Detector:
    d = dict(d)
    d["ts"] = tuple(d["ts"])
    if d.get("mean") is not None:
      d["mean"] = tuple(d["mean"])
      d["precision"] = tuple(tuple(r) for r in d["precision"])
    return cls(**d)


def _as_losses(losses: chex.Array, k: int | None = None) -> np.ndarray:
  a = np.asarray(losses, np.float64)
  if a.ndim == 3:  # [N, K, D]: average the draws
    a = a.mean(axis=2)
  check(a.ndim == 2 and a.shape[0] >= 1,
        f"losses: expected [N, K] (or [N, K, D]) losses, got shape {a.shape}")
  check(k is None or a.shape[1] == k,
        f"losses: expected losses at the detector's {k} steps, got {a.shape[1]}")
  return a


def fit_gaussian(losses_id: chex.Array) -> tuple[np.ndarray, np.ndarray]:
  """(mean [K], precision [K, K]) of ID log-losses [N, K], the covariance shrunk by 10%
  towards its diagonal (and the diagonal floored) so that it inverts for any N >= 2."""
  a = np.log(_as_losses(losses_id) + _EPS)
  check(a.shape[0] >= 2, f"losses_id: expected at least 2 images to fit, got {a.shape[0]}")
  mu = a.mean(axis=0)
  cov = np.atleast_2d(np.cov(a, rowvar=False))
  diag = np.maximum(np.diag(cov), 1e-6)
  cov = (1 - _SHRINK) * cov + _SHRINK * np.diag(diag)
  cov[np.diag_indices_from(cov)] = np.maximum(np.diag(cov), 1e-6)
  return mu, np.linalg.inv(cov)


def aggregate(losses: chex.Array, detector: Detector) -> np.ndarray:
  """[N, K] (or [N, K, D]) losses -> [N] scores, as `detector` says (higher: more OOD)."""
  check(detector.aggregation in AGGREGATIONS,
        f"detector: expected an aggregation in {list(AGGREGATIONS)}, got "
        f"{detector.aggregation!r}")
  a = _as_losses(losses, len(detector.ts))
  if detector.aggregation == "single":
    check(isinstance(detector.index, int) and 0 <= detector.index < len(detector.ts),
          f"detector: expected a step index in [0, {len(detector.ts)}), got "
          f"{detector.index!r}")
    return a[:, detector.index]
  if detector.aggregation == "mean":
    return a.mean(axis=1)
  check(detector.mean is not None and detector.precision is not None,
        "detector: expected the fitted mean and precision of a 'gaussian' detector")
  d = np.log(a + _EPS) - np.asarray(detector.mean)
  return np.einsum("nk,kl,nl->n", d, np.asarray(detector.precision), d)


def candidates(ts: tuple[int, ...], losses_fit: chex.Array) -> list[Detector]:
  """Every aggregation of losses at `ts`: each single step, the mean, and (K >= 2) the
  Gaussian combiner fitted on the ID losses `losses_fit`."""
  out = [Detector(ts, "single", index=i) for i in range(len(ts))]
  if len(ts) > 1:
    out.append(Detector(ts, "mean"))
    mu, prec = fit_gaussian(losses_fit)
    out.append(Detector(ts, "gaussian", mean=tuple(mu.tolist()),
                        precision=tuple(tuple(r) for r in prec.tolist())))
  return out


def proxy_outliers(images: chex.Array, key: chex.PRNGKey) -> jax.Array:
  """ID images with their patches shuffled ([N, H, W, C] -> same shape): a 4 x 4 grid of
  patches (2 x 2 when H or W is not a multiple of 4), one random permutation per image."""
  x = jnp.asarray(images)
  n, h, w, c = x.shape
  g = 4 if h % 4 == 0 and w % 4 == 0 else 2
  check(h % g == 0 and w % g == 0,
        f"images: expected an even height and width for the proxy, got {h}x{w}")
  ph, pw = h // g, w // g
  patches = x.reshape(n, g, ph, g, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, ph, pw, c)
  perms = jax.vmap(lambda k: jax.random.permutation(k, g * g))(jax.random.split(key, n))
  patches = jnp.take_along_axis(patches, perms[:, :, None, None, None], axis=1)
  return patches.reshape(n, g, g, ph, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)


def select(ts: tuple[int, ...], losses_fit: chex.Array, losses_id: chex.Array,
           losses_proxy: chex.Array, aggregation: str | None = None
           ) -> tuple[Detector, list[dict]]:
  """The candidate with the best AUROC of ID validation losses `losses_id` against proxy
  losses `losses_proxy` (combiner fitted on `losses_fit`, other ID images), among those of
  `aggregation` when given (e.g. 'single': the best one step); also returns every
  candidate's {'detector', 'proxy_auroc'}."""
  check(aggregation is None or aggregation in AGGREGATIONS,
        f"aggregation: expected one of {list(AGGREGATIONS)}, got {aggregation!r}")
  check(aggregation in (None, "single") or len(ts) >= 2,
        f"aggregation: expected at least 2 steps t for {aggregation!r}, got {list(ts)}")
  rows = []
  for det in candidates(ts, losses_fit):
    rows.append({"detector": det.name,
                 "proxy_auroc": auroc(det.score(losses_id), det.score(losses_proxy)),
                 "_det": det})
  allowed = [r for r in rows if aggregation in (None, r["_det"].aggregation)]
  best = max(allowed, key=lambda r: r["proxy_auroc"])["_det"]
  return best, [{k: v for k, v in r.items() if k != "_det"} for r in rows]


def calibrate(detector: Detector, losses_id: chex.Array, fpr: float = 0.05) -> Detector:
  """The detector with its threshold set to flag at most `fpr` of the ID validation
  losses `losses_id` (images it was not fitted on)."""
  check_number(fpr, "fpr", 0, 1, low_open=True, high_open=True)
  thr = threshold_at_fpr(detector.score(losses_id), fpr)
  return dataclasses.replace(detector, threshold=thr, fpr=float(fpr))
